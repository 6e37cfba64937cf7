/* tidepool-server reloads its [warehouse] fallback settings on SIGHUP, against
 * the real emulator: with max_in_flight = 1 and wait = 0 a second statement is
 * refused (429) and a read answers 202 at once; after the config file changes
 * to max_in_flight = 3, wait = 20s, max_result_bytes = 1k and a SIGHUP, the
 * same kind of read waits and answers 200, a new big result fails with 413
 * while the statement started before the reload still delivers its big result
 * (running statements keep their settings), and the changed warehouse.host is
 * logged as needing a restart (the server keeps using the old one). */
#include "server_harness.h"

#define SVC "tok-svc-reload"

static srv_h_t S;
static int EMU_PORT;

static void write_conf(const char *warehouse)
{
    char conf[2048];
    snprintf(conf, sizeof conf,
             "[postgres]\ndsn = %s\npool_size = 2\n"
             "[server]\nlisten = 127.0.0.1:%d\nthreads = 2\ndefinitions = %s\ntimeout = 30s\n"
             "[warehouse]\nwarehouse_id = tidepool-local\ntoken = " SVC "\nabandon_after = 60s\n%s",
             tp_test_dsn(), S.port, S.qdir, warehouse);
    free(S.conf);
    S.conf = tp_test_write_tmp("reload.conf", conf);
}

static resp_t get_prefer(const char *path, const char *prefer)
{
    const char *h[] = {prefer, NULL};
    return http(&S, "GET", path, prefer ? h : NULL, NULL, 0);
}

static int count_log(const char *needle)
{
    char *text = tp_read_file(S.log, NULL);
    int n = 0;
    for (const char *p = text; p && (p = strstr(p, needle)) != NULL; p++)
        n++;
    free(text);
    return n;
}

