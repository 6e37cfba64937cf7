/* Warehouse-to-Postgres column typing and COPY text encoding (DESIGN §7).
 * Owns the mapping table from warehouse type_name (an open set, with
 * type_text as fallback) to Postgres types spelled the way format_type()
 * prints them, so drift checks can compare strings with the catalog. Also
 * quoting of identifiers and literals for generated SQL, and the COPY text
 * escaping of JSON_ARRAY cells. Knows nothing about connections. */
#include "synctypes.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct {
    const char *wh;
    const char *pg;
} type_map_t;

static const type_map_t type_map[] = {
    {"STRING", "text"},
    {"CHAR", "text"},
    {"VARCHAR", "text"},
    {"BYTE", "smallint"},
    {"TINYINT", "smallint"},
    {"SHORT", "smallint"},
    {"SMALLINT", "smallint"},
    {"INT", "integer"},
    {"INTEGER", "integer"},
    {"LONG", "bigint"},
    {"BIGINT", "bigint"},
    {"FLOAT", "real"},
    {"REAL", "real"},
    {"DOUBLE", "double precision"},
    {"BOOLEAN", "boolean"},
    {"DATE", "date"},
    {"TIMESTAMP", "timestamp with time zone"},
    {"TIMESTAMP_LTZ", "timestamp with time zone"},
    {"TIMESTAMP_NTZ", "timestamp without time zone"},
    {"INTERVAL", "interval"},
    {"BINARY", "bytea"},
    {"ARRAY", "jsonb"},
    {"MAP", "jsonb"},
    {"STRUCT", "jsonb"},
    {"VARIANT", "jsonb"},
    {"NULL", "text"},
    {"VOID", "text"},
};

/* Leading word of a type text ("DECIMAL(10,2)" -> "DECIMAL", "ARRAY<INT>" -> "ARRAY"). */
static void head_word(const char *s, char *out, size_t outlen)
{
    size_t n = 0;
    while (*s == ' ')
        s++;
    while (s[n] && (isalnum((unsigned char)s[n]) || s[n] == '_') && n + 1 < outlen) {
        out[n] = (char)toupper((unsigned char)s[n]);
        n++;
    }
    out[n] = '\0';
}

static char *map_decimal(const char *type_text, int precision, int scale)
{
    if (precision <= 0 && type_text) {
        const char *p = strchr(type_text, '(');
        int pr = 0, sc = 0;
        if (p && sscanf(p, "(%d , %d)", &pr, &sc) == 2) {
            precision = pr;
            scale = sc;
        } else if (p && sscanf(p, "(%d)", &pr) == 1) {
            precision = pr;
            scale = 0;
        }
    }
    if (precision <= 0) {
        /* Databricks' bare DECIMAL is DECIMAL(10,0). */
        precision = 10;
        scale = 0;
    }
    if (scale < 0)
        scale = 0;
    if (precision > 1000 || scale > precision)
        return NULL;
    return tp_xasprintf("numeric(%d,%d)", precision, scale);
}

char *tp_synctypes_map(const char *type_name, const char *type_text, int precision, int scale)
{
    char word[40];
    head_word(type_name && *type_name ? type_name : (type_text ? type_text : ""), word, sizeof(word));
    if (strcmp(word, "DECIMAL") == 0 || strcmp(word, "DEC") == 0 || strcmp(word, "NUMERIC") == 0)
        return map_decimal(type_text, precision, scale);
    for (size_t i = 0; i < TP_ARRAY_LEN(type_map); i++)
        if (strcmp(word, type_map[i].wh) == 0)
            return tp_xstrdup(type_map[i].pg);
    /* type_name unknown: the text may still name a known type. */
    if (type_text && *type_text && type_name && *type_name) {
        char w2[40];
        head_word(type_text, w2, sizeof(w2));
        if (strcmp(w2, word) != 0)
            return tp_synctypes_map(NULL, type_text, precision, scale);
    }
    return NULL;
}

void tp_synctypes_ident(tp_buf_t *b, const char *ident)
{
    tp_buf_putc(b, '"');
    for (const char *p = ident; *p; p++) {
        if (*p == '"')
            tp_buf_putc(b, '"');
        tp_buf_putc(b, *p);
    }
    tp_buf_putc(b, '"');
}

void tp_synctypes_qname(tp_buf_t *b, const char *schema, const char *table)
{
    tp_synctypes_ident(b, schema);
    tp_buf_putc(b, '.');
    tp_synctypes_ident(b, table);
}

void tp_synctypes_literal(tp_buf_t *b, const char *s)
{
    if (strchr(s, '\\'))
        tp_buf_putc(b, 'E');
    tp_buf_putc(b, '\'');
    for (const char *p = s; *p; p++) {
        if (*p == '\'' || *p == '\\')
            tp_buf_putc(b, *p);
        tp_buf_putc(b, *p);
    }
    tp_buf_putc(b, '\'');
}

void tp_synctypes_copy_cell(tp_buf_t *b, const char *s, size_t len, bool binary)
{
    if (s == NULL) {
        tp_buf_append(b, "\\N", 2);
        return;
    }
    tp_buf_reserve(b, len + 8);
    if (binary) {
        tp_buf_append(b, "\\\\x", 3);
        tp_buf_append(b, s, len);
        return;
    }
    const char *run = s;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        const char *esc = NULL;
        switch (c) {
        case '\\': esc = "\\\\"; break;
        case '\t': esc = "\\t"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        default: continue;
        }
        tp_buf_append(b, run, (size_t)(s + i - run));
        tp_buf_append(b, esc, 2);
        run = s + i + 1;
    }
    tp_buf_append(b, run, (size_t)(s + len - run));
}

void tp_synccols_free(tp_synccol_t *cols, size_t n)
{
    if (cols == NULL)
        return;
    for (size_t i = 0; i < n; i++) {
        free(cols[i].name);
        free(cols[i].type_text);
        free(cols[i].pg_type);
    }
    free(cols);
}
