/* tidepool-server's warehouse fallback over HTTP, against the real emulator
 * (bin/tidepool-warehouse) on the harness Postgres: each routing rule with its
 * X-Tidepool-Source / X-Tidepool-Route-Reason (the warehouse answer equals the
 * Postgres one byte for byte), shapes, 200 within the budget and 202 +
 * Location + polling past it, DELETE, single flight across concurrent clients
 * (one execution in the emulator's log), a client that disconnects cancels its
 * statement (the emulator's backend stops), the in-flight limit (429 +
 * Retry-After), OBO isolation between two users' tokens (401 without one;
 * the token believed only from a trusted proxy),
 * failure mapping, and Postgres-served datasets unaffected while the
 * warehouse is slow. Two worker threads: polls may land on either. */
#include "server_harness.h"

#include <time.h>

#include <openssl/evp.h>

#define SVC "tok-svc-9"
#define TOK_A "tok-anna-1"
#define TOK_B "tok-ben-2"

static srv_h_t S;
static const char *DSN;
static pid_t EMU;
static int EMU_PORT;
static char EMU_LOG[512];

static void write_defs(void)
{
    snprintf(S.qdir, sizeof S.qdir, "%s/fbq", tp_test_tmpdir());
    mkdir(S.qdir, 0755);
    static const char params[] = "-- @param user_id INT\n-- @param since DATE = 2025-01-01\n"
                                 "-- @param until DATE = 2025-01-10\n";
    static const char body[] = "SELECT day, steps, miles, active, note FROM iot.user_daily_metrics\n"
                               "WHERE user_id = :user_id AND day BETWEEN :since AND :until ORDER BY day\n";
    char text[2048];
    snprintf(text, sizeof text, "%s-- @requires daily_metrics\n-- @covers since >= 3650d\n%s", params,
             body);
    harness_def(&S, "daily_metrics.sql", text);
    snprintf(text, sizeof text, "%s%s", params, body);
    harness_def(&S, "daily_metrics.warehouse.sql", text);
    harness_def(&S, "stale_metrics.warehouse.sql", text);
    harness_def(&S, "never.warehouse.sql", text);
    harness_def(&S, "fresh_users.warehouse.sql", text);
    snprintf(text, sizeof text, "%s-- @requires daily_metrics\n-- @max_staleness 1h\n%s", params, body);
    harness_def(&S, "stale_metrics.sql", text);
    snprintf(text, sizeof text, "%s-- @requires never_job\n-- @max_staleness 1h\n%s", params, body);
    harness_def(&S, "never.sql", text);
    snprintf(text, sizeof text, "%s-- @requires users\n-- @max_staleness 1h\n%s", params, body);
    harness_def(&S, "fresh_users.sql", text);
    harness_def(&S, "slow.warehouse.sql",
                "-- @param secs DOUBLE\n-- @param tag STRING = a\n"
                "SELECT pg_sleep(:secs)::text AS slept, :tag AS tag\n");
    harness_def(&S, "mine.warehouse.sql",
                "-- @obo\n-- @param dev INT\n-- @param secs DOUBLE = 0\n"
                "SELECT :dev AS dev, pg_sleep(:secs)::text AS s\n");
    harness_def(&S, "strict.warehouse.sql", "-- @param s STRING\nSELECT CAST(:s AS INT) AS v\n");
    harness_def(&S, "pgfast.sql", "SELECT 1 AS one\n");
    static const char events[] = "SELECT id, at, local_at, day FROM iot.events ORDER BY id\n";
    snprintf(text, sizeof text, "-- @requires daily_metrics\n%s", events);
    harness_def(&S, "events.sql", text);
    harness_def(&S, "events.warehouse.sql", events);
}

/* Timestamps at their edges; the database's default zone is not UTC, so an
 * answer in UTC shows the server pins its sessions' zone. */
static const char *EVENTS_SQL =
    "CREATE TABLE iot.events(id int PRIMARY KEY, at timestamptz, local_at timestamp, day date);"
    "INSERT INTO iot.events VALUES"
    " (1, '2025-01-01 10:00:00+00', '2025-01-01 10:00:00', '2025-01-01'),"
    " (2, '2025-03-30 01:30:00.5+05:30', '2025-03-30 01:30:00.5', '2025-03-30'),"
    " (3, '2024-12-31 20:30:00.123456-03:30', '2024-12-31 20:30:00.123456', '2024-12-31'),"
    " (4, '0044-03-15 12:00:00+00 BC', '0044-03-15 12:00:00 BC', '2025-01-04'),"
    " (5, '10000-01-01 00:00:00+00', '10000-01-01 00:00:00', '2025-01-05'),"
    " (6, 'infinity', '-infinity', '2025-01-06'),"
    " (7, NULL, NULL, NULL);"
    "COMMENT ON TABLE iot.events IS '@expose';"
    "SELECT format('ALTER DATABASE %I SET TimeZone = %L', current_database(), 'America/St_Johns')";

static bool start_server(srv_h_t *s, const char *extra, const char *name, const char *dsn,
                         bool ready);

static bool start_all(void)
{
    DSN = tp_test_dsn();
    if (!DSN)
        return false;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!harness_db(DSN))
        return false;
    char *alter = tp_test_sql(DSN, EVENTS_SQL);
    free(alter ? tp_test_sql(DSN, alter) : NULL);
    free(alter);
    write_defs();
    EMU_PORT = tp_test_free_port();
    snprintf(EMU_LOG, sizeof EMU_LOG, "%s/emulator.log", tp_test_tmpdir());
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", EMU_PORT);
    char *eargv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn",
                     (char *)DSN, "--token", SVC, "--token", TOK_A, "--token", TOK_B, NULL};
    EMU = tp_test_spawn(eargv, EMU_LOG);
    if (EMU <= 0 || !tp_test_wait_port(EMU_PORT, 10000))
        return false;
    return start_server(&S, "", "fallback-server", DSN, true);
}

