/* HTTP plumbing for tidepool-server handlers: the request context (request
 * id honoured from X-Request-Id or generated, timing, a reference on the
 * current definitions), the one reply path (status line, headers, metrics,
 * one JSON log line per request), RFC 9457 problem+json through one function,
 * a strict query-string parser (percent-decoding; NUL, bad escapes and invalid
 * UTF-8 are rejected naming the parameter), body reading with the configured
 * limit, and the mapping of Postgres failures to statuses (never a 500 for a
 * client's mistake; a dependency down is 503 with Retry-After). */
#include "server.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/keyvalq_struct.h>

#include "tidepool/log.h"

static const int status_codes[N_STATUS] = {200, 304, 400, 401, 403, 404, 405, 413, 415, 422, 429,
                                           431, 500, 501, 503, 201, 202, 409, 412, 428, 204,
                                           499, 502, 504, 0};

int status_index(int status)
{
    for (int i = 0; i < N_STATUS - 1; i++)
        if (status_codes[i] == status)
            return i;
    return N_STATUS - 1;
}

int status_code_at(int i)
{
    return status_codes[i];
}

static const double bucket_ms[N_BUCKETS] = {0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000};

double bucket_bound_ms(int i)
{
    return bucket_ms[i];
}

static _Thread_local uint64_t rng_state;

static uint64_t rng_next(void)
{
    if (rng_state == 0)
        rng_state = tp_random_u64() | 1;
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

static bool id_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 36)
        return false;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.'))
            return false;
    }
    return true;
}

rq_t *rq_new(worker_t *w, struct evhttp_request *req, int route, const char *route_name)
{
    rq_t *r = tp_xcalloc(1, sizeof *r);
    r->magic = RQ_MAGIC;
    r->w = w;
    r->req = req;
    r->route = route;
    r->route_name = route_name;
    r->t0_us = tp_now_us();
    r->ds_idx = -1;
    const char *id = evhttp_find_header(evhttp_request_get_input_headers(req), "X-Request-Id");
    if (id && id_ok(id))
        snprintf(r->id, sizeof r->id, "%s", id);
    else
        snprintf(r->id, sizeof r->id, "%016llx", (unsigned long long)rng_next());
    r->gen = gen_acquire();
    r->tables = tables_acquire();
    w->inflight++;
    return r;
}

static void rq_free(rq_t *r)
{
    if (r->gone_ev)
        event_free(r->gone_ev);
    for (size_t i = 0; i < r->nq; i++) {
        free(r->q[i].key);
        free(r->q[i].val);
    }
    free(r->q);
    free(r->key);
    free(r->sql);
    for (int i = 0; i < r->nvals; i++)
        free(r->vals[i]);
    free(r->vals);
    tp_auth_result_clear(&r->auth);
    gen_release(r->gen);
    tables_release(r->tables);
    r->magic = 0;
    free(r);
}

void rq_header(rq_t *r, const char *name, const char *value)
{
    evhttp_add_header(evhttp_request_get_output_headers(r->req), name, value);
}

const char *rq_in_header(rq_t *r, const char *name)
{
    return evhttp_find_header(evhttp_request_get_input_headers(r->req), name);
}

static const char *method_name(enum evhttp_cmd_type m)
{
    switch (m) {
    case EVHTTP_REQ_GET: return "GET";
    case EVHTTP_REQ_POST: return "POST";
    case EVHTTP_REQ_HEAD: return "HEAD";
    case EVHTTP_REQ_PUT: return "PUT";
    case EVHTTP_REQ_DELETE: return "DELETE";
    case EVHTTP_REQ_OPTIONS: return "OPTIONS";
    case EVHTTP_REQ_TRACE: return "TRACE";
    case EVHTTP_REQ_CONNECT: return "CONNECT";
    case EVHTTP_REQ_PATCH: return "PATCH";
    }
    return "OTHER";
}

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 409: return "Conflict";
    case 412: return "Precondition Failed";
    case 428: return "Precondition Required";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 401: return "Unauthorized";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    }
    return "Status";
}

