/* Fallback registry (lib/fallback.c) on an event_base against the real
 * emulator (bin/tidepool-warehouse) over HTTP, on a small table seeded in the
 * harness Postgres: the routing rules, single flight (N concurrent requests,
 * one statement: counted in the emulator's request log), the result cache,
 * the in-flight limit, wait budget (200 vs 202) and polling, cancellation on
 * abandon, on a detached waiter and on delete (the emulator's backend stops
 * sleeping), OBO isolation between two tokens, failure mapping (rejected
 * parameter, broken SQL, injected 5xx/429, emulator down, too large) and the
 * three result encodings. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <jansson.h>

#include "../tp_test.h"
#include "tidepool/defs.h"
#include "tidepool/fallback.h"
#include "tidepool/log.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

#define SVC "tok-svc-1"
#define TOK_A "tok-user-a"
#define TOK_B "tok-user-b"

static pid_t EMU;
static int EMU_PORT;
static char EMU_URL[64];
static char EMU_LOG[512];
static const char *DSN;
static tp_defs_set_t *SET;

static struct event_base *B;
static tp_wh_t *WH;
static tp_fb_t *FB;
static tp_fb_loop_t *LP;

/* ---- set-up ---- */

static void def(const char *dir, const char *name, const char *text)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static bool load_defs(void)
{
    char dir[600];
    snprintf(dir, sizeof dir, "%s/queries", tp_test_tmpdir());
    mkdir(dir, 0755);
    def(dir, "readings.sql",
        "-- @param dev INT\n-- @param since DATE = 2025-01-01\n-- @requires readings_job\n"
        "-- @max_staleness 1h\n-- @covers since >= 30d\n"
        "SELECT id, dev, val, note, ok FROM fbt.readings WHERE dev = :dev AND day >= :since "
        "ORDER BY id\n");
    def(dir, "readings.warehouse.sql",
        "-- @param dev INT\n-- @param since DATE = 2025-01-01\n"
        "SELECT id, dev, val, note, ok FROM fbt.readings WHERE dev = :dev AND day >= :since "
        "ORDER BY id\n");
    def(dir, "pgonly.sql",
        "-- @param dev INT\n-- @requires readings_job\n"
        "SELECT id FROM fbt.readings WHERE dev = :dev\n");
    def(dir, "slow.warehouse.sql",
        "-- @param secs DOUBLE\n-- @param tag STRING = a\n"
        "SELECT pg_sleep(:secs)::text AS slept, :tag AS tag\n");
    def(dir, "mine.warehouse.sql",
        "-- @obo\n-- @param dev INT\n-- @param secs DOUBLE = 0\n"
        "SELECT count(*) AS n, :dev AS dev, pg_sleep(:secs)::text AS s FROM fbt.readings "
        "WHERE dev = :dev\n");
    def(dir, "strict.warehouse.sql", "-- @param s STRING\nSELECT CAST(:s AS INT) AS v\n");
    def(dir, "broken.warehouse.sql", "SELECT * FROM fbt.no_such_table\n");
    def(dir, "big.warehouse.sql",
        "SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 2000) g\n");
    SET = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    bool ok = tp_defs_load_datasets(SET, dir, &diag);
    for (size_t i = 0; i < diag.n; i++)
        fprintf(stderr, "# %s\n", diag.msgs[i]);
    tp_defs_diag_free(&diag);
    return ok;
}

static bool start_emulator(void)
{
    DSN = tp_test_dsn();
    if (!DSN)
        return false;
    char *r = tp_test_sql(DSN,
                          "CREATE SCHEMA fbt;"
                          "CREATE TABLE fbt.readings(id int PRIMARY KEY, dev int, val double precision,"
                          " note text, ok boolean, day date);"
                          "INSERT INTO fbt.readings SELECT g, g % 3, g * 1.5,"
                          " CASE WHEN g = 3 THEN 'a,\"b\"' END, g % 2 = 0, '2025-01-01'::date + g"
                          " FROM generate_series(1, 30) g;"
                          "SELECT 1");
    free(r);
    EMU_PORT = tp_test_free_port();
    snprintf(EMU_URL, sizeof EMU_URL, "http://127.0.0.1:%d", EMU_PORT);
    snprintf(EMU_LOG, sizeof EMU_LOG, "%s/emulator.log", tp_test_tmpdir());
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", EMU_PORT);
    char *argv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn",
                    (char *)DSN, "--token", SVC, "--token", TOK_A, "--token", TOK_B, NULL};
    EMU = tp_test_spawn(argv, EMU_LOG);
    return EMU > 0 && tp_test_wait_port(EMU_PORT, 10000);
}

static size_t discard(char *p, size_t s, size_t n, void *u)
{
    (void)p;
    (void)u;
    return s * n;
}

