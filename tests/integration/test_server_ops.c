/* tidepool-server operations against the harness Postgres: response cache
 * hits, bypass, invalidation by NOTIFY tidepool_sync (per job), the per-job
 * failure gauge on /metrics, single flight,
 * a full pool queue (503 + Retry-After), Postgres going away (backends
 * terminated; the cluster stopped and started: 503 + Retry-After, /readyz
 * failing, recovery without restart), the sd_notify protocol of a server
 * started while Postgres is down (READY=1 only once it is reachable and
 * migrated, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1), SIGHUP reload (good
 * and broken files), SIGTERM draining an in-flight request and giving up on
 * one that outlasts drain_timeout, and an idle half-sent request timed out. */
#include "server_harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

static srv_h_t S;
static const char *DSN;

static void sql(const char *q)
{
    free(tp_test_sql(DSN, q));
}

static long metric(const char *name)
{
    return harness_metric(&S, name);
}

/* Runs n GETs at once; fills status[i] (and retry_after[i] if non-NULL).
 * on_started (may be NULL) runs once every request has been sent. */
/* n GETs at once; status[i] gets each answer's code and, when heads is not
 * NULL, heads[i] its header lines and bodies (the caller frees them). */
static void parallel_get_h(srv_h_t *s, const char *const *paths, int n, long *status,
                           void (*on_started)(void), tp_buf_t *heads)
{
    CURLM *m = curl_multi_init();
    CURL *h[64];
    tp_buf_t bodies[64];
    for (int i = 0; i < n; i++) {
        char url[1024];
        snprintf(url, sizeof url, "http://127.0.0.1:%d%s", s->port, paths[i]);
        h[i] = curl_easy_init();
        tp_buf_init(&bodies[i]);
        curl_easy_setopt(h[i], CURLOPT_URL, url);
        curl_easy_setopt(h[i], CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h[i], CURLOPT_WRITEDATA, &bodies[i]);
        curl_easy_setopt(h[i], CURLOPT_TIMEOUT, 20L);
        if (heads) {
            tp_buf_init(&heads[i]);
            curl_easy_setopt(h[i], CURLOPT_HEADERFUNCTION, on_body);
            curl_easy_setopt(h[i], CURLOPT_HEADERDATA, &heads[i]);
        }
        curl_multi_add_handle(m, h[i]);
    }
    int running = 1;
    int64_t t0 = tp_now_ms();
    bool started = false;
    while (running) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 20, NULL);
        if (!started && on_started && tp_now_ms() - t0 > 250) {
            started = true;
            on_started();
        }
    }
    for (int i = 0; i < n; i++) {
        status[i] = 0;
        curl_easy_getinfo(h[i], CURLINFO_RESPONSE_CODE, &status[i]);
        curl_multi_remove_handle(m, h[i]);
        curl_easy_cleanup(h[i]);
        if (heads)
            tp_buf_puts(&heads[i], bodies[i].data ? bodies[i].data : "");
        tp_buf_free(&bodies[i]);
    }
    curl_multi_cleanup(m);
}

static void parallel_get(srv_h_t *s, const char *const *paths, int n, long *status,
                         void (*on_started)(void))
{
    parallel_get_h(s, paths, n, status, on_started, NULL);
}

