/* Integration tests for bin/tidepool-warehouse: start it on free ports against
 * the harness Postgres, speak real HTTP to it (libcurl easy) and check the
 * answers field by field against databricks-protocol.md §1 and §2: state
 * paths, formats and dispositions, chunking, external links, bad requests,
 * PAT and OAuth auth, every injected fault, and a clean SIGTERM. */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../tp_test.h"
#include "tidepool/util.h"

#define PAT "pat-secret-token-1"
#define CLIENT_ID "sp-client"
#define CLIENT_SECRET "sp-secret-42"
#define AUTH "Authorization: Bearer " PAT

typedef struct emu {
    pid_t pid;
    int port;
    char base[64];
    char *log;
} emu_t;

static emu_t E1, E2; /* E1: chunked, long TTLs; E2: 1 s token and link TTLs, --faults */
static const char *cur_base;

typedef struct resp {
    long code;
    tp_buf_t body;
    tp_buf_t hdrs;
    json_t *json;
    CURLcode cc;
    double secs;
} resp_t;

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
    tp_buf_append(arg, p, sz * n);
    return sz * n;
}

static void resp_free(resp_t *r)
{
    tp_buf_free(&r->body);
    tp_buf_free(&r->hdrs);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

/* One HTTP exchange. path may be a full URL. hdr1/hdr2: extra header lines or NULL. */
static resp_t http(const char *method, const char *path, const char *hdr1, const char *hdr2,
                   const char *body)
{
    resp_t r;
    memset(&r, 0, sizeof r);
    char url[1024];
    if (strncmp(path, "http", 4) == 0)
        snprintf(url, sizeof url, "%s", path);
    else
        snprintf(url, sizeof url, "%s%s", cur_base, path);
    CURL *c = curl_easy_init();
    struct curl_slist *h = NULL;
    if (hdr1)
        h = curl_slist_append(h, hdr1);
    if (hdr2)
        h = curl_slist_append(h, hdr2);
    if (body && strncmp(body, "grant_type", 10) != 0 && strstr(body, "client_id=") == NULL)
        h = curl_slist_append(h, "Content-Type: application/json");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (body)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r.body);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &r.hdrs);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    int64_t t0 = tp_now_us();
    r.cc = curl_easy_perform(c);
    r.secs = (double)(tp_now_us() - t0) / 1e6;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.code);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    if (r.body.data)
        r.json = json_loadb(r.body.data, r.body.len, 0, NULL);
    return r;
}

/* "a.b.0.c" into nested objects and arrays; NULL if absent. */
static json_t *jget(json_t *j, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    char *save = NULL;
    for (char *k = strtok_r(buf, ".", &save); k && j; k = strtok_r(NULL, ".", &save)) {
        if (json_is_array(j))
            j = json_array_get(j, (size_t)atoi(k));
        else
            j = json_object_get(j, k);
    }
    return j;
}

static const char *jstr(json_t *j, const char *path)
{
    return json_string_value(jget(j, path));
}

static long long jint(json_t *j, const char *path)
{
    json_t *v = jget(j, path);
    return json_is_integer(v) ? (long long)json_integer_value(v) : -999;
}

static resp_t exec_sql(const char *extra_json)
{
    char *body = tp_xasprintf("{\"warehouse_id\":\"tidepool-local\",%s}", extra_json);
    resp_t r = http("POST", "/api/2.0/sql/statements", AUTH, NULL, body);
    free(body);
    return r;
}

static resp_t get_stmt(const char *id)
{
    char path[256];
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s", id);
    return http("GET", path, AUTH, NULL, NULL);
}

/* Polls GET until the state is terminal; returns the last response. */
static resp_t poll_done(const char *id)
{
    for (int i = 0; i < 300; i++) {
        resp_t r = get_stmt(id);
        const char *s = jstr(r.json, "status.state");
        if (s == NULL || (strcmp(s, "PENDING") != 0 && strcmp(s, "RUNNING") != 0))
            return r;
        resp_free(&r);
        usleep(20000);
    }
    return get_stmt(id);
}

static bool start_emu(emu_t *e, const char *const *extra)
{
    e->port = tp_test_free_port();
    snprintf(e->base, sizeof e->base, "http://127.0.0.1:%d", e->port);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", e->port);
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)tp_test_bin("tidepool-warehouse");
    argv[n++] = "--listen";
    argv[n++] = listen;
    argv[n++] = "--dsn";
    argv[n++] = (char *)tp_test_dsn();
    for (; extra && *extra && n < 30; extra++)
        argv[n++] = (char *)*extra;
    argv[n] = NULL;
    char name[32];
    snprintf(name, sizeof name, "emu-%d.log", e->port);
    e->log = tp_test_write_tmp(name, "");
    e->pid = tp_test_spawn(argv, e->log);
    return e->pid > 0 && tp_test_wait_port(e->port, 10000);
}

static int count_in_log(const char *log, const char *needle)
{
    char *text = tp_read_file(log, NULL);
    int n = 0;
    for (const char *p = text; p && (p = strstr(p, needle)) != NULL; p++)
        n++;
    free(text);
    return n;
}

/* ---------------------------------------------------------------- */

static void seed(void)
{
    char *r = tp_test_sql(
        tp_test_dsn(),
        "DROP SCHEMA IF EXISTS lake CASCADE; CREATE SCHEMA lake;"
        "CREATE TABLE lake.types (id int, s text, i2 smallint, i8 bigint, f4 real, f8 double "
        "precision, d numeric(10,2), dn numeric, b boolean, dt date, ts timestamptz, tsn "
        "timestamp, iv interval, by bytea, js jsonb, arr int[], sarr text[]);"
        "INSERT INTO lake.types VALUES (1, 'he said \"hi\", ok', 7, 9000000000, 1.5, 2.25, 12.34, "
        "1.5, true, '2021-01-01', '2021-01-01 10:00:00+00', '2021-06-15 12:34:56.789', "
        "'1 day 02:03:04', '\\x0102ff', '{\"a\": 1}', '{1,2,NULL}', '{\"a b\",c}'),"
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false, NULL, '2021-06-15 "
        "12:34:56.123456+00', NULL, NULL, NULL, NULL, NULL, NULL),"
        "(3, 'null', -1, -1, -0.5, 1e100, -0.01, 0, NULL, '1999-12-31', NULL, NULL, NULL, '', "
        "NULL, '{}', NULL);"
        "CREATE TABLE lake.big AS SELECT g AS id, repeat(md5(g::text), 4) AS pad "
        "FROM generate_series(1, 2500) g;"
        "CREATE TABLE lake.notes (id int primary key, note text);");
    CHECK(r != NULL);
    free(r);
    const char *a1[] = {"--token", PAT, "--client", CLIENT_ID ":" CLIENT_SECRET,
                        "--chunk-rows", "1000", "--chunk-bytes", "64k", NULL};
    CHECK(start_emu(&E1, a1));
    const char *a2[] = {"--client", CLIENT_ID ":" CLIENT_SECRET, "--token-ttl", "1",
                        "--link-ttl", "1", "--warehouse-id", "wh-a", "--warehouse-id",
                        "tidepool-local", "--faults", "status=503x1@get,retry_after=3",
                        "--result-ttl", "3", "--forget-ttl", "4", NULL};
    setenv("TIDEPOOL_WAREHOUSE_TOKENS", "other-pat," PAT, 1);
    CHECK(start_emu(&E2, a2));
    unsetenv("TIDEPOOL_WAREHOUSE_TOKENS");
    cur_base = E1.base;
}

