/* Write-back against the harness Postgres: the migrations (every sql/migrations file in
 * order) plus a test schema, reflection, every validation error, each plan's round
 * trip (insert, patch, delete, bulk patch), If-Match and 412, idempotency (replay,
 * reuse with another body, expiry, races between connections, load with random
 * retries), concurrent PATCHes with one version, the audit and outbox trail, error
 * mapping (incl. a connection killed mid-write), row scoping, and the outbox shipper
 * (bridged MERGE on Postgres, then through tp_wh_run and the emulator over HTTP). */
#include "tidepool/writeback.h"

#include <glob.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "../tp_test.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

static const char *dsn;
static tp_wb_schema_t *schema;

static const char TEST_SCHEMA[] =
    "CREATE SCHEMA wbt;\n"
    "CREATE TABLE wbt.parent (id integer PRIMARY KEY, code text CONSTRAINT parent_code_key "
    "UNIQUE, version bigint NOT NULL DEFAULT 1);\n"
    "COMMENT ON TABLE wbt.parent IS '@writable roles=writer';\n"
    "CREATE TABLE wbt.child (a integer, b text, parent_id integer CONSTRAINT child_parent_fk "
    "REFERENCES wbt.parent (id), amount numeric(30,10), ratio double precision, flag boolean, "
    "day date, at timestamptz, naive timestamp, uid uuid, doc jsonb, small smallint, big bigint, "
    "label varchar(5), gen integer GENERATED ALWAYS AS (a * 2) STORED, "
    "version bigint NOT NULL DEFAULT 1, PRIMARY KEY (a, b), "
    "CONSTRAINT child_ratio_ck CHECK (ratio IS NULL OR ratio < 100));\n"
    "COMMENT ON TABLE wbt.child IS 'Test table. @writable roles=writer,admin @expose';\n"
    "CREATE TABLE wbt.plain (id integer PRIMARY KEY, v text);\n"
    "COMMENT ON TABLE wbt.plain IS 'not declared';\n";

static PGconn *conn_new(void)
{
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        tp_test_fail(__FILE__, __LINE__, "connect: %s", PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    return c;
}

static bool exec_ok(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok)
        tp_test_fail(__FILE__, __LINE__, "%.80s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
    return ok;
}

static long long count(const char *sql)
{
    char *v = tp_test_sql(dsn, sql);
    long long n = v ? atoll(v) : -1;
    free(v);
    return n;
}

/* Applies the migrations and the test schema, then reflects. */
static bool setup(void);
static void test_setup(void)
{
    CHECK(setup());
}

static bool setup(void)
{
    dsn = tp_test_dsn();
    if (!dsn)
        return false;
    PGconn *c = conn_new();
    if (!c)
        return false;
    glob_t g;
    bool ok = glob("sql/migrations/*.sql", 0, NULL, &g) == 0 && g.gl_pathc >= 2;
    for (size_t i = 0; ok && i < g.gl_pathc; i++) {
        char *text = tp_read_file(g.gl_pathv[i], NULL);
        ok = text && exec_ok(c, "BEGIN") && exec_ok(c, text) && exec_ok(c, "COMMIT");
        free(text);
    }
    globfree(&g);
    ok = ok && exec_ok(c, TEST_SCHEMA);
    char err[512] = "";
    if (ok) {
        schema = tp_wb_reflect(c, err, sizeof err);
        CHECK_MSG(schema != NULL, "reflect: %s", err);
        ok = schema != NULL;
    }
    PQfinish(c);
    return ok;
}

static const tp_wb_table_t *T(const char *name)
{
    const tp_wb_table_t *t = tp_wb_find(schema, name);
    if (!t)
        tp_test_fail(__FILE__, __LINE__, "table %s not reflected", name);
    return t;
}

typedef struct req {
    const char *table;
    tp_wb_op_t op;
    const char *pk, *body, *if_match, *key, *actor;
} req_t;

static int sends;   /* statements sent by run(), to prove invalid input sends none */
static int resends; /* of which re-sent on tp_wb_finish's request (key races) */

/* Prepares and runs one request on c (resending as tp_wb_finish asks); returns status. */
static int run_on(PGconn *c, const req_t *q, tp_wb_answer_t *ans)
{
    const tp_wb_table_t *t = tp_wb_find(schema, q->table);
    if (!t) {
        tp_test_fail(__FILE__, __LINE__, "no table %s", q->table);
        return -1;
    }
    static const char *methods[] = {"POST", "PATCH", "DELETE"};
    char path[256];
    snprintf(path, sizeof path, "/api/v1/tables/%s%s%s", q->table, q->pk ? "/" : "",
             q->pk ? q->pk : "");
    tp_wb_request_t r = {
        .op = q->op,
        .method = methods[q->op],
        .path = path,
        .pk = q->pk,
        .body = q->body,
        .body_len = q->body ? strlen(q->body) : 0,
        .if_match = q->if_match,
        .idem_key = q->key,
        .actor = q->actor ? q->actor : "alice",
        .request_id = "req-1",
        .key_ttl_s = 3600,
    };
    tp_wb_call_t *call;
    if (!tp_wb_prepare(t, &r, &call, ans)) {
        CHECK(call == NULL);
        return ans->status;
    }
    for (;;) {
        __atomic_add_fetch(&sends, 1, __ATOMIC_SEQ_CST);
        PGresult *res =
            PQexecParams(c, call->sql, call->nparams, NULL, call->params, NULL, NULL, 0);
        tp_wb_next_t next =
            tp_wb_finish(call, res, PQstatus(c) == CONNECTION_OK ? NULL : "lost", ans);
        PQclear(res);
        if (next == TP_WB_ANSWER)
            break;
        __atomic_add_fetch(&resends, 1, __ATOMIC_SEQ_CST);
    }
    tp_wb_call_free(call);
    return ans->status;
}

static PGconn *main_conn;

static int run(const req_t *q, tp_wb_answer_t *ans)
{
    return run_on(main_conn, q, ans);
}

/* Field of a JSON body as text ("" when absent); numbers printed as integers. */
static char *field(const char *body, const char *key)
{
    json_t *j = json_loads(body, 0, NULL);
    json_t *v = j ? json_object_get(j, key) : NULL;
    char *out;
    if (json_is_string(v))
        out = tp_xstrdup(json_string_value(v));
    else if (json_is_integer(v))
        out = tp_xasprintf("%lld", (long long)json_integer_value(v));
    else if (v)
        out = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    else
        out = tp_xstrdup("");
    json_decref(j);
    return out;
}

/* True if body's errors[] has an entry for field whose message starts with msg. */
static bool has_error(const char *body, const char *fld, const char *msg)
{
    json_t *j = json_loads(body ? body : "", 0, NULL);
    json_t *errs = json_object_get(j, "errors"), *e;
    size_t i;
    bool found = false;
    json_array_foreach(errs, i, e)
    {
        const char *f = json_string_value(json_object_get(e, "field"));
        const char *m = json_string_value(json_object_get(e, "message"));
        if (f && m && strcmp(f, fld) == 0 && strncmp(m, msg, strlen(msg)) == 0)
            found = true;
    }
    json_decref(j);
    return found;
}

#define CHECK_ERROR(body, fld, msg)                                                                \
    CHECK_MSG(has_error((body), (fld), (msg)), "no error %s: %s... in %s", fld, msg, body)

#define CHECK_FIELD(body, key, want)                                                               \
    do {                                                                                           \
        char *_f = field((body), (key));                                                           \
        CHECK_MSG(strcmp(_f, (want)) == 0, "%s.%s = '%s', want '%s' (body %s)", #body, key, _f,    \
                  (want), (body));                                                                 \
        free(_f);                                                                                  \
    } while (0)

/* ---- reflection ---- */

static void test_reflect_demo(void)
{
    const tp_wb_table_t *t = T("app.user_notes");
    if (!t)
        return;
    CHECK(tp_wb_find(schema, "user_notes") == t);
    CHECK(tp_wb_find(schema, "wbt.plain") == NULL);
    CHECK_INT_EQ(t->npk, 1);
    const tp_wb_col_t *id = &t->cols[t->pk[0]];
    CHECK_STR_EQ(id->name, "id");
    CHECK_INT_EQ(id->kind, TP_WB_INT8);
    CHECK_STR_EQ(id->readonly, "identity");
    CHECK(t->owner_col >= 0);
    CHECK_STR_EQ(t->cols[t->owner_col].name, "author");
    CHECK_STR_EQ(t->cols[t->owner_col].readonly, "owner");
    CHECK_STR_EQ(t->cols[t->version_col].readonly, "version");
    CHECK_STR_EQ(t->cols[t->touch_col].name, "updated_at");
    CHECK(t->mirror == NULL);
    CHECK(!t->if_match_required);
    for (int i = 0; i < t->ncols; i++) {
        const tp_wb_col_t *c = &t->cols[i];
        if (strcmp(c->name, "user_id") == 0) {
            CHECK_INT_EQ(c->kind, TP_WB_INT4);
            CHECK(c->not_null && !c->has_default && !c->readonly);
        } else if (strcmp(c->name, "note") == 0) {
            CHECK_INT_EQ(c->kind, TP_WB_TEXT);
            CHECK(c->not_null && c->max_chars == -1);
        } else if (strcmp(c->name, "created_at") == 0) {
            CHECK_INT_EQ(c->kind, TP_WB_TIMESTAMPTZ);
            CHECK(c->has_default);
            CHECK_STR_EQ(c->default_sql, "now()");
            CHECK_STR_EQ(c->readonly, "readonly");
        }
    }
    CHECK(tp_wb_role_allowed(t, "writer", true));
    CHECK(!tp_wb_role_allowed(t, "reader", true));
    CHECK(tp_wb_role_allowed(t, "reader", false));

    t = T("app.device_assignments");
    if (!t)
        return;
    CHECK_STR_EQ(t->mirror, "demo.iot.device_assignments");
    CHECK(t->if_match_required);
    CHECK_STR_EQ(t->cols[t->pk[0]].name, "device_id");
    CHECK(t->cols[t->pk[0]].readonly == NULL);
    CHECK(tp_wb_role_allowed(t, "admin", true));
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->cols[i].name, "note") == 0)
            CHECK_INT_EQ(t->cols[i].max_chars, 200);

    t = T("wbt.child");
    if (!t)
        return;
    CHECK_INT_EQ(t->npk, 2);
    CHECK_STR_EQ(t->cols[t->pk[0]].name, "a");
    CHECK_STR_EQ(t->cols[t->pk[1]].name, "b");
    bool saw_fk = false, saw_ck = false;
    for (int i = 0; i < t->ncons; i++) {
        if (strcmp(t->cons[i].name, "child_parent_fk") == 0)
            saw_fk = t->cons[i].type == 'f' && strcmp(t->cons[i].columns, "parent_id") == 0;
        if (strcmp(t->cons[i].name, "child_ratio_ck") == 0)
            saw_ck = t->cons[i].type == 'c' && strcmp(t->cons[i].columns, "ratio") == 0;
    }
    CHECK(saw_fk && saw_ck);
    static const struct {
        const char *col;
        tp_wb_kind_t kind;
    } kinds[] = {{"amount", TP_WB_NUMERIC}, {"ratio", TP_WB_FLOAT},    {"flag", TP_WB_BOOL},
                 {"day", TP_WB_DATE},       {"at", TP_WB_TIMESTAMPTZ}, {"naive", TP_WB_TIMESTAMP},
                 {"uid", TP_WB_UUID},       {"doc", TP_WB_JSON},       {"small", TP_WB_INT2},
                 {"big", TP_WB_INT8},       {"label", TP_WB_TEXT}};
    for (size_t k = 0; k < TP_ARRAY_LEN(kinds); k++)
        for (int i = 0; i < t->ncols; i++)
            if (strcmp(t->cols[i].name, kinds[k].col) == 0)
                CHECK_MSG(t->cols[i].kind == kinds[k].kind, "%s kind %d", kinds[k].col,
                          (int)t->cols[i].kind);
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->cols[i].name, "gen") == 0)
            CHECK_STR_EQ(t->cols[i].readonly, "generated");
}

