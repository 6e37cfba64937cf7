/* Push JSON parser for warehouse answers (see whjson.h). A byte-level state
 * machine with an explicit stack of frames: OBJ/ARR frames build jansson
 * values, the ROWS frame is the configured row array and ROW frames are its
 * rows, whose cells (JSON strings or null) are unescaped straight into one
 * arena with offsets, so memory follows the batch, not the document. Strings,
 * numbers and literals may be split across feeds; escapes (including
 * surrogate pairs) are decoded; raw control characters are rejected. It does
 * not validate UTF-8 (bytes pass through), keep duplicate keys (last wins), or
 * know anything about HTTP or the meaning of the fields. */
#include "tidepool/whjson.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define NULL_CELL ((size_t)-1)

enum { F_OBJ, F_ARR, F_ROWS, F_ROW };
enum {
    ST_VALUE,
    ST_ARR_FIRST,
    ST_ARR_NEXT,
    ST_OBJ_FIRST,
    ST_OBJ_KEY,
    ST_COLON,
    ST_OBJ_NEXT,
    ST_STRING,
    ST_SCALAR,
    ST_END,
    ST_FAILED,
};
enum { R_KEY, R_VAL, R_CELL };
enum { E_NONE, E_START, E_U, E_NEED_BS, E_NEED_U };

typedef struct frame {
    int kind;
    json_t *v;  /* OBJ/ARR: container being built */
    char *key;  /* OBJ: key of the value being parsed */
} frame_t;

struct tp_whjson {
    char **path;
    size_t path_len;
    int state;
    frame_t st[MAX_DEPTH];
    int depth;
    json_t *root;
    size_t offset; /* bytes consumed before the current feed */
    char err[256];
    /* string in progress */
    int role;
    tp_buf_t sbuf;
    int esc;
    int udigits;
    uint32_t ucode, uhigh;
    /* scalar in progress */
    char tok[64];
    size_t toklen;
    /* rows */
    bool saw_rows;
    size_t want_ncols; /* 0 = unknown */
    bool ncols_set;
    int64_t skip;
    int64_t rows_total;
    tp_buf_t arena;
    size_t *offs, *lens;
    size_t ncell, capcell;
    size_t nrows;
    size_t row_first_cell; /* cell index where the current row starts */
    size_t row_arena;      /* arena length where the current row starts */
    size_t cell_off;
    const char **cellv; /* built by tp_whjson_batch */
    size_t cellv_cap;
    tp_whjson_row_fn row_fn;
    void *row_arg;
};

tp_whjson_t *tp_whjson_new(const char *const *path, size_t path_len)
{
    tp_whjson_t *p = tp_xcalloc(1, sizeof(*p));
    p->path_len = path_len;
    p->path = tp_xcalloc(path_len ? path_len : 1, sizeof(char *));
    for (size_t i = 0; i < path_len; i++)
        p->path[i] = tp_xstrdup(path[i]);
    p->state = ST_VALUE;
    tp_buf_init(&p->sbuf);
    tp_buf_init(&p->arena);
    return p;
}

void tp_whjson_free(tp_whjson_t *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->path_len; i++)
        free(p->path[i]);
    free(p->path);
    for (int i = 0; i < p->depth; i++) {
        json_decref(p->st[i].v);
        free(p->st[i].key);
    }
    json_decref(p->root);
    tp_buf_free(&p->sbuf);
    tp_buf_free(&p->arena);
    free(p->offs);
    free(p->lens);
    free(p->cellv);
    free(p);
}

void tp_whjson_set_row_cb(tp_whjson_t *p, tp_whjson_row_fn fn, void *arg)
{
    p->row_fn = fn;
    p->row_arg = arg;
}

void tp_whjson_set_ncols(tp_whjson_t *p, size_t ncols)
{
    p->want_ncols = ncols;
    p->ncols_set = true;
}

void tp_whjson_set_skip(tp_whjson_t *p, int64_t n)
{
    p->skip = n;
}

const char *tp_whjson_error(const tp_whjson_t *p)
{
    return p->err;
}

json_t *tp_whjson_root(const tp_whjson_t *p)
{
    return p->root;
}

bool tp_whjson_saw_rows(const tp_whjson_t *p)
{
    return p->saw_rows;
}

int64_t tp_whjson_rows_total(const tp_whjson_t *p)
{
    return p->rows_total;
}

