/* Dataset reads answered by the warehouse (DESIGN §9, docs/fallback.md): the
 * HTTP side of lib/fallback.c.
 *
 * fb_dataset takes a validated dataset request, reads the worker's sync_state
 * view and asks tp_fb_route where it goes; Postgres reads go back to
 * dataset_postgres untouched. A warehouse read starts, joins or answers from
 * the result cache, and waits up to its budget (Prefer: wait=N, default
 * warehouse.wait, capped by warehouse.max_wait): 200 with the rows in the
 * usual shapes, else 202 with Location and Retry-After; always with
 * X-Tidepool-Source and X-Tidepool-Route-Reason. A waiting client that
 * disconnects detaches. GET /api/v1/statements/{id} polls, DELETE cancels.
 * Handles belong to the authenticated principal (plus, for @obo, a digest of
 * the forwarded token), so one user never polls another's statement. */
#include "server.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <event2/bufferevent.h>
#include <event2/http.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "tidepool/fallback.h"
#include "tidepool/log.h"
#include "tidepool/wh.h"
#include "tidepool/wh_settings.h"

#define FBREQ_MAGIC 0x46425251u
#define POLL_RETRY_S 1

typedef struct fbw {
    tp_wh_t *wh;
    tp_fb_loop_t *lp;
} fbw_t;

struct fbreq {
    uint32_t magic;
    rq_t *r;
    tp_defs_value_t *pv; /* per ds->params, for @covers */
    char **vals;         /* bind text per ds->params; NULL = SQL NULL */
    size_t n;
    tp_fb_route_t route;
    bool routed;
    tp_fb_waiter_t *waiter;
    struct evhttp_connection *watched; /* close callback set on it */
    struct event *closed_ev;           /* EV_CLOSED on its socket: the client left */
    char owner[128];                   /* of the handle being waited on */
    bool is_poll;                      /* GET /statements/{id}, not a dataset read */
};

static tp_fb_t *g_fb;
static fbw_t *g_fbw; /* one per worker, by w->id */
static const char *g_disabled_why;

/* ---- set-up ---- */

static const char *nonempty(const char *s)
{
    return s && *s ? s : NULL;
}

/* Default and cap of a read's wait budget: reloadable, read by every worker. */
static _Atomic int64_t g_wait_ms, g_max_wait_ms;

/* The registry settings of c. */
static tp_fb_config_t fb_config_of(const tp_config_t *c)
{
    return (tp_fb_config_t){
        .max_in_flight = c->warehouse.max_in_flight,
        .result_cache_bytes = c->warehouse.result_cache_bytes,
        .max_result_bytes = c->warehouse.max_result_bytes,
        .result_ttl_ms = c->warehouse.result_ttl_ms,
        .abandon_ms = c->warehouse.abandon_ms,
        .timeout_ms = c->warehouse.timeout_ms,
        .catalog = c->warehouse.catalog,
        .schema = c->warehouse.schema,
        .submit_wait_s = 5,
    };
}

void fb_global_init(void)
{
    const tp_config_t *c = &g_srv.cfg;
    tp_fb_config_t fc = fb_config_of(c);
    g_fb = tp_fb_new(&fc);
    atomic_store(&g_wait_ms, c->warehouse.wait_ms);
    atomic_store(&g_max_wait_ms, c->warehouse.max_wait_ms);
    g_fbw = tp_xcalloc((size_t)g_srv.nthreads, sizeof *g_fbw);
    if (!nonempty(c->warehouse.host) || !nonempty(c->warehouse.warehouse_id))
        g_disabled_why = "the warehouse is not configured (warehouse.host, warehouse.warehouse_id)";
}

void fb_reconfigure(const tp_config_t *c)
{
    if (g_fb == NULL)
        return;
    tp_fb_config_t fc = fb_config_of(c);
    tp_fb_configure(g_fb, &fc);
    atomic_store(&g_wait_ms, c->warehouse.wait_ms);
    atomic_store(&g_max_wait_ms, c->warehouse.max_wait_ms);
}

