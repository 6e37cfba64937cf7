/* Write-back requests: validation of a request against a reflected table (JSON body,
 * column types and ranges, NOT NULL, lengths, read-only columns, the primary key in
 * the URL, If-Match, Idempotency-Key), the parameters of the table's plan, and the
 * mapping of the statement's result or Postgres error to the HTTP answer.
 *
 * Invalid input never produces a statement: tp_wb_prepare returns the 4xx answer
 * instead. The body is checked with jansson but the client's bytes are what Postgres
 * parses (as jsonb), so numeric precision is kept. The plans themselves (SQL text)
 * are built in writeback.c. Nothing here blocks or knows about the event loop. */
#include "tidepool/writeback.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "tidepool/log.h"

#define MAX_ERRORS 50
#define MAX_ITEMS 1000

/* ---- answers ---- */

void tp_wb_answer_free(tp_wb_answer_t *a)
{
    if (!a)
        return;
    free(a->body);
    free(a->etag);
    memset(a, 0, sizeof *a);
}

static const char *reason(int status)
{
    switch (status) {
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 409:
        return "Conflict";
    case 412:
        return "Precondition Failed";
    case 422:
        return "Unprocessable Content";
    case 428:
        return "Precondition Required";
    case 503:
        return "Service Unavailable";
    default:
        return "Internal Server Error";
    }
}

/* errors: "" or a JSON array body without brackets ({"field":..},{..}). */
static void problem(tp_wb_answer_t *a, int status, const char *code, const char *detail,
                    const char *errors)
{
    tp_buf_t b = {0};
    tp_buf_printf(&b, "{\"type\":\"https://tidepool.dev/problems/%s\",\"title\":", code);
    tp_buf_json_str(&b, reason(status));
    tp_buf_printf(&b, ",\"status\":%d,\"detail\":", status);
    tp_buf_json_str(&b, detail);
    tp_buf_puts(&b, ",\"code\":");
    tp_buf_json_str(&b, code);
    if (errors && *errors)
        tp_buf_printf(&b, ",\"errors\":[%s]", errors);
    tp_buf_putc(&b, '}');
    memset(a, 0, sizeof *a);
    a->status = status;
    a->body = tp_buf_steal(&b);
    a->content_type = "application/problem+json";
}

static void one_error(tp_buf_t *errs, const char *field, const char *message)
{
    if (errs->len)
        tp_buf_putc(errs, ',');
    tp_buf_puts(errs, "{\"field\":");
    tp_buf_json_str(errs, field);
    tp_buf_puts(errs, ",\"message\":");
    tp_buf_json_str(errs, message);
    tp_buf_putc(errs, '}');
}

static void problem1(tp_wb_answer_t *a, int status, const char *code, const char *detail,
                     const char *field, const char *message)
{
    tp_buf_t e = {0};
    if (field)
        one_error(&e, field, message);
    problem(a, status, code, detail, e.data);
    tp_buf_free(&e);
}

/* ---- value checks ---- */

static bool digits(const char *s, int n)
{
    for (int i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return false;
    return true;
}

static int num(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return v;
}

/* YYYY-MM-DD with a real calendar day; returns chars consumed or 0. */
static int parse_date(const char *s)
{
    if (!digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) || s[7] != '-' || !digits(s + 8, 2))
        return 0;
    int y = num(s, 4), m = num(s + 5, 2), d = num(s + 8, 2);
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || m < 1 || m > 12 || d < 1)
        return 0;
    int max = mdays[m - 1] + (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0));
    return d <= max ? 10 : 0;
}

/* date[T ]HH:MM[:SS[.ffffff]] then an offset (Z or +-HH[:MM]) iff want_tz. */
static bool parse_timestamp(const char *s, bool want_tz)
{
    if (!parse_date(s))
        return false;
    s += 10;
    if (*s != 'T' && *s != 't' && *s != ' ')
        return false;
    s++;
    if (!digits(s, 2) || s[2] != ':' || !digits(s + 3, 2) || num(s, 2) > 23 || num(s + 3, 2) > 59)
        return false;
    s += 5;
    if (*s == ':') {
        if (!digits(s + 1, 2) || num(s + 1, 2) > 60)
            return false;
        s += 3;
        if (*s == '.') {
            int n = 0;
            while (isdigit((unsigned char)s[1 + n]))
                n++;
            if (n < 1 || n > 9)
                return false;
            s += 1 + n;
        }
    }
    if (*s == '\0')
        return !want_tz;
    if (!want_tz)
        return false;
    if ((*s == 'Z' || *s == 'z') && s[1] == '\0')
        return true;
    if ((*s != '+' && *s != '-') || !digits(s + 1, 2) || num(s + 1, 2) > 15)
        return false;
    s += 3;
    if (*s == ':')
        s++;
    if (*s == '\0')
        return true;
    return digits(s, 2) && num(s, 2) <= 59 && s[2] == '\0';
}