static void faults(const char *spec)
{
    CURL *c = curl_easy_init();
    char url[128], body[256];
    snprintf(url, sizeof url, "%s/admin/faults", EMU_URL);
    snprintf(body, sizeof body, "{\"spec\":\"%s\"}", spec ? spec : "");
    curl_easy_setopt(c, CURLOPT_URL, url);
    if (!spec)
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "DELETE");
    else
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    struct curl_slist *h = curl_slist_append(NULL, "Authorization: Bearer " SVC);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    long code = 0;
    CURLcode rc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    CHECK_MSG(rc == CURLE_OK && code == 200, "faults %s: curl %d HTTP %ld", spec ? spec : "(clear)",
              (int)rc, code);
}

/* Requests the emulator has logged so far with method and a path starting with prefix. */
static int logged(const char *method, const char *prefix)
{
    char *text = tp_read_file(EMU_LOG, NULL);
    char m[16], p[128];
    snprintf(m, sizeof m, "\"%s\"", method);
    snprintf(p, sizeof p, "\"path\":\"%s", prefix);
    int n = 0;
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n"))
        if (strstr(line, m) && strstr(line, p))
            n++;
    free(text);
    return n;
}

/* Statement executions the emulator has logged so far. */
static int executions(void)
{
    return logged("POST", "/api/2.0/sql/statements\"");
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

typedef struct opts {
    int64_t max_in_flight, abandon_ms, max_result_bytes, cache_bytes;
    int submit_wait_s;
    const char *host;
} opts_t;

static void fb_up(opts_t o)
{
    B = event_base_new();
    tp_wh_config_t wc;
    tp_wh_config_init(&wc);
    wc.host = o.host ? o.host : EMU_URL;
    wc.warehouse_id = "tidepool-local";
    wc.token = SVC;
    wc.poll_initial_ms = 20;
    wc.poll_max_ms = 100;
    wc.retry_budget_ms = 600;
    wc.retry_max_ms = 200;
    wc.connect_timeout_ms = 1000;
    char *err = NULL;
    WH = tp_wh_new(B, &wc, &err);
    CHECK_MSG(WH != NULL, "tp_wh_new: %s", err ? err : "");
    free(err);
    tp_fb_config_t fc = {
        .max_in_flight = o.max_in_flight ? o.max_in_flight : 16,
        .result_cache_bytes = o.cache_bytes ? o.cache_bytes : 1 << 20,
        .max_result_bytes = o.max_result_bytes ? o.max_result_bytes : 1 << 20,
        .result_ttl_ms = 60000,
        .abandon_ms = o.abandon_ms ? o.abandon_ms : 60000,
        .timeout_ms = 20000,
        .submit_wait_s = o.submit_wait_s,
    };
    FB = tp_fb_new(&fc);
    LP = tp_fb_loop_new(FB, B, WH);
}

static void fb_down(void)
{
    tp_fb_loop_free(LP);
    tp_wh_free(WH);
    tp_fb_free(FB);
    event_base_free(B);
    LP = NULL;
    WH = NULL;
    FB = NULL;
    B = NULL;
}

/* Runs the loop until *flag or ms pass. */
static void spin(const bool *flag, int ms)
{
    int64_t end = tp_now_ms() + ms;
    while ((!flag || !*flag) && tp_now_ms() < end) {
        struct timeval tv = {0, 20000};
        event_base_loopexit(B, &tv);
        event_base_dispatch(B);
    }
}

typedef struct got {
    bool called;
    tp_fb_outcome_t o;
} got_t;

static void on_wait(tp_fb_outcome_t *o, void *arg)
{
    got_t *g = arg;
    g->called = true;
    g->o = *o; /* takes what o owns */
}

static const tp_defs_dataset_t *ds(const char *name)
{
    const tp_defs_dataset_t *d = tp_defs_dataset_find(SET, name);
    CHECK_MSG(d != NULL, "dataset %s", name);
    return d;
}

/* Starts a request for dataset name with values (one per parameter). */
static tp_fb_state_t start(const char *name, const char *const *values, const char *owner,
                           const char *token, int64_t wait_ms, got_t *g, tp_fb_outcome_t *out,
                           tp_fb_waiter_t **w)
{
    tp_fb_request_t rq = {.ds = ds(name), .values = values, .owner = owner,
                          .bearer_token = token, .wait_ms = wait_ms, .on_wait = on_wait, .arg = g};
    return tp_fb_start(LP, &rq, out, w);
}

static json_t *encode_json(const tp_fb_result_t *r, tp_fb_shape_t shape)
{
    tp_buf_t b = {0};
    tp_fb_result_encode(r, shape, &b);
    json_error_t je;
    json_t *j = json_loadb(b.data ? b.data : "", b.len, 0, &je);
    CHECK_MSG(j != NULL, "not JSON (%s): %.*s", je.text, (int)b.len, b.data ? b.data : "");
    tp_buf_free(&b);
    return j;
}

/* ---- routing ---- */

static void routing_rules(void)
{
    int64_t now = tp_wall_ms();
    const tp_defs_dataset_t *rd = ds("readings");
    tp_defs_value_t vals[2];
    const char *why;
    CHECK(tp_defs_value_parse(TP_DEFS_INT, "1", &vals[0], &why));
    /* today's date: within @covers */
    char today[16];
    time_t t = (time_t)(now / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(today, sizeof today, "%Y-%m-%d", &tm);
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, today, &vals[1], &why));
    tp_fb_job_fact_t fresh = {.known = true, .last_success_ms = now - 60000};
    tp_fb_route_in_t in = {.ds = rd, .values = vals, .jobs = &fresh, .now_ms = now};
    tp_fb_route_t r = tp_fb_route(&in);
    CHECK_INT_EQ(r.source, TP_FB_SRC_POSTGRES);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "fresh");
    /* stale */
    tp_fb_job_fact_t stale = {.known = true, .last_success_ms = now - 2 * 3600 * 1000};
    in.jobs = &stale;
    r = tp_fb_route(&in);
    CHECK_INT_EQ(r.source, TP_FB_SRC_WAREHOUSE);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "stale");
    CHECK_CONTAINS(r.detail, "readings_job");
    /* never succeeded: no row, or a row without a success */
    tp_fb_job_fact_t never = {.known = false};
    in.jobs = &never;
    CHECK_STR_EQ(tp_fb_reason_name(tp_fb_route(&in).reason), "never-synced");
    never.known = true;
    CHECK_STR_EQ(tp_fb_reason_name(tp_fb_route(&in).reason), "never-synced");
    /* facts unknown (sync_state unreadable): not a reason by itself */
    in.jobs = NULL;
    CHECK_INT_EQ(tp_fb_route(&in).source, TP_FB_SRC_POSTGRES);
    in.jobs = &fresh;
    /* @covers */
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2020-01-01", &vals[1], &why));
    r = tp_fb_route(&in);
    CHECK_INT_EQ(r.source, TP_FB_SRC_WAREHOUSE);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "covers");
    CHECK_CONTAINS(r.detail, "since");
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, today, &vals[1], &why));
    /* Postgres down, ?source= */
    in.postgres_down = true;
    CHECK_STR_EQ(tp_fb_reason_name(tp_fb_route(&in).reason), "postgres-unavailable");
    in.postgres_down = false;
    in.source = "warehouse";
    r = tp_fb_route(&in);
    CHECK_INT_EQ(r.source, TP_FB_SRC_WAREHOUSE);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "requested");
    in.source = "postgres";
    in.jobs = &stale;
    CHECK_INT_EQ(tp_fb_route(&in).source, TP_FB_SRC_POSTGRES);
    in.source = NULL;
    /* warehouse-only */
    tp_fb_route_in_t w = {.ds = ds("slow"), .now_ms = now};
    r = tp_fb_route(&w);
    CHECK_INT_EQ(r.source, TP_FB_SRC_WAREHOUSE);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "warehouse-only");
    w.source = "postgres";
    CHECK_INT_EQ(tp_fb_route(&w).source, TP_FB_SRC_NONE);
    /* no twin: a rule that matches stays on Postgres; asking for the warehouse cannot */
    tp_fb_route_in_t p = {.ds = ds("pgonly"), .jobs = &never, .now_ms = now};
    r = tp_fb_route(&p);
    CHECK_INT_EQ(r.source, TP_FB_SRC_POSTGRES);
    CHECK_STR_EQ(tp_fb_reason_name(r.reason), "no-warehouse-twin");
    p.source = "warehouse";
    CHECK_INT_EQ(tp_fb_route(&p).source, TP_FB_SRC_NONE);
}