static void test_json_schema(void)
{
    const tp_wb_table_t *t = T("wbt.child");
    if (!t)
        return;
    tp_buf_t b = {0};
    tp_wb_json_schema(t, &b);
    json_error_t jerr;
    json_t *j = json_loads(b.data, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", jerr.text, b.data);
    json_t *props = json_object_get(j, "properties");
    CHECK_INT_EQ(json_object_size(props), t->ncols);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(props, "small"), "maximum")),
                 32767);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(props, "label"), "maxLength")),
                 5);
    CHECK_STR_EQ(json_string_value(json_object_get(json_object_get(props, "uid"), "format")),
                 "uuid");
    CHECK(json_is_true(json_object_get(json_object_get(props, "gen"), "readOnly")));
    CHECK(json_is_true(json_object_get(json_object_get(props, "version"), "readOnly")));
    json_t *req = json_object_get(j, "required");
    CHECK_INT_EQ(json_array_size(req), 2); /* the key columns a and b */
    CHECK_STR_EQ(json_string_value(json_array_get(req, 0)), "a");
    json_decref(j);
    tp_buf_free(&b);
}

/* A bad declaration fails the whole reflection, naming table and token; fixing it
 * and reflecting again (the SIGHUP path) gives a new snapshot. */
static void test_reflect_errors(void)
{
    PGconn *c = conn_new();
    if (!c)
        return;
    static const struct {
        const char *sql, *want;
    } cases[] = {
        {"COMMENT ON TABLE wbt.plain IS '@writable roles=writer frobnicate=1'",
         "wbt.plain: @writable comment: unknown key 'frobnicate'"},
        {"COMMENT ON TABLE wbt.plain IS '@writable roles=writer'",
         "wbt.plain: no version column 'version'"},
        {"COMMENT ON TABLE wbt.plain IS '@writable roles=writer version=v'",
         "version column 'v' must be integer or bigint"},
        {"COMMENT ON TABLE wbt.plain IS '@writable roles=writer owner=nope version=id'",
         "wbt.plain: version column 'id' cannot be a key"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        if (!exec_ok(c, cases[i].sql))
            continue;
        char err[512] = "";
        tp_wb_schema_t *s = tp_wb_reflect(c, err, sizeof err);
        CHECK_MSG(s == NULL, "case %zu reflected", i);
        tp_wb_schema_unref(s);
        CHECK_CONTAINS(err, cases[i].want);
    }
    exec_ok(c, "ALTER TABLE wbt.plain ADD COLUMN version bigint NOT NULL DEFAULT 1");
    exec_ok(c, "COMMENT ON TABLE wbt.plain IS '@writable roles=writer readonly=v'");
    char err[512] = "";
    tp_wb_schema_t *s = tp_wb_reflect(c, err, sizeof err);
    CHECK_MSG(s != NULL, "%s", err);
    CHECK(tp_wb_find(s, "wbt.plain") != NULL);
    CHECK(tp_wb_find(schema, "wbt.plain") == NULL); /* the old snapshot is unchanged */
    CHECK_INT_EQ(tp_wb_count(s), tp_wb_count(schema) + 1);
    tp_wb_schema_t *held = tp_wb_schema_ref(s);
    tp_wb_schema_unref(s);
    CHECK(tp_wb_find(held, "plain") != NULL); /* still alive through the second reference */
    tp_wb_schema_unref(held);
    exec_ok(c, "COMMENT ON TABLE wbt.plain IS 'not declared'");
    PQfinish(c);
}

/* ---- validation ---- */

static void expect_invalid(const req_t *q, int status, const char *field_name, const char *msg)
{
    tp_wb_answer_t a;
    int before = sends;
    int st = run(q, &a);
    CHECK_MSG(st == status, "status %d, want %d: %s", st, status, a.body ? a.body : "");
    CHECK_INT_EQ(sends, before); /* nothing was sent to Postgres */
    CHECK_STR_EQ(a.content_type, "application/problem+json");
    if (field_name)
        CHECK_ERROR(a.body, field_name, msg);
    tp_wb_answer_free(&a);
}

static void test_validation(void)
{
    const char *n = "app.user_notes", *ch = "wbt.child";
    /* malformed JSON and bad shapes */
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"note\":"}, 400, "body", "");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"note\":\"x\"} junk"}, 400, "body", "");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"note\":\"a\",\"note\":\"b\"}"}, 400,
                   "body", "duplicate object key");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = ""}, 400, NULL, NULL);
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "[]"}, 422, NULL, NULL);
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "42"}, 422, NULL, NULL);
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "[{\"user_id\":1,\"note\":\"x\"}, 3]"}, 422,
                   "[1]", "must be an object");
    /* columns */
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":1,\"note\":\"x\",\"colour\":1}"},
                   422, "colour", "is not a column");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"note\":\"x\"}"}, 422, "user_id",
                   "is required");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":null,\"note\":\"x\"}"}, 422,
                   "user_id", "must not be null");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":\"1\",\"note\":\"x\"}"}, 422,
                   "user_id", "must be an integer between -2147483648");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":2147483648,\"note\":\"x\"}"},
                   422, "user_id", "must be an integer between");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":99999999999999999999,\"note\":\"x\"}"}, 422,
        "body", "too big integer");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":1.5,\"note\":\"x\"}"}, 422,
                   "user_id", "must be an integer");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":1,\"note\":7}"}, 422, "note",
                   "must be a string");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":1,\"note\":\"a\\u0000b\"}"}, 422,
                   "note", "must not contain NUL");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"id\":5,\"user_id\":1,\"note\":\"x\"}"},
                   422, "id", "is read-only (identity)");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "{\"author\":\"eve\",\"user_id\":1,\"note\":\"x\"}"}, 422,
        "author", "is read-only (owner)");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "{\"version\":9,\"user_id\":1,\"note\":\"x\"}"}, 422,
        "version", "is read-only (version)");
    expect_invalid(&(req_t){n, TP_WB_INSERT,
                            .body = "{\"created_at\":\"2025-01-01T00:00:00Z\","
                                    "\"user_id\":1,\"note\":\"x\"}"},
                   422, "created_at", "is read-only (readonly)");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "[{\"user_id\":1,\"note\":\"x\"},{\"user_id\":true}]"},
        422, "[1].user_id", "must be an integer");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "[{\"user_id\":1,\"note\":\"x\"},{\"user_id\":true}]"},
        422, "[1].note", "is required");
    /* types of the test table */
    struct {
        const char *body, *field, *msg;
    } types[] = {
        {"{\"a\":1,\"b\":\"x\",\"small\":40000}", "small", "must be an integer between -32768"},
        {"{\"a\":1,\"b\":\"x\",\"amount\":\"12\"}", "amount", "must be a number"},
        {"{\"a\":1,\"b\":\"x\",\"flag\":1}", "flag", "must be true or false"},
        {"{\"a\":1,\"b\":\"x\",\"day\":\"2025-02-30\"}", "day", "must be a date"},
        {"{\"a\":1,\"b\":\"x\",\"at\":\"2025-01-01 10:00\"}", "at", "must be an RFC 3339"},
        {"{\"a\":1,\"b\":\"x\",\"naive\":\"2025-01-01T10:00:00+01:00\"}", "naive",
         "must be a timestamp without offset"},
        {"{\"a\":1,\"b\":\"x\",\"uid\":\"nope\"}", "uid", "must be a UUID"},
        {"{\"a\":1,\"b\":\"x\",\"label\":\"sixsix\"}", "label", "is longer than 5 characters"},
        {"{\"a\":1,\"b\":\"x\",\"gen\":2}", "gen", "is read-only (generated)"},
        {"{\"a\":1}", "b", "is required"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(types); i++)
        expect_invalid(&(req_t){ch, TP_WB_INSERT, .body = types[i].body}, 422, types[i].field,
                       types[i].msg);
    /* PATCH and DELETE: key in the URL, body, headers */
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .pk = "abc", .body = "{\"note\":\"x\"}"}, 422, "id",
                   "must be a 64-bit integer");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .pk = "", .body = "{\"note\":\"x\"}"}, 422, "id",
                   "is empty");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .pk = "1,2", .body = "{\"note\":\"x\"}"}, 422, "id",
                   "must be 1 value in key order");
    expect_invalid(&(req_t){ch, TP_WB_UPDATE, .pk = "1", .body = "{\"flag\":true}"}, 422, "pk",
                   "must be 2 values in key order");
    expect_invalid(&(req_t){ch, TP_WB_UPDATE, .pk = "x,y", .body = "{\"flag\":true}"}, 422, "a",
                   "must be an integer");
    expect_invalid(&(req_t){ch, TP_WB_UPDATE, .pk = "1,%zz", .body = "{\"flag\":true}"}, 422, "pk",
                   "must be 2 values");
    expect_invalid(&(req_t){ch, TP_WB_UPDATE, .pk = "1,x", .body = "{\"b\":\"y\"}"}, 422, "b",
                   "is part of the primary key");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .pk = "1", .body = "{}"}, 422, "body",
                   "has no columns to change");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .pk = "1", .body = "[{\"note\":\"x\"}]"}, 422, NULL,
                   NULL);
    expect_invalid(
        &(req_t){n, TP_WB_UPDATE, .pk = "1", .body = "{\"note\":\"x\"}", .if_match = "3"}, 400,
        "If-Match", "is malformed");
    expect_invalid(
        &(req_t){n, TP_WB_UPDATE, .pk = "1", .body = "{\"note\":\"x\"}", .if_match = "W/\"3\""},
        400, "If-Match", "is malformed");
    expect_invalid(&(req_t){n, TP_WB_INSERT, .body = "{\"note\":\"x\"}", .if_match = "\"3\""}, 400,
                   "If-Match", "is not allowed here");
    expect_invalid(&(req_t){n, TP_WB_DELETE, .pk = "1", .body = "{}"}, 400, NULL, NULL);
    expect_invalid(
        &(req_t){"app.device_assignments", TP_WB_UPDATE, .pk = "1", .body = "{\"note\":\"x\"}"},
        428, "If-Match", "is required");
    expect_invalid(&(req_t){"app.device_assignments", TP_WB_DELETE, .pk = "1", .if_match = "*"},
                   428, "If-Match", "must be the row's ETag, not *");
    expect_invalid(
        &(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":1,\"note\":\"x\"}", .key = "bad\nkey"}, 400,
        "Idempotency-Key", "must be 1 to 255 printable");
    /* bulk PATCH items */
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .body = "{\"id\":1}"}, 422, NULL, NULL);
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .body = "[{\"changes\":{\"note\":\"x\"}}]"}, 422,
                   "[0].id", "is required");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .body = "[{\"id\":1}]"}, 422, "[0].changes",
                   "is required");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .body = "[{\"id\":1,\"changes\":{\"nope\":1}}]"}, 422,
                   "[0].changes.nope", "is not a column");
    expect_invalid(&(req_t){n, TP_WB_UPDATE,
                            .body = "[{\"id\":1,\"changes\":{\"note\":\"x\"},\"note\":\"y\"}]"},
                   422, "[0].note", "only key columns");
    expect_invalid(&(req_t){n, TP_WB_UPDATE,
                            .body = "[{\"id\":1,\"changes\":{\"note\":\"x\"},\"if_match\":\"1\"}]"},
                   422, "[0].if_match", "must be the row's version");
    expect_invalid(&(req_t){n, TP_WB_UPDATE,
                            .body = "[{\"id\":1,\"changes\":{\"note\":\"x\"}},"
                                    "{\"id\":\"01\",\"changes\":{\"note\":\"y\"}}]"},
                   422, "[1]", "names the same row as an earlier item");
    /* composite keys: one value equal to a part of another item's key is no duplicate */
    {
        tp_wb_answer_t a;
        CHECK_INT_EQ(run(&(req_t){ch, TP_WB_UPDATE,
                                  .body = "[{\"a\":1,\"b\":\"1\",\"changes\":{\"flag\":true}},"
                                          "{\"a\":11,\"b\":\"1\",\"changes\":{\"flag\":true}},"
                                          "{\"a\":1,\"b\":\"11\",\"changes\":{\"flag\":true}}]"},
                         &a),
                     404); /* valid: no such rows */
        tp_wb_answer_free(&a);
    }
    expect_invalid(&(req_t){"app.device_assignments", TP_WB_UPDATE,
                            .body = "[{\"device_id\":1,\"changes\":{\"note\":\"x\"}}]"},
                   428, "if_match", "is required in every item");
    expect_invalid(&(req_t){n, TP_WB_UPDATE, .body = "[{\"id\":1,\"changes\":{\"note\":\"x\"}}]",
                            .if_match = "\"1\""},
                   400, "If-Match", "is not allowed here");
    /* every error is listed, not only the first */
    tp_wb_answer_t a;
    run(&(req_t){n, TP_WB_INSERT, .body = "{\"user_id\":\"x\",\"note\":1,\"zz\":0}"}, &a);
    CHECK_CONTAINS(a.body, "\"detail\":\"3 invalid values; nothing was written\"");
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log"), 0);
}

