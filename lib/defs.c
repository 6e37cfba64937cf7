/* Definitions parser: annotated SQL files for sync jobs and datasets (DESIGN §5).
 * Owns: reading a directory of NAME.sql (and NAME.warehouse.sql twins), the
 * "-- @key value" header grammar and every key's validation, the SQL body
 * scanner that finds :name markers outside literals, quoted identifiers,
 * comments and :: casts (rewriting them to $n for Postgres), the typed value
 * parser the server uses for request parameters, and @covers routing.
 * Every problem becomes one "file:line: message" in a tp_defs_diag_t; a file
 * with an error is left out of the set. It deliberately knows nothing about
 * Postgres connections, HTTP or the warehouse: it never runs the SQL, so
 * column names in @key/@watermark are checked only as identifiers here and
 * against the result schema by the daemon. */
#include "tidepool/defs.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "tidepool/isots.h"

/* ------------------------------------------------------------------ types */

static const struct {
    const char *name, *pg;
    unsigned oid;
} type_info[] = {
    [TP_DEFS_STRING] = {"STRING", "text", 25},
    [TP_DEFS_INT] = {"INT", "integer", 23},
    [TP_DEFS_BIGINT] = {"BIGINT", "bigint", 20},
    [TP_DEFS_DOUBLE] = {"DOUBLE", "double precision", 701},
    [TP_DEFS_DECIMAL] = {"DECIMAL", "numeric", 1700},
    [TP_DEFS_BOOLEAN] = {"BOOLEAN", "boolean", 16},
    [TP_DEFS_DATE] = {"DATE", "date", 1082},
    [TP_DEFS_TIMESTAMP] = {"TIMESTAMP", "timestamptz", 1184},
};

const char *tp_defs_type_name(tp_defs_type_t t)
{
    return (unsigned)t < TP_ARRAY_LEN(type_info) ? type_info[t].name : "?";
}

const char *tp_defs_type_pg(tp_defs_type_t t)
{
    return (unsigned)t < TP_ARRAY_LEN(type_info) ? type_info[t].pg : "text";
}

unsigned tp_defs_type_oid(tp_defs_type_t t)
{
    return (unsigned)t < TP_ARRAY_LEN(type_info) ? type_info[t].oid : 25;
}

static bool type_from_name(const char *s, tp_defs_type_t *out)
{
    for (size_t i = 0; i < TP_ARRAY_LEN(type_info); i++) {
        if (strcasecmp(s, type_info[i].name) == 0) {
            *out = (tp_defs_type_t)i;
            return true;
        }
    }
    return false;
}

/* ----------------------------------------------------------------- values */

static bool all_digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return false;
    return n > 0;
}

static int num(const char *s, size_t n)
{
    int v = 0;
    for (size_t i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return v;
}

/* Parses "YYYY-MM-DD" at s (exactly 10 characters); fills days since epoch. */
static bool parse_date10(const char *s, int64_t *days)
{
    if (strlen(s) < 10 || !all_digits(s, 4) || s[4] != '-' || !all_digits(s + 5, 2) ||
        s[7] != '-' || !all_digits(s + 8, 2))
        return false;
    int y = num(s, 4), m = num(s + 5, 2), d = num(s + 8, 2);
    if (y < 1 || m < 1 || m > 12 || d < 1 || d > tp_isots_days_in_month(y, m))
        return false;
    *days = tp_isots_days_from_civil(y, m, d);
    return true;
}

static bool parse_timestamp(const char *s, tp_defs_value_t *out)
{
    int64_t days;
    if (!parse_date10(s, &days))
        return false;
    const char *p = s + 10;
    int64_t secs = 0, frac_us = 0, offset_s = 0;
    if (*p == 'T' || *p == 't' || *p == ' ') {
        p++;
        if (!all_digits(p, 2) || p[2] != ':' || !all_digits(p + 3, 2))
            return false;
        int hh = num(p, 2), mi = num(p + 3, 2), ss = 0;
        p += 5;
        if (*p == ':') {
            if (!all_digits(p + 1, 2))
                return false;
            ss = num(p + 1, 2);
            p += 3;
            if (*p == '.') {
                p++;
                size_t nd = 0;
                while (isdigit((unsigned char)p[nd]))
                    nd++;
                if (nd == 0 || nd > 9)
                    return false;
                for (size_t i = 0; i < 6; i++)
                    frac_us = frac_us * 10 + (i < nd ? p[i] - '0' : 0);
                p += nd;
            }
        }
        if (hh > 23 || mi > 59 || ss > 59)
            return false;
        secs = hh * 3600 + mi * 60 + ss;
        if (*p == 'Z' || *p == 'z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            int sign = *p == '-' ? -1 : 1;
            p++;
            if (!all_digits(p, 2))
                return false;
            int oh = num(p, 2), om = 0;
            p += 2;
            if (*p == ':')
                p++;
            if (isdigit((unsigned char)*p)) {
                if (!all_digits(p, 2))
                    return false;
                om = num(p, 2);
                p += 2;
            }
            if (oh > 18 || om > 59)
                return false;
            offset_s = sign * (oh * 3600 + om * 60);
        }
    }
    if (*p != '\0')
        return false;
    int64_t epoch_s = days * 86400 + secs - offset_s;
    int64_t day = epoch_s >= 0 ? epoch_s / 86400 : -((-epoch_s + 86399) / 86400);
    int64_t sod = epoch_s - day * 86400;
    int64_t y;
    int m, d;
    tp_isots_civil_from_days(day, &y, &m, &d);
    if (y < 1 || y > 9999)
        return false;
    out->epoch_us = epoch_s * 1000000 + frac_us;
    int n = snprintf(out->canon, sizeof out->canon, "%04d-%02d-%02dT%02d:%02d:%02d", (int)y, m, d,
                     (int)(sod / 3600), (int)(sod / 60 % 60), (int)(sod % 60));
    if (frac_us)
        n += snprintf(out->canon + n, sizeof out->canon - (size_t)n, ".%06lld", (long long)frac_us);
    snprintf(out->canon + n, sizeof out->canon - (size_t)n, "Z");
    return true;
}

/* [+-]?(digits[.digits*]|.digits) with at most max_digits digits; *has_exp for DOUBLE. */
static bool numeric_shape(const char *s, bool allow_exp, size_t max_digits)
{
    const char *p = s;
    if (*p == '+' || *p == '-')
        p++;
    size_t digits = 0, before = 0, after = 0;
    while (isdigit((unsigned char)*p))
        p++, before++;
    if (*p == '.') {
        p++;
        while (isdigit((unsigned char)*p))
            p++, after++;
    }
    digits = before + after;
    if (digits == 0 || digits > max_digits)
        return false;
    if (allow_exp && (*p == 'e' || *p == 'E')) {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!isdigit((unsigned char)*p))
            return false;
        while (isdigit((unsigned char)*p))
            p++;
    }
    return *p == '\0';
}

