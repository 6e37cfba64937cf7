/* tidepool-sync ships the write-back outbox: the harness Postgres with the
 * migrations applied, rows written to app.device_assignments through the
 * write-back plans (insert, several updates per key, deletes), the emulator over
 * a lakehouse database holding iot.device_assignments as sql/warehouse creates
 * it, and the real daemon with no sync jobs. Checked: the warehouse converges to
 * exactly the Postgres rows and each outbox row is shipped once (attempts = 1,
 * one "outbox_shipped" log line per row; a second daemon stands by, then takes
 * over when the first stops); kill -9 with a MERGE in flight (latency
 * fault) then a restart converges with no duplicates and an empty backlog;
 * SIGTERM while shipping exits 0 within 10 s. The shipper wakes on NOTIFY
 * tidepool_outbox (single writes ship with an hour-long poll; the figure is
 * the write-to-MERGE latency) and polls when no notify comes; with
 * postgres.password_source = lakebase it logs in with the emulator's expiring
 * tokens and reconnects with a fresh one after expiry. */
#include <libpq-fe.h>

#include "sync_fixture.h"
#include "tidepool/migrate.h"
#include "tidepool/util.h"
#include "tidepool/writeback.h"

static tp_wb_schema_t *schema;
static PGconn *conn;

/* CREATE SCHEMA iot + the CREATE TABLE of sql/warehouse/40_device_assignments.sql. */
static char *lake_ddl(void)
{
    const char *root = getenv("TP_ROOT");
    char *path = fx_printf("%s/sql/warehouse/40_device_assignments.sql", root ? root : ".");
    char *text = tp_read_file(path, NULL);
    free(path);
    if (text == NULL)
        return NULL;
    char *start = strstr(text, "CREATE TABLE iot.device_assignments");
    char *end = start ? strstr(start, ");\n") : NULL;
    char *ddl = end ? fx_printf("CREATE SCHEMA iot; %.*s);", (int)(end - start), start) : NULL;
    free(text);
    return ddl;
}

/* One write through the write-back plan (resent as tp_wb_finish asks); returns the status. */
static int wb(tp_wb_op_t op, const char *pk, const char *body, const char *if_match)
{
    static const char *methods[] = {"POST", "PATCH", "DELETE"};
    const tp_wb_table_t *t = tp_wb_find(schema, "app.device_assignments");
    if (t == NULL)
        return -1;
    char path[128];
    snprintf(path, sizeof path, "/api/v1/tables/app.device_assignments%s%s", pk ? "/" : "",
             pk ? pk : "");
    tp_wb_request_t r = {.op = op, .method = methods[op], .path = path, .pk = pk, .body = body,
                         .body_len = body ? strlen(body) : 0, .if_match = if_match,
                         .actor = "alice", .request_id = "req-outbox", .key_ttl_s = 3600};
    tp_wb_answer_t ans;
    tp_wb_call_t *call;
    if (!tp_wb_prepare(t, &r, &call, &ans)) {
        int st = ans.status;
        fprintf(stderr, "# prepare: %s\n", ans.body ? ans.body : "");
        tp_wb_answer_free(&ans);
        return st;
    }
    for (;;) {
        PGresult *res = PQexecParams(conn, call->sql, call->nparams, NULL, call->params, NULL, NULL, 0);
        tp_wb_next_t next = tp_wb_finish(call, res, PQstatus(conn) == CONNECTION_OK ? NULL : "lost", &ans);
        PQclear(res);
        if (next == TP_WB_ANSWER)
            break;
    }
    tp_wb_call_free(call);
    int st = ans.status;
    tp_wb_answer_free(&ans);
    return st;
}

/* Devices first..last: insert, two updates, and every fourth one deleted. */
static void write_changes(int first, int last, int round)
{
    for (int d = first; d <= last; d++) {
        char pk[16], body[160];
        snprintf(pk, sizeof pk, "%d", d);
        snprintf(body, sizeof body, "{\"device_id\":%d,\"user_id\":%d,\"note\":\"r%d it's \\\"new\\\"\"}",
                 d, d % 5 + 1, round);
        CHECK_INT_EQ(wb(TP_WB_INSERT, NULL, body, NULL), 201);
        snprintf(body, sizeof body, "{\"note\":\"r%d first edit\"}", round);
        CHECK_INT_EQ(wb(TP_WB_UPDATE, pk, body, "\"1\""), 200);
        snprintf(body, sizeof body, "{\"user_id\":%d,\"note\":null}", d % 7 + 1);
        CHECK_INT_EQ(wb(TP_WB_UPDATE, pk, body, "\"2\""), 200);
        if (d % 4 == 0)
            CHECK_INT_EQ(wb(TP_WB_DELETE, pk, NULL, "\"3\""), 200);
    }
}

