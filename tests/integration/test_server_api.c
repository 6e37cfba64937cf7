/* tidepool-server over real HTTP against the harness Postgres: every endpoint,
 * output shape, status code and bad input of issue 5 (datasets, tables,
 * health, metrics, OpenAPI, problem+json). Cache, invalidation, reload,
 * drain and Postgres restarts are in test_server_ops.c. */
#include "server_harness.h"

static srv_h_t S;

static void test_healthz(void)
{
    resp_t r = get(&S, "/healthz");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "status")), "ok");
    CHECK(hdr(&r, "X-Request-Id") != NULL);
    resp_free(&r);
    const char *h[] = {"X-Request-Id: my-req-42", NULL};
    r = http(&S, "GET", "/healthz", h, NULL, 0);
    CHECK_STR_EQ(hdr(&r, "X-Request-Id"), "my-req-42");
    resp_free(&r);
    const char *bad[] = {"X-Request-Id: has spaces and {json}", NULL};
    r = http(&S, "GET", "/healthz", bad, NULL, 0);
    CHECK(strcmp(hdr(&r, "X-Request-Id"), "has spaces and {json}") != 0);
    resp_free(&r);
}

static void test_readyz(void)
{
    resp_t r = await_status(&S, "/readyz", 200, 50);
    CHECK_INT_EQ(r.status, 200);
    CHECK(json_is_true(json_object_get(json_object_get(r.json, "checks"), "postgres")));
    CHECK(json_is_true(json_object_get(json_object_get(r.json, "checks"), "migrations")));
    resp_free(&r);
}

static void test_dataset_rows(void)
{
    resp_t r = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&until=2025-01-03");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "application/json");
    CHECK(json_is_array(r.json));
    CHECK_INT_EQ(json_array_size(r.json), 3);
    json_t *row = json_array_get(r.json, 0);
    CHECK_STR_EQ(json_string_value(json_object_get(row, "day")), "2025-01-01");
    CHECK(json_is_integer(json_object_get(row, "steps")));
    CHECK_INT_EQ(json_integer_value(json_object_get(row, "steps")), 101);
    CHECK(json_is_real(json_object_get(row, "miles")));
    CHECK(json_is_number(json_object_get(row, "calories")));
    CHECK(json_is_false(json_object_get(row, "active")));
    CHECK_STR_EQ(json_string_value(json_object_get(row, "note")), "a,\"b\"");
    CHECK(hdr(&r, "ETag") != NULL);
    CHECK_STR_EQ(hdr(&r, "X-Tidepool-Generation"), "3");
    CHECK_STR_EQ(hdr(&r, "Last-Modified"), "Sun, 01 Jun 2025 12:00:00 GMT");
    CHECK(hdr(&r, "X-Tidepool-Source") != NULL);
    resp_free(&r);
    /* user 2: note is NULL, active true; defaults give the whole quarter */
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=2");
    CHECK_INT_EQ(json_array_size(r.json), 90);
    CHECK(json_is_null(json_object_get(json_array_get(r.json, 0), "note")));
    CHECK(json_is_true(json_object_get(json_array_get(r.json, 0), "active")));
    resp_free(&r);
}

static void test_dataset_types(void)
{
    resp_t r = get(&S, "/api/v1/datasets/types?flag=no");
    CHECK_INT_EQ(r.status, 200);
    json_t *row = json_array_get(r.json, 0);
    CHECK(json_is_false(json_object_get(row, "flag")));
    CHECK_CONTAINS(r.body, "\"big\":9007199254740993");
    CHECK_CONTAINS(r.body, "\"num\":1.50");
    CHECK_STR_EQ(json_string_value(json_object_get(row, "nan")), "NaN");
    CHECK(json_is_null(json_object_get(row, "nothing")));
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(row, "doc"), "a")), 1);
    CHECK(json_is_string(json_object_get(row, "at")));
    CHECK_STR_EQ(json_string_value(json_object_get(row, "empty")), ""); /* not null */
    CHECK(json_is_null(json_object_get(row, "absent")));
    resp_free(&r);
    const char *csv[] = {"Accept: text/csv", NULL};
    r = http(&S, "GET", "/api/v1/datasets/types", csv, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(r.body, "\r\nt,9007199254740993,1.50,NaN,,\"{\"\"a\"\": 1}\","); /* quoted */
    resp_free(&r);
}