static bool valid_utf8(const unsigned char *s)
{
    while (*s) {
        unsigned c = *s;
        size_t n = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (n == 9 || (n == 1 && c < 0xC2) || (n == 3 && c > 0xF4))
            return false;
        unsigned cp = n == 0 ? c : c & (0x3F >> n);
        for (size_t i = 1; i <= n; i++) {
            if ((s[i] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i] & 0x3F);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return false;
        s += n + 1;
    }
    return true;
}

bool tp_defs_value_parse(tp_defs_type_t t, const char *s, tp_defs_value_t *out, const char **why)
{
    memset(out, 0, sizeof *out);
    out->type = t;
    int64_t v;
    bool b;
    switch (t) {
    case TP_DEFS_STRING:
        if (!valid_utf8((const unsigned char *)s)) {
            *why = "must be valid UTF-8 text";
            return false;
        }
        return true;
    case TP_DEFS_INT:
    case TP_DEFS_BIGINT:
        if (!numeric_shape(s, false, 19) || strchr(s, '.') != NULL) {
            *why = "must be an integer";
            return false;
        }
        if (!tp_parse_int64(s, t == TP_DEFS_INT ? INT32_MIN : INT64_MIN,
                            t == TP_DEFS_INT ? INT32_MAX : INT64_MAX, &v)) {
            *why = t == TP_DEFS_INT ? "is out of range for INT (-2147483648 to 2147483647)"
                                    : "is out of range for BIGINT";
            return false;
        }
        out->i = v;
        snprintf(out->canon, sizeof out->canon, "%lld", (long long)v);
        return true;
    case TP_DEFS_DOUBLE:
        if (!numeric_shape(s, true, 40)) {
            *why = "must be a number";
            return false;
        }
        out->d = strtod(s, NULL);
        if (!isfinite(out->d)) {
            *why = "must be a finite number";
            return false;
        }
        snprintf(out->canon, sizeof out->canon, "%.17g", out->d);
        return true;
    case TP_DEFS_DECIMAL:
        if (!numeric_shape(s, false, 38)) {
            *why = "must be a decimal number (digits, optional sign and point, at most 38 digits)";
            return false;
        }
        snprintf(out->canon, sizeof out->canon, "%s", s);
        return true;
    case TP_DEFS_BOOLEAN:
        if (!tp_parse_bool(s, &b)) {
            *why = "must be true or false";
            return false;
        }
        out->i = b;
        snprintf(out->canon, sizeof out->canon, "%s", b ? "true" : "false");
        return true;
    case TP_DEFS_DATE: {
        int64_t days;
        if (strlen(s) != 10 || !parse_date10(s, &days)) {
            *why = "must be a date YYYY-MM-DD";
            return false;
        }
        out->epoch_us = days * 86400 * INT64_C(1000000);
        snprintf(out->canon, sizeof out->canon, "%.10s", s);
        return true;
    }
    case TP_DEFS_TIMESTAMP:
        if (!parse_timestamp(s, out)) {
            *why = "must be an ISO-8601 timestamp (YYYY-MM-DDTHH:MM:SS[.fff][Z|+HH:MM])";
            return false;
        }
        return true;
    }
    *why = "has an unknown type";
    return false;
}

/* ---------------------------------------------------------- diagnostics */

static void diag_add(tp_defs_diag_t *d, const char *path, int line, const char *fmt, ...)
    TP_PRINTF(4, 5);

static void diag_add(tp_defs_diag_t *d, const char *path, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = tp_xvasprintf(fmt, ap);
    va_end(ap);
    d->msgs = tp_xrealloc(d->msgs, (d->n + 1) * sizeof *d->msgs);
    d->msgs[d->n++] = tp_xasprintf("%s:%d: %s", path, line, msg);
    free(msg);
}

/* Splits "path:line: msg" at its first ":<digits>: "; returns the line, sets *plen. */
static long diag_line(const char *m, size_t *plen)
{
    for (const char *p = strchr(m, ':'); p != NULL; p = strchr(p + 1, ':')) {
        char *end;
        long line = strtol(p + 1, &end, 10);
        if (end > p + 1 && isdigit((unsigned char)p[1]) && end[0] == ':' && end[1] == ' ') {
            *plen = (size_t)(p - m);
            return line;
        }
    }
    *plen = strlen(m);
    return 0;
}

static int diag_cmp(const char *a, const char *b)
{
    size_t al, bl;
    long la = diag_line(a, &al), lb = diag_line(b, &bl);
    int c = strncmp(a, b, al < bl ? al : bl);
    if (c == 0 && al != bl)
        c = al < bl ? -1 : 1;
    return c != 0 ? c : (la > lb) - (la < lb);
}

/* Orders the messages from start on by file, then line (stable: insertion sort). */
static void diag_sort(tp_defs_diag_t *d, size_t start)
{
    for (size_t i = start + 1; i < d->n; i++) {
        char *m = d->msgs[i];
        size_t j = i;
        while (j > start && diag_cmp(d->msgs[j - 1], m) > 0) {
            d->msgs[j] = d->msgs[j - 1];
            j--;
        }
        d->msgs[j] = m;
    }
}

void tp_defs_diag_free(tp_defs_diag_t *d)
{
    if (d == NULL)
        return;
    for (size_t i = 0; i < d->n; i++)
        free(d->msgs[i]);
    free(d->msgs);
    d->msgs = NULL;
    d->n = 0;
}

/* ------------------------------------------------------------- scanning */

static bool ident_start(char c)
{
    return isalpha((unsigned char)c) || c == '_' || (unsigned char)c >= 0x80;
}

static bool ident_char(char c)
{
    return ident_start(c) || isdigit((unsigned char)c) || c == '$';
}

typedef struct scanner {
    const char *t;
    size_t i, n;
    int line;
    tp_buf_t out;
    bool rewrite;
    char **names;
    int *name_lines;
    size_t n_names;
    int err_line;
    char *err;
    size_t errlen;
} scanner_t;

/* Copies text[i..j) to the output, counting lines. */
static void copy_to(scanner_t *s, size_t j)
{
    for (size_t k = s->i; k < j; k++)
        if (s->t[k] == '\n')
            s->line++;
    tp_buf_append(&s->out, s->t + s->i, j - s->i);
    s->i = j;
}

static bool scan_fail(scanner_t *s, int line, const char *fmt, ...) TP_PRINTF(3, 4);

static bool scan_fail(scanner_t *s, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, s->errlen, fmt, ap);
    va_end(ap);
    s->err_line = line;
    return false;
}

/* A quoted run opened by q at s->i: doubled q escapes it; with backslashes, \x too. */
static bool skip_quoted(scanner_t *s, char q, bool backslashes, const char *what)
{
    int start = s->line;
    size_t j = s->i + 1;
    for (;;) {
        if (j >= s->n)
            return scan_fail(s, start, "unterminated %s", what);
        if (backslashes && s->t[j] == '\\' && j + 1 < s->n) {
            j += 2;
            continue;
        }
        if (s->t[j] == q) {
            if (j + 1 < s->n && s->t[j + 1] == q) {
                j += 2;
                continue;
            }
            break;
        }
        j++;
    }
    copy_to(s, j + 1);
    return true;
}

static bool skip_block_comment(scanner_t *s)
{
    int start = s->line, depth = 0;
    size_t j = s->i;
    while (j < s->n) {
        if (s->t[j] == '/' && j + 1 < s->n && s->t[j + 1] == '*') {
            depth++;
            j += 2;
        } else if (s->t[j] == '*' && j + 1 < s->n && s->t[j + 1] == '/') {
            j += 2;
            if (--depth == 0) {
                copy_to(s, j);
                return true;
            }
        } else {
            j++;
        }
    }
    return scan_fail(s, start, "unterminated /* comment");
}

/* $tag$...$tag$ at s->i, or a lone '$'. Returns false only on an error. */
static bool skip_dollar(scanner_t *s)
{
    size_t j = s->i + 1;
    if (j < s->n && isdigit((unsigned char)s->t[j]))
        return scan_fail(s, s->line, "positional parameter $%c: use :name markers", s->t[j]);
    while (j < s->n && ident_char(s->t[j]) && s->t[j] != '$')
        j++;
    if (j >= s->n || s->t[j] != '$') {
        copy_to(s, s->i + 1);
        return true;
    }
    size_t taglen = j + 1 - s->i;
    char *tag = tp_xstrndup(s->t + s->i, taglen);
    const char *end = strstr(s->t + j + 1, tag);
    free(tag);
    if (end == NULL)
        return scan_fail(s, s->line, "unterminated dollar-quoted string");
    copy_to(s, (size_t)(end - s->t) + taglen);
    return true;
}

static void add_marker(scanner_t *s, const char *name, size_t len)
{
    size_t k;
    for (k = 0; k < s->n_names; k++)
        if (strlen(s->names[k]) == len && memcmp(s->names[k], name, len) == 0)
            break;
    if (k == s->n_names) {
        s->names = tp_xrealloc(s->names, (k + 1) * sizeof *s->names);
        s->name_lines = tp_xrealloc(s->name_lines, (k + 1) * sizeof *s->name_lines);
        s->names[k] = tp_xstrndup(name, len);
        s->name_lines[k] = s->line;
        s->n_names++;
    }
    if (s->rewrite)
        tp_buf_printf(&s->out, "$%zu", k + 1);
    else
        tp_buf_append(&s->out, name - 1, len + 1);
}