#define ROWS_SQL                                                                                   \
    "SELECT coalesce(string_agg(d::text, E'\\n' ORDER BY device_id), '') FROM (SELECT device_id, " \
    "user_id, assigned_at, note, updated_at, version FROM %s) d"

/* The warehouse table equals app.device_assignments, with one row per device. */
static void check_converged(const char *what)
{
    char *a = fx_printf(ROWS_SQL, "iot.device_assignments");
    char *b = fx_printf(ROWS_SQL, "app.device_assignments");
    char *got = fx_sql(fx.wh_dsn, a), *want = fx_sql(fx.dsn, b);
    CHECK_MSG(got && want && strcmp(got, want) == 0, "%s: warehouse differs:\n%s\nwant:\n%s", what,
              got ? got : "(err)", want ? want : "(err)");
    CHECK_INT_EQ(fx_num(fx.wh_dsn, "SELECT count(*) - count(DISTINCT device_id) FROM iot.device_assignments"), 0);
    CHECK(fx_num(fx.dsn, "SELECT count(*) FROM app.device_assignments") > 0);
    free(a);
    free(b);
    free(got);
    free(want);
}

static int count_in(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

/* Sum of the "rows" of the outbox_shipped lines of a daemon log. */
static long long shipped_rows(const char *log)
{
    long long sum = 0;
    for (const char *p = log; (p = strstr(p, "\"outbox_shipped\"")) != NULL; p++) {
        const char *eol = strchr(p, '\n');
        const char *r = strstr(p, "\"rows\":\"");
        if (r && (!eol || r < eol))
            sum += atoll(r + 8);
    }
    return sum;
}

static bool setup(void)
{
    char *ddl = lake_ddl();
    CHECK_MSG(ddl != NULL, "no CREATE TABLE iot.device_assignments in sql/warehouse");
    if (ddl == NULL || !fx_setup("test_sync_outbox", ddl, NULL)) {
        free(ddl);
        return false;
    }
    free(ddl);
    CHECK_INT_EQ(fx_num(fx.wh_dsn, "SELECT count(*) FROM iot.device_assignments"), 0);
    conn = PQconnectdb(fx.dsn);
    char err[512] = "";
    int applied = 0;
    bool ok = PQstatus(conn) == CONNECTION_OK &&
              tp_migrate_apply(conn, tp_migrate_default_dir(), &applied, err, sizeof err);
    CHECK_MSG(ok, "migrations: %s%s", err, PQerrorMessage(conn));
    schema = ok ? tp_wb_reflect(conn, err, sizeof err) : NULL;
    CHECK_MSG(schema != NULL, "reflect: %s", err);
    return schema != NULL;
}

static void test_outbox_ships(void)
{
    write_changes(1, 12, 1);
    long long rows = fx_num(fx.dsn, "SELECT count(*) FROM tidepool.writeback_outbox");
    CHECK_INT_EQ(rows, 12 * 3 + 3);
    char *dir = fx_jobs_dir("nojobs");
    char *conf = fx_config("outbox", dir, 2);
    pid_t d = fx_daemon(conf, "outbox1.log");
    CHECK(d > 0);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    check_converged("first daemon");
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS "
                                "NOT NULL AND attempts = 1 AND statement_id IS NOT NULL"),
                 rows);
    /* a second daemon stands by; later writes are picked up by the running one */
    pid_t d2 = fx_daemon(conf, "outbox1b.log");
    CHECK(d2 > 0);
    write_changes(13, 16, 2);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 10000));
    check_converged("later writes");
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    /* the standby takes over */
    write_changes(25, 26, 5);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 15000));
    check_converged("standby took over");
    CHECK_INT_EQ(tp_test_stop(d2, 10000), 0);
    char *log = fx_read_log("outbox1.log");
    char *log2 = fx_read_log("outbox1b.log");
    CHECK_CONTAINS(log2, "standing by");
    CHECK_INT_EQ(shipped_rows(log2), 2 * 3); /* devices 25 and 26: insert + 2 updates */
    long long all = fx_num(fx.dsn, "SELECT count(*) FROM tidepool.writeback_outbox");
    CHECK_INT_EQ(shipped_rows(log) + shipped_rows(log2), all); /* each outbox row shipped once */
    free(log2);
    CHECK_INT_EQ(count_in(log, "outbox_ship_failed"), 0);
    const char *line = strstr(log, "\"outbox_shipped\"");
    const char *bol = line ? line : log;
    while (bol > log && bol[-1] != '\n')
        bol--;
    const char *eol = strchr(bol, '\n');
    fprintf(stderr, "# %lld outbox rows in %d batches; e.g. %.*s\n", all, count_in(log, "\"outbox_shipped\""),
            (int)(eol ? eol - bol : 200), bol);
    CHECK(strstr(log, "tok-sync-test") == NULL); /* no secret in the log */
    free(log);
    free(conf);
    free(dir);
}

