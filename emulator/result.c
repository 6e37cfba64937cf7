/* Results in Databricks' shape: maps Postgres result columns (type oid and
 * typmod) to type_name/type_text metadata, rewrites Postgres' text cells into
 * the string forms the Statement Execution API uses (true/false, ISO-8601
 * timestamps with 'T', hex without \x, arrays as JSON text), and builds the
 * result chunks once, as compact byte strings ready to send: a JSON array of
 * arrays for JSON_ARRAY, RFC 4180 text for CSV (header in chunk 0 only, NULL
 * as bare null). Chunks close at --chunk-rows rows or --chunk-bytes bytes;
 * row_limit and byte_limit stop the result and set `truncated`.
 * Unconstrained numeric is reported as DECIMAL(38,18) with Postgres' digits;
 * geometric types (point, box, ...) as GEOMETRY(0); json/jsonb, time, uuid
 * and other types are STRING. */
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/isots.h"

enum {
    OID_BOOL = 16, OID_BYTEA = 17, OID_CHAR = 18, OID_NAME = 19, OID_INT8 = 20, OID_INT2 = 21,
    OID_INT4 = 23, OID_TEXT = 25, OID_OID = 26, OID_JSON = 114, OID_FLOAT4 = 700,
    OID_FLOAT8 = 701, OID_BPCHAR = 1042, OID_VARCHAR = 1043, OID_DATE = 1082,
    OID_TIMESTAMP = 1114, OID_TIMESTAMPTZ = 1184, OID_INTERVAL = 1186, OID_NUMERIC = 1700,
    OID_VOID = 2278, OID_JSONB = 3802, OID_POINT = 600, OID_LSEG = 601, OID_PATH = 602,
    OID_BOX = 603, OID_POLYGON = 604, OID_LINE = 628, OID_CIRCLE = 718,
};

typedef struct scalar_map {
    unsigned int oid;
    unsigned int array_oid;
    const char *type_text;
    const char *type_name;
    emu_cell_t cell;
} scalar_map_t;

