/* The emulator's HTTP face on one libevent evhttp listener: routing of the
 * Statement Execution API (execute, get, chunk, cancel, and the undocumented
 * DELETE close), the OAuth endpoints, the external-link downloads (served
 * under EMU_LINK_PREFIX, unauthenticated but keyed by a per-link header, like
 * presigned URLs) and /admin/faults. It validates execute requests with the
 * service's error bodies, checks bearer tokens, applies injected faults,
 * holds requests open without blocking (emu_defer_t: a statement wait or
 * injected latency, dropped if the client goes away) and writes one JSON log
 * line per request (never a token, secret or link). */
#include "emu.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "tidepool/log.h"

typedef enum route {
    R_NONE,
    R_EXECUTE,
    R_GET,
    R_CLOSE,
    R_CANCEL,
    R_CHUNK,
    R_TOKEN,
    R_DISCOVERY,
    R_LINK,
    R_ADMIN,
    R_LB_PROVISIONED, /* Lakebase credentials (emulator/lakebase.c) */
    R_LB_AUTOSCALING,
} route_t;

typedef struct reqinfo {
    route_t route;
    const char *cls;
    char id[64];
    char path[160]; /* for the log: never holds a link token */
    long chunk;
    bool chunk_ok;
    int64_t t0_us;
} reqinfo_t;

static const char *method_name(struct evhttp_request *req)
{
    switch (evhttp_request_get_command(req)) {
    case EVHTTP_REQ_GET: return "GET";
    case EVHTTP_REQ_POST: return "POST";
    case EVHTTP_REQ_DELETE: return "DELETE";
    case EVHTTP_REQ_PUT: return "PUT";
    case EVHTTP_REQ_HEAD: return "HEAD";
    case EVHTTP_REQ_PATCH: return "PATCH";
    default: return "OTHER";
    }
}

static void log_request(struct evhttp_request *req, const reqinfo_t *ri, int code)
{
    if (!tp_log_enabled(TP_LOG_INFO))
        return;
    char status[16], ms[32];
    snprintf(status, sizeof status, "%d", code);
    snprintf(ms, sizeof ms, "%.1f", (double)(tp_now_us() - ri->t0_us) / 1000.0);
    const char *kv[] = {"method", method_name(req), "path", ri->path, "status", status,
                        "statement_id", ri->id[0] ? ri->id : NULL, "ms", ms, NULL};
    tp_logkv(TP_LOG_INFO, kv, "request");
}

static void send_buf(struct evhttp_request *req, const reqinfo_t *ri, int code, const char *ctype,
                     const char *data, size_t len)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", ctype);
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, data, len);
    evhttp_send_reply(req, code, NULL, b);
    evbuffer_free(b);
    log_request(req, ri, code);
}

static void send_json(struct evhttp_request *req, const reqinfo_t *ri, int code, tp_buf_t *body)
{
    send_buf(req, ri, code, "application/json", body->data ? body->data : "", body->len);
}

/* Non-2xx body: {"error_code": "...", "message": "..."}. */
static void send_error(struct evhttp_request *req, const reqinfo_t *ri, int code,
                       const char *error_code, const char *fmt, ...) TP_PRINTF(5, 6);
static void send_error(struct evhttp_request *req, const reqinfo_t *ri, int code,
                       const char *error_code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tp_buf_t b;
    tp_buf_init(&b);
    tp_buf_printf(&b, "{\"error_code\":\"%s\",\"message\":", error_code);
    tp_buf_json_str(&b, msg);
    tp_buf_putc(&b, '}');
    send_json(req, ri, code, &b);
    tp_buf_free(&b);
}

static void send_xml_error(struct evhttp_request *req, const reqinfo_t *ri, int code,
                           const char *s3code, const char *msg)
{
    char *body = tp_xasprintf("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code>"
                              "<Message>%s</Message></Error>",
                              s3code, msg);
    send_buf(req, ri, code, "application/xml", body, strlen(body));
    free(body);
}

/* The Host header if it looks like a host[:port], else the listen address. */
static void request_host(struct evhttp_request *req, char *out, size_t outlen)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Host");
    bool ok = h && *h && strlen(h) < outlen;
    for (const char *p = h; ok && *p; p++)
        ok = isalnum((unsigned char)*p) || strchr(".-:[]_", *p);
    if (ok)
        snprintf(out, outlen, "%s", h);
    else if (strchr(g.listen_addr, ':')) /* IPv6 literal */
        snprintf(out, outlen, "[%s]:%d", g.listen_addr, g.listen_port);
    else
        snprintf(out, outlen, "%s:%d", g.listen_addr, g.listen_port);
}

