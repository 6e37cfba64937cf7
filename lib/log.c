/* JSON-lines logger. Each call formats one complete line into a local buffer
 * and writes it with a single fwrite under a mutex, so lines from several
 * event-loop threads never interleave. It does not rotate, buffer or filter
 * by module: journald and the level are the whole story. */
#include "tidepool/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static tp_log_level_t g_level = TP_LOG_INFO;
static FILE *g_stream;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static char *g_global_key, *g_global_value;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void tp_log_set_level(tp_log_level_t level) { g_level = level; }
tp_log_level_t tp_log_get_level(void) { return g_level; }
void tp_log_set_stream(FILE *f) { g_stream = f; }

void tp_log_set_global(const char *key, const char *value)
{
    free(g_global_key);
    free(g_global_value);
    g_global_key = key ? tp_xstrdup(key) : NULL;
    g_global_value = value ? tp_xstrdup(value) : NULL;
}

bool tp_log_parse_level(const char *s, tp_log_level_t *out)
{
    for (size_t i = 0; i < TP_ARRAY_LEN(level_names); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (tp_log_level_t)i;
            return true;
        }
    }
    if (strcmp(s, "warning") == 0) {
        *out = TP_LOG_WARN;
        return true;
    }
    return false;
}

void tp_log_emit(tp_log_level_t level, const char *const *kv, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    char when[32];
    tp_rfc3339_format(tp_wall_ms(), when);

    tp_buf_t b = {0};
    tp_buf_printf(&b, "{\"time\":\"%s\",\"level\":\"%s\",\"msg\":", when,
                  level_names[level < 0 || level > TP_LOG_ERROR ? TP_LOG_ERROR : level]);
    tp_buf_json_str(&b, msg);
    if (g_global_key) {
        tp_buf_putc(&b, ',');
        tp_buf_json_str(&b, g_global_key);
        tp_buf_putc(&b, ':');
        tp_buf_json_str(&b, g_global_value ? g_global_value : "");
    }
    for (size_t i = 0; kv && kv[i]; i += 2) {
        tp_buf_putc(&b, ',');
        tp_buf_json_str(&b, kv[i]);
        tp_buf_putc(&b, ':');
        if (kv[i + 1])
            tp_buf_json_str(&b, kv[i + 1]);
        else
            tp_buf_puts(&b, "null");
    }
    tp_buf_puts(&b, "}\n");

    FILE *out = g_stream ? g_stream : stderr;
    pthread_mutex_lock(&g_lock);
    fwrite(b.data, 1, b.len, out);
    fflush(out);
    pthread_mutex_unlock(&g_lock);
    tp_buf_free(&b);
}