static void rq_done(rq_t *r, int status, size_t len);

static void on_drained_conn_close(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    w->closing--;
}

void rq_reply(rq_t *r, int status, const char *ctype, const char *body, size_t len)
{
    if (r->magic != RQ_MAGIC)
        abort();
    worker_t *w = r->w;
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    if (atomic_load_explicit(&g_srv.draining, memory_order_relaxed) && evcon) {
        /* Draining: close after this reply, and count the connection until
         * evhttp has written it out and freed it. */
        rq_header(r, "Connection", "close");
        evhttp_connection_set_closecb(evcon, on_drained_conn_close, w);
        w->closing++;
    }
    struct evbuffer *buf = evbuffer_new();
    if (ctype)
        rq_header(r, "Content-Type", ctype);
    rq_header(r, "X-Request-Id", r->id);
    bool head = evhttp_request_get_command(r->req) == EVHTTP_REQ_HEAD;
    if (body && len && status != 304 && !head)
        evbuffer_add(buf, body, len);
    evhttp_send_reply(r->req, status, reason(status), buf);
    evbuffer_free(buf);
    rq_done(r, status, len);
}

void rq_stream_begin(rq_t *r, const char *ctype)
{
    if (r->magic != RQ_MAGIC)
        abort();
    rq_header(r, "Content-Type", ctype);
    rq_header(r, "X-Request-Id", r->id);
    evhttp_send_reply_start(r->req, 200, reason(200));
    rq_done(r, 200, 0);
}

/* The end of a request whose reply went out (or started): metrics, the log
 * line, and r freed. */
static void rq_done(rq_t *r, int status, size_t len)
{
    worker_t *w = r->w;
    int64_t us = tp_now_us() - r->t0_us;
    atomic_fetch_add_explicit(&w->m.req[r->route][status_index(status)], 1, memory_order_relaxed);
    for (int i = 0; i < N_BUCKETS; i++)
        if ((double)us <= bucket_ms[i] * 1000.0) {
            atomic_fetch_add_explicit(&w->m.lat_bucket[i], 1, memory_order_relaxed);
            break;
        }
    atomic_fetch_add_explicit(&w->m.lat_sum_us, (uint64_t)us, memory_order_relaxed);
    atomic_fetch_add_explicit(&w->m.lat_count, 1, memory_order_relaxed);
    if (tp_log_enabled(TP_LOG_INFO)) {
        char st[8], ms[32], bytes[32];
        snprintf(st, sizeof st, "%d", status);
        snprintf(ms, sizeof ms, "%.3f", (double)us / 1000.0);
        snprintf(bytes, sizeof bytes, "%zu", status == 304 ? (size_t)0 : len);
        const char *kv[] = {"request_id", r->id,
                            "method", method_name(evhttp_request_get_command(r->req)),
                            "route", r->route_name,
                            "status", st, "ms", ms, "bytes", bytes, NULL};
        tp_log_emit(TP_LOG_INFO, kv, "request");
    }
    w->inflight--;
    rq_free(r);
}

static void problem_body(tp_buf_t *b, int status, const char *code, const char *detail,
                         const char *field, const char *message)
{
    tp_buf_puts(b, "{\"type\":");
    char type[128];
    snprintf(type, sizeof type, "https://tidepool.dev/problems/%s", code);
    tp_buf_json_str(b, type);
    tp_buf_puts(b, ",\"title\":");
    tp_buf_json_str(b, reason(status));
    tp_buf_printf(b, ",\"status\":%d,\"detail\":", status);
    tp_buf_json_str(b, detail ? detail : reason(status));
    tp_buf_puts(b, ",\"code\":");
    tp_buf_json_str(b, code);
    if (field) {
        tp_buf_puts(b, ",\"errors\":[{\"field\":");
        tp_buf_json_str(b, field);
        tp_buf_puts(b, ",\"message\":");
        tp_buf_json_str(b, message ? message : "is invalid");
        tp_buf_puts(b, "}]");
    }
    tp_buf_puts(b, "}");
}