void fb_global_free(void)
{
    tp_fb_free(g_fb);
    free(g_fbw);
    g_fb = NULL;
    g_fbw = NULL;
}

void fb_worker_init(worker_t *w)
{
    if (g_disabled_why)
        return;
    const tp_config_t *c = &g_srv.cfg;
    tp_wh_config_t wc;
    tp_wh_config_init(&wc);
    tp_wh_config_from_settings(&wc, c);
    /* Fast first polls: a quick statement is answered a few ms after it ends
     * (the submission itself does not wait, so that a cancel is sent at once). */
    wc.poll_initial_ms = 2;
    wc.poll_max_ms = 2000;
    char *err = NULL;
    fbw_t *fw = &g_fbw[w->id];
    fw->wh = tp_wh_new(w->base, &wc, &err);
    if (!fw->wh) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_WARN, kv, "warehouse client not available; fallback reads answer 503");
        free(err);
        return;
    }
    fw->lp = tp_fb_loop_new(g_fb, w->base, fw->wh);
}

void fb_worker_free(worker_t *w)
{
    if (!g_fbw)
        return;
    fbw_t *fw = &g_fbw[w->id];
    tp_fb_loop_free(fw->lp);
    tp_wh_free(fw->wh);
    fw->lp = NULL;
    fw->wh = NULL;
}

/* ---- request state ---- */

static struct fbreq *fbreq_new(rq_t *r)
{
    struct fbreq *q = tp_xcalloc(1, sizeof *q);
    q->magic = FBREQ_MAGIC;
    q->r = r;
    r->fbr = q;
    return q;
}

/* Forgets the request's fallback state (before its one reply). */
static void fbreq_free(rq_t *r)
{
    struct fbreq *q = r->fbr;
    if (!q)
        return;
    if (q->watched && evhttp_request_get_connection(r->req) == q->watched)
        evhttp_connection_set_closecb(q->watched, NULL, NULL);
    if (q->closed_ev)
        event_free(q->closed_ev);
    for (size_t i = 0; i < q->n; i++)
        free(q->vals[i]);
    free(q->vals);
    free(q->pv);
    q->magic = 0;
    free(q);
    r->fbr = NULL;
}

/* Who owns a handle: the authenticated principal's id, plus, with a token, a
 * digest of it (handles and @obo cache entries are per token holder). */
static void owner_of(rq_t *r, const char *token, char *out, size_t n)
{
    const tp_principal_t *p = r->auth.principal;
    const char *principal = p && p->id ? p->id : "anonymous";
    if (!token) {
        snprintf(out, n, "%s", principal);
        return;
    }
    unsigned char md[32];
    unsigned int len = 0;
    if (EVP_Digest(token, strlen(token), md, &len, EVP_sha256(), NULL) != 1)
        abort();
    int k = snprintf(out, n, "%s|obo:", principal);
    for (unsigned i = 0; i < 8 && k > 0 && (size_t)k + 2 < n; i++)
        k += snprintf(out + k, n - (size_t)k, "%02x", md[i]);
}

/* The caller's forwarded access token: the one auth took from a trusted proxy
 * (in every mode; the header from any other peer is ignored); NULL when absent. */
static const char *access_token(rq_t *r)
{
    const tp_principal_t *p = r->auth.principal;
    return p && p->access_token && *p->access_token ? p->access_token : NULL;
}

/* The wait budget: Prefer: wait=N (RFC 7240) capped by warehouse.max_wait;
 * respond-async alone means 0; else dflt. */