static const scalar_map_t scalars[] = {
    {OID_BOOL, 1000, "BOOLEAN", "BOOLEAN", EMU_CELL_BOOL},
    {OID_BYTEA, 1001, "BINARY", "BINARY", EMU_CELL_BYTEA},
    {OID_INT2, 1005, "SMALLINT", "SHORT", EMU_CELL_PLAIN},
    {OID_INT4, 1007, "INT", "INT", EMU_CELL_PLAIN},
    {OID_INT8, 1016, "BIGINT", "LONG", EMU_CELL_PLAIN},
    {OID_OID, 1028, "BIGINT", "LONG", EMU_CELL_PLAIN},
    {OID_FLOAT4, 1021, "FLOAT", "FLOAT", EMU_CELL_PLAIN},
    {OID_FLOAT8, 1022, "DOUBLE", "DOUBLE", EMU_CELL_PLAIN},
    {OID_TEXT, 1009, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_VARCHAR, 1015, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_BPCHAR, 1014, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_NAME, 1003, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_CHAR, 1002, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_DATE, 1182, "DATE", "DATE", EMU_CELL_PLAIN},
    {OID_TIMESTAMPTZ, 1185, "TIMESTAMP", "TIMESTAMP", EMU_CELL_TSTZ},
    {OID_TIMESTAMP, 1115, "TIMESTAMP_NTZ", "TIMESTAMP_NTZ", EMU_CELL_TS},
    {OID_NUMERIC, 1231, "DECIMAL", "DECIMAL", EMU_CELL_PLAIN},
    {OID_INTERVAL, 1187, "INTERVAL DAY TO SECOND", "INTERVAL", EMU_CELL_PLAIN},
    {OID_JSON, 199, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_JSONB, 3807, "STRING", "STRING", EMU_CELL_PLAIN},
    {OID_VOID, 0, "VOID", "NULL", EMU_CELL_PLAIN},
    /* Geometric types: Databricks' GEOMETRY with SRID 0 ("unknown"); the cell
     * stays Postgres' text, not WKT. Their arrays are STRING. */
    {OID_POINT, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_LSEG, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_PATH, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_BOX, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_POLYGON, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_LINE, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
    {OID_CIRCLE, 0, "GEOMETRY(0)", "GEOMETRY", EMU_CELL_PLAIN},
};

static void numeric_typmod(int typmod, int *p, int *s)
{
    if (typmod >= 4) {
        *p = ((typmod - 4) >> 16) & 0xffff;
        *s = (typmod - 4) & 0xffff;
    } else {
        *p = 38;
        *s = 18;
    }
}

/* Postgres interval typmod range bits (datetime.h: MONTH 1, YEAR 2, DAY 3,
 * HOUR 10, MINUTE 11, SECOND 12) -> Databricks' interval qualifier. */
static const char *interval_range(int typmod)
{
    static const struct {
        int mask;
        const char *name;
    } ranges[] = {
        {1 << 2, "YEAR"},
        {1 << 1, "MONTH"},
        {(1 << 2) | (1 << 1), "YEAR TO MONTH"},
        {1 << 3, "DAY"},
        {1 << 10, "HOUR"},
        {1 << 11, "MINUTE"},
        {1 << 12, "SECOND"},
        {(1 << 3) | (1 << 10), "DAY TO HOUR"},
        {(1 << 3) | (1 << 10) | (1 << 11), "DAY TO MINUTE"},
        {(1 << 10) | (1 << 11), "HOUR TO MINUTE"},
        {(1 << 10) | (1 << 11) | (1 << 12), "HOUR TO SECOND"},
        {(1 << 11) | (1 << 12), "MINUTE TO SECOND"},
    };
    if (typmod >= 0) {
        int mask = (typmod >> 16) & 0x7fff;
        for (size_t i = 0; i < TP_ARRAY_LEN(ranges); i++)
            if (ranges[i].mask == mask)
                return ranges[i].name;
    }
    return "DAY TO SECOND";
}

void emu_column_map(emu_column_t *col, unsigned int oid, int typmod)
{
    col->precision = 0;
    col->scale = 0;
    col->interval_type = NULL;
    for (size_t i = 0; i < TP_ARRAY_LEN(scalars); i++) {
        const scalar_map_t *m = &scalars[i];
        if (m->oid == oid) {
            col->type_name = m->type_name;
            col->cell = m->cell;
            if (oid == OID_NUMERIC) {
                numeric_typmod(typmod, &col->precision, &col->scale);
                col->type_text = tp_xasprintf("DECIMAL(%d,%d)", col->precision, col->scale);
            } else {
                col->type_text = tp_xstrdup(m->type_text);
            }
            if (oid == OID_INTERVAL) {
                col->interval_type = interval_range(typmod);
                free(col->type_text);
                col->type_text = tp_xasprintf("INTERVAL %s", col->interval_type);
            }
            return;
        }
        if (m->array_oid != 0 && m->array_oid == oid) {
            col->type_name = "ARRAY";
            col->cell = EMU_CELL_ARRAY;
            if (oid == 1231) {
                int p, s;
                numeric_typmod(typmod, &p, &s);
                col->type_text = tp_xasprintf("ARRAY<DECIMAL(%d,%d)>", p, s);
            } else {
                col->type_text = tp_xasprintf("ARRAY<%s>", m->type_text);
            }
            return;
        }
    }
    col->type_name = "STRING";
    col->type_text = tp_xstrdup("STRING");
    col->cell = EMU_CELL_PLAIN;
}

void emu_column_free(emu_column_t *col)
{
    free(col->name);
    free(col->type_text);
}

/* Postgres' ISO text -> the Databricks form (databricks-protocol.md 1.7):
 * "2021-01-01 10:00:00.5+00" -> "2021-01-01T10:00:00.500Z" (tz; a non-zero
 * offset as "+05:30") or without zone; milliseconds always, microseconds when
 * there are any. Years as java.time writes them: "+10000-..." past 9999 and
 * astronomical "-0043-..." for 44 BC. infinity (which Databricks does not
 * have) and text that does not parse go out as Postgres wrote them. */
static void convert_ts(const char *s, bool tz, tp_buf_t *out)
{
    tp_isots_t ts;
    if (!tp_isots_parse(s, strlen(s), &ts) || ts.special || ts.has_off != tz) {
        tp_buf_puts(out, s);
        return;
    }
    if (ts.year > 9999)
        tp_buf_printf(out, "+%lld", (long long)ts.year);
    else if (ts.year < 0)
        tp_buf_printf(out, "-%04lld", (long long)-ts.year);
    else
        tp_buf_printf(out, "%04lld", (long long)ts.year);
    tp_buf_printf(out, "-%02d-%02dT%02d:%02d:%02d", ts.mon, ts.day, ts.hour, ts.min, ts.sec);
    if (ts.usec % 1000 == 0)
        tp_buf_printf(out, ".%03d", ts.usec / 1000);
    else
        tp_buf_printf(out, ".%06d", ts.usec);
    if (!tz)
        return;
    if (ts.off == 0) {
        tp_buf_putc(out, 'Z');
        return;
    }
    int a = ts.off < 0 ? -ts.off : ts.off;
    tp_buf_printf(out, "%c%02d:%02d", ts.off < 0 ? '-' : '+', a / 3600, a / 60 % 60);
    if (a % 60)
        tp_buf_printf(out, ":%02d", a % 60);
}

/* Postgres array literal -> JSON text: {1,NULL} -> [1,null]; strings quoted
 * unless elem_raw (numbers); booleans t/f -> true/false. */
static void convert_array(const char *s, const emu_column_t *col, tp_buf_t *out)
{
    bool quote = strstr(col->type_text, "STRING") || strstr(col->type_text, "DATE") ||
                 strstr(col->type_text, "TIMESTAMP") || strstr(col->type_text, "BINARY") ||
                 strstr(col->type_text, "INTERVAL");
    bool boolean = strstr(col->type_text, "BOOLEAN") != NULL;
    tp_buf_t el;
    tp_buf_init(&el);
    if (*s == '[') { /* explicit bounds "[0:1]={...}" */
        const char *eq = strchr(s, '=');
        s = eq ? eq + 1 : s;
    }
    bool expect_elem = true;
    while (*s) {
        if (*s == '{') {
            tp_buf_putc(out, '[');
            s++;
            expect_elem = true;
            continue;
        }
        if (*s == '}') {
            tp_buf_putc(out, ']');
            s++;
            expect_elem = false;
            continue;
        }
        if (*s == ',') {
            tp_buf_putc(out, ',');
            s++;
            expect_elem = true;
            continue;
        }
        if (!expect_elem) {
            s++;
            continue;
        }
        tp_buf_reset(&el);
        bool was_quoted = false;
        if (*s == '"') {
            was_quoted = true;
            s++;
            while (*s && *s != '"') {
                if (*s == '\\' && s[1])
                    s++;
                tp_buf_putc(&el, *s++);
            }
            if (*s == '"')
                s++;
        } else {
            while (*s && *s != ',' && *s != '}')
                tp_buf_putc(&el, *s++);
        }
        const char *v = el.data ? el.data : "";
        if (!was_quoted && strcmp(v, "NULL") == 0)
            tp_buf_puts(out, "null");
        else if (boolean)
            tp_buf_puts(out, strcmp(v, "t") == 0 ? "true" : "false");
        else if (quote)
            tp_buf_json_str(out, v);
        else
            tp_buf_puts(out, v);
        expect_elem = false;
    }
    tp_buf_free(&el);
}

/* The Databricks text form of one non-null cell; may point into tmp. */
static const char *convert_cell(const emu_column_t *col, const char *s, tp_buf_t *tmp)
{
    switch (col->cell) {
    case EMU_CELL_PLAIN: return s;
    case EMU_CELL_BOOL: return s[0] == 't' ? "true" : "false";
    case EMU_CELL_BYTEA: return (s[0] == '\\' && s[1] == 'x') ? s + 2 : s;
    case EMU_CELL_TSTZ:
    case EMU_CELL_TS:
        tp_buf_reset(tmp);
        convert_ts(s, col->cell == EMU_CELL_TSTZ, tmp);
        return tmp->data;
    case EMU_CELL_ARRAY:
        tp_buf_reset(tmp);
        convert_array(s, col, tmp);
        return tmp->data ? tmp->data : "";
    }
    return s;
}

static void csv_field(tp_buf_t *out, const char *s)
{
    bool q = *s == '\0' || strcmp(s, "null") == 0 || strpbrk(s, ",\"\r\n") != NULL;
    if (!q) {
        tp_buf_puts(out, s);
        return;
    }
    tp_buf_putc(out, '"');
    for (; *s; s++) {
        if (*s == '"')
            tp_buf_putc(out, '"');
        tp_buf_putc(out, *s);
    }
    tp_buf_putc(out, '"');
}

void emu_builder_init(emu_builder_t *b, emu_stmt_t *st)
{
    memset(b, 0, sizeof *b);
    b->st = st;
    tp_buf_init(&b->cur);
    tp_buf_init(&b->row);
}

static void flush_chunk(emu_builder_t *b)
{
    emu_stmt_t *st = b->st;
    if (b->cur_rows == 0)
        return;
    if (st->format == EMU_FMT_JSON)
        tp_buf_putc(&b->cur, ']');
    if ((size_t)st->nchunks == b->cap_chunks) {
        b->cap_chunks = b->cap_chunks ? b->cap_chunks * 2 : 16;
        st->chunks = tp_xrealloc(st->chunks, b->cap_chunks * sizeof *st->chunks);
    }
    emu_chunk_t *c = &st->chunks[st->nchunks++];
    c->row_offset = b->cur_offset;
    c->row_count = b->cur_rows;
    c->len = b->cur.len;
    c->data = tp_xrealloc(tp_buf_steal(&b->cur), c->len + 1); /* shrink to fit */
    st->total_bytes += (int64_t)c->len;
    b->cur_offset += b->cur_rows;
    b->cur_rows = 0;
}

static tp_buf_t *cell_tmp(void)
{
    static _Thread_local tp_buf_t tmp;
    return &tmp;
}

void emu_builder_row(emu_builder_t *b, char *const *cells)
{
    emu_stmt_t *st = b->st;
    if (b->stop) {
        st->truncated = true;
        return;
    }
    if (st->row_limit >= 0 && st->total_rows >= st->row_limit) {
        st->truncated = true;
        b->stop = true;
        return;
    }
    tp_buf_t *row = &b->row;
    tp_buf_t *tmp = cell_tmp();
    tp_buf_reset(row);
    if (st->format == EMU_FMT_JSON)
        tp_buf_putc(row, '[');
    for (int j = 0; j < st->ncols; j++) {
        if (j > 0)
            tp_buf_putc(row, ',');
        if (cells[j] == NULL) {
            tp_buf_puts(row, "null");
            continue;
        }
        const char *v = convert_cell(&st->cols[j], cells[j], tmp);
        if (st->format == EMU_FMT_JSON)
            tp_buf_json_str(row, v);
        else
            csv_field(row, v);
    }
    tp_buf_putc(row, st->format == EMU_FMT_JSON ? ']' : '\n');
    int64_t so_far = st->total_bytes + (int64_t)b->cur.len;
    if (st->byte_limit >= 0 && so_far + (int64_t)row->len > st->byte_limit) {
        st->truncated = true;
        b->stop = true;
        return;
    }
    if (b->cur_rows > 0 && (b->cur_rows >= g.chunk_rows ||
                            (int64_t)(b->cur.len + row->len + 1) > g.chunk_bytes))
        flush_chunk(b);
    if (b->cur_rows == 0) {
        if (st->format == EMU_FMT_JSON) {
            tp_buf_putc(&b->cur, '[');
        } else if (st->nchunks == 0) {
            for (int j = 0; j < st->ncols; j++) {
                if (j > 0)
                    tp_buf_putc(&b->cur, ',');
                csv_field(&b->cur, st->cols[j].name);
            }
            tp_buf_putc(&b->cur, '\n');
        }
    } else if (st->format == EMU_FMT_JSON) {
        tp_buf_putc(&b->cur, ',');
    }
    tp_buf_append(&b->cur, row->data, row->len);
    b->cur_rows++;
    st->total_rows++;
}

void emu_builder_finish(emu_builder_t *b)
{
    flush_chunk(b);
}

void emu_builder_free(emu_builder_t *b)
{
    tp_buf_free(&b->cur);
    tp_buf_free(&b->row);
    tp_buf_free(cell_tmp());
}