static void test_dataset_columns_and_csv(void)
{
    resp_t r = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&until=2025-01-02&shape=columns");
    CHECK_INT_EQ(r.status, 200);
    json_t *days = json_object_get(r.json, "day");
    CHECK_INT_EQ(json_array_size(days), 2);
    CHECK_STR_EQ(json_string_value(json_array_get(days, 1)), "2025-01-02");
    CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(r.json, "steps"), 1)), 102);
    resp_free(&r);
    const char *h[] = {"Accept: text/csv", NULL};
    r = http(&S, "GET", "/api/v1/datasets/daily_metrics?user_id=1&until=2025-01-02", h, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(hdr(&r, "Content-Type"), "text/csv");
    CHECK_STR_EQ(r.body, "day,steps,miles,calories,active,note\r\n"
                         "2025-01-01,101,1.5,100.25,f,\"a,\"\"b\"\"\"\r\n"
                         "2025-01-02,102,1.5,100.25,f,\"a,\"\"b\"\"\"\r\n");
    resp_free(&r);
}

static void test_dataset_post(void)
{
    const char *h[] = {"Content-Type: application/json", NULL};
    const char *body = "{\"user_id\": 3, \"since\": \"2025-02-01\", \"until\": \"2025-02-03\"}";
    resp_t r = http(&S, "POST", "/api/v1/datasets/daily_metrics", h, body, strlen(body));
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 3);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(r.json, 0), "day")),
                 "2025-02-01");
    resp_free(&r);
    /* the same answer as GET with the same parameters */
    resp_t g = get(&S, "/api/v1/datasets/daily_metrics?user_id=3&since=2025-02-01&until=2025-02-03");
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", h, body, strlen(body));
    CHECK_STR_EQ(r.body, g.body);
    resp_free(&g);
    resp_free(&r);
}

static void test_dataset_etag_304(void)
{
    resp_t r = get(&S, "/api/v1/datasets/users");
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 40);
    char etag[64];
    snprintf(etag, sizeof etag, "%s", hdr(&r, "ETag"));
    resp_free(&r);
    char inm[128];
    snprintf(inm, sizeof inm, "If-None-Match: %s", etag);
    const char *h[] = {inm, NULL};
    r = http(&S, "GET", "/api/v1/datasets/users", h, NULL, 0);
    CHECK_INT_EQ(r.status, 304);
    CHECK_INT_EQ(r.len, 0);
    CHECK_STR_EQ(hdr(&r, "ETag"), etag);
    resp_free(&r);
    const char *other[] = {"If-None-Match: \"0000000000000000\"", NULL};
    r = http(&S, "GET", "/api/v1/datasets/users", other, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    r = http(&S, "HEAD", "/api/v1/datasets/users", NULL, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "ETag"), etag);
    resp_free(&r);
}

static void test_dataset_list(void)
{
    resp_t r = get(&S, "/api/v1/datasets");
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 6);
    json_t *dm = NULL;
    for (size_t i = 0; i < json_array_size(r.json); i++)
        if (strcmp(json_string_value(json_object_get(json_array_get(r.json, i), "name")),
                   "daily_metrics") == 0)
            dm = json_array_get(r.json, i);
    CHECK(dm != NULL);
    json_t *params = json_object_get(dm, "params");
    CHECK_INT_EQ(json_array_size(params), 3);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(params, 0), "type")), "INT");
    CHECK(json_is_true(json_object_get(json_array_get(params, 0), "required")));
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(params, 1), "default")),
                 "2025-01-01");
    json_t *req = json_array_get(json_object_get(dm, "requires"), 0);
    CHECK_STR_EQ(json_string_value(json_object_get(req, "job")), "daily_metrics");
    CHECK_INT_EQ(json_integer_value(json_object_get(req, "generation")), 3);
    CHECK(json_real_value(json_object_get(req, "age_seconds")) > 1000.0);
    resp_free(&r);
    CHECK_CONTAINS((r = get(&S, "/api/v1/datasets")).body, "\"roles\":[\"reader\"]");
    resp_free(&r);
}