static void sync_inline_json_field_by_field(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT `id`, s, i2, i8, f4, f8, d, dn, b, dt, ts, tsn, "
                        "iv, by, js, arr, sarr FROM main.lake.types ORDER BY id\","
                        "\"wait_timeout\":\"10s\"");
    CHECK_INT_EQ(r.code, 200);
    json_t *j = r.json;
    CHECK(j != NULL);
    CHECK(jstr(j, "statement_id") != NULL);
    CHECK_STR_EQ(jstr(j, "status.state"), "SUCCEEDED");
    CHECK(jget(j, "status.error") == NULL);
    CHECK(jget(j, "status.sql_state") == NULL);
    CHECK_STR_EQ(jstr(j, "manifest.format"), "JSON_ARRAY");
    CHECK_INT_EQ(jint(j, "manifest.schema.column_count"), 17);
    static const char *const expect[][3] = {
        {"id", "INT", "INT"},           {"s", "STRING", "STRING"},
        {"i2", "SMALLINT", "SHORT"},    {"i8", "BIGINT", "LONG"},
        {"f4", "FLOAT", "FLOAT"},       {"f8", "DOUBLE", "DOUBLE"},
        {"d", "DECIMAL(10,2)", "DECIMAL"}, {"dn", "DECIMAL(38,18)", "DECIMAL"},
        {"b", "BOOLEAN", "BOOLEAN"},    {"dt", "DATE", "DATE"},
        {"ts", "TIMESTAMP", "TIMESTAMP"}, {"tsn", "TIMESTAMP_NTZ", "TIMESTAMP_NTZ"},
        {"iv", "INTERVAL DAY TO SECOND", "INTERVAL"}, {"by", "BINARY", "BINARY"},
        {"js", "STRING", "STRING"},     {"arr", "ARRAY<INT>", "ARRAY"},
        {"sarr", "ARRAY<STRING>", "ARRAY"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(expect); i++) {
        char p[80];
        json_t *col = json_array_get(jget(j, "manifest.schema.columns"), i);
        CHECK_STR_EQ(jstr(col, "name"), expect[i][0]);
        CHECK_STR_EQ(jstr(col, "type_text"), expect[i][1]);
        CHECK_STR_EQ(jstr(col, "type_name"), expect[i][2]);
        CHECK_INT_EQ(jint(col, "position"), i);
        snprintf(p, sizeof p, "%s", expect[i][2]);
        if (strcmp(p, "DECIMAL") == 0) {
            CHECK(jint(col, "type_precision") > 0);
            CHECK(jget(col, "type_scale") != NULL);
        } else {
            CHECK(jget(col, "type_precision") == NULL);
        }
        if (strcmp(p, "INTERVAL") == 0)
            CHECK_STR_EQ(jstr(col, "type_interval_type"), "DAY TO SECOND");
        else
            CHECK(jget(col, "type_interval_type") == NULL);
    }
    CHECK_INT_EQ(jint(j, "manifest.schema.columns.6.type_precision"), 10);
    CHECK_INT_EQ(jint(j, "manifest.schema.columns.6.type_scale"), 2);
    CHECK_INT_EQ(jint(j, "manifest.total_chunk_count"), 1);
    CHECK_INT_EQ(jint(j, "manifest.chunks.0.chunk_index"), 0);
    CHECK_INT_EQ(jint(j, "manifest.chunks.0.row_offset"), 0);
    CHECK_INT_EQ(jint(j, "manifest.chunks.0.row_count"), 3);
    CHECK(jget(j, "manifest.chunks.0.byte_count") == NULL);
    CHECK_INT_EQ(jint(j, "manifest.total_row_count"), 3);
    CHECK(jget(j, "manifest.total_byte_count") == NULL);
    CHECK(json_is_false(jget(j, "manifest.truncated")));
    CHECK_INT_EQ(jint(j, "result.chunk_index"), 0);
    CHECK_INT_EQ(jint(j, "result.row_offset"), 0);
    CHECK_INT_EQ(jint(j, "result.row_count"), 3);
    CHECK(jget(j, "result.byte_count") == NULL);
    CHECK(jget(j, "result.external_links") == NULL);
    CHECK(jget(j, "result.next_chunk_index") == NULL);
    CHECK(jget(j, "result.next_chunk_internal_link") == NULL);
    static const char *const row0[] = {
        "1", "he said \"hi\", ok", "7", "9000000000", "1.5", "2.25", "12.34", "1.5", "true",
        "2021-01-01", "2021-01-01T10:00:00.000Z", "2021-06-15T12:34:56.789", "1 day 02:03:04",
        "0102ff", "{\"a\": 1}", "[1,2,null]", "[\"a b\",\"c\"]"};
    for (size_t i = 0; i < TP_ARRAY_LEN(row0); i++) {
        char p[64];
        snprintf(p, sizeof p, "result.data_array.0.%zu", i);
        CHECK_STR_EQ(jstr(j, p), row0[i]);
    }
    json_t *row1 = jget(j, "result.data_array.1");
    CHECK_STR_EQ(jstr(row1, "8"), "false");
    CHECK_STR_EQ(jstr(row1, "10"), "2021-06-15T12:34:56.123456Z");
    CHECK(json_is_null(jget(row1, "1")) && json_is_null(jget(row1, "2")) &&
          json_is_null(jget(row1, "16")));
    CHECK_STR_EQ(jstr(j, "result.data_array.2.1"), "null"); /* the text, not NULL */
    CHECK_STR_EQ(jstr(j, "result.data_array.2.13"), "");
    CHECK(json_is_null(jget(j, "result.data_array.2.8")));
    CHECK_STR_EQ(jstr(j, "result.data_array.2.15"), "[]");
    resp_free(&r);
}

/* Postgres' geometric types come back as Databricks' GEOMETRY (SRID 0). */
static void geometric_types_are_geometry(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT point(1, 2) AS p, box(point(0, 0), point(1, 1)) AS b,"
                        " ARRAY[point(1, 2)] AS pa\"");
    CHECK_INT_EQ(r.code, 200);
    static const char *const expect[][2] = {
        {"GEOMETRY(0)", "GEOMETRY"}, {"GEOMETRY(0)", "GEOMETRY"}, {"STRING", "STRING"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(expect); i++) {
        json_t *col = json_array_get(jget(r.json, "manifest.schema.columns"), i);
        CHECK_STR_EQ(jstr(col, "type_text"), expect[i][0]);
        CHECK_STR_EQ(jstr(col, "type_name"), expect[i][1]);
    }
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.0"), "(1,2)");
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.1"), "(1,1),(0,0)");
    resp_free(&r);
}