static void test_cache_hit_and_bypass(void)
{
    long hits0 = metric("tidepool_cache_hits_total");
    resp_t a = get(&S, "/api/v1/datasets/users?prefix=user%202");
    CHECK_INT_EQ(a.status, 200);
    CHECK_STR_EQ(hdr(&a, "X-Tidepool-Source"), "postgres");
    resp_t b = get(&S, "/api/v1/datasets/users?prefix=user%202");
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "cache");
    CHECK_STR_EQ(a.body, b.body);
    char etag[64];
    snprintf(etag, sizeof etag, "%s", hdr(&a, "ETag") ? hdr(&a, "ETag") : "");
    CHECK_STR_EQ(etag, hdr(&b, "ETag"));
    resp_free(&b);
    /* another format is another entry */
    b = get(&S, "/api/v1/datasets/users?prefix=user%202&shape=columns");
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "postgres");
    resp_free(&b);
    const char *nc[] = {"Cache-Control: no-cache", NULL};
    b = http(&S, "GET", "/api/v1/datasets/users?prefix=user%202", nc, NULL, 0);
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "postgres");
    resp_free(&b);
    b = get(&S, "/api/v1/datasets/users?prefix=user%202&fresh=1");
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "postgres");
    resp_free(&b);
    CHECK(metric("tidepool_cache_hits_total") >= hits0 + 1);
    CHECK(metric("tidepool_cache_bytes") > 0);
    resp_free(&a);
}

static void test_invalidation_by_notify(void)
{
    const char *path = "/api/v1/datasets/daily_metrics?user_id=4&until=2025-01-02";
    resp_t r = get(&S, path);
    resp_free(&r);
    r = get(&S, path);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "cache");
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Generation"), "3");
    char *old_body = tp_xstrdup(r.body);
    resp_free(&r);
    /* another job's sync leaves this entry alone */
    sql("UPDATE tidepool.sync_state SET generation = 8 WHERE job = 'users'");
    sql("SELECT pg_notify('tidepool_sync', 'users:8')");
    usleep(200000);
    r = get(&S, path);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "cache");
    resp_free(&r);
    /* a sync of daily_metrics: new rows, new generation, NOTIFY */
    sql("UPDATE iot.user_daily_metrics SET steps = steps + 1000 WHERE user_id = 4");
    sql("UPDATE tidepool.sync_state SET generation = 4, last_success_at = now() WHERE job = 'daily_metrics'");
    sql("NOTIFY tidepool_sync, 'daily_metrics:4'");
    usleep(200000);
    r = get(&S, path);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "postgres");
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Generation"), "4");
    CHECK(strcmp(r.body, old_body) != 0);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(r.json, 0), "steps")), 1401);
    resp_free(&r);
    r = get(&S, path);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "cache");
    resp_free(&r);
    free(old_body);
}

/* Polls /metrics (at most 5 s) until name has value want; returns the last value. */
static long await_metric(const char *name, long want)
{
    long v = -1;
    for (int i = 0; i < 50; i++) {
        v = metric(name);
        if (v == want)
            break;
        usleep(100000);
    }
    return v;
}

/* Failing sync runs show on /metrics: tidepool_job_consecutive_failures per job,
 * read from tidepool.sync_state (no dataset read needed to refresh it), and
 * back to 0 after a success. */
static void test_job_failures_metric(void)
{
    CHECK_INT_EQ(metric("tidepool_job_consecutive_failures{job=\"daily_metrics\"}"), 0);
    sql("UPDATE tidepool.sync_state SET consecutive_failures = 3, last_error = 'boom',"
        " last_error_at = now() WHERE job = 'users'");
    CHECK_INT_EQ(await_metric("tidepool_job_consecutive_failures{job=\"users\"}", 3), 3);
    CHECK_INT_EQ(metric("tidepool_job_consecutive_failures{job=\"daily_metrics\"}"), 0);
    sql("UPDATE tidepool.sync_state SET consecutive_failures = 0, last_error = NULL"
        " WHERE job = 'users'");
    CHECK_INT_EQ(await_metric("tidepool_job_consecutive_failures{job=\"users\"}", 0), 0);
}

