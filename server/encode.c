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

/* The canonical ISO 8601 form of a timestamp cell in out and its length;
 * 0 when the text is not in the ISO DateStyle (sent as Postgres wrote it). */
static size_t canon_ts(const PGresult *res, int row, int col, int kind, char out[TP_ISOTS_MAX])
{
    return tp_isots_canon(PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col),
                          kind == K_TSTZ, out);
}

static void json_value(tp_buf_t *b, const PGresult *res, int row, int col, int kind)
{
    if (PQgetisnull(res, row, col)) {
        tp_buf_puts(b, "null");
        return;
    }
    const char *v = PQgetvalue(res, row, col);
    switch (kind) {
    case K_NUM:
        if (strcmp(v, "NaN") == 0 || strstr(v, "Infinity"))
            tp_buf_json_str(b, v);
        else
            tp_buf_puts(b, v);
        break;
    case K_BOOL: tp_buf_puts(b, v[0] == 't' ? "true" : "false"); break;
    case K_JSON: tp_buf_puts(b, v); break;
    case K_TS:
    case K_TSTZ: {
        char ts[TP_ISOTS_MAX];
        size_t n = canon_ts(res, row, col, kind, ts);
        if (n == 0) {
            tp_buf_json_str(b, v); /* not the ISO DateStyle: as Postgres wrote it */
            break;
        }
        tp_buf_putc(b, '"');
        tp_buf_append(b, ts, n);
        tp_buf_putc(b, '"');
        break;
    }
    default: tp_buf_json_str(b, v); break;
    }
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
    const char *v = PQgetvalue(res, row, col);
    if (kind == K_TS || kind == K_TSTZ) {
        char ts[TP_ISOTS_MAX];
        size_t n = canon_ts(res, row, col, kind, ts);
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
    tp_buf_putc(out, '[');
    for (int r = 0; r < nr; r++) {
        if (r)
            tp_buf_putc(out, ',');
        tp_buf_putc(out, '{');
        for (int c = 0; c < nf; c++) {
            if (c)
                tp_buf_putc(out, ',');
            tp_buf_append(out, names[c].data, names[c].len);
            json_value(out, res, r, c, kinds[c]);
        }
        tp_buf_putc(out, '}');
    }
    tp_buf_putc(out, ']');
    for (int c = 0; c < nf; c++)
        tp_buf_free(&names[c]);
}

const char *fmt_ctype(fmt_t fmt)
{
    return fmt == FMT_CSV ? "text/csv; charset=utf-8" : "application/json";
}