static int64_t wait_budget(rq_t *r, int64_t dflt)
{
    const char *p = rq_in_header(r, "Prefer");
    int64_t ms = dflt;
    bool given = false;
    for (const char *s = p; s && (s = strcasestr(s, "wait")) != NULL; s += 4) {
        if (s != p && s[-1] != ' ' && s[-1] != ',' && s[-1] != ';')
            continue;
        const char *v = s + 4;
        while (*v == ' ')
            v++;
        if (*v != '=')
            continue;
        v++;
        while (*v == ' ')
            v++;
        char *end;
        long long secs = strtoll(v, &end, 10);
        if (end != v && secs >= 0 && secs < 86400) {
            ms = secs * 1000;
            given = true;
        }
        break;
    }
    if (!given && p && strcasestr(p, "respond-async"))
        ms = 0; /* asks for a 202 at once unless a wait is given */
    int64_t cap = atomic_load(&g_max_wait_ms);
    return ms > cap ? cap : ms;
}

/* ---- replies ---- */

static void common_headers(rq_t *r, const char *id)
{
    struct fbreq *q = r->fbr;
    if (q && q->routed)
        rq_header(r, "X-Tidepool-Route-Reason", tp_fb_reason_name(q->route.reason));
    if (id && *id)
        rq_header(r, "X-Tidepool-Statement-Id", id);
}

static void reply_result(rq_t *r, tp_fb_outcome_t *o)
{
    tp_fb_shape_t shape = r->fmt == FMT_CSV ? TP_FB_CSV : r->fmt == FMT_COLUMNS ? TP_FB_COLUMNS
                                                                               : TP_FB_ROWS;
    tp_buf_t b = {0};
    tp_fb_result_encode(o->result, shape, &b);
    common_headers(r, o->id);
    fbreq_free(r);
    send_body(r, b.data ? b.data : "", b.len, fmt_ctype(r->fmt), o->from_cache ? "cache" : "warehouse");
    tp_buf_free(&b);
}

static void reply_problem(rq_t *r, const tp_fb_problem_t *p, const char *id)
{
    common_headers(r, id);
    rq_header(r, "X-Tidepool-Source", "warehouse");
    tp_buf_t d = {0};
    tp_buf_puts(&d, p->detail ? p->detail : "the warehouse read failed");
    if (id && *id)
        tp_buf_printf(&d, " (statement %s", id);
    if (p->warehouse_statement_id) {
        tp_buf_printf(&d, "%swarehouse statement %s", id && *id ? ", " : " (",
                      p->warehouse_statement_id);
        rq_header(r, "X-Tidepool-Warehouse-Statement-Id", p->warehouse_statement_id);
    }
    if ((id && *id) || p->warehouse_statement_id)
        tp_buf_putc(&d, ')');
    fbreq_free(r);
    rq_problem(r, p->status, p->code, d.data, NULL, NULL, p->retry_after_s);
    tp_buf_free(&d);
}

static void reply_accepted(rq_t *r, const tp_fb_outcome_t *o)
{
    char loc[80], ra[16];
    snprintf(loc, sizeof loc, "/api/v1/statements/%s", o->id);
    snprintf(ra, sizeof ra, "%d", POLL_RETRY_S);
    common_headers(r, o->id);
    rq_header(r, "X-Tidepool-Source", "warehouse");
    rq_header(r, "Location", loc);
    rq_header(r, "Retry-After", ra);
    rq_header(r, "Cache-Control", "no-store");
    tp_buf_t b = {0};
    tp_buf_printf(&b, "{\"statement_id\":\"%s\",\"state\":\"RUNNING\",\"elapsed_ms\":%lld,"
                      "\"location\":\"%s\"}",
                  o->id, (long long)o->elapsed_ms, loc);
    fbreq_free(r);
    rq_reply(r, 202, "application/json", b.data, b.len);
    tp_buf_free(&b);
}

/* Answers r from a finished or still-running outcome (o is cleared). */
static void reply_outcome(rq_t *r, tp_fb_outcome_t *o)
{
    switch (o->state) {
    case TP_FB_READY:
        reply_result(r, o);
        break;
    case TP_FB_PENDING:
        reply_accepted(r, o);
        break;
    case TP_FB_NOT_FOUND: {
        tp_fb_problem_t p = {.status = 404, .code = "unknown-statement",
                             .detail = "no such statement (it never existed, expired, was "
                                       "cancelled, or belongs to someone else)"};
        reply_problem(r, &p, NULL);
        break;
    }
    default:
        reply_problem(r, &o->problem, o->id);
        break;
    }
    tp_fb_outcome_clear(o);
}