static void test_single_flight(void)
{
    long joined0 = metric("tidepool_singleflight_joined_total");
    const char *p = "/api/v1/datasets/slow?secs=0.6";
    const char *paths[6] = {p, p, p, p, p, p};
    long st[6];
    int64_t t0 = tp_now_ms();
    parallel_get(&S, paths, 6, st, NULL);
    int64_t took = tp_now_ms() - t0;
    for (int i = 0; i < 6; i++)
        CHECK_INT_EQ(st[i], 200);
    CHECK(took < 3000);
    CHECK_MSG(metric("tidepool_singleflight_joined_total") >= joined0 + 5,
              "identical concurrent misses should share one query");
    /* Regression: joiners arriving while the leader waits for a stale
     * sync_state view (more than a second old) once corrupted the waiter
     * lists and crashed the server. */
    usleep(1200000);
    const char *q = "/api/v1/datasets/daily_metrics?user_id=9&until=2025-01-05";
    const char *qs[8] = {q, q, q, q, q, q, q, q};
    long st2[8];
    parallel_get(&S, qs, 8, st2, NULL);
    for (int i = 0; i < 8; i++)
        CHECK_INT_EQ(st2[i], 200);
    resp_t r = get(&S, "/healthz");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

/* A second server on the same datasets and database, one thread, with extra
 * [server] settings and an optional server.timeout; false (a failed check)
 * when it does not become ready. */
static bool side_server(srv_h_t *q, const char *extra, const char *timeout)
{
    memset(q, 0, sizeof *q);
    snprintf(q->qdir, sizeof q->qdir, "%s", S.qdir);
    q->extra_conf = extra;
    q->timeout = timeout;
    bool up = harness_start(q, DSN, 1) && harness_ready(q);
    CHECK_MSG(up, "side server did not start; see %s", q->log ? q->log : "?");
    return up;
}

static void test_queue_full(void)
{
    srv_h_t q;
    if (!side_server(&q, "pool_queue = 1\n", NULL))
        return;
    /* pool_size 4 on one thread: 4 running + 1 queued; the rest are refused */
    char paths_buf[8][64];
    const char *paths[8];
    for (int i = 0; i < 8; i++) {
        snprintf(paths_buf[i], sizeof paths_buf[i], "/api/v1/datasets/slow?secs=0.%d", i + 2);
        paths[i] = paths_buf[i];
    }
    long st[8];
    tp_buf_t heads[8];
    parallel_get_h(&q, paths, 8, st, NULL, heads);
    int ok = 0, refused = 0;
    for (int i = 0; i < 8; i++) {
        ok += st[i] == 200;
        refused += st[i] == 503;
        if (st[i] == 503) { /* told when to come back, in a problem body */
            CHECK_CONTAINS(heads[i].data, "Retry-After: ");
            CHECK_CONTAINS(heads[i].data, "application/problem+json");
            CHECK_CONTAINS(heads[i].data, "\"status\":503");
        }
        tp_buf_free(&heads[i]);
    }
    /* 4 connections + 1 queued; a background sync_state read may hold a slot */
    CHECK_MSG(ok == 5 || ok == 4, "%d answered, want 4 or 5", ok);
    CHECK_INT_EQ(ok + refused, 8);
    CHECK_INT_EQ(tp_test_stop(q.pid, 10000), 0);
    free(q.conf);
    free(q.log);
}

static void test_backends_terminated(void)
{
    sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()");
    long st = 0;
    for (int i = 0; i < 50 && st != 200; i++) {
        resp_t r = get(&S, "/api/v1/datasets/users?fresh=1");
        st = r.status;
        if (st != 200)
            CHECK_PROBLEM(r, 503, NULL);
        resp_free(&r);
        if (st != 200)
            usleep(100000);
    }
    CHECK_INT_EQ(st, 200);
    /* the LISTEN connection came back too: a notify still invalidates */
    const char *path = "/api/v1/datasets/daily_metrics?user_id=5&until=2025-01-01";
    resp_t r = get(&S, path);
    resp_free(&r);
    bool listening = false;
    for (int i = 0; i < 50 && !listening; i++) {
        char *n = tp_test_sql(DSN, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                   "current_database() AND query LIKE 'LISTEN%'");
        listening = n && strcmp(n, "1") == 0;
        free(n);
        if (!listening)
            usleep(100000);
    }
    CHECK(listening);
    sql("UPDATE tidepool.sync_state SET generation = 5 WHERE job = 'daily_metrics'");
    sql("NOTIFY tidepool_sync, 'daily_metrics:5'");
    usleep(200000);
    r = get(&S, path);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Generation"), "5");
    resp_free(&r);
}

static int pg_ctl(const char *action)
{
    const char *bin = getenv("TP_PG_BIN"), *dir = getenv("TP_PG_DIR"), *owner = getenv("TP_PG_OWNER");
    const char *port = getenv("PGPORT");
    if (!bin || !dir || !port)
        return -1;
    char cmd[2048];
    char prefix[256] = "";
    if (getuid() == 0 && owner)
        snprintf(prefix, sizeof prefix, "runuser -u %s -- ", owner);
    if (strcmp(action, "stop") == 0)
        snprintf(cmd, sizeof cmd, "%s%s/pg_ctl -D %s/data -m fast -w stop", prefix, bin, dir);
    else
        snprintf(cmd, sizeof cmd,
                 "%s%s/pg_ctl -D %s/data -l %s/postgres.log -w -t 60 -o \"-p %s -k %s "
                 "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                 "-c full_page_writes=off -c max_connections=300 -c shared_buffers=256MB\" start",
                 prefix, bin, dir, dir, port, dir);
    char *out = NULL;
    int st = tp_test_cmd(cmd, &out);
    if (st != 0)
        fprintf(stdout, "# pg_ctl %s: %s\n", action, out ? out : "");
    free(out);
    return st;
}

static void test_postgres_restart(void)
{
    if (!getenv("TP_PG_BIN") || !getenv("TP_PG_DIR")) {
        CHECK_MSG(false, "TP_PG_BIN / TP_PG_DIR not exported by the harness");
        return;
    }
    resp_t r = get(&S, "/api/v1/datasets/users?prefix=user%203"); /* primes the cache */
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(pg_ctl("stop"), 0);
    for (int i = 0; i < 30; i++) { /* until the pool notices */
        resp_free(&r);
        r = get(&S, "/api/v1/datasets/users?fresh=1");
        if (r.status == 503)
            break;
        usleep(100000);
    }
    CHECK_PROBLEM(r, 503, NULL);
    CHECK(hdr(&r, "Retry-After") != NULL && atoi(hdr(&r, "Retry-After")) >= 1);
    resp_free(&r);
    r = get(&S, "/readyz");
    CHECK_PROBLEM(r, 503, NULL);
    CHECK(hdr(&r, "Retry-After") != NULL);
    resp_free(&r);
    /* liveness does not depend on Postgres */
    r = get(&S, "/healthz");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    /* cached answers keep flowing while Postgres is away */
    r = get(&S, "/api/v1/datasets/users?prefix=user%203");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "cache");
    resp_free(&r);
    int st = pg_ctl("start");
    if (st != 0)
        st = pg_ctl("start");
    CHECK_INT_EQ(st, 0);
    r = await_status(&S, "/api/v1/datasets/users?fresh=1", 200, 100);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    r = await_status(&S, "/readyz", 200, 150);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

/* /readyz follows the schema: a migration this build does not know (a newer
 * binary migrated the database) makes it 503 naming migrations, until it is gone. */
static void test_readyz_migrations(void)
{
    free(tp_test_sql(DSN, "INSERT INTO tidepool.schema_migrations (version, name, checksum) "
                          "VALUES (9999, '9999_from_the_future.sql', repeat('0', 64)); SELECT 1"));
    resp_t r = await_status(&S, "/readyz", 503, 100);
    CHECK_PROBLEM(r, 503, "migrations");
    CHECK_CONTAINS(json_string_value(json_object_get(r.json, "detail")), "9999");
    resp_free(&r);
    free(tp_test_sql(DSN, "DELETE FROM tidepool.schema_migrations WHERE version = 9999; SELECT 1"));
    r = await_status(&S, "/readyz", 200, 100);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

/* @cache TTL: an answer is served from the cache until it is older than the TTL. */
static void test_cache_ttl(void)
{
    harness_def(&S, "ttl_one.sql", "-- @cache 1s\nSELECT 1 AS one\n");
    kill(S.pid, SIGHUP);
    resp_t r = await_status(&S, "/api/v1/datasets/ttl_one", 200, 50);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/ttl_one");
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "cache");
    resp_free(&r);
    usleep(1300000);
    r = get(&S, "/api/v1/datasets/ttl_one");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Source"), "postgres");
    resp_free(&r);
}

/* The sd_notify protocol of the real program against a test NOTIFY_SOCKET,
 * started while Postgres is down and pointed at a database without the
 * tidepool schema: it listens and says so in STATUS= ("waiting for PostgreSQL
 * HOST:PORT"), keeps the watchdog fed, answers /readyz 503 and sends no
 * READY=1; once Postgres is back it migrates, and READY=1 comes when /readyz
 * says 200. Then STATUS= names the listener, threads and datasets; SIGHUP
 * gives RELOADING=1 (with MONOTONIC_USEC), READY=1 and a STATUS= with the new
 * dataset count; SIGTERM gives STOPPING=1 and exit status 0. */
static void test_notify_waits_for_postgres(void)
{
    if (!getenv("TP_PG_BIN") || !getenv("TP_PG_DIR")) {
        CHECK_MSG(false, "TP_PG_BIN / TP_PG_DIR not exported by the harness");
        return;
    }
    int fails0 = tp_test_failed_checks;
    char *late = tp_test_new_db("late_pg");
    tp_test_notify_t nt;
    CHECK(tp_test_notify_open(&nt));
    setenv("WATCHDOG_USEC", "1000000", 1); /* a keep-alive every 500 ms */
    srv_h_t q = {0};
    snprintf(q.qdir, sizeof q.qdir, "%s/queries_late", tp_test_tmpdir());
    mkdir(q.qdir, 0755);
    harness_def(&q, "one.sql", "SELECT 1 AS one\n");
    CHECK_INT_EQ(pg_ctl("stop"), 0);
    bool up = harness_start(&q, late, 1);
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    CHECK(up);
    int waiting = tp_test_notify_wait(&nt, 0, "STATUS=waiting for PostgreSQL ", 5000);
    CHECK_MSG(waiting >= 0, "no \"waiting for PostgreSQL\" STATUS");
    if (waiting >= 0)
        CHECK_CONTAINS(nt.msgs[waiting], getenv("PGPORT"));
    tp_test_notify_collect(&nt, 1500);
    CHECK_INT_EQ(tp_test_notify_find(&nt, 0, "READY=1"), -1);
    CHECK_MSG(tp_test_notify_count(&nt, 0, "WATCHDOG=1") >= 2, "keep-alives stop while waiting");
    resp_t r = get(&q, "/readyz");
    CHECK_PROBLEM(r, 503, NULL);
    resp_free(&r);
    r = get(&q, "/healthz");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);

    int st = pg_ctl("start");
    if (st != 0)
        st = pg_ctl("start");
    CHECK_INT_EQ(st, 0);
    int ready = tp_test_notify_wait(&nt, 0, "READY=1", 20000);
    CHECK_MSG(ready >= 0, "no READY=1 within 20 s of Postgres coming back");
    r = get(&q, "/readyz");
    CHECK_INT_EQ(r.status, 200); /* READY=1 and /readyz agree */
    resp_free(&r);
    char *n = tp_test_sql(late, "SELECT count(*) > 0 FROM tidepool.schema_migrations");
    CHECK_STR_EQ(n, "t"); /* migrated once Postgres answered */
    free(n);
    char want[128];
    snprintf(want, sizeof want,
             "STATUS=listening on 127.0.0.1:%d, 1 thread, 1 dataset; PostgreSQL up", q.port);
    CHECK_MSG(tp_test_notify_wait(&nt, ready > 0 ? (size_t)ready : 0, want, 5000) >= 0,
              "no \"%s\"", want);
    CHECK_MSG(tp_test_notify_wait(&nt, ready > 0 ? (size_t)ready + 1 : 0, "WATCHDOG=1", 3000) >= 0,
              "no keep-alive after READY=1");

    CHECK_INT_EQ(tp_test_notify_count(&nt, 0, "READY=1"), 1);
    size_t mark = nt.n;
    harness_def(&q, "two.sql", "SELECT 2 AS two\n");
    kill(q.pid, SIGHUP);
    int reloading = tp_test_notify_wait(&nt, mark, "RELOADING=1", 5000);
    CHECK_MSG(reloading >= 0, "no RELOADING=1 after SIGHUP");
    if (reloading >= 0) {
        CHECK_CONTAINS(nt.msgs[reloading], "MONOTONIC_USEC=");
        CHECK_MSG(tp_test_notify_wait(&nt, (size_t)reloading + 1, "READY=1", 5000) > reloading,
                  "no READY=1 after RELOADING=1");
    }
    snprintf(want, sizeof want, "1 thread, 2 datasets; PostgreSQL up");
    CHECK_MSG(tp_test_notify_wait(&nt, mark, want, 5000) >= 0, "no STATUS= with \"%s\"", want);

    mark = nt.n;
    kill(q.pid, SIGTERM);
    CHECK_MSG(tp_test_notify_wait(&nt, mark, "STOPPING=1", 5000) >= 0,
              "no STOPPING=1 after SIGTERM");
    CHECK_INT_EQ(tp_test_stop(q.pid, 15000), 0);
    if (tp_test_failed_checks > fails0)
        tp_test_notify_dump(&nt, 0);
    tp_test_notify_close(&nt);
    free(q.conf);
    free(q.log);
    free(late);
    /* the shared server is back before the next case */
    CHECK(harness_ready(&S));
}