/* ---- statements ---- */

static void result_shapes_and_cache(void)
{
    fb_up((opts_t){0});
    const char *v[] = {"0", "2025-01-01"};
    got_t g = {0};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    int ex0 = executions();
    CHECK_INT_EQ(start("readings", v, "u1", NULL, 5000, &g, &o, &w), TP_FB_WAITING);
    CHECK(w != NULL);
    CHECK_INT_EQ(strlen(o.id), 32);
    spin(&g.called, 10000);
    CHECK(g.called);
    CHECK_INT_EQ(g.o.state, TP_FB_READY);
    CHECK(g.o.result != NULL);
    if (g.o.result) {
        CHECK_INT_EQ(tp_fb_result_rows(g.o.result), 10);
        json_t *rows = encode_json(g.o.result, TP_FB_ROWS);
        json_t *r0 = json_array_get(rows, 0);
        CHECK_INT_EQ(json_integer_value(json_object_get(r0, "id")), 3);
        CHECK(json_is_real(json_object_get(r0, "val")) || json_is_integer(json_object_get(r0, "val")));
        CHECK_STR_EQ(json_string_value(json_object_get(r0, "note")), "a,\"b\"");
        CHECK(json_is_false(json_object_get(r0, "ok")));
        CHECK(json_is_null(json_object_get(json_array_get(rows, 1), "note")));
        json_decref(rows);
        json_t *cols = encode_json(g.o.result, TP_FB_COLUMNS);
        CHECK_INT_EQ(json_array_size(json_object_get(cols, "id")), 10);
        CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(cols, "id"), 9)), 30);
        json_decref(cols);
        tp_buf_t csv = {0};
        tp_fb_result_encode(g.o.result, TP_FB_CSV, &csv);
        tp_buf_putc(&csv, '\0');
        CHECK(strncmp(csv.data, "id,dev,val,note,ok\r\n3,0,4.5,\"a,\"\"b\"\"\",false\r\n6,0,9,,true\r\n",
                      58) == 0);
        tp_buf_free(&csv);
    }
    tp_fb_outcome_clear(&g.o);
    CHECK_INT_EQ(executions() - ex0, 1);
    /* the same request again: from the cache, no statement */
    CHECK_INT_EQ(start("readings", v, "u2", NULL, 5000, &g, &o, &w), TP_FB_READY);
    CHECK(o.from_cache);
    CHECK_INT_EQ(tp_fb_result_rows(o.result), 10);
    tp_fb_outcome_clear(&o);
    /* bypassing the cache runs it again */
    got_t g2 = {0};
    tp_fb_request_t rq = {.ds = ds("readings"), .values = v, .owner = "u1", .bypass_cache = true,
                          .wait_ms = 5000, .on_wait = on_wait, .arg = &g2};
    CHECK_INT_EQ(tp_fb_start(LP, &rq, &o, &w), TP_FB_WAITING);
    spin(&g2.called, 10000);
    CHECK_INT_EQ(g2.o.state, TP_FB_READY);
    tp_fb_outcome_clear(&g2.o);
    spin(NULL, 200); /* the emulator logs after answering */
    CHECK_INT_EQ(executions() - ex0, 2);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.cache_hits, 1);
    CHECK_INT_EQ(st.in_flight, 0);
    CHECK(st.cache_entries == 1 && st.cache_bytes > 0);
    fb_down();
}