TP_PRINTF(3, 4)
static bool fail(tp_whjson_t *p, size_t at, const char *fmt, ...)
{
    if (p->state == ST_FAILED)
        return false;
    int n = snprintf(p->err, sizeof(p->err), "at byte %zu: ", p->offset + at);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + n, sizeof(p->err) - (size_t)n, fmt, ap);
    va_end(ap);
    p->state = ST_FAILED;
    return false;
}

static const char *shown(char c, char *buf)
{
    if (c >= 0x21 && c < 0x7f)
        snprintf(buf, 8, "'%c'", c);
    else
        snprintf(buf, 8, "0x%02x", (unsigned char)c);
    return buf;
}

static void cell_push(tp_whjson_t *p, size_t off, size_t len)
{
    if (p->ncell == p->capcell) {
        p->capcell = p->capcell ? p->capcell * 2 : 256;
        p->offs = tp_xrealloc(p->offs, p->capcell * sizeof(size_t));
        p->lens = tp_xrealloc(p->lens, p->capcell * sizeof(size_t));
    }
    p->offs[p->ncell] = off;
    p->lens[p->ncell] = len;
    p->ncell++;
}

/* A value just finished inside the top frame: choose what comes next. */
static void after_value(tp_whjson_t *p)
{
    if (p->depth == 0) {
        p->state = ST_END;
        return;
    }
    frame_t *f = &p->st[p->depth - 1];
    if (f->kind == F_OBJ) {
        free(f->key);
        f->key = NULL;
        p->state = ST_OBJ_NEXT;
    } else {
        p->state = ST_ARR_NEXT;
    }
}

/* Attaches a built value to its parent (steals v). */
static void attach(tp_whjson_t *p, json_t *v)
{
    if (p->depth == 0) {
        json_decref(p->root);
        p->root = v;
        return;
    }
    frame_t *f = &p->st[p->depth - 1];
    if (f->kind == F_OBJ)
        json_object_set_new(f->v, f->key, v);
    else
        json_array_append_new(f->v, v);
}

static bool is_row_array_place(const tp_whjson_t *p)
{
    if (p->saw_rows || (size_t)p->depth != p->path_len)
        return false;
    for (int i = 0; i < p->depth; i++)
        if (p->st[i].kind != F_OBJ || p->st[i].key == NULL || strcmp(p->st[i].key, p->path[i]) != 0)
            return false;
    return true;
}

static int top_kind(const tp_whjson_t *p)
{
    return p->depth ? p->st[p->depth - 1].kind : -1;
}

static bool push(tp_whjson_t *p, size_t at, int kind, json_t *v)
{
    if (p->depth == MAX_DEPTH) {
        json_decref(v);
        return fail(p, at, "nesting deeper than %d", MAX_DEPTH);
    }
    p->st[p->depth].kind = kind;
    p->st[p->depth].v = v;
    p->st[p->depth].key = NULL;
    p->depth++;
    return true;
}

static bool row_end(tp_whjson_t *p, size_t at)
{
    size_t width = p->ncell - p->row_first_cell;
    int64_t rowno = p->rows_total;
    if (!p->ncols_set) {
        p->want_ncols = width;
        p->ncols_set = true;
    } else if (width != p->want_ncols) {
        return fail(p, at, "row %lld has %zu cells, expected %zu", (long long)rowno, width,
                    p->want_ncols);
    }
    p->rows_total++;
    if (p->skip > 0) {
        p->skip--;
        p->ncell = p->row_first_cell;
        p->arena.len = p->row_arena;
        return true;
    }
    p->nrows++;
    if (p->row_fn != NULL && !p->row_fn(p->row_arg))
        return fail(p, at, "stopped");
    return true;
}

