/* Unit tests for the write-back pieces that need no database: the @writable comment
 * grammar, text-form value checks (URL keys) and primary key splitting. */
#include "tidepool/writeback.h"

#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"

static int parse(const char *comment, tp_wb_decl_t *d, char *err, size_t n)
{
    err[0] = '\0';
    return tp_wb_parse_comment("app.t", comment, d, err, n);
}

static void test_grammar_full(void)
{
    tp_wb_decl_t d;
    char err[512];
    CHECK_INT_EQ(parse("Notes. @writable roles=writer,admin read=reader if_match=required "
                       "owner=author version=rev touch=updated_at readonly=created_at,x "
                       "mirror=demo.iot.notes @expose max_limit=5",
                       &d, err, sizeof err),
                 1);
    CHECK_STR_EQ(d.write_roles[0], "writer");
    CHECK_STR_EQ(d.write_roles[1], "admin");
    CHECK(d.write_roles[2] == NULL);
    CHECK_STR_EQ(d.read_roles[0], "reader");
    CHECK(d.if_match_required);
    CHECK_STR_EQ(d.owner, "author");
    CHECK_STR_EQ(d.version, "rev");
    CHECK_STR_EQ(d.touch, "updated_at");
    CHECK_STR_EQ(d.readonly[1], "x");
    CHECK_STR_EQ(d.mirror, "demo.iot.notes");
    tp_wb_decl_free(&d);

    CHECK_INT_EQ(parse("@writable roles=writer", &d, err, sizeof err), 1);
    CHECK(!d.if_match_required);
    CHECK(d.read_roles == NULL && d.mirror == NULL && d.owner == NULL);
    tp_wb_decl_free(&d);
}

static void test_grammar_absent(void)
{
    tp_wb_decl_t d;
    char err[512];
    CHECK_INT_EQ(parse(NULL, &d, err, sizeof err), 0);
    CHECK_INT_EQ(parse("just a table", &d, err, sizeof err), 0);
    CHECK_INT_EQ(parse("not@writable roles=x", &d, err, sizeof err), 0);
    CHECK_INT_EQ(parse("@writableX roles=x", &d, err, sizeof err), 0);
}

static void expect_error(const char *comment, const char *needle)
{
    tp_wb_decl_t d;
    char err[512];
    int rc = parse(comment, &d, err, sizeof err);
    CHECK_MSG(rc == -1, "'%s' parsed (rc %d)", comment, rc);
    CHECK_CONTAINS(err, "app.t: @writable comment: ");
    CHECK_CONTAINS(err, needle);
}

static void test_grammar_errors(void)
{
    expect_error("@writable", "roles=ROLE[,ROLE...] is required");
    expect_error("@writable read=reader", "roles=ROLE");
    expect_error("@writable roles=writer colour=blue",
                 "unknown key 'colour' in token 'colour=blue'");
    expect_error("@writable roles=writer owner", "token 'owner' is not key=value");
    expect_error("@writable roles=writer owner=", "token 'owner=' is not key=value");
    expect_error("@writable roles=writer =x", "token '=x' is not key=value");
    expect_error("@writable roles=writer roles=admin", "key 'roles' given twice");
    expect_error("@writable roles=writer if_match=always", "if_match is 'required' or 'optional'");
    expect_error("@writable roles=writer if_match=required if_match=optional", "given twice");
    expect_error("@writable roles=writer mirror=iot.t", "mirror is catalog.schema.table");
    expect_error("@writable roles=writer mirror=a.b.c.d", "mirror is catalog.schema.table");
    expect_error("@writable roles=writer mirror=a.b.", "mirror is catalog.schema.table");
    expect_error("@writable roles=writer,,admin", "comma-separated list");
    expect_error("@writable roles=writer owner=a;drop", "'a;drop' is not a column name");
    expect_error("@writable roles=writer readonly=1x", "comma-separated list");
}