static void scanner_free(scanner_t *s)
{
    for (size_t k = 0; k < s->n_names; k++)
        free(s->names[k]);
    free(s->names);
    free(s->name_lines);
    tp_buf_free(&s->out);
}

/* The scanner proper; on success s->out holds the statement without a trailing
 * ';' or trailing comments (so callers may wrap it: "SELECT * FROM (sql) q"). */
static bool scan(scanner_t *s, bool pg)
{
    int semi_line = 0, first_line = s->line;
    size_t semi_len = 0;
    bool any = false;
    while (s->i < s->n) {
        const char *t = s->t;
        size_t i = s->i;
        char c = t[i], c1 = i + 1 < s->n ? t[i + 1] : '\0';
        if (c == '-' && c1 == '-') {
            size_t j = i;
            while (j < s->n && t[j] != '\n')
                j++;
            copy_to(s, j);
            continue;
        }
        if (c == '/' && c1 == '*') {
            if (!skip_block_comment(s))
                return false;
            continue;
        }
        if (isspace((unsigned char)c)) {
            copy_to(s, i + 1);
            continue;
        }
        if (semi_line != 0)
            return scan_fail(s, s->line,
                             "more than one SQL statement (this follows the ';' on line %d)",
                             semi_line);
        any = true;
        bool after_ident = i > 0 && ident_char(t[i - 1]);
        if (c == ';') {
            semi_line = s->line;
            copy_to(s, i + 1);
        } else if (c == '\'') {
            bool estr = pg && i > 0 && (t[i - 1] == 'E' || t[i - 1] == 'e') &&
                        (i < 2 || !ident_char(t[i - 2]));
            if (!skip_quoted(s, '\'', !pg || estr, "string literal"))
                return false;
        } else if (c == '"') {
            if (!skip_quoted(s, '"', !pg, pg ? "quoted identifier" : "string literal"))
                return false;
        } else if (c == '`' && !pg) {
            if (!skip_quoted(s, '`', false, "quoted identifier"))
                return false;
        } else if (c == '$' && pg && !after_ident) {
            if (!skip_dollar(s))
                return false;
        } else if (c == ':' && c1 == ':') {
            size_t j = i;
            while (j < s->n && t[j] == ':')
                j++;
            copy_to(s, j);
        } else if (c == ':' && ident_start(c1) && (unsigned char)c1 < 0x80) {
            size_t j = i + 1;
            while (j < s->n && (isalnum((unsigned char)t[j]) || t[j] == '_'))
                j++;
            add_marker(s, t + i + 1, j - i - 1);
            s->i = j;
        } else if (ident_char(c)) {
            size_t j = i;
            while (j < s->n && ident_char(t[j]))
                j++;
            copy_to(s, j);
        } else {
            copy_to(s, i + 1);
        }
        if (semi_line == 0)
            semi_len = s->out.len; /* end of the last token: trailing comments go */
    }
    if (!any)
        return scan_fail(s, first_line, "empty SQL body");
    s->out.len = semi_len;
    while (s->out.len > 0 && isspace((unsigned char)s->out.data[s->out.len - 1]))
        s->out.len--;
    s->out.data[s->out.len] = '\0';
    return true;
}

/* Scans text; on success moves names (and their first lines, if lines) to the caller. */
static bool scan_body(const char *text, int first_line, bool pg, bool rewrite, tp_defs_body_t *out,
                      int **lines, int *err_line, char *err, size_t errlen)
{
    scanner_t s = {.t = text, .n = strlen(text), .line = first_line, .rewrite = rewrite,
                   .err = err, .errlen = errlen};
    if (!scan(&s, pg)) {
        *err_line = s.err_line;
        scanner_free(&s);
        return false;
    }
    out->sql = tp_buf_steal(&s.out);
    out->names = s.names;
    out->n_names = s.n_names;
    if (lines != NULL)
        *lines = s.name_lines;
    else
        free(s.name_lines);
    return true;
}

bool tp_defs_scan_body(const char *text, bool dialect_pg, bool rewrite, tp_defs_body_t *out,
                       int *err_line, char *err, size_t errlen)
{
    return scan_body(text, 1, dialect_pg, rewrite, out, NULL, err_line, err, errlen);
}

void tp_defs_body_free(tp_defs_body_t *b)
{
    if (b == NULL)
        return;
    free(b->path);
    free(b->sql);
    for (size_t k = 0; k < b->n_names; k++)
        free(b->names[k]);
    free(b->names);
    free(b->index);
    memset(b, 0, sizeof *b);
}

/* --------------------------------------------------------- file headers */

typedef struct setting {
    char *key;
    char *value; /* trimmed; "" when absent */
    int line;
} setting_t;

typedef struct pfile {
    char *path;
    char *text;
    setting_t *set;
    size_t n_set;
    const char *body; /* into text */
    int body_line;
    int last_line;
    tp_defs_diag_t *diag;
    size_t diag_start; /* diag->n when this file began: errors are those after it */
} pfile_t;

static bool pfile_ok(const pfile_t *f)
{
    return f->diag->n == f->diag_start;
}

static void pfile_free(pfile_t *f)
{
    for (size_t i = 0; i < f->n_set; i++) {
        free(f->set[i].key);
        free(f->set[i].value);
    }
    free(f->set);
    free(f->text);
    free(f->path);
}

/* Reads path and splits its leading settings from its body. */
static bool pfile_read(pfile_t *f, const char *path, tp_defs_diag_t *diag)
{
    memset(f, 0, sizeof *f);
    f->path = tp_xstrdup(path);
    f->diag = diag;
    f->diag_start = diag->n;
    size_t len = 0;
    f->text = tp_read_file(path, &len);
    if (f->text == NULL) {
        diag_add(diag, path, 0, "cannot read: %s", strerror(errno));
        return false;
    }
    if (strlen(f->text) != len) {
        diag_add(diag, path, 1, "file contains a NUL byte");
        return false;
    }
    int line = 1;
    bool in_header = true;
    char *start = f->text;
    if (strncmp(start, "\xEF\xBB\xBF", 3) == 0)
        start += 3; /* a UTF-8 byte order mark some editors write */
    for (char *p = start; *p != '\0'; line++) {
        char *eol = strchr(p, '\n');
        size_t ll = eol ? (size_t)(eol - p) : strlen(p);
        char *l = tp_xstrndup(p, ll);
        char *tl = tp_strtrim(l);
        if (in_header && *tl != '\0' && strncmp(tl, "--", 2) != 0) {
            in_header = false;
            f->body = p;
            f->body_line = line;
        }
        bool setting = strncmp(tl, "--", 2) == 0 && *tp_strtrim(tl + 2) == '@';
        if (setting && in_header) {
            char *k = tp_strtrim(tl + 2) + 1;
            size_t kl = 0;
            while (k[kl] != '\0' && !isspace((unsigned char)k[kl]))
                kl++;
            f->set = tp_xrealloc(f->set, (f->n_set + 1) * sizeof *f->set);
            f->set[f->n_set].key = tp_xstrndup(k, kl);
            f->set[f->n_set].value = tp_xstrdup(tp_strtrim(k + kl));
            f->set[f->n_set].line = line;
            f->n_set++;
        } else if (setting) {
            char *k = tp_strtrim(tl + 2);
            size_t kl = 0;
            while (k[kl] != '\0' && !isspace((unsigned char)k[kl]))
                kl++;
            diag_add(diag, path, line, "setting %.*s must come before the SQL body (line %d)",
                     (int)kl, k, f->body_line);
        }
        free(l);
        f->last_line = line;
        if (eol == NULL)
            break;
        p = eol + 1;
    }
    if (f->body == NULL) {
        diag_add(diag, path, f->last_line > 0 ? f->last_line : 1, "empty SQL body");
        return false;
    }
    return pfile_ok(f);
}

