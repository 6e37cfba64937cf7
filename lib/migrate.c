/* Schema migrations. Owns: reading a migrations directory (NNNN_name.sql,
 * versions 1..N without gaps or duplicates, each file's SHA-256), comparing
 * it with tidepool.schema_migrations, and applying what is pending: each file
 * plus its bookkeeping row in one transaction, all under one session advisory
 * lock so concurrent migrators serialise and the later ones find nothing to
 * do. The database is refused when it has a version this build does not know
 * (a newer schema) or when an applied file was edited.
 * Errors name the file, and the line when Postgres reports a position (a
 * character offset into the file, converted here to a line number).
 * It does not lex SQL: a file must not contain BEGIN/COMMIT itself; a COMMIT
 * is detected afterwards and reported, but what it committed stays. There is
 * no down-migration: fix forward with a new file. */
#include "tidepool/migrate.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/evp.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"

typedef struct mig {
    int version;
    char *file; /* base name, "0001_tidepool_schema.sql" */
    char *path; /* dir/file, for messages */
    char *sql;
    size_t len;
    char checksum[65];
} mig_t;

typedef struct mig_set {
    mig_t *v; /* sorted by version; v[i].version == i + 1 once loaded */
    int n;
} mig_set_t;

typedef struct applied {
    int version;
    char *name;
    char *checksum;
} applied_t;

typedef struct applied_set {
    applied_t *v; /* sorted by version */
    int n;
} applied_set_t;

static void mig_set_free(mig_set_t *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->v[i].file);
        free(s->v[i].path);
        free(s->v[i].sql);
    }
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

static void applied_set_free(applied_set_t *a)
{
    for (int i = 0; i < a->n; i++) {
        free(a->v[i].name);
        free(a->v[i].checksum);
    }
    free(a->v);
    a->v = NULL;
    a->n = 0;
}

const char *tp_migrate_default_dir(void)
{
    const char *env = getenv("TIDEPOOL_MIGRATIONS_DIR");
    if (env != NULL && env[0] != '\0')
        return env;
    struct stat st;
    if (stat("sql/migrations", &st) == 0 && S_ISDIR(st.st_mode))
        return "sql/migrations";
    return TP_MIGRATIONS_DIR;
}