/* With submit_wait_s the warehouse holds the submission until the statement
 * ends: the result comes without a single status poll. */
static void submission_waits_at_the_warehouse(void)
{
    fb_up((opts_t){.submit_wait_s = 5});
    spin(NULL, 200);
    int gets0 = logged("GET", "/api/2.0/sql/statements/");
    const char *v[] = {"0.3", "sw"};
    got_t g = {0};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    int64_t t0 = tp_now_ms();
    CHECK_INT_EQ(start("slow", v, "u", NULL, 5000, &g, &o, &w), TP_FB_WAITING);
    spin(&g.called, 8000);
    CHECK_INT_EQ(g.o.state, TP_FB_READY);
    int64_t took = tp_now_ms() - t0;
    CHECK_MSG(took >= 300 && took < 3000, "took %lld ms", (long long)took);
    tp_fb_outcome_clear(&g.o);
    spin(NULL, 200);
    CHECK_INT_EQ(logged("GET", "/api/2.0/sql/statements/") - gets0, 0);
    /* a shorter budget submits without waiting, and polls */
    const char *v2[] = {"0.3", "sw2"};
    got_t g2 = {0};
    CHECK_INT_EQ(start("slow", v2, "u", NULL, 4000, &g2, &o, &w), TP_FB_WAITING);
    spin(&g2.called, 8000);
    CHECK_INT_EQ(g2.o.state, TP_FB_READY);
    tp_fb_outcome_clear(&g2.o);
    spin(NULL, 200);
    CHECK(logged("GET", "/api/2.0/sql/statements/") - gets0 > 0);
    fb_down();
}

