/* Unit tests for daemon/synctypes.c (program-private, so compiled in here):
 * the DESIGN §7 type mapping in format_type() spelling, identifier and
 * literal quoting, and COPY text encoding of JSON_ARRAY cells. */
#include <stdlib.h>

#include "../../daemon/synctypes.c"
#include "../tp_test.h"

static void check_map(const char *name, const char *text, int p, int s, const char *want)
{
    char *got = tp_synctypes_map(name, text, p, s);
    CHECK_MSG(want ? got && strcmp(got, want) == 0 : got == NULL, "%s/%s -> %s, want %s", name ? name : "-",
              text ? text : "-", got ? got : "(none)", want ? want : "(none)");
    free(got);
}

static void types_map_per_design(void)
{
    check_map("STRING", "STRING", -1, -1, "text");
    check_map("CHAR", "CHAR(3)", -1, -1, "text");
    check_map("BYTE", "TINYINT", -1, -1, "smallint");
    check_map("SHORT", "SMALLINT", -1, -1, "smallint");
    check_map("INT", "INT", -1, -1, "integer");
    check_map("LONG", "BIGINT", -1, -1, "bigint");
    check_map("FLOAT", "FLOAT", -1, -1, "real");
    check_map("DOUBLE", "DOUBLE", -1, -1, "double precision");
    check_map("DECIMAL", "DECIMAL(18,2)", 18, 2, "numeric(18,2)");
    check_map("DECIMAL", "DECIMAL(7,3)", -1, -1, "numeric(7,3)");
    check_map("DECIMAL", "DECIMAL", -1, -1, "numeric(10,0)");
    check_map("BOOLEAN", "BOOLEAN", -1, -1, "boolean");
    check_map("DATE", "DATE", -1, -1, "date");
    check_map("TIMESTAMP", "TIMESTAMP", -1, -1, "timestamp with time zone");
    check_map("TIMESTAMP_NTZ", "TIMESTAMP_NTZ", -1, -1, "timestamp without time zone");
    check_map("INTERVAL", "INTERVAL DAY TO SECOND", -1, -1, "interval");
    check_map("BINARY", "BINARY", -1, -1, "bytea");
    check_map("ARRAY", "ARRAY<INT>", -1, -1, "jsonb");
    check_map("MAP", "MAP<STRING, STRING>", -1, -1, "jsonb");
    check_map("STRUCT", "STRUCT<a: INT>", -1, -1, "jsonb");
    check_map("VARIANT", "VARIANT", -1, -1, "jsonb");
    check_map("NULL", "VOID", -1, -1, "text");
    /* Open set: an unknown type_name falls back to type_text, else no mapping. */
    check_map("USER_DEFINED_TYPE", "BIGINT", -1, -1, "bigint");
    check_map("GEOGRAPHY", "GEOGRAPHY(4326)", -1, -1, NULL);
    check_map("USER_DEFINED_TYPE", "", -1, -1, NULL);
    check_map(NULL, "decimal(5,1)", -1, -1, "numeric(5,1)");
    check_map("DECIMAL", "DECIMAL(5,9)", 5, 9, NULL);
}

static void quoting(void)
{
    tp_buf_t b;
    tp_buf_init(&b);
    tp_synctypes_qname(&b, "my schema", "t\"x");
    CHECK_STR_EQ(b.data, "\"my schema\".\"t\"\"x\"");
    tp_buf_reset(&b);
    tp_synctypes_literal(&b, "it's");
    CHECK_STR_EQ(b.data, "'it''s'");
    tp_buf_reset(&b);
    tp_synctypes_literal(&b, "a\\b");
    CHECK_STR_EQ(b.data, "E'a\\\\b'");
    tp_buf_free(&b);
}

static void copy_cells_escape(void)
{
    tp_buf_t b;
    tp_buf_init(&b);
    tp_synctypes_copy_cell(&b, NULL, 0, false);
    CHECK_STR_EQ(b.data, "\\N");
    tp_buf_reset(&b);
    const char s[] = "a\tb\nc\\d\re";
    tp_synctypes_copy_cell(&b, s, strlen(s), false);
    CHECK_STR_EQ(b.data, "a\\tb\\nc\\\\d\\re");
    tp_buf_reset(&b);
    tp_synctypes_copy_cell(&b, "null", 4, false); /* a string, not NULL */
    CHECK_STR_EQ(b.data, "null");
    tp_buf_reset(&b);
    tp_synctypes_copy_cell(&b, "00ff", 4, true);
    CHECK_STR_EQ(b.data, "\\\\x00ff");
    tp_buf_reset(&b);
    tp_synctypes_copy_cell(&b, "", 0, false);
    CHECK_STR_EQ(b.data, "");
    tp_buf_free(&b);
}

int main(void)
{
    TP_RUN(types_map_per_design);
    TP_RUN(quoting);
    TP_RUN(copy_cells_escape);
    return tp_test_done();
}