/* ---- round trips ---- */

static void test_insert(void)
{
    tp_wb_answer_t a;
    long long audit0 = count("SELECT count(*) FROM tidepool.audit_log");
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT,
                              .body = "{\"user_id\":7,\"note\":\"first \\u00e9\"}"},
                     &a),
                 201);
    CHECK_STR_EQ(a.content_type, "application/json");
    CHECK_STR_EQ(a.etag, "\"1\"");
    CHECK(!a.replayed);
    CHECK_FIELD(a.body, "author", "alice");
    CHECK_FIELD(a.body, "note", "first \xc3\xa9");
    CHECK_FIELD(a.body, "version", "1");
    char *id = field(a.body, "id");
    CHECK(atoi(id) > 0);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT actor || '|' || action || '|' || table_name || '|' || pk::text || '|' || "
             "(before IS NULL) || '|' || (after->>'note') || '|' || request_id FROM "
             "tidepool.audit_log WHERE pk = jsonb_build_object('id', %s::bigint)",
             id);
    char *row = tp_test_sql(dsn, sql);
    char want[256];
    snprintf(want, sizeof want,
             "alice|insert|app.user_notes|{\"id\": %s}|true|first \xc3\xa9|req-1", id);
    CHECK_STR_EQ(row, want);
    free(row);
    free(id);
    tp_wb_answer_free(&a);
    /* an array is one transaction and answers an array in request order */
    CHECK_INT_EQ(
        run(&(req_t){"app.user_notes", TP_WB_INSERT,
                     .body = "[{\"user_id\":8,\"note\":\"b1\"},{\"user_id\":8,\"note\":\"b2\"}]"},
            &a),
        201);
    CHECK(a.etag == NULL);
    json_t *j = json_loads(a.body, 0, NULL);
    CHECK(json_is_array(j) && json_array_size(j) == 2);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(j, 0), "note")), "b1");
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(j, 1), "note")), "b2");
    json_decref(j);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log"), audit0 + 3);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.writeback_outbox"), 0); /* not mirrored */
    /* types round trip, numeric precision kept (the client's bytes reach Postgres) */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.parent", TP_WB_INSERT, .body = "{\"id\":1,\"code\":\"p1\"}"}, &a), 201);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){"wbt.child", TP_WB_INSERT,
                              .body = "{\"a\":1,\"b\":\"x,y\",\"parent_id\":1,"
                                      "\"amount\":12345678901234567890.0123456789,\"ratio\":0.5,"
                                      "\"flag\":true,\"day\":\"2024-02-29\",\"at\":\"2025-01-31T12:"
                                      "00:00+01:00\",\"naive\":\"2025-01-31T12:00:00\",\"uid\":"
                                      "\"123e4567-e89b-12d3-a456-426614174000\",\"doc\":{\"k\":[1,"
                                      "null]},\"small\":-32768,\"big\":9223372036854775807,"
                                      "\"label\":\"h\\u00e9llo\"}"},
                     &a),
                 201);
    CHECK_FIELD(a.body, "gen", "2");
    tp_wb_answer_free(&a);
    char *v = tp_test_sql(dsn, "SELECT amount::text || '|' || at::text || '|' || doc::text || '|' "
                               "|| big || '|' || label FROM wbt.child WHERE a = 1 AND b = 'x,y'");
    CHECK_STR_EQ(v, "12345678901234567890.0123456789|2025-01-31 11:00:00+00|{\"k\": [1, null]}|"
                    "9223372036854775807|h\xc3\xa9llo");
    free(v);
    /* JSON null in a jsonb column is SQL NULL */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_INSERT, .body = "{\"a\":2,\"b\":\"n\",\"doc\":null}"}, &a),
        201);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM wbt.child WHERE a = 2 AND doc IS NULL"), 1);
}