/* Starts a tidepool-server on s with the emulator as its warehouse; extra is
 * more INI text (e.g. an [auth] section). */
static bool start_server(srv_h_t *s, const char *extra, const char *name, const char *dsn,
                         bool ready)
{
    s->port = tp_test_free_port();
    if (s != &S)
        snprintf(s->qdir, sizeof s->qdir, "%s", S.qdir);
    char conf[4096];
    snprintf(conf, sizeof conf,
             "[postgres]\ndsn = %s\npool_size = 4\n"
             "[server]\nlisten = 127.0.0.1:%d\nthreads = 2\ndefinitions = %s\ntimeout = 30s\n"
             "[warehouse]\nhost = http://127.0.0.1:%d\nwarehouse_id = tidepool-local\ntoken = %s\n"
             "max_in_flight = 3\nwait = 5s\nmax_wait = 8s\nabandon_after = 3s\n"
             "max_result_bytes = 256k\n%s",
             dsn, s->port, S.qdir, EMU_PORT, SVC, extra);
    char file[128];
    snprintf(file, sizeof file, "%s.conf", name);
    s->conf = tp_test_write_tmp(file, conf);
    s->log = tp_xasprintf("%s/%s.log", tp_test_tmpdir(), name);
    char *argv[] = {(char *)tp_test_bin("tidepool-server"), "--config", s->conf, NULL};
    s->pid = tp_test_spawn(argv, s->log);
    return s->pid > 0 && tp_test_wait_port(s->port, 10000) && (!ready || harness_ready(s));
}

static int count_executions(void)
{
    char *text = tp_read_file(EMU_LOG, NULL);
    int n = 0;
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n"))
        if (strstr(line, "\"POST\"") && strstr(line, "\"/api/2.0/sql/statements\""))
            n++;
    free(text);
    return n;
}

/* Statement executions in the emulator's request log. The emulator logs
 * after answering, so wait until the count holds still for 300 ms (a fixed
 * sleep is too short on a loaded machine). */
static int executions(void)
{
    int n = count_executions();
    for (int64_t end = tp_now_ms() + 5000; tp_now_ms() < end;) {
        usleep(300000);
        int again = count_executions();
        if (again == n)
            break;
        n = again;
    }
    return n;
}

/* Backends of the emulator's database running pg_sleep right now. */
static int sleeping(void)
{
    char *v = tp_test_sql(DSN, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                               "AND datname = current_database() AND query LIKE '%pg_sleep%' "
                               "AND pid <> pg_backend_pid()");
    int n = v ? atoi(v) : -1;
    free(v);
    return n;
}

static bool sleeping_becomes(int want, int ms)
{
    for (int64_t end = tp_now_ms() + ms; tp_now_ms() < end; usleep(50000))
        if (sleeping() == want)
            return true;
    return false;
}

