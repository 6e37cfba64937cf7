/* Timestamps in JSON answers (include/tidepool/isots.h): one parser for the
 * two text forms that reach the server (Postgres' DateStyle=ISO output and
 * the ISO 8601 strings of the Databricks Statement Execution API), one
 * canonical output form, the one Postgres' to_json writes with TimeZone=UTC
 * ("2025-01-01T10:00:00.5+00:00", timestamp without zone without offset,
 * " BC" suffix, infinity as is), so table reads, dataset reads from Postgres
 * or the warehouse and write answers (to_jsonb in SQL) agree byte for byte.
 * timestamptz values are shifted to UTC whatever offset they came with, so
 * the session or warehouse time zone cannot change an answer. Works on stack
 * buffers only (the encoders call it once per cell). Also builds the server's
 * conninfo that pins DateStyle and TimeZone for its sessions. It does not
 * handle date, time or interval values, nor arrays of timestamps. */
#include "tidepool/isots.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

static bool digits(const char *s, size_t n, size_t *i, int want, int *out)
{
    int v = 0;
    for (int k = 0; k < want; k++, (*i)++) {
        if (*i >= n || s[*i] < '0' || s[*i] > '9')
            return false;
        v = v * 10 + (s[*i] - '0');
    }
    *out = v;
    return true;
}

static bool lit(const char *s, size_t n, size_t *i, char c)
{
    if (*i >= n || s[*i] != c)
        return false;
    (*i)++;
    return true;
}

int tp_isots_days_in_month(int64_t y, int m)
{
    static const int d[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return m == 2 && leap ? 29 : d[m - 1];
}

/* "Z" | ("+"|"-") HH [":"? MM [":"? SS]] */
static bool parse_off(const char *s, size_t n, size_t *i, tp_isots_t *ts)
{
    if (*i >= n || (s[*i] != 'Z' && s[*i] != '+' && s[*i] != '-'))
        return true;
    ts->has_off = true;
    if (s[(*i)++] == 'Z')
        return true;
    int sign = s[*i - 1] == '-' ? -1 : 1, h, m = 0, sec = 0;
    if (!digits(s, n, i, 2, &h) || h > 15)
        return false;
    if (*i < n && (s[*i] == ':' || (s[*i] >= '0' && s[*i] <= '9'))) {
        lit(s, n, i, ':');
        if (!digits(s, n, i, 2, &m) || m > 59)
            return false;
        if (*i < n && (s[*i] == ':' || (s[*i] >= '0' && s[*i] <= '9'))) {
            lit(s, n, i, ':');
            if (!digits(s, n, i, 2, &sec) || sec > 59)
                return false;
        }
    }
    ts->off = sign * (h * 3600 + m * 60 + sec);
    return true;
}

bool tp_isots_parse(const char *s, size_t n, tp_isots_t *ts)
{
    memset(ts, 0, sizeof *ts);
    if (n == 8 && memcmp(s, "infinity", 8) == 0) {
        ts->special = 1;
        return true;
    }
    if (n == 9 && memcmp(s, "-infinity", 9) == 0) {
        ts->special = -1;
        return true;
    }
    size_t i = 0;
    int sign = 0;
    if (n > 0 && (s[0] == '+' || s[0] == '-'))
        sign = s[i++] == '-' ? -1 : 1;
    size_t y0 = i;
    int64_t y = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9' && i - y0 < 9)
        y = y * 10 + (s[i++] - '0');
    if (i - y0 < 4)
        return false;
    size_t j = 0; /* the rest, after the year */
    const char *r = s + i;
    size_t rn = n - i;
    if (!lit(r, rn, &j, '-') || !digits(r, rn, &j, 2, &ts->mon) || !lit(r, rn, &j, '-') ||
        !digits(r, rn, &j, 2, &ts->day) || !(lit(r, rn, &j, ' ') || lit(r, rn, &j, 'T')) ||
        !digits(r, rn, &j, 2, &ts->hour) || !lit(r, rn, &j, ':') ||
        !digits(r, rn, &j, 2, &ts->min) || !lit(r, rn, &j, ':') || !digits(r, rn, &j, 2, &ts->sec))
        return false;
    if (lit(r, rn, &j, '.')) {
        int nd = 0;
        while (j < rn && r[j] >= '0' && r[j] <= '9') {
            if (nd++ < 6)
                ts->usec = ts->usec * 10 + (r[j] - '0');
            j++;
        }
        if (nd == 0)
            return false;
        for (; nd < 6; nd++)
            ts->usec *= 10;
    }
    if (!parse_off(r, rn, &j, ts))
        return false;
    bool bc = rn - j == 3 && memcmp(r + j, " BC", 3) == 0;
    if (bc)
        j += 3;
    if (j != rn || (bc && (sign != 0 || y == 0)))
        return false;
    ts->year = bc ? 1 - y : sign < 0 ? -y : y;
    return ts->mon >= 1 && ts->mon <= 12 && ts->day >= 1 &&
           ts->day <= tp_isots_days_in_month(ts->year, ts->mon) && ts->hour <= 23 && ts->min <= 59 && ts->sec <= 59;
}

/* H. Hinnant's algorithms (chrono-Compatible Low-Level Date Algorithms). */
int64_t tp_isots_days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

void tp_isots_civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

/* ts moved by -ts->off seconds (its UTC wall time). */
static void to_utc(tp_isots_t *ts)
{
    int64_t days = tp_isots_days_from_civil(ts->year, ts->mon, ts->day);
    int64_t secs = (int64_t)ts->hour * 3600 + ts->min * 60 + ts->sec - ts->off;
    int64_t dd = secs >= 0 ? secs / 86400 : -((-secs + 86399) / 86400);
    secs -= dd * 86400;
    tp_isots_civil_from_days(days + dd, &ts->year, &ts->mon, &ts->day);
    ts->hour = (int)(secs / 3600);
    ts->min = (int)(secs / 60 % 60);
    ts->sec = (int)(secs % 60);
    ts->off = 0;
}

/* Two digits of v (0..99) at p. */
static char *put2(char *p, int v)
{
    p[0] = (char)('0' + v / 10);
    p[1] = (char)('0' + v % 10);
    return p + 2;
}

size_t tp_isots_format(const tp_isots_t *in, bool tz, char out[TP_ISOTS_MAX])
{
    if (in->special) {
        strcpy(out, in->special > 0 ? "infinity" : "-infinity");
        return strlen(out);
    }
    if (in->has_off != tz)
        return 0;
    tp_isots_t ts = *in;
    if (tz && ts.off != 0)
        to_utc(&ts);
    /* Written by hand, not snprintf: this runs once per cell of a read. */
    uint64_t y = (uint64_t)(ts.year > 0 ? ts.year : 1 - ts.year);
    char yd[24];
    int nd = 0;
    do {
        yd[nd++] = (char)('0' + y % 10);
        y /= 10;
    } while (y);
    char *p = out;
    for (int k = nd; k < 4; k++)
        *p++ = '0';
    while (nd)
        *p++ = yd[--nd];
    *p++ = '-';
    p = put2(p, ts.mon);
    *p++ = '-';
    p = put2(p, ts.day);
    *p++ = 'T';
    p = put2(p, ts.hour);
    *p++ = ':';
    p = put2(p, ts.min);
    *p++ = ':';
    p = put2(p, ts.sec);
    if (ts.usec) {
        int u = ts.usec, len = 6;
        while (u % 10 == 0) {
            u /= 10;
            len--;
        }
        *p++ = '.';
        for (int k = len - 1; k >= 0; k--, u /= 10)
            p[k] = (char)('0' + u % 10);
        p += len;
    }
    if (tz) {
        memcpy(p, "+00:00", 6);
        p += 6;
    }
    if (ts.year <= 0) {
        memcpy(p, " BC", 3);
        p += 3;
    }
    *p = '\0';
    return (size_t)(p - out);
}

size_t tp_isots_canon(const char *s, size_t n, bool tz, char out[TP_ISOTS_MAX])
{
    tp_isots_t ts;
    if (!tp_isots_parse(s, n, &ts))
        return 0;
    return tp_isots_format(&ts, tz, out);
}

/* ---- session settings ---- */

static const char SESSION_OPTS[] = "-c DateStyle=ISO -c TimeZone=UTC";

static void put_quoted(tp_buf_t *b, const char *v)
{
    tp_buf_putc(b, '\'');
    for (; *v; v++) {
        if (*v == '\'' || *v == '\\')
            tp_buf_putc(b, '\\');
        tp_buf_putc(b, *v);
    }
    tp_buf_putc(b, '\'');
}

static void put_urlenc(tp_buf_t *b, const char *v)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
            strchr("-_.~", *p)) {
            tp_buf_putc(b, (char)*p);
        } else {
            char e[3] = {'%', hex[*p >> 4], hex[*p & 15]};
            tp_buf_append(b, e, 3);
        }
    }
}