/* Starts the daemon with a slow warehouse and waits until a MERGE is in flight. */
static pid_t daemon_mid_shipment(const char *conf, const char *log)
{
    CHECK(fx_faults("latency=1500@execute"));
    pid_t d = fx_daemon(conf, log);
    CHECK(d > 0);
    CHECK(fx_wait_value("SELECT count(*)::text FROM pg_stat_activity WHERE application_name = "
                        "'tidepool-sync shipper'",
                        "1", 10000));
    usleep(800 * 1000); /* lock, reflect, read the batch, POST waiting in the fault */
    return d;
}

static void test_crash_and_sigterm(void)
{
    char *dir = fx_jobs_dir("nojobs2");
    char *conf = fx_config("outbox2", dir, 2);
    /* updates of shipped rows, and new ones */
    for (int dev = 1; dev <= 16; dev++) {
        if (dev % 4 == 0)
            continue;
        char pk[16];
        snprintf(pk, sizeof pk, "%d", dev);
        CHECK_INT_EQ(wb(TP_WB_UPDATE, pk, "{\"note\":\"after crash\"}", "\"3\""), 200);
    }
    write_changes(17, 20, 3);
    CHECK(fx_num(fx.dsn, TP_WB_BACKLOG_SQL) > 0);
    /* The kill lands while the warehouse is executing the MERGE: a trigger in the
     * emulator's database holds device 17's row, and the test waits until the
     * MERGE is seen running there (not a guess by the clock). */
    free(fx_sql(fx.wh_dsn,
                "CREATE FUNCTION iot.hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.device_id = 17 THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$;"
                "CREATE TRIGGER hold BEFORE INSERT OR UPDATE ON iot.device_assignments "
                "FOR EACH ROW EXECUTE FUNCTION iot.hold(); SELECT 1"));
    pid_t d = fx_daemon(conf, "outbox2.log");
    CHECK(d > 0);
    CHECK(fx_wait_value("SELECT count(*)::text FROM pg_stat_activity WHERE state = 'active' "
                        "AND wait_event = 'PgSleep' AND query ILIKE '%MERGE%'",
                        "1", 20000));
    kill(d, SIGKILL);
    int st;
    waitpid(d, &st, 0);
    CHECK(WIFSIGNALED(st));
    /* the emulator finishes the MERGE the dead daemon sent */
    CHECK(fx_wait_value("SELECT count(*)::text FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                        "0", 10000));
    free(fx_sql(fx.wh_dsn, "DROP TRIGGER hold ON iot.device_assignments; SELECT 1"));
    /* applied in the warehouse but never marked shipped: the restart ships it again */
    long long landed = fx_num(fx.wh_dsn, "SELECT count(*) FROM iot.device_assignments WHERE device_id = 17");
    long long unmarked = fx_num(fx.dsn, "SELECT count(*) FROM tidepool.writeback_outbox WHERE "
                                        "pk->>'device_id' = '17' AND op = 'insert' AND shipped_at IS NULL");
    fprintf(stderr, "# after kill -9: device 17 in the warehouse %lld, its insert unmarked %lld\n", landed, unmarked);
    CHECK_INT_EQ(landed, 1);
    CHECK_INT_EQ(unmarked, 1);
    d = fx_daemon(conf, "outbox3.log");
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    check_converged("after kill -9");
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);

    /* SIGTERM with a MERGE in flight: exits 0 within the 10 s budget */
    write_changes(21, 24, 4);
    d = daemon_mid_shipment(conf, "outbox4.log");
    long long t0 = fx_ms();
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    long long took = fx_ms() - t0;
    CHECK_MSG(took < 10000, "SIGTERM took %lld ms", took);
    fprintf(stderr, "# SIGTERM with a MERGE in flight: exited in %lld ms\n", took);
    CHECK(fx_faults(NULL));
    d = fx_daemon(conf, "outbox5.log");
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    check_converged("after SIGTERM");
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(conf);
    free(dir);
}

/* fx_config with more [sync] keys (extra, "key = value\n" lines). */
static char *config_with(const char *name, const char *dir, const char *extra)
{
    char *path = fx_config(name, dir, 2);
    char *text = tp_read_file(path, NULL);
    char *at = text ? strstr(text, "\n[log]") : NULL;
    if (at != NULL) {
        char *both = fx_printf("%.*s\n%s%s", (int)(at - text), text, extra, at);
        char *rel = fx_printf("%s.conf", name);
        free(path);
        path = tp_test_write_tmp(rel, both);
        free(rel);
        free(both);
    }
    free(text);
    return path;
}

/* Updates device pk's note with its current version as If-Match; the status. */
static int touch_device(int dev, const char *note)
{
    char pk[16], body[96];
    snprintf(pk, sizeof pk, "%d", dev);
    snprintf(body, sizeof body, "{\"note\":\"%s\"}", note);
    char *q = fx_printf("SELECT '\"' || version || '\"' FROM app.device_assignments WHERE device_id = %d",
                        dev);
    char *etag = fx_sql(fx.dsn, q);
    int st = wb(TP_WB_UPDATE, pk, body, etag);
    free(etag);
    free(q);
    return st;
}

/* Write-to-MERGE latency: single writes, each waited for; the figure is the
 * outbox row's shipped_at - created_at (both Postgres clocks: the write's
 * transaction start to the commit that marked it shipped, after the MERGE).
 * The poll is an hour, so only the NOTIFY can have woken the shipper. Then,
 * with the trigger disabled (a notify that never comes), a 1 s poll ships. */
static void test_latency(void)
{
    char *dir = fx_jobs_dir("nojobs3");
    char *conf = config_with("outbox-latency", dir, "outbox_poll = 1h\n");
    pid_t d = fx_daemon(conf, "outbox-latency.log");
    CHECK(d > 0);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    long long first = fx_num(fx.dsn, "SELECT coalesce(max(id), 0) FROM tidepool.writeback_outbox");
    enum { N = 12 };
    int shipped = 0;
    for (int i = 0; i < N; i++) {
        char note[32];
        snprintf(note, sizeof note, "latency %d", i);
        CHECK_INT_EQ(touch_device(1 + i % 3, note), 200);
        if (fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000))
            shipped++;
        usleep((useconds_t)(37 + 83 * i % 400) * 1000); /* spread over any poll phase */
    }
    CHECK_MSG(shipped == N, "only %d of %d single writes shipped within 20 s with a 1 h poll", shipped, N);
    char *q = fx_printf("SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::text || ' ' || "
                        "round(avg(ms))::text || ' ' || round(max(ms))::text FROM (SELECT "
                        "extract(epoch FROM shipped_at - created_at) * 1000 AS ms FROM "
                        "tidepool.writeback_outbox WHERE id > %lld) l",
                        first);
    char *fig = fx_sql(fx.dsn, q);
    fprintf(stderr, "# write-to-MERGE latency over %d single writes (median mean max, ms): %s\n", N,
            fig ? fig : "?");
    free(fig);
    free(q);
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(conf);

    /* the safety net: no notify at all, the poll finds the row */
    conf = config_with("outbox-poll", dir, "outbox_poll = 1s\n");
    d = fx_daemon(conf, "outbox-poll.log");
    CHECK(d > 0);
    CHECK(fx_wait_value("SELECT count(*)::text FROM pg_stat_activity WHERE application_name = "
                        "'tidepool-sync shipper'",
                        "1", 10000));
    free(fx_sql(fx.dsn, "ALTER TABLE tidepool.writeback_outbox DISABLE TRIGGER writeback_outbox_notify"));
    usleep(300 * 1000); /* the shipper is waiting, not in its first look */
    CHECK_INT_EQ(touch_device(2, "no notify"), 200);
    CHECK(fx_num(fx.dsn, TP_WB_BACKLOG_SQL) == 1);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    free(fx_sql(fx.dsn, "ALTER TABLE tidepool.writeback_outbox ENABLE TRIGGER writeback_outbox_notify"));
    check_converged("poll without notify");
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(conf);
    free(dir);
}