static void faults(const char *spec)
{
    char path[64];
    snprintf(path, sizeof path, "/admin/faults");
    srv_h_t e = {.port = EMU_PORT};
    char body[256];
    snprintf(body, sizeof body, "{\"spec\":\"%s\"}", spec ? spec : "");
    const char *h[] = {"Authorization: Bearer " SVC, NULL};
    resp_t r = spec ? http(&e, "POST", path, h, body, strlen(body)) : http(&e, "DELETE", path, h, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

static resp_t get_h(const char *path, const char *h1, const char *h2)
{
    const char *h[] = {h1, h2, NULL};
    return http(&S, "GET", path, h, NULL, 0);
}

#define CHECK_WH(resp, reason)                                                     \
    do {                                                                           \
        CHECK_INT_EQ((resp).status, 200);                                          \
        CHECK_STR_EQ(hdr(&(resp), "X-Tidepool-Source"), "warehouse");             \
        CHECK_STR_EQ(hdr(&(resp), "X-Tidepool-Route-Reason"), (reason));          \
    } while (0)

static void routing_rules(void)
{
    resp_t pg = get(&S, "/api/v1/datasets/daily_metrics?user_id=1");
    CHECK_INT_EQ(pg.status, 200);
    CHECK_STR_EQ(hdr(&pg, "X-Tidepool-Source"), "postgres");
    CHECK(hdr(&pg, "X-Tidepool-Route-Reason") == NULL);
    CHECK_INT_EQ(json_array_size(pg.json), 10);
    /* asked for: the same rows, from the warehouse */
    resp_t wh = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&source=warehouse");
    CHECK_WH(wh, "requested");
    CHECK_STR_EQ(wh.body, pg.body);
    CHECK(hdr(&wh, "X-Tidepool-Statement-Id") != NULL);
    resp_free(&wh);
    resp_free(&pg);
    /* a request past @covers */
    wh = get(&S, "/api/v1/datasets/daily_metrics?user_id=2&since=2010-01-01&until=2025-01-02");
    CHECK_WH(wh, "covers");
    CHECK_INT_EQ(json_array_size(wh.json), 2);
    resp_free(&wh);
    /* stale (daily_metrics last succeeded in 2025) and never synced; fresh stays on Postgres */
    wh = get(&S, "/api/v1/datasets/stale_metrics?user_id=3");
    CHECK_WH(wh, "stale");
    resp_free(&wh);
    wh = get(&S, "/api/v1/datasets/never?user_id=3");
    CHECK_WH(wh, "never-synced");
    resp_free(&wh);
    pg = get(&S, "/api/v1/datasets/fresh_users?user_id=3");
    CHECK_INT_EQ(pg.status, 200);
    CHECK_STR_EQ(hdr(&pg, "X-Tidepool-Source"), "postgres");
    resp_free(&pg);
    /* warehouse-only */
    wh = get(&S, "/api/v1/datasets/slow?secs=0&tag=r1");
    CHECK_WH(wh, "warehouse-only");
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(wh.json, 0), "tag")), "r1");
    resp_free(&wh);
    /* the same read again: the result cache */
    wh = get(&S, "/api/v1/datasets/slow?secs=0&tag=r1");
    CHECK_INT_EQ(wh.status, 200);
    CHECK_STR_EQ(hdr(&wh, "X-Tidepool-Source"), "cache");
    CHECK_STR_EQ(hdr(&wh, "X-Tidepool-Route-Reason"), "warehouse-only");
    resp_free(&wh);
    /* shapes */
    wh = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&source=warehouse&shape=columns");
    CHECK_INT_EQ(wh.status, 200);
    CHECK_INT_EQ(json_array_size(json_object_get(wh.json, "steps")), 10);
    CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(wh.json, "steps"), 0)), 101);
    resp_free(&wh);
    wh = get_h("/api/v1/datasets/daily_metrics?user_id=1&until=2025-01-01&source=warehouse",
               "Accept: text/csv", NULL);
    CHECK_INT_EQ(wh.status, 200);
    CHECK_CONTAINS(hdr(&wh, "Content-Type"), "text/csv");
    CHECK_STR_EQ(wh.body, "day,steps,miles,active,note\r\n2025-01-01,101,1.5,false,\"a,\"\"b\"\"\"\r\n");
    resp_free(&wh);
    /* a source that cannot answer */
    resp_t bad = get(&S, "/api/v1/datasets/slow?secs=0&source=postgres");
    CHECK_PROBLEM(bad, 400, "source");
    resp_free(&bad);
    bad = get(&S, "/api/v1/datasets/pgfast?source=warehouse");
    CHECK_PROBLEM(bad, 400, "source");
    resp_free(&bad);
    bad = get(&S, "/api/v1/datasets/pgfast?source=lake");
    CHECK_PROBLEM(bad, 400, "source");
    resp_free(&bad);
    /* OpenAPI describes the statements endpoint and the fallback's answers */
    resp_t doc = get(&S, "/api/v1/openapi.json");
    json_t *paths = json_object_get(doc.json, "paths");
    json_t *st = json_object_get(paths, "/api/v1/statements/{id}");
    CHECK(json_object_get(st, "get") != NULL && json_object_get(st, "delete") != NULL);
    json_t *slow = json_object_get(json_object_get(paths, "/api/v1/datasets/slow"), "get");
    CHECK(json_object_get(json_object_get(slow, "responses"), "202") != NULL);
    json_t *mine = json_object_get(json_object_get(paths, "/api/v1/datasets/mine"), "get");
    CHECK(json_object_get(json_object_get(mine, "responses"), "401") != NULL);
    json_t *pgf = json_object_get(json_object_get(paths, "/api/v1/datasets/pgfast"), "get");
    CHECK(pgf != NULL && json_object_get(json_object_get(pgf, "responses"), "202") == NULL);
    resp_free(&doc);
}

/* One timestamp form everywhere: the dataset from Postgres (rows, columns,
 * CSV) equals the same dataset from the warehouse byte for byte, the table
 * read equals the dataset's rows, and each value is what to_json writes. */
static void timestamps_agree(void)
{
    static const char want[] =
        "[{\"id\":1,\"at\":\"2025-01-01T10:00:00+00:00\",\"local_at\":\"2025-01-01T10:00:00\","
        "\"day\":\"2025-01-01\"},"
        "{\"id\":2,\"at\":\"2025-03-29T20:00:00.5+00:00\",\"local_at\":\"2025-03-30T01:30:00.5\","
        "\"day\":\"2025-03-30\"},"
        "{\"id\":3,\"at\":\"2025-01-01T00:00:00.123456+00:00\","
        "\"local_at\":\"2024-12-31T20:30:00.123456\",\"day\":\"2024-12-31\"},"
        "{\"id\":4,\"at\":\"0044-03-15T12:00:00+00:00 BC\",\"local_at\":\"0044-03-15T12:00:00 BC\","
        "\"day\":\"2025-01-04\"},"
        "{\"id\":5,\"at\":\"10000-01-01T00:00:00+00:00\",\"local_at\":\"10000-01-01T00:00:00\","
        "\"day\":\"2025-01-05\"},"
        "{\"id\":6,\"at\":\"infinity\",\"local_at\":\"-infinity\",\"day\":\"2025-01-06\"},"
        "{\"id\":7,\"at\":null,\"local_at\":null,\"day\":null}]";
    resp_t pg = get(&S, "/api/v1/datasets/events");
    CHECK_INT_EQ(pg.status, 200);
    CHECK_STR_EQ(hdr(&pg, "X-Tidepool-Source"), "postgres");
    CHECK_STR_EQ(pg.body, want);
    /* each value as Postgres' own to_json writes it in UTC */
    char *tj = tp_test_sql(DSN, "SET TimeZone = UTC; SELECT string_agg(to_json(at)::text || ','"
                                " || to_json(local_at)::text, ';' ORDER BY id) FROM iot.events");
    json_t *row;
    size_t i;
    tp_buf_t mine = {0};
    json_array_foreach(pg.json, i, row) {
        if (json_is_null(json_object_get(row, "at")))
            continue;
        tp_buf_printf(&mine, "%s\"%s\",\"%s\"", i ? ";" : "",
                      json_string_value(json_object_get(row, "at")),
                      json_string_value(json_object_get(row, "local_at")));
    }
    CHECK_STR_EQ(mine.data, tj);
    tp_buf_free(&mine);
    free(tj);
    resp_t wh = get(&S, "/api/v1/datasets/events?source=warehouse");
    CHECK_WH(wh, "requested");
    CHECK_STR_EQ(wh.body, pg.body);
    resp_free(&wh);
    resp_t table = get(&S, "/api/v1/tables/iot.events?order=id.asc");
    CHECK_INT_EQ(table.status, 200);
    CHECK_STR_EQ(table.body, pg.body);
    resp_free(&table);
    resp_free(&pg);
    /* columns (the warehouse's result, now from the result cache) */
    pg = get(&S, "/api/v1/datasets/events?shape=columns");
    wh = get(&S, "/api/v1/datasets/events?shape=columns&source=warehouse");
    CHECK_INT_EQ(pg.status, 200);
    CHECK_INT_EQ(wh.status, 200);
    CHECK_STR_EQ(hdr(&wh, "X-Tidepool-Source"), "cache");
    CHECK_STR_EQ(wh.body, pg.body);
    CHECK_CONTAINS(pg.body, "\"at\":[\"2025-01-01T10:00:00+00:00\",\"2025-03-29T20:00:00.5+00:00\",");
    resp_free(&wh);
    resp_free(&pg);
    /* CSV: the same forms, unquoted */
    pg = get_h("/api/v1/datasets/events", "Accept: text/csv", NULL);
    wh = get_h("/api/v1/datasets/events?source=warehouse", "Accept: text/csv", NULL);
    CHECK_INT_EQ(pg.status, 200);
    CHECK_INT_EQ(wh.status, 200);
    CHECK_STR_EQ(hdr(&wh, "X-Tidepool-Source"), "cache");
    CHECK_STR_EQ(wh.body, pg.body);
    CHECK_CONTAINS(pg.body, "id,at,local_at,day\r\n1,2025-01-01T10:00:00+00:00,2025-01-01T10:00:00,"
                            "2025-01-01\r\n");
    CHECK_CONTAINS(pg.body, "\r\n4,0044-03-15T12:00:00+00:00 BC,0044-03-15T12:00:00 BC,2025-01-04\r\n");
    CHECK_CONTAINS(pg.body, "\r\n7,,,\r\n");
    resp_free(&wh);
    resp_free(&pg);
}