static bool parse_uuid(const char *s)
{
    static const int groups[] = {8, 4, 4, 4, 12};
    for (int g = 0; g < 5; g++) {
        for (int i = 0; i < groups[g]; i++, s++)
            if (!isxdigit((unsigned char)*s))
                return false;
        if (g < 4 && *s++ != '-')
            return false;
    }
    return *s == '\0';
}

static size_t utf8_chars(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

static void int_range(tp_wb_kind_t k, int64_t *lo, int64_t *hi)
{
    *lo = k == TP_WB_INT2 ? -32768 : k == TP_WB_INT4 ? INT32_MIN : INT64_MIN;
    *hi = k == TP_WB_INT2 ? 32767 : k == TP_WB_INT4 ? INT32_MAX : INT64_MAX;
}

static const char *int_message(tp_wb_kind_t k)
{
    return k == TP_WB_INT2   ? "must be an integer between -32768 and 32767"
           : k == TP_WB_INT4 ? "must be an integer between -2147483648 and 2147483647"
                             : "must be a 64-bit integer";
}

static const char *text_message(int max_chars)
{
    static _Thread_local char msg[64];
    snprintf(msg, sizeof msg, "is longer than %d characters", max_chars);
    return msg;
}

const char *tp_wb_check_text(tp_wb_kind_t kind, int max_chars, const char *s)
{
    int64_t lo, hi, v;
    switch (kind) {
    case TP_WB_INT2:
    case TP_WB_INT4:
    case TP_WB_INT8:
        int_range(kind, &lo, &hi);
        return tp_parse_int64(s, lo, hi, &v) ? NULL : int_message(kind);
    case TP_WB_NUMERIC:
    case TP_WB_FLOAT: {
        /* JSON number syntax: no hex, inf, nan or leading '+' */
        const char *p = s + (*s == '-');
        if (!isdigit((unsigned char)*p))
            return "must be a number";
        char *end;
        errno = 0;
        double d = strtod(s, &end);
        if (*end != '\0' || strpbrk(s, "xXnNiI"))
            return "must be a number";
        if (kind == TP_WB_FLOAT && (errno == ERANGE && isinf(d)))
            return "is out of range";
        return NULL;
    }
    case TP_WB_BOOL:
        return strcmp(s, "true") == 0 || strcmp(s, "false") == 0 ? NULL : "must be true or false";
    case TP_WB_TEXT:
        return max_chars >= 0 && utf8_chars(s) > (size_t)max_chars ? text_message(max_chars) : NULL;
    case TP_WB_DATE:
        return parse_date(s) && s[10] == '\0' ? NULL : "must be a date (YYYY-MM-DD)";
    case TP_WB_TIMESTAMPTZ:
        return parse_timestamp(s, true)
                   ? NULL
                   : "must be an RFC 3339 timestamp with an offset (2025-01-31T12:00:00Z)";
    case TP_WB_TIMESTAMP:
        return parse_timestamp(s, false)
                   ? NULL
                   : "must be a timestamp without offset (2025-01-31T12:00:00)";
    case TP_WB_UUID:
        return parse_uuid(s) ? NULL : "must be a UUID (8-4-4-4-12 hex digits)";
    case TP_WB_JSON:
    case TP_WB_OTHER:
        return NULL;
    }
    return NULL;
}

/* A JSON value for column c: NULL if acceptable, else the message. */
static const char *check_json(const tp_wb_col_t *c, json_t *v)
{
    if (json_is_null(v))
        return c->not_null ? "must not be null" : NULL;
    switch (c->kind) {
    case TP_WB_INT2:
    case TP_WB_INT4:
    case TP_WB_INT8: {
        if (!json_is_integer(v))
            return int_message(c->kind);
        int64_t lo, hi, x = json_integer_value(v);
        int_range(c->kind, &lo, &hi);
        return x < lo || x > hi ? int_message(c->kind) : NULL;
    }
    case TP_WB_NUMERIC:
    case TP_WB_FLOAT:
        return json_is_number(v) ? NULL : "must be a number";
    case TP_WB_BOOL:
        return json_is_boolean(v) ? NULL : "must be true or false";
    case TP_WB_JSON:
        return NULL;
    case TP_WB_TEXT:
    case TP_WB_DATE:
    case TP_WB_TIMESTAMPTZ:
    case TP_WB_TIMESTAMP:
    case TP_WB_UUID:
    case TP_WB_OTHER:
        if (!json_is_string(v))
            return c->kind == TP_WB_TEXT || c->kind == TP_WB_OTHER
                       ? "must be a string"
                       : tp_wb_check_text(c->kind, c->max_chars, "");
        if (strlen(json_string_value(v)) != json_string_length(v))
            return "must not contain NUL characters";
        return tp_wb_check_text(c->kind, c->max_chars, json_string_value(v));
    }
    return NULL;
}

static int find_col(const tp_wb_table_t *t, const char *name)
{
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->cols[i].name, name) == 0)
            return i;
    return -1;
}