#define LB_ROLE "lb_ship"

static int count_file(const char *path, const char *needle)
{
    char *text = tp_read_file(path, NULL);
    int n = text ? count_in(text, needle) : 0;
    free(text);
    return n;
}

/* postgres.password_source = lakebase: the shipper logs in as a role whose only
 * password is the 3 s token the emulator mints; after the token expired and its
 * session was terminated it reconnects with a fresh one and ships on. */
static void test_lakebase_shipper(void)
{
    free(fx_sql(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " LB_ROLE));
    free(fx_sql(tp_test_admin_dsn(), "CREATE ROLE " LB_ROLE " LOGIN IN ROLE tp_password_login"));
    free(fx_sql(tp_test_admin_dsn(), "GRANT tidepool TO " LB_ROLE));
    int port = tp_test_free_port();
    char listen[64], elog[512];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    snprintf(elog, sizeof elog, "%s/emulator-lakebase.log", tp_test_tmpdir());
    char *eargv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", fx.wh_dsn,
                     "--token", "tok-sync-test", "--lakebase-role", LB_ROLE, "--lakebase-ttl", "3", NULL};
    pid_t emu = tp_test_spawn(eargv, elog);
    CHECK(emu > 0 && tp_test_wait_port(port, 10000));
    const char *pgport = getenv("PGPORT");
    const char *db = strstr(fx.dsn, "dbname=");
    char *dir = fx_jobs_dir("nojobs4");
    char *text = fx_printf("[postgres]\ndsn = host=127.0.0.1 port=%s user=" LB_ROLE " %s\n"
                           "password_source = lakebase\nlakebase_instance = tidepool-instance\n"
                           "[warehouse]\nhost = http://127.0.0.1:%d\nwarehouse_id = tidepool-local\n"
                           "token = tok-sync-test\n[sync]\ndefinitions = %s\n[log]\nlevel = info\n",
                           pgport ? pgport : "5432", db ? db : "", port, dir);
    char *conf = tp_test_write_tmp("outbox-lakebase.conf", text);
    pid_t d = fx_daemon(conf, "outbox-lakebase.log");
    CHECK(d > 0);
    write_changes(30, 31, 6);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 20000));
    check_converged("lakebase shipper");
    static const char who[] = "SELECT coalesce(string_agg(usename, ','), '') FROM pg_stat_activity "
                              "WHERE application_name = 'tidepool-sync shipper'";
    char *u = fx_sql(fx.dsn, who);
    CHECK_STR_EQ(u, LB_ROLE);
    free(u);
    int mints = count_file(elog, "lakebase credential minted");
    CHECK(mints >= 1);

    /* the token expires (VALID UNTIL passes), the session dies: a fresh token */
    usleep(3500 * 1000);
    free(fx_sql(fx.dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'tidepool-sync shipper'"));
    write_changes(32, 33, 7);
    CHECK(fx_wait_value(TP_WB_BACKLOG_SQL, "0", 30000));
    check_converged("lakebase shipper after expiry");
    u = fx_sql(fx.dsn, who);
    CHECK_STR_EQ(u, LB_ROLE);
    free(u);
    CHECK(count_file(elog, "lakebase credential minted") > mints);
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    CHECK_INT_EQ(tp_test_stop(emu, 5000), 0);
    char *log = fx_read_log("outbox-lakebase.log");
    CHECK_CONTAINS(log, "outbox_shipped");
    CHECK(count_in(log, "holding the shipping lock") >= 2); /* it did reconnect */
    CHECK(strstr(log, "lbt-") == NULL); /* no token in the daemon's log */
    free(log);
    CHECK_INT_EQ(count_file(elog, "lbt-"), 0);
    free(fx_sql(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " LB_ROLE));
    free(conf);
    free(text);
    free(dir);
}

int main(void)
{
    if (!setup())
        return tp_test_done();
    TP_RUN(test_outbox_ships);
    TP_RUN(test_crash_and_sigterm);
    TP_RUN(test_latency);
    TP_RUN(test_lakebase_shipper);
    tp_wb_schema_unref(schema);
    PQfinish(conn);
    fx_stop_emulator();
    return tp_test_done();
}
