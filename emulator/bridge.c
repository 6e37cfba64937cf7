/* The dialect bridge: rewrites Databricks SQL text into Postgres SQL so the
 * emulator can run it on the "lakehouse" database. It owns exactly three
 * rewrites, done by one scanner that knows string literals ('…', E'…',
 * $tag$…$tag$), quoted identifiers and comments (-- and nested block comments)
 * and leaves their contents alone:
 *   - dotted names of three or more parts lose their first part (the catalog):
 *     main.iot.users -> iot.users;
 *   - `backticked` identifiers become "double quoted" ones;
 *   - named parameter markers :name become ($n::pgtype), where pgtype comes from
 *     the parameter's Databricks type (emu_param_pgtype). `::` casts are kept.
 * It does not translate functions or other syntax; "double quotes" stay
 * identifiers, as in Postgres. Literals holding backslashes get an E prefix so
 * Databricks' backslash escapes keep their meaning. */
#include "emu.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const struct {
    const char *dbx;
    const char *pg;
} simple_types[] = {
    {"STRING", "text"},       {"VARCHAR", "text"},     {"CHAR", "text"},
    {"INT", "int4"},          {"INTEGER", "int4"},     {"BIGINT", "int8"},
    {"LONG", "int8"},         {"SMALLINT", "int2"},    {"SHORT", "int2"},
    {"TINYINT", "int2"},      {"BYTE", "int2"},        {"DOUBLE", "float8"},
    {"FLOAT", "float4"},      {"REAL", "float4"},      {"BOOLEAN", "boolean"},
    {"DATE", "date"},         {"TIMESTAMP", "timestamptz"}, {"TIMESTAMP_LTZ", "timestamptz"},
    {"TIMESTAMP_NTZ", "timestamp"}, {"BINARY", "bytea"},
};

bool emu_param_pgtype(const char *type, char *out, size_t outlen)
{
    if (type == NULL) {
        snprintf(out, outlen, "text");
        return true;
    }
    char t[64];
    size_t n = 0;
    for (const char *p = type; *p && n + 1 < sizeof t; p++)
        if (!isspace((unsigned char)*p))
            t[n++] = (char)toupper((unsigned char)*p);
    t[n] = '\0';
    if (n == 0 || strlen(type) > 60)
        return false;
    for (size_t i = 0; i < TP_ARRAY_LEN(simple_types); i++) {
        if (strcmp(t, simple_types[i].dbx) == 0) {
            snprintf(out, outlen, "%s", simple_types[i].pg);
            return true;
        }
    }
    const char *rest = NULL;
    if (strncmp(t, "DECIMAL", 7) == 0)
        rest = t + 7;
    else if (strncmp(t, "NUMERIC", 7) == 0)
        rest = t + 7;
    else if (strncmp(t, "DEC", 3) == 0)
        rest = t + 3;
    if (rest == NULL)
        return false;
    if (*rest == '\0') { /* Databricks' DECIMAL defaults to DECIMAL(10,0) */
        snprintf(out, outlen, "numeric(10,0)");
        return true;
    }
    int p = 0, s = 0, used = 0;
    if (sscanf(rest, "(%d,%d)%n", &p, &s, &used) == 2 && rest[used] == '\0') {
        /* two numbers */
    } else if (sscanf(rest, "(%d)%n", &p, &used) == 1 && rest[used] == '\0') {
        s = 0;
    } else {
        return false;
    }
    if (p < 1 || p > 38 || s < 0 || s > p)
        return false;
    snprintf(out, outlen, "numeric(%d,%d)", p, s);
    return true;
}

static bool ident_start(char c)
{
    return isalpha((unsigned char)c) || c == '_' || (unsigned char)c >= 0x80;
}

static bool ident_char(char c)
{
    return isalnum((unsigned char)c) || c == '_' || c == '$' || (unsigned char)c >= 0x80;
}

/* Length of the quoted token starting at s[0] (a quote char q), with doubled
 * quotes as escapes and, when bs, backslash escapes too. Unterminated: to the end. */