void rq_problem(rq_t *r, int status, const char *code, const char *detail, const char *field,
                const char *message, int retry_after_s)
{
    tp_buf_t b = {0};
    problem_body(&b, status, code, detail, field, message);
    if (retry_after_s > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_after_s);
        rq_header(r, "Retry-After", ra);
    }
    rq_header(r, "Cache-Control", "no-store");
    rq_reply(r, status, "application/problem+json", b.data, b.len);
    tp_buf_free(&b);
}

/* ---- authentication ---- */

bool rq_authenticate(rq_t *r)
{
    worker_limits_refresh(r->w);
    tp_auth_t *a = auth_acquire();
    tp_auth_request_t ar;
    memset(&ar, 0, sizeof ar);
    char *addr = NULL;
    ev_uint16_t port = 0;
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    if (evcon)
        evhttp_connection_get_peer(evcon, &addr, &port);
    ar.peer = addr;
    ar.now_s = tp_wall_ms() / 1000;
    struct evkeyvalq *in = evhttp_request_get_input_headers(r->req);
    for (struct evkeyval *kv = in->tqh_first; kv; kv = kv->next.tqe_next)
        tp_auth_request_header(&ar, kv->key, kv->value);
    const char *client = tp_auth_client_address(a, &ar);
    snprintf(r->client, sizeof r->client, "%s", client);
    bool limited = tp_auth_mode(a) != TP_AUTH_MODE_NONE;
    int64_t wait = limited ? tp_ratelimit_take(r->w->rl->addr, client, tp_now_ms()) : 0;
    bool ok = wait <= 0;
    if (!ok) {
        rq_problem(r, 429, TP_AUTH_CODE_RATE_LIMITED, "too many requests from this address",
                   NULL, NULL, (int)wait);
    } else if (!tp_auth_check(a, &ar, &r->auth)) {
        ok = false;
        tp_auth_log_refusal(&r->auth, client, r->id);
        if (r->auth.www_authenticate)
            rq_header(r, "WWW-Authenticate", r->auth.www_authenticate);
        rq_problem(r, r->auth.status, r->auth.code, r->auth.message, NULL, NULL, 0);
    } else if (limited && (wait = tp_ratelimit_take(r->w->rl->ident, r->auth.principal->id,
                                                    tp_now_ms())) > 0) {
        ok = false;
        rq_problem(r, 429, TP_AUTH_CODE_RATE_LIMITED, "too many requests for this identity",
                   NULL, NULL, (int)wait);
    }
    tp_auth_free(a); /* client points into ar, not into a */
    return ok;
}

bool rq_require(rq_t *r, const char *const *roles)
{
    size_t n = roles ? tp_auth_strv_len(roles) : 0;
    return rq_authorize(r, (char *const *)roles, n);
}