static void parameters_of_every_type(void)
{
    resp_t r = exec_sql(
        "\"statement\":\"SELECT :s AS s, :i AS i, :bi AS bi, :si AS si, :ti AS ti, :db AS db, "
        ":fl AS fl, :de AS de, :bo AS bo, :da AS da, :ts AS ts, :tn AS tn, :bn AS bn, :nu AS nu, "
        "':s in a literal' AS lit, 5::text AS cast /* :s in a comment */, :s = :s AS twice -- :x\","
        "\"parameters\":[{\"name\":\"s\",\"value\":\"it's\"},{\"name\":\"i\",\"value\":\"42\","
        "\"type\":\"INT\"},{\"name\":\"bi\",\"value\":\"9000000000\",\"type\":\"BIGINT\"},"
        "{\"name\":\"si\",\"value\":\"7\",\"type\":\"SMALLINT\"},{\"name\":\"ti\",\"value\":\"3\","
        "\"type\":\"TINYINT\"},{\"name\":\"db\",\"value\":\"2.5\",\"type\":\"DOUBLE\"},"
        "{\"name\":\"fl\",\"value\":\"0.5\",\"type\":\"FLOAT\"},{\"name\":\"de\",\"value\":"
        "\"12.345\",\"type\":\"DECIMAL(10,2)\"},{\"name\":\"bo\",\"value\":\"true\",\"type\":"
        "\"BOOLEAN\"},{\"name\":\"da\",\"value\":\"2020-02-29\",\"type\":\"DATE\"},{\"name\":"
        "\"ts\",\"value\":\"2020-01-01T10:00:00Z\",\"type\":\"TIMESTAMP\"},{\"name\":\"tn\","
        "\"value\":\"2020-01-01 10:00:00\",\"type\":\"TIMESTAMP_NTZ\"},{\"name\":\"bn\","
        "\"value\":\"ab\",\"type\":\"BINARY\"},{\"name\":\"nu\",\"value\":null,\"type\":\"INT\"},"
        "{\"name\":\"unused\",\"value\":\"1\"}]");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    static const char *const want[][3] = {
        {"it's", "STRING", "STRING"}, {"42", "INT", "INT"}, {"9000000000", "BIGINT", "LONG"},
        {"7", "SMALLINT", "SHORT"}, {"3", "SMALLINT", "SHORT"}, {"2.5", "DOUBLE", "DOUBLE"},
        {"0.5", "FLOAT", "FLOAT"}, {"12.35", "DECIMAL(10,2)", "DECIMAL"},
        {"true", "BOOLEAN", "BOOLEAN"}, {"2020-02-29", "DATE", "DATE"},
        {"2020-01-01T10:00:00.000Z", "TIMESTAMP", "TIMESTAMP"},
        {"2020-01-01T10:00:00.000", "TIMESTAMP_NTZ", "TIMESTAMP_NTZ"},
        {"6162", "BINARY", "BINARY"}, {NULL, "INT", "INT"},
        {":s in a literal", "STRING", "STRING"}, {"5", "STRING", "STRING"},
        {"true", "BOOLEAN", "BOOLEAN"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(want); i++) {
        char p[80];
        snprintf(p, sizeof p, "result.data_array.0.%zu", i);
        if (want[i][0])
            CHECK_STR_EQ(jstr(r.json, p), want[i][0]);
        else
            CHECK(json_is_null(jget(r.json, p)));
        snprintf(p, sizeof p, "manifest.schema.columns.%zu.type_text", i);
        CHECK_STR_EQ(jstr(r.json, p), want[i][1]);
        snprintf(p, sizeof p, "manifest.schema.columns.%zu.type_name", i);
        CHECK_STR_EQ(jstr(r.json, p), want[i][2]);
    }
    resp_free(&r);
    /* a marker with no parameter fails the statement like Databricks does */
    r = exec_sql("\"statement\":\"SELECT :missing\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_STR_EQ(jstr(r.json, "status.sql_state"), "42P02");
    CHECK_CONTAINS(jstr(r.json, "status.error.message"), "UNBOUND_SQL_PARAMETER");
    resp_free(&r);
    /* the schema field sets the search path; catalog is accepted */
    r = exec_sql("\"statement\":\"SELECT count(*) FROM types\",\"catalog\":\"main\","
                 "\"schema\":\"lake\"");
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.0"), "3");
    CHECK_STR_EQ(jstr(r.json, "manifest.schema.columns.0.type_name"), "LONG");
    resp_free(&r);
}

static void check_only_id_and_status(json_t *j)
{
    CHECK(jstr(j, "statement_id") != NULL);
    CHECK(jget(j, "manifest") == NULL);
    CHECK(jget(j, "result") == NULL);
    CHECK(jget(j, "status.error") == NULL);
    CHECK_INT_EQ(json_object_size(j), 2);
}

static void async_then_poll(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT 42 AS x FROM pg_sleep(0.3)\","
                        "\"wait_timeout\":\"0s\"");
    CHECK_INT_EQ(r.code, 200);
    const char *s = jstr(r.json, "status.state");
    CHECK(s && (strcmp(s, "PENDING") == 0 || strcmp(s, "RUNNING") == 0));
    check_only_id_and_status(r.json);
    char id[64];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);
    r = get_stmt(id);
    s = jstr(r.json, "status.state");
    CHECK(s && (strcmp(s, "PENDING") == 0 || strcmp(s, "RUNNING") == 0));
    resp_free(&r);
    r = poll_done(id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_STR_EQ(jstr(r.json, "statement_id"), id);
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.0"), "42");
    resp_free(&r);
}

static int backends_sleeping(void)
{
    char *n = tp_test_sql(tp_test_dsn(), "SELECT count(*) FROM pg_stat_activity WHERE query "
                                         "LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid() "
                                         "AND datname = current_database() AND state = 'active'");
    int v = n ? atoi(n) : -1;
    free(n);
    return v;
}

static bool wait_no_sleepers(void)
{
    for (int i = 0; i < 100; i++) {
        if (backends_sleeping() == 0)
            return true;
        usleep(50000);
    }
    return false;
}

/* Starts SELECT pg_sleep(30) asynchronously on the current emulator and waits
 * until Postgres runs it; writes the statement id into id. */
static void start_sleeper(char *id, size_t idlen)
{
    resp_t r = exec_sql("\"statement\":\"SELECT pg_sleep(30)\",\"wait_timeout\":\"0s\"");
    snprintf(id, idlen, "%s", jstr(r.json, "statement_id") ? jstr(r.json, "statement_id") : "");
    resp_free(&r);
    for (int i = 0; i < 100 && backends_sleeping() == 0; i++)
        usleep(20000);
    int n = backends_sleeping();
    CHECK_INT_EQ(n, 1);
    if (n != 1) {
        char *q = tp_test_sql(tp_test_dsn(), "SELECT string_agg(pid || ':' || state || ':' || "
                                             "query, ' | ') FROM pg_stat_activity WHERE datname "
                                             "= current_database() AND pid <> pg_backend_pid()");
        fprintf(stderr, "#   backends: %s\n", q ? q : "?");
        free(q);
    }
}

static void wait_timeout_continue_then_cancel(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT pg_sleep(30)\",\"wait_timeout\":\"5s\","
                        "\"on_wait_timeout\":\"CONTINUE\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK(r.secs >= 4.9 && r.secs < 8);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "RUNNING");
    check_only_id_and_status(r.json);
    char id[64], path[200];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);
    CHECK_INT_EQ(backends_sleeping(), 1);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/cancel", id);
    r = http("POST", path, AUTH, NULL, "{}");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(r.body.data, "{}");
    resp_free(&r);
    r = get_stmt(id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "CANCELED");
    CHECK(jget(r.json, "manifest") == NULL);
    resp_free(&r);
    CHECK(wait_no_sleepers()); /* PQcancel reached Postgres */
    /* cancelling again, or cancelling a finished statement, is a harmless receipt */
    r = http("POST", path, AUTH, NULL, "{}");
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
}

static void wait_timeout_cancel(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT pg_sleep(30)\",\"wait_timeout\":\"5s\","
                        "\"on_wait_timeout\":\"CANCEL\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK(r.secs >= 4.9 && r.secs < 8);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "CANCELED");
    CHECK(jget(r.json, "manifest") == NULL);
    resp_free(&r);
    CHECK(wait_no_sleepers());
}

static void explicit_cancel_async(void)
{
    char id[64], path[200];
    start_sleeper(id, sizeof id);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/cancel/", id); /* trailing slash */
    resp_t r = http("POST", path, AUTH, NULL, "{}");
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
    r = poll_done(id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "CANCELED");
    resp_free(&r);
    CHECK(wait_no_sleepers());
}