typedef struct errs {
    tp_buf_t buf;
    int n;
} errs_t;

static void add_err(errs_t *e, const char *prefix, const char *field, const char *message)
{
    if (++e->n > MAX_ERRORS)
        return;
    char f[320];
    snprintf(f, sizeof f, "%s%s", prefix, field);
    one_error(&e->buf, f, message);
}

/* A row (insert) or a set of changes (update) against the columns. */
static void check_object(const tp_wb_table_t *t, json_t *obj, bool insert, const char *prefix,
                         errs_t *e)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        int i = find_col(t, key);
        if (i < 0) {
            add_err(e, prefix, key, "is not a column of this table");
            continue;
        }
        const tp_wb_col_t *c = &t->cols[i];
        if (c->readonly) {
            char m[96];
            snprintf(m, sizeof m, "is read-only (%s)", c->readonly);
            add_err(e, prefix, key, m);
            continue;
        }
        if (!insert && c->pk_pos >= 0) {
            add_err(e, prefix, key, "is part of the primary key and cannot be changed");
            continue;
        }
        const char *m = check_json(c, v);
        if (m)
            add_err(e, prefix, key, m);
    }
    if (insert) {
        for (int i = 0; i < t->ncols; i++) {
            const tp_wb_col_t *c = &t->cols[i];
            if (!c->readonly && c->not_null && !c->has_default && !json_object_get(obj, c->name))
                add_err(e, prefix, c->name, "is required");
        }
    } else if (json_object_size(obj) == 0) {
        add_err(e, prefix, prefix[0] ? "changes" : "body", "has no columns to change");
    }
}

/* ---- URL key and headers ---- */

bool tp_wb_split_pk(const char *seg, int npk, char ***out)
{
    *out = NULL;
    char **v = tp_xcalloc((size_t)npk + 1, sizeof *v);
    int n = 0;
    const char *p = seg;
    for (;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n == npk)
            goto fail;
        tp_buf_t b = {0};
        tp_buf_reserve(&b, len + 1);
        for (size_t i = 0; i < len; i++) {
            if (p[i] == '%') {
                int hi = i + 2 < len ? tp_hexval(p[i + 1]) : -1;
                int lo = i + 2 < len ? tp_hexval(p[i + 2]) : -1;
                if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                    tp_buf_free(&b);
                    goto fail;
                }
                tp_buf_putc(&b, (char)(hi * 16 + lo));
                i += 2;
            } else {
                tp_buf_putc(&b, p[i]);
            }
        }
        v[n++] = tp_buf_steal(&b);
        if (!e)
            break;
        p = e + 1;
    }
    if (n != npk)
        goto fail;
    *out = v;
    return true;
fail:
    for (int i = 0; i < npk; i++)
        free(v[i]);
    free(v);
    return false;
}

