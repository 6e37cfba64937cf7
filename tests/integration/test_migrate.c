/* Migrations and the blocking Postgres helpers against the harness Postgres:
 * fresh apply, re-run, concurrent migrators, edited and newer schemas refused,
 * broken migrations rolled back with file:line, bad file names, and connection
 * errors that name host and port without leaking passwords. */
#include "../tp_test.h"

#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tidepool/log.h"
#include "tidepool/migrate.h"
#include "tidepool/pg.h"
#include "tidepool/util.h"

static const char *const tables[] = {
    "tidepool.schema_migrations", "tidepool.sync_state",       "tidepool.sync_runs",
    "tidepool.idempotency_keys",  "tidepool.audit_log",        "tidepool.writeback_outbox",
    "tidepool.api_tokens",
};

static PGconn *connect_or_fail(const char *dsn)
{
    char err[512];
    PGconn *c = tp_pg_connect(dsn, 10000, err, sizeof err);
    CHECK_MSG(c != NULL, "connect: %s", err);
    return c;
}

static const char *repo_migrations(void)
{
    static char path[1024];
    const char *root = getenv("TP_ROOT");
    snprintf(path, sizeof path, "%s/sql/migrations", root ? root : ".");
    return path;
}

static int count_sql_files(const char *dir)
{
    char *cmd = tp_xasprintf("ls '%s' | grep -c '^[0-9][0-9][0-9][0-9]_.*\\.sql$'", dir), *out;
    int rc = tp_test_cmd(cmd, &out);
    int n = rc == 0 ? atoi(out) : -1;
    free(cmd);
    free(out);
    return n;
}

/* Creates tmpdir/name (empty) and returns its path (caller frees). */
static char *mig_dir(const char *name)
{
    char *d = tp_xasprintf("%s/%s", tp_test_tmpdir(), name);
    if (mkdir(d, 0755) != 0 && errno != EEXIST)
        tp_test_fail(__FILE__, __LINE__, "mkdir %s: %s", d, strerror(errno));
    return d;
}

static void put(const char *dir, const char *file, const char *text)
{
    const char *base = strrchr(dir, '/');
    char *rel = tp_xasprintf("%s/%s", base ? base + 1 : dir, file);
    free(tp_test_write_tmp(rel, text));
    free(rel);
}

static char *sql1(const char *dsn, const char *sql)
{
    char *v = tp_test_sql(dsn, sql);
    return v ? v : strdup("(error)");
}

static bool sql_is(const char *dsn, const char *sql, const char *want)
{
    char *v = sql1(dsn, sql);
    bool ok = strcmp(v, want) == 0;
    if (!ok)
        tp_test_fail(__FILE__, __LINE__, "%s: got \"%s\", want \"%s\"", sql, v, want);
    free(v);
    return ok;
}

/* The migration lock is free (another session can take it). */
static void check_lock_free(const char *dsn)
{
    char *q = tp_xasprintf("SELECT pg_try_advisory_lock(%lld)", (long long)TP_MIGRATE_LOCK_KEY);
    sql_is(dsn, q, "t");
    free(q);
}

