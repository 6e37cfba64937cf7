/* Shared set-up for the tidepool-server integration tests (header-only: each
 * test file is its own program). Creates the schema with the real migration
 * runner, demo-like iot tables exposed with @expose, dataset definitions in a
 * temporary directory, a config pointing at the harness Postgres and a free
 * port, starts bin/tidepool-server and speaks HTTP to it with libcurl. */
#ifndef TP_SERVER_HARNESS_H
#define TP_SERVER_HARNESS_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <libpq-fe.h>

#include "tidepool/migrate.h"
#include "tidepool/pg.h"
#include "../tp_test.h"

typedef struct srv_h {
    pid_t pid;
    int port;
    char *log;
    char *conf;
    char qdir[512];
    const char *extra_conf; /* appended to the config file (e.g. an [auth] section) */
    const char *max_header_bytes; /* server.max_header_bytes; NULL = 4k */
    const char *timeout;          /* server.timeout; NULL = 10s */
} srv_h_t;

typedef struct resp {
    long status;
    char *body;
    size_t len;
    char *headers;
    json_t *json;
} resp_t;

static const char *HARNESS_SQL =
    "CREATE SCHEMA iot;"
    "CREATE TABLE iot.users(user_id int PRIMARY KEY, name text NOT NULL, weight double precision);"
    "INSERT INTO iot.users SELECT u, 'user ' || u, 60 + u FROM generate_series(1, 40) u;"
    "COMMENT ON TABLE iot.users IS 'demo users @expose';"
    "CREATE TABLE iot.user_daily_metrics(user_id int, day date, steps int, miles double precision,"
    " calories numeric(10,2), active boolean, note text, PRIMARY KEY (user_id, day));"
    "INSERT INTO iot.user_daily_metrics SELECT u, d::date, u * 100 + extract(doy FROM d)::int, 1.5,"
    " 100.25, u % 2 = 0, CASE WHEN u = 1 THEN 'a,\"b\"' END FROM generate_series(1, 40) u,"
    " generate_series('2025-01-01'::date, '2025-03-31', '1 day') d;"
    "COMMENT ON TABLE iot.user_daily_metrics IS '@expose max_limit=200';"
    "CREATE TABLE iot.hidden(x int);"
    "INSERT INTO tidepool.sync_state(job, generation, last_success_at)"
    " VALUES ('daily_metrics', 3, '2025-06-01 12:00:00+00'), ('users', 7, now());";

static void harness_def(srv_h_t *s, const char *name, const char *text)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", s->qdir, name);
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* Applies migrations and the demo tables to dsn; false on failure. */
static bool harness_db(const char *dsn)
{
    char err[512];
    PGconn *c = tp_pg_connect(dsn, 5000, err, sizeof err);
    if (!c) {
        fprintf(stderr, "# %s\n", err);
        return false;
    }
    char mdir[512];
    snprintf(mdir, sizeof mdir, "%s/sql/migrations", getenv("TP_ROOT") ? getenv("TP_ROOT") : ".");
    int applied = 0;
    bool ok = tp_migrate_apply(c, mdir, &applied, err, sizeof err);
    if (!ok)
        fprintf(stderr, "# migrate: %s\n", err);
    ok = ok && tp_pg_exec(c, HARNESS_SQL, 0, NULL, err, sizeof err);
    if (!ok)
        fprintf(stderr, "# setup: %s\n", err);
    PQfinish(c);
    return ok;
}