/* ---- waiting ---- */

/* The waiting client went away: stop waiting (which cancels a statement
 * nobody else wants) and end the request. */
static void client_gone(struct fbreq *q)
{
    if (q->magic != FBREQ_MAGIC)
        abort();
    rq_t *r = q->r;
    tp_fb_waiter_detach(q->waiter);
    q->waiter = NULL;
    const char *kv[] = {"request_id", r->id, NULL};
    tp_logkv(TP_LOG_INFO, kv, "client left while waiting for the warehouse");
    fbreq_free(r);
    /* Without a connection, replying only frees the request; with one (the
     * socket saw the peer's FIN first) the write fails and evhttp closes it. */
    rq_reply(r, 499, NULL, NULL, 0);
}

static void on_client_close(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    struct fbreq *q = arg;
    q->watched = NULL;
    client_gone(q);
}

/* evhttp 2.1 does not read a connection while its request is pending, so a
 * client leaving is only seen through EV_CLOSED (EPOLLRDHUP) on its socket. */
static void on_socket_closed(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    client_gone(arg);
}

static void on_wait(tp_fb_outcome_t *o, void *arg)
{
    struct fbreq *q = arg;
    if (q->magic != FBREQ_MAGIC)
        abort();
    q->waiter = NULL;
    rq_t *r = q->r;
    if (o->state == TP_FB_PENDING && !q->is_poll && evhttp_request_get_connection(r->req) == NULL) {
        /* Nobody will read the 202: drop the handle (and maybe the statement). */
        fbw_t *fw = &g_fbw[r->w->id];
        if (fw->lp && !tp_fb_delete(fw->lp, o->id, q->owner))
            tp_debug("statement handle already gone");
    }
    reply_outcome(r, o);
}

/* Waits (WAITING) or answers now. */
static void wait_or_reply(rq_t *r, tp_fb_state_t st, tp_fb_outcome_t *o, tp_fb_waiter_t *w)
{
    struct fbreq *q = r->fbr;
    if (st != TP_FB_WAITING) {
        reply_outcome(r, o);
        return;
    }
    tp_fb_outcome_clear(o);
    q->waiter = w;
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    if (evcon) {
        q->watched = evcon;
        evhttp_connection_set_closecb(evcon, on_client_close, q);
        struct bufferevent *bev = evhttp_connection_get_bufferevent(evcon);
        evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
        if (fd >= 0 && (event_base_get_features(r->w->base) & EV_FEATURE_EARLY_CLOSE)) {
            q->closed_ev = event_new(r->w->base, fd, EV_CLOSED, on_socket_closed, q);
            if (q->closed_ev)
                event_add(q->closed_ev, NULL);
        }
    }
}

/* ---- dataset reads ---- */

static void fb_run(rq_t *r)
{
    struct fbreq *q = r->fbr;
    fbw_t *fw = &g_fbw[r->w->id];
    const char *token = r->ds->obo ? access_token(r) : NULL;
    owner_of(r, token, q->owner, sizeof q->owner);
    tp_fb_request_t req = {
        .ds = r->ds,
        .values = (const char *const *)q->vals,
        .owner = q->owner,
        .bearer_token = token,
        .bypass_cache = r->bypass,
        .wait_ms = wait_budget(r, atomic_load(&g_wait_ms)),
        .on_wait = on_wait,
        .arg = q,
    };
    tp_fb_outcome_t o;
    tp_fb_waiter_t *w = NULL;
    tp_fb_state_t st = tp_fb_start(fw->lp, &req, &o, &w);
    if (st == TP_FB_FAILED && o.problem.status == 401)
        rq_header(r, "WWW-Authenticate", "Bearer");
    wait_or_reply(r, st, &o, w);
}