static void test_fresh_apply_creates_every_table(void)
{
    char *dsn = tp_test_new_db("t_migrate_fresh");
    const char *dir = repo_migrations();
    int nfiles = count_sql_files(dir);
    CHECK(nfiles >= 1);
    PGconn *c = connect_or_fail(dsn);
    if (c == NULL)
        goto out;
    char err[1024] = "";
    tp_migrate_status_t st;
    CHECK_MSG(tp_migrate_status(c, dir, &st, err, sizeof err), "status: %s", err);
    CHECK_INT_EQ(st.known, nfiles);
    CHECK_INT_EQ(st.current, 0);
    CHECK_INT_EQ(st.pending, nfiles);
    char why[256];
    CHECK(!tp_migrate_status_current(&st, why, sizeof why));
    CHECK_CONTAINS(why, "pending");

    int applied = -1;
    CHECK_MSG(tp_migrate_apply(c, dir, &applied, err, sizeof err), "apply: %s", err);
    CHECK_INT_EQ(applied, nfiles);
    for (size_t i = 0; i < TP_ARRAY_LEN(tables); i++) {
        char *q = tp_xasprintf("SELECT to_regclass('%s') IS NOT NULL", tables[i]);
        CHECK_MSG(sql_is(dsn, q, "t"), "table %s missing", tables[i]);
        free(q);
    }
    /* The recorded checksum is the sha256 of the file bytes (checked with sha256sum). */
    char *cmd = tp_xasprintf("sha256sum '%s/0001_tidepool_schema.sql' | cut -c1-64", dir), *sum;
    CHECK_INT_EQ(tp_test_cmd(cmd, &sum), 0);
    tp_strtrim(sum);
    char *rec = sql1(dsn, "SELECT checksum FROM tidepool.schema_migrations WHERE version = 1");
    CHECK_STR_EQ(rec, sum);
    CHECK_INT_EQ(strlen(rec), 64);
    free(cmd);
    free(sum);
    free(rec);
    char *cnt = tp_xasprintf("%d", nfiles);
    sql_is(dsn, "SELECT count(*) FROM tidepool.schema_migrations WHERE checksum ~ '^[0-9a-f]{64}$'",
           cnt);
    free(cnt);
    sql_is(dsn, "SELECT name FROM tidepool.schema_migrations WHERE version = 1",
           "0001_tidepool_schema.sql");

    CHECK(tp_migrate_status(c, dir, &st, err, sizeof err));
    CHECK_INT_EQ(st.pending, 0);
    CHECK_INT_EQ(st.current, nfiles);
    CHECK(tp_migrate_status_current(&st, why, sizeof why));

    /* Constraints are real: a bad status and a failed run without error are refused. */
    CHECK(!tp_pg_exec(c, "INSERT INTO tidepool.sync_runs (job, status) VALUES ('j', 'done')", 0,
                      NULL, err, sizeof err));
    CHECK_CONTAINS(err, "23514");
    CHECK(!tp_pg_exec(c,
                      "INSERT INTO tidepool.sync_runs (job, status, finished_at) "
                      "VALUES ('j', 'failed', now())",
                      0, NULL, err, sizeof err));
    CHECK_CONTAINS(err, "sync_runs_error_ck");
    CHECK_MSG(tp_pg_exec(c,
                         "INSERT INTO tidepool.sync_runs (job, daemon) VALUES ('j', 'h:1');"
                         "INSERT INTO tidepool.sync_state (job, last_run_id) "
                         "SELECT 'j', max(id) FROM tidepool.sync_runs;"
                         "INSERT INTO tidepool.audit_log (actor, action, table_name, pk, after) "
                         "VALUES ('a', 'insert', 'public.t', '{\"id\":1}', '{\"id\":1}');"
                         "INSERT INTO tidepool.writeback_outbox (table_name, warehouse_table, pk, "
                         "op, row) VALUES ('public.t', 'c.s.t', '{\"id\":1}', 'insert', '{\"id\":1}');"
                         "INSERT INTO tidepool.idempotency_keys (actor, key, method, path, "
                         "request_hash, status, response, expires_at) VALUES ('a', 'k', 'POST', "
                         "'/x', repeat('0', 64), 201, '{}', now() + interval '1 day');"
                         "INSERT INTO tidepool.api_tokens (name, token_sha256, roles) "
                         "VALUES ('ci', sha256('s'), '{reader}')",
                         0, NULL, err, sizeof err),
              "realistic rows: %s", err);
    CHECK_MSG(tp_pg_exec(c, "INSERT INTO tidepool.sync_state (job) VALUES (repeat('j', 300))", 0,
                         NULL, err, sizeof err),
              "long job name: %s", err);
    CHECK(!tp_pg_exec(c, "INSERT INTO tidepool.sync_state (job) VALUES ('a:b')", 0, NULL, err,
                      sizeof err));
    CHECK_CONTAINS(err, "23514");
    CHECK(!tp_pg_exec(c,
                      "INSERT INTO tidepool.api_tokens (name, token_sha256) "
                      "VALUES ('ci2', sha256('s'))",
                      0, NULL, err, sizeof err));
    CHECK_CONTAINS(err, "23505");
out:
    PQfinish(c);
    free(dsn);
}

/* A fresh database, a connection to it and a private migrations directory
 * (NULL name: the repository's sql/migrations). */
typedef struct fixture {
    char *dsn;
    char *dir;
    PGconn *c;
    char err[1024];
    int applied;
} fixture_t;

static bool fixture_open(fixture_t *f, const char *name, bool own_dir)
{
    memset(f, 0, sizeof *f);
    char *db = tp_xasprintf("t_migrate_%s", name), *d = tp_xasprintf("m_%s", name);
    f->dsn = tp_test_new_db(db);
    f->dir = own_dir ? mig_dir(d) : tp_xstrdup(repo_migrations());
    f->c = f->dsn ? connect_or_fail(f->dsn) : NULL;
    free(db);
    free(d);
    return f->c != NULL;
}

static void fixture_close(fixture_t *f)
{
    PQfinish(f->c);
    free(f->dir);
    free(f->dsn);
}