static void harness_write_defs(srv_h_t *s)
{
    snprintf(s->qdir, sizeof s->qdir, "%s/queries", tp_test_tmpdir());
    mkdir(s->qdir, 0755);
    harness_def(s, "daily_metrics.sql",
                "-- @param user_id INT\n"
                "-- @param since DATE = 2025-01-01\n"
                "-- @param until DATE = 2025-03-31\n"
                "-- @requires daily_metrics\n"
                "-- @cache 60s\n"
                "SELECT day, steps, miles, calories, active, note FROM iot.user_daily_metrics\n"
                "WHERE user_id = :user_id AND day BETWEEN :since AND :until ORDER BY day;\n");
    harness_def(s, "users.sql",
                "-- @param prefix STRING = user\n"
                "-- @requires users\n"
                "-- @cache 60s\n"
                "-- @roles reader\n"
                "SELECT user_id, name, weight FROM iot.users WHERE name LIKE :prefix || '%' ORDER BY user_id\n");
    harness_def(s, "slow.sql",
                "-- @param secs DOUBLE = 0.5\n"
                "SELECT pg_sleep(:secs)::text AS slept, 1 AS ok\n");
    harness_def(s, "types.sql",
                "-- @param flag BOOLEAN = true\n"
                "-- @param big BIGINT = 9007199254740993\n"
                "-- @param at TIMESTAMP = 2025-01-02T03:04:05Z\n"
                "SELECT :flag AS flag, :big AS big, 1.50::numeric AS num, 'NaN'::float8 AS nan,"
                " NULL::int AS nothing, '{\"a\":1}'::jsonb AS doc, :at AS at, ''::text AS empty,"
                " NULL::text AS absent\n");
    harness_def(s, "not_synced.sql", "SELECT * FROM iot.never_synced\n");
    harness_def(s, "sensor_readings.warehouse.sql",
                "-- @param user_id INT\n"
                "SELECT * FROM silver_sensors WHERE user_id = :user_id\n");
}

/* Starts the server against dsn; threads and extra env are optional. */
static bool harness_start(srv_h_t *s, const char *dsn, int threads)
{
    s->port = tp_test_free_port();
    char conf[2048];
    snprintf(conf, sizeof conf,
             "[postgres]\ndsn = %s\npool_size = 4\n"
             "[server]\nlisten = 127.0.0.1:%d\nthreads = %d\ndefinitions = %s\n"
             "max_body_bytes = 4k\nmax_header_bytes = %s\ntimeout = %s\n%s",
             dsn, s->port, threads, s->qdir, s->max_header_bytes ? s->max_header_bytes : "4k",
             s->timeout ? s->timeout : "10s", s->extra_conf ? s->extra_conf : "");
    free(s->conf);
    char name[64];
    snprintf(name, sizeof name, "server-%d.conf", s->port);
    s->conf = tp_test_write_tmp(name, conf);
    free(s->log);
    s->log = tp_xasprintf("%s/server-%d.log", tp_test_tmpdir(), s->port);
    char *argv[] = {(char *)tp_test_bin("tidepool-server"), "--config", s->conf, NULL};
    s->pid = tp_test_spawn(argv, s->log);
    return s->pid > 0 && tp_test_wait_port(s->port, 10000);
}

static resp_t get(srv_h_t *s, const char *path);
static void resp_free(resp_t *r);

/* GETs path every 100 ms until it answers want (at most tries times);
 * returns the last response (caller frees). */
static resp_t await_status(srv_h_t *s, const char *path, long want, int tries)
{
    resp_t r = {0};
    for (int i = 0; i < tries; i++) {
        resp_free(&r);
        r = get(s, path);
        if (r.status == want)
            break;
        usleep(100000);
    }
    return r;
}

/* Waits (up to 15 s) until /readyz answers 200: Postgres pool, migrations and
 * the LISTEN connection are all up. */
static bool harness_ready(srv_h_t *s)
{
    resp_t r = await_status(s, "/readyz", 200, 150);
    bool ok = r.status == 200;
    resp_free(&r);
    return ok;
}

static void resp_free(resp_t *r)
{
    free(r->body);
    free(r->headers);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
    tp_buf_append(arg, p, sz * n);
    return sz * n;
}

/* Sends one request. hdrs: NULL-terminated "Name: value" list or NULL. */
static resp_t http(srv_h_t *s, const char *method, const char *path, const char *const *hdrs,
                   const char *body, size_t blen)
{
    resp_t r = {0};
    CURL *c = curl_easy_init();
    char url[4096];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", s->port, path);
    tp_buf_t b = {0}, h = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "HEAD") == 0)
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &h);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 20L);
    struct curl_slist *sl = NULL;
    for (size_t i = 0; hdrs && hdrs[i]; i++)
        sl = curl_slist_append(sl, hdrs[i]);
    sl = curl_slist_append(sl, "Expect:");
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, sl);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)blen);
    }
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    curl_slist_free_all(sl);
    curl_easy_cleanup(c);
    r.len = b.len;
    r.body = b.data ? tp_buf_steal(&b) : tp_xstrdup("");
    r.headers = h.data ? tp_buf_steal(&h) : tp_xstrdup("");
    r.json = json_loadb(r.body, r.len, 0, NULL);
    return r;
}