static char *new_note(const char *actor, const char *note)
{
    tp_wb_answer_t a;
    char body[128];
    snprintf(body, sizeof body, "{\"user_id\":3,\"note\":\"%s\"}", note);
    int st = run(&(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .actor = actor}, &a);
    CHECK_INT_EQ(st, 201);
    char *id = field(a.body ? a.body : "{}", "id");
    tp_wb_answer_free(&a);
    return id;
}

static void test_patch_and_if_match(void)
{
    char *id = new_note("alice", "v1");
    tp_wb_answer_t a;
    /* without If-Match (optional on this table) */
    CHECK_INT_EQ(
        run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"v2\"}"}, &a),
        200);
    CHECK_STR_EQ(a.etag, "\"2\"");
    CHECK_FIELD(a.body, "note", "v2");
    CHECK_FIELD(a.body, "user_id", "3"); /* untouched columns keep their values */
    tp_wb_answer_free(&a);
    /* with the current ETag */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"v3\"}",
                              .if_match = "\"2\""},
                     &a),
                 200);
    CHECK_STR_EQ(a.etag, "\"3\"");
    tp_wb_answer_free(&a);
    /* a stale ETag: 412 with the current row, nothing written */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id,
                              .body = "{\"note\":\"lost\"}", .if_match = "\"1\""},
                     &a),
                 412);
    CHECK_STR_EQ(a.content_type, "application/problem+json");
    CHECK_STR_EQ(a.etag, "\"3\"");
    CHECK_FIELD(a.body, "code", "stale-version");
    json_t *j = json_loads(a.body, 0, NULL);
    json_t *cur = json_object_get(j, "current");
    CHECK_STR_EQ(json_string_value(json_object_get(cur, "note")), "v3");
    CHECK_INT_EQ(json_integer_value(json_object_get(cur, "version")), 3);
    json_decref(j);
    tp_wb_answer_free(&a);
    char sql[400];
    snprintf(sql, sizeof sql, "SELECT note || version FROM app.user_notes WHERE id = %s", id);
    char *v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "v33");
    free(v);
    snprintf(sql, sizeof sql,
             "SELECT string_agg(action || ':' || (before->>'note') || '>' || (after->>'note'), ',' "
             "ORDER BY id) FROM tidepool.audit_log WHERE pk->>'id' = '%s' AND action = 'update'",
             id);
    v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "update:v1>v2,update:v2>v3");
    free(v);
    /* updated_at is touched, created_at is not */
    snprintf(sql, sizeof sql,
             "SELECT (updated_at > created_at)::text FROM app.user_notes WHERE id = %s", id);
    v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "true");
    free(v);
    /* unknown row */
    CHECK_INT_EQ(
        run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = "999999", .body = "{\"note\":\"x\"}"},
            &a),
        404);
    CHECK_FIELD(a.body, "code", "row-not-found");
    tp_wb_answer_free(&a);
    free(id);
}

static void test_delete(void)
{
    char *id = new_note("alice", "doomed");
    tp_wb_answer_t a;
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_DELETE, .pk = id, .if_match = "\"5\""}, &a),
                 412);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_DELETE, .pk = id, .if_match = "\"1\""}, &a),
                 200);
    CHECK_FIELD(a.body, "note", "doomed");
    CHECK(a.etag == NULL);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_DELETE, .pk = id}, &a), 404);
    tp_wb_answer_free(&a);
    char sql[400];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM tidepool.audit_log WHERE pk->>'id' = '%s' AND action = "
             "'delete' AND after IS NULL AND before->>'note' = 'doomed'",
             id);
    CHECK_INT_EQ(count(sql), 1);
    free(id);
}

static void test_composite_key(void)
{
    tp_wb_answer_t a;
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_UPDATE, .pk = "1,x%2Cy", .body = "{\"flag\":false}"}, &a),
        200);
    CHECK_FIELD(a.body, "flag", "false");
    CHECK_FIELD(a.body, "b", "x,y");
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_UPDATE, .pk = "1,x", .body = "{\"flag\":false}"}, &a), 404);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log WHERE table_name = 'wbt.child' AND "
                       "pk = '{\"a\": 1, \"b\": \"x,y\"}' AND action = 'update'"),
                 1);
}

static void test_bulk_patch(void)
{
    char *id1 = new_note("alice", "g1"), *id2 = new_note("alice", "g2");
    char body[512];
    tp_wb_answer_t a;
    /* one stale item: 412, nothing written */
    snprintf(body, sizeof body,
             "[{\"id\":%s,\"changes\":{\"note\":\"G1\"},\"if_match\":1},"
             "{\"id\":\"%s\",\"changes\":{\"note\":\"G2\"},\"if_match\":7}]",
             id1, id2);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .body = body}, &a), 412);
    CHECK_ERROR(a.body, "[1].if_match", "stale: the current version is 1");
    tp_wb_answer_free(&a);
    /* one missing item: 404, nothing written */
    snprintf(
        body, sizeof body,
        "[{\"id\":%s,\"changes\":{\"note\":\"G1\"}},{\"id\":999999,\"changes\":{\"note\":\"G2\"}}]",
        id1);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .body = body}, &a), 404);
    CHECK_ERROR(a.body, "[1]", "no such row");
    tp_wb_answer_free(&a);
    /* a failing constraint in the second row: 422, the first row untouched */
    snprintf(body, sizeof body,
             "[{\"id\":%s,\"changes\":{\"note\":\"G1\"}},{\"id\":%s,\"changes\":{\"user_id\":-1}}]",
             id1, id2);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .body = body}, &a), 422);
    CHECK_FIELD(a.body, "code", "check-violation");
    tp_wb_answer_free(&a);
    char sql[400];
    snprintf(sql, sizeof sql,
             "SELECT string_agg(note || version, ',' ORDER BY id) FROM app.user_notes WHERE id IN "
             "(%s, %s)",
             id1, id2);
    char *v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "g11,g21");
    free(v);
    /* all good: both rows, in item order */
    snprintf(body, sizeof body,
             "[{\"id\":%s,\"changes\":{\"note\":\"G2\"},\"if_match\":1},"
             "{\"id\":%s,\"changes\":{\"note\":\"G1\"}}]",
             id2, id1);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .body = body}, &a), 200);
    json_t *j = json_loads(a.body, 0, NULL);
    CHECK(json_array_size(j) == 2);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(j, 0), "note")), "G2");
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(j, 1), "note")), "G1");
    json_decref(j);
    tp_wb_answer_free(&a);
    v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "G12,G22");
    free(v);
    free(id1);
    free(id2);
}

/* ---- idempotency ---- */

static void test_idempotency(void)
{
    tp_wb_answer_t a, b;
    const char *body = "{\"user_id\":11,\"note\":\"once\"}";
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .key = "k-1"}, &a),
                 201);
    CHECK(!a.replayed);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .key = "k-1"}, &b),
                 201);
    CHECK(b.replayed);
    CHECK_STR_EQ(b.body, a.body);
    CHECK_STR_EQ(b.etag, a.etag);
    tp_wb_answer_free(&b);
    CHECK_INT_EQ(count("SELECT count(*) FROM app.user_notes WHERE note = 'once'"), 1);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log WHERE after->>'note' = 'once'"), 1);
    /* same key, another body: 409 */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT,
                              .body = "{\"user_id\":11,\"note\":\"twice\"}", .key = "k-1"},
                     &b),
                 409);
    CHECK_FIELD(b.body, "code", "idempotency-key-reused");
    tp_wb_answer_free(&b);
    /* keys are per actor */
    CHECK_INT_EQ(
        run(&(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .key = "k-1", .actor = "bob"},
            &b),
        201);
    CHECK(!b.replayed);
    tp_wb_answer_free(&b);
    /* an expired key is forgotten: the write happens again */
    exec_ok(main_conn, "UPDATE tidepool.idempotency_keys SET created_at = now() - interval '2 "
                       "hours', expires_at = now() - interval '1 hour' WHERE key = 'k-1' AND "
                       "actor = 'alice'");
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .key = "k-1"}, &b),
                 201);
    CHECK(!b.replayed);
    CHECK(strcmp(b.body, a.body) != 0);
    tp_wb_answer_free(&b);
    CHECK_INT_EQ(
        count("SELECT count(*) FROM app.user_notes WHERE note = 'once' AND author = 'alice'"), 2);
    tp_wb_answer_free(&a);
    /* a failed write does not claim the key: fixing the request with it works */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_INSERT,
                              .body = "{\"user_id\":-5,\"note\":\"n\"}", .key = "k-2"},
                     &a),
                 422);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.idempotency_keys WHERE key = 'k-2'"), 0);
    /* PATCH replays too, with its ETag */
    char *id = new_note("alice", "p");
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"q\"}",
                              .if_match = "\"1\"", .key = "k-3"},
                     &a),
                 200);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"q\"}",
                              .if_match = "\"1\"", .key = "k-3"},
                     &b),
                 200);
    CHECK(b.replayed);
    CHECK_STR_EQ(b.etag, "\"2\"");
    CHECK_STR_EQ(b.body, a.body);
    tp_wb_answer_free(&b);
    /* the same key with another If-Match is another request */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"q\"}",
                              .if_match = "\"2\"", .key = "k-3"},
                     &b),
                 409);
    tp_wb_answer_free(&a);
    tp_wb_answer_free(&b);
    free(id);
    /* purge */
    exec_ok(main_conn, "UPDATE tidepool.idempotency_keys SET created_at = now() - interval '2 "
                       "hours', expires_at = now() - interval '1 hour' WHERE key = 'k-3'");
    const char *pv[1] = {"100"};
    PGresult *r = PQexecParams(main_conn, TP_WB_PURGE_SQL, 1, NULL, pv, NULL, NULL, 0);
    CHECK_INT_EQ(PQresultStatus(r), PGRES_COMMAND_OK);
    CHECK_STR_EQ(PQcmdTuples(r), "1");
    PQclear(r);
}