static void failed_statements(void)
{
    resp_t r = exec_sql("\"statement\":\"SELEC 1\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_STR_EQ(jstr(r.json, "status.error.error_code"), "BAD_REQUEST");
    CHECK_CONTAINS(jstr(r.json, "status.error.message"), "PARSE_SYNTAX_ERROR");
    CHECK_CONTAINS(jstr(r.json, "status.error.message"), "SQLSTATE: 42601");
    CHECK_STR_EQ(jstr(r.json, "status.sql_state"), "42601");
    CHECK(jget(r.json, "manifest") == NULL && jget(r.json, "result") == NULL);
    resp_free(&r);
    r = exec_sql("\"statement\":\"SELECT * FROM main.nope.missing\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_STR_EQ(jstr(r.json, "status.sql_state"), "42P01");
    CHECK_CONTAINS(jstr(r.json, "status.error.message"), "TABLE_OR_VIEW_NOT_FOUND");
    resp_free(&r);
    r = exec_sql("\"statement\":\"SELECT 1/0\",\"wait_timeout\":\"0s\"");
    char id[64];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);
    r = poll_done(id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_STR_EQ(jstr(r.json, "status.sql_state"), "22012");
    resp_free(&r);
}

static void close_and_unknown(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT 1\"");
    char id[64], path[200];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s", id);
    r = http("DELETE", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(r.body.data, "{}");
    resp_free(&r);
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "CLOSED");
    check_only_id_and_status(r.json);
    resp_free(&r);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/0", id);
    r = http("GET", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 400);
    CHECK_STR_EQ(jstr(r.json, "error_code"), "INVALID_STATE");
    resp_free(&r);
    const char *unknown[][2] = {{"GET", "/api/2.0/sql/statements/01f00000-0000-0000-0000-000000000000"},
                                {"POST", "/api/2.0/sql/statements/nope/cancel"},
                                {"DELETE", "/api/2.0/sql/statements/nope"},
                                {"GET", "/api/2.0/sql/statements/nope/result/chunks/0"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(unknown); i++) {
        r = http(unknown[i][0], unknown[i][1], AUTH, NULL, NULL);
        CHECK_INT_EQ(r.code, 404);
        CHECK_STR_EQ(jstr(r.json, "error_code"), "RESOURCE_DOES_NOT_EXIST");
        CHECK(jstr(r.json, "message") != NULL);
        resp_free(&r);
    }
    r = http("GET", "/api/2.0/sql/nothing", AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 404);
    CHECK_STR_EQ(jstr(r.json, "error_code"), "ENDPOINT_NOT_FOUND");
    resp_free(&r);
}

static void dml_and_ddl(void)
{
    resp_t r = exec_sql("\"statement\":\"INSERT INTO main.lake.notes VALUES (1, 'a'), (2, 'b')\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_STR_EQ(jstr(r.json, "manifest.schema.columns.0.name"), "num_affected_rows");
    CHECK_STR_EQ(jstr(r.json, "manifest.schema.columns.0.type_text"), "BIGINT");
    CHECK_STR_EQ(jstr(r.json, "manifest.schema.columns.0.type_name"), "LONG");
    CHECK_STR_EQ(jstr(r.json, "manifest.schema.columns.1.name"), "num_inserted_rows");
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.0"), "2");
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.1"), "2");
    resp_free(&r);
    /* a row limit on a writing statement truncates the answer, not the write */
    r = exec_sql("\"statement\":\"INSERT INTO lake.notes SELECT g, 'n' FROM generate_series(10, "
                 "19) g RETURNING id\",\"row_limit\":1");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_INT_EQ(jint(r.json, "manifest.total_row_count"), 1);
    CHECK(json_is_true(jget(r.json, "manifest.truncated")));
    resp_free(&r);
    char *n = tp_test_sql(tp_test_dsn(), "SELECT count(*) FROM lake.notes WHERE id >= 10");
    CHECK_STR_EQ(n, "10");
    free(n);
    /* INLINE results above 25 MiB fail, as the service's do */
    r = exec_sql("\"statement\":\"SELECT repeat('x', 1000) FROM generate_series(1, 30000)\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_CONTAINS(jstr(r.json, "status.error.message"), "EXTERNAL_LINKS");
    resp_free(&r);
    r = exec_sql("\"statement\":\"CREATE TABLE lake.ddl_t (x int)\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_INT_EQ(jint(r.json, "manifest.schema.column_count"), 0);
    CHECK(jget(r.json, "manifest.schema.columns") == NULL);
    CHECK_INT_EQ(jint(r.json, "manifest.total_chunk_count"), 0);
    CHECK_INT_EQ(jint(r.json, "manifest.total_row_count"), 0);
    CHECK(json_is_object(jget(r.json, "result")) && json_object_size(jget(r.json, "result")) == 0);
    resp_free(&r);
}

static void bad_requests(void)
{
    static const struct {
        const char *body;
        int code;
        const char *error_code;
        const char *msg;
    } cases[] = {
        {"{not json", 400, "MALFORMED_REQUEST", "Invalid JSON"},
        {"[1]", 400, "MALFORMED_REQUEST", "object"},
        {"{\"statement\":\"SELECT 1\"}", 400, "INVALID_PARAMETER_VALUE", "warehouse_id"},
        {"{\"warehouse_id\":\"tidepool-local\"}", 400, "INVALID_PARAMETER_VALUE", "statement"},
        {"{\"warehouse_id\":\"nope\",\"statement\":\"SELECT 1\"}", 404,
         "RESOURCE_DOES_NOT_EXIST", "nope"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"wait_timeout\":\"60s\"}",
         400, "INVALID_PARAMETER_VALUE", "wait_timeout"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"wait_timeout\":\"3s\"}",
         400, "INVALID_PARAMETER_VALUE", "wait_timeout"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"wait_timeout\":\"10\"}",
         400, "INVALID_PARAMETER_VALUE", "wait_timeout"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"on_wait_timeout\":"
         "\"STOP\"}", 400, "INVALID_PARAMETER_VALUE", "on_wait_timeout"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"disposition\":\"X\"}",
         400, "INVALID_PARAMETER_VALUE", "disposition"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"format\":\"XML\"}",
         400, "INVALID_PARAMETER_VALUE", "format"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"format\":\"CSV\"}",
         400, "INVALID_PARAMETER_VALUE", "INLINE"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"format\":\"CSV\","
         "\"disposition\":\"INLINE\"}", 400, "INVALID_PARAMETER_VALUE", "INLINE"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"format\":"
         "\"ARROW_STREAM\"}", 400, "INVALID_PARAMETER_VALUE", "INLINE"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"format\":"
         "\"ARROW_STREAM\",\"disposition\":\"EXTERNAL_LINKS\"}", 400, "INVALID_PARAMETER_VALUE",
         "not supported by this emulator"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT :a\",\"parameters\":"
         "[{\"name\":\"a\",\"value\":\"1\",\"type\":\"ARRAY<INT>\"}]}", 400,
         "INVALID_PARAMETER_VALUE", "unsupported type"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT :a\",\"parameters\":"
         "[{\"name\":\"a\",\"value\":1,\"type\":\"INT\"}]}", 400, "INVALID_PARAMETER_VALUE",
         "string or null"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT :a\",\"parameters\":"
         "{\"a\":\"1\"}}", 400, "INVALID_PARAMETER_VALUE", "array"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT :a\",\"parameters\":"
         "[{\"value\":\"1\"}]}", 400, "INVALID_PARAMETER_VALUE", "name"},
        {"{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\",\"row_limit\":-1}", 400,
         "INVALID_PARAMETER_VALUE", "row_limit"},
        {"{\"warehouse_id\":7,\"statement\":\"SELECT 1\"}", 400, "INVALID_PARAMETER_VALUE",
         "warehouse_id"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        resp_t r = http("POST", "/api/2.0/sql/statements/", AUTH, NULL, cases[i].body);
        CHECK_MSG(r.code == cases[i].code, "case %zu: HTTP %ld", i, r.code);
        CHECK_STR_EQ(jstr(r.json, "error_code"), cases[i].error_code);
        CHECK_CONTAINS(jstr(r.json, "message"), cases[i].msg);
        CHECK(jget(r.json, "statement_id") == NULL);
        resp_free(&r);
    }
}

/* Follows every chunk of statement j (INLINE) and checks ids 1..n in order. */
static void follow_inline_chunks(json_t *j, int64_t n, int64_t per_chunk)
{
    int64_t seen = 0, expect_next = 1;
    json_t *res = json_incref(jget(j, "result"));
    int idx = 0;
    while (res) {
        CHECK_INT_EQ(jint(res, "chunk_index"), idx);
        CHECK_INT_EQ(jint(res, "row_offset"), seen);
        json_t *rows = jget(res, "data_array");
        CHECK_INT_EQ(json_array_size(rows), jint(res, "row_count"));
        if (per_chunk > 0 && jget(res, "next_chunk_index"))
            CHECK_INT_EQ(jint(res, "row_count"), per_chunk);
        for (size_t i = 0; i < json_array_size(rows); i++) {
            const char *v = json_string_value(json_array_get(json_array_get(rows, i), 0));
            CHECK_MSG(v && atoll(v) == expect_next, "row %lld", (long long)expect_next);
            expect_next++;
        }
        seen += (int64_t)json_array_size(rows);
        const char *next = jstr(res, "next_chunk_internal_link");
        if (next == NULL) {
            CHECK(jget(res, "next_chunk_index") == NULL);
            json_decref(res);
            break;
        }
        CHECK_INT_EQ(jint(res, "next_chunk_index"), idx + 1);
        resp_t r = http("GET", next, AUTH, NULL, NULL);
        CHECK_INT_EQ(r.code, 200);
        CHECK(jget(r.json, "manifest") == NULL);
        json_decref(res);
        res = json_incref(r.json);
        resp_free(&r);
        idx++;
        if (idx > 1000)
            break;
    }
    CHECK_INT_EQ(seen, n);
    CHECK_INT_EQ(jint(j, "manifest.total_row_count"), n);
    CHECK_INT_EQ(jint(j, "manifest.total_chunk_count"), idx + 1);
}

static void chunking_by_rows_and_bytes(void)
{
    /* rows: 2500 short rows, --chunk-rows 1000 -> 1000, 1000, 500 */
    resp_t r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_INT_EQ(jint(r.json, "manifest.total_chunk_count"), 3);
    CHECK_INT_EQ(jint(r.json, "manifest.chunks.2.row_offset"), 2000);
    CHECK_INT_EQ(jint(r.json, "manifest.chunks.2.row_count"), 500);
    CHECK_INT_EQ(jint(r.json, "result.next_chunk_index"), 1);
    char want[200];
    snprintf(want, sizeof want, "/api/2.0/sql/statements/%s/result/chunks/1",
             jstr(r.json, "statement_id"));
    CHECK_STR_EQ(jstr(r.json, "result.next_chunk_internal_link"), want);
    follow_inline_chunks(r.json, 2500, 1000);
    /* chunks may be fetched in any order; out of range is rejected */
    char path[200];
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/2",
             jstr(r.json, "statement_id"));
    resp_t c = http("GET", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(jint(c.json, "row_count"), 500);
    CHECK(jget(c.json, "next_chunk_index") == NULL);
    resp_free(&c);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/3",
             jstr(r.json, "statement_id"));
    c = http("GET", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(c.code, 400);
    CHECK_STR_EQ(jstr(c.json, "error_code"), "INVALID_PARAMETER_VALUE");
    resp_free(&c);
    resp_free(&r);
    /* bytes: ~80-byte rows, 64 KiB chunks -> more chunks than rows alone would make */
    r = exec_sql("\"statement\":\"SELECT id, pad FROM main.lake.big ORDER BY id\"");
    long long nchunks = jint(r.json, "manifest.total_chunk_count");
    CHECK(nchunks >= 4);
    follow_inline_chunks(r.json, 2500, 0);
    resp_free(&r);
    /* row_limit and byte_limit truncate */
    r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\",\"row_limit\":10");
    CHECK_INT_EQ(jint(r.json, "manifest.total_row_count"), 10);
    CHECK(json_is_true(jget(r.json, "manifest.truncated")));
    resp_free(&r);
    r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\",\"row_limit\":2500");
    CHECK_INT_EQ(jint(r.json, "manifest.total_row_count"), 2500);
    CHECK(json_is_false(jget(r.json, "manifest.truncated")));
    resp_free(&r);
    r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\",\"byte_limit\":100,"
                 "\"disposition\":\"EXTERNAL_LINKS\"");
    CHECK(jint(r.json, "manifest.total_row_count") > 0);
    CHECK(jint(r.json, "manifest.total_row_count") < 30);
    CHECK(jint(r.json, "manifest.total_byte_count") <= 100);
    CHECK(json_is_true(jget(r.json, "manifest.truncated")));
    resp_free(&r);
}

static resp_t download(json_t *link, bool with_key, const char *auth)
{
    char hdr[128];
    snprintf(hdr, sizeof hdr, "x-tp-link-key: %s", with_key ? jstr(link, "http_headers.x-tp-link-key") : "wrong");
    return http("GET", jstr(link, "external_link"), auth, hdr, NULL);
}

/* Downloads every chunk of an EXTERNAL_LINKS statement into out; returns chunk count. */
static int fetch_all_links(json_t *j, tp_buf_t *out)
{
    json_t *res = json_incref(jget(j, "result"));
    int n = 0;
    int64_t total_bytes = 0;
    while (res) {
        json_t *link = jget(res, "external_links.0");
        CHECK(link != NULL);
        if (link == NULL)
            break;
        CHECK_INT_EQ(jint(link, "chunk_index"), n);
        CHECK_STR_EQ(jstr(link, "external_link") ? "ok" : NULL, "ok");
        CHECK_INT_EQ(json_object_size(jget(link, "http_headers")), 1);
        resp_t d = download(link, true, NULL);
        CHECK_INT_EQ(d.code, 200);
        CHECK_INT_EQ((long long)d.body.len, jint(link, "byte_count"));
        total_bytes += (int64_t)d.body.len;
        tp_buf_append(out, d.body.data, d.body.len);
        resp_free(&d);
        n++;
        const char *next = jstr(link, "next_chunk_internal_link");
        if (next == NULL) {
            CHECK(jget(link, "next_chunk_index") == NULL);
            json_decref(res);
            break;
        }
        CHECK_INT_EQ(jint(link, "next_chunk_index"), n);
        resp_t r = http("GET", next, AUTH, NULL, NULL);
        json_decref(res);
        res = json_incref(r.json);
        resp_free(&r);
    }
    CHECK_INT_EQ(total_bytes, jint(j, "manifest.total_byte_count"));
    return n;
}

static void external_links_json_and_csv(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT id, pad FROM main.lake.big ORDER BY id\","
                        "\"disposition\":\"EXTERNAL_LINKS\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    CHECK_STR_EQ(jstr(r.json, "manifest.format"), "JSON_ARRAY");
    CHECK(jint(r.json, "manifest.total_byte_count") > 0);
    CHECK(jint(r.json, "manifest.chunks.0.byte_count") > 0);
    CHECK(jint(r.json, "result.byte_count") > 0);
    CHECK(jget(r.json, "result.data_array") == NULL);
    json_t *l0 = jget(r.json, "result.external_links.0");
    CHECK_CONTAINS(jstr(l0, "external_link"), E1.base);
    CHECK(strstr(jstr(l0, "external_link"), "/api/") == NULL);
    const char *exp = jstr(l0, "expiration");
    CHECK(exp && strlen(exp) == 24 && exp[10] == 'T' && exp[23] == 'Z');
    CHECK_INT_EQ(jint(l0, "row_offset"), 0);
    CHECK(jint(l0, "row_count") > 0);
    tp_buf_t all;
    tp_buf_init(&all);
    int n = fetch_all_links(r.json, &all);
    CHECK_INT_EQ(n, jint(r.json, "manifest.total_chunk_count"));
    /* each link body is a compact JSON array of arrays */
    resp_t d = download(l0, true, NULL);
    json_t *arr = json_loadb(d.body.data, d.body.len, 0, NULL);
    CHECK(json_is_array(arr));
    CHECK_INT_EQ(json_array_size(arr), jint(l0, "row_count"));
    CHECK_STR_EQ(json_string_value(json_array_get(json_array_get(arr, 0), 0)), "1");
    CHECK(strchr(d.body.data, ' ') == NULL && strchr(d.body.data, '\n') == NULL);
    json_decref(arr);
    resp_free(&d);
    tp_buf_free(&all);
    resp_free(&r);

    r = exec_sql("\"statement\":\"SELECT id, s, b FROM main.lake.types ORDER BY id\","
                 "\"disposition\":\"EXTERNAL_LINKS\",\"format\":\"CSV\"");
    CHECK_STR_EQ(jstr(r.json, "manifest.format"), "CSV");
    tp_buf_init(&all);
    fetch_all_links(r.json, &all);
    CHECK_STR_EQ(all.data, "id,s,b\n1,\"he said \"\"hi\"\", ok\",true\n2,null,false\n3,\"null\",null\n");
    tp_buf_free(&all);
    resp_free(&r);

    /* CSV over several chunks: only the first has the header */
    r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\","
                 "\"disposition\":\"EXTERNAL_LINKS\",\"format\":\"CSV\"");
    tp_buf_init(&all);
    n = fetch_all_links(r.json, &all);
    CHECK_INT_EQ(n, 3);
    int lines = 0, headers = 0;
    for (char *p = all.data; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        lines++;
        if (strncmp(p, "id\n", 3) == 0)
            headers++;
    }
    CHECK_INT_EQ(lines, 2501);
    CHECK_INT_EQ(headers, 1);
    CHECK(strncmp(all.data, "id\n1\n2\n", 7) == 0);
    tp_buf_free(&all);
    resp_free(&r);
}

static void link_download_rules(void)
{
    resp_t r = exec_sql("\"statement\":\"SELECT 1 AS x\",\"disposition\":\"EXTERNAL_LINKS\"");
    json_t *l = jget(r.json, "result.external_links.0");
    resp_t d = download(l, true, AUTH);
    CHECK_INT_EQ(d.code, 400);
    CHECK_CONTAINS(d.body.data, "<Error>");
    resp_free(&d);
    d = download(l, false, NULL);
    CHECK_INT_EQ(d.code, 403);
    CHECK_CONTAINS(d.body.data, "AccessDenied");
    resp_free(&d);
    d = http("GET", jstr(l, "external_link"), NULL, NULL, NULL);
    CHECK_INT_EQ(d.code, 403);
    resp_free(&d);
    d = download(l, true, NULL);
    CHECK_INT_EQ(d.code, 200);
    CHECK_STR_EQ(d.body.data, "[[\"1\"]]");
    resp_free(&d);
    resp_free(&r);

    /* expiry on E2 (--link-ttl 1): re-requesting the chunk gives a fresh link */
    cur_base = E2.base;
    r = exec_sql("\"statement\":\"SELECT 2 AS x\",\"disposition\":\"EXTERNAL_LINKS\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    l = jget(r.json, "result.external_links.0");
    usleep(1200000);
    d = download(l, true, NULL);
    CHECK_INT_EQ(d.code, 403);
    CHECK_CONTAINS(d.body.data, "expired");
    resp_free(&d);
    char path[200];
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/0",
             jstr(r.json, "statement_id"));
    resp_t c = http("GET", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(c.code, 200);
    d = download(jget(c.json, "external_links.0"), true, NULL);
    CHECK_INT_EQ(d.code, 200);
    CHECK_STR_EQ(d.body.data, "[[\"2\"]]");
    resp_free(&d);
    resp_free(&c);
    resp_free(&r);
    cur_base = E1.base;
}

static void auth_pat_and_oauth(void)
{
    const char *body = "{\"warehouse_id\":\"tidepool-local\",\"statement\":\"SELECT 1\"}";
    resp_t r = http("POST", "/api/2.0/sql/statements", NULL, NULL, body);
    CHECK_INT_EQ(r.code, 401);
    CHECK_STR_EQ(r.body.data, "{\"error_code\":401,\"message\":\"Credential was not sent or was "
                              "of an unsupported type for this API.\"}");
    resp_free(&r);
    r = http("POST", "/api/2.0/sql/statements", "Authorization: Basic Zm9vOmJhcg==", NULL, body);
    CHECK_INT_EQ(r.code, 401);
    resp_free(&r);
    r = http("POST", "/api/2.0/sql/statements", "Authorization: Bearer wrong", NULL, body);
    CHECK_INT_EQ(r.code, 403);
    CHECK_STR_EQ(r.body.data, "{\"error_code\":403,\"message\":\"Invalid access token.\"}");
    resp_free(&r);
    r = http("GET", "/api/2.0/sql/statements/x", NULL, NULL, NULL);
    CHECK_INT_EQ(r.code, 401);
    resp_free(&r);

    /* discovery */
    r = http("GET", "/oidc/.well-known/oauth-authorization-server", NULL, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    char want[128];
    snprintf(want, sizeof want, "%s/oidc/v1/token", E1.base);
    CHECK_STR_EQ(jstr(r.json, "token_endpoint"), want);
    CHECK_STR_EQ(jstr(r.json, "grant_types_supported.0"), "client_credentials");
    resp_free(&r);

    /* Basic credentials (client_secret_basic) */
    char *basic = NULL;
    {
        static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const char *in = CLIENT_ID ":" CLIENT_SECRET;
        size_t n = strlen(in);
        tp_buf_t b;
        tp_buf_init(&b);
        tp_buf_puts(&b, "Authorization: Basic ");
        for (size_t i = 0; i < n; i += 3) {
            unsigned v = (unsigned char)in[i] << 16;
            if (i + 1 < n) v |= (unsigned char)in[i + 1] << 8;
            if (i + 2 < n) v |= (unsigned char)in[i + 2];
            tp_buf_putc(&b, b64[(v >> 18) & 63]);
            tp_buf_putc(&b, b64[(v >> 12) & 63]);
            tp_buf_putc(&b, i + 1 < n ? b64[(v >> 6) & 63] : '=');
            tp_buf_putc(&b, i + 2 < n ? b64[v & 63] : '=');
        }
        basic = tp_buf_steal(&b);
    }
    r = http("POST", "/oidc/v1/token", basic, NULL, "grant_type=client_credentials&scope=all-apis");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "token_type"), "Bearer");
    CHECK_INT_EQ(jint(r.json, "expires_in"), 3600);
    CHECK_STR_EQ(jstr(r.json, "scope"), "all-apis");
    char bearer[200];
    snprintf(bearer, sizeof bearer, "Authorization: Bearer %s", jstr(r.json, "access_token"));
    resp_free(&r);
    r = http("POST", "/api/2.0/sql/statements", bearer, NULL, body);
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    resp_free(&r);
    /* form credentials (client_secret_post) */
    r = http("POST", "/oidc/v1/token", NULL, NULL,
             "grant_type=client_credentials&client_id=" CLIENT_ID "&client_secret=" CLIENT_SECRET
             "&scope=sql");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "scope"), "sql");
    resp_free(&r);
    r = http("POST", "/oidc/v1/token", NULL, NULL,
             "grant_type=client_credentials&client_id=" CLIENT_ID "&client_secret=bad");
    CHECK_INT_EQ(r.code, 401);
    CHECK_STR_EQ(jstr(r.json, "error"), "invalid_client");
    CHECK(jstr(r.json, "error_description") != NULL);
    resp_free(&r);
    r = http("POST", "/oidc/v1/token", NULL, NULL, "grant_type=client_credentials");
    CHECK_INT_EQ(r.code, 401);
    CHECK_STR_EQ(jstr(r.json, "error"), "invalid_client");
    resp_free(&r);
    r = http("POST", "/oidc/v1/token", basic, NULL, "grant_type=password");
    CHECK_INT_EQ(r.code, 400);
    CHECK_STR_EQ(jstr(r.json, "error"), "unsupported_grant_type");
    resp_free(&r);

    /* E2: tokens live 1 s; PATs from TIDEPOOL_WAREHOUSE_TOKENS; a second warehouse id */
    cur_base = E2.base;
    r = http("POST", "/oidc/v1/token", basic, NULL, "grant_type=client_credentials");
    CHECK_INT_EQ(jint(r.json, "expires_in"), 1);
    snprintf(bearer, sizeof bearer, "Authorization: Bearer %s", jstr(r.json, "access_token"));
    resp_free(&r);
    r = http("POST", "/api/2.0/sql/statements", bearer, NULL, body);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
    usleep(1200000);
    r = http("POST", "/api/2.0/sql/statements", bearer, NULL, body);
    CHECK_INT_EQ(r.code, 403);
    resp_free(&r);
    r = http("POST", "/api/2.0/sql/statements", "Authorization: Bearer other-pat", NULL,
             "{\"warehouse_id\":\"wh-a\",\"statement\":\"SELECT 1\"}");
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
    cur_base = E1.base;
    free(basic);
}