static resp_t get(srv_h_t *s, const char *path)
{
    return http(s, "GET", path, NULL, NULL, 0);
}

/* Value of response header name (copied into a static buffer), or NULL. */
static const char *hdr(const resp_t *r, const char *name)
{
    static char out[512];
    size_t n = strlen(name);
    for (const char *p = r->headers; p && *p;) {
        const char *eol = strchr(p, '\n');
        if (strncasecmp(p, name, n) == 0 && p[n] == ':') {
            const char *v = p + n + 1;
            while (*v == ' ')
                v++;
            size_t len = eol ? (size_t)(eol - v) : strlen(v);
            while (len && (v[len - 1] == '\r' || v[len - 1] == ' '))
                len--;
            snprintf(out, sizeof out, "%.*s", (int)len, v);
            return out;
        }
        p = eol ? eol + 1 : NULL;
    }
    return NULL;
}

/* The value of an unlabelled /metrics sample named name, or -1. */
static inline long harness_metric(srv_h_t *s, const char *name)
{
    resp_t r = get(s, "/metrics");
    long v = -1;
    const char *p = r.body ? strstr(r.body, name) : NULL;
    while (p && p > r.body && p[-1] != '\n')
        p = strstr(p + 1, name);
    if (p)
        v = strtol(p + strlen(name) + 1, NULL, 10);
    resp_free(&r);
    return v;
}

/* The "field" of the first errors[] item of a problem, or NULL. */
static const char *problem_field(const resp_t *r)
{
    json_t *e = json_array_get(json_object_get(r->json, "errors"), 0);
    return json_string_value(json_object_get(e, "field"));
}

#define CHECK_PROBLEM(resp, st, field)                                                     \
    do {                                                                                   \
        CHECK_INT_EQ((resp).status, (st));                                                 \
        CHECK_STR_EQ(hdr(&(resp), "Content-Type"), "application/problem+json");            \
        CHECK_INT_EQ(json_integer_value(json_object_get((resp).json, "status")), (st));    \
        CHECK(json_string_value(json_object_get((resp).json, "code")) != NULL);            \
        CHECK(json_string_value(json_object_get((resp).json, "type")) != NULL);            \
        CHECK(json_string_value(json_object_get((resp).json, "title")) != NULL);           \
        CHECK(json_string_value(json_object_get((resp).json, "detail")) != NULL);          \
        if ((field) != NULL)                                                               \
            CHECK_STR_EQ(problem_field(&(resp)), (const char *)(field));                   \
    } while (0)

/* Database, definitions and a ready server for a test program; false (the
 * failure or skip already reported) when the program cannot go on. */
static bool harness_setup(srv_h_t *s, const char *prog, const char **dsn_out, int threads)
{
    const char *dsn = tp_test_dsn();
    *dsn_out = dsn;
    if (!dsn) {
        tp_test_skip(prog, "no harness Postgres");
        return false;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (!harness_db(dsn)) {
        tp_test_fail(__FILE__, __LINE__, "database set-up failed");
        return false;
    }
    harness_write_defs(s);
    if (!harness_start(s, dsn, threads) || !harness_ready(s)) {
        tp_test_fail(__FILE__, __LINE__, "server did not start; see %s", s->log);
        return false;
    }
    return true;
}

/* Stops the server if running, prints its log tail when a check failed. */
static void harness_finish(srv_h_t *s)
{
    if (s->pid > 0) {
        int st = tp_test_stop(s->pid, 15000);
        CHECK_MSG(st == 0, "server exit status %d", st);
    }
    if (tp_test_any_failure()) {
        char *log = tp_read_file(s->log, NULL);
        if (log) {
            size_t n = strlen(log);
            fprintf(stdout, "# server log tail:\n%s\n", n > 4000 ? log + n - 4000 : log);
        }
        free(log);
    }
    curl_global_cleanup();
    free(s->conf);
    free(s->log);
}

#endif