typedef struct racer {
    req_t q;
    pthread_barrier_t *bar;
    int status;
    bool replayed;
    char *body;
} racer_t;

static void *race_main(void *arg)
{
    racer_t *r = arg;
    PGconn *c = conn_new();
    pthread_barrier_wait(r->bar);
    if (!c)
        return NULL;
    tp_wb_answer_t a;
    r->status = run_on(c, &r->q, &a);
    r->replayed = a.replayed;
    r->body = a.body;
    a.body = NULL;
    tp_wb_answer_free(&a);
    PQfinish(c);
    return NULL;
}

static void race(racer_t *rs, int n)
{
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)n);
    pthread_t th[16];
    for (int i = 0; i < n; i++) {
        rs[i].bar = &bar;
        pthread_create(&th[i], NULL, race_main, &rs[i]);
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&bar);
}

/* Concurrent requests with the same new key: exactly one write, every answer equal. */
static void test_idempotency_race(void)
{
    enum { N = 6 };
    for (int round = 0; round < 3; round++) {
        char key[32], body[96];
        snprintf(key, sizeof key, "race-%d", round);
        /* round 2 inserts an explicit key (device_id): the losers first hit that unique
         * index, not the idempotency key's, and must still be answered by replay */
        const char *table = round == 2 ? "app.device_assignments" : "app.user_notes";
        if (round == 2)
            snprintf(body, sizeof body, "{\"device_id\":77,\"user_id\":1}");
        else
            snprintf(body, sizeof body, "{\"user_id\":20,\"note\":\"race %d\"}", round);
        racer_t rs[N];
        memset(rs, 0, sizeof rs);
        for (int i = 0; i < N; i++)
            rs[i].q = (req_t){table, TP_WB_INSERT, .body = body, .key = key};
        race(rs, N);
        int replays = 0;
        for (int i = 0; i < N; i++) {
            CHECK_MSG(rs[i].status == 201, "round %d racer %d: %d %s", round, i, rs[i].status,
                      rs[i].body ? rs[i].body : "");
            replays += rs[i].replayed;
            if (rs[0].body && rs[i].body)
                CHECK_STR_EQ(rs[i].body, rs[0].body);
        }
        CHECK_INT_EQ(replays, N - 1);
        for (int i = 0; i < N; i++)
            free(rs[i].body);
        char sql[400];
        if (round == 2)
            snprintf(sql, sizeof sql,
                     "SELECT count(*) FROM tidepool.audit_log WHERE "
                     "table_name = 'app.device_assignments' AND pk->>'device_id' = '77'");
        else
            snprintf(sql, sizeof sql,
                     "SELECT count(*) FROM tidepool.audit_log WHERE "
                     "after->>'note' = 'race %d'",
                     round);
        CHECK_INT_EQ(count(sql), 1);
    }
}

/* Concurrent PATCHes with the same If-Match: one 200, the rest 412. */
static void test_concurrent_patch(void)
{
    enum { N = 6 };
    char *id = new_note("alice", "c0");
    racer_t rs[N];
    memset(rs, 0, sizeof rs);
    char bodies[N][48];
    for (int i = 0; i < N; i++) {
        snprintf(bodies[i], sizeof bodies[i], "{\"note\":\"c%d\"}", i + 1);
        rs[i].q = (req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = bodies[i],
                          .if_match = "\"1\""};
    }
    race(rs, N);
    int ok = 0, stale = 0;
    for (int i = 0; i < N; i++) {
        ok += rs[i].status == 200;
        stale += rs[i].status == 412;
        if (rs[i].status == 412)
            CHECK_CONTAINS(rs[i].body, "\"version\": 2"); /* the current row, as it is now */
        free(rs[i].body);
    }
    CHECK_INT_EQ(ok, 1);
    CHECK_INT_EQ(stale, N - 1);
    char sql[400];
    snprintf(sql, sizeof sql, "SELECT version FROM app.user_notes WHERE id = %s", id);
    char *v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "2");
    free(v);
    /* without If-Match, concurrent PATCHes all apply, none lost: version counts them */
    for (int i = 0; i < N; i++)
        rs[i].q.if_match = NULL;
    race(rs, N);
    for (int i = 0; i < N; i++) {
        CHECK_INT_EQ(rs[i].status, 200);
        free(rs[i].body);
    }
    v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "8");
    free(v);
    free(id);
}

/* Load with retries: threads on their own connections send inserts, each under its
 * own key, and retry at random (at once, later, or from another thread while the
 * first may still run). The end state has exactly one row and one audit entry per
 * key, and every answer for a key is the same. */
enum { LOAD_THREADS = 8, LOAD_KEYS = 1200 };
static char *load_answers[LOAD_KEYS];
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;
static int load_bad;

typedef struct loader {
    int idx;
    pthread_barrier_t *bar;
} loader_t;

static void load_one(PGconn *c, int k)
{
    char key[32], body[96];
    snprintf(key, sizeof key, "load-%d", k);
    snprintf(body, sizeof body, "{\"user_id\":%d,\"note\":\"load %d\"}", k % 50 + 1, k);
    tp_wb_answer_t a;
    int st = run_on(c, &(req_t){"app.user_notes", TP_WB_INSERT, .body = body, .key = key}, &a);
    pthread_mutex_lock(&load_mu);
    if (st != 201)
        load_bad++;
    else if (!load_answers[k])
        load_answers[k] = tp_xstrdup(a.body);
    else if (strcmp(load_answers[k], a.body) != 0)
        load_bad++;
    pthread_mutex_unlock(&load_mu);
    tp_wb_answer_free(&a);
}

static void *load_main(void *arg)
{
    loader_t *l = arg;
    PGconn *c = conn_new();
    pthread_barrier_wait(l->bar);
    if (!c)
        return NULL;
    uint64_t rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(l->idx + 1);
    for (int k = l->idx; k < LOAD_KEYS; k += LOAD_THREADS) {
        load_one(c, k);
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        if (rng % 4 == 0)
            load_one(c, k); /* an immediate retry */
        if (rng % 5 == 0 && k >= 2 * LOAD_THREADS)
            load_one(c, k - (int)(rng % (2 * LOAD_THREADS))); /* a late retry of some key */
        if (rng % 7 == 0)
            load_one(c, (k + 1) % LOAD_KEYS); /* a retry racing the key's own thread */
    }
    PQfinish(c);
    return NULL;
}

static void test_load_with_retries(void)
{
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, LOAD_THREADS);
    pthread_t th[LOAD_THREADS];
    loader_t ls[LOAD_THREADS];
    int64_t t0 = tp_now_ms();
    int sends0 = sends, resends0 = resends;
    for (int i = 0; i < LOAD_THREADS; i++) {
        ls[i] = (loader_t){i, &bar};
        pthread_create(&th[i], NULL, load_main, &ls[i]);
    }
    for (int i = 0; i < LOAD_THREADS; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&bar);
    printf("# load: %d keys from %d threads with random retries in %lld ms: %d statements, "
           "%d re-sent after a key race\n",
           LOAD_KEYS, LOAD_THREADS, (long long)(tp_now_ms() - t0), sends - sends0,
           resends - resends0);
    CHECK_INT_EQ(load_bad, 0);
    CHECK_INT_EQ(count("SELECT count(*) FROM app.user_notes WHERE note LIKE 'load %'"), LOAD_KEYS);
    CHECK_INT_EQ(count("SELECT count(DISTINCT note) FROM app.user_notes WHERE note LIKE 'load %'"),
                 LOAD_KEYS);
    CHECK_INT_EQ(
        count("SELECT count(*) FROM tidepool.audit_log WHERE after->>'note' LIKE 'load %'"),
        LOAD_KEYS);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.idempotency_keys WHERE key LIKE 'load-%'"),
                 LOAD_KEYS);
    for (int k = 0; k < LOAD_KEYS; k++)
        free(load_answers[k]);
}

/* ---- trail, errors, scoping ---- */

static void test_outbox_trail(void)
{
    tp_wb_answer_t a;
    const char *t = "app.device_assignments";
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_INSERT, .body = "{\"device_id\":5,\"user_id\":2,\"note\":\"wrist\"}"},
            &a),
        201);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_UPDATE, .pk = "5", .body = "{\"user_id\":3}", .if_match = "\"1\""},
            &a),
        200);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){t, TP_WB_DELETE, .pk = "5", .if_match = "\"2\""}, &a), 200);
    tp_wb_answer_free(&a);
    char *v = tp_test_sql(
        dsn, "SELECT string_agg(o.op || ':' || o.warehouse_table || ':' || o.pk::text || ':' || "
             "COALESCE(o.row->>'user_id', '-') || ':' || (o.audit_id = a.id), ',' ORDER BY o.id) "
             "FROM tidepool.writeback_outbox o JOIN tidepool.audit_log a ON a.id = o.audit_id "
             "WHERE o.pk = '{\"device_id\": 5}'");
    CHECK_STR_EQ(v, "insert:demo.iot.device_assignments:{\"device_id\": 5}:2:true,"
                    "update:demo.iot.device_assignments:{\"device_id\": 5}:3:true,"
                    "delete:demo.iot.device_assignments:{\"device_id\": 5}:-:true");
    free(v);
    /* a failing write leaves no audit and no outbox row: the second row breaks a CHECK */
    long long audit = count("SELECT count(*) FROM tidepool.audit_log");
    long long outbox = count("SELECT count(*) FROM tidepool.writeback_outbox");
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_INSERT,
                     .body = "[{\"device_id\":6,\"user_id\":2},{\"device_id\":7,\"user_id\":0}]"},
            &a),
        422);
    CHECK_CONTAINS(a.body, "\"code\":\"check-violation\"");
    CHECK_ERROR(a.body, "user_id", "device_assignments_user_id_check");
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log"), audit);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.writeback_outbox"), outbox);
    CHECK_INT_EQ(count("SELECT count(*) FROM app.device_assignments WHERE device_id IN (6, 7)"), 0);
}