static bool apply(fixture_t *f)
{
    f->applied = -1;
    f->err[0] = '\0';
    return tp_migrate_apply(f->c, f->dir, &f->applied, f->err, sizeof f->err);
}

#define APPLY_OK(f, n)                                                                  \
    do {                                                                                \
        CHECK_MSG(apply(f), "apply: %s", (f)->err);                                     \
        CHECK_INT_EQ((f)->applied, (n));                                                \
    } while (0)

static void test_rerun_is_noop(void)
{
    fixture_t f;
    if (!fixture_open(&f, "rerun", false))
        goto out;
    CHECK_MSG(apply(&f) && f.applied >= 1, "%s", f.err);
    const char *q = "SELECT string_agg(version || '@' || applied_at, ',' ORDER BY version) "
                    "FROM tidepool.schema_migrations";
    char *before = sql1(f.dsn, q);
    APPLY_OK(&f, 0);
    /* A second connection too (a restarted program). */
    PQfinish(f.c);
    f.c = connect_or_fail(f.dsn);
    APPLY_OK(&f, 0);
    char *after = sql1(f.dsn, q);
    CHECK_STR_EQ(after, before);
    free(before);
    free(after);
    /* An app role that may read the schema but not alter it (no CREATE on the
     * database, not the owner) starts fine when nothing is pending. */
    free(sql1(f.dsn, "DROP ROLE IF EXISTS tp_mig_app"));
    free(sql1(f.dsn, "CREATE ROLE tp_mig_app LOGIN"));
    free(sql1(f.dsn, "GRANT USAGE ON SCHEMA tidepool TO tp_mig_app; "
                     "GRANT SELECT ON tidepool.schema_migrations TO tp_mig_app"));
    char *app_dsn = tp_xasprintf("%s user=tp_mig_app", f.dsn);
    PQfinish(f.c);
    f.c = connect_or_fail(app_dsn);
    APPLY_OK(&f, 0);
    PQfinish(f.c);
    f.c = connect_or_fail(f.dsn);
    free(sql1(f.dsn, "DROP OWNED BY tp_mig_app; DROP ROLE tp_mig_app"));
    free(app_dsn);
out:
    fixture_close(&f);
}

/* Three processes released at once apply a slow migration set: each migration
 * runs once, all three succeed. Without the lock the CREATE TABLE would fail in
 * two of them (or the INSERT would run three times). */