static const char **roles_list(char *const *roles, size_t n)
{
    const char **req = tp_xcalloc(n + 1, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        req[i] = roles[i];
    return req;
}

bool rq_allowed(rq_t *r, char *const *roles, size_t n)
{
    const char **req = roles_list(roles, n);
    bool ok = tp_auth_allowed(r->auth.principal, req);
    free(req);
    return ok;
}

bool rq_authorize(rq_t *r, char *const *roles, size_t n)
{
    const char **req = roles_list(roles, n);
    tp_auth_result_t denied;
    memset(&denied, 0, sizeof denied);
    bool ok = tp_auth_authorize(r->auth.principal, req, &denied);
    free(req);
    if (ok)
        return true;
    tp_auth_log_refusal(&denied, r->client[0] ? r->client : NULL, r->id);
    rq_problem(r, denied.status ? denied.status : 403, denied.code ? denied.code : TP_AUTH_CODE_FORBIDDEN,
               denied.message ? denied.message : "not allowed", NULL, NULL, 0);
    tp_auth_result_clear(&denied);
    return false;
}

/* ---- strict query-string parsing ---- */

bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        unsigned c = *p;
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            p++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if ((size_t)(end - p) <= k)
            return false;
        for (size_t i = 1; i <= k; i++) {
            if ((p[i] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        p += k + 1;
    }
    return true;
}

/* Percent-decodes s[0..n) ('+' is a space when plus). NULL with *why on a bad
 * escape, a NUL or invalid UTF-8. */
char *pct_decode(const char *s, size_t n, bool plus, const char **why)
{
    char *out = tp_xmalloc(n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '+' && plus) {
            c = ' ';
        } else if (c == '%') {
            if (i + 2 >= n) {
                free(out);
                *why = "has an incomplete percent-escape";
                return NULL;
            }
            int a = tp_hexval(s[i + 1]), b = tp_hexval(s[i + 2]);
            if (a < 0 || b < 0) {
                free(out);
                *why = "has an invalid percent-escape";
                return NULL;
            }
            c = (char)(a * 16 + b);
            i += 2;
        }
        if (c == '\0') {
            free(out);
            *why = "contains a NUL byte";
            return NULL;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    if (!utf8_valid(out, o)) {
        free(out);
        *why = "is not valid UTF-8";
        return NULL;
    }
    return out;
}

bool rq_parse_query(rq_t *r)
{
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r->req);
    const char *qs = u ? evhttp_uri_get_query(u) : NULL;
    if (!qs || !*qs)
        return true;
    const char *p = qs;
    while (*p) {
        const char *amp = strchr(p, '&');
        size_t len = amp ? (size_t)(amp - p) : strlen(p);
        if (len > 0) {
            const char *eq = memchr(p, '=', len);
            size_t klen = eq ? (size_t)(eq - p) : len;
            const char *why = NULL;
            char *k = pct_decode(p, klen, true, &why);
            if (!k) {
                char *raw = tp_xstrndup(p, klen > 64 ? 64 : klen);
                /* the raw name is ASCII-safe only if valid; name it escaped */
                char *field = utf8_valid(raw, strlen(raw)) && !strchr(raw, '%') ? raw : NULL;
                rq_problem(r, 400, "invalid-parameter", "a query parameter name could not be decoded",
                           field ? field : "(query)", why, 0);
                free(raw);
                return false;
            }
            char *v = eq ? pct_decode(eq + 1, len - klen - 1, true, &why) : tp_xstrdup("");
            if (!v) {
                tp_buf_t d = {0};
                tp_buf_printf(&d, "query parameter %s %s", k, why);
                rq_problem(r, 400, "invalid-parameter", d.data, k, why, 0);
                tp_buf_free(&d);
                free(k);
                return false;
            }
            r->q = tp_xrealloc(r->q, (r->nq + 1) * sizeof *r->q);
            r->q[r->nq].key = k;
            r->q[r->nq].val = v;
            r->q[r->nq].used = false;
            r->nq++;
        }
        if (!amp)
            break;
        p = amp + 1;
    }
    return true;
}

const char *rq_q(rq_t *r, const char *key)
{
    for (size_t i = 0; i < r->nq; i++)
        if (strcmp(r->q[i].key, key) == 0) {
            r->q[i].used = true;
            return r->q[i].val;
        }
    return NULL;
}

bool rq_body(rq_t *r, char **out, size_t *len)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(r->req);
    size_t n = evbuffer_get_length(in);
    if ((int64_t)n > g_srv.cfg.server.max_body_bytes) {
        char d[128];
        snprintf(d, sizeof d, "the request body is %zu bytes; the limit is %lld", n,
                 (long long)g_srv.cfg.server.max_body_bytes);
        rq_problem(r, 413, "body-too-large", d, "body", "is too large", 0);
        return false;
    }
    char *b = tp_xmalloc(n + 1);
    evbuffer_copyout(in, b, n);
    b[n] = '\0';
    *out = b;
    *len = n;
    return true;
}

void http_date(int64_t wall_ms, char *buf, size_t n)
{
    time_t t = (time_t)(wall_ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, n, "%a, %d %b %Y %H:%M:%S GMT", &tm);
}

static uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

uint64_t hash64(const void *data, size_t n)
{
    /* FNV-1a-style over 8-byte words in four independent lanes (the multiply
     * chains overlap in the CPU: every uncached read hashes its whole body
     * for the ETag), folded together, then a final mix. */
    const unsigned char *p = data;
    const uint64_t prime = 1099511628211ull;
    uint64_t l[4] = {1469598103934665603ull ^ n, 0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull,
                     0x94d049bb133111ebull};
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 4; k++) {
            uint64_t w;
            memcpy(&w, p + i + 8 * (size_t)k, 8);
            l[k] = (l[k] ^ w) * prime;
            l[k] ^= l[k] >> 29;
        }
    }
    uint64_t h = l[0] ^ rotl64(l[1], 17) ^ rotl64(l[2], 31) ^ rotl64(l[3], 47);
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * prime;
        h ^= h >> 29;
    }
    for (; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

void rq_pool_refused(rq_t *r, tp_pg_submit_t why)
{
    if (why == TP_PG_BUSY) {
        rq_problem(r, 503, "overloaded",
                   "every Postgres connection is busy and the wait queue is full", NULL, NULL, 1);
    } else {
        int64_t ms = tp_pgpool_retry_ms(r->w->pool);
        int s = (int)((ms + 999) / 1000);
        rq_problem(r, 503, "postgres-unavailable", "Postgres is not reachable right now", NULL,
                   NULL, s < 1 ? 1 : s);
    }
}

static void on_client_gone(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rq_t *r = arg;
    if (r->magic != RQ_MAGIC)
        abort();
    r->gone = true;
    const char *kv[] = {"request_id", r->id, NULL};
    tp_logkv(TP_LOG_INFO, kv, "client left before its answer; cancelling its query");
    r->on_gone(r);
}

void rq_watch_gone(rq_t *r, void (*fn)(rq_t *r))
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (r->gone_ev || fd < 0 || !(event_base_get_features(r->w->base) & EV_FEATURE_EARLY_CLOSE))
        return;
    r->on_gone = fn;
    r->gone_ev = event_new(r->w->base, fd, EV_CLOSED, on_client_gone, r);
    if (r->gone_ev)
        event_add(r->gone_ev, NULL);
}

