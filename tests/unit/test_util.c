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

int main(void)
{
    TP_RUN(durations_parse_strictly);
    TP_RUN(sizes_and_ints_parse_strictly);
    TP_RUN(buffers_grow_and_escape_json);
    TP_RUN(log_lines_are_json_and_filtered);
    return tp_test_done();
}