/* "NNNN_name.sql": four digits, '_', then [a-z0-9_]+, then ".sql". */
static bool parse_file_name(const char *name, int *version)
{
    size_t len = strlen(name);
    if (len < 10 || strcmp(name + len - 4, ".sql") != 0 || name[4] != '_')
        return false;
    int v = 0;
    for (int i = 0; i < 4; i++) {
        if (name[i] < '0' || name[i] > '9')
            return false;
        v = v * 10 + (name[i] - '0');
    }
    for (size_t i = 5; i < len - 4; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    *version = v;
    return true;
}

static void sha256_hex(const char *data, size_t len, char out[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        abort(); /* SHA-256 unavailable: the OpenSSL build is broken */
    for (unsigned int i = 0; i < mdlen; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static int cmp_mig(const void *a, const void *b)
{
    const mig_t *x = a, *y = b;
    if (x->version != y->version)
        return x->version < y->version ? -1 : 1;
    return strcmp(x->file, y->file);
}

/* Reads one regular file into m; false with err naming it. */
static bool load_file(mig_t *m, char *err, size_t errlen)
{
    struct stat st;
    if (stat(m->path, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: not a regular file", m->path);
        return false;
    }
    m->sql = tp_read_file(m->path, &m->len);
    if (m->sql == NULL) {
        snprintf(err, errlen, "%s: cannot read: %s", m->path, strerror(errno));
        return false;
    }
    if (strlen(m->sql) != m->len) {
        snprintf(err, errlen, "%s: contains a NUL byte", m->path);
        return false;
    }
    sha256_hex(m->sql, m->len, m->checksum);
    return true;
}

/* Checks the sorted set runs 1..n with no duplicate or gap. */
static bool check_sequence(const char *dir, const mig_set_t *s, char *err, size_t errlen)
{
    if (s->n == 0) {
        snprintf(err, errlen, "%s: no migrations found (expected files named NNNN_name.sql)", dir);
        return false;
    }
    for (int i = 0; i < s->n; i++) {
        const mig_t *m = &s->v[i];
        if (i > 0 && m->version == s->v[i - 1].version) {
            snprintf(err, errlen, "%s: version %04d is also used by %s", m->path, m->version,
                     s->v[i - 1].file);
            return false;
        }
        if (m->version != i + 1) {
            if (i == 0 && m->version == 0)
                snprintf(err, errlen, "%s: versions start at 0001", m->path);
            else
                snprintf(err, errlen, "%s: migration %04d is missing before %s (versions must not have gaps)",
                         dir, i + 1, m->file);
            return false;
        }
    }
    return true;
}

static bool load_dir(const char *dir, mig_set_t *s, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        snprintf(err, errlen, "%s: cannot read migrations directory: %s", dir, strerror(errno));
        return false;
    }
    int cap = 0;
    bool ok = true;
    struct dirent *e;
    while (ok && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue; /* ".", "..", editor and VCS dot-files */
        int version;
        if (!parse_file_name(e->d_name, &version)) {
            snprintf(err, errlen,
                     "%s/%s: bad migration file name (expected NNNN_name.sql: four digits, '_', "
                     "then lowercase letters, digits or '_')",
                     dir, e->d_name);
            ok = false;
            break;
        }
        if (s->n == cap) {
            cap = cap ? cap * 2 : 16;
            s->v = tp_xrealloc(s->v, (size_t)cap * sizeof *s->v);
        }
        mig_t *m = &s->v[s->n++];
        memset(m, 0, sizeof *m);
        m->version = version;
        m->file = tp_xstrdup(e->d_name);
        m->path = tp_xasprintf("%s/%s", dir, e->d_name);
        ok = load_file(m, err, errlen);
    }
    closedir(d);
    if (ok) {
        if (s->n > 1)
            qsort(s->v, (size_t)s->n, sizeof *s->v, cmp_mig);
        ok = check_sequence(dir, s, err, errlen);
    }
    if (!ok)
        mig_set_free(s);
    return ok;
}

/* Reads tidepool.schema_migrations (empty when the table does not exist). */
static bool read_applied(PGconn *c, applied_set_t *a, char *err, size_t errlen)
{
    char perr[512];
    PGresult *r = tp_pg_query(c, "SELECT to_regclass('tidepool.schema_migrations') IS NOT NULL", 0,
                              NULL, perr, sizeof perr);
    if (r == NULL) {
        snprintf(err, errlen, "reading schema_migrations: %s", perr);
        return false;
    }
    bool exists = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    if (!exists)
        return true;
    r = tp_pg_query(c, "SELECT version, name, checksum FROM tidepool.schema_migrations ORDER BY version",
                    0, NULL, perr, sizeof perr);
    if (r == NULL) {
        snprintf(err, errlen, "reading tidepool.schema_migrations: %s", perr);
        return false;
    }
    a->n = PQntuples(r);
    a->v = tp_xcalloc((size_t)(a->n ? a->n : 1), sizeof *a->v);
    for (int i = 0; i < a->n; i++) {
        a->v[i].version = atoi(PQgetvalue(r, i, 0));
        a->v[i].name = tp_xstrdup(PQgetvalue(r, i, 1));
        a->v[i].checksum = tp_xstrdup(PQgetvalue(r, i, 2));
    }
    PQclear(r);
    return true;
}

static void compute_status(const mig_set_t *s, const applied_set_t *a, tp_migrate_status_t *out)
{
    memset(out, 0, sizeof *out);
    out->known = s->n;
    out->pending = s->n;
    for (int i = 0; i < a->n; i++) {
        int v = a->v[i].version;
        if (v > out->current)
            out->current = v;
        if (v > s->n) {
            if (v > out->unknown_newer)
                out->unknown_newer = v;
        } else if (v >= 1) {
            out->pending--;
            if (strcmp(a->v[i].checksum, s->v[v - 1].checksum) != 0 &&
                (out->changed == 0 || v < out->changed))
                out->changed = v;
        }
    }
}

bool tp_migrate_status_current(const tp_migrate_status_t *s, char *why, size_t whylen)
{
    if (s->unknown_newer)
        snprintf(why, whylen,
                 "database has migration %04d, newer than this build knows (latest %04d): "
                 "upgrade tidepool",
                 s->unknown_newer, s->known);
    else if (s->changed)
        snprintf(why, whylen, "migration %04d was edited after it was applied", s->changed);
    else if (s->pending)
        snprintf(why, whylen, "%d migration%s pending (run tidepool-sync --migrate)", s->pending,
                 s->pending == 1 ? "" : "s");
    else
        return true;
    return false;
}

bool tp_migrate_status(PGconn *conn, const char *dir, tp_migrate_status_t *out, char *err,
                       size_t errlen)
{
    mig_set_t s = {0};
    applied_set_t a = {0};
    if (!load_dir(dir, &s, err, errlen))
        return false;
    bool ok = read_applied(conn, &a, err, errlen);
    if (ok)
        compute_status(&s, &a, out);
    applied_set_free(&a);
    mig_set_free(&s);
    return ok;
}

static const applied_t *find_applied(const applied_set_t *a, int version)
{
    for (int i = 0; i < a->n; i++)
        if (a->v[i].version == version)
            return &a->v[i];
    return NULL;
}

/* Refuses a database this build must not touch; err names the version or file. */
static bool check_applied(const mig_set_t *s, const applied_set_t *a, char *err, size_t errlen)
{
    tp_migrate_status_t st;
    compute_status(s, a, &st);
    if (st.unknown_newer) {
        snprintf(err, errlen,
                 "database schema is newer than this build: it has migration %04d (%s), this "
                 "build knows up to %04d; refusing to run (upgrade tidepool)",
                 st.unknown_newer, find_applied(a, st.unknown_newer)->name, s->n);
        return false;
    }
    if (st.changed) {
        const mig_t *m = &s->v[st.changed - 1];
        snprintf(err, errlen,
                 "%s: changed after it was applied (file sha256 %.12s..., applied %.12s...); "
                 "never edit an applied migration, add a new one",
                 m->path, m->checksum, find_applied(a, st.changed)->checksum);
        return false;
    }
    for (int i = 0; i < a->n; i++) {
        if (a->v[i].version != i + 1) {
            snprintf(err, errlen, "database has migration %04d applied but not %04d (%s)",
                     a->v[i].version, i + 1, s->v[i].path);
            return false;
        }
    }
    return true;
}

/* 1-based line of the 1-based character position pos in the UTF-8 text sql. */
static int line_of_position(const char *sql, size_t len, long pos)
{
    int line = 1;
    long chars = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)sql[i];
        if ((c & 0xC0) == 0x80)
            continue; /* UTF-8 continuation byte */
        if (++chars >= pos)
            break;
        if (c == '\n')
            line++;
    }
    return line;
}

/* Formats a failed migration: "path:line: message (SQLSTATE x): detail". */
static void migration_error(PGconn *c, const PGresult *r, const mig_t *m, char *err, size_t errlen)
{
    char pmsg[1024];
    tp_pg_result_error(c, r, pmsg, sizeof pmsg);
    const char *pos = r ? PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION) : NULL;
    if (pos != NULL && atol(pos) > 0)
        snprintf(err, errlen, "%s:%d: %s; migration rolled back", m->path,
                 line_of_position(m->sql, m->len, atol(pos)), pmsg);
    else
        snprintf(err, errlen, "%s: %s; migration rolled back", m->path, pmsg);
}

/* Gets the connection out of a COPY a migration started (COPY ... FROM STDIN
 * or TO STDOUT: the runner has no data stream) and drains its results. */
static void leave_copy(PGconn *c)
{
    PGresult *r;
    while ((r = PQgetResult(c)) != NULL) {
        ExecStatusType st = PQresultStatus(r);
        PQclear(r);
        if (st == PGRES_COPY_IN && PQputCopyEnd(c, "COPY FROM STDIN is not supported in migrations") < 0)
            break;
        if (st == PGRES_COPY_OUT) {
            char *buf;
            while (PQgetCopyData(c, &buf, 0) > 0)
                PQfreemem(buf);
        }
        if (st == PGRES_COPY_BOTH)
            break; /* replication protocol: nothing sane to do but let the caller drop it */
    }
}

static void rollback_quietly(PGconn *c)
{
    PGTransactionStatusType ts = PQtransactionStatus(c);
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR)
        PQclear(PQexec(c, "ROLLBACK"));
}

