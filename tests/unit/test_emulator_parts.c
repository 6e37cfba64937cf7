/* Unit tests for the emulator's pure parts, compiled in directly (they are
 * program-private): the dialect bridge, parameter types, the fault SPEC
 * parser, type mapping, cell forms and chunk building. */
#include <jansson.h>
#include <stdlib.h>

#include "../../emulator/bridge.c"
#include "../../emulator/faults.c"
#include "../../emulator/result.c"
#include "../tp_test.h"

emu_global_t g;

static char *bridge(const char *sql, const emu_param_t *p, int n, char **unbound, int *order,
                    int *norder)
{
    int o[16], no = 0;
    char *ub = NULL;
    char *out = emu_bridge_sql(sql, p, n, order ? order : o, norder ? norder : &no, &ub);
    if (unbound)
        *unbound = ub;
    else
        free(ub);
    return out;
}

static void bridge_rewrites_names_and_backticks(void)
{
    static const char *const cases[][2] = {
        {"SELECT * FROM main.iot.users", "SELECT * FROM iot.users"},
        {"SELECT * FROM iot.users u", "SELECT * FROM iot.users u"},
        {"SELECT `user id`, `a\"b` FROM `main`.`iot`.`t`", "SELECT \"user id\", \"a\"\"b\" FROM \"iot\".\"t\""},
        {"SELECT \"c\".\"s\".\"t\"", "SELECT \"s\".\"t\""},
        {"SELECT 'main.iot.users', x FROM t -- main.a.b `x`\n", "SELECT 'main.iot.users', x FROM t -- main.a.b `x`\n"},
        {"SELECT /* a.b.c /* nested */ `q` */ 1", "SELECT /* a.b.c /* nested */ `q` */ 1"},
        {"SELECT 1.5, 2e10, x::int, $$a.b.c$$", "SELECT 1.5, 2e10, x::int, $$a.b.c$$"},
        {"SELECT 'it''s', 'a\\'b'", "SELECT 'it''s', E'a\\'b'"},
        {"SELECT cat.sch.tab.col FROM cat.sch.tab", "SELECT sch.tab.col FROM sch.tab"},
        {"SELECT E'x\\ny'", "SELECT E'x\\ny'"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        char *out = bridge(cases[i][0], NULL, 0, NULL, NULL, NULL);
        CHECK_STR_EQ(out, cases[i][1]);
        free(out);
    }
}

static void bridge_binds_named_parameters(void)
{
    emu_param_t p[] = {{"b", "2", "INT"}, {"a", "x", NULL}, {"d", "2020-01-01", "DATE"},
                       {"n", "1.5", "decimal(10, 2)"}};
    int order[8], norder = 0;
    char *ub = NULL;
    char *out = bridge("SELECT :a, :b::text, :a, ':b', :d -- :a\n, :n, ::x", p, 4, &ub, order,
                       &norder);
    CHECK_STR_EQ(out, "SELECT ($1::text), ($2::int4)::text, ($1::text), ':b', ($3::date) -- :a\n, "
                      "($4::numeric(10,2)), ::x");
    CHECK_INT_EQ(norder, 4);
    CHECK_INT_EQ(order[0], 1);
    CHECK_INT_EQ(order[1], 0);
    CHECK_INT_EQ(order[2], 2);
    CHECK_INT_EQ(order[3], 3);
    CHECK(ub == NULL);
    free(out);
    out = bridge("SELECT :a, :zz", p, 4, &ub, order, &norder);
    CHECK_STR_EQ(ub, "zz");
    CHECK_STR_EQ(out, "SELECT ($1::text), :zz");
    free(out);
    free(ub);
}

static void parameter_types_map_to_casts(void)
{
    static const char *const ok[][2] = {
        {"STRING", "text"}, {"int", "int4"}, {"BIGINT", "int8"}, {"SMALLINT", "int2"},
        {"TINYINT", "int2"}, {"DOUBLE", "float8"}, {"FLOAT", "float4"}, {"BOOLEAN", "boolean"},
        {"DATE", "date"}, {"TIMESTAMP", "timestamptz"}, {"TIMESTAMP_NTZ", "timestamp"},
        {"BINARY", "bytea"}, {"DECIMAL", "numeric(10,0)"}, {"DECIMAL(38,18)", "numeric(38,18)"},
        {"DECIMAL(5)", "numeric(5,0)"}};
    char out[64];
    for (size_t i = 0; i < TP_ARRAY_LEN(ok); i++) {
        CHECK_MSG(emu_param_pgtype(ok[i][0], out, sizeof out), "type %s", ok[i][0]);
        CHECK_STR_EQ(out, ok[i][1]);
    }
    static const char *const bad[] = {"ARRAY<INT>", "MAP<STRING,INT>", "STRUCT<a:INT>",
                                      "DECIMAL(39,2)", "DECIMAL(5,6)", "DECIMAL(x)", "",
                                      "INTERVAL", "TEXT; DROP TABLE x"};
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++)
        CHECK_MSG(!emu_param_pgtype(bad[i], out, sizeof out), "type %s accepted", bad[i]);
}