/* If-Match: a strong ETag "N" (N >= 1), or "*". Returns 1 with *ver, 0 for "*", -1 bad. */
static int parse_if_match(const char *s, int64_t *ver)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n == 1 && s[0] == '*')
        return 0;
    if (n < 3 || s[0] != '"' || s[n - 1] != '"')
        return -1;
    char inner[24];
    if (n - 2 >= sizeof inner)
        return -1;
    memcpy(inner, s + 1, n - 2);
    inner[n - 2] = '\0';
    return tp_parse_int64(inner, 1, INT64_MAX, ver) ? 1 : -1;
}

static bool key_ok(const char *k)
{
    size_t n = strlen(k);
    if (n < 1 || n > 255)
        return false;
    for (; *k; k++)
        if ((unsigned char)*k < 0x20 || (unsigned char)*k > 0x7e)
            return false;
    return true;
}

static void sha256_hex(const tp_wb_request_t *req, char out[65])
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        abort();
    unsigned char md[32];
    unsigned mdlen = 0;
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    EVP_DigestUpdate(ctx, req->method, strlen(req->method));
    EVP_DigestUpdate(ctx, "\n", 1);
    EVP_DigestUpdate(ctx, req->path, strlen(req->path));
    EVP_DigestUpdate(ctx, "\n", 1);
    if (req->if_match) /* a retry repeats its If-Match; another version is another request */
        EVP_DigestUpdate(ctx, req->if_match, strlen(req->if_match));
    EVP_DigestUpdate(ctx, "\n", 1);
    if (req->body && req->body_len)
        EVP_DigestUpdate(ctx, req->body, req->body_len);
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    EVP_MD_CTX_free(ctx);
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* ---- prepare ---- */

/* Adds a primary key value (text) to an item being built: "col":"value". */
static void item_pk(tp_buf_t *items, const tp_wb_table_t *t, char **vals)
{
    for (int i = 0; i < t->npk; i++) {
        if (i)
            tp_buf_putc(items, ',');
        tp_buf_json_str(items, t->cols[t->pk[i]].name);
        tp_buf_putc(items, ':');
        tp_buf_json_str(items, vals[i]);
    }
}

/* Checks a URL key; on success appends its item fields to items. */
static bool url_key(const tp_wb_table_t *t, const char *seg, tp_buf_t *items, errs_t *e)
{
    char **vals;
    if (!tp_wb_split_pk(seg ? seg : "", t->npk, &vals)) {
        char m[160];
        snprintf(m, sizeof m, "must be %d value%s in key order, comma-separated, percent-encoded",
                 t->npk, t->npk > 1 ? "s" : "");
        add_err(e, "", t->npk == 1 ? t->cols[t->pk[0]].name : "pk", m);
        return false;
    }
    bool ok = true;
    for (int i = 0; i < t->npk; i++) {
        const tp_wb_col_t *c = &t->cols[t->pk[i]];
        const char *m =
            strlen(vals[i]) == 0 ? "is empty" : tp_wb_check_text(c->kind, c->max_chars, vals[i]);
        if (m) {
            add_err(e, "", c->name, m);
            ok = false;
        }
    }
    if (ok)
        item_pk(items, t, vals);
    for (int i = 0; i < t->npk; i++)
        free(vals[i]);
    free(vals);
    return ok;
}

/* A bulk PATCH item: {pk columns..., "changes": {...}, "if_match": N}. The item key
 * values are canonicalised into seen (one line per item) to refuse duplicates. */