/* Runs one migration and its bookkeeping row in one transaction. */
static bool apply_one(PGconn *c, const mig_t *m, char *err, size_t errlen)
{
    char perr[1024];
    int64_t t0 = tp_now_ms();
    if (!tp_pg_exec(c, "BEGIN", 0, NULL, perr, sizeof perr)) {
        snprintf(err, errlen, "%s: BEGIN: %s", m->path, perr);
        return false;
    }
    PGresult *r = PQexec(c, m->sql);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
        PQclear(r);
        leave_copy(c);
        snprintf(err, errlen,
                 "%s: COPY FROM STDIN / TO STDOUT cannot run in a migration (no data stream); "
                 "use INSERT ... VALUES; migration rolled back",
                 m->path);
        rollback_quietly(c);
        return false;
    }
    if (r == NULL || (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY)) {
        migration_error(c, r, m, err, errlen);
        PQclear(r);
        rollback_quietly(c);
        return false;
    }
    PQclear(r);
    if (PQtransactionStatus(c) != PQTRANS_INTRANS) {
        snprintf(err, errlen,
                 "%s: ended the runner's transaction (a migration must not contain BEGIN, COMMIT "
                 "or ROLLBACK); what it committed stays, it is not recorded as applied",
                 m->path);
        rollback_quietly(c);
        return false;
    }
    char vbuf[16];
    snprintf(vbuf, sizeof vbuf, "%d", m->version);
    const char *params[3] = {vbuf, m->file, m->checksum};
    if (!tp_pg_exec(c,
                    "INSERT INTO tidepool.schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    3, params, perr, sizeof perr) ||
        !tp_pg_exec(c, "COMMIT", 0, NULL, perr, sizeof perr)) {
        snprintf(err, errlen, "%s: recording it: %s; migration rolled back", m->path, perr);
        rollback_quietly(c);
        return false;
    }
    char ms[32];
    snprintf(ms, sizeof ms, "%lld", (long long)(tp_now_ms() - t0));
    const char *kv[] = {"version", vbuf, "file", m->file, "ms", ms, NULL};
    tp_logkv(TP_LOG_INFO, kv, "applied migration %s", m->file);
    return true;
}

