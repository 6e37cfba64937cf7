/* tidepool-server with postgres.password_source = lakebase, end to end: the
 * server logs in to the harness Postgres as lb_srv, a role whose only password
 * is the short-lived token tidepool-warehouse mints (--lakebase-ttl 3). The
 * read pools, the LISTEN connections and the blocking start-up connects all
 * get their password from the provider; after the token expired and the
 * backends were terminated, the server reconnects with fresh tokens and keeps
 * answering. No token appears in the server's log. */
#include "../tp_test.h"

#include "server_harness.h"

#include <sys/stat.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"
#include "tidepool/util.h"

#define PAT "dapi-lakebase-server-pat"
#define ROLE "lb_srv"

static srv_h_t S;

static int count_in(const char *path, const char *needle)
{
    char *text = tp_read_file(path, NULL);
    int n = 0;
    for (const char *p = text; p && (p = strstr(p, needle)) != NULL; p++)
        n++;
    free(text);
    return n;
}

static char *sql1(const char *dsn, const char *sql)
{
    return tp_test_sql(dsn, sql);
}

static void server_runs_on_lakebase_tokens(void)
{
    (void)harness_setup; /* the harness's other helpers are not needed here */
    (void)problem_field;
    (void)hdr;
    const char *dsn = tp_test_dsn();
    if (dsn == NULL) {
        tp_test_skip("test_lakebase_server", "no harness Postgres");
        return;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!harness_db(dsn)) {
        tp_test_fail(__FILE__, __LINE__, "database set-up failed");
        return;
    }
    free(sql1(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " ROLE));
    free(sql1(tp_test_admin_dsn(), "CREATE ROLE " ROLE " LOGIN IN ROLE tp_password_login"));
    free(sql1(dsn, "GRANT USAGE ON SCHEMA iot, tidepool TO " ROLE ";"
                   "GRANT SELECT ON ALL TABLES IN SCHEMA iot, tidepool TO " ROLE));

    int eport = tp_test_free_port();
    char listen[64], url[64], elog[512];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", eport);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", eport);
    snprintf(elog, sizeof elog, "%s/emulator.log", tp_test_tmpdir());
    const char *eargv[] = {tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", dsn,
                           "--token", PAT, "--lakebase-role", ROLE, "--lakebase-ttl", "3", NULL};
    pid_t epid = tp_test_spawn((char *const *)eargv, elog);
    CHECK(epid > 0 && tp_test_wait_port(eport, 10000));

    const char *port = getenv("PGPORT");
    const char *db = strstr(dsn, "dbname=");
    char lbdsn[512];
    snprintf(lbdsn, sizeof lbdsn, "host=127.0.0.1 port=%s user=" ROLE " %s", port ? port : "5432",
             db ? db : "");
    char *extra = tp_xasprintf("[warehouse]\nhost = %s\ntoken = " PAT "\n"
                               "[postgres]\npassword_source = lakebase\n"
                               "lakebase_instance = tidepool-instance\n",
                               url);
    S.extra_conf = extra;
    harness_write_defs(&S);
    bool up = harness_start(&S, lbdsn, 2) && harness_ready(&S);
    CHECK_MSG(up, "server did not get ready; see %s", S.log);
    /* The emulator gives the role one password: each provider's mint (two
     * workers, the main loop, the status thread) replaces the previous token,
     * so a pool may meet 28P01 once and back off before it is up. */
    resp_t r = await_status(&S, "/api/v1/datasets/daily_metrics?user_id=1&until=2025-01-03", 200, 100);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    char *n = sql1(dsn, "SELECT count(*) FROM pg_stat_activity WHERE usename = '" ROLE "'");
    CHECK_MSG(n && atoi(n) >= 3, "lb_srv sessions: %s", n ? n : "?"); /* pools + LISTEN */
    free(n);
    int mints = count_in(elog, "lakebase credential minted");
    CHECK(mints >= 2); /* blocking start-up provider + loop providers */

    /* the tokens expire; the backends die; the server comes back by itself */
    usleep(3700 * 1000);
    free(sql1(dsn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                   "WHERE usename = '" ROLE "'"));
    usleep(300 * 1000);
    r = await_status(&S, "/api/v1/datasets/users?prefix=user%201", 200, 100);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    CHECK(harness_ready(&S));
    CHECK(count_in(elog, "lakebase credential minted") > mints);
    n = sql1(dsn, "SELECT count(*) FROM pg_stat_activity WHERE usename = '" ROLE "'");
    CHECK_MSG(n && atoi(n) >= 2, "lb_srv sessions after terminate: %s", n ? n : "?");
    free(n);

    /* tidepool-sync's start-up paths (--migrate, --ping) mint their own credential */
    char *sconf_text = tp_xasprintf("[postgres]\ndsn = %s\npassword_source = lakebase\n"
                                    "lakebase_instance = tidepool-instance\n"
                                    "[warehouse]\nhost = %s\ntoken = " PAT "\n"
                                    "warehouse_id = tidepool-local\n",
                                    lbdsn, url);
    char *sconf = tp_test_write_tmp("sync.conf", sconf_text);
    char *cmd = tp_xasprintf("%s --config %s --ping 2>&1", tp_test_bin("tidepool-sync"), sconf);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    CHECK_MSG(rc == 0, "tidepool-sync --ping: %s", out ? out : "?");
    CHECK_CONTAINS(out, "as " ROLE);
    CHECK(out == NULL || strstr(out, "lbt-") == NULL);
    free(out);
    free(cmd);
    /* tidepool-sync --once: migrations, run bookkeeping and the COPY into the
     * target all log in as lb_srv with minted tokens (the daemon's password hook) */
    free(sql1(dsn, "CREATE SCHEMA src; CREATE TABLE src.items AS SELECT i AS id, i * 2 AS v "
                   "FROM generate_series(1, 100) i; GRANT tidepool TO " ROLE));
    char *jobs = tp_xasprintf("%s/jobs", tp_test_tmpdir());
    mkdir(jobs, 0755);
    free(tp_test_write_tmp("jobs/items.sql", "-- @target sink.items\n-- @mode snapshot\n-- @key id\n"
                                             "-- @every 1h\nSELECT id, v FROM src.items\n"));
    free(sconf);
    free(sconf_text);
    sconf_text = tp_xasprintf("[postgres]\ndsn = %s\npassword_source = lakebase\n"
                              "lakebase_instance = tidepool-instance\n"
                              "[warehouse]\nhost = %s\ntoken = " PAT "\nwarehouse_id = tidepool-local\n"
                              "[sync]\ndefinitions = %s\n",
                              lbdsn, url, jobs);
    sconf = tp_test_write_tmp("sync-once.conf", sconf_text);
    int before = count_in(elog, "lakebase credential minted");
    cmd = tp_xasprintf("%s --config %s --once items 2>&1", tp_test_bin("tidepool-sync"), sconf);
    rc = tp_test_cmd(cmd, &out);
    CHECK_MSG(rc == 0, "tidepool-sync --once: %s", out ? out : "?");
    CHECK(out == NULL || strstr(out, "lbt-") == NULL);
    free(out);
    free(cmd);
    n = sql1(dsn, "SELECT count(*) || ':' || sum(v) FROM sink.items");
    CHECK_STR_EQ(n, "100:10100");
    free(n);
    n = sql1(dsn, "SELECT tableowner FROM pg_tables WHERE schemaname = 'sink' AND tablename = 'items'");
    CHECK_STR_EQ(n, ROLE); /* created by the daemon's own (lb_srv) session */
    free(n);
    CHECK(count_in(elog, "lakebase credential minted") > before);
    free(jobs);

    /* a configuration without credentials is refused before anything runs */
    free(sconf);
    free(sconf_text);
    sconf_text = tp_xasprintf("[postgres]\ndsn = %s\npassword_source = lakebase\n", lbdsn);
    sconf = tp_test_write_tmp("sync-bad.conf", sconf_text);
    cmd = tp_xasprintf("%s --config %s --ping 2>&1", tp_test_bin("tidepool-sync"), sconf);
    rc = tp_test_cmd(cmd, &out);
    CHECK(rc != 0);
    CHECK_CONTAINS(out, "postgres.password_source = lakebase needs");
    free(out);
    free(cmd);
    free(sconf);
    free(sconf_text);

    if (S.pid > 0)
        CHECK_INT_EQ(tp_test_stop(S.pid, 15000), 0);
    S.pid = -1;
    /* the daemon, with hour-long tokens: a password rotated behind its back is
     * refused at the next run's login, and the next run gets a new token */
    int e2port = tp_test_free_port();
    char listen2[64], url2[64], elog2[512];
    snprintf(listen2, sizeof listen2, "127.0.0.1:%d", e2port);
    snprintf(url2, sizeof url2, "http://127.0.0.1:%d", e2port);
    snprintf(elog2, sizeof elog2, "%s/emulator2.log", tp_test_tmpdir());
    const char *e2argv[] = {tp_test_bin("tidepool-warehouse"), "--listen", listen2, "--dsn", dsn,
                            "--token", PAT, "--lakebase-role", ROLE, "--lakebase-ttl", "3600", NULL};
    pid_t e2pid = tp_test_spawn((char *const *)e2argv, elog2);
    CHECK(e2pid > 0 && tp_test_wait_port(e2port, 10000));
    char *jobs2 = tp_xasprintf("%s/jobs2", tp_test_tmpdir());
    mkdir(jobs2, 0755);
    free(tp_test_write_tmp("jobs2/items2.sql", "-- @target sink.items2\n-- @mode snapshot\n-- @key id\n"
                                               "-- @every 1s\nSELECT id, v FROM src.items\n"));
    char *dconf_text = tp_xasprintf("[postgres]\ndsn = %s\npassword_source = lakebase\n"
                                    "lakebase_instance = tidepool-instance\n"
                                    "[warehouse]\nhost = %s\ntoken = " PAT "\n"
                                    "warehouse_id = tidepool-local\n[sync]\ndefinitions = %s\n",
                                    lbdsn, url2, jobs2);
    char *dconf = tp_test_write_tmp("sync-daemon.conf", dconf_text);
    char dlog[512];
    snprintf(dlog, sizeof dlog, "%s/daemon.log", tp_test_tmpdir());
    char *dargv[] = {(char *)tp_test_bin("tidepool-sync"), "--config", dconf, NULL};
    pid_t dpid = tp_test_spawn(dargv, dlog);
    static const char runs_sql[] = "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'items2' "
                                   "AND status = 'succeeded'";
    int runs = 0;
    for (int i = 0; i < 150 && runs < 1; i++) {
        usleep(100 * 1000);
        char *v = sql1(dsn, runs_sql);
        runs = v ? atoi(v) : 0;
        free(v);
    }
    CHECK_MSG(runs >= 1, "no successful run; see %s", dlog);
    int mints2 = count_in(elog2, "lakebase credential minted");
    free(sql1(dsn, "ALTER ROLE " ROLE " PASSWORD 'rotated-behind-the-daemon'"));
    int after = runs;
    for (int i = 0; i < 150 && after <= runs + 1; i++) {
        usleep(100 * 1000);
        char *v = sql1(dsn, runs_sql);
        after = v ? atoi(v) : 0;
        free(v);
    }
    CHECK_MSG(after > runs + 1, "runs did not recover after the rotation (%d -> %d); see %s", runs,
              after, dlog);
    CHECK(count_in(elog2, "lakebase credential minted") > mints2);
    CHECK_INT_EQ(tp_test_stop(dpid, 10000), 0);
    CHECK_INT_EQ(tp_test_stop(e2pid, 5000), 0);
    CHECK(count_in(dlog, "\"level\"") > 0);
    CHECK_INT_EQ(count_in(dlog, "lbt-"), 0);
    CHECK_INT_EQ(count_in(elog2, "lbt-"), 0);
    free(jobs2);
    free(dconf);
    free(dconf_text);

    CHECK_INT_EQ(tp_test_stop(epid, 5000), 0);
    CHECK(count_in(S.log, "\"level\"") > 0); /* the log is there and has lines */
    CHECK_INT_EQ(count_in(S.log, "lbt-"), 0);   /* but no token */
    CHECK_INT_EQ(count_in(elog, "lbt-"), 0);
    harness_finish(&S);
    free(sql1(dsn, "DROP OWNED BY " ROLE));
    free(sql1(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " ROLE));
    free(extra);
}

int main(void)
{
    TP_RUN(server_runs_on_lakebase_tokens);
    return tp_test_done();
}
