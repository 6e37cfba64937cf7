/* Structured logging: one JSON object per line on stderr (journald keeps it).
 * Fields: time (RFC 3339, UTC, ms), level, msg, then context key/value pairs.
 * The level is checked before anything is formatted. Never pass secrets. */
#ifndef TIDEPOOL_LOG_H
#define TIDEPOOL_LOG_H

#include <stdbool.h>
#include <stdio.h>

#include "tidepool/util.h"

typedef enum tp_log_level {
    TP_LOG_DEBUG = 0,
    TP_LOG_INFO = 1,
    TP_LOG_WARN = 2,
    TP_LOG_ERROR = 3,
} tp_log_level_t;

void tp_log_set_level(tp_log_level_t level);
tp_log_level_t tp_log_get_level(void);
/* "debug", "info", "warn"/"warning", "error" -> level; false if unknown. */
bool tp_log_parse_level(const char *s, tp_log_level_t *out) TP_WUR;
/* Redirects output (tests); NULL restores stderr. */
void tp_log_set_stream(FILE *f);
/* Adds a field written on every line (e.g. "program"); the strings are copied. */
void tp_log_set_global(const char *key, const char *value);

static inline bool tp_log_enabled(tp_log_level_t level)
{
    return level >= tp_log_get_level();
}

/* kv: NULL, or a NULL-terminated array of alternating key, value strings
 * (a NULL value is written as JSON null). The message is printf-formatted. */
void tp_log_emit(tp_log_level_t level, const char *const *kv, const char *fmt, ...)
    TP_PRINTF(3, 4);

#define tp_log(level, ...)                                                     \
    do {                                                                       \
        if (tp_log_enabled(level))                                             \
            tp_log_emit((level), NULL, __VA_ARGS__);                           \
    } while (0)
#define tp_logkv(level, kv, ...)                                               \
    do {                                                                       \
        if (tp_log_enabled(level))                                             \
            tp_log_emit((level), (kv), __VA_ARGS__);                           \
    } while (0)

#define tp_debug(...) tp_log(TP_LOG_DEBUG, __VA_ARGS__)
#define tp_info(...) tp_log(TP_LOG_INFO, __VA_ARGS__)
#define tp_warn(...) tp_log(TP_LOG_WARN, __VA_ARGS__)
#define tp_error(...) tp_log(TP_LOG_ERROR, __VA_ARGS__)

#endif