static void test_dataset_bad_input(void)
{
    resp_t r = get(&S, "/api/v1/datasets/nope");
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=abc");
    CHECK_PROBLEM(r, 422, "user_id");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&since=2025-02-30");
    CHECK_PROBLEM(r, 422, "since");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics");
    CHECK_PROBLEM(r, 422, "user_id");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&colour=red");
    CHECK_PROBLEM(r, 400, "colour");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=1&shape=triangle");
    CHECK_PROBLEM(r, 400, "shape");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/users?prefix=%ff%fe");
    CHECK_PROBLEM(r, 400, "prefix");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/users?prefix=a%00b");
    CHECK_PROBLEM(r, 400, "prefix");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/users?prefix=%zz");
    CHECK_PROBLEM(r, 400, "prefix");
    resp_free(&r);
    /* an injection attempt is only ever a bound value: no rows, no error */
    r = get(&S, "/api/v1/datasets/users?prefix=x%27%3B%20DROP%20TABLE%20iot.users%3B--");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    const char *json[] = {"Content-Type: application/json", NULL};
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, "{\"user_id\": 1", 13);
    CHECK_PROBLEM(r, 400, "body");
    resp_free(&r);
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, "[1,2]", 5);
    CHECK_PROBLEM(r, 400, "body");
    resp_free(&r);
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, "{\"user_id\": {\"a\":1}}", 20);
    CHECK_PROBLEM(r, 422, "user_id");
    resp_free(&r);
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, "{\"user_id\": 1, \"zzz\": 2}", 24);
    CHECK_PROBLEM(r, 400, "zzz");
    resp_free(&r);
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, "{\"user_id\": 1.5}", 16);
    CHECK_PROBLEM(r, 422, "user_id");
    resp_free(&r);
    const char *text[] = {"Content-Type: text/plain", NULL};
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", text, "user_id=1", 9);
    CHECK_PROBLEM(r, 415, "Content-Type");
    resp_free(&r);
    char big[6000];
    memset(big, ' ', sizeof big);
    big[0] = '{';
    big[sizeof big - 1] = '}';
    r = http(&S, "POST", "/api/v1/datasets/daily_metrics", json, big, sizeof big);
    CHECK_PROBLEM(r, 413, "body");
    resp_free(&r);
    r = http(&S, "DELETE", "/api/v1/datasets/daily_metrics", NULL, NULL, 0);
    CHECK_PROBLEM(r, 405, NULL);
    CHECK_STR_EQ(hdr(&r, "Allow"), "GET, HEAD, POST");
    resp_free(&r);
    /* warehouse-only: an honest 501, never a pretend answer */
    r = get(&S, "/api/v1/datasets/sensor_readings?user_id=1");
    CHECK_PROBLEM(r, 501, NULL);
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/users?source=warehouse");
    CHECK_PROBLEM(r, 501, NULL);
    resp_free(&r);
    /* its table was never synced: unavailable, not a server error */
    r = get(&S, "/api/v1/datasets/not_synced");
    CHECK_PROBLEM(r, 503, NULL);
    CHECK(hdr(&r, "Retry-After") != NULL);
    resp_free(&r);
}

static void test_tables(void)
{
    resp_t r = get(&S, "/api/v1/tables/iot.users?user_id=lte.3&order=user_id.desc");
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 3);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(r.json, 0), "user_id")), 3);
    CHECK(json_is_number(json_object_get(json_array_get(r.json, 0), "weight")));
    resp_free(&r);
    r = get(&S, "/api/v1/tables/iot.users?select=name&user_id=in.(1,2,%2240%22)");
    CHECK_STR_EQ(r.body, "[{\"name\":\"user 1\"},{\"name\":\"user 2\"},{\"name\":\"user 40\"}]");
    resp_free(&r);
    r = get(&S, "/api/v1/tables/users?name=like.user%201*&order=user_id&limit=2&offset=1");
    CHECK_STR_EQ(r.body, "[{\"user_id\":10,\"name\":\"user 10\",\"weight\":70},"
                         "{\"user_id\":11,\"name\":\"user 11\",\"weight\":71}]");
    resp_free(&r);
    r = get(&S, "/api/v1/tables/iot.user_daily_metrics?user_id=eq.2&day=gte.2025-03-30&select=day,steps&order=day.asc");
    CHECK_INT_EQ(json_array_size(r.json), 2);
    resp_free(&r);
    r = get(&S, "/api/v1/tables/iot.user_daily_metrics?note=is.null&user_id=neq.1&active=is.true&limit=200&select=user_id");
    CHECK_INT_EQ(json_array_size(r.json), 200);
    resp_free(&r);
    r = get(&S, "/api/v1/tables/iot.users?user_id=gt.38&shape=columns");
    CHECK_STR_EQ(r.body, "{\"user_id\":[39,40],\"name\":[\"user 39\",\"user 40\"],\"weight\":[99,100]}");
    resp_free(&r);
    r = get(&S, "/api/v1/tables/iot.users?name=eq.x%27%20OR%201%3D1--");
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    /* default limit is the table's maximum: 200 rows of 3600 */
    r = get(&S, "/api/v1/tables/iot.user_daily_metrics?select=user_id");
    CHECK_INT_EQ(json_array_size(r.json), 200);
    resp_free(&r);
}

