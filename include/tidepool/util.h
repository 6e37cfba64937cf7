/* Small shared helpers: allocation that aborts on OOM, a growable byte buffer,
 * clocks, and parsers for the duration and size values used in configs and
 * definitions. Nothing here knows about Postgres, HTTP or the warehouse. */
#ifndef TIDEPOOL_UTIL_H
#define TIDEPOOL_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TP_WUR __attribute__((warn_unused_result))
#define TP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define TP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Allocation wrappers: never return NULL; out of memory aborts the process. */
void *tp_xmalloc(size_t n);
void *tp_xcalloc(size_t count, size_t size);
void *tp_xrealloc(void *p, size_t n);
char *tp_xstrdup(const char *s);
/* Copies exactly n bytes of s (all n must be readable; unlike strndup it does
 * not stop at a NUL) and terminates the copy. */
char *tp_xstrndup(const char *s, size_t n);
char *tp_xasprintf(const char *fmt, ...) TP_PRINTF(1, 2);
/* Same with a va_list (consumed); never NULL. */
char *tp_xvasprintf(const char *fmt, va_list ap) TP_PRINTF(1, 0);

/* Growable byte buffer, always NUL-terminated. Zero-initialise or tp_buf_init. */
typedef struct tp_buf {
    char *data;
    size_t len;
    size_t cap;
} tp_buf_t;

void tp_buf_init(tp_buf_t *b);
void tp_buf_free(tp_buf_t *b);
void tp_buf_reset(tp_buf_t *b);
void tp_buf_reserve(tp_buf_t *b, size_t extra);
void tp_buf_append(tp_buf_t *b, const void *data, size_t n);
void tp_buf_puts(tp_buf_t *b, const char *s);
void tp_buf_putc(tp_buf_t *b, char c);
void tp_buf_printf(tp_buf_t *b, const char *fmt, ...) TP_PRINTF(2, 3);
/* Appends s as a double-quoted SQL identifier ("a""b"); for reflected names,
 * never for user input that has not been checked against the catalog. */
void tp_buf_sql_ident(tp_buf_t *b, const char *s);
/* Appends s as a JSON string literal (quotes included), escaping as RFC 8259 asks. */
void tp_buf_json_str(tp_buf_t *b, const char *s);
/* Hands the buffer's memory to the caller (who frees it) and resets b. */
char *tp_buf_steal(tp_buf_t *b);

/* Monotonic clock in milliseconds / microseconds; wall clock in milliseconds. */
int64_t tp_now_ms(void);
int64_t tp_now_us(void);
int64_t tp_wall_ms(void);
/* Wall milliseconds -> "2026-11-21T12:00:00.123Z" (UTC, always 24 characters). */
void tp_rfc3339_format(int64_t wall_ms, char out[32]);
/* "2026-11-21T12:00:00.123Z" or "...+01:00" (fraction optional) -> wall
 * milliseconds; -1 when malformed. */
int64_t tp_rfc3339_parse(const char *s);

/* "30", "30s", "5m", "2h", "1d", "250ms" -> milliseconds. False on anything else. */
bool tp_parse_duration_ms(const char *s, int64_t *out_ms) TP_WUR;
/* "1024", "64k", "16M", "1G" (powers of 1024) -> bytes. */
bool tp_parse_size(const char *s, int64_t *out) TP_WUR;
/* Strict base-10 integer with range check; no trailing junk. */
bool tp_parse_int64(const char *s, int64_t min, int64_t max, int64_t *out) TP_WUR;
/* "true/false/yes/no/on/off/1/0" (case-insensitive). */
bool tp_parse_bool(const char *s, bool *out) TP_WUR;

/* Value of one hexadecimal digit, or -1. */
int tp_hexval(char c);
/* Trims ASCII whitespace at both ends in place; returns s advanced. */
char *tp_strtrim(char *s);
/* Reads a whole file into a NUL-terminated heap string; NULL and errno on failure. */
char *tp_read_file(const char *path, size_t *len_out);
/* Constant-time comparison of two byte strings of possibly different length. */
bool tp_consttime_eq(const void *a, size_t alen, const void *b, size_t blen);
/* Random 64-bit value from OpenSSL's CSPRNG (falls back to aborting: no weak randomness). */
uint64_t tp_random_u64(void);
/* Uniform jitter: returns base_ms scaled by a random factor in [1-frac, 1+frac]. */
int64_t tp_jitter_ms(int64_t base_ms, double frac);

#endif