static void check_bulk_item(const tp_wb_table_t *t, json_t *it, int idx, tp_buf_t *seen,
                            bool *missing_if_match, errs_t *e)
{
    char prefix[32];
    snprintf(prefix, sizeof prefix, "[%d].", idx);
    if (!json_is_object(it)) {
        char f[32];
        snprintf(f, sizeof f, "[%d]", idx);
        add_err(e, "", f, "must be an object {key columns..., \"changes\": {...}}");
        return;
    }
    const char *key;
    json_t *v;
    json_object_foreach(it, key, v)
    {
        int i = find_col(t, key);
        if (strcmp(key, "changes") == 0 || strcmp(key, "if_match") == 0 ||
            (i >= 0 && t->cols[i].pk_pos >= 0))
            continue;
        add_err(e, prefix, key,
                i >= 0 ? "only key columns, changes and if_match may appear in an item"
                       : "is not a key column of this table");
    }
    tp_buf_t canon = {0};
    for (int i = 0; i < t->npk; i++) {
        const tp_wb_col_t *c = &t->cols[t->pk[i]];
        json_t *kv = json_object_get(it, c->name);
        char text[64];
        const char *s = NULL;
        if (!kv || json_is_null(kv)) {
            add_err(e, prefix, c->name, "is required (the row's key)");
            continue;
        }
        if (json_is_integer(kv)) {
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(kv));
            s = text;
        } else if (json_is_string(kv)) {
            s = json_string_value(kv);
        }
        const char *m =
            s ? tp_wb_check_text(c->kind, c->max_chars, s) : "must be a string or integer";
        if (m) {
            add_err(e, prefix, c->name, m);
            continue;
        }
        /* canonical text, so that 7, "7" and "07" (or UUIDs in any case) are one row */
        int64_t iv;
        if ((c->kind == TP_WB_INT2 || c->kind == TP_WB_INT4 || c->kind == TP_WB_INT8) &&
            tp_parse_int64(s, INT64_MIN, INT64_MAX, &iv)) {
            snprintf(text, sizeof text, "%lld", (long long)iv);
            s = text;
        } else if (c->kind == TP_WB_UUID) {
            snprintf(text, sizeof text, "%s", s);
            for (char *q = text; *q; q++)
                *q = (char)tolower((unsigned char)*q);
            s = text;
        }
        tp_buf_json_str(&canon, s);
        tp_buf_putc(&canon, ',');
    }
    json_t *ch = json_object_get(it, "changes");
    if (!json_is_object(ch))
        add_err(e, prefix, "changes", "is required: an object of columns to change");
    else {
        char p2[48];
        snprintf(p2, sizeof p2, "[%d].changes.", idx);
        check_object(t, ch, false, p2, e);
    }
    json_t *im = json_object_get(it, "if_match");
    if (!im || json_is_null(im))
        *missing_if_match = *missing_if_match || t->if_match_required;
    else if (!json_is_integer(im) || json_integer_value(im) < 1)
        add_err(e, prefix, "if_match", "must be the row's version (a positive integer)");
    if (canon.len) {
        /* seen is "\n" entry "\n" entry "\n" ...: match whole entries only */
        if (seen->len == 0)
            tp_buf_putc(seen, '\n');
        tp_buf_putc(&canon, '\n');
        tp_buf_t needle = {0};
        tp_buf_putc(&needle, '\n');
        tp_buf_puts(&needle, canon.data);
        if (strstr(seen->data, needle.data)) {
            char f[32];
            snprintf(f, sizeof f, "[%d]", idx);
            add_err(e, "", f, "names the same row as an earlier item");
        }
        tp_buf_free(&needle);
        tp_buf_puts(seen, canon.data);
    }
    tp_buf_free(&canon);
}

static json_t *parse_body(const tp_wb_request_t *req, tp_wb_answer_t *ans)
{
    if (!req->body || req->body_len == 0) {
        problem(ans, 400, "malformed-json", "the request needs a JSON body", NULL);
        return NULL;
    }
    json_error_t jerr;
    json_t *j = json_loadb(req->body, req->body_len,
                           JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!j && (strstr(jerr.text, "too big integer") || strstr(jerr.text, "real number overflow"))) {
        /* valid JSON whose number no column type can hold */
        problem1(ans, 422, "invalid-value", "a number in the body is out of range", "body",
                 jerr.text);
    } else if (!j) {
        char d[300];
        snprintf(d, sizeof d, "the body is not valid JSON: %s at line %d column %d", jerr.text,
                 jerr.line, jerr.column);
        problem1(ans, 400, "malformed-json", d, "body", jerr.text);
    }
    return j;
}

static tp_wb_call_t *new_call(const tp_wb_table_t *t, const tp_wb_request_t *req)
{
    tp_wb_call_t *c = tp_xcalloc(1, sizeof *c);
    c->magic = TP_WB_CALL_MAGIC;
    c->table = t;
    c->op = req->op;
    c->sql = t->sql[req->op];
    c->nparams = TP_WB_NPARAMS;
    c->params = (const char *const *)c->values;
    c->values[0] = tp_xstrdup(req->actor);
    c->values[1] = req->request_id ? tp_xstrdup(req->request_id) : NULL;
    c->has_key = req->idem_key != NULL;
    c->values[2] = req->idem_key ? tp_xstrdup(req->idem_key) : NULL;
    char hash[65];
    sha256_hex(req, hash);
    c->values[3] = tp_xstrdup(hash);
    c->values[4] = tp_xasprintf("%lld", (long long)(req->key_ttl_s > 0 ? req->key_ttl_s : 1));
    c->values[5] = tp_xstrdup(req->method);
    c->values[6] = tp_xstrdup(req->path);
    return c;
}