static void test_reload(void)
{
    harness_def(&S, "fresh_one.sql", "-- @param n INT = 2\nSELECT generate_series(1, :n) AS i\n");
    kill(S.pid, SIGHUP);
    long st = 0;
    for (int i = 0; i < 50 && st != 200; i++) {
        resp_t r = get(&S, "/api/v1/datasets/fresh_one?n=3");
        st = r.status;
        if (st == 200)
            CHECK_STR_EQ(r.body, "[{\"i\":1},{\"i\":2},{\"i\":3}]");
        resp_free(&r);
        if (st != 200)
            usleep(50000);
    }
    CHECK_INT_EQ(st, 200);
    /* a broken file: the old set stays, the log says which file and line */
    harness_def(&S, "broken.sql", "-- @param x NOTATYPE\nSELECT 1\n");
    harness_def(&S, "fresh_two.sql", "SELECT 2 AS two\n");
    kill(S.pid, SIGHUP);
    usleep(300000);
    resp_t r = get(&S, "/api/v1/datasets/fresh_one");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/fresh_two");
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    char *log = tp_read_file(S.log, NULL);
    CHECK_CONTAINS(log, "broken.sql:1:");
    CHECK_CONTAINS(log, "keeping the previous definitions");
    free(log);
    char path[700];
    snprintf(path, sizeof path, "%s/broken.sql", S.qdir);
    unlink(path);
    kill(S.pid, SIGHUP);
    st = 0;
    for (int i = 0; i < 50 && st != 200; i++) {
        r = get(&S, "/api/v1/datasets/fresh_two");
        st = r.status;
        resp_free(&r);
        if (st != 200)
            usleep(50000);
    }
    CHECK_INT_EQ(st, 200);
}