static void test_concurrent_apply_once(void)
{
    char *dsn = tp_test_new_db("t_migrate_conc");
    char *dir = mig_dir("m_conc");
    put(dir, "0001_slow.sql", "CREATE TABLE conc_once (x int);\nSELECT pg_sleep(0.4);\n");
    put(dir, "0002_insert.sql", "INSERT INTO conc_once VALUES (1);\n");
    enum { N = 3 };
    int gate[2], res[2];
    CHECK(pipe(gate) == 0 && pipe(res) == 0);
    pid_t pids[N];
    for (int i = 0; i < N; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(gate[1]);
            char b;
            (void)!read(gate[0], &b, 1); /* returns 0 when the parent closes the gate */
            char err[1024] = "";
            int applied = 0;
            PGconn *c = tp_pg_connect(dsn, 10000, err, sizeof err);
            bool ok = c != NULL && tp_migrate_apply(c, dir, &applied, err, sizeof err);
            char line[1100];
            int n = snprintf(line, sizeof line, "%d %d %s\n", ok, applied, ok ? "" : err);
            (void)!write(res[1], line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
            PQfinish(c);
            _exit(ok ? 0 : 1);
        }
    }
    close(gate[0]);
    close(res[1]);
    int64_t t0 = tp_now_ms();
    close(gate[1]);
    int failures = 0, total = 0;
    for (int i = 0; i < N; i++) {
        int status;
        CHECK(waitpid(pids[i], &status, 0) == pids[i]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failures++;
    }
    int64_t elapsed = tp_now_ms() - t0;
    char buf[8192];
    ssize_t n = read(res[0], buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = '\0';
    close(res[0]);
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        int ok = 0, applied = 0;
        if (sscanf(line, "%d %d", &ok, &applied) == 2)
            total += applied;
        CHECK_MSG(ok == 1, "child failed: %s", line);
    }
    CHECK_INT_EQ(failures, 0);
    CHECK_INT_EQ(total, 2);
    CHECK(elapsed >= 400); /* the slow migration ran (once) while the others waited */
    sql_is(dsn, "SELECT count(*) FROM conc_once", "1");
    sql_is(dsn, "SELECT string_agg(version::text, ',' ORDER BY version) FROM tidepool.schema_migrations",
           "1,2");
    free(dir);
    free(dsn);
}

/* A migrator that finds the lock taken says who holds it, waits, and then runs. */
static void test_waits_for_lock_holder(void)
{
    fixture_t f;
    if (!fixture_open(&f, "wait", true))
        goto out;
    put(f.dir, "0001_first.sql", "CREATE TABLE w1 (a int);\n");
    char key[32], want[64];
    snprintf(key, sizeof key, "%lld", (long long)TP_MIGRATE_LOCK_KEY);
    const char *params[1] = {key};
    CHECK(tp_pg_exec(f.c, "SELECT pg_advisory_lock($1::bigint)", 1, params, f.err, sizeof f.err));
    snprintf(want, sizeof want, "\"holder_pid\":\"%d\"", PQbackendPID(f.c));
    char *logpath = tp_xasprintf("%s/wait.log", tp_test_tmpdir());
    pid_t pid = fork();
    if (pid == 0) {
        FILE *lf = fopen(logpath, "w");
        tp_log_set_stream(lf);
        tp_log_set_level(TP_LOG_INFO);
        char err[1024];
        int applied = 0;
        PGconn *c = tp_pg_connect(f.dsn, 10000, err, sizeof err);
        bool ok = c != NULL && tp_migrate_apply(c, f.dir, &applied, err, sizeof err);
        fclose(lf);
        PQfinish(c);
        _exit(ok && applied == 1 ? 0 : 1);
    }
    /* Wait until the child is queued on the lock (not granted), up to 10 s. */
    bool queued = false;
    for (int i = 0; i < 200 && !queued; i++) {
        char *v = sql1(f.dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                              "AND NOT granted");
        queued = strcmp(v, "1") == 0;
        free(v);
        if (!queued)
            usleep(50 * 1000);
    }
    CHECK_MSG(queued, "the second migrator never queued on the lock");
    int status;
    CHECK_MSG(waitpid(pid, &status, WNOHANG) == 0, "migrator did not wait for the lock");
    sql_is(f.dsn, "SELECT to_regclass('w1') IS NULL", "t");
    CHECK(tp_pg_exec(f.c, "SELECT pg_advisory_unlock($1::bigint)", 1, params, f.err, sizeof f.err));
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    sql_is(f.dsn, "SELECT to_regclass('w1') IS NOT NULL", "t");
    char *log = tp_read_file(logpath, NULL);
    CHECK_CONTAINS(log, "waiting for another process to finish migrating");
    CHECK_CONTAINS(log, want);
    CHECK_CONTAINS(log, "applied migration 0001_first.sql");
    free(log);
    free(logpath);
out:
    fixture_close(&f);
}

/* Reads the status, which must not be current, with want in its explanation. */
static tp_migrate_status_t status_not_current(fixture_t *f, const char *want)
{
    tp_migrate_status_t st = {0};
    char why[256] = "";
    CHECK_MSG(tp_migrate_status(f->c, f->dir, &st, f->err, sizeof f->err), "%s", f->err);
    CHECK(!tp_migrate_status_current(&st, why, sizeof why));
    CHECK_CONTAINS(why, want);
    return st;
}

static void test_edited_migration_refused(void)
{
    fixture_t f;
    if (!fixture_open(&f, "edit", true))
        goto out;
    put(f.dir, "0001_first.sql", "CREATE TABLE e1 (a int);\n");
    APPLY_OK(&f, 1);
    put(f.dir, "0001_first.sql", "CREATE TABLE e1 (a int, b int);\n");
    put(f.dir, "0002_second.sql", "CREATE TABLE e2 (a int);\n");
    CHECK(!apply(&f));
    CHECK_INT_EQ(f.applied, 0);
    CHECK_CONTAINS(f.err, "m_edit/0001_first.sql: changed after it was applied");
    sql_is(f.dsn, "SELECT to_regclass('e2') IS NULL", "t");
    tp_migrate_status_t st = status_not_current(&f, "migration 0001 was edited");
    CHECK_INT_EQ(st.changed, 1);
    CHECK_INT_EQ(st.pending, 1);
    /* The refusal released the lock. */
    check_lock_free(f.dsn);
out:
    fixture_close(&f);
}

static void test_newer_schema_refused(void)
{
    fixture_t f;
    if (!fixture_open(&f, "newer", true))
        goto out;
    put(f.dir, "0001_first.sql", "CREATE TABLE n1 (a int);\n");
    APPLY_OK(&f, 1);
    free(sql1(f.dsn, "INSERT INTO tidepool.schema_migrations (version, name, checksum) "
                     "VALUES (7, '0007_future.sql', repeat('a', 64))"));
    CHECK(!apply(&f));
    CHECK_CONTAINS(f.err, "newer than this build: it has migration 0007 (0007_future.sql)");
    tp_migrate_status_t st =
        status_not_current(&f, "database has migration 0007, newer than this build");
    CHECK_INT_EQ(st.unknown_newer, 7);
    CHECK_INT_EQ(st.current, 7);
    /* A hole (2 recorded without 1) is refused too, naming the missing file. */
    free(sql1(f.dsn, "DELETE FROM tidepool.schema_migrations"));
    free(sql1(f.dsn, "INSERT INTO tidepool.schema_migrations (version, name, checksum) "
                     "VALUES (2, '0002_x.sql', encode(sha256(E'SELECT 1;\\n'::bytea), 'hex'))"));
    put(f.dir, "0002_x.sql", "SELECT 1;\n");
    CHECK(!apply(&f));
    CHECK_CONTAINS(f.err, "migration 0002 applied but not 0001");
out:
    fixture_close(&f);
}

/* Writes 0002_broken.sql with sql and expects apply to fail with want in err. */
static void expect_broken(fixture_t *f, const char *sql, const char *want)
{
    put(f->dir, "0002_broken.sql", sql);
    CHECK_MSG(!apply(f), "broken migration applied: %s", sql);
    CHECK_INT_EQ(f->applied, 0);
    CHECK_CONTAINS(f->err, want);
    sql_is(f->dsn, "SELECT max(version) FROM tidepool.schema_migrations", "1");
    CHECK(PQtransactionStatus(f->c) == PQTRANS_IDLE);
}

static void test_broken_migration_rolls_back(void)
{
    fixture_t f;
    if (!fixture_open(&f, "broken", true))
        goto out;
    put(f.dir, "0001_ok.sql", "CREATE TABLE b_ok (a int);\n");
    put(f.dir, "0002_broken.sql",
        "CREATE TABLE b_partial (a int);\nINSERT INTO b_partial VALUES (1);\n\n"
        "SELECT * FROM no_such_table;\n");
    put(f.dir, "0003_later.sql", "CREATE TABLE b_later (a int);\n");
    CHECK(!apply(&f));
    CHECK_INT_EQ(f.applied, 1);
    CHECK_CONTAINS(f.err, "m_broken/0002_broken.sql:4: relation \"no_such_table\" does not exist "
                          "(SQLSTATE 42P01)");
    sql_is(f.dsn, "SELECT to_regclass('b_partial') IS NULL AND to_regclass('b_later') IS NULL", "t");
    sql_is(f.dsn, "SELECT to_regclass('b_ok') IS NOT NULL", "t");
    sql_is(f.dsn, "SELECT max(version) FROM tidepool.schema_migrations", "1");
    check_lock_free(f.dsn);

    /* A syntax error on line 2; then a failure after multibyte text, where a
     * character position read as a byte offset would point at line 1. */
    expect_broken(&f, "CREATE TABLE s1 (a int);\nCREATE TABLE s2 (a int,,);\n",
                  "0002_broken.sql:2: syntax error");
    expect_broken(&f, "-- ééééééééééééééééééééééééééééééééééééééééé\nSELECT 1;\nSELEC oops;\n",
                  "0002_broken.sql:3: syntax error");
    /* A syntax error inside a PL/pgSQL body is mapped back into the file. */
    expect_broken(&f,
                  "SELECT 1;\nCREATE FUNCTION bf() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n"
                  "  RETURN 1 +;\nEND $$;\n",
                  "0002_broken.sql:4: syntax error");
    /* Bytes that are not UTF-8. */
    expect_broken(&f, "SELECT 'caf\xe9';\n", "0002_broken.sql: invalid byte sequence for encoding");
    /* A runtime error without a position still names the file. */
    expect_broken(&f, "CREATE TABLE b_partial (a int);\nSELECT 1/0;\n",
                  "0002_broken.sql: division by zero");
    sql_is(f.dsn, "SELECT to_regclass('b_partial') IS NULL", "t");
    /* COPY with no data stream: refused, rolled back, connection still usable. */
    expect_broken(&f, "CREATE TABLE b_partial (a int);\nCOPY b_partial FROM STDIN;\n",
                  "0002_broken.sql: COPY FROM STDIN / TO STDOUT cannot run in a migration");
    expect_broken(&f, "CREATE TABLE b_partial (a int);\nCOPY (SELECT 1) TO STDOUT;\n",
                  "0002_broken.sql: COPY FROM STDIN / TO STDOUT cannot run in a migration");
    sql_is(f.dsn, "SELECT to_regclass('b_partial') IS NULL", "t");
    check_lock_free(f.dsn);
    /* A migration that commits on its own is reported. */
    expect_broken(&f, "CREATE TABLE b_commit (a int);\nCOMMIT;\n",
                  "0002_broken.sql: ended the runner's transaction");

    /* Fixed (it was never recorded, so editing it is allowed): both apply. */
    put(f.dir, "0002_broken.sql", "CREATE TABLE b_fixed (a int);\n");
    APPLY_OK(&f, 2);
out:
    fixture_close(&f);
}

static void expect_dir_error(PGconn *c, const char *dsn, const char *dir, const char *want1,
                             const char *want2)
{
    char err[1024] = "";
    int applied = -1;
    CHECK_MSG(!tp_migrate_apply(c, dir, &applied, err, sizeof err), "%s accepted", dir);
    CHECK_INT_EQ(applied, 0);
    CHECK_CONTAINS(err, want1);
    if (want2)
        CHECK_CONTAINS(err, want2);
    tp_migrate_status_t st;
    CHECK(!tp_migrate_status(c, dir, &st, err, sizeof err));
    CHECK_CONTAINS(err, want1);
    /* Nothing touched the database. */
    sql_is(dsn, "SELECT to_regnamespace('tidepool') IS NULL", "t");
}

/* Directories the runner must refuse before touching the database; a file name
 * ending in '/' is created as a directory. */
static const struct {
    const char *dir;
    const char *files[3];
    const char *want1, *want2;
} bad_dirs[] = {
    {"m_badname", {"0001_ok.sql", "2_bad.sql", ".0003_editor_swap.sql"}, "m_badname/2_bad.sql",
     "NNNN_name.sql"},
    {"m_badname2", {"0001_Bad-Name.sql"}, "0001_Bad-Name.sql", "bad migration file name"},
    {"m_readme", {"0001_ok.sql", "README"}, "m_readme/README", NULL},
    {"m_gap", {"0001_a.sql", "0003_c.sql"}, "migration 0002 is missing", "0003_c.sql"},
    {"m_dup", {"0001_a.sql", "0001_b.sql"}, "0001_b.sql", "0001_a.sql"},
    {"m_zero", {"0000_a.sql"}, "0000_a.sql", "start at 0001"},
    {"m_empty", {NULL}, "no migrations found", NULL},
    {"m_subdir", {"0001_a.sql", "0002_dir.sql/"}, "0002_dir.sql: not a regular file", NULL},
    {"does_not_exist", {NULL}, "does_not_exist: cannot read migrations directory", NULL},
};

static void test_bad_file_names(void)
{
    char *dsn = tp_test_new_db("t_migrate_names");
    PGconn *c = connect_or_fail(dsn);
    for (size_t i = 0; c != NULL && i < TP_ARRAY_LEN(bad_dirs); i++) {
        char *d = strcmp(bad_dirs[i].dir, "does_not_exist") == 0
                      ? tp_xasprintf("%s/%s", tp_test_tmpdir(), bad_dirs[i].dir)
                      : mig_dir(bad_dirs[i].dir);
        for (size_t j = 0; j < 3 && bad_dirs[i].files[j]; j++) {
            const char *name = bad_dirs[i].files[j];
            if (name[strlen(name) - 1] == '/') {
                char *sub = tp_xasprintf("%s/%.*s", bad_dirs[i].dir, (int)strlen(name) - 1, name);
                free(mig_dir(sub));
                free(sub);
            } else {
                put(d, name, "SELECT 1;\n");
            }
        }
        expect_dir_error(c, dsn, d, bad_dirs[i].want1, bad_dirs[i].want2);
        free(d);
    }
    /* A NUL byte would silently truncate the SQL sent: refused. */
    char *d = mig_dir("m_nul");
    char *path = tp_xasprintf("%s/0001_nul.sql", d);
    FILE *fp = fopen(path, "wb");
    CHECK(fp != NULL);
    if (fp) {
        fwrite("SELECT 1;\0DROP TABLE x;\n", 1, 25, fp);
        fclose(fp);
    }
    if (c)
        expect_dir_error(c, dsn, d, "m_nul/0001_nul.sql: contains a NUL byte", NULL);
    free(path);
    free(d);
    PQfinish(c);
    free(dsn);
}

static void check_no_secret(const char *err, const char *secret)
{
    CHECK_MSG(strstr(err, secret) == NULL, "error leaks \"%s\": %s", secret, err);
}

static void test_connect_errors_name_host_port_not_password(void)
{
    int port = tp_test_free_port();
    char err[1024] = "", want[64];
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    setenv("PGPASSWORD", "EnvSecret9", 1);

    char *dsn = tp_xasprintf("host=127.0.0.1 port=%d user=nobody password=S3cretPw dbname=x", port);
    PGconn *c = tp_pg_connect(dsn, 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, want);
    CHECK_CONTAINS(err, "cannot connect to Postgres at");
    CHECK(strchr(err, '\n') == NULL);
    check_no_secret(err, "S3cretPw");
    check_no_secret(err, "EnvSecret9");
    free(dsn);

    /* Override password (a fresh OAuth token) is not echoed either. */
    dsn = tp_xasprintf("postgresql://nobody:0ldSecret@127.0.0.1:%d/x", port);
    c = tp_pg_connect_password(dsn, "Fresh0Token", 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, want);
    check_no_secret(err, "0ldSecret");
    check_no_secret(err, "Fresh0Token");
    free(dsn);

    /* Strings libpq cannot parse: it quotes fragments that may be the password. */
    dsn = tp_xasprintf("postgresql://nobody:S3cret%%zzPw@127.0.0.1:%d/x", port);
    c = tp_pg_connect(dsn, 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, "invalid Postgres connection string");
    check_no_secret(err, "S3cret");
    free(dsn);
    c = tp_pg_connect("host=127.0.0.1 password=Sec ret99Pw", 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, "invalid Postgres connection string");
    check_no_secret(err, "ret99Pw");
    c = tp_pg_connect("host=127.0.0.1 password=a b=c", 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, "invalid connection option \"***\"");
    /* Without a password in the string, the typo is shown. */
    c = tp_pg_connect("host=127.0.0.1 hots=x", 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, "invalid connection option \"hots\"");

    /* Validation without connecting (for --check). */
    CHECK(tp_pg_conninfo_check("host=db.example port=6543 password=S3cretPw", err, sizeof err));
    CHECK(tp_pg_conninfo_check("", err, sizeof err));
    CHECK(tp_pg_conninfo_check("plain_dbname", err, sizeof err));
    CHECK(!tp_pg_conninfo_check("postgresql://u:S3cret%zzPw@h/db", err, sizeof err));
    CHECK_CONTAINS(err, "invalid percent-encoded token: \"***\"");

    /* A Unix socket directory that does not exist. */
    c = tp_pg_connect("host=/nonexistent/tp port=5999 password=S3cretPw", 3000, err, sizeof err);
    CHECK(c == NULL);
    CHECK_CONTAINS(err, "/nonexistent/tp:5999");
    check_no_secret(err, "S3cretPw");
    unsetenv("PGPASSWORD");
}

/* A server that accepts TCP but never answers: the connect timeout fires. */
static void test_connect_timeout(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 4) == 0 &&
          getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    int port = ntohs(a.sin_port);
    char *dsn = tp_xasprintf("host=127.0.0.1 port=%d password=S3cretPw connect_timeout=60", port);
    char err[1024] = "", want[64];
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    int64_t t0 = tp_now_ms();
    PGconn *c = tp_pg_connect(dsn, 1500, err, sizeof err);
    int64_t ms = tp_now_ms() - t0;
    CHECK(c == NULL);
    CHECK_MSG(ms >= 1500 && ms < 6000, "timeout took %lld ms", (long long)ms);
    CHECK_CONTAINS(err, want);
    CHECK_CONTAINS(err, "timeout");
    check_no_secret(err, "S3cretPw");
    close(fd);
    free(dsn);
}