/* Begins a value whose first byte is c (not whitespace). */
static bool value_start(tp_whjson_t *p, size_t at, char c)
{
    char b[8];
    int tk = top_kind(p);
    if (tk == F_ROWS) {
        if (c != '[')
            return fail(p, at, "row %lld: expected an array, got %s", (long long)p->rows_total,
                        shown(c, b));
        p->row_first_cell = p->ncell;
        p->row_arena = p->arena.len;
        if (!push(p, at, F_ROW, NULL))
            return false;
        p->state = ST_ARR_FIRST;
        return true;
    }
    if (tk == F_ROW) {
        if (c == '"') {
            p->role = R_CELL;
            p->cell_off = p->arena.len;
            p->esc = E_NONE;
            p->state = ST_STRING;
            return true;
        }
        if (c == 'n') {
            p->toklen = 0;
            p->state = ST_SCALAR;
            return true;
        }
        return fail(p, at, "row %lld column %zu: expected a string or null, got %s",
                    (long long)p->rows_total, p->ncell - p->row_first_cell, shown(c, b));
    }
    switch (c) {
    case '{':
        if (!push(p, at, F_OBJ, json_object()))
            return false;
        p->state = ST_OBJ_FIRST;
        return true;
    case '[':
        if (is_row_array_place(p)) {
            p->saw_rows = true;
            if (!push(p, at, F_ROWS, NULL))
                return false;
        } else if (!push(p, at, F_ARR, json_array())) {
            return false;
        }
        p->state = ST_ARR_FIRST;
        return true;
    case '"':
        p->role = R_VAL;
        tp_buf_reset(&p->sbuf);
        p->esc = E_NONE;
        p->state = ST_STRING;
        return true;
    default:
        if (c == '-' || (c >= '0' && c <= '9') || c == 't' || c == 'f' || c == 'n') {
            p->toklen = 0;
            p->state = ST_SCALAR;
            return true;
        }
        return fail(p, at, "expected a value, got %s", shown(c, b));
    }
}

static bool valid_number(const char *s)
{
    if (*s == '-')
        s++;
    if (*s == '0')
        s++;
    else if (*s >= '1' && *s <= '9')
        while (*s >= '0' && *s <= '9')
            s++;
    else
        return false;
    if (*s == '.') {
        s++;
        if (!(*s >= '0' && *s <= '9'))
            return false;
        while (*s >= '0' && *s <= '9')
            s++;
    }
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-')
            s++;
        if (!(*s >= '0' && *s <= '9'))
            return false;
        while (*s >= '0' && *s <= '9')
            s++;
    }
    return *s == '\0';
}

static bool scalar_end(tp_whjson_t *p, size_t at)
{
    p->tok[p->toklen] = '\0';
    const char *t = p->tok;
    if (top_kind(p) == F_ROW) {
        if (strcmp(t, "null") != 0)
            return fail(p, at, "row %lld column %zu: expected a string or null, got '%s'",
                        (long long)p->rows_total, p->ncell - p->row_first_cell, t);
        cell_push(p, NULL_CELL, 0);
        after_value(p);
        return true;
    }
    json_t *v;
    if (strcmp(t, "null") == 0)
        v = json_null();
    else if (strcmp(t, "true") == 0)
        v = json_true();
    else if (strcmp(t, "false") == 0)
        v = json_false();
    else if (valid_number(t)) {
        if (strpbrk(t, ".eE") == NULL) {
            errno = 0;
            long long n = strtoll(t, NULL, 10);
            v = errno == ERANGE ? json_real(strtod(t, NULL)) : json_integer(n);
        } else {
            v = json_real(strtod(t, NULL));
        }
    } else {
        return fail(p, at, "invalid literal or number '%s'", t);
    }
    attach(p, v);
    after_value(p);
    return true;
}

static tp_buf_t *str_target(tp_whjson_t *p)
{
    return p->role == R_CELL ? &p->arena : &p->sbuf;
}