static void parallel(const char *const *paths, int n, const char *const *hdrs, long *status,
                     long timeout_ms);

static void budget_202_poll_delete(void)
{
    int64_t t0 = tp_now_ms();
    resp_t a = get_h("/api/v1/datasets/slow?secs=3&tag=p1", "Prefer: wait=0", NULL);
    CHECK_INT_EQ(a.status, 202);
    CHECK_MSG(tp_now_ms() - t0 < 2500, "202 after %lld ms", (long long)(tp_now_ms() - t0));
    CHECK_STR_EQ(hdr(&a, "X-Tidepool-Source"), "warehouse");
    CHECK_STR_EQ(hdr(&a, "Retry-After"), "1");
    char loc[128] = "";
    snprintf(loc, sizeof loc, "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
    CHECK(strncmp(loc, "/api/v1/statements/", 19) == 0 && strlen(loc) == 19 + 32);
    CHECK_STR_EQ(json_string_value(json_object_get(a.json, "state")), "RUNNING");
    resp_free(&a);
    /* polls: running (either worker may answer), then the rows within a budget */
    resp_t p = get(&S, loc);
    CHECK_INT_EQ(p.status, 202);
    resp_free(&p);
    p = get_h(loc, "Prefer: wait=5", NULL);
    CHECK_INT_EQ(p.status, 200);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(p.json, 0), "tag")), "p1");
    resp_free(&p);
    p = get_h(loc, "Accept: text/csv", NULL);
    CHECK_INT_EQ(p.status, 200);
    CHECK_CONTAINS(p.body, "slept,tag\r\n");
    resp_free(&p);
    /* respond-async alone asks for the 202 at once */
    t0 = tp_now_ms();
    a = get_h("/api/v1/datasets/slow?secs=3&tag=ra", "Prefer: respond-async", NULL);
    CHECK_INT_EQ(a.status, 202);
    CHECK_MSG(tp_now_ms() - t0 < 2500, "202 after %lld ms", (long long)(tp_now_ms() - t0));
    snprintf(loc, sizeof loc, "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
    resp_free(&a);
    /* a poller that leaves does not lose the statement for the others */
    const char *pl[] = {loc};
    long pst[1];
    const char *ph[] = {"Prefer: wait=5", NULL};
    parallel(pl, 1, ph, pst, 200);
    CHECK_INT_EQ(pst[0], 0);
    p = get_h(loc, "Prefer: wait=5", NULL);
    CHECK_INT_EQ(p.status, 200);
    resp_free(&p);
    /* the default budget (warehouse.wait = 5s) runs out: 202 after about 5 s */
    t0 = tp_now_ms();
    a = get(&S, "/api/v1/datasets/slow?secs=9&tag=p2");
    int64_t took = tp_now_ms() - t0;
    CHECK_INT_EQ(a.status, 202);
    CHECK_MSG(took >= 4900 && took < 8500, "202 after %lld ms", (long long)took);
    resp_free(&a);
    /* a budget above warehouse.max_wait (8s) is capped */
    t0 = tp_now_ms();
    a = get_h("/api/v1/datasets/slow?secs=12&tag=p3", "Prefer: wait=600", NULL);
    took = tp_now_ms() - t0;
    CHECK_INT_EQ(a.status, 202);
    CHECK_MSG(took >= 7900 && took < 11000, "202 after %lld ms", (long long)took);
    resp_free(&a);
    /* unknown and malformed ids */
    p = get(&S, "/api/v1/statements/0123456789abcdef0123456789abcdef");
    CHECK_PROBLEM(p, 404, NULL);
    resp_free(&p);
    p = get(&S, "/api/v1/statements/nope");
    CHECK_PROBLEM(p, 404, NULL);
    resp_free(&p);
    p = http(&S, "POST", "/api/v1/statements/0123456789abcdef0123456789abcdef", NULL, "", 0);
    CHECK_PROBLEM(p, 405, NULL);
    resp_free(&p);
    /* DELETE cancels at the warehouse */
    CHECK(sleeping_becomes(0, 10000));
    a = get_h("/api/v1/datasets/slow?secs=30&tag=del", "Prefer: wait=0", NULL);
    CHECK_INT_EQ(a.status, 202);
    snprintf(loc, sizeof loc, "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
    resp_free(&a);
    CHECK(sleeping_becomes(1, 5000));
    p = http(&S, "DELETE", loc, NULL, NULL, 0);
    CHECK_INT_EQ(p.status, 204);
    resp_free(&p);
    CHECK(sleeping_becomes(0, 8000));
    p = get(&S, loc);
    CHECK_PROBLEM(p, 404, NULL);
    resp_free(&p);
    p = http(&S, "DELETE", loc, NULL, NULL, 0);
    CHECK_PROBLEM(p, 404, NULL);
    resp_free(&p);
}

/* Sends n GETs at once and waits for all (headers: one list for all). */
static void parallel(const char *const *paths, int n, const char *const *hdrs, long *status,
                     long timeout_ms)
{
    CURLM *m = curl_multi_init();
    CURL *h[16];
    tp_buf_t bodies[16];
    struct curl_slist *sl = NULL;
    for (size_t i = 0; hdrs && hdrs[i]; i++)
        sl = curl_slist_append(sl, hdrs[i]);
    for (int i = 0; i < n; i++) {
        char url[512];
        snprintf(url, sizeof url, "http://127.0.0.1:%d%s", S.port, paths[i]);
        h[i] = curl_easy_init();
        tp_buf_init(&bodies[i]);
        curl_easy_setopt(h[i], CURLOPT_URL, url);
        curl_easy_setopt(h[i], CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h[i], CURLOPT_WRITEDATA, &bodies[i]);
        curl_easy_setopt(h[i], CURLOPT_TIMEOUT_MS, timeout_ms);
        curl_easy_setopt(h[i], CURLOPT_HTTPHEADER, sl);
        curl_multi_add_handle(m, h[i]);
    }
    int running = 1;
    while (running) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 20, NULL);
    }
    for (int i = 0; i < n; i++) {
        status[i] = 0;
        curl_easy_getinfo(h[i], CURLINFO_RESPONSE_CODE, &status[i]);
        curl_multi_remove_handle(m, h[i]);
        curl_easy_cleanup(h[i]);
        tp_buf_free(&bodies[i]);
    }
    curl_slist_free_all(sl);
    curl_multi_cleanup(m);
}

