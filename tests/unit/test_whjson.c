/* Unit tests for lib/whjson.c (the push JSON parser with its row batch) and
 * the pure helpers of lib/wh.c: host normalisation and error-body reading. */
#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"
#include "tidepool/whjson.h"
#include "tidepool/wh.h"

static const char *const STMT_PATH[] = {"result", "data_array"};

static const char *DOC =
    "{\"statement_id\":\"01ef\",\"status\":{\"state\":\"SUCCEEDED\"},"
    "\"manifest\":{\"format\":\"JSON_ARRAY\",\"schema\":{\"column_count\":3,\"columns\":[]},"
    "\"total_row_count\":3,\"truncated\":false,\"x\":[1.5e3,-2,true,null,{}]},"
    "\"result\":{\"chunk_index\":0,\"row_count\":3,\"data_array\":["
    "[\"1\",\"a\\\"b\\\\c\\/d\",null],"
    "[\"2\",\"\\u00e9\\ud83d\\ude00\\n\",\"\"],"
    "[\"3\",\"\xe6\x97\xa5\xe6\x9c\xac\",\"\\u0000z\"]],"
    "\"next_chunk_index\":1}}";

static void check_doc(tp_whjson_t *p)
{
    json_t *root = tp_whjson_root(p);
    CHECK(json_is_object(root));
    CHECK_STR_EQ(json_string_value(json_object_get(root, "statement_id")), "01ef");
    json_t *res = json_object_get(root, "result");
    CHECK(json_object_get(res, "data_array") == NULL); /* not built */
    CHECK_INT_EQ(json_integer_value(json_object_get(res, "next_chunk_index")), 1);
    json_t *x = json_object_get(json_object_get(root, "manifest"), "x");
    CHECK_INT_EQ(json_array_size(x), 5);
    CHECK(json_real_value(json_array_get(x, 0)) == 1500.0);
    CHECK_INT_EQ(json_integer_value(json_array_get(x, 1)), -2);
    CHECK(tp_whjson_saw_rows(p));
    CHECK_INT_EQ(tp_whjson_rows_total(p), 3);
    const char *const *cells;
    const size_t *lens;
    size_t ncols;
    size_t n = tp_whjson_batch(p, &cells, &lens, &ncols);
    CHECK_INT_EQ(n, 3);
    CHECK_INT_EQ(ncols, 3);
    if (n != 3 || ncols != 3)
        return;
    CHECK_STR_EQ(cells[0], "1");
    CHECK_STR_EQ(cells[1], "a\"b\\c/d");
    CHECK(cells[2] == NULL);
    CHECK_STR_EQ(cells[4], "\xc3\xa9\xf0\x9f\x98\x80\n");
    CHECK_STR_EQ(cells[5], "");
    CHECK_STR_EQ(cells[7], "\xe6\x97\xa5\xe6\x9c\xac");
    CHECK_INT_EQ(lens[8], 2);
    CHECK(memcmp(cells[8], "\0z", 2) == 0);
}

static void parses_whole_document(void)
{
    tp_whjson_t *p = tp_whjson_new(STMT_PATH, 2);
    CHECK(tp_whjson_feed(p, DOC, strlen(DOC)));
    CHECK(tp_whjson_finish(p));
    check_doc(p);
    tp_whjson_free(p);
}

/* Every split point, and byte by byte: the same result. */
static void parses_split_anywhere(void)
{
    size_t len = strlen(DOC);
    for (size_t cut = 0; cut <= len; cut++) {
        tp_whjson_t *p = tp_whjson_new(STMT_PATH, 2);
        bool ok = tp_whjson_feed(p, DOC, cut) && tp_whjson_feed(p, DOC + cut, len - cut) && tp_whjson_finish(p);
        CHECK_MSG(ok, "split at %zu: %s", cut, tp_whjson_error(p));
        if (ok)
            check_doc(p);
        tp_whjson_free(p);
    }
    tp_whjson_t *p = tp_whjson_new(STMT_PATH, 2);
    bool ok = true;
    for (size_t i = 0; i < len && ok; i++)
        ok = tp_whjson_feed(p, DOC + i, 1);
    CHECK(ok && tp_whjson_finish(p));
    check_doc(p);
    tp_whjson_free(p);
}

static int rows_seen;
static bool count_row(void *arg)
{
    tp_whjson_t *p = arg;
    rows_seen++;
    if (rows_seen % 2 == 0)
        tp_whjson_batch_clear(p); /* clearing mid-stream keeps later rows intact */
    return true;
}