static void put_utf8(tp_buf_t *b, uint32_t cp)
{
    char o[4];
    size_t n;
    if (cp < 0x80) {
        o[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        o[0] = (char)(0xF0 | (cp >> 18));
        o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    tp_buf_append(b, o, n);
}

static bool string_end(tp_whjson_t *p, size_t at)
{
    (void)at;
    if (p->role == R_CELL) {
        size_t len = p->arena.len - p->cell_off;
        tp_buf_putc(&p->arena, '\0');
        cell_push(p, p->cell_off, len);
        after_value(p);
        return true;
    }
    if (p->role == R_KEY) {
        frame_t *f = &p->st[p->depth - 1];
        free(f->key);
        f->key = tp_xstrndup(p->sbuf.data ? p->sbuf.data : "", p->sbuf.len);
        p->state = ST_COLON;
        return true;
    }
    attach(p, json_stringn_nocheck(p->sbuf.data ? p->sbuf.data : "", p->sbuf.len));
    after_value(p);
    return true;
}

/* Consumes string bytes from data[*i]; returns false on error. */
static bool string_bytes(tp_whjson_t *p, const char *data, size_t len, size_t *i)
{
    tp_buf_t *b = str_target(p);
    char sh[8];
    while (*i < len) {
        if (p->esc == E_NONE) {
            size_t j = *i;
            while (j < len) {
                unsigned char c = (unsigned char)data[j];
                if (c == '"' || c == '\\' || c < 0x20)
                    break;
                j++;
            }
            if (j > *i)
                tp_buf_append(b, data + *i, j - *i);
            *i = j;
            if (j == len)
                return true;
            char c = data[j];
            (*i)++;
            if (c == '"') {
                if (p->uhigh != 0)
                    return fail(p, j, "unpaired UTF-16 surrogate in string");
                return string_end(p, j);
            }
            if (c == '\\') {
                p->esc = E_START;
                continue;
            }
            return fail(p, j, "raw control character %s in string", shown(c, sh));
        }
        char c = data[*i];
        size_t at = *i;
        (*i)++;
        switch (p->esc) {
        case E_START: {
            char out = 0;
            switch (c) {
            case '"': out = '"'; break;
            case '\\': out = '\\'; break;
            case '/': out = '/'; break;
            case 'b': out = '\b'; break;
            case 'f': out = '\f'; break;
            case 'n': out = '\n'; break;
            case 'r': out = '\r'; break;
            case 't': out = '\t'; break;
            case 'u':
                p->esc = E_U;
                p->udigits = 0;
                p->ucode = 0;
                continue;
            default: return fail(p, at, "invalid escape \\%s", shown(c, sh));
            }
            if (p->uhigh != 0)
                return fail(p, at, "unpaired UTF-16 surrogate in string");
            tp_buf_putc(b, out);
            p->esc = E_NONE;
            break;
        }
        case E_U: {
            int h = tp_hexval(c);
            if (h < 0)
                return fail(p, at, "invalid \\u escape digit %s", shown(c, sh));
            p->ucode = (p->ucode << 4) | (uint32_t)h;
            if (++p->udigits < 4)
                continue;
            uint32_t u = p->ucode;
            if (p->uhigh != 0) {
                if (u < 0xDC00 || u > 0xDFFF)
                    return fail(p, at, "unpaired UTF-16 surrogate in string");
                put_utf8(b, 0x10000 + ((p->uhigh - 0xD800) << 10) + (u - 0xDC00));
                p->uhigh = 0;
                p->esc = E_NONE;
            } else if (u >= 0xD800 && u <= 0xDBFF) {
                p->uhigh = u;
                p->esc = E_NEED_BS;
            } else if (u >= 0xDC00 && u <= 0xDFFF) {
                return fail(p, at, "unpaired UTF-16 surrogate in string");
            } else {
                put_utf8(b, u);
                p->esc = E_NONE;
            }
            break;
        }
        case E_NEED_BS:
            if (c != '\\')
                return fail(p, at, "unpaired UTF-16 surrogate in string");
            p->esc = E_NEED_U;
            break;
        case E_NEED_U:
            if (c != 'u')
                return fail(p, at, "unpaired UTF-16 surrogate in string");
            p->esc = E_U;
            p->udigits = 0;
            p->ucode = 0;
            break;
        default: return fail(p, at, "internal string state");
        }
    }
    return true;
}

static bool close_container(tp_whjson_t *p, size_t at, bool obj)
{
    frame_t *f = &p->st[p->depth - 1];
    int kind = f->kind;
    if (obj != (kind == F_OBJ))
        return fail(p, at, "mismatched '%c'", obj ? '}' : ']');
    json_t *v = f->v;
    free(f->key);
    f->key = NULL;
    f->v = NULL;
    p->depth--;
    if (kind == F_ROW) {
        if (!row_end(p, at))
            return false;
    } else if (kind == F_OBJ || kind == F_ARR) {
        attach(p, v);
    }
    after_value(p);
    return true;
}

bool tp_whjson_feed(tp_whjson_t *p, const char *data, size_t len)
{
    size_t i = 0;
    char sh[8];
    while (i < len) {
        if (p->state == ST_FAILED)
            return false;
        if (p->state == ST_STRING) {
            if (!string_bytes(p, data, len, &i))
                return false;
            continue;
        }
        char c = data[i];
        if (p->state == ST_SCALAR) {
            if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '+' ||
                c == '.' || c == 'E') {
                if (p->toklen + 1 >= sizeof(p->tok))
                    return fail(p, i, "number or literal too long");
                p->tok[p->toklen++] = c;
                i++;
                continue;
            }
            if (!scalar_end(p, i))
                return false;
            continue; /* c is processed in the new state */
        }
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            i++;
            continue;
        }
        size_t at = i++;
        switch (p->state) {
        case ST_VALUE:
            if (!value_start(p, at, c))
                return false;
            if (p->state == ST_SCALAR)
                i = at; /* re-read the first byte as part of the token */
            break;
        case ST_ARR_FIRST:
            if (c == ']') {
                if (!close_container(p, at, false))
                    return false;
                break;
            }
            p->state = ST_VALUE;
            i = at;
            break;
        case ST_ARR_NEXT:
            if (c == ',')
                p->state = ST_VALUE;
            else if (c == ']') {
                if (!close_container(p, at, false))
                    return false;
            } else
                return fail(p, at, "expected ',' or ']' in array, got %s", shown(c, sh));
            break;
        case ST_OBJ_FIRST:
        case ST_OBJ_KEY:
            if (c == '}' && p->state == ST_OBJ_FIRST) {
                if (!close_container(p, at, true))
                    return false;
            } else if (c == '"') {
                p->role = R_KEY;
                tp_buf_reset(&p->sbuf);
                p->esc = E_NONE;
                p->state = ST_STRING;
            } else {
                return fail(p, at, "expected an object key, got %s", shown(c, sh));
            }
            break;
        case ST_COLON:
            if (c != ':')
                return fail(p, at, "expected ':' after object key, got %s", shown(c, sh));
            p->state = ST_VALUE;
            break;
        case ST_OBJ_NEXT:
            if (c == ',')
                p->state = ST_OBJ_KEY;
            else if (c == '}') {
                if (!close_container(p, at, true))
                    return false;
            } else
                return fail(p, at, "expected ',' or '}' in object, got %s", shown(c, sh));
            break;
        case ST_END: return fail(p, at, "unexpected %s after the end of the document", shown(c, sh));
        default: return fail(p, at, "internal parser state");
        }
    }
    p->offset += len;
    return p->state != ST_FAILED;
}