/* The result cache holds what fits in result_cache_bytes, least recently used out first. */
static void cache_is_bounded_lru(void)
{
    fb_up((opts_t){0});
    const char *d0[] = {"0", "2025-01-01"}, *d1[] = {"1", "2025-01-01"};
    tp_fb_stats_t st;
    int64_t one = 0;
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            /* room for one result and a half: the second pushes the first out */
            tp_fb_stats(FB, &st);
            one = st.cache_bytes;
            tp_fb_config_t fc = {.max_in_flight = 16, .result_cache_bytes = one * 3 / 2,
                                 .max_result_bytes = 1 << 20, .result_ttl_ms = 60000,
                                 .abandon_ms = 60000, .timeout_ms = 20000};
            tp_fb_configure(FB, &fc);
        }
        got_t g = {0};
        tp_fb_outcome_t o;
        tp_fb_waiter_t *w;
        CHECK_INT_EQ(start("readings", round ? d1 : d0, "u", NULL, 5000, &g, &o, &w), TP_FB_WAITING);
        spin(&g.called, 8000);
        CHECK_INT_EQ(g.o.state, TP_FB_READY);
        tp_fb_outcome_clear(&g.o);
    }
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.cache_entries, 1); /* dev 1 pushed dev 0 out */
    CHECK(one > 0 && st.cache_bytes > 0 && st.cache_bytes <= one * 3 / 2);
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    got_t g = {0};
    CHECK_INT_EQ(start("readings", d1, "u", NULL, 5000, &g, &o, &w), TP_FB_READY);
    tp_fb_outcome_clear(&o);
    CHECK_INT_EQ(start("readings", d0, "u", NULL, 5000, &g, &o, &w), TP_FB_WAITING);
    spin(&g.called, 8000);
    tp_fb_outcome_clear(&g.o);
    fb_down();
}

static void single_flight(void)
{
    fb_up((opts_t){0});
    int ex0 = executions();
    const char *v[] = {"0.6", "sf"};
    enum { N = 6 };
    got_t g[N] = {{0}};
    tp_fb_outcome_t o[N];
    tp_fb_waiter_t *w[N];
    for (int i = 0; i < N; i++) {
        char owner[16];
        snprintf(owner, sizeof owner, "user%d", i);
        CHECK_INT_EQ(start("slow", v, owner, NULL, 8000, &g[i], &o[i], &w[i]), TP_FB_WAITING);
        CHECK(o[i].shared == (i > 0));
    }
    CHECK(strcmp(o[0].id, o[1].id) != 0); /* each requester has its own handle */
    for (int i = 0; i < N; i++)
        spin(&g[i].called, 10000);
    for (int i = 0; i < N; i++) {
        CHECK_INT_EQ(g[i].o.state, TP_FB_READY);
        CHECK(g[i].o.result != NULL && g[i].o.result == g[0].o.result); /* one result */
        CHECK(g[i].o.elapsed_ms >= 500);
    }
    for (int i = 0; i < N; i++)
        tp_fb_outcome_clear(&g[i].o);
    spin(NULL, 200);
    CHECK_INT_EQ(executions() - ex0, 1);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.submitted, 1);
    CHECK_INT_EQ(st.joined, N - 1);
    fb_down();
}

static void wait_budget_then_poll(void)
{
    fb_up((opts_t){0});
    faults("latency=150@get");
    const char *v[] = {"1.0", "wb"};
    got_t g = {0};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    int64_t t0 = tp_now_ms();
    CHECK_INT_EQ(start("slow", v, "alice", NULL, 300, &g, &o, &w), TP_FB_WAITING);
    spin(&g.called, 5000);
    CHECK(g.called);
    CHECK_INT_EQ(g.o.state, TP_FB_PENDING); /* the budget ran out first: a 202 */
    int64_t waited = tp_now_ms() - t0;
    CHECK_MSG(waited >= 290 && waited < 900, "waited %lld ms", (long long)waited);
    char id[33];
    snprintf(id, sizeof id, "%s", g.o.id);
    CHECK_STR_EQ(id, o.id);
    tp_fb_outcome_clear(&g.o);
    /* another principal cannot see it; a wrong id is not found */
    tp_fb_outcome_t p;
    CHECK_INT_EQ(tp_fb_poll(LP, id, "mallory", 0, NULL, NULL, &p, NULL), TP_FB_NOT_FOUND);
    CHECK_INT_EQ(tp_fb_poll(LP, "0123456789abcdef0123456789abcdef", "alice", 0, NULL, NULL, &p,
                            NULL),
                 TP_FB_NOT_FOUND);
    /* a poll without waiting: still running */
    CHECK_INT_EQ(tp_fb_poll(LP, id, "alice", 0, NULL, NULL, &p, NULL), TP_FB_PENDING);
    /* a poll with a budget: the result */
    got_t g2 = {0};
    CHECK_INT_EQ(tp_fb_poll(LP, id, "alice", 5000, on_wait, &g2, &p, &w), TP_FB_WAITING);
    spin(&g2.called, 8000);
    CHECK_INT_EQ(g2.o.state, TP_FB_READY);
    CHECK(g2.o.elapsed_ms >= 1000);
    tp_fb_outcome_clear(&g2.o);
    /* finished: polls answer at once, again and again */
    CHECK_INT_EQ(tp_fb_poll(LP, id, "alice", 5000, on_wait, &g2, &p, &w), TP_FB_READY);
    CHECK(w == NULL);
    CHECK_INT_EQ(tp_fb_result_rows(p.result), 1);
    tp_fb_outcome_clear(&p);
    faults(NULL);
    fb_down();
}