static const char bootstrap_sql[] =
    "CREATE SCHEMA IF NOT EXISTS tidepool;\n"
    "CREATE TABLE IF NOT EXISTS tidepool.schema_migrations (\n"
    "    version    integer PRIMARY KEY CHECK (version > 0),\n"
    "    name       text NOT NULL,\n"
    "    checksum   text NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),\n"
    "    applied_at timestamptz NOT NULL DEFAULT now()\n"
    ");\n"
    "COMMENT ON TABLE tidepool.schema_migrations IS\n"
    "    'Migrations applied by tidepool (sha256 of each file); managed by lib/migrate.c';\n";

/* Takes the migration lock, waiting (and saying so) if another process holds it. */
static bool take_lock(PGconn *c, const char *key, char *err, size_t errlen)
{
    char perr[512];
    const char *params[1] = {key};
    PGresult *r = tp_pg_query(c, "SELECT pg_try_advisory_lock($1::bigint)", 1, params, perr,
                              sizeof perr);
    if (r == NULL) {
        snprintf(err, errlen, "taking the migration lock: %s", perr);
        return false;
    }
    bool got = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    if (got)
        return true;
    r = tp_pg_query(c,
                    "SELECT coalesce(string_agg(pid::text, ','), '?') FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                    "AND classid::bigint = ($1::bigint >> 32) "
                    "AND objid::bigint = ($1::bigint & 4294967295)",
                    1, params, perr, sizeof perr);
    const char *kv[] = {"holder_pid", r ? PQgetvalue(r, 0, 0) : "?", NULL};
    tp_logkv(TP_LOG_INFO, kv, "waiting for another process to finish migrating");
    PQclear(r);
    if (!tp_pg_exec(c, "SELECT pg_advisory_lock($1::bigint)", 1, params, perr, sizeof perr)) {
        snprintf(err, errlen, "waiting for the migration lock: %s", perr);
        return false;
    }
    return true;
}