char *tp_isots_dsn(const char *dsn)
{
    dsn = dsn ? dsn : "";
    bool uri = strncmp(dsn, "postgresql://", 13) == 0 || strncmp(dsn, "postgres://", 11) == 0;
    bool kv = uri || strchr(dsn, '=') != NULL;
    /* The options already asked for: the dsn's own, else libpq's environment. */
    const char *have = NULL;
    PQconninfoOption *opts = kv ? PQconninfoParse(dsn, NULL) : NULL;
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, "options") == 0 && o->val && *o->val)
            have = o->val;
    if (!have && getenv("PGOPTIONS") && *getenv("PGOPTIONS"))
        have = getenv("PGOPTIONS");
    tp_buf_t merged = {0}, b = {0};
    if (have) {
        tp_buf_puts(&merged, have);
        tp_buf_putc(&merged, ' ');
    }
    tp_buf_puts(&merged, SESSION_OPTS);
    if (uri) {
        /* A later options parameter replaces an earlier one. */
        tp_buf_puts(&b, dsn);
        tp_buf_puts(&b, strchr(dsn, '?') ? "&options=" : "?options=");
        put_urlenc(&b, merged.data);
    } else {
        if (kv) {
            tp_buf_puts(&b, dsn);
            tp_buf_putc(&b, ' ');
        } else if (*dsn) {
            tp_buf_puts(&b, "dbname=");
            put_quoted(&b, dsn);
            tp_buf_putc(&b, ' ');
        }
        tp_buf_puts(&b, "options=");
        put_quoted(&b, merged.data);
    }
    PQconninfoFree(opts);
    tp_buf_free(&merged);
    return tp_buf_steal(&b);
}