void tp_wb_call_free(tp_wb_call_t *c)
{
    if (!c)
        return;
    if (c->magic != TP_WB_CALL_MAGIC)
        abort();
    for (int i = 0; i < TP_WB_NPARAMS; i++)
        free(c->values[i]);
    c->magic = 0;
    free(c);
}

bool tp_wb_prepare(const tp_wb_table_t *t, const tp_wb_request_t *req, tp_wb_call_t **out,
                   tp_wb_answer_t *ans)
{
    *out = NULL;
    memset(ans, 0, sizeof *ans);
    if (!t || t->magic != TP_WB_TABLE_MAGIC || req->op < 0 || req->op >= TP_WB_NOPS)
        abort();
    if (!req->actor || !*req->actor) {
        problem(ans, 400, "no-actor", "write-back needs an authenticated caller", NULL);
        return false;
    }
    if (req->idem_key && !key_ok(req->idem_key)) {
        problem1(ans, 400, "invalid-idempotency-key", "Idempotency-Key is malformed",
                 "Idempotency-Key", "must be 1 to 255 printable ASCII characters");
        return false;
    }
    bool bulk = req->op == TP_WB_UPDATE && req->pk == NULL;
    int64_t ver = 0;
    int im = -2; /* -2 absent, 0 "*", 1 version */
    if (req->if_match) {
        if (req->op == TP_WB_INSERT || bulk) {
            problem1(ans, 400, "invalid-if-match",
                     bulk ? "a bulk PATCH carries each row's version in its item's if_match"
                          : "If-Match has no meaning on POST",
                     "If-Match", "is not allowed here");
            return false;
        }
        im = parse_if_match(req->if_match, &ver);
        if (im < 0) {
            problem1(ans, 400, "invalid-if-match",
                     "If-Match must be one strong ETag as sent in ETag (e.g. \"3\") or *",
                     "If-Match", "is malformed");
            return false;
        }
    }
    if (!bulk && req->op != TP_WB_INSERT && t->if_match_required && im != 1) {
        problem1(ans, 428, "if-match-required",
                 "this table requires If-Match with the row's ETag on PATCH and DELETE", "If-Match",
                 im == 0 ? "must be the row's ETag, not *" : "is required");
        return false;
    }

    json_t *j = NULL;
    if (req->op != TP_WB_DELETE) {
        j = parse_body(req, ans);
        if (!j)
            return false;
    } else if (req->body_len > 0) {
        problem(ans, 400, "unexpected-body", "DELETE takes no body", NULL);
        return false;
    }

    errs_t e = {0};
    tp_buf_t items = {0};
    bool single = true;
    bool missing_if_match = false;
    const char *shape = NULL;
    if (req->op == TP_WB_INSERT) {
        if (json_is_object(j)) {
            check_object(t, j, true, "", &e);
            tp_buf_putc(&items, '[');
            tp_buf_append(&items, req->body, req->body_len);
            tp_buf_putc(&items, ']');
        } else if (json_is_array(j) && json_array_size(j) > 0 && json_array_size(j) <= MAX_ITEMS) {
            single = false;
            size_t i;
            json_t *row;
            json_array_foreach(j, i, row)
            {
                char prefix[32];
                snprintf(prefix, sizeof prefix, "[%zu].", i);
                if (!json_is_object(row)) {
                    char f[32];
                    snprintf(f, sizeof f, "[%zu]", i);
                    add_err(&e, "", f, "must be an object");
                } else {
                    check_object(t, row, true, prefix, &e);
                }
            }
            tp_buf_append(&items, req->body, req->body_len);
        } else {
            shape = "the body must be a JSON object or a non-empty array of at most 1000 objects";
        }
    } else if (bulk) {
        if (json_is_array(j) && json_array_size(j) > 0 && json_array_size(j) <= MAX_ITEMS) {
            single = false;
            tp_buf_t seen = {0};
            size_t i;
            json_t *it;
            json_array_foreach(j, i, it)
                check_bulk_item(t, it, (int)i, &seen, &missing_if_match, &e);
            tp_buf_free(&seen);
            tp_buf_append(&items, req->body, req->body_len);
        } else {
            shape = "a PATCH without a key in the URL takes a non-empty array (at most 1000) of "
                    "{key columns..., \"changes\": {...}, \"if_match\": version}";
        }
    } else {
        if (req->op == TP_WB_UPDATE && !json_is_object(j))
            shape = "the PATCH body must be a JSON object of columns to change";
        else {
            if (j)
                check_object(t, j, false, "", &e);
            tp_buf_puts(&items, "[{");
            bool ok = url_key(t, req->pk, &items, &e);
            if (ok && im == 1)
                tp_buf_printf(&items, ",\"if_match\":%lld", (long long)ver);
            if (ok && j) {
                tp_buf_puts(&items, ",\"changes\":");
                tp_buf_append(&items, req->body, req->body_len);
            }
            tp_buf_puts(&items, "}]");
        }
    }
    json_decref(j);
    if (shape) {
        problem(ans, 422, "invalid-body", shape, NULL);
        tp_buf_free(&items);
        return false;
    }
    if (e.n) {
        char d[96];
        snprintf(d, sizeof d, "%d invalid value%s; nothing was written%s", e.n, e.n > 1 ? "s" : "",
                 e.n > MAX_ERRORS ? " (first 50 listed)" : "");
        problem(ans, 422, "invalid-value", d, e.buf.data);
        tp_buf_free(&e.buf);
        tp_buf_free(&items);
        return false;
    }
    if (missing_if_match) {
        problem1(ans, 428, "if-match-required",
                 "this table requires each bulk item to carry if_match (the row's version)",
                 "if_match", "is required in every item");
        tp_buf_free(&items);
        return false;
    }
    tp_wb_call_t *c = new_call(t, req);
    c->values[7] = tp_buf_steal(&items);
    c->values[8] = tp_xstrdup(single ? "true" : "false");
    *out = c;
    return true;
}