bool tp_whjson_finish(tp_whjson_t *p)
{
    if (p->state == ST_FAILED)
        return false;
    if (p->state == ST_SCALAR && p->depth == 0 && !scalar_end(p, 0))
        return false;
    if (p->state == ST_END)
        return true;
    const char *where = p->state == ST_STRING ? "inside a string"
                        : p->depth == 0       ? "before any value"
                        : top_kind(p) == F_OBJ ? "inside an object"
                        : top_kind(p) == F_ROW ? "inside a row"
                                               : "inside an array";
    char msg[160];
    snprintf(msg, sizeof(msg), "document ends early (%s, after %lld rows)", where,
             (long long)p->rows_total);
    return fail(p, 0, "%s", msg);
}

size_t tp_whjson_batch(tp_whjson_t *p, const char *const **cells, const size_t **lens,
                       size_t *ncols)
{
    size_t n = p->nrows * (p->ncols_set ? p->want_ncols : 0);
    if (n > p->cellv_cap) {
        p->cellv_cap = n;
        p->cellv = tp_xrealloc(p->cellv, n * sizeof(char *));
    }
    for (size_t k = 0; k < n; k++)
        p->cellv[k] = p->offs[k] == NULL_CELL ? NULL : p->arena.data + p->offs[k];
    *cells = (const char *const *)p->cellv;
    *lens = p->lens;
    *ncols = p->ncols_set ? p->want_ncols : 0;
    return p->nrows;
}

void tp_whjson_batch_clear(tp_whjson_t *p)
{
    /* keep a row in progress: move its cells to the front */
    size_t keep_cells = p->ncell - (top_kind(p) == F_ROW ? p->row_first_cell : p->ncell);
    size_t keep_from = top_kind(p) == F_ROW ? p->row_arena : p->arena.len;
    size_t keep_bytes = p->arena.len - keep_from;
    if (keep_cells > 0 || keep_bytes > 0) {
        memmove(p->arena.data, p->arena.data + keep_from, keep_bytes);
        for (size_t k = 0; k < keep_cells; k++) {
            size_t src = p->row_first_cell + k;
            p->offs[k] = p->offs[src] == NULL_CELL ? NULL_CELL : p->offs[src] - keep_from;
            p->lens[k] = p->lens[src];
        }
    }
    if (p->state == ST_STRING && p->role == R_CELL)
        p->cell_off -= keep_from;
    p->arena.len = keep_bytes;
    if (p->arena.data != NULL)
        p->arena.data[keep_bytes] = '\0';
    p->ncell = keep_cells;
    p->row_first_cell = 0;
    p->row_arena = 0;
    p->nrows = 0;
}
