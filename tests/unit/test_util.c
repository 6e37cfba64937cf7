/* Unit tests for lib/util.c and lib/log.c. */
#include <stdlib.h>

#include "../tp_test.h"
#include "tidepool/log.h"
#include "tidepool/util.h"

static void durations_parse_strictly(void)
{
    int64_t ms = 0;
    CHECK(tp_parse_duration_ms("30", &ms) && ms == 30000);
    CHECK(tp_parse_duration_ms("250ms", &ms) && ms == 250);
    CHECK(tp_parse_duration_ms("5m", &ms) && ms == 300000);
    CHECK(tp_parse_duration_ms("2h", &ms) && ms == 7200000);
    CHECK(tp_parse_duration_ms("1d", &ms) && ms == 86400000);
    CHECK(!tp_parse_duration_ms("5mx", &ms));
    CHECK(!tp_parse_duration_ms("-5s", &ms));
    CHECK(!tp_parse_duration_ms("", &ms));
    CHECK(!tp_parse_duration_ms("m", &ms));
    CHECK(!tp_parse_duration_ms("99999999999999999999s", &ms));
}

static void sizes_and_ints_parse_strictly(void)
{
    int64_t v = 0;
    CHECK(tp_parse_size("64k", &v) && v == 65536);
    CHECK(tp_parse_size("16M", &v) && v == 16 << 20);
    CHECK(!tp_parse_size("16Q", &v));
    CHECK(tp_parse_int64("42", 0, 100, &v) && v == 42);
    CHECK(!tp_parse_int64("101", 0, 100, &v));
    CHECK(!tp_parse_int64("4 2", 0, 100, &v));
    CHECK(!tp_parse_int64(" 42", 0, 100, &v));
    bool b = false;
    CHECK(tp_parse_bool("Yes", &b) && b);
    CHECK(tp_parse_bool("off", &b) && !b);
    CHECK(!tp_parse_bool("maybe", &b));
}

static void buffers_grow_and_escape_json(void)
{
    tp_buf_t b = {0};
    for (int i = 0; i < 1000; i++)
        tp_buf_printf(&b, "%d,", i);
    CHECK(b.len > 3000);
    tp_buf_reset(&b);
    tp_buf_json_str(&b, "a\"b\\c\n\x01");
    CHECK_STR_EQ(b.data, "\"a\\\"b\\\\c\\n\\u0001\"");
    char *s = tp_buf_steal(&b);
    CHECK(b.data == NULL && b.len == 0);
    free(s);
    CHECK(tp_consttime_eq("abc", 3, "abc", 3));
    CHECK(!tp_consttime_eq("abc", 3, "abd", 3));
    CHECK(!tp_consttime_eq("abc", 3, "abcd", 4));
}

static void log_lines_are_json_and_filtered(void)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    tp_log_set_stream(f);
    tp_log_set_level(TP_LOG_WARN);
    tp_info("hidden %d", 1);
    const char *kv[] = {"job", "daily \"metrics\"", "statement_id", NULL, NULL};
    tp_logkv(TP_LOG_ERROR, kv, "run failed: %s", "boom");
    fflush(f);
    CHECK(strstr(text, "hidden") == NULL);
    CHECK_CONTAINS(text, "\"level\":\"error\",\"msg\":\"run failed: boom\"");
    CHECK_CONTAINS(text, "\"job\":\"daily \\\"metrics\\\"\",\"statement_id\":null}\n");
    CHECK_CONTAINS(text, "{\"time\":\"20");
    tp_log_set_stream(NULL);
    tp_log_set_level(TP_LOG_INFO);
    fclose(f);
    free(text);
    tp_log_level_t lvl;
    CHECK(tp_log_parse_level("debug", &lvl) && lvl == TP_LOG_DEBUG);
    CHECK(!tp_log_parse_level("verbose", &lvl));
}

static void rfc3339_round_trips(void)
{
    char out[32];
    tp_rfc3339_format(1795262400123, out); /* 2026-11-21T12:00:00.123Z */
    CHECK_STR_EQ(out, "2026-11-21T12:00:00.123Z");
    CHECK_INT_EQ(tp_rfc3339_parse(out), 1795262400123);
    tp_rfc3339_format(0, out);
    CHECK_STR_EQ(out, "1970-01-01T00:00:00.000Z");
    CHECK_INT_EQ(tp_rfc3339_parse("2026-11-21T13:30:00.5+01:30"), 1795262400500);
    CHECK_INT_EQ(tp_rfc3339_parse("2026-11-21T10:00:00-02:00"), 1795262400000);
    CHECK_INT_EQ(tp_rfc3339_parse("2026-11-21T12:00:00.123456789z"), 1795262400123);
    const char *bad[] = {"", "2026-11-21", "2026-11-21 12:00:00Z", "2026-11-21T12:00:00",
                         "2026-11-21T12:00:00Zjunk", "2026-13-01T00:00:00Z",
                         "2026-11-21T12:00:00+0100", "26-11-21T12:00:00Z", NULL};
    for (int i = 0; bad[i]; i++)
        CHECK_MSG(tp_rfc3339_parse(bad[i]) == -1, "accepted \"%s\"", bad[i]);
    CHECK_INT_EQ(tp_rfc3339_parse(NULL), -1);
}

int main(void)
{
    TP_RUN(durations_parse_strictly);
    TP_RUN(sizes_and_ints_parse_strictly);
    TP_RUN(buffers_grow_and_escape_json);
    TP_RUN(log_lines_are_json_and_filtered);
    TP_RUN(rfc3339_round_trips);
    return tp_test_done();
}