static void single_flight(void)
{
    int ex0 = executions();
    const char *paths[5];
    for (int i = 0; i < 5; i++)
        paths[i] = "/api/v1/datasets/slow?secs=2&tag=sf"; /* all five arrive while it runs */
    long st[5];
    const char *h[] = {"Prefer: wait=6", NULL};
    parallel(paths, 5, h, st, 10000);
    for (int i = 0; i < 5; i++)
        CHECK_INT_EQ(st[i], 200);
    CHECK_INT_EQ(executions() - ex0, 1);
    resp_t m = get(&S, "/metrics");
    static const char joined[] = "\ntidepool_fallback_joined_total ";
    const char *j = strstr(m.body, joined);
    long nj = j ? strtol(j + sizeof joined - 1, NULL, 10) : -1;
    CHECK_MSG(nj >= 4, "tidepool_fallback_joined_total %ld", nj);
    CHECK_CONTAINS(m.body, "\ntidepool_fallback_in_flight ");
    resp_free(&m);
}

static void disconnect_cancels(void)
{
    CHECK(sleeping_becomes(0, 10000));
    const char *paths[] = {"/api/v1/datasets/slow?secs=30&tag=dc"};
    long st[1];
    const char *hdrs[] = {"Prefer: wait=4", NULL}; /* < 5 s: submitted without waiting */
    int64_t t0 = tp_now_ms();
    parallel(paths, 1, hdrs, st, 700); /* the client gives up after 0.7 s */
    CHECK_INT_EQ(st[0], 0);
    CHECK_MSG(tp_now_ms() - t0 < 3000, "client gave up after %lld ms", (long long)(tp_now_ms() - t0));
    /* cancelled well before the 6 s budget or abandon_after (3 s) */
    int64_t t1 = tp_now_ms();
    CHECK(sleeping_becomes(0, 6000));
    int64_t took = tp_now_ms() - t1;
    CHECK_MSG(took < 2500, "statement stopped %lld ms after the client left", (long long)took);
    /* with a budget of 5 s or more the submission waits at the warehouse (up
     * to 5 s): the cancel goes out when it returns */
    const char *p6[] = {"/api/v1/datasets/slow?secs=30&tag=dc6"};
    const char *h6[] = {"Prefer: wait=6", NULL};
    parallel(p6, 1, h6, st, 700);
    CHECK_INT_EQ(st[0], 0);
    t1 = tp_now_ms();
    CHECK(sleeping_becomes(0, 8000));
    took = tp_now_ms() - t1;
    CHECK_MSG(took < 7500, "statement stopped %lld ms after the client left", (long long)took);
    /* a shared statement survives one of its clients leaving */
    const char *two[] = {"/api/v1/datasets/slow?secs=2&tag=dc2", "/api/v1/datasets/slow?secs=2&tag=dc2"};
    CURLM *m = curl_multi_init();
    CURL *h[2];
    tp_buf_t b[2];
    for (int i = 0; i < 2; i++) {
        char url[256];
        snprintf(url, sizeof url, "http://127.0.0.1:%d%s", S.port, two[i]);
        h[i] = curl_easy_init();
        tp_buf_init(&b[i]);
        curl_easy_setopt(h[i], CURLOPT_URL, url);
        curl_easy_setopt(h[i], CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h[i], CURLOPT_WRITEDATA, &b[i]);
        curl_easy_setopt(h[i], CURLOPT_TIMEOUT_MS, i == 0 ? 500L : 10000L);
        struct curl_slist *sl = curl_slist_append(NULL, "Prefer: wait=6");
        curl_easy_setopt(h[i], CURLOPT_HTTPHEADER, sl);
        curl_easy_setopt(h[i], CURLOPT_PRIVATE, sl);
        curl_multi_add_handle(m, h[i]);
    }
    int running = 1;
    while (running) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 20, NULL);
    }
    long code[2];
    for (int i = 0; i < 2; i++) {
        curl_easy_getinfo(h[i], CURLINFO_RESPONSE_CODE, &code[i]);
        struct curl_slist *sl = NULL;
        curl_easy_getinfo(h[i], CURLINFO_PRIVATE, (char **)&sl);
        curl_slist_free_all(sl);
        curl_multi_remove_handle(m, h[i]);
        curl_easy_cleanup(h[i]);
        tp_buf_free(&b[i]);
    }
    curl_multi_cleanup(m);
    CHECK_INT_EQ(code[0], 0);
    CHECK_INT_EQ(code[1], 200);
}