static void send_term(void)
{
    kill(S.pid, SIGTERM);
}

static void test_sigterm_drains(void)
{
    const char *paths[2] = {"/api/v1/datasets/slow?secs=1.2", "/api/v1/datasets/slow?secs=1.1"};
    long st[2];
    parallel_get(&S, paths, 2, st, send_term);
    CHECK_INT_EQ(st[0], 200);
    CHECK_INT_EQ(st[1], 200);
    int status = tp_test_stop(S.pid, 15000);
    CHECK_INT_EQ(status, 0);
    S.pid = -1;
    resp_t r = get(&S, "/healthz");
    CHECK_INT_EQ(r.status, 0); /* nobody listens any more */
    resp_free(&r);
    char *log = tp_read_file(S.log, NULL);
    CHECK_CONTAINS(log, "draining");
    CHECK_CONTAINS(log, "tidepool-server stopped");
    free(log);
}

static pid_t g_term_pid;
static void send_term_to(void)
{
    kill(g_term_pid, SIGTERM);
}

/* SIGTERM with a request that outlasts server.drain_timeout: the server does
 * not wait for it, logs that it gave up, and exits 0 within the deadline. */
static void test_drain_deadline(void)
{
    srv_h_t q;
    if (!side_server(&q, "drain_timeout = 1s\n", NULL))
        return;
    g_term_pid = q.pid;
    const char *paths[1] = {"/api/v1/datasets/slow?secs=8"};
    long st[1];
    int64_t t0 = tp_now_ms();
    parallel_get(&q, paths, 1, st, send_term_to);
    CHECK_INT_EQ(tp_test_stop(q.pid, 15000), 0);
    int64_t took = tp_now_ms() - t0;
    CHECK_MSG(took < 4000, "SIGTERM with an 8 s request in flight took %lld ms", (long long)took);
    CHECK(st[0] != 200); /* cut, not answered */
    char *log = tp_read_file(q.log, NULL);
    CHECK_CONTAINS(log, "drain deadline reached");
    free(log);
    free(q.conf);
    free(q.log);
}