static void in_flight_limit(void)
{
    fb_up((opts_t){.max_in_flight = 2});
    got_t g[3] = {{0}};
    tp_fb_outcome_t o[3];
    tp_fb_waiter_t *w[3];
    const char *v0[] = {"0.5", "l0"}, *v1[] = {"0.5", "l1"}, *v2[] = {"0.5", "l2"};
    CHECK_INT_EQ(start("slow", v0, "u", NULL, 5000, &g[0], &o[0], &w[0]), TP_FB_WAITING);
    CHECK_INT_EQ(start("slow", v1, "u", NULL, 5000, &g[1], &o[1], &w[1]), TP_FB_WAITING);
    CHECK_INT_EQ(start("slow", v2, "u", NULL, 5000, &g[2], &o[2], &w[2]), TP_FB_BUSY);
    CHECK_INT_EQ(o[2].problem.status, 429);
    CHECK(o[2].problem.retry_after_s > 0);
    CHECK_CONTAINS(o[2].problem.detail, "max_in_flight");
    tp_fb_outcome_clear(&o[2]);
    /* joining a running one is not a new statement */
    got_t gj = {0};
    tp_fb_outcome_t oj;
    tp_fb_waiter_t *wj;
    CHECK_INT_EQ(start("slow", v1, "u2", NULL, 5000, &gj, &oj, &wj), TP_FB_WAITING);
    spin(&g[0].called, 8000);
    spin(&g[1].called, 8000);
    spin(&gj.called, 8000);
    tp_fb_outcome_clear(&g[0].o);
    tp_fb_outcome_clear(&g[1].o);
    tp_fb_outcome_clear(&gj.o);
    /* room again */
    CHECK_INT_EQ(start("slow", v2, "u", NULL, 5000, &g[2], &o[2], &w[2]), TP_FB_WAITING);
    spin(&g[2].called, 8000);
    CHECK_INT_EQ(g[2].o.state, TP_FB_READY);
    tp_fb_outcome_clear(&g[2].o);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.busy, 1);
    fb_down();
}

/* Waits until the emulator's backend is (or is no longer) sleeping. */
static bool sleeping_becomes(int want, int ms)
{
    int64_t end = tp_now_ms() + ms;
    while (tp_now_ms() < end) {
        if (sleeping() == want)
            return true;
        spin(NULL, 50);
    }
    return false;
}

static void abandoned_statement_is_cancelled(void)
{
    fb_up((opts_t){.abandon_ms = 400});
    const char *v[] = {"20", "ab"};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    CHECK_INT_EQ(start("slow", v, "bob", NULL, 0, NULL, &o, &w), TP_FB_PENDING);
    CHECK(sleeping_becomes(1, 5000));
    /* polled in time: kept */
    for (int i = 0; i < 4; i++) {
        spin(NULL, 200);
        tp_fb_outcome_t p;
        CHECK_INT_EQ(tp_fb_poll(LP, o.id, "bob", 0, NULL, NULL, &p, NULL), TP_FB_PENDING);
    }
    CHECK_INT_EQ(sleeping(), 1);
    /* then nobody polls: cancelled at the warehouse */
    int64_t t0 = tp_now_ms();
    CHECK_MSG(sleeping_becomes(0, 5000), "still sleeping after %lld ms",
              (long long)(tp_now_ms() - t0));
    spin(NULL, 300);
    tp_fb_outcome_t p;
    CHECK_INT_EQ(tp_fb_poll(LP, o.id, "bob", 0, NULL, NULL, &p, NULL), TP_FB_FAILED);
    CHECK_STR_EQ(p.problem.code, "statement-cancelled");
    CHECK_CONTAINS(p.problem.detail, "abandoned");
    tp_fb_outcome_clear(&p);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.cancelled, 1);
    CHECK_INT_EQ(st.in_flight, 0);
    fb_down();
}