static void test_error_mapping(void)
{
    tp_wb_answer_t a;
    /* 23505 unique: names the constraint and its columns */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.parent", TP_WB_INSERT, .body = "{\"id\":2,\"code\":\"p1\"}"}, &a), 409);
    CHECK_FIELD(a.body, "code", "unique-violation");
    CHECK_CONTAINS(a.body, "parent_code_key");
    CHECK_ERROR(a.body, "code", "must be unique");
    tp_wb_answer_free(&a);
    /* 23503 referencing a missing row: 422 naming the column */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_INSERT, .body = "{\"a\":3,\"b\":\"z\",\"parent_id\":42}"},
            &a),
        422);
    CHECK_FIELD(a.body, "code", "foreign-key-violation");
    CHECK_ERROR(a.body, "parent_id", "refers to a missing row");
    tp_wb_answer_free(&a);
    /* 23503 deleting a referenced row: 409 */
    CHECK_INT_EQ(run(&(req_t){"wbt.parent", TP_WB_DELETE, .pk = "1"}, &a), 409);
    CHECK_FIELD(a.body, "code", "foreign-key-violation");
    CHECK_CONTAINS(a.body, "child_parent_fk");
    tp_wb_answer_free(&a);
    /* 23514 check: names the constraint */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_INSERT, .body = "{\"a\":4,\"b\":\"z\",\"ratio\":500}"}, &a),
        422);
    CHECK_CONTAINS(a.body, "child_ratio_ck");
    CHECK_ERROR(a.body, "ratio", "child_ratio_ck");
    tp_wb_answer_free(&a);
    /* 22xxx data exception: numeric(30,10) overflow */
    CHECK_INT_EQ(
        run(&(req_t){"wbt.child", TP_WB_INSERT, .body = "{\"a\":5,\"b\":\"z\",\"amount\":1e40}"},
            &a),
        422);
    CHECK_FIELD(a.body, "code", "invalid-value");
    tp_wb_answer_free(&a);
    /* 23502 not null (a CHECK-less NOT NULL the validator could not see: a default
     * expression that yields NULL) */
    exec_ok(main_conn, "ALTER TABLE wbt.parent ADD COLUMN must text NOT NULL DEFAULT 'm'");
    exec_ok(main_conn, "ALTER TABLE wbt.parent ALTER COLUMN must SET DEFAULT NULL");
    CHECK_INT_EQ(run(&(req_t){"wbt.parent", TP_WB_INSERT, .body = "{\"id\":9}"}, &a), 422);
    CHECK_FIELD(a.body, "code", "not-null-violation");
    CHECK_ERROR(a.body, "must", "must not be null");
    tp_wb_answer_free(&a);
    exec_ok(main_conn, "ALTER TABLE wbt.parent DROP COLUMN must");
    /* a lost connection: 503 with Retry-After and what to do */
    const tp_wb_table_t *t = T("app.user_notes");
    tp_wb_request_t r = {.op = TP_WB_INSERT,
                         .method = "POST",
                         .path = "/p",
                         .body = "{\"user_id\":1,\"note\":\"n\"}",
                         .body_len = 24,
                         .idem_key = "k-lost",
                         .actor = "alice",
                         .key_ttl_s = 60};
    tp_wb_call_t *call;
    CHECK(t && tp_wb_prepare(t, &r, &call, &a));
    if (call) {
        CHECK_INT_EQ(tp_wb_finish(call, NULL, "server closed the connection", &a), TP_WB_ANSWER);
        CHECK_INT_EQ(a.status, 503);
        CHECK_INT_EQ(a.retry_after_s, 1);
        CHECK_CONTAINS(a.body, "retry with the same Idempotency-Key");
        tp_wb_answer_free(&a);
        tp_wb_call_free(call);
    }
    /* serialization failures are resent (the statement wrote nothing), then 503 */
    PGresult *ser =
        PQexec(main_conn, "DO $$BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END$$");
    CHECK(t && tp_wb_prepare(t, &r, &call, &a));
    if (call) {
        CHECK_INT_EQ(tp_wb_finish(call, ser, NULL, &a), TP_WB_RESEND);
        CHECK_INT_EQ(tp_wb_finish(call, ser, NULL, &a), TP_WB_RESEND);
        CHECK_INT_EQ(tp_wb_finish(call, ser, NULL, &a), TP_WB_ANSWER);
        CHECK_INT_EQ(a.status, 503);
        tp_wb_answer_free(&a);
        tp_wb_call_free(call);
    }
    PQclear(ser);
}

static void test_owner_scoping(void)
{
    char *id = new_note("carol", "mine");
    tp_wb_answer_t a;
    /* another actor cannot see, change or delete it */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id, .body = "{\"note\":\"x\"}",
                              .actor = "mallory"},
                     &a),
                 404);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_DELETE, .pk = id, .actor = "mallory"}, &a),
                 404);
    tp_wb_answer_free(&a);
    char body[96];
    snprintf(body, sizeof body, "[{\"id\":%s,\"changes\":{\"note\":\"x\"}}]", id);
    CHECK_INT_EQ(
        run(&(req_t){"app.user_notes", TP_WB_UPDATE, .body = body, .actor = "mallory"}, &a), 404);
    tp_wb_answer_free(&a);
    /* the owner can */
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id,
                              .body = "{\"note\":\"still\"}", .actor = "carol"},
                     &a),
                 200);
    CHECK_FIELD(a.body, "author", "carol");
    tp_wb_answer_free(&a);
    char sql[400];
    snprintf(sql, sizeof sql, "SELECT note FROM app.user_notes WHERE id = %s", id);
    char *v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "still");
    free(v);
    free(id);
}

/* A connection killed while its write waits on a lock: nothing is written, the
 * answer is 503, and a retry with the same Idempotency-Key writes once. */
static void test_connection_lost(void)
{
    PGconn *holder = conn_new(), *victim = conn_new();
    if (!holder || !victim)
        goto out;
    char *id = new_note("alice", "locked");
    char sql[200];
    exec_ok(holder, "BEGIN");
    snprintf(sql, sizeof sql, "SELECT 1 FROM app.user_notes WHERE id = %s FOR UPDATE", id);
    exec_ok(holder, sql);
    const tp_wb_table_t *t = T("app.user_notes");
    char path[64];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%s", id);
    tp_wb_request_t r = {.op = TP_WB_UPDATE,
                         .method = "PATCH",
                         .path = path,
                         .pk = id,
                         .body = "{\"note\":\"after\"}",
                         .body_len = 16,
                         .idem_key = "k-kill",
                         .actor = "alice",
                         .key_ttl_s = 60};
    tp_wb_call_t *call;
    tp_wb_answer_t a;
    if (!t || !tp_wb_prepare(t, &r, &call, &a)) {
        CHECK_MSG(false, "prepare: %s", a.body ? a.body : "");
        tp_wb_answer_free(&a);
        goto out_id;
    }
    CHECK(PQsendQueryParams(victim, call->sql, call->nparams, NULL, call->params, NULL, NULL, 0));
    /* wait until it is blocked on the lock, then kill its backend */
    char *pid = tp_xasprintf("%d", PQbackendPID(victim));
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
             pid);
    int64_t deadline = tp_now_ms() + 10000;
    while (count(sql) != 1 && tp_now_ms() < deadline)
        ;
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%s)::text", pid);
    char *killed = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(killed, "true");
    free(killed);
    free(pid);
    PGresult *res = PQgetResult(victim);
    tp_wb_next_t next =
        tp_wb_finish(call, res, PQstatus(victim) == CONNECTION_OK ? NULL : "lost", &a);
    PQclear(res);
    while ((res = PQgetResult(victim)) != NULL)
        PQclear(res);
    CHECK_INT_EQ(next, TP_WB_ANSWER);
    CHECK_INT_EQ(a.status, 503);
    CHECK(a.retry_after_s > 0);
    CHECK_CONTAINS(a.body, "retry with the same Idempotency-Key");
    tp_wb_answer_free(&a);
    exec_ok(holder, "COMMIT");
    snprintf(sql, sizeof sql,
             "SELECT note || version || (SELECT count(*) FROM tidepool.audit_log WHERE pk->>'id' = "
             "'%s' AND action = 'update') FROM app.user_notes WHERE id = %s",
             id, id);
    char *v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "locked10"); /* nothing written, no audit row */
    free(v);
    /* the retry (a new connection, the same call) writes once */
    tp_wb_call_free(call);
    CHECK_INT_EQ(run(&(req_t){"app.user_notes", TP_WB_UPDATE, .pk = id,
                              .body = "{\"note\":\"after\"}", .key = "k-kill"},
                     &a),
                 200);
    CHECK(!a.replayed);
    tp_wb_answer_free(&a);
    v = tp_test_sql(dsn, sql);
    CHECK_STR_EQ(v, "after21");
    free(v);
out_id:
    free(id);
out:
    PQfinish(holder);
    PQfinish(victim);
}

/* ---- outbox shipper ---- */

/* What the emulator's dialect bridge does to the MERGE: drops the catalog, turns
 * backticks into double quotes and :name into ($n::pgtype). Returns Postgres SQL. */