static void test_tables_bad_input(void)
{
    struct {
        const char *path;
        int status;
        const char *field;
    } cases[] = {
        {"/api/v1/tables/iot.hidden", 404, NULL},
        {"/api/v1/tables/nope", 404, NULL},
        {"/api/v1/tables/iot.users?colour=eq.red", 400, "colour"},
        {"/api/v1/tables/iot.users?user_id=approx.3", 400, "user_id"},
        {"/api/v1/tables/iot.users?user_id=eq.three", 422, "user_id"},
        {"/api/v1/tables/iot.users?user_id=in.(1,x)", 422, "user_id"},
        {"/api/v1/tables/iot.users?user_id=in.1,2", 400, "user_id"},
        {"/api/v1/tables/iot.users?name=is.maybe", 400, "name"},
        {"/api/v1/tables/iot.users?order=password.desc", 400, "order"},
        {"/api/v1/tables/iot.users?order=name.sideways", 400, "order"},
        {"/api/v1/tables/iot.users?select=name,secret", 400, "select"},
        {"/api/v1/tables/iot.users?limit=1001", 400, "limit"},
        {"/api/v1/tables/iot.user_daily_metrics?limit=201", 400, "limit"},
        {"/api/v1/tables/iot.users?limit=-1", 400, "limit"},
        {"/api/v1/tables/iot.users?offset=x", 400, "offset"},
        {"/api/v1/tables/iot.users?name=eq.%c3%28", 400, "name"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        resp_t r = get(&S, cases[i].path);
        CHECK_MSG(r.status == cases[i].status, "%s: status %ld, want %d: %s", cases[i].path,
                  r.status, cases[i].status, r.body);
        CHECK_PROBLEM(r, cases[i].status, cases[i].field);
        resp_free(&r);
    }
    resp_t r = http(&S, "POST", "/api/v1/tables/iot.users", NULL, "{}", 2);
    CHECK_PROBLEM(r, 405, NULL);
    CHECK_STR_EQ(hdr(&r, "Allow"), "GET, HEAD");
    resp_free(&r);
}

static void test_paths_and_headers(void)
{
    resp_t r = get(&S, "/api/v1/nothing");
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/../tables/iot.users");
    CHECK_PROBLEM(r, 400, "path");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/%2e%2e/x");
    CHECK_PROBLEM(r, 400, "path");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/users%00.sql");
    CHECK_PROBLEM(r, 400, "path");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/%ff");
    CHECK_PROBLEM(r, 400, "path");
    resp_free(&r);
    char big[6000];
    memset(big, 'h', sizeof big);
    memcpy(big, "X-Big: ", 7);
    big[sizeof big - 1] = '\0';
    const char *h[] = {big, NULL};
    r = http(&S, "GET", "/healthz", h, NULL, 0);
    CHECK_PROBLEM(r, 431, "headers");
    resp_free(&r);
}

static void test_metrics(void)
{
    resp_t r = get(&S, "/metrics");
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(hdr(&r, "Content-Type"), "text/plain");
    CHECK_CONTAINS(r.body, "tidepool_http_requests_total{route=\"/api/v1/datasets/{name}\",status=\"200\"}");
    CHECK_CONTAINS(r.body, "tidepool_http_requests_total{route=\"/api/v1/tables/{table}\",status=\"422\"}");
    CHECK_CONTAINS(r.body, "tidepool_http_request_duration_seconds_bucket{le=\"+Inf\"}");
    CHECK_CONTAINS(r.body, "tidepool_pg_pool_connections{state=\"in_use\"}");
    CHECK_CONTAINS(r.body, "tidepool_pg_pool_queued");
    CHECK_CONTAINS(r.body, "tidepool_cache_hits_total");
    CHECK_CONTAINS(r.body, "tidepool_cache_bytes");
    CHECK_CONTAINS(r.body, "tidepool_job_freshness_seconds{job=\"daily_metrics\"}");
    CHECK_CONTAINS(r.body, "tidepool_job_consecutive_failures{job=\"daily_metrics\"} 0\n");
    CHECK_CONTAINS(r.body, "tidepool_postgres_up 1");
    resp_free(&r);
}

static void test_openapi(void)
{
    resp_t r = get(&S, "/api/v1/openapi.json");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "openapi")), "3.1.0");
    json_t *paths = json_object_get(r.json, "paths");
    json_t *dm = json_object_get(paths, "/api/v1/datasets/daily_metrics");
    CHECK(json_object_get(dm, "get") != NULL);
    CHECK(json_object_get(dm, "post") != NULL);
    json_t *p0 = json_array_get(json_object_get(json_object_get(dm, "get"), "parameters"), 0);
    CHECK_STR_EQ(json_string_value(json_object_get(p0, "name")), "user_id");
    CHECK_STR_EQ(json_string_value(json_object_get(json_object_get(p0, "schema"), "type")), "integer");
    CHECK(json_object_get(paths, "/api/v1/tables/iot.users") != NULL);
    CHECK(json_object_get(paths, "/api/v1/tables/iot.hidden") == NULL);
    CHECK(json_object_get(paths, "/readyz") != NULL);
    CHECK(json_object_get(json_object_get(json_object_get(r.json, "components"), "schemas"), "Problem") != NULL);
    resp_free(&r);
}