static void test_connect_ok_defaults(void)
{
    const char *dsn = tp_test_dsn();
    char err[512] = "";
    PGconn *c = connect_or_fail(dsn);
    if (c == NULL)
        return;
    PGresult *r = tp_pg_query(c, "SELECT current_setting('application_name')", 0, NULL, err,
                              sizeof err);
    CHECK_MSG(r != NULL, "%s", err);
    if (r)
        CHECK_STR_EQ(PQgetvalue(r, 0, 0), "test_migrate");
    PQclear(r);
    PQfinish(c);

    char *named = tp_xasprintf("%s application_name=custom_app", dsn);
    c = connect_or_fail(named);
    r = c ? tp_pg_query(c, "SELECT current_setting('application_name')", 0, NULL, err, sizeof err)
          : NULL;
    if (r)
        CHECK_STR_EQ(PQgetvalue(r, 0, 0), "custom_app");
    PQclear(r);
    PQfinish(c);
    free(named);

    /* The override is the password this connection used (the harness trusts all). */
    char *withpw = tp_xasprintf("%s password=0ldSecret", dsn);
    c = tp_pg_connect_password(withpw, "Fresh0Token", 5000, err, sizeof err);
    CHECK_MSG(c != NULL, "%s", err);
    if (c)
        CHECK_STR_EQ(PQpass(c), "Fresh0Token");
    PQfinish(c);
    free(withpw);

    /* A bare database name with the rest from the PG* environment. */
    c = tp_pg_connect("t_test_migrate", 5000, err, sizeof err);
    CHECK_MSG(c != NULL, "%s", err);
    if (c)
        CHECK_STR_EQ(PQdb(c), "t_test_migrate");
    char where[300];
    if (c)
        CHECK_CONTAINS(tp_pg_where(c, where, sizeof where), getenv("PGPORT"));
    PQfinish(c);
}

