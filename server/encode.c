/* Result encoding: a PGresult (text format) into JSON rows ([{...}]), JSON
 * columns ({"col":[...]}, ready for Plotly traces) or CSV (RFC 4180, header
 * line). JSON values are typed from the result's column types: integers and
 * floats as numbers (NaN/Infinity as strings, JSON has no such numbers),
 * numeric as its exact text without quotes, boolean as true/false, json/jsonb
 * verbatim, timestamp/timestamptz in the canonical ISO 8601 form of
 * tidepool/isots.h (also in CSV), SQL NULL as null, everything else as a
 * string. Does not allocate beyond the output buffer. */
#include "server.h"

#include <string.h>

#include "tidepool/isots.h"

enum { K_STR, K_NUM, K_BOOL, K_JSON, K_TS, K_TSTZ };

static int kind_of(Oid t)
{
    switch (t) {
    case 20: case 21: case 23: case 26: case 700: case 701: case 1700:
        return K_NUM; /* int8 int2 int4 oid float4 float8 numeric */
    case 16: return K_BOOL;
    case 114: case 3802: return K_JSON;
    case 1114: return K_TS;
    case 1184: return K_TSTZ;
    default: return K_STR;
    }
}

/* One cell, read from the PGresult once: libpq's accessors check their
 * arguments on every call, and a 90-row read has hundreds of cells. A NULL
 * has length 0, so PQgetisnull is asked only then. */
typedef struct cell {
    const char *v;
    size_t n;
    bool null;
} cell_t;

static cell_t cell_at(const PGresult *res, int row, int col)
{
    cell_t c = {PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col), false};
    c.null = c.n == 0 && PQgetisnull(res, row, col);
    return c;
}

/* The canonical ISO 8601 form of a timestamp cell in out and its length;
 * 0 when the text is not in the ISO DateStyle (sent as Postgres wrote it). */
static size_t canon_ts(const cell_t *c, int kind, char out[TP_ISOTS_MAX])
{
    return tp_isots_canon(c->v, c->n, kind == K_TSTZ, out);
}

/* Room put_value may need for a cell: every byte escaped as \u00XX, quotes,
 * or a canonical timestamp. */
static size_t value_room(const cell_t *c)
{
    return 6 * c->n + TP_ISOTS_MAX + 8;
}

/* v (n bytes) as a JSON string at p; returns the end. */
static char *put_json_str(char *p, const char *v, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    *p++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)v[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *p++ = (char)ch;
            continue;
        }
        *p++ = '\\';
        switch (ch) {
        case '"': *p++ = '"'; break;
        case '\\': *p++ = '\\'; break;
        case '\n': *p++ = 'n'; break;
        case '\r': *p++ = 'r'; break;
        case '\t': *p++ = 't'; break;
        default:
            memcpy(p, "u00", 3);
            p[3] = hex[ch >> 4];
            p[4] = hex[ch & 15];
            p += 5;
        }
    }
    *p++ = '"';
    return p;
}

/* One cell as a JSON value at p (value_room() reserved); returns the end.
 * Writes straight into the reserved buffer: this runs for every cell of
 * every read, and per-byte buffer calls were a tenth of the server's time. */
static char *put_value(char *p, const cell_t *c, int kind)
{
    if (c->null) {
        memcpy(p, "null", 4);
        return p + 4;
    }
    const char *v = c->v;
    size_t n = c->n;
    switch (kind) {
    case K_NUM: /* NaN, Infinity, -Infinity: strings, JSON has no such numbers */
        if (v[0] == 'N' || v[0] == 'I' || (v[0] == '-' && v[1] == 'I'))
            return put_json_str(p, v, n);
        memcpy(p, v, n);
        return p + n;
    case K_BOOL:
        if (v[0] == 't') {
            memcpy(p, "true", 4);
            return p + 4;
        }
        memcpy(p, "false", 5);
        return p + 5;
    case K_JSON: memcpy(p, v, n); return p + n;
    case K_TS:
    case K_TSTZ: {
        char ts[TP_ISOTS_MAX];
        size_t tn = canon_ts(c, kind, ts);
        if (tn == 0)
            return put_json_str(p, v, n); /* not the ISO DateStyle: as Postgres wrote it */
        *p++ = '"';
        memcpy(p, ts, tn);
        p += tn;
        *p++ = '"';
        return p;
    }
    default: return put_json_str(p, v, n);
    }
}