static void in_flight_limit(void)
{
    CHECK(sleeping_becomes(0, 10000));
    char locs[3][128];
    for (int i = 0; i < 3; i++) {
        char path[128];
        snprintf(path, sizeof path, "/api/v1/datasets/slow?secs=30&tag=lim%d", i);
        resp_t a = get_h(path, "Prefer: wait=0", NULL);
        CHECK_INT_EQ(a.status, 202);
        snprintf(locs[i], sizeof locs[i], "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
        resp_free(&a);
    }
    resp_t busy = get_h("/api/v1/datasets/slow?secs=30&tag=lim3", "Prefer: wait=0", NULL);
    CHECK_PROBLEM(busy, 429, NULL);
    CHECK(hdr(&busy, "Retry-After") != NULL);
    CHECK_CONTAINS(json_string_value(json_object_get(busy.json, "detail")), "max_in_flight");
    resp_free(&busy);
    /* joining a running statement is still allowed; Postgres reads are unaffected */
    resp_t j = get_h("/api/v1/datasets/slow?secs=30&tag=lim0", "Prefer: wait=0", NULL);
    CHECK_INT_EQ(j.status, 202);
    char jloc[128];
    snprintf(jloc, sizeof jloc, "%s", hdr(&j, "Location") ? hdr(&j, "Location") : "");
    resp_free(&j);
    resp_t pg = get(&S, "/api/v1/datasets/pgfast");
    CHECK_INT_EQ(pg.status, 200);
    resp_free(&pg);
    for (int i = 0; i < 3; i++) {
        resp_t d = http(&S, "DELETE", locs[i], NULL, NULL, 0);
        CHECK_INT_EQ(d.status, 204);
        resp_free(&d);
    }
    /* lim0 still has the joined handle: it runs until that one is deleted too */
    resp_t d = http(&S, "DELETE", jloc, NULL, NULL, 0);
    CHECK_INT_EQ(d.status, 204);
    resp_free(&d);
    CHECK(sleeping_becomes(0, 10000));
    /* cancelled statements no longer count (a DELETE on the other worker is
     * acted on by the statement's own loop within a sweep) */
    long st = 0;
    for (int64_t end = tp_now_ms() + 8000; st != 200 && tp_now_ms() < end; usleep(100000)) {
        resp_t ok = get_h("/api/v1/datasets/slow?secs=0&tag=lim4", "Prefer: wait=5", NULL);
        st = ok.status;
        resp_free(&ok);
    }
    CHECK_INT_EQ(st, 200);
}

static void obo_isolation(void)
{
    int ex0 = executions();
    resp_t r = get(&S, "/api/v1/datasets/mine?dev=7");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    resp_t a = get_h("/api/v1/datasets/mine?dev=7", "X-Forwarded-Access-Token: " TOK_A, NULL);
    CHECK_WH(a, "warehouse-only");
    resp_t b = get_h("/api/v1/datasets/mine?dev=7", "X-Forwarded-Access-Token: " TOK_B, NULL);
    CHECK_WH(b, "warehouse-only"); /* not the other user's cached result */
    resp_free(&a);
    resp_free(&b);
    CHECK_INT_EQ(executions() - ex0, 2);
    a = get_h("/api/v1/datasets/mine?dev=7", "X-Forwarded-Access-Token: " TOK_A, NULL);
    CHECK_STR_EQ(hdr(&a, "X-Tidepool-Source"), "cache");
    resp_free(&a);
    b = get_h("/api/v1/datasets/mine?dev=7", "X-Forwarded-Access-Token: " TOK_B, NULL);
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "cache");
    resp_free(&b);
    CHECK_INT_EQ(executions() - ex0, 2);
    /* a token the warehouse refuses */
    r = get_h("/api/v1/datasets/mine?dev=7", "X-Forwarded-Access-Token: tok-forged", NULL);
    CHECK_PROBLEM(r, 502, NULL);
    CHECK(strstr(r.body, "tok-forged") == NULL);
    resp_free(&r);
    /* handles: only the token holder can poll or delete */
    a = get_h("/api/v1/datasets/mine?dev=8&secs=1.5", "X-Forwarded-Access-Token: " TOK_A,
              "Prefer: wait=0");
    CHECK_INT_EQ(a.status, 202);
    char loc[128];
    snprintf(loc, sizeof loc, "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
    resp_free(&a);
    b = get_h(loc, "X-Forwarded-Access-Token: " TOK_B, NULL);
    CHECK_PROBLEM(b, 404, NULL);
    resp_free(&b);
    b = get(&S, loc);
    CHECK_PROBLEM(b, 404, NULL);
    resp_free(&b);
    const char *hb[] = {"X-Forwarded-Access-Token: " TOK_B, NULL};
    b = http(&S, "DELETE", loc, hb, NULL, 0);
    CHECK_PROBLEM(b, 404, NULL);
    resp_free(&b);
    a = get_h(loc, "X-Forwarded-Access-Token: " TOK_A, "Prefer: wait=5");
    CHECK_INT_EQ(a.status, 200);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(a.json, 0), "dev")), 8);
    resp_free(&a);
}