static void test_request_log(void)
{
    const char *h[] = {"X-Request-Id: log-check-1", NULL};
    resp_t r = http(&S, "GET", "/api/v1/datasets/users?prefix=user%201", h, NULL, 0);
    resp_free(&r);
    usleep(100000);
    char *log = tp_read_file(S.log, NULL);
    CHECK(log != NULL);
    const char *line = log ? strstr(log, "\"request_id\":\"log-check-1\"") : NULL;
    CHECK(line != NULL);
    if (line) {
        const char *start = line;
        while (start > log && start[-1] != '\n')
            start--;
        const char *end = strchr(line, '\n');
        char *one = tp_xstrndup(start, end ? (size_t)(end - start) : strlen(start));
        json_t *j = json_loads(one, 0, NULL);
        CHECK(j != NULL);
        CHECK_STR_EQ(json_string_value(json_object_get(j, "method")), "GET");
        CHECK_STR_EQ(json_string_value(json_object_get(j, "route")), "/api/v1/datasets/{name}");
        CHECK_STR_EQ(json_string_value(json_object_get(j, "status")), "200");
        CHECK(json_object_get(j, "ms") != NULL);
        CHECK(json_object_get(j, "bytes") != NULL);
        json_decref(j);
        free(one);
    }
    free(log);
}

static void test_check_flag(void)
{
    /* the shipped demo datasets load */
    char conf[1024];
    snprintf(conf, sizeof conf, "[server]\ndefinitions = %s/sql/queries\n",
             getenv("TP_ROOT") ? getenv("TP_ROOT") : ".");
    char *path = tp_test_write_tmp("check-demo.conf", conf);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --check --config %s 2>&1", tp_test_bin("tidepool-server"), path);
    char *out = NULL;
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK_CONTAINS(out, "dataset daily_metrics (3 params)");
    CHECK_CONTAINS(out, "dataset users");
    free(out);
    free(path);
    /* a broken definition: exit 2 and file:line */
    char dir[600];
    snprintf(dir, sizeof dir, "%s/broken-defs", tp_test_tmpdir());
    mkdir(dir, 0755);
    char file[700];
    snprintf(file, sizeof file, "%s/bad.sql", dir);
    FILE *f = fopen(file, "w");
    if (f) {
        fputs("-- @param a INT\n-- @colour blue\nSELECT :a\n", f);
        fclose(f);
    }
    snprintf(conf, sizeof conf, "[server]\ndefinitions = %s\n", dir);
    path = tp_test_write_tmp("check-bad.conf", conf);
    snprintf(cmd, sizeof cmd, "%s --check --config %s 2>&1", tp_test_bin("tidepool-server"), path);
    out = NULL;
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 2);
    CHECK_CONTAINS(out, "bad.sql:2:");
    free(out);
    free(path);
}

int main(void)
{
    const char *dsn;
    if (!harness_setup(&S, "test_server_api", &dsn, 2))
        return tp_test_done();
    TP_RUN(test_healthz);
    TP_RUN(test_readyz);
    TP_RUN(test_dataset_rows);
    TP_RUN(test_dataset_types);
    TP_RUN(test_dataset_columns_and_csv);
    TP_RUN(test_dataset_post);
    TP_RUN(test_dataset_etag_304);
    TP_RUN(test_dataset_list);
    TP_RUN(test_dataset_bad_input);
    TP_RUN(test_tables);
    TP_RUN(test_tables_bad_input);
    TP_RUN(test_paths_and_headers);
    TP_RUN(test_metrics);
    TP_RUN(test_openapi);
    TP_RUN(test_request_log);
    TP_RUN(test_check_flag);
    harness_finish(&S);
    return tp_test_done();
}