static void json_value(tp_buf_t *b, const PGresult *res, int row, int col, int kind)
{
    cell_t c = cell_at(res, row, col);
    tp_buf_reserve(b, value_room(&c));
    char *end = put_value(b->data + b->len, &c, kind);
    b->len = (size_t)(end - b->data);
    b->data[b->len] = '\0';
}

static void csv_field(tp_buf_t *b, const char *v)
{
    if (!strpbrk(v, ",\"\r\n")) {
        tp_buf_puts(b, v);
        return;
    }
    tp_buf_putc(b, '"');
    for (; *v; v++) {
        if (*v == '"')
            tp_buf_putc(b, '"');
        tp_buf_putc(b, *v);
    }
    tp_buf_putc(b, '"');
}

static void csv_value(tp_buf_t *b, const PGresult *res, int row, int col, int kind)
{
    cell_t c = cell_at(res, row, col);
    const char *v = c.v;
    if (kind == K_TS || kind == K_TSTZ) {
        char ts[TP_ISOTS_MAX];
        size_t n = canon_ts(&c, kind, ts);
        if (n > 0) {
            tp_buf_append(b, ts, n); /* never needs quoting */
            return;
        }
    }
    csv_field(b, v);
}

void encode_result(const PGresult *res, fmt_t fmt, tp_buf_t *out)
{
    int nr = PQntuples(res), nf = PQnfields(res);
    int kinds[nf > 0 ? nf : 1];
    for (int c = 0; c < nf; c++)
        kinds[c] = kind_of(PQftype(res, c));
    tp_buf_reserve(out, (size_t)nr * (size_t)nf * 16 + 64);
    if (fmt == FMT_CSV) {
        for (int c = 0; c < nf; c++) {
            if (c)
                tp_buf_putc(out, ',');
            csv_field(out, PQfname(res, c));
        }
        tp_buf_puts(out, "\r\n");
        for (int r = 0; r < nr; r++) {
            for (int c = 0; c < nf; c++) {
                if (c)
                    tp_buf_putc(out, ',');
                if (!PQgetisnull(res, r, c))
                    csv_value(out, res, r, c, kinds[c]);
            }
            tp_buf_puts(out, "\r\n");
        }
        return;
    }
    if (fmt == FMT_COLUMNS) {
        tp_buf_putc(out, '{');
        for (int c = 0; c < nf; c++) {
            if (c)
                tp_buf_putc(out, ',');
            tp_buf_json_str(out, PQfname(res, c));
            tp_buf_puts(out, ":[");
            for (int r = 0; r < nr; r++) {
                if (r)
                    tp_buf_putc(out, ',');
                json_value(out, res, r, c, kinds[c]);
            }
            tp_buf_putc(out, ']');
        }
        tp_buf_putc(out, '}');
        return;
    }
    /* Column names are escaped once, then reused for every row. */
    tp_buf_t names[nf > 0 ? nf : 1];
    for (int c = 0; c < nf; c++) {
        tp_buf_init(&names[c]);
        tp_buf_json_str(&names[c], PQfname(res, c));
        tp_buf_putc(&names[c], ':');
    }
    size_t names_len = 0;
    for (int c = 0; c < nf; c++)
        names_len += names[c].len + 1;
    cell_t cells[nf > 0 ? nf : 1];
    tp_buf_putc(out, '[');
    for (int r = 0; r < nr; r++) {
        size_t room = names_len + 3;
        for (int c = 0; c < nf; c++) {
            cells[c] = cell_at(res, r, c);
            room += value_room(&cells[c]);
        }
        tp_buf_reserve(out, room); /* one check a row, then straight writes */
        char *p = out->data + out->len;
        if (r)
            *p++ = ',';
        *p++ = '{';
        for (int c = 0; c < nf; c++) {
            if (c)
                *p++ = ',';
            memcpy(p, names[c].data, names[c].len);
            p += names[c].len;
            p = put_value(p, &cells[c], kinds[c]);
        }
        *p++ = '}';
        out->len = (size_t)(p - out->data);
        out->data[out->len] = '\0';
    }
    tp_buf_putc(out, ']');
    for (int c = 0; c < nf; c++)
        tp_buf_free(&names[c]);
}

const char *fmt_ctype(fmt_t fmt)
{
    return fmt == FMT_CSV ? "text/csv; charset=utf-8" : "application/json";
}