static size_t quoted_len(const char *s, char q, bool bs, bool *has_bs)
{
    size_t i = 1;
    while (s[i]) {
        if (bs && s[i] == '\\' && s[i + 1]) {
            if (has_bs)
                *has_bs = true;
            i += 2;
            continue;
        }
        if (s[i] == q) {
            if (s[i + 1] == q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i++;
    }
    return i;
}

/* Emits one name part (bare, "quoted" or `backticked`) and returns its length. */
static size_t name_part(const char *s, tp_buf_t *out, bool emit)
{
    if (*s == '"') {
        size_t n = quoted_len(s, '"', false, NULL);
        if (emit)
            tp_buf_append(out, s, n);
        return n;
    }
    if (*s == '`') {
        size_t n = quoted_len(s, '`', false, NULL);
        if (emit) {
            tp_buf_putc(out, '"');
            for (size_t i = 1; i < n; i++) {
                if (s[i] == '`') {
                    if (i + 1 < n && s[i + 1] == '`') {
                        tp_buf_putc(out, '`');
                        i++;
                        continue;
                    }
                    break;
                }
                if (s[i] == '"')
                    tp_buf_putc(out, '"');
                tp_buf_putc(out, s[i]);
            }
            tp_buf_putc(out, '"');
        }
        return n;
    }
    size_t n = 0;
    while (ident_char(s[n]))
        n++;
    if (emit)
        tp_buf_append(out, s, n);
    return n;
}

static bool part_start(char c)
{
    return ident_start(c) || c == '"' || c == '`';
}

/* A dotted chain a.b.c...: emits it, dropping the first part when there are 3+. */
static size_t name_chain(const char *s, tp_buf_t *out)
{
    size_t starts[16];
    size_t ends[16];
    int nparts = 0;
    size_t i = 0;
    for (;;) {
        size_t n = name_part(s + i, NULL, false);
        if (nparts < 16) {
            starts[nparts] = i;
            ends[nparts] = i + n;
        }
        nparts++;
        i += n;
        if (s[i] == '.' && part_start(s[i + 1]))
            i++;
        else
            break;
    }
    int first = (nparts >= 3 && nparts <= 16) ? 1 : 0;
    if (nparts > 16) { /* absurd; copy verbatim but still convert backticks */
        first = 0;
    }
    int last = nparts > 16 ? 16 : nparts;
    for (int k = first; k < last; k++) {
        if (k > first)
            tp_buf_putc(out, '.');
        name_part(s + starts[k], out, true);
    }
    if (nparts > 16)
        tp_buf_append(out, s + ends[15], i - ends[15]);
    return i;
}

char *emu_bridge_sql(const char *sql, const emu_param_t *params, int nparams, int *order,
                     int *norder, char **unbound)
{
    tp_buf_t out;
    tp_buf_init(&out);
    *norder = 0;
    *unbound = NULL;
    size_t i = 0;
    while (sql[i]) {
        char c = sql[i];
        char prev = out.len ? out.data[out.len - 1] : ' ';
        if (c == '\'') {
            bool bs = false;
            size_t n = quoted_len(sql + i, '\'', true, &bs);
            bool already_e = out.len > 0 && (out.data[out.len - 1] == 'E' ||
                                             out.data[out.len - 1] == 'e');
            if (bs && !already_e)
                tp_buf_putc(&out, 'E');
            tp_buf_append(&out, sql + i, n);
            i += n;
        } else if (c == '-' && sql[i + 1] == '-') {
            size_t n = 2;
            while (sql[i + n] && sql[i + n] != '\n')
                n++;
            tp_buf_append(&out, sql + i, n);
            i += n;
        } else if (c == '/' && sql[i + 1] == '*') {
            size_t n = 2;
            int depth = 1;
            while (sql[i + n] && depth > 0) {
                if (sql[i + n] == '/' && sql[i + n + 1] == '*') {
                    depth++;
                    n += 2;
                } else if (sql[i + n] == '*' && sql[i + n + 1] == '/') {
                    depth--;
                    n += 2;
                } else {
                    n++;
                }
            }
            tp_buf_append(&out, sql + i, n);
            i += n;
        } else if (c == '$' && (ident_start(sql[i + 1]) || sql[i + 1] == '$')) {
            /* dollar quoting $tag$ ... $tag$ */
            size_t t = 1;
            while (ident_char(sql[i + t]) && sql[i + t] != '$')
                t++;
            if (sql[i + t] == '$') {
                size_t taglen = t + 1;
                const char *end = NULL;
                for (const char *p = sql + i + taglen; (p = strchr(p, '$')) != NULL; p++) {
                    if (strncmp(p, sql + i, taglen) == 0) {
                        end = p;
                        break;
                    }
                }
                size_t n = end ? (size_t)(end - (sql + i)) + taglen : strlen(sql + i);
                tp_buf_append(&out, sql + i, n);
                i += n;
            } else {
                tp_buf_append(&out, sql + i, t);
                i += t;
            }
        } else if (c == ':' && sql[i + 1] == ':') {
            tp_buf_append(&out, "::", 2);
            i += 2;
        } else if (c == ':' && ident_start(sql[i + 1]) && prev != ':') {
            size_t n = 1;
            while (ident_char(sql[i + n]) && sql[i + n] != '$')
                n++;
            char *name = tp_xstrndup(sql + i + 1, n - 1);
            int found = -1;
            for (int k = 0; k < nparams; k++) {
                if (strcmp(params[k].name, name) == 0) {
                    found = k;
                    break;
                }
            }
            if (found < 0) {
                if (*unbound == NULL)
                    *unbound = tp_xstrdup(name);
                tp_buf_append(&out, sql + i, n);
            } else {
                int slot = -1;
                for (int k = 0; k < *norder; k++)
                    if (order[k] == found)
                        slot = k;
                if (slot < 0) {
                    slot = (*norder)++;
                    order[slot] = found;
                }
                char pgtype[64];
                if (!emu_param_pgtype(params[found].type, pgtype, sizeof pgtype))
                    snprintf(pgtype, sizeof pgtype, "text"); /* validated earlier */
                tp_buf_printf(&out, "($%d::%s)", slot + 1, pgtype);
            }
            free(name);
            i += n;
        } else if (isdigit((unsigned char)c) && !ident_char(prev)) {
            size_t n = 0;
            while (isalnum((unsigned char)sql[i + n]) || sql[i + n] == '.' || sql[i + n] == '_')
                n++;
            tp_buf_append(&out, sql + i, n);
            i += n;
        } else if (part_start(c) && prev != '.') {
            i += name_chain(sql + i, &out);
        } else {
            tp_buf_putc(&out, c);
            i++;
        }
    }
    return tp_buf_steal(&out);
}