static void detached_waiter_and_delete_cancel(void)
{
    fb_up((opts_t){0});
    /* the only waiter leaves: cancelled at once */
    const char *v[] = {"20", "dw"};
    got_t g = {0};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    CHECK_INT_EQ(start("slow", v, "carol", NULL, 10000, &g, &o, &w), TP_FB_WAITING);
    CHECK(sleeping_becomes(1, 5000));
    tp_fb_waiter_detach(w);
    CHECK(sleeping_becomes(0, 8000));
    spin(NULL, 200);
    CHECK(!g.called);
    /* two waiters on one statement: one leaving does not cancel it */
    const char *v2[] = {"0.8", "dw2"};
    got_t g1 = {0}, g2 = {0};
    tp_fb_outcome_t o1, o2;
    tp_fb_waiter_t *w1, *w2;
    CHECK_INT_EQ(start("slow", v2, "carol", NULL, 10000, &g1, &o1, &w1), TP_FB_WAITING);
    CHECK_INT_EQ(start("slow", v2, "dave", NULL, 10000, &g2, &o2, &w2), TP_FB_WAITING);
    tp_fb_waiter_detach(w1);
    spin(&g2.called, 8000);
    CHECK_INT_EQ(g2.o.state, TP_FB_READY);
    CHECK(!g1.called);
    tp_fb_outcome_clear(&g2.o);
    /* DELETE: the handle is gone and the statement cancelled */
    const char *v3[] = {"20", "del"};
    CHECK_INT_EQ(start("slow", v3, "erin", NULL, 0, NULL, &o, &w), TP_FB_PENDING);
    CHECK(sleeping_becomes(1, 5000));
    CHECK(!tp_fb_delete(LP, o.id, "frank"));
    CHECK(tp_fb_delete(LP, o.id, "erin"));
    CHECK(sleeping_becomes(0, 8000));
    tp_fb_outcome_t p;
    CHECK_INT_EQ(tp_fb_poll(LP, o.id, "erin", 0, NULL, NULL, &p, NULL), TP_FB_NOT_FOUND);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.cancelled, 2);
    spin(NULL, 300);
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.in_flight, 0);
    fb_down();
}

static void obo_isolation(void)
{
    fb_up((opts_t){0});
    int ex0 = executions();
    const char *v[] = {"1", "0.3"};
    got_t ga = {0}, gb = {0};
    tp_fb_outcome_t oa, ob;
    tp_fb_waiter_t *wa, *wb;
    /* without a token: refused */
    CHECK_INT_EQ(start("mine", v, "anna", NULL, 5000, &ga, &oa, &wa), TP_FB_FAILED);
    CHECK_INT_EQ(oa.problem.status, 401);
    tp_fb_outcome_clear(&oa);
    /* two users, same parameters: two statements, each with its own token */
    CHECK_INT_EQ(start("mine", v, "anna", TOK_A, 5000, &ga, &oa, &wa), TP_FB_WAITING);
    CHECK_INT_EQ(start("mine", v, "ben", TOK_B, 5000, &gb, &ob, &wb), TP_FB_WAITING);
    CHECK(!ob.shared);
    spin(&ga.called, 8000);
    spin(&gb.called, 8000);
    CHECK_INT_EQ(ga.o.state, TP_FB_READY);
    CHECK_INT_EQ(gb.o.state, TP_FB_READY);
    CHECK(ga.o.result != gb.o.result);
    tp_fb_outcome_clear(&ga.o);
    tp_fb_outcome_clear(&gb.o);
    spin(NULL, 200);
    CHECK_INT_EQ(executions() - ex0, 2);
    /* (that each statement carried its caller's token is shown below: a token
     * the warehouse does not know fails that caller's statement alone) */
    /* cached per user: both hit their own entry */
    tp_fb_outcome_t c;
    CHECK_INT_EQ(start("mine", v, "anna", TOK_A, 5000, &ga, &c, &wa), TP_FB_READY);
    CHECK(c.from_cache);
    tp_fb_outcome_clear(&c);
    CHECK_INT_EQ(start("mine", v, "ben", TOK_B, 5000, &gb, &c, &wb), TP_FB_READY);
    CHECK(c.from_cache);
    tp_fb_outcome_clear(&c);
    /* a third identity is never served another's entry */
    got_t gc = {0};
    CHECK_INT_EQ(start("mine", v, "carl", TOK_A "x", 5000, &gc, &c, &wa), TP_FB_WAITING);
    spin(&gc.called, 8000);
    CHECK_INT_EQ(gc.o.state, TP_FB_FAILED); /* the warehouse refuses the token */
    CHECK_STR_EQ(gc.o.problem.code, "warehouse-auth-failed");
    CHECK(strstr(gc.o.problem.detail, TOK_A) == NULL);
    tp_fb_outcome_clear(&gc.o);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.cache_entries, 2);
    CHECK_INT_EQ(st.joined, 0);
    fb_down();
}