static char *body_string(struct evhttp_request *req, size_t *len)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    *len = evbuffer_get_length(in);
    char *s = tp_xmalloc(*len + 1);
    evbuffer_copyout(in, s, *len);
    s[*len] = '\0';
    return s;
}

/* ---- held requests ---- */

static void dispatch(struct evhttp_request *req, int64_t t0_us, bool after_latency);

static void defer_unhook(emu_defer_t *d)
{
    if (d->evcon)
        evhttp_connection_set_closecb(d->evcon, NULL, NULL);
    d->evcon = NULL;
}

void emu_defer_free(emu_defer_t *d)
{
    if (d == NULL)
        return;
    if (d->timer)
        event_free(d->timer);
    d->magic = 0;
    free(d);
}

static void unlink_waiter(emu_defer_t *d)
{
    if (d->stmt == NULL)
        return;
    for (emu_defer_t **pp = &d->stmt->waiters; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    }
    d->next = NULL;
}

static void on_defer_close(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    emu_defer_t *d = arg;
    if (d == NULL || d->magic != EMU_DEFER_MAGIC)
        return;
    if (d->stmt)
        tp_info("client went away while waiting for statement %s", d->stmt->id);
    /* A request still queued on the connection is freed with it; one that
     * libevent detached (evcon NULL) is ours. */
    if (evhttp_request_get_connection(d->req) == NULL)
        evhttp_request_free(d->req);
    unlink_waiter(d);
    emu_defer_free(d);
}

/* Answers a StatementResponse for st (cls: "execute" or "get"); while the
 * bad_state fault lasts, a well-formed one in a state the protocol lacks. */
static void send_statement(struct evhttp_request *req, reqinfo_t *ri, emu_stmt_t *st,
                           const char *cls)
{
    tp_buf_t b;
    tp_buf_init(&b);
    if (emu_faults_take_count(&g.faults.bad_state, cls)) {
        tp_info("fault: answering state EXPLODING for statement %s", st->id);
        tp_buf_printf(&b, "{\"statement_id\":\"%s\",\"status\":{\"state\":\"EXPLODING\"}}", st->id);
    } else {
        char host[256];
        request_host(req, host, sizeof host);
        emu_stmt_response(st, host, &b);
    }
    send_json(req, ri, 200, &b);
    tp_buf_free(&b);
}

void emu_defer_answer(emu_defer_t *d)
{
    if (d->magic != EMU_DEFER_MAGIC)
        return;
    defer_unhook(d);
    reqinfo_t ri = {.route = R_EXECUTE, .t0_us = d->t0_us};
    snprintf(ri.id, sizeof ri.id, "%s", d->stmt->id);
    snprintf(ri.path, sizeof ri.path, "/api/2.0/sql/statements");
    send_statement(d->req, &ri, d->stmt, "execute");
    emu_defer_free(d);
}

static void on_wait_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    emu_defer_t *d = arg;
    if (d->magic != EMU_DEFER_MAGIC)
        return;
    unlink_waiter(d);
    if (d->cancel_on_timeout && !emu_state_terminal(emu_stmt_state(d->stmt)))
        emu_stmt_cancel(d->stmt, false);
    emu_defer_answer(d);
}

static void on_latency_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    emu_defer_t *d = arg;
    if (d->magic != EMU_DEFER_MAGIC)
        return;
    struct evhttp_request *req = d->req;
    int64_t t0 = d->t0_us;
    defer_unhook(d);
    emu_defer_free(d);
    dispatch(req, t0, true);
}

static emu_defer_t *defer_new(struct evhttp_request *req, int64_t t0_us, int64_t ms,
                              event_callback_fn cb)
{
    emu_defer_t *d = tp_xcalloc(1, sizeof *d);
    d->magic = EMU_DEFER_MAGIC;
    d->req = req;
    d->t0_us = t0_us;
    d->evcon = evhttp_request_get_connection(req);
    evhttp_connection_set_closecb(d->evcon, on_defer_close, d);
    d->timer = evtimer_new(g.base, cb, d);
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(d->timer, &tv);
    return d;
}

/* ---- body delivery with chunk faults ---- */

/* The half body is on the wire: close the connection (and free its request)
 * without finishing the reply. libevent does not touch evcon after this callback. */
static void on_dropped_flush(struct evhttp_connection *evcon, void *arg)
{
    (void)arg;
    evhttp_connection_set_closecb(evcon, NULL, NULL);
    evhttp_connection_free(evcon);
}