static void set_faults(const char *spec)
{
    char *body = tp_xasprintf("{\"spec\":\"%s\"}", spec);
    resp_t r = http("POST", "/admin/faults", AUTH, NULL, body);
    CHECK_MSG(r.code == 200, "set faults %s: HTTP %ld %s", spec, r.code, r.body.data);
    resp_free(&r);
    free(body);
}

static void faults_injected(void)
{
    const char *q = "\"statement\":\"SELECT id FROM main.lake.big ORDER BY id\"";
    /* admin needs auth and validates the spec */
    resp_t r = http("POST", "/admin/faults", NULL, NULL, "{\"spec\":\"latency=1\"}");
    CHECK_INT_EQ(r.code, 401);
    resp_free(&r);
    r = http("POST", "/admin/faults", AUTH, NULL, "{\"spec\":\"bogus=1\"}");
    CHECK_INT_EQ(r.code, 400);
    CHECK_CONTAINS(jstr(r.json, "message"), "bogus");
    resp_free(&r);

    /* 503 x2 on execute with Retry-After, then normal */
    set_faults("status=503x2@execute,retry_after=2");
    for (int i = 0; i < 2; i++) {
        r = exec_sql(q);
        CHECK_INT_EQ(r.code, 503);
        CHECK_STR_EQ(jstr(r.json, "error_code"), "TEMPORARILY_UNAVAILABLE");
        CHECK_CONTAINS(r.hdrs.data, "Retry-After: 2");
        resp_free(&r);
    }
    r = exec_sql(q);
    CHECK_INT_EQ(r.code, 200);
    char id[64];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);

    /* 429 on get (default Retry-After 1), 500 on any */
    set_faults("status=429@get,status=500x1");
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 429);
    CHECK_STR_EQ(jstr(r.json, "error_code"), "REQUEST_LIMIT_EXCEEDED");
    CHECK_CONTAINS(r.hdrs.data, "Retry-After: 1");
    resp_free(&r);
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 500);
    CHECK_STR_EQ(jstr(r.json, "error_code"), "INTERNAL_ERROR");
    resp_free(&r);
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);

    /* latency */
    set_faults("latency=2000@get");
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 200);
    CHECK(r.secs >= 1.99);
    resp_free(&r);
    r = exec_sql("\"statement\":\"SELECT 1\""); /* another class: not delayed */
    CHECK_MSG(r.secs < 1.5, "execute took %.3f s", r.secs);
    resp_free(&r);

    /* a chunk dropped mid-body, then a truncated one, then whole again */
    char path[200];
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/1", id);
    set_faults("drop_chunk=1,truncate_chunk=1");
    r = http("GET", path, AUTH, NULL, NULL);
    CHECK(r.cc != CURLE_OK); /* partial body: the connection closed early */
    resp_free(&r);
    r = http("GET", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    CHECK(r.cc == CURLE_OK);
    CHECK(r.json == NULL); /* honest Content-Length, cut JSON */
    CHECK(r.body.len > 10);
    resp_free(&r);
    r = http("GET", path, AUTH, NULL, NULL);
    CHECK(r.json != NULL);
    CHECK_INT_EQ(jint(r.json, "row_count"), 1000);
    resp_free(&r);

    /* the same on link downloads */
    r = exec_sql("\"statement\":\"SELECT id FROM main.lake.big\",\"disposition\":"
                 "\"EXTERNAL_LINKS\",\"format\":\"CSV\"");
    json_t *l = jget(r.json, "result.external_links.0");
    set_faults("drop_chunk=1,truncate_chunk=1");
    resp_t d = download(l, true, NULL);
    CHECK(d.cc != CURLE_OK);
    resp_free(&d);
    d = download(l, true, NULL);
    CHECK(d.cc == CURLE_OK && d.code == 200);
    CHECK((long long)d.body.len < jint(l, "byte_count"));
    resp_free(&d);
    d = download(l, true, NULL);
    CHECK_INT_EQ((long long)d.body.len, jint(l, "byte_count"));
    resp_free(&d);
    resp_free(&r);

    /* links issued already expired */
    set_faults("expire_links=1");
    r = exec_sql("\"statement\":\"SELECT 3\",\"disposition\":\"EXTERNAL_LINKS\"");
    d = download(jget(r.json, "result.external_links.0"), true, NULL);
    CHECK_INT_EQ(d.code, 403);
    CHECK_CONTAINS(d.body.data, "expired");
    resp_free(&d);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s/result/chunks/0",
             jstr(r.json, "statement_id"));
    resp_t c = http("GET", path, AUTH, NULL, NULL);
    d = download(jget(c.json, "external_links.0"), true, NULL);
    CHECK_INT_EQ(d.code, 200);
    resp_free(&d);
    resp_free(&c);
    resp_free(&r);

    /* token endpoint failing */
    set_faults("token_fail=2:503,retry_after=1");
    const char *form = "grant_type=client_credentials&client_id=" CLIENT_ID
                       "&client_secret=" CLIENT_SECRET;
    for (int i = 0; i < 2; i++) {
        r = http("POST", "/oidc/v1/token", NULL, NULL, form);
        CHECK_INT_EQ(r.code, 503);
        CHECK(jstr(r.json, "error") != NULL);
        CHECK_CONTAINS(r.hdrs.data, "Retry-After: 1");
        resp_free(&r);
    }
    r = http("POST", "/oidc/v1/token", NULL, NULL, form);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);

    /* a well-formed answer in a state the protocol lacks, for the real statement */
    set_faults("bad_state=1@get");
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "statement_id"), id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "EXPLODING");
    CHECK(jget(r.json, "manifest") == NULL);
    resp_free(&r);
    r = get_stmt(id);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    resp_free(&r);
    set_faults("bad_state=1@execute");
    r = exec_sql("\"statement\":\"SELECT 1\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK(jstr(r.json, "statement_id") != NULL);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "EXPLODING");
    if (jstr(r.json, "statement_id")) {
        resp_t g2 = get_stmt(jstr(r.json, "statement_id"));
        CHECK_STR_EQ(jstr(g2.json, "status.state"), "SUCCEEDED");
        resp_free(&g2);
    }
    resp_free(&r);

    /* DELETE clears everything */
    set_faults("status=500x5");
    r = http("DELETE", "/admin/faults", AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    CHECK_INT_EQ(json_array_size(jget(r.json, "status")), 0);
    resp_free(&r);
    r = get_stmt(id);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);

    /* --faults at start-up: E2 answers its first GET with 503, Retry-After 3 */
    cur_base = E2.base;
    r = http("GET", "/api/2.0/sql/statements/whatever", "Authorization: Bearer " PAT, NULL, NULL);
    CHECK_INT_EQ(r.code, 503);
    CHECK_CONTAINS(r.hdrs.data, "Retry-After: 3");
    resp_free(&r);
    r = http("GET", "/api/2.0/sql/statements/whatever", "Authorization: Bearer " PAT, NULL, NULL);
    CHECK_INT_EQ(r.code, 404);
    resp_free(&r);
    cur_base = E1.base;
}