/* Runs dataset name to its end and returns the outcome (caller clears). */
static tp_fb_outcome_t run(const char *name, const char *const *values)
{
    got_t g = {0};
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w;
    tp_fb_state_t s = start(name, values, "x", NULL, 10000, &g, &o, &w);
    if (s != TP_FB_WAITING)
        return o;
    spin(&g.called, 12000);
    CHECK(g.called);
    return g.o;
}

static void failures_map_to_problems(void)
{
    fb_up((opts_t){.max_result_bytes = 64 * 1024});
    const char *bad[] = {"abc"};
    tp_fb_outcome_t o = run("strict", bad);
    CHECK_INT_EQ(o.state, TP_FB_FAILED);
    CHECK_INT_EQ(o.problem.status, 422);
    CHECK_CONTAINS(o.problem.detail, "abc");
    CHECK(o.problem.warehouse_statement_id != NULL);
    tp_fb_outcome_clear(&o);
    o = run("broken", NULL);
    CHECK_INT_EQ(o.problem.status, 502);
    CHECK_STR_EQ(o.problem.code, "warehouse-failed");
    CHECK_CONTAINS(o.problem.detail, "TABLE_OR_VIEW_NOT_FOUND");
    tp_fb_outcome_clear(&o);
    o = run("big", NULL);
    CHECK_INT_EQ(o.problem.status, 413);
    CHECK_STR_EQ(o.problem.code, "result-too-large");
    CHECK_CONTAINS(o.problem.detail, "narrower");
    tp_fb_outcome_clear(&o);
    const char *v[] = {"0", "f1"};
    faults("status=500x1@execute");
    o = run("slow", v);
    CHECK_INT_EQ(o.problem.status, 502);
    CHECK_CONTAINS(o.problem.detail, "500");
    tp_fb_outcome_clear(&o);
    faults("status=429x20@execute,retry_after=1");
    const char *v2[] = {"0", "f2"};
    o = run("slow", v2);
    CHECK_INT_EQ(o.problem.status, 503);
    CHECK_STR_EQ(o.problem.code, "warehouse-rate-limited");
    CHECK(o.problem.retry_after_s > 0);
    tp_fb_outcome_clear(&o);
    faults("status=500x200@get");
    const char *v3[] = {"0", "f3"};
    o = run("slow", v3);
    CHECK_INT_EQ(o.state, TP_FB_FAILED);
    CHECK(o.problem.status == 502 || o.problem.status == 503);
    CHECK(o.problem.warehouse_statement_id != NULL); /* it was accepted before failing */
    tp_fb_outcome_clear(&o);
    faults(NULL);
    /* the client refuses the submission (a token with a line break): 502, nothing left running */
    const char *mv[] = {"1", "0"};
    tp_fb_waiter_t *mw = NULL;
    got_t mg = {0};
    CHECK_INT_EQ(start("mine", mv, "anna", "tok\nen", 5000, &mg, &o, &mw), TP_FB_FAILED);
    CHECK_INT_EQ(o.problem.status, 502);
    CHECK_STR_EQ(o.problem.code, "warehouse-error");
    CHECK_CONTAINS(o.problem.detail, "cannot send the statement");
    CHECK(mw == NULL && !mg.called);
    tp_fb_outcome_clear(&o);
    tp_fb_stats_t st;
    tp_fb_stats(FB, &st);
    CHECK_INT_EQ(st.in_flight, 0);
    CHECK_INT_EQ(st.cache_entries, 0); /* failures are never cached */
    fb_down();
    /* the warehouse is down */
    char down[64];
    snprintf(down, sizeof down, "http://127.0.0.1:%d", tp_test_free_port());
    fb_up((opts_t){.host = down});
    o = run("slow", v);
    CHECK_INT_EQ(o.problem.status, 503);
    CHECK_STR_EQ(o.problem.code, "warehouse-unavailable");
    tp_fb_outcome_clear(&o);
    fb_down();
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    tp_log_set_level(TP_LOG_ERROR);
    if (!start_emulator()) {
        tp_test_skip("test_fallback_core", "no harness Postgres or emulator");
        return tp_test_done();
    }
    CHECK(load_defs());
    TP_RUN(routing_rules);
    TP_RUN(result_shapes_and_cache);
    TP_RUN(cache_is_bounded_lru);
    TP_RUN(single_flight);
    TP_RUN(submission_waits_at_the_warehouse);
    TP_RUN(wait_budget_then_poll);
    TP_RUN(in_flight_limit);
    TP_RUN(abandoned_statement_is_cancelled);
    TP_RUN(detached_waiter_and_delete_cancel);
    TP_RUN(obo_isolation);
    TP_RUN(failures_map_to_problems);
    tp_defs_set_free(SET);
    tp_test_stop(EMU, 5000);
    return tp_test_done();
}