/* The client left before the half body was flushed: libevent detached the
 * unfinished request from the dying connection, so it is ours to free. */
static void on_dropped_close(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    struct evhttp_request *req = arg;
    if (evhttp_request_get_connection(req) == NULL)
        evhttp_request_free(req);
}

static void send_chunk_body(struct evhttp_request *req, const reqinfo_t *ri, const char *ctype,
                            const char *data, size_t len)
{
    if (len > 1 && emu_faults_take(&g.faults.drop_chunk)) {
        struct evkeyvalq *h = evhttp_request_get_output_headers(req);
        char cl[32];
        snprintf(cl, sizeof cl, "%zu", len);
        evhttp_add_header(h, "Content-Type", ctype);
        evhttp_add_header(h, "Content-Length", cl);
        evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_dropped_close, req);
        evhttp_send_reply_start(req, 200, "OK");
        struct evbuffer *b = evbuffer_new();
        evbuffer_add(b, data, len / 2);
        evhttp_send_reply_chunk_with_cb(req, b, on_dropped_flush, NULL);
        evbuffer_free(b);
        log_request(req, ri, 200);
        tp_info("fault: dropping the connection after %zu of %zu bytes", len / 2, len);
        return;
    }
    if (len > 1 && emu_faults_take(&g.faults.truncate_chunk)) {
        tp_info("fault: truncating a chunk to %zu of %zu bytes", len / 2, len);
        len /= 2;
    }
    send_buf(req, ri, 200, ctype, data, len);
}

/* ---- handlers ---- */

static bool json_opt_string(json_t *o, const char *key, const char **out, char *err, size_t n)
{
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_string(v)) {
        snprintf(err, n, "Field '%s' must be a string", key);
        return false;
    }
    *out = json_string_value(v);
    return true;
}

static bool json_opt_int(json_t *o, const char *key, int64_t *out, char *err, size_t n)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL || json_is_null(v))
        return true;
    int64_t x;
    if (json_is_integer(v))
        x = json_integer_value(v);
    else if (!json_is_string(v) || !tp_parse_int64(json_string_value(v), 0, INT64_MAX, &x))
        x = -1;
    if (x < 0) {
        snprintf(err, n, "Field '%s' must be a non-negative integer", key);
        return false;
    }
    *out = x;
    return true;
}

static bool parse_wait(const char *s, int *out)
{
    size_t n = strlen(s);
    if (n < 2 || n > 6 || s[n - 1] != 's')
        return false;
    int v = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v != 0 && (v < 5 || v > 50))
        return false;
    *out = v;
    return true;
}

static bool valid_param_name(const char *s)
{
    if (!(isalpha((unsigned char)*s) || *s == '_'))
        return false;
    for (; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '_'))
            return false;
    return true;
}

static bool known_warehouse(const char *id)
{
    for (int i = 0; i < g.nwarehouses; i++)
        if (strcmp(g.warehouses[i], id) == 0)
            return true;
    return false;
}

/* Validates the parameters array into params (borrowed strings). */
static bool parse_params(json_t *arr, emu_param_t **out, int *nout, char *err, size_t n)
{
    *out = NULL;
    *nout = 0;
    if (arr == NULL || json_is_null(arr))
        return true;
    if (!json_is_array(arr)) {
        snprintf(err, n, "Field 'parameters' must be an array");
        return false;
    }
    size_t count = json_array_size(arr);
    if (count > 4096) {
        snprintf(err, n, "Too many parameters (%zu)", count);
        return false;
    }
    emu_param_t *p = tp_xcalloc(count + 1, sizeof *p);
    for (size_t i = 0; i < count; i++) {
        json_t *e = json_array_get(arr, i);
        if (!json_is_object(e)) {
            snprintf(err, n, "parameters[%zu] must be an object", i);
            goto fail;
        }
        json_t *name = json_object_get(e, "name");
        if (!json_is_string(name) || !valid_param_name(json_string_value(name))) {
            snprintf(err, n, "parameters[%zu].name must be a parameter name", i);
            goto fail;
        }
        p[i].name = json_string_value(name);
        for (size_t k = 0; k < i; k++) {
            if (strcmp(p[k].name, p[i].name) == 0) {
                snprintf(err, n, "Parameter '%s' is given more than once", p[i].name);
                goto fail;
            }
        }
        json_t *val = json_object_get(e, "value");
        if (val && !json_is_null(val) && !json_is_string(val)) {
            snprintf(err, n, "Parameter '%s': value must be a string or null", p[i].name);
            goto fail;
        }
        p[i].value = json_is_string(val) ? json_string_value(val) : NULL;
        json_t *type = json_object_get(e, "type");
        if (type && !json_is_null(type)) {
            char pg[64];
            if (!json_is_string(type) || !emu_param_pgtype(json_string_value(type), pg, sizeof pg)) {
                snprintf(err, n, "Parameter '%s': unsupported type %s", p[i].name,
                         json_is_string(type) ? json_string_value(type) : "(not a string)");
                goto fail;
            }
            p[i].type = json_string_value(type);
        }
    }
    *out = p;
    *nout = (int)count;
    return true;
fail:
    free(p);
    return false;
}