static void sighup_reloads_fallback_settings(void)
{
    const char *dsn = tp_test_dsn();
    if (!dsn) {
        tp_test_skip("test_fallback_reload", "no harness Postgres");
        return;
    }
    (void)harness_setup;
    (void)problem_field;
    (void)await_status;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!harness_db(dsn)) {
        tp_test_fail(__FILE__, __LINE__, "database set-up failed");
        return;
    }
    snprintf(S.qdir, sizeof S.qdir, "%s/fbq", tp_test_tmpdir());
    mkdir(S.qdir, 0755);
    harness_def(&S, "slow.warehouse.sql",
                "-- @param secs DOUBLE\n-- @param tag STRING = a\n"
                "SELECT pg_sleep(:secs)::text AS slept, :tag AS tag\n");
    harness_def(&S, "big.warehouse.sql",
                "-- @param secs DOUBLE\n-- @param tag STRING = a\n"
                "SELECT repeat('x', 5000) AS big, pg_sleep(:secs)::text AS slept, :tag AS tag\n");
    EMU_PORT = tp_test_free_port();
    char listen[64], elog[512];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", EMU_PORT);
    snprintf(elog, sizeof elog, "%s/emulator.log", tp_test_tmpdir());
    char *eargv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn",
                     (char *)dsn, "--token", SVC, NULL};
    pid_t emu = tp_test_spawn(eargv, elog);
    CHECK(emu > 0 && tp_test_wait_port(EMU_PORT, 10000));

    S.port = tp_test_free_port();
    char wh[512];
    snprintf(wh, sizeof wh,
             "host = http://127.0.0.1:%d\nmax_in_flight = 1\nwait = 0s\nmax_wait = 30s\n"
             "max_result_bytes = 1M\n",
             EMU_PORT);
    write_conf(wh);
    S.log = tp_xasprintf("%s/reload.log", tp_test_tmpdir());
    char *argv[] = {(char *)tp_test_bin("tidepool-server"), "--config", S.conf, NULL};
    S.pid = tp_test_spawn(argv, S.log);
    bool up = S.pid > 0 && tp_test_wait_port(S.port, 10000) && harness_ready(&S);
    CHECK_MSG(up, "server did not start; see %s", S.log);
    if (!up) {
        harness_finish(&S);
        return;
    }

    /* before: one statement at most, and no waiting */
    resp_t big = get_prefer("/api/v1/datasets/big?secs=6&tag=old", NULL);
    CHECK_INT_EQ(big.status, 202);
    char loc[128] = "";
    const char *l = hdr(&big, "Location");
    snprintf(loc, sizeof loc, "%s", l ? l : "");
    CHECK(strncmp(loc, "/api/v1/statements/", 19) == 0);
    resp_free(&big);
    resp_t r = get_prefer("/api/v1/datasets/slow?secs=0&tag=b1", NULL);
    CHECK_INT_EQ(r.status, 429);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "too-many-warehouse-statements");
    resp_free(&r);

    /* the file changes; SIGHUP */
    snprintf(wh, sizeof wh,
             "host = http://localhost:%d\nmax_in_flight = 3\nwait = 20s\nmax_wait = 30s\n"
             "max_result_bytes = 1k\n",
             EMU_PORT);
    write_conf(wh);
    int before = count_log("configuration reloaded");
    kill(S.pid, SIGHUP);
    bool reloaded = false;
    for (int i = 0; i < 200 && !reloaded; i++) { /* up to 20 s */
        usleep(100 * 1000);
        reloaded = count_log("configuration reloaded") > before;
    }
    CHECK_MSG(reloaded, "no \"configuration reloaded\" in %s", S.log);
    CHECK(count_log("\"setting\":\"warehouse.host\"") == 1); /* needs a restart, logged */
    CHECK_INT_EQ(count_log("\"setting\":\"warehouse.max_in_flight\""), 0);

    /* after: a read waits (wait = 20s) for its 1 s statement, next to the running one */
    r = get_prefer("/api/v1/datasets/slow?secs=1&tag=c1", NULL);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "warehouse");
    resp_free(&r);
    /* a new big result is over the new 1k limit */
    r = get_prefer("/api/v1/datasets/big?secs=0&tag=new", NULL);
    CHECK_INT_EQ(r.status, 413);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "result-too-large");
    resp_free(&r);
    /* the statement started before the reload keeps its 1M limit */
    r = get_prefer(loc, "Prefer: wait=20");
    CHECK_INT_EQ(r.status, 200);
    CHECK(r.body && strstr(r.body, "xxxxxxxxxx") != NULL && strstr(r.body, "old") != NULL);
    resp_free(&r);
    /* three may run at once now: two long ones, then a third, then 429 */
    resp_t a = get_prefer("/api/v1/datasets/slow?secs=30&tag=m1", "Prefer: wait=0");
    resp_t b = get_prefer("/api/v1/datasets/slow?secs=30&tag=m2", "Prefer: wait=0");
    resp_t c = get_prefer("/api/v1/datasets/slow?secs=30&tag=m3", "Prefer: wait=0");
    resp_t d = get_prefer("/api/v1/datasets/slow?secs=30&tag=m4", "Prefer: wait=0");
    CHECK_INT_EQ(a.status, 202);
    CHECK_INT_EQ(b.status, 202);
    CHECK_INT_EQ(c.status, 202);
    CHECK_INT_EQ(d.status, 429);
    resp_t *mine[] = {&a, &b, &c};
    for (int i = 0; i < 3; i++) {
        const char *m = hdr(mine[i], "Location");
        if (m) {
            char path[128];
            snprintf(path, sizeof path, "%s", m);
            resp_t x = http(&S, "DELETE", path, NULL, NULL, 0);
            CHECK(x.status == 200 || x.status == 204);
            resp_free(&x);
        }
        resp_free(mine[i]);
    }
    resp_free(&d);
    /* the old host still serves (the change needs a restart) */
    CHECK_INT_EQ(count_log("warehouse client not available"), 0);
    harness_finish(&S);
    CHECK_INT_EQ(tp_test_stop(emu, 5000), 0);
}

int main(void)
{
    TP_RUN(sighup_reloads_fallback_settings);
    return tp_test_done();
}