static void failures(void)
{
    resp_t r = get(&S, "/api/v1/datasets/strict?s=abc");
    CHECK_PROBLEM(r, 422, NULL);
    CHECK_CONTAINS(json_string_value(json_object_get(r.json, "detail")), "warehouse statement");
    CHECK(hdr(&r, "X-Tidepool-Warehouse-Statement-Id") != NULL);
    resp_free(&r);
    faults("status=500x100@execute");
    r = get(&S, "/api/v1/datasets/slow?secs=0&tag=f1");
    CHECK_PROBLEM(r, 502, NULL);
    CHECK_CONTAINS(json_string_value(json_object_get(r.json, "detail")), "HTTP 500");
    resp_free(&r);
    /* a proxy's HTML page instead of the warehouse's answer, and cut-off JSON:
     * each a 502 saying which */
    static const struct {
        const char *fault, *path, *code, *detail;
    } broken[] = {
        {"proxy_page=1@execute", "/api/v1/datasets/slow?secs=0&tag=f3", "warehouse-error",
         "HTTP 502"},
        {"bad_json=1@execute", "/api/v1/datasets/slow?secs=0&tag=f4", "warehouse-bad-response",
         "malformed"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(broken); i++) {
        faults(broken[i].fault);
        r = get(&S, broken[i].path);
        CHECK_PROBLEM(r, 502, NULL);
        CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), broken[i].code);
        CHECK_CONTAINS(json_string_value(json_object_get(r.json, "detail")), broken[i].detail);
        resp_free(&r);
    }
    /* an emulator answering 503 is retried (client retry budget) while the caller
     * gets its 202; the statement id stays pollable meanwhile */
    faults("status=503x3@execute,retry_after=1");
    r = get_h("/api/v1/datasets/slow?secs=0&tag=f2", "Prefer: wait=6", NULL);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    faults(NULL);
    r = get(&S, "/api/v1/datasets/slow?secs=0&tag=f1");
    CHECK_INT_EQ(r.status, 200); /* failures are not cached */
    resp_free(&r);
}

static void postgres_unaffected_while_warehouse_slow(void)
{
    faults("latency=1500");
    CURLM *m = curl_multi_init();
    CURL *h[4];
    tp_buf_t b[4];
    for (int i = 0; i < 3; i++) {
        char url[256];
        snprintf(url, sizeof url, "http://127.0.0.1:%d/api/v1/datasets/slow?secs=0&tag=slow%d",
                 S.port, i);
        h[i] = curl_easy_init();
        tp_buf_init(&b[i]);
        curl_easy_setopt(h[i], CURLOPT_URL, url);
        curl_easy_setopt(h[i], CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h[i], CURLOPT_WRITEDATA, &b[i]);
        curl_easy_setopt(h[i], CURLOPT_TIMEOUT, 20L);
        curl_multi_add_handle(m, h[i]);
    }
    int running = 1;
    for (int k = 0; k < 5; k++) {
        curl_multi_perform(m, &running);
        usleep(20000);
    }
    int64_t worst = 0;
    for (int i = 0; i < 10; i++) {
        int64_t t0 = tp_now_us();
        resp_t pg = get(&S, "/api/v1/datasets/daily_metrics?user_id=5&fresh=1");
        int64_t us = tp_now_us() - t0;
        if (us > worst)
            worst = us;
        CHECK_INT_EQ(pg.status, 200);
        CHECK_STR_EQ(hdr(&pg, "X-Tidepool-Source"), "postgres");
        resp_free(&pg);
        curl_multi_perform(m, &running);
    }
    printf("# postgres reads while the warehouse is slow: worst %.1f ms\n", (double)worst / 1000);
    CHECK_MSG(worst < 1200000, "a Postgres read took %lld us", (long long)worst);
    while (running) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 20, NULL);
    }
    for (int i = 0; i < 3; i++) {
        long code = 0;
        curl_easy_getinfo(h[i], CURLINFO_RESPONSE_CODE, &code);
        CHECK(code == 200 || code == 202);
        curl_multi_remove_handle(m, h[i]);
        curl_easy_cleanup(h[i]);
        tp_buf_free(&b[i]);
    }
    curl_multi_cleanup(m);
    faults(NULL);
}

static void stop_server(srv_h_t *s)
{
    if (s->pid > 0)
        CHECK_INT_EQ(tp_test_stop(s->pid, 15000), 0);
    free(s->conf);
    free(s->log);
    s->conf = s->log = NULL;
}