static char *bridge(const tp_wb_batch_t *b)
{
    tp_buf_t q = {0};
    for (const char *p = b->sql; *p;) {
        if (strncmp(p, "`demo`.", 7) == 0) {
            p += 7;
        } else if (*p == '`') {
            tp_buf_putc(&q, '"');
            p++;
        } else if (*p == ':' && p[1] != ':' && (p == b->sql || p[-1] != ':')) {
            size_t n = strspn(p + 1, "abcdefghijklmnopqrstuvwxyz0123456789_");
            size_t k = 0;
            while (k < b->nparams &&
                   (strlen(b->params[k].name) != n || strncmp(b->params[k].name, p + 1, n) != 0))
                k++;
            CHECK_MSG(k < b->nparams, "unknown parameter %.*s", (int)n, p + 1);
            const char *ty = k < b->nparams ? b->params[k].type : "STRING";
            static const char *map[][2] = {{"SMALLINT", "int2"},
                                           {"INT", "int4"},
                                           {"BIGINT", "int8"},
                                           {"DOUBLE", "float8"},
                                           {"FLOAT", "float4"},
                                           {"BOOLEAN", "boolean"},
                                           {"DATE", "date"},
                                           {"TIMESTAMP", "timestamptz"},
                                           {"TIMESTAMP_NTZ", "timestamp"},
                                           {"STRING", "text"}};
            const char *pg = strncmp(ty, "DECIMAL", 7) == 0 ? "numeric" : NULL;
            for (size_t m = 0; !pg && m < TP_ARRAY_LEN(map); m++)
                if (strcmp(map[m][0], ty) == 0)
                    pg = map[m][1];
            CHECK_MSG(pg != NULL, "type %s", ty);
            tp_buf_printf(&q, "($%zu::%s)", k + 1, pg ? pg : "text");
            p += 1 + n;
        } else {
            tp_buf_putc(&q, *p++);
        }
    }
    return tp_buf_steal(&q);
}

static bool merge_on_lakehouse(const tp_wb_batch_t *b)
{
    char *sql = bridge(b);
    const char **vals = tp_xcalloc(b->nparams + 1, sizeof *vals);
    for (size_t i = 0; i < b->nparams; i++)
        vals[i] = b->params[i].value;
    PGresult *r = PQexecParams(main_conn, sql, (int)b->nparams, NULL, vals, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    CHECK_MSG(ok, "MERGE: %s\n%s", PQresultErrorMessage(r), sql);
    PQclear(r);
    free(vals);
    free(sql);
    return ok;
}

/* Ships everything due; each MERGE runs twice (a crash before the bookkeeping makes
 * the daemon ship the same batch again), and every other batch is first left
 * unmarked and fetched anew. Returns the number of batches. */
static int ship_all(void)
{
    int batches = 0;
    for (int round = 0; round < 100; round++) {
        tp_wb_batch_t *b;
        char err[512] = "";
        int rc = tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err);
        CHECK_MSG(rc >= 0, "%s", err);
        if (rc <= 0)
            return batches;
        CHECK_STR_EQ(b->warehouse_table, "demo.iot.device_assignments");
        if (!merge_on_lakehouse(b) || !merge_on_lakehouse(b)) {
            tp_wb_batch_free(b);
            return batches;
        }
        if (round % 2 == 0) { /* "crashed" before marking: the next call returns it again */
            tp_wb_batch_t *again;
            CHECK_INT_EQ(tp_wb_ship_next(main_conn, schema, 50, &again, err, sizeof err), 1);
            CHECK_INT_EQ(again->nids, b->nids);
            CHECK(again->ids[0] == b->ids[0]);
            CHECK(merge_on_lakehouse(again));
            tp_wb_batch_free(b);
            b = again;
        }
        CHECK_MSG(tp_wb_ship_done(main_conn, b, true, "stmt-1", NULL, err, sizeof err), "%s", err);
        tp_wb_batch_free(b);
        batches++;
    }
    return batches;
}

static void check_lakehouse_matches(void)
{
    CHECK_INT_EQ(count("SELECT count(*) FROM ((SELECT * FROM app.device_assignments EXCEPT "
                       "SELECT * FROM iot.device_assignments) UNION ALL (SELECT * FROM "
                       "iot.device_assignments EXCEPT SELECT * FROM app.device_assignments)) d"),
                 0);
    CHECK_INT_EQ(count(TP_WB_BACKLOG_SQL), 0);
}

static void test_outbox_ship(void)
{
    exec_ok(main_conn, "CREATE SCHEMA iot; CREATE TABLE iot.device_assignments (LIKE "
                       "app.device_assignments)");
    /* what earlier tests left: device 5 inserted, updated, deleted; device 77 inserted */
    CHECK(count(TP_WB_BACKLOG_SQL) >= 4);
    CHECK(ship_all() >= 3); /* device 5's three changes need three batches, in order */
    check_lakehouse_matches();
    CHECK_INT_EQ(count("SELECT count(*) FROM iot.device_assignments WHERE device_id = 77"), 1);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS NULL "
                       "OR statement_id <> 'stmt-1' OR attempts < 1"),
                 0);

    /* many keys, several changes each, a bulk PATCH among them */
    tp_wb_answer_t a;
    const char *t = "app.device_assignments";
    for (int d = 100; d < 110; d++) {
        char body[96];
        snprintf(body, sizeof body, "{\"device_id\":%d,\"user_id\":%d,\"note\":\"n%d\"}", d,
                 d % 3 + 1, d);
        CHECK_INT_EQ(run(&(req_t){t, TP_WB_INSERT, .body = body}, &a), 201);
        tp_wb_answer_free(&a);
    }
    CHECK_INT_EQ(run(&(req_t){t, TP_WB_UPDATE,
                              .body = "[{\"device_id\":100,\"if_match\":1,\"changes\":"
                                      "{\"note\":\"b\"}},{\"device_id\":101,\"if_match\":1,"
                                      "\"changes\":{\"note\":null}}]"},
                     &a),
                 200);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_UPDATE, .pk = "100", .if_match = "\"2\"", .body = "{\"user_id\":9}"},
            &a),
        200);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){t, TP_WB_DELETE, .pk = "102", .if_match = "\"1\""}, &a), 200);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(run(&(req_t){t, TP_WB_INSERT, .body = "{\"device_id\":102,\"user_id\":4}"}, &a),
                 201);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(ship_all(), 3);
    check_lakehouse_matches();

    /* a failed shipment backs off and is retried later, keeping the order */
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_UPDATE, .pk = "103", .if_match = "\"1\"", .body = "{\"note\":\"f\"}"},
            &a),
        200);
    tp_wb_answer_free(&a);
    tp_wb_batch_t *b;
    char err[512] = "";
    CHECK_INT_EQ(tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err), 1);
    CHECK(tp_wb_ship_done(main_conn, b, false, "stmt-x", "HTTP 503 from the warehouse", err,
                          sizeof err));
    tp_wb_batch_free(b);
    CHECK_INT_EQ(
        count("SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS NULL AND "
              "attempts = 1 AND last_error = 'HTTP 503 from the warehouse' AND "
              "next_attempt_at > now()"),
        1);
    CHECK_INT_EQ(tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err), 0); /* backing off */
    CHECK_INT_EQ(count(TP_WB_BACKLOG_SQL), 1);
    exec_ok(
        main_conn,
        "UPDATE tidepool.writeback_outbox SET next_attempt_at = now() WHERE shipped_at IS NULL");
    CHECK_INT_EQ(ship_all(), 1);
    check_lakehouse_matches();
}

/* The shipper against the project's warehouse emulator over real HTTP: the MERGE
 * text and typed parameters go through tp_wh_run and the emulator's dialect bridge
 * into a separate "lakehouse" database. The warehouse down: the attempt is recorded
 * and backed off; a re-shipped batch (crash before the bookkeeping) changes nothing. */
#define EMU_TOKEN "dapi-writeback-test"

static bool noop_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *rows, void *arg)
{
    (void)st, (void)rows, (void)arg;
    return true;
}

static void noop_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    (void)st, (void)res, (void)arg;
}

/* Runs the batch's MERGE on the warehouse; fills *stmt_id / *error (owned). */
static bool ship_to_warehouse(const tp_wh_config_t *cfg, const tp_wb_batch_t *b, char **stmt_id,
                              char **error)
{
    tp_wh_param_t *ps = tp_xcalloc(b->nparams, sizeof *ps);
    for (size_t i = 0; i < b->nparams; i++)
        ps[i] = (tp_wh_param_t){b->params[i].name, b->params[i].value, b->params[i].type};
    tp_wh_request_t req;
    tp_wh_request_init(&req);
    req.sql = b->sql;
    req.params = ps;
    req.n_params = b->nparams;
    req.on_rows = noop_rows;
    req.on_done = noop_done;
    req.label = "writeback-outbox";
    tp_wh_result_t res;
    bool ok = tp_wh_run(cfg, &req, &res);
    *stmt_id = res.statement_id ? tp_xstrdup(res.statement_id) : NULL;
    *error =
        ok ? NULL
           : tp_xasprintf("%s: %s", tp_wh_status_name(res.status), res.message ? res.message : "?");
    tp_wh_result_clear(&res);
    free(ps);
    return ok;
}

static char *table_text(const char *conninfo)
{
    return tp_test_sql(conninfo, "SELECT string_agg(d::text, E'\\n' ORDER BY device_id) FROM "
                                 "(SELECT device_id, user_id, assigned_at, note, updated_at, "
                                 "version FROM iot.device_assignments) d");
}

