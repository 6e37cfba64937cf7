/* Shared helpers: OOM-aborting allocation, tp_buf growable buffers, clocks,
 * and strict parsers for integers, booleans, durations and sizes. Parsers never
 * accept trailing junk: "5mx" is an error, not five minutes. */
#include "tidepool/util.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

static void oom(size_t n)
{
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory allocating %zu bytes\"}\n", n);
    abort();
}

void *tp_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *tp_xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (p == NULL)
        oom(count * size);
    return p;
}

void *tp_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom(n);
    return q;
}

char *tp_xstrdup(const char *s)
{
    return tp_xstrndup(s, strlen(s));
}

char *tp_xstrndup(const char *s, size_t n)
{
    char *p = tp_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *tp_xvasprintf(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    return s;
}

char *tp_xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = tp_xvasprintf(fmt, ap);
    va_end(ap);
    return s;
}

void tp_buf_init(tp_buf_t *b)
{
    b->data = NULL;
    b->len = b->cap = 0;
}

void tp_buf_free(tp_buf_t *b)
{
    free(b->data);
    tp_buf_init(b);
}

void tp_buf_reset(tp_buf_t *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void tp_buf_reserve(tp_buf_t *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    b->data = tp_xrealloc(b->data, cap);
    b->cap = cap;
    b->data[b->len] = '\0';
}

void tp_buf_append(tp_buf_t *b, const void *data, size_t n)
{
    tp_buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void tp_buf_puts(tp_buf_t *b, const char *s)
{
    tp_buf_append(b, s, strlen(s));
}

void tp_buf_putc(tp_buf_t *b, char c)
{
    tp_buf_append(b, &c, 1);
}

void tp_buf_printf(tp_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    tp_buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void tp_buf_sql_ident(tp_buf_t *b, const char *s)
{
    tp_buf_putc(b, '"');
    for (; *s; s++) {
        if (*s == '"')
            tp_buf_putc(b, '"');
        tp_buf_putc(b, *s);
    }
    tp_buf_putc(b, '"');
}

int tp_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

void tp_buf_json_str(tp_buf_t *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    tp_buf_putc(b, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': tp_buf_append(b, "\\\"", 2); break;
        case '\\': tp_buf_append(b, "\\\\", 2); break;
        case '\n': tp_buf_append(b, "\\n", 2); break;
        case '\r': tp_buf_append(b, "\\r", 2); break;
        case '\t': tp_buf_append(b, "\\t", 2); break;
        default:
            if (*p < 0x20) {
                char esc[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
                tp_buf_append(b, esc, 6);
            } else {
                tp_buf_putc(b, (char)*p);
            }
        }
    }
    tp_buf_putc(b, '"');
}

char *tp_buf_steal(tp_buf_t *b)
{
    char *p = b->data ? b->data : tp_xstrdup("");
    tp_buf_init(b);
    return p;
}

static int64_t clock_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t tp_now_us(void) { return clock_us(CLOCK_MONOTONIC); }
int64_t tp_now_ms(void) { return clock_us(CLOCK_MONOTONIC) / 1000; }
int64_t tp_wall_ms(void) { return clock_us(CLOCK_REALTIME) / 1000; }

void tp_rfc3339_format(int64_t wall_ms, char out[32])
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", (int)(wall_ms % 1000));
}

int64_t tp_rfc3339_parse(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int n = 0;
    if (s == NULL ||
        sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6 ||
        n != 19)
        return -1;
    const char *p = s + n;
    int64_t ms = 0;
    if (*p == '.') {
        int64_t scale = 100;
        for (p++; *p >= '0' && *p <= '9'; p++, scale /= 10)
            ms += (*p - '0') * scale;
    }
    int64_t off_s = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int oh, om, k = 0;
        if (sscanf(p + 1, "%2d:%2d%n", &oh, &om, &k) != 2 || k != 5)
            return -1;
        off_s = (int64_t)(oh * 3600 + om * 60) * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p != '\0' || tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 || tm.tm_mday > 31)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return -1;
    return ((int64_t)t - off_s) * 1000 + ms;
}

bool tp_parse_int64(const char *s, int64_t min, int64_t max, int64_t *out)
{
    if (s == NULL || *s == '\0' || isspace((unsigned char)*s))
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = v;
    return true;
}

bool tp_parse_bool(const char *s, bool *out)
{
    static const char *yes[] = {"true", "yes", "on", "1"};
    static const char *no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < TP_ARRAY_LEN(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

/* Splits "<digits><suffix>" and multiplies by the suffix's factor. */
static bool parse_scaled(const char *s, const char *const *suffixes, const int64_t *factors,
                         size_t nsuffixes, int64_t *out)
{
    if (s == NULL || !isdigit((unsigned char)*s))
        return false;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || v < 0)
        return false;
    for (size_t i = 0; i < nsuffixes; i++) {
        if (strcmp(end, suffixes[i]) == 0) {
            if (v > INT64_MAX / factors[i])
                return false;
            *out = v * factors[i];
            return true;
        }
    }
    return false;
}

bool tp_parse_duration_ms(const char *s, int64_t *out_ms)
{
    static const char *const sfx[] = {"", "ms", "s", "m", "h", "d"};
    static const int64_t fac[] = {1000, 1, 1000, 60000, 3600000, 86400000};
    return parse_scaled(s, sfx, fac, TP_ARRAY_LEN(sfx), out_ms);
}

bool tp_parse_size(const char *s, int64_t *out)
{
    static const char *const sfx[] = {"", "k", "K", "M", "G", "kB", "KB", "MB", "GB"};
    static const int64_t fac[] = {1, 1024, 1024, 1 << 20, 1 << 30, 1024, 1024, 1 << 20, 1 << 30};
    return parse_scaled(s, sfx, fac, TP_ARRAY_LEN(sfx), out);
}

char *tp_strtrim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

char *tp_read_file(const char *path, size_t *len_out)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    tp_buf_t b = {0};
    char chunk[8192];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        tp_buf_append(&b, chunk, n);
    int err = ferror(f) ? EIO : 0;
    fclose(f);
    if (err) {
        tp_buf_free(&b);
        errno = err;
        return NULL;
    }
    if (len_out)
        *len_out = b.len;
    return tp_buf_steal(&b);
}

bool tp_consttime_eq(const void *a, size_t alen, const void *b, size_t blen)
{
    if (alen != blen)
        return false;
    return CRYPTO_memcmp(a, b, alen) == 0;
}

uint64_t tp_random_u64(void)
{
    uint64_t v;
    if (RAND_bytes((unsigned char *)&v, sizeof v) != 1)
        abort();
    return v;
}

int64_t tp_jitter_ms(int64_t base_ms, double frac)
{
    double r = (double)(tp_random_u64() >> 11) / (double)(1ULL << 53); /* [0,1) */
    double f = 1.0 - frac + 2.0 * frac * r;
    return (int64_t)((double)base_ms * f);
}