/* server.timeout: a client that sends half a request and then nothing is
 * disconnected, so idle sockets cannot pile up. */
static void test_idle_client_timed_out(void)
{
    srv_h_t q;
    if (!side_server(&q, NULL, "1s"))
        return;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)q.port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    static const char half[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    CHECK(write(fd, half, sizeof half - 1) == (ssize_t)(sizeof half - 1));
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int64_t t0 = tp_now_ms();
    char buf[512];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        ; /* evhttp may answer 408 or 400 before closing */
    int64_t took = tp_now_ms() - t0;
    CHECK_MSG(n == 0, "the idle connection was not closed (read %zd, %s)", n, strerror(errno));
    CHECK_MSG(took >= 800 && took < 4000, "closed after %lld ms, want about 1000", (long long)took);
    close(fd);
    CHECK_INT_EQ(tp_test_stop(q.pid, 10000), 0);
    free(q.conf);
    free(q.log);
}

int main(void)
{
    if (!harness_setup(&S, "test_server_ops", &DSN, 1))
        return tp_test_done();
    TP_RUN(test_cache_hit_and_bypass);
    TP_RUN(test_invalidation_by_notify);
    TP_RUN(test_job_failures_metric);
    TP_RUN(test_single_flight);
    TP_RUN(test_queue_full);
    TP_RUN(test_backends_terminated);
    TP_RUN(test_postgres_restart);
    TP_RUN(test_readyz_migrations);
    TP_RUN(test_cache_ttl);
    TP_RUN(test_notify_waits_for_postgres);
    TP_RUN(test_reload);
    TP_RUN(test_drain_deadline);
    TP_RUN(test_idle_client_timed_out);
    TP_RUN(test_sigterm_drains);
    harness_finish(&S);
    return tp_test_done();
}