static void test_query_and_quote_helpers(void)
{
    char err[512] = "";
    PGconn *c = connect_or_fail(tp_test_dsn());
    if (c == NULL)
        return;
    CHECK(tp_pg_query(c, "SELECT 1/0", 0, NULL, err, sizeof err) == NULL);
    CHECK_CONTAINS(err, "division by zero (SQLSTATE 22012)");
    const char *params[2] = {"41", NULL};
    PGresult *r = tp_pg_query(c, "SELECT $1::int + 1, $2::text IS NULL", 2, params, err, sizeof err);
    CHECK_MSG(r != NULL, "%s", err);
    if (r) {
        CHECK_STR_EQ(PQgetvalue(r, 0, 0), "42");
        CHECK_STR_EQ(PQgetvalue(r, 0, 1), "t");
    }
    PQclear(r);
    CHECK(tp_pg_exec(c, "CREATE TEMP TABLE q (a int); INSERT INTO q VALUES (1)", 0, NULL, err,
                     sizeof err));
    char *q = tp_pg_quote_ident(c, "we\"ird name", err, sizeof err);
    CHECK_STR_EQ(q, "\"we\"\"ird name\"");
    char *sql = tp_xasprintf("CREATE TEMP TABLE %s (a int)", q);
    CHECK_MSG(tp_pg_exec(c, sql, 0, NULL, err, sizeof err), "%s", err);
    free(sql);
    free(q);
    CHECK(tp_pg_quote_ident(c, "bad\xff\xfe", err, sizeof err) == NULL);
    CHECK_CONTAINS(err, "cannot quote identifier");

    /* Server warnings become JSON log lines, not bare stderr text. */
    FILE *logf = tmpfile();
    tp_log_set_stream(logf);
    CHECK(tp_pg_exec(c, "DO $$BEGIN RAISE WARNING 'careful %', 42; END$$", 0, NULL, err,
                     sizeof err));
    tp_log_set_stream(NULL);
    char line[1024] = "";
    rewind(logf);
    CHECK(fgets(line, sizeof line, logf) != NULL);
    CHECK_CONTAINS(line, "\"level\":\"warn\"");
    CHECK_CONTAINS(line, "postgres: careful 42");
    fclose(logf);
    PQfinish(c);
}