static void handle_execute(struct evhttp_request *req, reqinfo_t *ri)
{
    size_t blen;
    char *body = body_string(req, &blen);
    json_error_t jerr;
    json_t *root = json_loadb(body, blen, 0, &jerr);
    free(body);
    char err[512];
    emu_param_t *params = NULL;
    int nparams = 0;
    if (root == NULL) {
        send_error(req, ri, 400, "MALFORMED_REQUEST",
                   "Invalid JSON given in the body of the request: %s (line %d, column %d)",
                   jerr.text, jerr.line, jerr.column);
        return;
    }
    if (!json_is_object(root)) {
        send_error(req, ri, 400, "MALFORMED_REQUEST", "The request body must be a JSON object");
        goto out;
    }
    const char *wh, *sql, *catalog, *schema, *wait_s, *owt, *disp_s, *fmt_s;
    if (!json_opt_string(root, "warehouse_id", &wh, err, sizeof err) ||
        !json_opt_string(root, "statement", &sql, err, sizeof err) ||
        !json_opt_string(root, "catalog", &catalog, err, sizeof err) ||
        !json_opt_string(root, "schema", &schema, err, sizeof err) ||
        !json_opt_string(root, "wait_timeout", &wait_s, err, sizeof err) ||
        !json_opt_string(root, "on_wait_timeout", &owt, err, sizeof err) ||
        !json_opt_string(root, "disposition", &disp_s, err, sizeof err) ||
        !json_opt_string(root, "format", &fmt_s, err, sizeof err)) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE", "%s", err);
        goto out;
    }
    if (wh == NULL || *wh == '\0') {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE", "Missing required field: warehouse_id");
        goto out;
    }
    if (sql == NULL || *sql == '\0') {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE", "Missing required field: statement");
        goto out;
    }
    if (strlen(sql) > EMU_MAX_STATEMENT) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "statement is longer than the 16 MiB limit");
        goto out;
    }
    if (!known_warehouse(wh)) {
        send_error(req, ri, 404, "RESOURCE_DOES_NOT_EXIST", "Warehouse %.100s does not exist.", wh);
        goto out;
    }
    int wait = 10;
    if (wait_s && !parse_wait(wait_s, &wait)) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "wait_timeout must be 0s or between 5s and 50s, got '%.40s'", wait_s);
        goto out;
    }
    bool cancel_on_timeout = false;
    if (owt && strcmp(owt, "CANCEL") == 0) {
        cancel_on_timeout = true;
    } else if (owt && strcmp(owt, "CONTINUE") != 0) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "on_wait_timeout must be CONTINUE or CANCEL, got '%.40s'", owt);
        goto out;
    }
    emu_disp_t disp = EMU_INLINE;
    if (disp_s && strcmp(disp_s, "EXTERNAL_LINKS") == 0) {
        disp = EMU_LINKS;
    } else if (disp_s && strcmp(disp_s, "INLINE") != 0) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "disposition must be INLINE or EXTERNAL_LINKS, got '%.40s'", disp_s);
        goto out;
    }
    emu_format_t fmt = EMU_FMT_JSON;
    if (fmt_s && strcmp(fmt_s, "CSV") == 0) {
        fmt = EMU_FMT_CSV;
    } else if (fmt_s && strcmp(fmt_s, "ARROW_STREAM") == 0) {
        fmt = EMU_FMT_ARROW;
    } else if (fmt_s && strcmp(fmt_s, "JSON_ARRAY") != 0) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "format must be JSON_ARRAY, ARROW_STREAM or CSV, got '%.40s'", fmt_s);
        goto out;
    }
    if (disp == EMU_INLINE && fmt != EMU_FMT_JSON) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "The %s format is not supported with the INLINE disposition; use "
                   "EXTERNAL_LINKS",
                   fmt == EMU_FMT_CSV ? "CSV" : "ARROW_STREAM");
        goto out;
    }
    if (fmt == EMU_FMT_ARROW) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "ARROW_STREAM is not supported by this emulator (tidepool-warehouse); "
                   "use JSON_ARRAY or CSV");
        goto out;
    }
    int64_t row_limit = -1, byte_limit = -1;
    if (!json_opt_int(root, "row_limit", &row_limit, err, sizeof err) ||
        !json_opt_int(root, "byte_limit", &byte_limit, err, sizeof err) ||
        !parse_params(json_object_get(root, "parameters"), &params, &nparams, err, sizeof err)) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE", "%s", err);
        goto out;
    }
    if (g.live_workers >= EMU_MAX_WORKERS) {
        send_error(req, ri, 503, "TEMPORARILY_UNAVAILABLE",
                   "Too many statements are running (%d); try again later", g.live_workers);
        goto out;
    }
    (void)catalog; /* one catalog: the database behind --dsn */
    int *order = tp_xcalloc((size_t)nparams + 1, sizeof *order);
    int norder = 0;
    char *unbound = NULL;
    char *pgsql = emu_bridge_sql(sql, params, nparams, order, &norder, &unbound);
    char **values = tp_xcalloc((size_t)norder + 1, sizeof *values);
    for (int k = 0; k < norder; k++)
        values[k] = params[order[k]].value ? tp_xstrdup(params[order[k]].value) : NULL;
    free(order);
    emu_stmt_t *st = emu_stmt_start(pgsql, values, norder, schema, unbound, fmt, disp, row_limit,
                                    byte_limit);
    snprintf(ri->id, sizeof ri->id, "%s", st->id);
    if (wait > 0 && !emu_state_terminal(emu_stmt_state(st))) {
        emu_defer_t *d = defer_new(req, ri->t0_us, (int64_t)wait * 1000, on_wait_timeout);
        d->stmt = st;
        d->cancel_on_timeout = cancel_on_timeout;
        d->next = st->waiters;
        st->waiters = d;
        goto out;
    }
    send_statement(req, ri, st, "execute");