/* ---- finish ---- */

static const tp_wb_cons_t *find_cons(const tp_wb_table_t *t, const char *name)
{
    for (int i = 0; name && i < t->ncons; i++)
        if (strcmp(t->cons[i].name, name) == 0)
            return &t->cons[i];
    return NULL;
}

static void unavailable(tp_wb_answer_t *ans, const tp_wb_call_t *call, const char *code,
                        const char *what)
{
    char d[400];
    snprintf(d, sizeof d, "%s; %s", what,
             call->has_key
                 ? "retry with the same Idempotency-Key: a write that did commit is answered "
                   "from its stored response, one that did not is made once"
                 : "the write may or may not have been committed: send an Idempotency-Key to "
                   "make retries safe");
    problem(ans, 503, code, d, NULL);
    ans->retry_after_s = 1;
}

/* Maps a Postgres error result; returns TP_WB_RESEND for the retryable races. */
static tp_wb_next_t map_error(tp_wb_call_t *call, const PGresult *res, tp_wb_answer_t *ans)
{
    const tp_wb_table_t *t = call->table;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *cname = PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME);
    const char *column = PQresultErrorField(res, PG_DIAG_COLUMN_NAME);
    const char *etable = PQresultErrorField(res, PG_DIAG_TABLE_NAME);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    if (!state)
        state = "XX000";
    const tp_wb_cons_t *cons = find_cons(t, cname);
    const char *cols = cons && cons->columns[0] ? cons->columns : (column ? column : "");
    char d[400];

    if (strcmp(state, "23505") == 0 && call->has_key && call->attempts < 2)
        return TP_WB_RESEND; /* maybe a concurrent request with the same key: replay it */
    if ((strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0) && call->attempts < 3)
        return TP_WB_RESEND;

    if (strcmp(state, "23505") == 0) {
        bool ours = cname && strcmp(cname, "idempotency_keys_pkey") == 0;
        snprintf(d, sizeof d, "%s",
                 ours ? "the Idempotency-Key is in use by a concurrent request"
                      : "a row with the same unique value already exists");
        snprintf(d + strlen(d), sizeof d - strlen(d), " (constraint %s)", cname ? cname : "?");
        problem1(ans, 409, ours ? "idempotency-key-in-use" : "unique-violation", d,
                 ours ? "Idempotency-Key" : (cols[0] ? cols : "row"),
                 ours ? "is in use" : "must be unique");
    } else if (strcmp(state, "23503") == 0) {
        bool referencing = etable && strcmp(etable, t->name) == 0;
        snprintf(d, sizeof d, "%s (constraint %s)",
                 referencing ? "the value refers to a row that does not exist"
                             : "the row is still referenced by another table",
                 cname ? cname : "?");
        problem1(ans, referencing ? 422 : 409, "foreign-key-violation", d, cols[0] ? cols : "row",
                 referencing ? "refers to a missing row" : "is still referenced");
    } else if (strcmp(state, "23502") == 0) {
        problem1(ans, 422, "not-null-violation", "a required value is missing",
                 column ? column : "row", "must not be null");
    } else if (strcmp(state, "23514") == 0) {
        snprintf(d, sizeof d, "a value fails the check constraint %s", cname ? cname : "?");
        problem1(ans, 422, "check-violation", d, cols[0] ? cols : (cname ? cname : "row"),
                 cname ? cname : "fails a check");
    } else if (strcmp(state, "23P01") == 0) {
        snprintf(d, sizeof d, "the row conflicts with another (constraint %s)",
                 cname ? cname : "?");
        problem1(ans, 409, "exclusion-violation", d, cols[0] ? cols : "row", "conflicts");
    } else if (strncmp(state, "22", 2) == 0) {
        snprintf(d, sizeof d, "Postgres rejected a value: %s", primary ? primary : state);
        problem1(ans, 422, "invalid-value", d, column ? column : "body",
                 primary ? primary : "is invalid");
    } else if (strncmp(state, "40", 2) == 0) {
        unavailable(ans, call, "write-conflict",
                    "the write collided with concurrent writes and was rolled back");
    } else if (strncmp(state, "08", 2) == 0 || strncmp(state, "53", 2) == 0 ||
               strncmp(state, "57", 2) == 0 || strcmp(state, "25006") == 0) {
        unavailable(ans, call, "postgres-unavailable", "Postgres could not complete the write");
    } else {
        const char *kv[] = {"table",      t->qualified,    "sqlstate",
                            state,        "error",         primary ? primary : "",
                            "request_id", call->values[1], NULL};
        tp_logkv(TP_LOG_ERROR, kv, "write-back statement failed");
        problem(ans, 500, "write-failed",
                "the write failed and nothing was written; see the server log for the request id",
                NULL);
    }
    return TP_WB_ANSWER;
}