static void fault_spec_parses(void)
{
    emu_faults_t f;
    char err[256];
    CHECK(emu_faults_parse("latency=200,status=503x2,status=429@get,retry_after=1,drop_chunk=1,"
                           "truncate_chunk=3,expire_links,token_fail=2:503",
                           &f, err, sizeof err));
    CHECK_INT_EQ(f.latency_ms, 200);
    CHECK_INT_EQ(f.nstatus, 2);
    CHECK_INT_EQ(f.status[0].code, 503);
    CHECK_INT_EQ(f.status[0].remaining, 2);
    CHECK_STR_EQ(f.status[0].cls, "");
    CHECK_INT_EQ(f.status[1].code, 429);
    CHECK_STR_EQ(f.status[1].cls, "get");
    CHECK_INT_EQ(f.retry_after, 1);
    CHECK_INT_EQ(f.drop_chunk, 1);
    CHECK_INT_EQ(f.truncate_chunk, 3);
    CHECK_INT_EQ(f.expire_links, -1);
    CHECK_INT_EQ(f.token_fail, 2);
    CHECK_INT_EQ(f.token_fail_code, 503);
    g.faults = f;
    CHECK_INT_EQ(emu_faults_take_status("token"), 0);
    CHECK_INT_EQ(emu_faults_take_status("execute"), 503);
    CHECK_INT_EQ(emu_faults_take_status("get"), 503);
    CHECK_INT_EQ(emu_faults_take_status("get"), 429);
    CHECK_INT_EQ(emu_faults_take_status("get"), 0);
    static const char *const bad[] = {"latency=-1", "status=200", "status=503x0", "status=503@nope",
                                      "bogus", "drop_chunk", "latency=1@", "token_fail=1:99"};
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++)
        CHECK_MSG(!emu_faults_parse(bad[i], &f, err, sizeof err), "spec %s accepted", bad[i]);
    CHECK(emu_faults_parse("", &f, err, sizeof err) && f.nstatus == 0);
}

static emu_stmt_t *new_stmt(emu_format_t fmt, int ncols, const unsigned *oids, const int *mods)
{
    emu_stmt_t *st = tp_xcalloc(1, sizeof *st);
    st->format = fmt;
    st->row_limit = -1;
    st->byte_limit = -1;
    st->ncols = ncols;
    st->cols = tp_xcalloc((size_t)ncols, sizeof *st->cols);
    for (int j = 0; j < ncols; j++) {
        st->cols[j].name = tp_xasprintf("c%d", j);
        emu_column_map(&st->cols[j], oids[j], mods[j]);
    }
    return st;
}

static void free_st(emu_stmt_t *st)
{
    for (int j = 0; j < st->ncols; j++)
        emu_column_free(&st->cols[j]);
    free(st->cols);
    for (int i = 0; i < st->nchunks; i++)
        free(st->chunks[i].data);
    free(st->chunks);
    free(st);
}

static void cells_take_databricks_forms(void)
{
    g.chunk_rows = 100;
    g.chunk_bytes = 1 << 20;
    unsigned oids[] = {16, 1184, 1114, 17, 1007, 1009, 1700, 1700, 2278, 1000};
    int mods[] = {-1, -1, -1, -1, -1, -1, ((12 << 16) | 3) + 4, -1, -1, -1};
    emu_stmt_t *st = new_stmt(EMU_FMT_JSON, 10, oids, mods);
    CHECK_STR_EQ(st->cols[6].type_text, "DECIMAL(12,3)");
    CHECK_INT_EQ(st->cols[6].precision, 12);
    CHECK_STR_EQ(st->cols[7].type_text, "DECIMAL(38,18)");
    CHECK_STR_EQ(st->cols[8].type_name, "NULL");
    CHECK_STR_EQ(st->cols[4].type_text, "ARRAY<INT>");
    emu_column_t iv = {0};
    emu_column_map(&iv, 1186, ((1 << 2) | (1 << 1)) << 16 | 0xffff); /* interval year to month */
    CHECK_STR_EQ(iv.type_text, "INTERVAL YEAR TO MONTH");
    CHECK_STR_EQ(iv.interval_type, "YEAR TO MONTH");
    CHECK_STR_EQ(iv.type_name, "INTERVAL");
    emu_column_free(&iv);
    emu_column_map(&iv, 1186, -1);
    CHECK_STR_EQ(iv.type_text, "INTERVAL DAY TO SECOND");
    emu_column_free(&iv);
    emu_builder_t b;
    emu_builder_init(&b, st);
    char *row[] = {"t", "2021-01-01 10:00:00.5+00", "2021-01-01 10:00:00.123456", "\\xdead",
                   "{{1,2},{3,NULL}}", "{\"a,b\",\"q\\\"x\",NULL,\"NULL\"}", "1.500", "2", NULL,
                   "{t,f}"};
    emu_builder_row(&b, row);
    char *row2[] = {"f", "infinity", "2021-01-01 10:00:00", "\\x", "{}", "{}", NULL, NULL,
                    NULL, NULL};
    emu_builder_row(&b, row2);
    /* years as java.time writes them; an offset other than the session's UTC */
    char *row3[] = {"t", "0044-03-15 10:00:00+00 BC", "10000-01-01 00:00:00.000001", "\\x",
                    NULL, NULL, NULL, NULL, NULL, NULL};
    emu_builder_row(&b, row3);
    char *row4[] = {"t", "2021-01-01 10:00:00.25-03:30", "0001-01-01 00:00:00 BC", "\\x",
                    NULL, NULL, NULL, NULL, NULL, NULL};
    emu_builder_row(&b, row4);
    emu_builder_finish(&b);
    emu_builder_free(&b);
    CHECK_INT_EQ(st->nchunks, 1);
    CHECK_STR_EQ(st->chunks[0].data,
                 "[[\"true\",\"2021-01-01T10:00:00.500Z\",\"2021-01-01T10:00:00.123456\",\"dead\","
                 "\"[[1,2],[3,null]]\",\"[\\\"a,b\\\",\\\"q\\\\\\\"x\\\",null,\\\"NULL\\\"]\","
                 "\"1.500\",\"2\",null,\"[true,false]\"],"
                 "[\"false\",\"infinity\",\"2021-01-01T10:00:00.000\",\"\",\"[]\",\"[]\",null,null,"
                 "null,null],"
                 "[\"true\",\"-0043-03-15T10:00:00.000Z\",\"+10000-01-01T00:00:00.000001\",\"\","
                 "null,null,null,null,null,null],"
                 "[\"true\",\"2021-01-01T10:00:00.250-03:30\",\"0000-01-01T00:00:00.000\",\"\","
                 "null,null,null,null,null,null]]");
    CHECK_INT_EQ(st->total_rows, 4);
    free_st(st);
}