typedef struct keyspec {
    const char *key;
    bool repeatable;
} keyspec_t;

/* Reports unknown and duplicated keys; fills first[k] with the first setting of key k. */
static void check_keys(pfile_t *f, const keyspec_t *keys, size_t nkeys, const setting_t **first,
                       const char *unknown_hint)
{
    for (size_t k = 0; k < nkeys; k++)
        first[k] = NULL;
    for (size_t i = 0; i < f->n_set; i++) {
        const setting_t *st = &f->set[i];
        size_t k;
        for (k = 0; k < nkeys; k++)
            if (strcmp(st->key, keys[k].key) == 0)
                break;
        if (k == nkeys) {
            diag_add(f->diag, f->path, st->line, "unknown key @%s%s", st->key, unknown_hint);
            continue;
        }
        if (first[k] != NULL && !keys[k].repeatable) {
            diag_add(f->diag, f->path, st->line, "duplicate @%s (first on line %d)", st->key,
                     first[k]->line);
            continue;
        }
        if (first[k] == NULL)
            first[k] = st;
    }
}

static bool valid_name(const char *s)
{
    if (!islower((unsigned char)*s))
        return false;
    for (s++; *s; s++)
        if (!islower((unsigned char)*s) && !isdigit((unsigned char)*s) && *s != '_')
            return false;
    return true;
}

/* A lower-case SQL identifier: [a-z_][a-z0-9_]*. */
static bool valid_ident(const char *s)
{
    if (!islower((unsigned char)*s) && *s != '_')
        return false;
    for (s++; *s; s++)
        if (!islower((unsigned char)*s) && !isdigit((unsigned char)*s) && *s != '_')
            return false;
    return true;
}