static void fb_decide(rq_t *r)
{
    struct fbreq *q = r->fbr;
    worker_t *w = r->w;
    const tp_defs_dataset_t *ds = r->ds;
    tp_fb_job_fact_t facts[ds->n_requires ? ds->n_requires : 1];
    for (size_t i = 0; i < ds->n_requires; i++) {
        int idx = r->gen->job_idx[r->ds_idx][i];
        const jobstate_t *j = idx >= 0 ? &w->jobs[idx] : NULL;
        facts[i].known = j && j->known;
        facts[i].last_success_ms = j && j->known ? j->last_success_ms : 0;
    }
    tp_fb_route_in_t in = {
        .ds = ds,
        .values = q->pv,
        .jobs = w->ss_ok ? facts : NULL,
        .postgres_down = !w->ss_ok && w->ss_fetched_ms > 0,
        .source = rq_q(r, "source"),
        .now_ms = tp_wall_ms(),
    };
    q->route = tp_fb_route(&in);
    q->routed = true;
    if (q->route.source == TP_FB_SRC_POSTGRES) {
        fbreq_free(r);
        dataset_postgres(r);
        return;
    }
    if (!g_fbw[w->id].lp) {
        /* No warehouse in this deployment (501), or its client failed to start (503). */
        tp_fb_problem_t p = {.status = g_disabled_why ? 501 : 503,
                             .code = g_disabled_why ? "warehouse-not-configured"
                                                    : "warehouse-unavailable",
                             .retry_after_s = g_disabled_why ? 0 : 30,
                             .detail = (char *)(g_disabled_why ? g_disabled_why
                                                               : "the warehouse client could not "
                                                                 "be set up (see the server log)")};
        reply_problem(r, &p, NULL);
        return;
    }
    if (q->route.source == TP_FB_SRC_NONE) {
        char d[300];
        snprintf(d, sizeof d, "dataset %s cannot be read from %s: %s", ds->name,
                 ds->has_pg ? "the warehouse" : "postgres",
                 ds->has_pg ? "it has no NAME.warehouse.sql twin" : "it is warehouse-only");
        fbreq_free(r);
        rq_problem(r, 400, "source-unavailable", d, "source", "this source cannot answer", 0);
        return;
    }
    if (tp_log_enabled(TP_LOG_DEBUG)) {
        const char *kv[] = {"request_id", r->id, "dataset", ds->name, "reason",
                            tp_fb_reason_name(q->route.reason), NULL};
        tp_logkv(TP_LOG_DEBUG, kv, "fallback to the warehouse: %s", q->route.detail);
    }
    fb_run(r);
}

bool fb_dataset(rq_t *r, const tp_defs_value_t *values, const char *const *raw)
{
    const tp_defs_dataset_t *ds = r->ds;
    const char *src = rq_q(r, "source");
    bool asks_wh = src && strcmp(src, "warehouse") == 0;
    if (ds->has_pg && ds->has_wh ? src && !asks_wh : !ds->has_wh && !asks_wh)
        return false; /* Postgres only, or the client asked for it */
    struct fbreq *q = fbreq_new(r);
    q->n = ds->n_params;
    q->pv = tp_xcalloc(q->n ? q->n : 1, sizeof *q->pv);
    q->vals = tp_xcalloc(q->n ? q->n : 1, sizeof(char *));
    for (size_t i = 0; i < q->n; i++) {
        q->pv[i] = values[i];
        q->vals[i] = values[i].is_null
                         ? NULL
                         : tp_xstrdup(tp_defs_value_text(&values[i], raw[i] ? raw[i] : ""));
    }
    if (ds->has_pg)
        syncstate_then(r, fb_decide);
    else
        fb_decide(r);
    return true;
}

/* ---- statements ---- */