bool tp_migrate_apply(PGconn *conn, const char *dir, int *applied_out, char *err, size_t errlen)
{
    mig_set_t s = {0};
    applied_set_t a = {0};
    int applied = 0;
    bool ok = false, locked = false;
    char perr[512], key[32], old_enc[64] = "";
    snprintf(key, sizeof key, "%lld", (long long)TP_MIGRATE_LOCK_KEY);
    if (applied_out)
        *applied_out = 0;

    if (!load_dir(dir, &s, err, errlen))
        return false;
    if (PQstatus(conn) != CONNECTION_OK || PQtransactionStatus(conn) != PQTRANS_IDLE) {
        snprintf(err, errlen, "migrations need an idle connection (not inside a transaction)");
        goto out;
    }
    /* Files are UTF-8; Postgres reports error positions in characters of it. */
    const char *enc = PQparameterStatus(conn, "client_encoding");
    snprintf(old_enc, sizeof old_enc, "%s", enc ? enc : "");
    if (strcmp(old_enc, "UTF8") != 0 && PQsetClientEncoding(conn, "UTF8") != 0) {
        snprintf(err, errlen, "setting client_encoding UTF8: %s", PQerrorMessage(conn));
        goto out;
    }
    if (!take_lock(conn, key, err, errlen))
        goto out;
    locked = true;
    /* Read first: a role that may use the schema but not alter it (a
     * production app role) starts fine when nothing is pending; the DDL of
     * the bootstrap runs only on a database that has no migration yet. */
    if (!read_applied(conn, &a, err, errlen))
        goto out;
    if (a.n == 0 && !tp_pg_exec(conn, bootstrap_sql, 0, NULL, perr, sizeof perr)) {
        snprintf(err, errlen, "creating tidepool.schema_migrations: %s", perr);
        goto out;
    }
    if (!check_applied(&s, &a, err, errlen))
        goto out;
    for (int i = a.n; i < s.n; i++) {
        if (!apply_one(conn, &s.v[i], err, errlen))
            goto out;
        applied++;
    }
    if (applied == 0)
        tp_debug("schema is current: no migration pending");
    ok = true;
out:
    if (locked && PQstatus(conn) == CONNECTION_OK) {
        const char *params[1] = {key};
        rollback_quietly(conn);
        if (!tp_pg_exec(conn, "SELECT pg_advisory_unlock($1::bigint)", 1, params, perr, sizeof perr))
            tp_warn("releasing the migration lock failed: %s", perr);
    }
    if (old_enc[0] && strcmp(old_enc, "UTF8") != 0 && PQstatus(conn) == CONNECTION_OK &&
        PQsetClientEncoding(conn, old_enc) != 0)
        tp_warn("restoring client_encoding %s failed", old_enc);
    if (applied_out)
        *applied_out = applied;
    applied_set_free(&a);
    mig_set_free(&s);
    return ok;
}