tp_wb_next_t tp_wb_finish(tp_wb_call_t *call, const PGresult *res, const char *conn_err,
                          tp_wb_answer_t *ans)
{
    if (!call || call->magic != TP_WB_CALL_MAGIC)
        abort();
    call->attempts++;
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (res && st == PGRES_TUPLES_OK && PQntuples(res) == 1 && PQnfields(res) == 4) {
        memset(ans, 0, sizeof *ans);
        ans->status = atoi(PQgetvalue(res, 0, 0));
        ans->body = tp_xstrdup(PQgetvalue(res, 0, 1));
        ans->etag = PQgetisnull(res, 0, 2) ? NULL : tp_xstrdup(PQgetvalue(res, 0, 2));
        ans->replayed = PQgetvalue(res, 0, 3)[0] == 't';
        ans->content_type = ans->status < 300 ? "application/json" : "application/problem+json";
        return TP_WB_ANSWER;
    }
    if (res && st == PGRES_FATAL_ERROR && PQresultErrorField(res, PG_DIAG_SQLSTATE))
        return map_error(call, res, ans);
    if (res && st != PGRES_FATAL_ERROR) {
        const char *kv[] = {"table",      call->table->qualified, "status", PQresStatus(st),
                            "request_id", call->values[1],        NULL};
        tp_logkv(TP_LOG_ERROR, kv, "write-back statement returned an unexpected result");
        problem(ans, 500, "write-failed", "the write returned an unexpected result", NULL);
        return TP_WB_ANSWER;
    }
    (void)conn_err; /* its text may name hosts: it goes to the server's log, not the client */
    unavailable(ans, call, "postgres-unavailable",
                "the connection to Postgres failed before the outcome was known");
    return TP_WB_ANSWER;
}