out:
    free(params);
    json_decref(root);
}

static emu_stmt_t *find_or_404(struct evhttp_request *req, reqinfo_t *ri)
{
    emu_stmt_t *st = emu_stmt_find(ri->id);
    if (st == NULL)
        send_error(req, ri, 404, "RESOURCE_DOES_NOT_EXIST",
                   "Statement %.64s does not exist or has expired.", ri->id);
    return st;
}

static void handle_statement(struct evhttp_request *req, reqinfo_t *ri)
{
    emu_stmt_t *st = find_or_404(req, ri);
    if (st == NULL)
        return;
    if (ri->route == R_GET) {
        send_statement(req, ri, st, "get");
        return;
    }
    emu_stmt_cancel(st, ri->route == R_CLOSE);
    tp_buf_t b;
    tp_buf_init(&b);
    tp_buf_puts(&b, "{}");
    send_json(req, ri, 200, &b);
    tp_buf_free(&b);
}

static void handle_chunk(struct evhttp_request *req, reqinfo_t *ri)
{
    emu_stmt_t *st = find_or_404(req, ri);
    if (st == NULL)
        return;
    emu_state_t s = emu_stmt_state(st);
    if (s != EMU_SUCCEEDED) {
        send_error(req, ri, 400, "INVALID_STATE",
                   "Statement %s is %s; results are only available for SUCCEEDED statements.",
                   st->id, emu_state_name(s));
        return;
    }
    if (!ri->chunk_ok || ri->chunk < 0 || ri->chunk >= st->nchunks) {
        send_error(req, ri, 400, "INVALID_PARAMETER_VALUE",
                   "chunk_index must be between 0 and %d for statement %s", st->nchunks - 1,
                   st->id);
        return;
    }
    char host[256];
    request_host(req, host, sizeof host);
    tp_buf_t b;
    tp_buf_init(&b);
    emu_stmt_chunk_json(st, (int)ri->chunk, host, &b);
    if (st->disp == EMU_INLINE)
        send_chunk_body(req, ri, "application/json", b.data, b.len);
    else
        send_json(req, ri, 200, &b);
    tp_buf_free(&b);
}