static void test_outbox_emulator(void)
{
    char *lake = tp_test_new_db("wb_lake");
    if (!lake)
        return;
    PGconn *lc = PQconnectdb(lake);
    exec_ok(lc, "CREATE SCHEMA iot; CREATE TABLE iot.device_assignments (device_id integer "
                "PRIMARY KEY, user_id integer NOT NULL, assigned_at timestamptz NOT NULL, note "
                "varchar(200), updated_at timestamptz NOT NULL, version bigint NOT NULL)");
    PQfinish(lc);

    int port = tp_test_free_port();
    char listen[32], url[48];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    snprintf(url, sizeof url, "http://%s", listen);
    char *log = tp_xasprintf("%s/emulator.log", tp_test_tmpdir());
    tp_wh_config_t cfg;
    tp_wh_config_init(&cfg);
    cfg.host = url;
    cfg.warehouse_id = "tidepool-local";
    cfg.token = EMU_TOKEN;
    cfg.poll_initial_ms = 20;
    cfg.poll_max_ms = 200;
    cfg.retry_budget_ms = 600;
    cfg.retry_max_ms = 200;
    cfg.connect_timeout_ms = 1000;

    /* changes made while the warehouse is down */
    tp_wb_answer_t a;
    const char *t = "app.device_assignments";
    CHECK_INT_EQ(run(&(req_t){t, TP_WB_INSERT,
                              .body = "[{\"device_id\":300,\"user_id\":1,\"note\":"
                                      "\"it's \\\"quoted\\\" \\u00e9\"},{\"device_id\":301,"
                                      "\"user_id\":2}]"},
                     &a),
                 201);
    tp_wb_answer_free(&a);
    CHECK_INT_EQ(
        run(&(req_t){t, TP_WB_UPDATE, .pk = "300", .if_match = "\"1\"", .body = "{\"user_id\":5}"},
            &a),
        200);
    tp_wb_answer_free(&a);
    char err[512] = "";
    tp_wb_batch_t *b;
    CHECK_INT_EQ(tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err), 1);
    char *sid = NULL, *why = NULL;
    if (b) {
        CHECK(!ship_to_warehouse(&cfg, b, &sid, &why));
        CHECK_MSG(tp_wb_ship_done(main_conn, b, false, sid, why, err, sizeof err), "%s", err);
        tp_wb_batch_free(b);
        free(sid);
        free(why);
    }
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS NULL "
                       "AND attempts = 1 AND last_error IS NOT NULL"),
                 2);
    CHECK_INT_EQ(tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err), 0);
    exec_ok(main_conn, "UPDATE tidepool.writeback_outbox SET next_attempt_at = now() WHERE "
                       "shipped_at IS NULL");

    /* the warehouse is back */
    char *argv[] = {(char *)tp_test_bin("tidepool-warehouse"),
                    "--listen",
                    listen,
                    "--dsn",
                    lake,
                    "--token",
                    EMU_TOKEN,
                    NULL};
    pid_t pid = tp_test_spawn(argv, log);
    CHECK(pid > 0 && tp_test_wait_port(port, 10000));
    int batches = 0;
    for (int round = 0; round < 20; round++) {
        int rc = tp_wb_ship_next(main_conn, schema, 50, &b, err, sizeof err);
        CHECK_MSG(rc >= 0, "%s", err);
        if (rc <= 0)
            break;
        bool ok = ship_to_warehouse(&cfg, b, &sid, &why);
        CHECK_MSG(ok, "ship: %s", why ? why : "");
        if (ok && round == 0) { /* crash before the bookkeeping: shipped again below */
            free(sid);
            free(why);
            tp_wb_batch_free(b);
            continue;
        }
        CHECK_MSG(tp_wb_ship_done(main_conn, b, ok, sid, why, err, sizeof err), "%s", err);
        CHECK(!ok || sid != NULL);
        free(sid);
        free(why);
        tp_wb_batch_free(b);
        batches++;
        if (!ok)
            break;
    }
    CHECK_INT_EQ(batches, 2); /* 300 and 301 first, then 300's update */
    CHECK_INT_EQ(count(TP_WB_BACKLOG_SQL), 0);
    /* the local rows written since the warehouse came into play, as the lakehouse has them */
    exec_ok(main_conn, "DROP TABLE iot.device_assignments; CREATE TABLE iot.device_assignments "
                       "AS SELECT * FROM app.device_assignments WHERE device_id >= 300");
    char *want = table_text(dsn), *got = table_text(lake);
    CHECK_STR_EQ(got, want);
    CHECK_CONTAINS(got, "(300,5,");
    free(want);
    free(got);
    CHECK_INT_EQ(tp_test_stop(pid, 5000), 0);
    free(log);
    free(lake);
}

/* Round-trip time of one insert with idempotency key and audit row, the statement
 * prepared as the server's pool does: a sequential loop on one connection, then
 * pgbench running the very same statement. Printed for the report; the loop must
 * write exactly one row per request. */
static void test_latency(void)
{
    enum { N = 2000 };
    const tp_wb_table_t *t = T("app.user_notes");
    if (!t)
        return;
    PGresult *p = PQprepare(main_conn, "wb_ins", t->sql[TP_WB_INSERT], 9, NULL);
    CHECK_INT_EQ(PQresultStatus(p), PGRES_COMMAND_OK);
    PQclear(p);
    int64_t t0 = tp_now_us();
    for (int i = 0; i < N; i++) {
        char key[32], body[64], path[] = "/api/v1/tables/app.user_notes";
        snprintf(key, sizeof key, "lat-%d", i);
        snprintf(body, sizeof body, "{\"user_id\":%d,\"note\":\"lat\"}", i % 100 + 1);
        tp_wb_request_t r = {.op = TP_WB_INSERT,
                             .method = "POST",
                             .path = path,
                             .body = body,
                             .body_len = strlen(body),
                             .idem_key = key,
                             .actor = "alice",
                             .request_id = "lat",
                             .key_ttl_s = 3600};
        tp_wb_call_t *call;
        tp_wb_answer_t a;
        if (!tp_wb_prepare(t, &r, &call, &a)) {
            CHECK_INT_EQ(a.status, 201);
            tp_wb_answer_free(&a);
            return;
        }
        PGresult *res = PQexecPrepared(main_conn, "wb_ins", 9, call->params, NULL, NULL, 0);
        tp_wb_finish(call, res, NULL, &a);
        PQclear(res);
        tp_wb_call_free(call);
        int st = a.status;
        tp_wb_answer_free(&a);
        if (st != 201) {
            CHECK_INT_EQ(st, 201);
            return;
        }
    }
    int64_t us = tp_now_us() - t0;
    printf("# write-back insert + audit row + idempotency key, prepared, 1 connection, "
           "sequential: %d in %.2f s = %.0f us each (%.0f/s)\n",
           N, us / 1e6, (double)us / N, N * 1e6 / (double)us);
    CHECK_INT_EQ(count("SELECT count(*) FROM app.user_notes WHERE note = 'lat'"), N);
    CHECK_INT_EQ(count("SELECT count(*) FROM tidepool.audit_log WHERE request_id = 'lat'"), N);

    /* pgbench, the same statement with literal parameters and a random key */
    char *out = NULL;
    if (tp_test_cmd("command -v pgbench", &out) != 0) {
        free(out);
        return;
    }
    free(out);
    tp_buf_t sc = {0};
    tp_buf_puts(&sc, "\\set k random(1, 1000000000000)\n");
    static const char *vals[] = {
        "'bench'",
        "'req'",
        "('k' || :k)",
        "'0000000000000000000000000000000000000000000000000000000000000000'",
        "3600",
        "'POST'",
        "'/api/v1/tables/app.user_notes'",
        "'[{\"user_id\":1,\"note\":\"bench\"}]'",
        "true"};
    for (const char *q = t->sql[TP_WB_INSERT]; *q; q++) {
        if (*q == '$' && q[1] >= '1' && q[1] <= '9') {
            tp_buf_puts(&sc, vals[q[1] - '1']);
            q++;
        } else {
            tp_buf_putc(&sc, *q);
        }
    }
    tp_buf_puts(&sc, ";\n");
    char *script = tp_test_write_tmp("wb.pgbench", sc.data);
    tp_buf_free(&sc);
    for (int clients = 1; clients <= 4; clients *= 4) {
        char *cmd = tp_xasprintf("pgbench -n -M prepared -T 4 -c %d -j %d -f %s '%s' 2>&1 | "
                                 "grep -E '^(tps|latency average)'",
                                 clients, clients > 1 ? 2 : 1, script, dsn);
        int rc = tp_test_cmd(cmd, &out);
        CHECK_INT_EQ(rc, 0);
        for (char *line = strtok(out ? out : (char[]){""}, "\n"); line; line = strtok(NULL, "\n"))
            printf("# pgbench, same statement, -c %d: %s\n", clients, line);
        free(out);
        free(cmd);
    }
    free(script);
    CHECK(count("SELECT count(*) FROM tidepool.audit_log WHERE actor = 'bench'") > 0);
}

int main(void)
{
    if (!tp_test_dsn()) {
        tp_test_skip("test_writeback", "no harness Postgres");
        return tp_test_done();
    }
    if (!TP_RUN(test_setup))
        return tp_test_done();
    main_conn = conn_new();
    TP_RUN(test_reflect_demo);
    TP_RUN(test_reflect_errors);
    TP_RUN(test_json_schema);
    TP_RUN(test_validation);
    TP_RUN(test_insert);
    TP_RUN(test_patch_and_if_match);
    TP_RUN(test_delete);
    TP_RUN(test_composite_key);
    TP_RUN(test_bulk_patch);
    TP_RUN(test_idempotency);
    TP_RUN(test_idempotency_race);
    TP_RUN(test_concurrent_patch);
    TP_RUN(test_load_with_retries);
    TP_RUN(test_outbox_trail);
    TP_RUN(test_error_mapping);
    TP_RUN(test_owner_scoping);
    TP_RUN(test_connection_lost);
    TP_RUN(test_outbox_ship);
    TP_RUN(test_outbox_emulator);
    TP_RUN(test_latency);
    PQfinish(main_conn);
    tp_wb_schema_unref(schema);
    return tp_test_done();
}