/* A client that leaves while its POST waits, and a DELETE of a running statement. */
static void client_leaves_and_close_while_running(void)
{
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, AUTH);
    char url[128];
    snprintf(url, sizeof url, "%s/api/2.0/sql/statements", E1.base);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, "{\"warehouse_id\":\"tidepool-local\",\"statement\":"
                                            "\"SELECT pg_sleep(1.5)\",\"wait_timeout\":\"5s\"}");
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 300L);
    tp_buf_t sink;
    tp_buf_init(&sink);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
    CHECK(curl_easy_perform(c) == CURLE_OPERATION_TIMEDOUT);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    tp_buf_free(&sink);
    usleep(1800000); /* the statement finishes with nobody waiting */
    resp_t r = exec_sql("\"statement\":\"SELECT 7\"");
    CHECK_STR_EQ(jstr(r.json, "result.data_array.0.0"), "7");
    resp_free(&r);
    /* libevent 2.1 only notices the gone client when the answer is written: the
     * reply is dropped then, without a crash or leak (the ASan run checks that) */

    char id[64], path[200];
    start_sleeper(id, sizeof id);
    snprintf(path, sizeof path, "/api/2.0/sql/statements/%s", id);
    r = http("DELETE", path, AUTH, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
    r = http("GET", path, AUTH, NULL, NULL);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "CLOSED");
    resp_free(&r);
    CHECK(wait_no_sleepers());
}