static void handle_link(struct evhttp_request *req, reqinfo_t *ri, const char *token)
{
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    if (evhttp_find_header(in, "Authorization")) {
        send_xml_error(req, ri, 400, "InvalidArgument",
                       "Only one auth mechanism allowed; only the X-Amz-Algorithm query "
                       "parameter, Signature query string parameter or the Authorization "
                       "header should be specified");
        return;
    }
    emu_stmt_t *st = emu_stmt_find(ri->id);
    emu_link_t *l = NULL;
    for (emu_link_t *x = st ? st->links : NULL; x; x = x->next)
        if (tp_consttime_eq(x->token, strlen(x->token), token, strlen(token)))
            l = x;
    if (l == NULL) {
        send_xml_error(req, ri, 403, "AccessDenied", "Access Denied");
        return;
    }
    const char *key = evhttp_find_header(in, EMU_LINK_HEADER);
    if (key == NULL || !tp_consttime_eq(key, strlen(key), l->key, strlen(l->key))) {
        send_xml_error(req, ri, 403, "AccessDenied",
                       "The request signature does not match: a required header is missing "
                       "or wrong");
        return;
    }
    if (tp_wall_ms() >= l->expires_wall_ms) {
        send_xml_error(req, ri, 403, "AccessDenied", "Request has expired");
        return;
    }
    if (emu_stmt_state(st) != EMU_SUCCEEDED || l->chunk >= st->nchunks) {
        send_xml_error(req, ri, 404, "NoSuchKey", "The specified key does not exist.");
        return;
    }
    const emu_chunk_t *c = &st->chunks[l->chunk];
    send_chunk_body(req, ri, st->format == EMU_FMT_CSV ? "text/csv" : "application/json",
                    c->data, c->len);
}

static void handle_admin(struct evhttp_request *req, reqinfo_t *ri)
{
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    tp_buf_t b;
    tp_buf_init(&b);
    if (cmd == EVHTTP_REQ_POST) {
        size_t blen;
        char *body = body_string(req, &blen);
        json_t *root = json_loadb(body, blen, 0, NULL);
        free(body);
        json_t *spec = root ? json_object_get(root, "spec") : NULL;
        emu_faults_t f;
        char err[256] = "body must be {\"spec\": \"...\"}";
        if (!json_is_string(spec) || !emu_faults_parse(json_string_value(spec), &f, err,
                                                       sizeof err)) {
            json_decref(root);
            send_error(req, ri, 400, "INVALID_PARAMETER_VALUE", "%s", err);
            tp_buf_free(&b);
            return;
        }
        tp_info("faults set: %s", json_string_value(spec));
        json_decref(root);
        g.faults = f;
    } else if (cmd == EVHTTP_REQ_DELETE) {
        char err[8];
        if (!emu_faults_parse(NULL, &g.faults, err, sizeof err))
            abort();
        tp_info("faults cleared");
    }
    emu_faults_describe(&g.faults, &b);
    send_json(req, ri, 200, &b);
    tp_buf_free(&b);
}

/* ---- routing ---- */

static bool seg_ok(const char *s, size_t n)
{
    if (n == 0 || n >= 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '-' || s[i] == '_'))
            return false;
    return true;
}