bool fb_statement_path(const char *path, const char **id)
{
    static const char prefix[] = "/api/v1/statements/";
    if (strncmp(path, prefix, sizeof prefix - 1) != 0 || strchr(path + sizeof prefix - 1, '/'))
        return false;
    *id = path + sizeof prefix - 1;
    return true;
}

static bool id_valid(const char *id)
{
    if (strlen(id) != 32)
        return false;
    for (const char *p = id; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return false;
    return true;
}

void h_statement(rq_t *r, const char *id)
{
    fbw_t *fw = g_fbw ? &g_fbw[r->w->id] : NULL;
    tp_fb_outcome_t o = {.state = TP_FB_NOT_FOUND};
    if (!fw || !fw->lp || !id_valid(id)) {
        reply_outcome(r, &o);
        return;
    }
    const char *token = access_token(r);
    char plain[128], obo[128];
    owner_of(r, NULL, plain, sizeof plain);
    owner_of(r, token, obo, sizeof obo);
    if (evhttp_request_get_command(r->req) == EVHTTP_REQ_DELETE) {
        if (tp_fb_delete(fw->lp, id, plain) || (token && tp_fb_delete(fw->lp, id, obo))) {
            rq_header(r, "X-Tidepool-Statement-Id", id);
            rq_reply(r, 204, NULL, NULL, 0);
        } else {
            reply_outcome(r, &o);
        }
        return;
    }
    struct fbreq *q = fbreq_new(r);
    q->is_poll = true;
    int64_t budget = wait_budget(r, 0);
    tp_fb_waiter_t *w = NULL;
    snprintf(q->owner, sizeof q->owner, "%s", plain);
    tp_fb_state_t st = tp_fb_poll(fw->lp, id, plain, budget, on_wait, q, &o, &w);
    if (st == TP_FB_NOT_FOUND && token) {
        snprintf(q->owner, sizeof q->owner, "%s", obo);
        st = tp_fb_poll(fw->lp, id, obo, budget, on_wait, q, &o, &w);
    }
    wait_or_reply(r, st, &o, w);
}

void fb_metrics(tp_buf_t *b)
{
    if (!g_fb)
        return;
    tp_fb_stats_t st;
    tp_fb_stats(g_fb, &st);
    static const struct {
        const char *name, *type, *help;
        size_t off;
        bool gauge_i64;
    } m[] = {
        {"tidepool_fallback_statements_total", "counter", "warehouse statements started",
         offsetof(tp_fb_stats_t, submitted), false},
        {"tidepool_fallback_joined_total", "counter", "reads that shared a running statement",
         offsetof(tp_fb_stats_t, joined), false},
        {"tidepool_fallback_cache_hits_total", "counter", "reads answered by the result cache",
         offsetof(tp_fb_stats_t, cache_hits), false},
        {"tidepool_fallback_busy_total", "counter", "reads refused by warehouse.max_in_flight",
         offsetof(tp_fb_stats_t, busy), false},
        {"tidepool_fallback_cancelled_total", "counter",
         "statements cancelled (abandoned, client gone, deleted)",
         offsetof(tp_fb_stats_t, cancelled), false},
        {"tidepool_fallback_succeeded_total", "counter", "statements that succeeded",
         offsetof(tp_fb_stats_t, succeeded), false},
        {"tidepool_fallback_failed_total", "counter", "statements that failed",
         offsetof(tp_fb_stats_t, failed), false},
        {"tidepool_fallback_in_flight", "gauge", "statements running at the warehouse",
         offsetof(tp_fb_stats_t, in_flight), true},
        {"tidepool_fallback_cache_bytes", "gauge", "bytes held by the result cache",
         offsetof(tp_fb_stats_t, cache_bytes), true},
        {"tidepool_fallback_handles", "gauge", "statement handles held",
         offsetof(tp_fb_stats_t, handles), true},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        const char *p = (const char *)&st + m[i].off;
        long long v = m[i].gauge_i64 ? (long long)*(const int64_t *)p
                                     : (long long)*(const uint64_t *)p;
        tp_buf_printf(b, "# HELP %s %s.\n# TYPE %s %s\n%s %lld\n", m[i].name, m[i].help,
                      m[i].name, m[i].type, m[i].name, v);
    }
}

static json_t *problem_ref(const char *description)
{
    return json_pack("{s:s,s:{s:{s:{s:s}}}}", "description", description, "content",
                     "application/problem+json", "schema", "$ref", "#/components/schemas/Problem");
}

static json_t *accepted_response(void)
{
    return json_pack("{s:s,s:{s:{s:{s:s}},s:{s:{s:s}}},s:{s:{s:{s:s,s:{s:{s:s},s:{s:s},"
                     "s:{s:s},s:{s:s}}}}}}",
                     "description", "still running: poll Location", "headers", "Location",
                     "schema", "type", "string", "Retry-After", "schema", "type", "integer",
                     "content", "application/json", "schema", "type", "object", "properties",
                     "statement_id", "type", "string", "state", "type", "string", "elapsed_ms",
                     "type", "integer", "location", "type", "string");
}

void fb_openapi(json_t *paths, const tp_defs_set_t *set)
{
    json_t *prefer = json_pack("{s:s,s:s,s:s,s:{s:s}}", "name", "Prefer", "in", "header",
                               "description", "wait=N: seconds to wait for the result before 202 "
                                              "(capped by warehouse.max_wait); respond-async",
                               "schema", "type", "string");
    json_t *id = json_pack("{s:s,s:s,s:b,s:{s:s,s:s}}", "name", "id", "in", "path", "required", 1,
                           "schema", "type", "string", "pattern", "^[0-9a-f]{32}$");
    json_t *get = json_pack("{s:s,s:[O,O],s:{s:{s:s,s:{s:{},s:{}}},s:o,s:o,s:o,s:o,s:o,s:o}}",
                            "summary", "poll a warehouse statement that answered 202",
                            "parameters", id, prefer, "responses", "200", "description",
                            "the result: rows, columns or CSV", "content", "application/json",
                            "text/csv", "202", accepted_response(), "404",
                            problem_ref("unknown, expired, cancelled or someone else's"), "413",
                            problem_ref("result too large"), "422",
                            problem_ref("the warehouse rejected a parameter"), "502",
                            problem_ref("the warehouse failed"), "503",
                            problem_ref("the warehouse is unavailable or rate-limiting"));
    json_t *del = json_pack("{s:s,s:[O],s:{s:{s:s},s:o}}", "summary",
                            "forget a statement handle and cancel its statement if nobody else "
                            "waits for it",
                            "parameters", id, "responses", "204", "description", "deleted", "404",
                            problem_ref("unknown statement"));
    json_object_set_new(paths, "/api/v1/statements/{id}", json_pack("{s:o,s:o}", "get", get,
                                                                     "delete", del));
    for (size_t i = 0; i < set->n_datasets; i++) {
        const tp_defs_dataset_t *ds = &set->datasets[i];
        if (!ds->has_wh)
            continue;
        char *path = tp_xasprintf("/api/v1/datasets/%s", ds->name);
        json_t *item = json_object_get(paths, path);
        free(path);
        const char *methods[] = {"get", "post"};
        for (size_t m = 0; item && m < 2; m++) {
            json_t *op = json_object_get(item, methods[m]);
            json_t *resp = json_object_get(op, "responses");
            if (!resp)
                continue;
            json_array_append(json_object_get(op, "parameters"), prefer);
            json_object_set_new(resp, "202", accepted_response());
            json_object_set_new(resp, "429", problem_ref("too many warehouse statements in flight"));
            json_object_set_new(resp, "502", problem_ref("the warehouse failed"));
            json_object_set_new(resp, "504", problem_ref("the warehouse timed out"));
            if (ds->obo)
                json_object_set_new(resp, "401", problem_ref("X-Forwarded-Access-Token missing"));
        }
    }
    json_decref(prefer);
    json_decref(id);
}