static void strv_free(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* Splits "a, b ,c" into trimmed items, each checked by ok(). Empty items are errors. */
static bool split_list(pfile_t *f, const setting_t *st, bool (*ok)(const char *),
                       const char *what, char ***out, size_t *n)
{
    char *copy = tp_xstrdup(st->value);
    bool good = true;
    if (*tp_strtrim(copy) == '\0') {
        diag_add(f->diag, f->path, st->line, "@%s needs a value", st->key);
        free(copy);
        return false;
    }
    char *end = copy + strlen(copy);
    for (char *p = copy; good && p <= end;) {
        char *comma = strchr(p, ',');
        if (comma)
            *comma = '\0';
        char *item = tp_strtrim(p);
        if (*item == '\0' || !ok(item)) {
            diag_add(f->diag, f->path, st->line, "@%s: \"%s\" is not a valid %s", st->key,
                     item, what);
            good = false;
            break;
        }
        for (size_t i = 0; i < *n; i++) {
            if (strcmp((*out)[i], item) == 0) {
                diag_add(f->diag, f->path, st->line, "@%s: \"%s\" is listed twice", st->key,
                         item);
                good = false;
            }
        }
        if (!good)
            break;
        *out = tp_xrealloc(*out, (*n + 1) * sizeof **out);
        (*out)[(*n)++] = tp_xstrdup(item);
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    free(copy);
    return good;
}

static bool parse_duration_key(pfile_t *f, const setting_t *st, int64_t min_ms, int64_t *out)
{
    if (!tp_parse_duration_ms(st->value, out) || *out < min_ms) {
        diag_add(f->diag, f->path, st->line,
                 "@%s: bad duration \"%s\" (a number with s, m, h or d%s)", st->key, st->value,
                 min_ms >= 1000 ? ", at least 1s" : "");
        return false;
    }
    return true;
}

static bool no_value(pfile_t *f, const setting_t *st)
{
    if (*st->value != '\0') {
        diag_add(f->diag, f->path, st->line, "@%s takes no value", st->key);
        return false;
    }
    return true;
}

static bool need_value(pfile_t *f, const setting_t *st)
{
    if (*st->value == '\0') {
        diag_add(f->diag, f->path, st->line, "@%s needs a value", st->key);
        return false;
    }
    return true;
}

/* Scans the file's body; on failure reports at the file's line. */
static bool pfile_scan(pfile_t *f, bool pg, bool rewrite, tp_defs_body_t *out, int **lines)
{
    char err[256];
    int el = 0;
    memset(out, 0, sizeof *out);
    if (!scan_body(f->body, f->body_line, pg, rewrite, out, lines, &el, err, sizeof err)) {
        diag_add(f->diag, f->path, el, "%s", err);
        return false;
    }
    /* The body's first line is its first non-blank line. */
    out->path = tp_xstrdup(f->path);
    out->line = f->body_line;
    return true;
}

/* ------------------------------------------------------------ sync jobs */

enum { JK_TARGET, JK_MODE, JK_KEY, JK_WATERMARK, JK_EVERY, JK_TIMEOUT, JK_DELETES, JK_INDEX,
       JK_DESCRIPTION, JK_COUNT };

static const keyspec_t job_keys[JK_COUNT] = {
    [JK_TARGET] = {"target", false},       [JK_MODE] = {"mode", false},
    [JK_KEY] = {"key", false},             [JK_WATERMARK] = {"watermark", false},
    [JK_EVERY] = {"every", false},         [JK_TIMEOUT] = {"timeout", false},
    [JK_DELETES] = {"deletes", false},     [JK_INDEX] = {"index", true},
    [JK_DESCRIPTION] = {"description", false},
};

static void job_free(tp_defs_job_t *j)
{
    free(j->name);
    free(j->path);
    free(j->target);
    free(j->target_schema);
    free(j->target_table);
    strv_free(j->key, j->n_key);
    free(j->watermark);
    free(j->deletes_column);
    for (size_t i = 0; i < j->n_indexes; i++)
        strv_free(j->indexes[i].columns, j->indexes[i].n_columns);
    free(j->indexes);
    free(j->description);
    tp_defs_body_free(&j->body);
    memset(j, 0, sizeof *j);
}

static void missing(pfile_t *f, const char *key)
{
    diag_add(f->diag, f->path, 1, "missing required @%s", key);
}

static void job_target(pfile_t *f, const setting_t *st, tp_defs_job_t *j)
{
    const char *dot = strchr(st->value, '.');
    char *schema = dot ? tp_xstrndup(st->value, (size_t)(dot - st->value)) : NULL;
    if (schema == NULL || !valid_ident(schema) || !valid_ident(dot + 1)) {
        diag_add(f->diag, f->path, st->line,
                 "@target must be schema.table in lower-case identifiers, not \"%s\"", st->value);
    } else if (strcmp(schema, "tidepool") == 0 || strcmp(schema, "information_schema") == 0 ||
               strncmp(schema, "pg_", 3) == 0) {
        diag_add(f->diag, f->path, st->line, "@target schema %s is reserved", schema);
    } else {
        j->target = tp_xstrdup(st->value);
        j->target_line = st->line;
        j->target_schema = schema;
        j->target_table = tp_xstrdup(dot + 1);
        return;
    }
    free(schema);
}

static void job_deletes(pfile_t *f, const setting_t *st, tp_defs_job_t *j)
{
    const char *v = st->value;
    if (strcmp(v, "none") == 0) {
        j->deletes = TP_DEFS_DELETES_NONE;
    } else if (strncmp(v, "flag:", 5) == 0 && valid_ident(v + 5)) {
        j->deletes = TP_DEFS_DELETES_FLAG;
        j->deletes_column = tp_xstrdup(v + 5);
    } else if (strncmp(v, "reconcile:", 10) == 0) {
        if (!tp_parse_duration_ms(v + 10, &j->reconcile_ms) || j->reconcile_ms < 1000) {
            diag_add(f->diag, f->path, st->line,
                     "@deletes reconcile: bad duration \"%s\" (a number with s, m, h or d, at "
                     "least 1s)", v + 10);
            return;
        }
        if (j->mode != TP_DEFS_INCREMENTAL)
            diag_add(f->diag, f->path, st->line,
                     "@deletes reconcile only applies to @mode incremental (a snapshot "
                     "replaces the whole table)");
        j->deletes = TP_DEFS_DELETES_RECONCILE;
    } else {
        diag_add(f->diag, f->path, st->line,
                 "@deletes must be none, flag:COLUMN or reconcile:DURATION, not \"%s\"", v);
    }
}

static bool job_build(pfile_t *f, const char *name, tp_defs_job_t *j)
{
    const setting_t *k[JK_COUNT];
    memset(j, 0, sizeof *j);
    j->name = tp_xstrdup(name);
    j->path = tp_xstrdup(f->path);
    j->timeout_ms = 10 * 60 * 1000;
    check_keys(f, job_keys, JK_COUNT, k, "");
    if (k[JK_MODE] == NULL) {
        missing(f, "mode");
    } else if (strcmp(k[JK_MODE]->value, "snapshot") == 0) {
        j->mode = TP_DEFS_SNAPSHOT;
    } else if (strcmp(k[JK_MODE]->value, "incremental") == 0) {
        j->mode = TP_DEFS_INCREMENTAL;
    } else {
        diag_add(f->diag, f->path, k[JK_MODE]->line,
                 "@mode must be snapshot or incremental, not \"%s\"", k[JK_MODE]->value);
    }
    if (k[JK_TARGET] == NULL)
        missing(f, "target");
    else
        job_target(f, k[JK_TARGET], j);
    if (k[JK_KEY] != NULL)
        (void)split_list(f, k[JK_KEY], valid_ident, "column name", &j->key, &j->n_key);
    else if (j->mode == TP_DEFS_INCREMENTAL && k[JK_MODE] != NULL)
        diag_add(f->diag, f->path, k[JK_MODE]->line, "@mode incremental needs @key");
    if (k[JK_WATERMARK] != NULL) {
        if (!valid_ident(k[JK_WATERMARK]->value))
            diag_add(f->diag, f->path, k[JK_WATERMARK]->line,
                     "@watermark: \"%s\" is not a valid column name", k[JK_WATERMARK]->value);
        else if (j->mode != TP_DEFS_INCREMENTAL)
            diag_add(f->diag, f->path, k[JK_WATERMARK]->line,
                     "@watermark only applies to @mode incremental");
        else
            j->watermark = tp_xstrdup(k[JK_WATERMARK]->value);
    }
    if (k[JK_EVERY] == NULL)
        missing(f, "every");
    else
        (void)parse_duration_key(f, k[JK_EVERY], 1000, &j->every_ms);
    if (k[JK_TIMEOUT] != NULL)
        (void)parse_duration_key(f, k[JK_TIMEOUT], 1000, &j->timeout_ms);
    if (k[JK_DELETES] != NULL)
        job_deletes(f, k[JK_DELETES], j);
    for (size_t i = 0; i < f->n_set; i++) {
        const setting_t *st = &f->set[i];
        if (strcmp(st->key, "index") != 0)
            continue;
        tp_defs_index_t ix = {0};
        if (split_list(f, st, valid_ident, "column name", &ix.columns, &ix.n_columns)) {
            j->indexes = tp_xrealloc(j->indexes, (j->n_indexes + 1) * sizeof *j->indexes);
            j->indexes[j->n_indexes++] = ix;
        } else {
            strv_free(ix.columns, ix.n_columns);
        }
    }
    if (k[JK_DESCRIPTION] != NULL && need_value(f, k[JK_DESCRIPTION]))
        j->description = tp_xstrdup(k[JK_DESCRIPTION]->value);
    if (!pfile_ok(f))
        return false;

    int *lines = NULL;
    if (!pfile_scan(f, false, false, &j->body, &lines))
        return false;
    for (size_t i = 0; i < j->body.n_names; i++) {
        int line = lines[i];
        if (strcmp(j->body.names[i], "watermark") != 0)
            diag_add(f->diag, f->path, line,
                     ":%s is not a parameter here (a sync job body may only use :watermark)",
                     j->body.names[i]);
        else if (j->watermark == NULL)
            diag_add(f->diag, f->path, line, ":watermark needs @watermark COLUMN");
        else
            j->uses_watermark = true;
    }
    if (j->watermark != NULL && !j->uses_watermark)
        diag_add(f->diag, f->path, k[JK_WATERMARK]->line,
                 "@watermark %s is set but the body never uses :watermark", j->watermark);
    free(lines);
    return pfile_ok(f);
}

/* ------------------------------------------------------------- datasets */

enum { DK_PARAM, DK_REQUIRES, DK_MAX_STALENESS, DK_COVERS, DK_CACHE, DK_ROLES, DK_OBO,
       DK_DESCRIPTION, DK_COUNT };

static const keyspec_t dataset_keys[DK_COUNT] = {
    [DK_PARAM] = {"param", true},          [DK_REQUIRES] = {"requires", true},
    [DK_MAX_STALENESS] = {"max_staleness", false},
    [DK_COVERS] = {"covers", true},        [DK_CACHE] = {"cache", false},
    [DK_ROLES] = {"roles", true},          [DK_OBO] = {"obo", false},
    [DK_DESCRIPTION] = {"description", false},
};

static const keyspec_t twin_keys[] = {{"param", true}};

static void param_free(tp_defs_param_t *p)
{
    free(p->name);
    free(p->default_text);
    strv_free(p->choices, p->n_choices);
    free(p->choices_why);
    memset(p, 0, sizeof *p);
}

static void dataset_free(tp_defs_dataset_t *d)
{
    free(d->name);
    for (size_t i = 0; i < d->n_params; i++)
        param_free(&d->params[i]);
    free(d->params);
    strv_free(d->requires, d->n_requires);
    free(d->requires_line);
    free(d->covers);
    strv_free(d->roles, d->n_roles);
    free(d->description);
    tp_defs_body_free(&d->pg);
    tp_defs_body_free(&d->wh);
    memset(d, 0, sizeof *d);
}

/* Unquotes 'text' in place ('' is a quote); other text is left as it is. */
static char *unquote(char *v)
{
    size_t n = strlen(v);
    if (n >= 2 && v[0] == '\'' && v[n - 1] == '\'') {
        char *w = v;
        for (size_t r = 1; r + 1 < n; r++) {
            *w++ = v[r];
            if (v[r] == '\'' && v[r + 1] == '\'')
                r++;
        }
        *w = '\0';
    }
    return v;
}

bool tp_defs_param_parse(const tp_defs_param_t *p, const char *s, tp_defs_value_t *out,
                         const char **why)
{
    if (!tp_defs_value_parse(p->type, s, out, why))
        return false;
    if (p->n_choices == 0)
        return true;
    const char *text = tp_defs_value_text(out, s);
    for (size_t i = 0; i < p->n_choices; i++)
        if (strcmp(p->choices[i], text) == 0)
            return true;
    *why = p->choices_why;
    return false;
}

/* "(a, 'b c')" at *pp: fills p->choices (bind text), advances *pp past ')'. */
static bool parse_choices(pfile_t *f, const setting_t *st, char **pp, tp_defs_param_t *p)
{
    char *open = tp_strtrim(*pp), *close = strchr(open, ')');
    if (*open != '(' || close == NULL) {
        diag_add(f->diag, f->path, st->line, "@param %s: IN needs a list: IN (a, b)", p->name);
        return false;
    }
    *close = '\0';
    *pp = close + 1;
    tp_buf_t why = {0};
    tp_buf_puts(&why, "must be one of:");
    for (char *item = open + 1; item != NULL;) {
        char *comma = strchr(item, ',');
        if (comma != NULL)
            *comma = '\0';
        char *v = unquote(tp_strtrim(item));
        tp_defs_value_t val;
        const char *bad = NULL;
        if (*v == '\0' || !tp_defs_value_parse(p->type, v, &val, &bad)) {
            diag_add(f->diag, f->path, st->line, "@param %s: choice \"%s\" %s", p->name, v,
                     bad ? bad : "is empty");
            tp_buf_free(&why);
            return false;
        }
        const char *text = tp_defs_value_text(&val, v);
        for (size_t i = 0; i < p->n_choices; i++) {
            if (strcmp(p->choices[i], text) == 0) {
                diag_add(f->diag, f->path, st->line, "@param %s: choice \"%s\" is listed twice",
                         p->name, v);
                tp_buf_free(&why);
                return false;
            }
        }
        p->choices = tp_xrealloc(p->choices, (p->n_choices + 1) * sizeof *p->choices);
        p->choices[p->n_choices++] = tp_xstrdup(text);
        tp_buf_printf(&why, "%s %s", p->n_choices > 1 ? "," : "", text);
        item = comma ? comma + 1 : NULL;
    }
    p->choices_why = tp_buf_steal(&why);
    return true;
}

/* "name TYPE [IN (a, b)] [= default]" */
static bool parse_param(pfile_t *f, const setting_t *st, tp_defs_param_t *p)
{
    memset(p, 0, sizeof *p);
    p->line = st->line;
    char *copy = tp_xstrdup(st->value);
    char *name = copy, *type = copy, *rest;
    while (*type != '\0' && !isspace((unsigned char)*type) && *type != '=')
        type++;
    if (*type != '\0' && *type != '=')
        *type++ = '\0';
    type = tp_strtrim(type);
    for (rest = type; *rest != '\0' && !isspace((unsigned char)*rest) && *rest != '=';)
        rest++;
    char saved = *rest;
    *rest = '\0';
    bool ok = false;
    if (*name == '\0' || *type == '\0') {
        diag_add(f->diag, f->path, st->line,
                 "@param must be \"name TYPE [IN (a, b)] [= default]\", not \"%s\"", st->value);
    } else if (!valid_name(name)) {
        diag_add(f->diag, f->path, st->line, "@param name \"%s\" must match [a-z][a-z0-9_]*",
                 name);
    } else if (!type_from_name(type, &p->type)) {
        diag_add(f->diag, f->path, st->line,
                 "@param %s: unknown type \"%s\" (STRING INT BIGINT DOUBLE DECIMAL BOOLEAN DATE "
                 "TIMESTAMP)", name, type);
    } else {
        ok = true;
        p->name = tp_xstrdup(name);
        p->dflt.type = p->type;
    }
    *rest = saved;
    rest = tp_strtrim(rest);
    if (ok && strncasecmp(rest, "in", 2) == 0 && (rest[2] == '(' || isspace((unsigned char)rest[2]))) {
        rest += 2;
        ok = parse_choices(f, st, &rest, p);
        rest = tp_strtrim(rest);
    }
    if (ok && *rest != '\0' && *rest != '=') {
        diag_add(f->diag, f->path, st->line,
                 "@param %s: unexpected \"%s\" (expected IN (a, b) or = default)", name, rest);
        ok = false;
    }
    if (ok && *rest == '=') {
        char *v = unquote(tp_strtrim(rest + 1));
        p->has_default = true;
        const char *why = NULL;
        if (strcmp(v, "NULL") == 0) {
            p->dflt.is_null = true;
        } else if (*v == '\0' && p->type != TP_DEFS_STRING) {
            diag_add(f->diag, f->path, st->line, "@param %s: empty default", name);
            ok = false;
        } else if (!tp_defs_param_parse(p, v, &p->dflt, &why)) {
            diag_add(f->diag, f->path, st->line, "@param %s: default \"%s\" %s", name, v, why);
            ok = false;
        } else {
            p->default_text = tp_xstrdup(v);
        }
    }
    free(copy);
    if (!ok)
        param_free(p);
    return ok;
}

/* Same declaration: type, default, choices. */
static bool param_same(const tp_defs_param_t *a, const tp_defs_param_t *b)
{
    if (a->type != b->type || a->has_default != b->has_default ||
        a->dflt.is_null != b->dflt.is_null || a->n_choices != b->n_choices ||
        (a->default_text != NULL && strcmp(a->default_text, b->default_text) != 0))
        return false;
    for (size_t i = 0; i < a->n_choices; i++)
        if (strcmp(a->choices[i], b->choices[i]) != 0)
            return false;
    return true;
}

/* Parses every @param of f; reports duplicates. */
static void parse_params(pfile_t *f, tp_defs_param_t **out, size_t *n)
{
    for (size_t i = 0; i < f->n_set; i++) {
        const setting_t *st = &f->set[i];
        if (strcmp(st->key, "param") != 0)
            continue;
        tp_defs_param_t p;
        if (!parse_param(f, st, &p))
            continue;
        size_t k;
        for (k = 0; k < *n; k++)
            if (strcmp((*out)[k].name, p.name) == 0)
                break;
        if (k < *n) {
            diag_add(f->diag, f->path, st->line, "duplicate @param %s (first on line %d)", p.name,
                     (*out)[k].line);
            param_free(&p);
            continue;
        }
        *out = tp_xrealloc(*out, (*n + 1) * sizeof **out);
        (*out)[(*n)++] = p;
    }
}

int tp_defs_param_find(const tp_defs_dataset_t *ds, const char *name)
{
    for (size_t i = 0; i < ds->n_params; i++)
        if (strcmp(ds->params[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* "PARAM >= DURATION" */
static void parse_cover(pfile_t *f, const setting_t *st, tp_defs_dataset_t *d)
{
    char name[64], op[8], dur[32], extra[2];
    int n = sscanf(st->value, "%63[a-z0-9_] %7[<>=] %31s %1s", name, op, dur, extra);
    if (n != 3 || strcmp(op, ">=") != 0) {
        diag_add(f->diag, f->path, st->line,
                 "@covers must be \"PARAM >= DURATION\" (e.g. since >= 400d), not \"%s\"",
                 st->value);
        return;
    }
    int pi = tp_defs_param_find(d, name);
    tp_defs_cover_t c = {.line = st->line};
    if (pi < 0) {
        diag_add(f->diag, f->path, st->line, "@covers: %s is not a declared @param", name);
    } else if (d->params[pi].type != TP_DEFS_DATE && d->params[pi].type != TP_DEFS_TIMESTAMP) {
        diag_add(f->diag, f->path, st->line, "@covers: %s must be a DATE or TIMESTAMP @param",
                 name);
    } else if (!tp_parse_duration_ms(dur, &c.max_age_ms) || c.max_age_ms <= 0) {
        diag_add(f->diag, f->path, st->line,
                 "@covers: bad duration \"%s\" (a number with s, m, h or d)", dur);
    } else {
        c.param = (size_t)pi;
        d->covers = tp_xrealloc(d->covers, (d->n_covers + 1) * sizeof *d->covers);
        d->covers[d->n_covers++] = c;
    }
}

static bool valid_role(const char *s)
{
    if (!islower((unsigned char)*s))
        return false;
    for (s++; *s; s++)
        if (!islower((unsigned char)*s) && !isdigit((unsigned char)*s) && *s != '_' && *s != '-')
            return false;
    return true;
}

/* Settings of the file that holds them (the main file, or a lone warehouse file). */
static void dataset_settings(pfile_t *f, tp_defs_dataset_t *d, bool has_pg)
{
    const setting_t *k[DK_COUNT];
    check_keys(f, dataset_keys, DK_COUNT, k, "");
    parse_params(f, &d->params, &d->n_params);
    for (size_t i = 0; i < f->n_set; i++) {
        const setting_t *st = &f->set[i];
        if (strcmp(st->key, "requires") == 0) {
            size_t before = d->n_requires;
            if (split_list(f, st, valid_name, "sync job name", &d->requires, &d->n_requires)) {
                d->requires_line = tp_xrealloc(d->requires_line,
                                               d->n_requires * sizeof *d->requires_line);
                for (size_t r = before; r < d->n_requires; r++)
                    d->requires_line[r] = st->line;
            } else {
                for (size_t r = before; r < d->n_requires; r++)
                    free(d->requires[r]);
                d->n_requires = before;
            }
        } else if (strcmp(st->key, "roles") == 0) {
            (void)split_list(f, st, valid_role, "role name", &d->roles, &d->n_roles);
        } else if (strcmp(st->key, "covers") == 0) {
            parse_cover(f, st, d);
        }
    }
    const char *why_route = NULL;
    if (!has_pg)
        why_route = "a warehouse-only dataset always runs on the warehouse";
    else if (!d->has_wh)
        why_route = "it needs a warehouse twin";
    const char *twin_hint = has_pg ? " NAME.warehouse.sql to fall back to" : "";
    if (k[DK_MAX_STALENESS] != NULL) {
        if (parse_duration_key(f, k[DK_MAX_STALENESS], 1000, &d->max_staleness_ms)) {
            if (why_route != NULL)
                diag_add(f->diag, f->path, k[DK_MAX_STALENESS]->line, "@max_staleness: %s%s",
                         why_route, twin_hint);
            else if (d->n_requires == 0)
                diag_add(f->diag, f->path, k[DK_MAX_STALENESS]->line,
                         "@max_staleness needs @requires (the jobs whose age it measures)");
        }
    }
    if (k[DK_COVERS] != NULL && why_route != NULL)
        diag_add(f->diag, f->path, k[DK_COVERS]->line, "@covers: %s%s", why_route, twin_hint);
    if (k[DK_CACHE] != NULL)
        (void)parse_duration_key(f, k[DK_CACHE], 0, &d->cache_ms);
    if (k[DK_OBO] != NULL && no_value(f, k[DK_OBO])) {
        d->obo = true;
        if (!d->has_wh)
            diag_add(f->diag, f->path, k[DK_OBO]->line,
                     "@obo: it needs a warehouse twin NAME.warehouse.sql (it applies to "
                     "warehouse queries only)");
    }
    if (k[DK_DESCRIPTION] != NULL && need_value(f, k[DK_DESCRIPTION]))
        d->description = tp_xstrdup(k[DK_DESCRIPTION]->value);
}

/* The twin's @params must equal the main file's, in any order. */
static void twin_params(pfile_t *tw, const pfile_t *main, const tp_defs_dataset_t *d)
{
    const setting_t *k[1];
    check_keys(tw, twin_keys, 1, k, " (a twin may only repeat the @param lines; other settings "
                                    "belong in the main file)");
    tp_defs_param_t *tp = NULL;
    size_t tn = 0;
    parse_params(tw, &tp, &tn);
    if (!pfile_ok(tw))
        goto out;
    for (size_t i = 0; i < tn; i++) {
        int mi = tp_defs_param_find(d, tp[i].name);
        const tp_defs_param_t *m = mi >= 0 ? &d->params[mi] : NULL;
        if (m == NULL) {
            diag_add(tw->diag, tw->path, tp[i].line, "@param %s is not declared in %s",
                     tp[i].name, main->path);
        } else if (!param_same(m, &tp[i])) {
            diag_add(tw->diag, tw->path, tp[i].line,
                     "@param %s differs from %s:%d (the twin must declare the same parameters)",
                     tp[i].name, main->path, m->line);
        }
    }
    for (size_t i = 0; i < d->n_params; i++) {
        bool found = false;
        for (size_t t = 0; t < tn && !found; t++)
            found = strcmp(tp[t].name, d->params[i].name) == 0;
        if (!found)
            diag_add(tw->diag, tw->path, 1, "@param %s of %s:%d is missing here",
                     d->params[i].name, main->path, d->params[i].line);
    }
out:
    for (size_t i = 0; i < tn; i++)
        param_free(&tp[i]);
    free(tp);
}

/* Scans one body and maps its markers to params; unknown and unused ones are errors. */
static void dataset_body(pfile_t *f, tp_defs_dataset_t *d, bool pg, tp_defs_body_t *b,
                         const int *param_lines)
{
    int *lines = NULL;
    if (!pfile_scan(f, pg, pg, b, &lines))
        return;
    b->index = tp_xcalloc(b->n_names ? b->n_names : 1, sizeof *b->index);
    bool *used = tp_xcalloc(d->n_params ? d->n_params : 1, sizeof *used);
    for (size_t i = 0; i < b->n_names; i++) {
        int pi = tp_defs_param_find(d, b->names[i]);
        if (pi < 0) {
            diag_add(f->diag, f->path, lines[i], ":%s is not a declared @param", b->names[i]);
            continue;
        }
        b->index[i] = (size_t)pi;
        used[pi] = true;
    }
    for (size_t i = 0; i < d->n_params; i++)
        if (!used[i])
            diag_add(f->diag, f->path, param_lines ? param_lines[i] : d->params[i].line,
                     "@param %s is never used in the %s body", d->params[i].name,
                     pg ? "Postgres" : "warehouse");
    free(used);
    free(lines);
}

/* Twin @param line per main param, for "never used" messages in the twin. */
static int *twin_param_lines(const pfile_t *tw, const tp_defs_dataset_t *d)
{
    int *lines = tp_xcalloc(d->n_params ? d->n_params : 1, sizeof *lines);
    for (size_t i = 0; i < d->n_params; i++) {
        lines[i] = 1;
        for (size_t s = 0; s < tw->n_set; s++) {
            const char *v = tw->set[s].value;
            size_t n = strlen(d->params[i].name);
            if (strcmp(tw->set[s].key, "param") == 0 && strncmp(v, d->params[i].name, n) == 0 &&
                isspace((unsigned char)v[n]))
                lines[i] = tw->set[s].line;
        }
    }
    return lines;
}

/* Builds a dataset from its main file and/or warehouse file (either may be NULL). */
static bool dataset_build(const char *name, const char *pg_path, const char *wh_path,
                          tp_defs_diag_t *diag, tp_defs_dataset_t *d)
{
    memset(d, 0, sizeof *d);
    d->name = tp_xstrdup(name);
    d->has_pg = pg_path != NULL;
    d->has_wh = wh_path != NULL;
    size_t start = diag->n;
    pfile_t main = {0}, tw = {0};
    bool main_ok = pfile_read(&main, pg_path ? pg_path : wh_path, diag);
    bool tw_ok = pg_path && wh_path ? pfile_read(&tw, wh_path, diag) : true;
    if (main.text != NULL)
        dataset_settings(&main, d, d->has_pg);
    main_ok = main_ok && pfile_ok(&main);
    if (main_ok && pg_path && wh_path && tw_ok)
        twin_params(&tw, &main, d);
    tw_ok = tw_ok && (tw.path == NULL || pfile_ok(&tw));
    if (main_ok)
        dataset_body(&main, d, d->has_pg, d->has_pg ? &d->pg : &d->wh, NULL);
    if (main_ok && tw_ok && pg_path && wh_path) {
        int *lines = twin_param_lines(&tw, d);
        dataset_body(&tw, d, false, &d->wh, lines);
        free(lines);
    }
    pfile_free(&main);
    pfile_free(&tw);
    return diag->n == start;
}

/* ---------------------------------------------------------- directories */

tp_defs_set_t *tp_defs_set_new(void)
{
    return tp_xcalloc(1, sizeof(tp_defs_set_t));
}

void tp_defs_set_free(tp_defs_set_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->n_jobs; i++)
        job_free(&s->jobs[i]);
    free(s->jobs);
    for (size_t i = 0; i < s->n_datasets; i++)
        dataset_free(&s->datasets[i]);
    free(s->datasets);
    free(s);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Lists the .sql file names of dir, sorted; NULL (and a diag) if dir is unreadable. */
static char **list_sql(const char *dir, size_t *n, tp_defs_diag_t *diag)
{
    DIR *dh = opendir(dir);
    if (dh == NULL) {
        diag_add(diag, dir, 0, "cannot open definitions directory: %s", strerror(errno));
        return NULL;
    }
    char **v = NULL;
    *n = 0;
    struct dirent *e;
    while ((e = readdir(dh)) != NULL) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len < 5 || strcmp(e->d_name + len - 4, ".sql") != 0)
            continue;
        char *path = tp_xasprintf("%s/%s", dir, e->d_name);
        struct stat st;
        bool skip = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
        free(path);
        if (skip)
            continue;
        v = tp_xrealloc(v, (*n + 1) * sizeof *v);
        v[(*n)++] = tp_xstrdup(e->d_name);
    }
    closedir(dh);
    if (*n > 0)
        qsort(v, *n, sizeof *v, cmp_str);
    return v ? v : tp_xcalloc(1, sizeof *v);
}

/* Strips ".sql" (and ".warehouse" when wh is given) from file; checks the name. */
static char *file_base(const char *dir, const char *file, bool allow_wh, bool *wh,
                       tp_defs_diag_t *diag)
{
    size_t len = strlen(file) - 4;
    *wh = allow_wh && len > 10 && strncmp(file + len - 10, ".warehouse", 10) == 0;
    char *base = tp_xstrndup(file, *wh ? len - 10 : len);
    if (!valid_name(base)) {
        char *path = tp_xasprintf("%s/%s", dir, file);
        diag_add(diag, path, 1, "definition name \"%s\" must match [a-z][a-z0-9_]*%s", base,
                 allow_wh ? " (files are NAME.sql or NAME.warehouse.sql)" : " (files are NAME.sql)");
        free(path);
        free(base);
        return NULL;
    }
    return base;
}

static int cmp_job(const void *a, const void *b)
{
    return strcmp(((const tp_defs_job_t *)a)->name, ((const tp_defs_job_t *)b)->name);
}

static int cmp_dataset(const void *a, const void *b)
{
    return strcmp(((const tp_defs_dataset_t *)a)->name, ((const tp_defs_dataset_t *)b)->name);
}

const tp_defs_job_t *tp_defs_job_find(const tp_defs_set_t *s, const char *name)
{
    tp_defs_job_t key = {.name = (char *)name};
    return s->n_jobs ? bsearch(&key, s->jobs, s->n_jobs, sizeof key, cmp_job) : NULL;
}

const tp_defs_dataset_t *tp_defs_dataset_find(const tp_defs_set_t *s, const char *name)
{
    tp_defs_dataset_t key = {.name = (char *)name};
    return s->n_datasets ? bsearch(&key, s->datasets, s->n_datasets, sizeof key, cmp_dataset)
                         : NULL;
}

bool tp_defs_load_jobs(tp_defs_set_t *s, const char *dir, tp_defs_diag_t *diag)
{
    size_t start = diag->n, n = 0;
    char **files = list_sql(dir, &n, diag);
    if (files == NULL)
        return false;
    for (size_t i = 0; i < n; i++) {
        bool wh;
        char *base = file_base(dir, files[i], false, &wh, diag);
        if (base == NULL)
            continue;
        char *path = tp_xasprintf("%s/%s", dir, files[i]);
        tp_defs_job_t j;
        pfile_t f;
        bool ok = pfile_read(&f, path, diag);
        if (f.text != NULL && (ok || f.n_set > 0))
            ok = job_build(&f, base, &j) && ok;
        else
            memset(&j, 0, sizeof j);
        const tp_defs_job_t *dup = ok ? tp_defs_job_find(s, base) : NULL;
        if (dup != NULL) {
            diag_add(diag, path, 1, "sync job %s is already defined in %s", base, dup->path);
            ok = false;
        }
        for (size_t k = 0; ok && k < s->n_jobs; k++) {
            if (strcmp(s->jobs[k].target, j.target) == 0) {
                diag_add(diag, path, j.target_line,
                         "@target %s is already the target of job %s (%s)", j.target,
                         s->jobs[k].name, s->jobs[k].path);
                ok = false;
            }
        }
        if (ok) {
            s->jobs = tp_xrealloc(s->jobs, (s->n_jobs + 1) * sizeof *s->jobs);
            s->jobs[s->n_jobs++] = j;
            /* keep sorted so that find works for the duplicate check above */
            qsort(s->jobs, s->n_jobs, sizeof *s->jobs, cmp_job);
        } else {
            job_free(&j);
        }
        pfile_free(&f);
        free(path);
        free(base);
    }
    diag_sort(diag, start);
    strv_free(files, n);
    return diag->n == start;
}

bool tp_defs_load_datasets(tp_defs_set_t *s, const char *dir, tp_defs_diag_t *diag)
{
    size_t start = diag->n, n = 0;
    char **files = list_sql(dir, &n, diag);
    if (files == NULL)
        return false;
    /* Pair NAME.sql with NAME.warehouse.sql: files are sorted, but "a.sql" and
     * "a.warehouse.sql" need not be adjacent ("a_b.sql" sorts between), so look up. */
    char **bases = tp_xcalloc(n ? n : 1, sizeof *bases);
    bool *is_wh = tp_xcalloc(n ? n : 1, sizeof *is_wh);
    for (size_t i = 0; i < n; i++)
        bases[i] = file_base(dir, files[i], true, &is_wh[i], diag);
    for (size_t i = 0; i < n; i++) {
        if (bases[i] == NULL)
            continue;
        size_t twin = n;
        for (size_t k = 0; k < n; k++)
            if (k != i && bases[k] != NULL && is_wh[k] != is_wh[i] &&
                strcmp(bases[k], bases[i]) == 0)
                twin = k;
        if (is_wh[i] && twin < n)
            continue; /* handled with its main file */
        char *pg_path = is_wh[i] ? NULL : tp_xasprintf("%s/%s", dir, files[i]);
        char *wh_path = is_wh[i] ? tp_xasprintf("%s/%s", dir, files[i])
                        : twin < n ? tp_xasprintf("%s/%s", dir, files[twin])
                                   : NULL;
        tp_defs_dataset_t d;
        bool ok = dataset_build(bases[i], pg_path, wh_path, diag, &d);
        const tp_defs_dataset_t *dup = ok ? tp_defs_dataset_find(s, bases[i]) : NULL;
        if (dup != NULL) {
            const char *here = pg_path ? pg_path : wh_path;
            diag_add(diag, here, 1, "dataset %s is already defined in %s", bases[i],
                     dup->has_pg ? dup->pg.path : dup->wh.path);
            ok = false;
        }
        if (ok) {
            s->datasets = tp_xrealloc(s->datasets, (s->n_datasets + 1) * sizeof *s->datasets);
            s->datasets[s->n_datasets++] = d;
            qsort(s->datasets, s->n_datasets, sizeof *s->datasets, cmp_dataset);
        } else {
            dataset_free(&d);
        }
        free(pg_path);
        free(wh_path);
    }
    diag_sort(diag, start);
    strv_free(bases, n);
    free(is_wh);
    strv_free(files, n);
    return diag->n == start;
}

bool tp_defs_check_requires(const tp_defs_set_t *datasets, const tp_defs_set_t *jobs,
                            tp_defs_diag_t *diag)
{
    size_t start = diag->n;
    for (size_t i = 0; i < datasets->n_datasets; i++) {
        const tp_defs_dataset_t *d = &datasets->datasets[i];
        const char *path = d->has_pg ? d->pg.path : d->wh.path;
        for (size_t r = 0; r < d->n_requires; r++)
            if (tp_defs_job_find(jobs, d->requires[r]) == NULL)
                diag_add(diag, path, d->requires_line[r], "@requires unknown sync job %s",
                         d->requires[r]);
    }
    return diag->n == start;
}

int tp_defs_covers_exceeded(const tp_defs_dataset_t *ds, const tp_defs_value_t *values,
                            int64_t now_ms)
{
    for (size_t i = 0; i < ds->n_covers; i++) {
        const tp_defs_cover_t *c = &ds->covers[i];
        const tp_defs_value_t *v = &values[c->param];
        if (v->is_null)
            continue;
        int64_t limit_us = (now_ms - c->max_age_ms) * 1000;
        if (ds->params[c->param].type == TP_DEFS_DATE) {
            /* a date is covered when it is on or after the day the limit falls on */
            int64_t day_us = INT64_C(86400000000);
            limit_us = (limit_us >= 0 ? limit_us / day_us : (limit_us - day_us + 1) / day_us) *
                       day_us;
        }
        if (v->epoch_us < limit_us)
            return (int)i;
    }
    return -1;
}