/* Classifies the path; fills ri (id, chunk, class, loggable path) and *token for links. */
static void route_request(struct evhttp_request *req, reqinfo_t *ri, char *token, size_t toklen)
{
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const char *p = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    char path[512];
    snprintf(path, sizeof path, "%s", p ? p : "/");
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        path[--n] = '\0';
    ri->route = R_NONE;
    ri->cls = "any";
    snprintf(ri->path, sizeof ri->path, "%.150s", path);
    static const char api[] = "/api/2.0/sql/statements";
    if (strcmp(path, api) == 0) {
        if (cmd == EVHTTP_REQ_POST)
            ri->route = R_EXECUTE, ri->cls = "execute";
        return;
    }
    if (strncmp(path, api, sizeof api - 1) == 0 && path[sizeof api - 1] == '/') {
        const char *id = path + sizeof api;
        const char *slash = strchr(id, '/');
        size_t idlen = slash ? (size_t)(slash - id) : strlen(id);
        if (!seg_ok(id, idlen))
            return;
        snprintf(ri->id, sizeof ri->id, "%.*s", (int)idlen, id);
        if (slash == NULL) {
            if (cmd == EVHTTP_REQ_GET)
                ri->route = R_GET, ri->cls = "get";
            else if (cmd == EVHTTP_REQ_DELETE)
                ri->route = R_CLOSE, ri->cls = "close";
        } else if (strcmp(slash, "/cancel") == 0 && cmd == EVHTTP_REQ_POST) {
            ri->route = R_CANCEL, ri->cls = "cancel";
        } else if (strncmp(slash, "/result/chunks/", 15) == 0 && cmd == EVHTTP_REQ_GET) {
            ri->route = R_CHUNK, ri->cls = "chunk";
            int64_t v;
            ri->chunk_ok = tp_parse_int64(slash + 15, 0, 1 << 30, &v);
            ri->chunk = ri->chunk_ok ? (long)v : -1;
        }
        if (ri->route == R_NONE)
            ri->id[0] = '\0';
        return;
    }
    if (strcmp(path, "/oidc/v1/token") == 0 && cmd == EVHTTP_REQ_POST) {
        ri->route = R_TOKEN, ri->cls = "token";
    } else if (strcmp(path, "/oidc/.well-known/oauth-authorization-server") == 0 &&
               cmd == EVHTTP_REQ_GET) {
        ri->route = R_DISCOVERY, ri->cls = "token";
    } else if (strcmp(path, "/api/2.0/database/credentials") == 0 && cmd == EVHTTP_REQ_POST) {
        ri->route = R_LB_PROVISIONED, ri->cls = "lakebase";
    } else if (strcmp(path, "/api/2.0/postgres/credentials") == 0 && cmd == EVHTTP_REQ_POST) {
        ri->route = R_LB_AUTOSCALING, ri->cls = "lakebase";
    } else if (strcmp(path, "/admin/faults") == 0 &&
               (cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_POST || cmd == EVHTTP_REQ_DELETE)) {
        ri->route = R_ADMIN, ri->cls = "admin";
    } else if (strncmp(path, EMU_LINK_PREFIX, strlen(EMU_LINK_PREFIX)) == 0 &&
               cmd == EVHTTP_REQ_GET) {
        const char *id = path + strlen(EMU_LINK_PREFIX);
        const char *slash = strchr(id, '/');
        if (slash == NULL || !seg_ok(id, (size_t)(slash - id)) ||
            !seg_ok(slash + 1, strlen(slash + 1)) || strlen(slash + 1) >= toklen)
            return;
        snprintf(ri->id, sizeof ri->id, "%.*s", (int)(slash - id), id);
        snprintf(token, toklen, "%s", slash + 1);
        snprintf(ri->path, sizeof ri->path, "%s%s/(redacted)", EMU_LINK_PREFIX, ri->id);
        ri->route = R_LINK, ri->cls = "link";
    } else if (strncmp(path, EMU_LINK_PREFIX, strlen(EMU_LINK_PREFIX)) == 0) {
        snprintf(ri->path, sizeof ri->path, "%s(redacted)", EMU_LINK_PREFIX);
    }
}

static bool check_auth(struct evhttp_request *req, reqinfo_t *ri)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (h == NULL || strncasecmp(h, "Bearer ", 7) != 0 || h[7] == '\0') {
        send_buf(req, ri, 401, "application/json",
                 "{\"error_code\":401,\"message\":\"Credential was not sent or was of an "
                 "unsupported type for this API.\"}",
                 strlen("{\"error_code\":401,\"message\":\"Credential was not sent or was of an "
                        "unsupported type for this API.\"}"));
        return false;
    }
    const char *tok = h + 7;
    while (*tok == ' ')
        tok++;
    if (!emu_auth_valid(tok)) {
        static const char body[] = "{\"error_code\":403,\"message\":\"Invalid access token.\"}";
        send_buf(req, ri, 403, "application/json", body, sizeof body - 1);
        return false;
    }
    return true;
}

static void send_injected_status(struct evhttp_request *req, reqinfo_t *ri, int code)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    int ra = g.faults.retry_after;
    if (code == 429 && ra == 0)
        ra = 1;
    if (ra > 0 && (code == 429 || code == 503)) {
        char v[16];
        snprintf(v, sizeof v, "%d", ra);
        evhttp_add_header(h, "Retry-After", v);
    }
    tp_info("fault: answering %d", code);
    if (ri->route == R_LINK) {
        send_xml_error(req, ri, code, code == 503 ? "SlowDown" : "InternalError",
                       "injected fault");
        return;
    }
    if (ri->route == R_TOKEN) {
        char body[160];
        snprintf(body, sizeof body,
                 "{\"error\":\"%s\",\"error_description\":\"injected fault (HTTP %d)\"}",
                 code == 503 || code == 429 ? "temporarily_unavailable" : "server_error", code);
        send_buf(req, ri, code, "application/json", body, strlen(body));
        return;
    }
    const char *ec = code == 429   ? "REQUEST_LIMIT_EXCEEDED"
                     : code == 503 ? "TEMPORARILY_UNAVAILABLE"
                     : code == 504 ? "DEADLINE_EXCEEDED"
                                   : "INTERNAL_ERROR";
    send_error(req, ri, code, ec, "injected fault (HTTP %d)", code);
}