/* E2 runs with --result-ttl 3 --forget-ttl 4. */
static void results_expire_then_statements_are_forgotten(void)
{
    cur_base = E2.base;
    resp_t r = exec_sql("\"statement\":\"SELECT 1\"");
    CHECK_STR_EQ(jstr(r.json, "status.state"), "SUCCEEDED");
    char id[64];
    snprintf(id, sizeof id, "%s", jstr(r.json, "statement_id"));
    resp_free(&r);
    const char *state = "SUCCEEDED";
    int64_t t0 = tp_now_ms();
    while (tp_now_ms() - t0 < 8000) {
        r = get_stmt(id);
        if (r.code == 404) {
            CHECK_STR_EQ(jstr(r.json, "error_code"), "RESOURCE_DOES_NOT_EXIST");
            state = "GONE";
        } else if (strcmp(jstr(r.json, "status.state"), state) != 0) {
            CHECK_STR_EQ(jstr(r.json, "status.state"), "CLOSED");
            CHECK(tp_now_ms() - t0 >= 2900);
            state = "CLOSED";
        }
        resp_free(&r);
        if (strcmp(state, "GONE") == 0)
            break;
        usleep(200000);
    }
    CHECK_STR_EQ(state, "GONE");
    CHECK(tp_now_ms() - t0 >= 3900);
    cur_base = E1.base;
}

static void logs_hold_no_secrets_and_sigterm_is_clean(void)
{
    /* a statement still running at shutdown is cancelled, and the exit is clean */
    char id[64];
    start_sleeper(id, sizeof id);
    int64_t t0 = tp_now_ms();
    int rc1 = tp_test_stop(E1.pid, 10000);
    CHECK(tp_now_ms() - t0 < 5000);
    int rc2 = tp_test_stop(E2.pid, 10000);
    CHECK_INT_EQ(rc1, 0);
    CHECK_INT_EQ(rc2, 0);
    if (rc1 != 0 || rc2 != 0) { /* show what the sanitizer or the emulator said */
        char *cmd = tp_xasprintf("grep -v '^{' %s %s | head -60 >&2", E1.log, E2.log);
        if (system(cmd) != 0)
            fprintf(stderr, "# (no non-log lines)\n");
        free(cmd);
    }
    E1.pid = E2.pid = 0;
    CHECK(wait_no_sleepers());
    for (int k = 0; k < 2; k++) {
        const char *log = k == 0 ? E1.log : E2.log;
        CHECK(count_in_log(log, "\"msg\":\"request\"") > 5);
        CHECK_INT_EQ(count_in_log(log, PAT), 0);
        CHECK_INT_EQ(count_in_log(log, CLIENT_SECRET), 0);
        CHECK_INT_EQ(count_in_log(log, "tpo"), 0);  /* OAuth tokens */
        CHECK_INT_EQ(count_in_log(log, "x-tp-link-key"), 0);
        CHECK(count_in_log(log, "/_tp_blob/") > 0); /* logged, with the token redacted */
        CHECK(count_in_log(log, "(redacted)") == count_in_log(log, "/_tp_blob/"));
    }
}