static void sha_hex(const char *s, char out[65])
{
    unsigned char md[32];
    unsigned int n = 0;
    EVP_Digest(s, strlen(s), md, &n, EVP_sha256(), NULL);
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* With authentication on, a statement handle belongs to its principal. */
static void handles_belong_to_their_principal(void)
{
    char ha[65], hb[65], extra[512];
    sha_hex("alice-secret-token-1", ha);
    sha_hex("bob-secret-token-2", hb);
    snprintf(extra, sizeof extra, "[auth]\nmode = token\ntoken_table = false\n"
                                  "tokens = alice:reader:%s, bob:reader:%s\n", ha, hb);
    srv_h_t A = {0};
    if (!start_server(&A, extra, "auth-server", DSN, true)) {
        CHECK_MSG(false, "auth server did not start; see %s", A.log);
        stop_server(&A);
        return;
    }
    const char *as_alice[] = {"Authorization: Bearer alice-secret-token-1", "Prefer: wait=0", NULL};
    const char *as_bob[] = {"Authorization: Bearer bob-secret-token-2", NULL};
    resp_t a = http(&A, "GET", "/api/v1/datasets/slow?secs=1&tag=auth", as_alice, NULL, 0);
    CHECK_INT_EQ(a.status, 202);
    char loc[128];
    snprintf(loc, sizeof loc, "%s", hdr(&a, "Location") ? hdr(&a, "Location") : "");
    resp_free(&a);
    resp_t b = http(&A, "GET", loc, as_bob, NULL, 0);
    CHECK_PROBLEM(b, 404, NULL);
    resp_free(&b);
    b = http(&A, "DELETE", loc, as_bob, NULL, 0);
    CHECK_PROBLEM(b, 404, NULL);
    resp_free(&b);
    b = http(&A, "GET", loc, NULL, NULL, 0);
    CHECK_INT_EQ(b.status, 401);
    resp_free(&b);
    const char *alice_waits[] = {"Authorization: Bearer alice-secret-token-1", "Prefer: wait=5", NULL};
    a = http(&A, "GET", loc, alice_waits, NULL, 0);
    CHECK_INT_EQ(a.status, 200);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(a.json, 0), "tag")), "auth");
    resp_free(&a);
    /* the same read by bob shares the result (not @obo), under his own handle */
    b = http(&A, "GET", "/api/v1/datasets/slow?secs=1&tag=auth", as_bob, NULL, 0);
    CHECK_INT_EQ(b.status, 200);
    CHECK_STR_EQ(hdr(&b, "X-Tidepool-Source"), "cache");
    resp_free(&b);
    stop_server(&A);
}

/* Token mode: the on-behalf-of X-Forwarded-Access-Token is honoured only from
 * a trusted proxy. Loopback is trusted by default (the @obo read runs with the
 * user's token); with trusted_proxies elsewhere the header is ignored and the
 * @obo read answers 401 as if it were absent, while the bearer token still
 * authenticates. */
static void obo_token_only_from_trusted_proxy(void)
{
    char ha[65], extra[512];
    sha_hex("carol-secret-token-3", ha);
    const char *as_carol[] = {"Authorization: Bearer carol-secret-token-3",
                              "X-Forwarded-Access-Token: " TOK_A, NULL};
    static const char *const proxies[] = {"", "trusted_proxies = 192.0.2.0/24\n"};
    for (int i = 0; i < 2; i++) {
        snprintf(extra, sizeof extra,
                 "[auth]\nmode = token\ntoken_table = false\ntokens = carol:reader:%s\n%s", ha,
                 proxies[i]);
        srv_h_t T = {0};
        if (!start_server(&T, extra, i ? "obo-untrusted" : "obo-trusted", DSN, true)) {
            CHECK_MSG(false, "server did not start; see %s", T.log);
            stop_server(&T);
            return;
        }
        resp_t r = http(&T, "GET", "/api/v1/datasets/mine?dev=9", as_carol, NULL, 0);
        if (i == 0) {
            CHECK_WH(r, "warehouse-only");
        } else {
            CHECK_PROBLEM(r, 401, NULL);
            CHECK(strstr(r.body, TOK_A) == NULL);
        }
        resp_free(&r);
        r = http(&T, "GET", "/api/v1/datasets/pgfast", as_carol, NULL, 0);
        CHECK_INT_EQ(r.status, 200);
        resp_free(&r);
        stop_server(&T);
    }
}

/* A server whose Postgres is unreachable answers datasets with a twin from
 * the warehouse; the others say 503. */
static void postgres_down_routes_to_the_warehouse(void)
{
    char dead[128];
    snprintf(dead, sizeof dead, "host=127.0.0.1 port=%d dbname=x user=x connect_timeout=2",
             tp_test_free_port());
    srv_h_t D = {0};
    if (!start_server(&D, "", "pgdown-server", dead, false)) {
        CHECK_MSG(false, "server did not start; see %s", D.log);
        stop_server(&D);
        return;
    }
    resp_t r = get(&D, "/api/v1/datasets/daily_metrics?user_id=1");
    CHECK_WH(r, "postgres-unavailable");
    CHECK_INT_EQ(json_array_size(r.json), 10);
    resp_free(&r);
    r = get(&D, "/api/v1/datasets/pgfast");
    CHECK_INT_EQ(r.status, 503);
    resp_free(&r);
    stop_server(&D);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    (void)harness_setup; /* this program starts the server itself, with a [warehouse] */
    if (!start_all()) {
        if (!DSN) {
            tp_test_skip("test_fallback_server", "no harness Postgres");
            return tp_test_done();
        }
        tp_test_fail(__FILE__, __LINE__, "set-up failed; see %s", S.log ? S.log : EMU_LOG);
    } else {
        TP_RUN(routing_rules);
        TP_RUN(timestamps_agree);
        TP_RUN(budget_202_poll_delete);
        TP_RUN(single_flight);
        TP_RUN(disconnect_cancels);
        TP_RUN(in_flight_limit);
        TP_RUN(obo_isolation);
        TP_RUN(failures);
        TP_RUN(postgres_unaffected_while_warehouse_slow);
        TP_RUN(handles_belong_to_their_principal);
        TP_RUN(obo_token_only_from_trusted_proxy);
        TP_RUN(postgres_down_routes_to_the_warehouse);
    }
    harness_finish(&S);
    if (EMU > 0)
        tp_test_stop(EMU, 5000);
    return tp_test_done();
}