static void dispatch(struct evhttp_request *req, int64_t t0_us, bool after_latency)
{
    reqinfo_t ri = {.t0_us = t0_us};
    char token[80] = "";
    route_request(req, &ri, token, sizeof token);
    if (ri.route == R_NONE) {
        send_error(req, &ri, 404, "ENDPOINT_NOT_FOUND", "No API found for '%s %.150s'",
                   method_name(req), ri.path);
        return;
    }
    if (ri.route != R_ADMIN) {
        int lat = after_latency ? 0 : emu_faults_latency(ri.cls);
        if (lat > 0) {
            defer_new(req, t0_us, lat, on_latency_done);
            return;
        }
        int code = emu_faults_take_status(ri.cls);
        if (code == 0 && ri.route == R_TOKEN && emu_faults_take(&g.faults.token_fail))
            code = g.faults.token_fail_code;
        if (code) {
            send_injected_status(req, &ri, code);
            return;
        }
        if (emu_faults_take_count(&g.faults.proxy_page, ri.cls)) {
            static const char page[] = "<html><head><title>502 Bad Gateway</title></head>"
                                       "<body><center><h1>502 Bad Gateway</h1></center>"
                                       "</body></html>\n";
            tp_info("fault: answering a proxy's HTML 502 page");
            send_buf(req, &ri, 502, "text/html", page, sizeof page - 1);
            return;
        }
        if (emu_faults_take_count(&g.faults.bad_json, ri.cls)) {
            static const char cut[] = "{\"statement_id\":\"01f0-cut\",\"status\":{\"sta";
            tp_info("fault: answering cut-off JSON");
            send_buf(req, &ri, 200, "application/json", cut, sizeof cut - 1);
            return;
        }
    }
    char host[256];
    tp_buf_t b;
    switch (ri.route) {
    case R_LINK: handle_link(req, &ri, token); return;
    case R_TOKEN: {
        int code = 500;
        tp_buf_init(&b);
        emu_oauth_token(req, &b, &code);
        send_json(req, &ri, code, &b);
        tp_buf_free(&b);
        return;
    }
    case R_DISCOVERY:
        request_host(req, host, sizeof host);
        tp_buf_init(&b);
        emu_oauth_discovery(req, host, &b);
        send_json(req, &ri, 200, &b);
        tp_buf_free(&b);
        return;
    default: break;
    }
    if (!check_auth(req, &ri))
        return;
    switch (ri.route) {
    case R_EXECUTE: handle_execute(req, &ri); break;
    case R_GET:
    case R_CLOSE:
    case R_CANCEL: handle_statement(req, &ri); break;
    case R_CHUNK: handle_chunk(req, &ri); break;
    case R_ADMIN: handle_admin(req, &ri); break;
    case R_LB_PROVISIONED:
    case R_LB_AUTOSCALING: {
        size_t len;
        char *body = body_string(req, &len);
        int code = 500;
        tp_buf_init(&b);
        emu_lakebase_credentials(body, len, ri.route == R_LB_AUTOSCALING, &b, &code);
        send_json(req, &ri, code, &b);
        if (b.data)
            explicit_bzero(b.data, b.len);
        tp_buf_free(&b);
        free(body);
        break;
    }
    default: break;
    }
}

/* Responses go out as headers then body; without TCP_NODELAY, Nagle plus the
 * client's delayed ACK hold every chunk on a kept-alive connection ~40 ms. */
static void set_nodelay(struct evhttp_request *req)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(req);
    struct bufferevent *bev = conn ? evhttp_connection_get_bufferevent(conn) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    int one = 1;
    if (fd >= 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void on_request(struct evhttp_request *req, void *arg)
{
    (void)arg;
    set_nodelay(req);
    if (g.stopping) {
        evhttp_send_error(req, 503, "shutting down");
        return;
    }
    dispatch(req, tp_now_us(), false);
}

bool emu_http_start(void)
{
    g.http = evhttp_new(g.base);
    if (g.http == NULL)
        return false;
    evhttp_set_max_body_size(g.http, (ev_ssize_t)EMU_MAX_STATEMENT + (1 << 20));
    evhttp_set_max_headers_size(g.http, 64 * 1024);
    evhttp_set_timeout(g.http, 120);
    evhttp_set_allowed_methods(g.http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_DELETE |
                                           EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(g.http, on_request, NULL);
    if (evhttp_bind_socket_with_handle(g.http, g.listen_addr, (uint16_t)g.listen_port) == NULL) {
        tp_error("cannot listen on %s:%d", g.listen_addr, g.listen_port);
        return false;
    }
    return true;
}

void emu_http_stop(void)
{
    if (g.http)
        evhttp_free(g.http);
    g.http = NULL;
}