static void test_default_dir(void)
{
    char cwd[1024];
    CHECK(getcwd(cwd, sizeof cwd) != NULL);
    setenv("TIDEPOOL_MIGRATIONS_DIR", "/opt/x/migrations", 1);
    CHECK_STR_EQ(tp_migrate_default_dir(), "/opt/x/migrations");
    unsetenv("TIDEPOOL_MIGRATIONS_DIR");
    const char *root = getenv("TP_ROOT");
    CHECK(root && chdir(root) == 0);
    CHECK_STR_EQ(tp_migrate_default_dir(), "sql/migrations");
    CHECK(chdir(tp_test_tmpdir()) == 0);
    CHECK_STR_EQ(tp_migrate_default_dir(), TP_MIGRATIONS_DIR);
    CHECK(chdir(cwd) == 0);
}

int main(void)
{
    tp_log_set_level(TP_LOG_WARN);
    if (tp_test_dsn() == NULL) {
        tp_test_skip("test_migrate", "no harness Postgres (run through make check)");
        return tp_test_done();
    }
    TP_RUN(test_fresh_apply_creates_every_table);
    TP_RUN(test_rerun_is_noop);
    TP_RUN(test_concurrent_apply_once);
    TP_RUN(test_waits_for_lock_holder);
    TP_RUN(test_edited_migration_refused);
    TP_RUN(test_newer_schema_refused);
    TP_RUN(test_broken_migration_rolls_back);
    TP_RUN(test_bad_file_names);
    TP_RUN(test_connect_errors_name_host_port_not_password);
    TP_RUN(test_connect_timeout);
    TP_RUN(test_connect_ok_defaults);
    TP_RUN(test_query_and_quote_helpers);
    TP_RUN(test_default_dir);
    return tp_test_done();
}