static void command_line_errors(void)
{
    char *out = NULL;
    char *cmd = tp_xasprintf("%s --version", tp_test_bin("tidepool-warehouse"));
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK_CONTAINS(out, "tidepool-warehouse ");
    free(out);
    free(cmd);
    cmd = tp_xasprintf("%s --help", tp_test_bin("tidepool-warehouse"));
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK_CONTAINS(out, "--chunk-bytes");
    free(out);
    free(cmd);
    static const char *const bad[][2] = {
        {"--chunk-rows 0", "--chunk-rows"},
        {"--listen nowhere", "--listen"},
        {"--client only-an-id-and-s3cret", "--client"},
        {"--faults status=200", "--faults"},
        {"--token-ttl -5", "--token-ttl"},
        {"extra-arg", "unexpected argument"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        cmd = tp_xasprintf("%s %s", tp_test_bin("tidepool-warehouse"), bad[i][0]);
        CHECK_INT_EQ(tp_test_cmd(cmd, &out), 2);
        CHECK_CONTAINS(out, bad[i][1]);
        CHECK(strstr(out, "s3cret") == NULL);
        free(out);
        free(cmd);
    }
    /* a port already taken is a runtime failure (exit 1) with a clear message */
    cmd = tp_xasprintf("%s --listen 127.0.0.1:%d --token x", tp_test_bin("tidepool-warehouse"),
                       E1.port);
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 1);
    CHECK_CONTAINS(out, "cannot listen");
    free(out);
    free(cmd);
}

/* Sends raw bytes to port and returns what came back before close or a 3 s
 * timeout (read=false: closes at once, unread data and all). */
static char *raw_send(int port, const char *data, size_t len, bool read)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    tp_buf_t out;
    tp_buf_init(&out);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        size_t off = 0;
        while (off < len) {
            ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        char buf[4096];
        ssize_t n;
        while (read && (n = recv(fd, buf, sizeof buf, 0)) > 0)
            tp_buf_append(&out, buf, (size_t)n);
        if (!read)
            usleep(100000); /* let the answer start flowing into unread buffers */
    }
    close(fd);
    return tp_buf_steal(&out);
}

static char *raw_exchange(const char *data, size_t len)
{
    return raw_send(E1.port, data, len, true);
}

/* A connection-drop fault on a 14 MB chunk whose client leaves before the
 * half body is flushed: the emulator frees the orphaned request (ASan checks). */
static void dropped_chunk_with_client_gone(void)
{
    cur_base = E2.base;
    resp_t r = exec_sql("\"statement\":\"SELECT repeat('x', 1000) FROM generate_series(1, "
                        "14000)\",\"disposition\":\"EXTERNAL_LINKS\"");
    CHECK_INT_EQ(jint(r.json, "manifest.total_chunk_count"), 1);
    json_t *l = jget(r.json, "result.external_links.0");
    const char *url = jstr(l, "external_link");
    CHECK(url != NULL);
    if (url != NULL) {
        resp_t f = http("POST", "/admin/faults", "Authorization: Bearer " PAT, NULL,
                        "{\"spec\":\"drop_chunk=1\"}");
        CHECK_INT_EQ(f.code, 200);
        resp_free(&f);
        const char *path = strstr(url + 7, "/");
        char *req = tp_xasprintf("GET %s HTTP/1.1\r\nHost: x\r\nx-tp-link-key: %s\r\n\r\n", path,
                                 jstr(l, "http_headers.x-tp-link-key"));
        free(raw_send(E2.port, req, strlen(req), false));
        free(req);
        usleep(300000);
        /* the fault was used up and the emulator still serves the link whole */
        resp_t d = download(l, true, NULL);
        CHECK_INT_EQ(d.code, 200);
        CHECK_INT_EQ((long long)d.body.len, jint(l, "byte_count"));
        resp_free(&d);
    }
    resp_free(&r);
    cur_base = E1.base;
}

static void hostile_http_is_refused_cleanly(void)
{
    char *r = raw_exchange("GARBAGE\r\n\r\n", 11);
    CHECK(strstr(r, "200 OK") == NULL);
    free(r);
    /* 70 KiB of headers: over the 64 KiB limit */
    tp_buf_t big;
    tp_buf_init(&big);
    tp_buf_puts(&big, "GET /api/2.0/sql/statements/x HTTP/1.1\r\nHost: a\r\n");
    for (int i = 0; i < 700; i++)
        tp_buf_printf(&big, "X-Pad-%d: %0100d\r\n", i, 0);
    tp_buf_puts(&big, "\r\n");
    r = raw_exchange(big.data, big.len);
    CHECK(strstr(r, "200 OK") == NULL && strstr(r, "404") == NULL);
    free(r);
    tp_buf_free(&big);
    /* a body announced larger than 17 MiB is refused before it is read */
    const char *huge = "POST /api/2.0/sql/statements HTTP/1.1\r\nHost: a\r\nAuthorization: "
                       "Bearer " PAT "\r\nContent-Length: 40000000\r\n\r\n{\"a\":";
    r = raw_exchange(huge, strlen(huge));
    CHECK_CONTAINS(r, "413");
    free(r);
    /* a body shorter than announced, then the client leaves */
    const char *cut = "POST /api/2.0/sql/statements HTTP/1.1\r\nHost: a\r\nAuthorization: "
                      "Bearer " PAT "\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{";
    r = raw_exchange(cut, strlen(cut));
    free(r);
    /* still serving */
    resp_t ok = exec_sql("\"statement\":\"SELECT 1\"");
    CHECK_STR_EQ(jstr(ok.json, "status.state"), "SUCCEEDED");
    resp_free(&ok);
}

/* With its database unreachable, statements fail (HTTP 200, FAILED, 08006) and
 * the emulator keeps answering. */
static void postgres_down_fails_statements(void)
{
    emu_t e3 = {0};
    int dead = tp_test_free_port();
    char dsn[128];
    snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d dbname=x connect_timeout=2", dead);
    e3.port = tp_test_free_port();
    snprintf(e3.base, sizeof e3.base, "http://127.0.0.1:%d", e3.port);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", e3.port);
    char *argv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", dsn,
                    "--token", PAT, NULL};
    e3.log = tp_test_write_tmp("emu-down.log", "");
    e3.pid = tp_test_spawn(argv, e3.log);
    CHECK(tp_test_wait_port(e3.port, 10000));
    cur_base = e3.base;
    resp_t r = exec_sql("\"statement\":\"SELECT 1\"");
    CHECK_INT_EQ(r.code, 200);
    CHECK_STR_EQ(jstr(r.json, "status.state"), "FAILED");
    CHECK_STR_EQ(jstr(r.json, "status.error.error_code"), "TEMPORARILY_UNAVAILABLE");
    CHECK_STR_EQ(jstr(r.json, "status.sql_state"), "08006");
    resp_free(&r);
    r = http("GET", "/oidc/.well-known/oauth-authorization-server", NULL, NULL, NULL);
    CHECK_INT_EQ(r.code, 200);
    resp_free(&r);
    cur_base = E1.base;
    CHECK_INT_EQ(tp_test_stop(e3.pid, 5000), 0);
    free(e3.log);
}

int main(void)
{
    if (tp_test_dsn() == NULL) {
        tp_test_skip("test_emulator", "no harness Postgres");
        return tp_test_done();
    }
    curl_global_init(CURL_GLOBAL_ALL);
    if (!TP_RUN(seed)) {
        tp_test_stop(E1.pid, 3000);
        tp_test_stop(E2.pid, 3000);
        return tp_test_done();
    }
    TP_RUN(command_line_errors);
    TP_RUN(sync_inline_json_field_by_field);
    TP_RUN(geometric_types_are_geometry);
    TP_RUN(parameters_of_every_type);
    TP_RUN(async_then_poll);
    TP_RUN(failed_statements);
    TP_RUN(close_and_unknown);
    TP_RUN(dml_and_ddl);
    TP_RUN(bad_requests);
    TP_RUN(chunking_by_rows_and_bytes);
    TP_RUN(external_links_json_and_csv);
    TP_RUN(link_download_rules);
    TP_RUN(auth_pat_and_oauth);
    TP_RUN(faults_injected);
    TP_RUN(wait_timeout_continue_then_cancel);
    TP_RUN(wait_timeout_cancel);
    TP_RUN(explicit_cancel_async);
    TP_RUN(hostile_http_is_refused_cleanly);
    TP_RUN(postgres_down_fails_statements);
    TP_RUN(dropped_chunk_with_client_gone);
    TP_RUN(client_leaves_and_close_while_running);
    TP_RUN(results_expire_then_statements_are_forgotten);
    TP_RUN(logs_hold_no_secrets_and_sigterm_is_clean);
    if (E1.pid > 0)
        tp_test_stop(E1.pid, 3000);
    if (E2.pid > 0)
        tp_test_stop(E2.pid, 3000);
    curl_global_cleanup();
    return tp_test_done();
}