static void test_check_text(void)
{
    CHECK(tp_wb_check_text(TP_WB_INT2, -1, "32767") == NULL);
    CHECK_CONTAINS(tp_wb_check_text(TP_WB_INT2, -1, "32768"), "between -32768 and 32767");
    CHECK(tp_wb_check_text(TP_WB_INT4, -1, "-2147483648") == NULL);
    CHECK(tp_wb_check_text(TP_WB_INT4, -1, "2147483648") != NULL);
    CHECK(tp_wb_check_text(TP_WB_INT8, -1, "9223372036854775807") == NULL);
    CHECK(tp_wb_check_text(TP_WB_INT8, -1, "9223372036854775808") != NULL);
    CHECK(tp_wb_check_text(TP_WB_INT4, -1, "12a") != NULL);
    CHECK(tp_wb_check_text(TP_WB_INT4, -1, "") != NULL);
    CHECK(tp_wb_check_text(TP_WB_NUMERIC, -1, "-12.5e3") == NULL);
    CHECK(tp_wb_check_text(TP_WB_NUMERIC, -1, "0x10") != NULL);
    CHECK(tp_wb_check_text(TP_WB_FLOAT, -1, "nan") != NULL);
    CHECK(tp_wb_check_text(TP_WB_FLOAT, -1, "1e999") != NULL);
    CHECK(tp_wb_check_text(TP_WB_BOOL, -1, "true") == NULL);
    CHECK(tp_wb_check_text(TP_WB_BOOL, -1, "yes") != NULL);
    CHECK(tp_wb_check_text(TP_WB_TEXT, 3, "h\xc3\xa9h") == NULL); /* 3 characters, 4 bytes */
    CHECK_CONTAINS(tp_wb_check_text(TP_WB_TEXT, 3, "abcd"), "longer than 3 characters");
    CHECK(tp_wb_check_text(TP_WB_DATE, -1, "2024-02-29") == NULL);
    CHECK(tp_wb_check_text(TP_WB_DATE, -1, "2023-02-29") != NULL);
    CHECK(tp_wb_check_text(TP_WB_DATE, -1, "2023-13-01") != NULL);
    CHECK(tp_wb_check_text(TP_WB_DATE, -1, "2023-1-01") != NULL);
    CHECK(tp_wb_check_text(TP_WB_DATE, -1, "2023-01-01x") != NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "2025-01-31T12:00:00Z") == NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "2025-01-31 12:00:00.123456+05:30") == NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "2025-01-31T12:00-08") == NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "2025-01-31T12:00:00") != NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "2025-01-31T24:00:00Z") != NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMPTZ, -1, "yesterday") != NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMP, -1, "2025-01-31T12:00:00") == NULL);
    CHECK(tp_wb_check_text(TP_WB_TIMESTAMP, -1, "2025-01-31T12:00:00Z") != NULL);
    CHECK(tp_wb_check_text(TP_WB_UUID, -1, "123e4567-e89b-12d3-a456-426614174000") == NULL);
    CHECK(tp_wb_check_text(TP_WB_UUID, -1, "123e4567e89b12d3a456426614174000") != NULL);
    CHECK(tp_wb_check_text(TP_WB_UUID, -1, "123e4567-e89b-12d3-a456-42661417400g") != NULL);
}

static void test_split_pk(void)
{
    char **v;
    CHECK(tp_wb_split_pk("42", 1, &v));
    CHECK_STR_EQ(v[0], "42");
    free(v[0]);
    free(v);
    CHECK(tp_wb_split_pk("7,a%2Cb%20c", 2, &v));
    CHECK_STR_EQ(v[0], "7");
    CHECK_STR_EQ(v[1], "a,b c");
    free(v[0]);
    free(v[1]);
    free(v);
    CHECK(!tp_wb_split_pk("7", 2, &v));
    CHECK(v == NULL);
    CHECK(!tp_wb_split_pk("7,8,9", 2, &v));
    CHECK(!tp_wb_split_pk("7,8", 1, &v));
    CHECK(!tp_wb_split_pk("%4", 1, &v));
    CHECK(!tp_wb_split_pk("%zz", 1, &v));
    CHECK(!tp_wb_split_pk("a%00b", 1, &v));
    CHECK(tp_wb_split_pk("", 1, &v)); /* empty value: the caller rejects it per column */
    CHECK_STR_EQ(v[0], "");
    free(v[0]);
    free(v);
}

int main(void)
{
    TP_RUN(test_grammar_full);
    TP_RUN(test_grammar_absent);
    TP_RUN(test_grammar_errors);
    TP_RUN(test_check_text);
    TP_RUN(test_split_pk);
    return tp_test_done();
}