static void root_rows_with_skip_and_clear(void)
{
    const char *doc = "[[\"1\",\"x\"],[\"2\",null],[\"3\",\"yy\"],[\"4\",\"z\"],[\"5\",\"w\"]]";
    tp_whjson_t *p = tp_whjson_new(NULL, 0);
    tp_whjson_set_ncols(p, 2);
    tp_whjson_set_skip(p, 2);
    rows_seen = 0;
    tp_whjson_set_row_cb(p, count_row, p);
    size_t len = strlen(doc);
    CHECK(tp_whjson_feed(p, doc, 17));
    CHECK(tp_whjson_feed(p, doc + 17, len - 17));
    CHECK(tp_whjson_finish(p));
    CHECK_INT_EQ(tp_whjson_rows_total(p), 5);
    CHECK_INT_EQ(rows_seen, 3);
    const char *const *cells;
    const size_t *lens;
    size_t ncols;
    size_t n = tp_whjson_batch(p, &cells, &lens, &ncols);
    CHECK_INT_EQ(n, 1);
    if (n == 1) {
        CHECK_STR_EQ(cells[0], "5");
        CHECK_STR_EQ(cells[1], "w");
    }
    CHECK(tp_whjson_root(p) == NULL);
    tp_whjson_free(p);
}

static void rejects_bad_input_precisely(void)
{
    struct {
        const char *doc;
        const char *err;
    } cases[] = {
        {"[[\"1\",2]]", "row 0 column 1: expected a string or null, got '2'"},
        {"[[\"1\"],[\"2\",\"3\"]]", "row 1 has 2 cells, expected 1"},
        {"[\"1\"]", "row 0: expected an array"},
        {"[[\"1\",[\"x\"]]]", "row 0 column 1: expected a string or null"},
        {"[[\"1\"]", "ends early (inside an array, after 1 rows)"},
        {"[[\"1", "ends early (inside a string"},
        {"", "ends early (before any value"},
        {"[[\"a\tb\"]]", "raw control character"},
        {"[[\"\\x\"]]", "invalid escape"},
        {"[[\"\\ud800x\"]]", "unpaired UTF-16 surrogate"},
        {"[[\"\\udc00\"]]", "unpaired UTF-16 surrogate"},
        {"[[\"1\"]] x", "after the end of the document"},
        {"[[\"1\"],]", "expected an array"},
        {"[[nul]]", "expected a string or null, got 'nul'"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        tp_whjson_t *p = tp_whjson_new(NULL, 0);
        bool ok = tp_whjson_feed(p, cases[i].doc, strlen(cases[i].doc)) && tp_whjson_finish(p);
        CHECK_MSG(!ok, "case %zu accepted", i);
        CHECK_CONTAINS(tp_whjson_error(p), cases[i].err);
        tp_whjson_free(p);
    }
    const char *objs[][2] = {
        {"{\"a\":1,}", "expected an object key"},
        {"{\"a\" 1}", "expected ':'"},
        {"{\"a\":01}", "invalid literal or number '01'"},
        {"{\"a\":tru}", "invalid literal"},
        {"{\"a\":[1 2]}", "expected ',' or ']'"},
        {"{\"a\":1]", "expected ',' or '}' in object"},
        {"{\"a\":{\"b\":1}", "ends early (inside an object"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(objs); i++) {
        tp_whjson_t *p = tp_whjson_new(STMT_PATH, 2);
        bool ok = tp_whjson_feed(p, objs[i][0], strlen(objs[i][0])) && tp_whjson_finish(p);
        CHECK_MSG(!ok, "object case %zu accepted", i);
        CHECK_CONTAINS(tp_whjson_error(p), objs[i][1]);
        tp_whjson_free(p);
    }
    /* nesting bomb */
    char deep[200];
    memset(deep, '[', sizeof(deep));
    tp_whjson_t *p = tp_whjson_new(STMT_PATH, 2);
    CHECK(!tp_whjson_feed(p, deep, sizeof(deep)));
    CHECK_CONTAINS(tp_whjson_error(p), "nesting deeper than 64");
    tp_whjson_free(p);
}

static void hosts_normalise(void)
{
    struct {
        const char *in, *out;
    } ok[] = {
        {"adb-123.4.azuredatabricks.net", "https://adb-123.4.azuredatabricks.net"},
        {"https://dbc-a1.cloud.databricks.com/", "https://dbc-a1.cloud.databricks.com"},
        {"https://dbc-a1.cloud.databricks.com:443//", "https://dbc-a1.cloud.databricks.com"},
        {"  HTTPS://x.example.com/some/path?o=1  ", "https://x.example.com"},
        {"http://127.0.0.1:8180", "http://127.0.0.1:8180"},
        {"http://127.0.0.1:443", "http://127.0.0.1:443"},
        {"x.example.com:8443", "https://x.example.com:8443"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(ok); i++) {
        char *err = NULL;
        char *h = tp_wh_normalize_host(ok[i].in, &err);
        CHECK_STR_EQ(h, ok[i].out);
        free(h);
        free(err);
    }
    const char *bad[] = {NULL, "", "   ", "ftp://x.example.com", "https://", "https://user@host", "ho st"};
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        char *err = NULL;
        char *h = tp_wh_normalize_host(bad[i], &err);
        CHECK_MSG(h == NULL, "accepted \"%s\"", bad[i] ? bad[i] : "(null)");
        CHECK(err != NULL);
        free(h);
        free(err);
    }
}

static void error_bodies_all_forms(void)
{
    struct {
        const char *body, *code, *msg;
    } cases[] = {
        {"{\"error_code\":\"INVALID_PARAMETER_VALUE\",\"message\":\"wait_timeout must be 0 or 5..50\"}",
         "INVALID_PARAMETER_VALUE", "wait_timeout must be 0 or 5..50"},
        {"{\"error_code\":403,\"message\":\"Invalid access token.\"}", "403", "Invalid access token."},
        {"{\"error\":\"legacy failure\"}", NULL, "legacy failure"},
        {"{\"error\":\"invalid_client\",\"error_description\":\"Client authentication failed\"}", "invalid_client",
         "Client authentication failed"},
        {"{\"detail\":\"scim says no\",\"status\":\"403\",\"scimType\":\"forbidden\"}", "forbidden", "scim says no"},
        {"TEMPORARILY_UNAVAILABLE: try later\n", "TEMPORARILY_UNAVAILABLE", "try later"},
        {"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>", NULL,
         "non-JSON HTML page: 502 Bad Gateway"},
        {"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
         "AccessDenied", "Request has expired"},
        {"", NULL, "empty body"},
        {"something\nbroke", NULL, "non-JSON body: something broke"},
        {"{\"error_code\":\"X\"}", "X", "JSON error body without a message"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        char *code = NULL, *msg = NULL;
        tp_wh_error_body(cases[i].body, strlen(cases[i].body), &code, &msg);
        if (cases[i].code)
            CHECK_STR_EQ(code, cases[i].code);
        else
            CHECK_MSG(code == NULL, "case %zu: code \"%s\"", i, code);
        CHECK_CONTAINS(msg, cases[i].msg);
        free(code);
        free(msg);
    }
}

static void config_from_env(void)
{
    setenv("DATABRICKS_HOST", "adb-1.2.azuredatabricks.net", 1);
    setenv("DATABRICKS_WAREHOUSE_ID", "abc123", 1);
    setenv("DATABRICKS_TOKEN", "", 1); /* empty counts as unset */
    setenv("DATABRICKS_CLIENT_ID", "cid", 1);
    setenv("DATABRICKS_CLIENT_SECRET", "csec", 1);
    tp_wh_config_t c;
    tp_wh_config_init(&c);
    c.warehouse_id = "from-config"; /* set fields win */
    tp_wh_config_from_env(&c);
    CHECK_STR_EQ(c.host, "adb-1.2.azuredatabricks.net");
    CHECK_STR_EQ(c.warehouse_id, "from-config");
    CHECK(c.token == NULL);
    CHECK_STR_EQ(c.client_id, "cid");
    CHECK_STR_EQ(c.client_secret, "csec");
    CHECK_INT_EQ(c.poll_initial_ms, 100);
    CHECK_INT_EQ(c.poll_max_ms, 5000);
    /* half an OAuth pair is refused up front */
    c.client_secret = NULL;
    char *err = NULL;
    CHECK(tp_wh_new(NULL, &c, &err) == NULL);
    CHECK_CONTAINS(err, "without a client secret");
    free(err);
}

int main(void)
{
    TP_RUN(parses_whole_document);
    TP_RUN(parses_split_anywhere);
    TP_RUN(root_rows_with_skip_and_clear);
    TP_RUN(rejects_bad_input_precisely);
    TP_RUN(hosts_normalise);
    TP_RUN(error_bodies_all_forms);
    TP_RUN(config_from_env);
    return tp_test_done();
}