void rq_pg_error(rq_t *r, PGresult *res, const char *err)
{
    if (r->gone) { /* nobody reads this; logged as such */
        rq_reply(r, 499, NULL, NULL, 0);
        return;
    }
    if (!res) {
        rq_problem(r, 503, "postgres-unavailable", "the Postgres connection was lost", NULL, NULL,
                   1);
        return;
    }
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (state && strncmp(state, "22", 2) == 0) {
        rq_problem(r, 422, "invalid-value", PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY),
                   NULL, NULL, 0);
        return;
    }
    if (state && (strncmp(state, "08", 2) == 0 || strncmp(state, "57", 2) == 0 ||
                  strncmp(state, "53", 2) == 0)) {
        rq_problem(r, 503, "postgres-unavailable", "Postgres is unavailable or shutting down",
                   NULL, NULL, 1);
        return;
    }
    const char *kv[] = {"request_id", r->id, "sqlstate", state, "error", err, NULL};
    if (state && strcmp(state, "42P01") == 0) {
        /* A table the dataset reads does not exist yet: its sync has not run. */
        tp_logkv(TP_LOG_WARN, kv, "query failed: relation missing (sync not run yet?)");
        rq_problem(r, 503, "data-unavailable",
                   "the data this reads has not been synced into Postgres yet", NULL, NULL, 30);
        return;
    }
    tp_logkv(TP_LOG_ERROR, kv, "query failed");
    rq_problem(r, 500, "query-failed", "the query failed; see the server log for the request id",
               NULL, NULL, 0);
}