static void chunks_split_by_rows_and_bytes(void)
{
    unsigned oids[] = {23, 25};
    int mods[] = {-1, -1};
    char num[16], *row[2] = {num, "x,\"y\""};
    /* rows */
    g.chunk_rows = 3;
    g.chunk_bytes = 1 << 20;
    emu_stmt_t *st = new_stmt(EMU_FMT_CSV, 2, oids, mods);
    emu_builder_t b;
    emu_builder_init(&b, st);
    for (int i = 1; i <= 7; i++) {
        snprintf(num, sizeof num, "%d", i);
        emu_builder_row(&b, row);
    }
    row[1] = NULL;
    emu_builder_finish(&b);
    emu_builder_free(&b);
    CHECK_INT_EQ(st->nchunks, 3);
    CHECK_STR_EQ(st->chunks[0].data, "c0,c1\n1,\"x,\"\"y\"\"\"\n2,\"x,\"\"y\"\"\"\n3,\"x,\"\"y\"\"\"\n");
    CHECK_STR_EQ(st->chunks[2].data, "7,\"x,\"\"y\"\"\"\n");
    CHECK_INT_EQ(st->chunks[2].row_offset, 6);
    CHECK_INT_EQ(st->chunks[2].row_count, 1);
    CHECK_INT_EQ(st->total_bytes, (int64_t)(st->chunks[0].len + st->chunks[1].len + st->chunks[2].len));
    free_st(st);
    /* bytes: each JSON row is ["N","abcdefghij"] ~ 20 bytes; 64-byte chunks hold 3 */
    g.chunk_rows = 1000;
    g.chunk_bytes = 64;
    st = new_stmt(EMU_FMT_JSON, 2, oids, mods);
    emu_builder_init(&b, st);
    row[1] = "abcdefghij";
    for (int i = 1; i <= 10; i++) {
        snprintf(num, sizeof num, "%d", i);
        emu_builder_row(&b, row);
    }
    emu_builder_finish(&b);
    emu_builder_free(&b);
    CHECK(st->nchunks >= 4);
    int64_t rows = 0;
    for (int i = 0; i < st->nchunks; i++) {
        CHECK(st->chunks[i].len <= 64);
        CHECK_INT_EQ(st->chunks[i].row_offset, rows);
        rows += st->chunks[i].row_count;
        json_t *j = json_loadb(st->chunks[i].data, st->chunks[i].len, 0, NULL);
        CHECK(json_is_array(j));
        json_decref(j);
    }
    CHECK_INT_EQ(rows, 10);
    free_st(st);
    /* row_limit truncates */
    g.chunk_bytes = 1 << 20;
    st = new_stmt(EMU_FMT_JSON, 2, oids, mods);
    st->row_limit = 2;
    emu_builder_init(&b, st);
    for (int i = 1; i <= 5; i++)
        emu_builder_row(&b, row);
    emu_builder_finish(&b);
    emu_builder_free(&b);
    CHECK_INT_EQ(st->total_rows, 2);
    CHECK(st->truncated);
    free_st(st);
}

int main(void)
{
    TP_RUN(bridge_rewrites_names_and_backticks);
    TP_RUN(bridge_binds_named_parameters);
    TP_RUN(parameter_types_map_to_casts);
    TP_RUN(fault_spec_parses);
    TP_RUN(cells_take_databricks_forms);
    TP_RUN(chunks_split_by_rows_and_bytes);
    return tp_test_done();
}
