/* Write-back over HTTP (DESIGN §10, docs/writeback.md): POST /api/v1/tables/{t}
 * (one row or an array), PATCH /api/v1/tables/{t}/{pk}, bulk PATCH
 * /api/v1/tables/{t} and DELETE /api/v1/tables/{t}/{pk}.
 *
 * Owns: the snapshot of writable tables (tp_wb_reflect on the status thread at
 * start and after SIGHUP; a failed reflection keeps the previous snapshot and is
 * retried), the write handlers (auth, role check against the table's roles=,
 * Content-Type, tp_wb_prepare, one statement through the worker's async pool,
 * tp_wb_finish with TP_WB_RESEND handled by sending the same call again), the
 * periodic purge of expired idempotency keys (TP_WB_PURGE_SQL, worker 0's loop
 * only), the outbox backlog snapshot for /metrics (status thread) and the
 * writable tables' part of /api/v1/openapi.json. The actor written to audit_log
 * and used for owner= row scoping is the principal's id. */
#include "server.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <event2/http.h>
#include <jansson.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"
#include "tidepool/writeback.h"

#define WCTX_MAGIC 0x57435458u /* "WCTX" */
#define PURGE_BATCH "1000"

static pthread_mutex_t wb_mu = PTHREAD_MUTEX_INITIALIZER;
static tp_wb_schema_t *wb_snap; /* guarded by wb_mu */
static atomic_bool wb_dirty = true;
/* backlog snapshot for /metrics, refreshed by the status thread */
static char *wb_backlog_text; /* Prometheus lines, guarded by wb_mu */
static tp_pgpool_t **wpools;  /* per worker when read_dsn differs from dsn */
static struct event *purge_ev;

typedef struct wctx {
    uint32_t magic;
    rq_t *r;
    tp_wb_schema_t *snap;
    tp_wb_call_t *call;
} wctx_t;

static tp_wb_schema_t *snap_acquire(void)
{
    pthread_mutex_lock(&wb_mu);
    tp_wb_schema_t *s = wb_snap ? tp_wb_schema_ref(wb_snap) : NULL;
    pthread_mutex_unlock(&wb_mu);
    return s;
}

static int64_t env_or(const char *name, int64_t dflt)
{
    const char *v = getenv(name);
    int64_t out;
    return v && *v && tp_parse_int64(v, 1, INT64_MAX, &out) ? out : dflt;
}

/* ---- status thread: reflection and backlog ---- */

void writes_reload(void)
{
    atomic_store(&wb_dirty, true);
}

static void reflect(PGconn *c)
{
    char err[512];
    tp_wb_schema_t *s = tp_wb_reflect(c, err, sizeof err);
    if (!s) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_WARN, kv, "reflecting writable tables failed; keeping the previous ones");
        return;
    }
    /* Nothing writable while migrations are not current (or not recorded: applied
     * by hand): maybe the tables are not there yet, so look again next pass. */
    if (tp_wb_count(s) > 0 || atomic_load(&g_srv.migrations_ok))
        atomic_store(&wb_dirty, false);
    pthread_mutex_lock(&wb_mu);
    tp_wb_schema_t *old = wb_snap;
    wb_snap = s;
    pthread_mutex_unlock(&wb_mu);
    tp_wb_schema_unref(old);
    char n[16];
    snprintf(n, sizeof n, "%d", tp_wb_count(s));
    const char *kv[] = {"tables", n, NULL};
    tp_logkv(TP_LOG_INFO, kv, "writable tables reflected");
}

static void backlog(PGconn *c)
{
    char err[256];
    PGresult *tot = tp_pg_query(c, TP_WB_BACKLOG_SQL, 0, NULL, err, sizeof err);
    PGresult *per = tot ? tp_pg_query(c,
                                      "SELECT table_name, count(*) FROM tidepool.writeback_outbox "
                                      "WHERE shipped_at IS NULL GROUP BY 1 ORDER BY 1",
                                      0, NULL, err, sizeof err)
                        : NULL;
    if (!tot || !per) {
        PQclear(tot);
        return;
    }
    tp_buf_t b = {0};
    tp_buf_printf(&b,
                  "# HELP tidepool_writeback_outbox_backlog Outbox rows not yet shipped to the "
                  "warehouse.\n# TYPE tidepool_writeback_outbox_backlog gauge\n"
                  "tidepool_writeback_outbox_backlog_total %s\n",
                  PQgetvalue(tot, 0, 0));
    tp_wb_schema_t *s = snap_acquire();
    for (int i = 0; s && i < tp_wb_count(s); i++) {
        const tp_wb_table_t *t = tp_wb_table_at(s, i);
        bool seen = false;
        for (int k = 0; k < PQntuples(per); k++)
            seen = seen || strcmp(PQgetvalue(per, k, 0), t->qualified) == 0;
        if (t->mirror && !seen)
            tp_buf_printf(&b, "tidepool_writeback_outbox_backlog{table=\"%s\"} 0\n", t->qualified);
    }
    tp_wb_schema_unref(s);
    for (int k = 0; k < PQntuples(per); k++) {
        tp_buf_puts(&b, "tidepool_writeback_outbox_backlog{table=");
        tp_buf_json_str(&b, PQgetvalue(per, k, 0));
        tp_buf_printf(&b, "} %s\n", PQgetvalue(per, k, 1));
    }
    PQclear(tot);
    PQclear(per);
    pthread_mutex_lock(&wb_mu);
    free(wb_backlog_text);
    wb_backlog_text = tp_buf_steal(&b);
    pthread_mutex_unlock(&wb_mu);
}

void writes_status(PGconn *c)
{
    if (atomic_load(&wb_dirty))
        reflect(c);
    backlog(c);
}

void writes_metrics(tp_buf_t *b)
{
    pthread_mutex_lock(&wb_mu);
    if (wb_backlog_text)
        tp_buf_puts(b, wb_backlog_text);
    pthread_mutex_unlock(&wb_mu);
}

/* ---- the write pool and the purge timer ---- */

tp_pgpool_t *writes_pool(worker_t *w)
{
    if (strcmp(g_srv.read_dsn, g_srv.dsn) == 0)
        return w->pool;
    if (!wpools[w->id]) {
        tp_pgpool_opts_t po = {.dsn = g_srv.dsn,
                               .size = 2,
                               .max_queue = g_srv.pool_queue,
                               .connect_timeout_ms = (int)g_srv.cfg.postgres.connect_timeout_ms,
                               .max_statements = 128,
                               .name = "write"};
        wpools[w->id] = tp_pgpool_new(w->base, &po);
    }
    return wpools[w->id];
}

static void purge_send(worker_t *w);

static void on_purged(PGresult *res, const char *err, void *arg)
{
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    if (!res || err) {
        const char *kv[] = {"error", err ? err : "connection lost", NULL};
        tp_logkv(TP_LOG_WARN, kv, "purging expired idempotency keys failed");
        return;
    }
    const char *n = PQcmdTuples(res);
    if (strcmp(n, "0") != 0) {
        const char *kv[] = {"deleted", n, NULL};
        tp_logkv(TP_LOG_INFO, kv, "expired idempotency keys purged");
    }
    if (strcmp(n, PURGE_BATCH) == 0)
        purge_send(w); /* a full batch: more may be waiting */
}

static void purge_send(worker_t *w)
{
    const char *vals[] = {PURGE_BATCH};
    if (tp_pgpool_query(writes_pool(w), TP_WB_PURGE_SQL, 1, NULL, vals, on_purged, w, NULL) !=
        TP_PG_QUEUED)
        tp_debug("idempotency key purge skipped: pool busy or down");
}

static void on_purge_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    if (!atomic_load(&g_srv.draining))
        purge_send(w);
}

void writes_worker_start(worker_t *w)
{
    if (!wpools)
        wpools = tp_xcalloc((size_t)g_srv.nthreads, sizeof *wpools);
    if (w->id != 0)
        return;
    int64_t ms = env_or("TIDEPOOL_WB_PURGE_MS", 60000);
    purge_ev = event_new(w->base, -1, EV_PERSIST, on_purge_timer, w);
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    event_add(purge_ev, &tv);
}

void writes_worker_stop(worker_t *w)
{
    if (w->id == 0 && purge_ev) {
        event_free(purge_ev);
        purge_ev = NULL;
    }
    if (wpools && wpools[w->id]) {
        tp_pgpool_free(wpools[w->id]);
        wpools[w->id] = NULL;
    }
}

/* ---- handlers ---- */

static void send_answer(rq_t *r, const tp_wb_answer_t *a)
{
    if (a->etag)
        rq_header(r, "ETag", a->etag);
    if (a->retry_after_s > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", a->retry_after_s);
        rq_header(r, "Retry-After", ra);
    }
    if (a->replayed)
        rq_header(r, "Idempotent-Replayed", "true");
    rq_header(r, "Cache-Control", "no-store");
    rq_reply(r, a->status, a->content_type, a->body, a->body ? strlen(a->body) : 0);
}

static void wctx_free(wctx_t *x)
{
    tp_wb_call_free(x->call);
    tp_wb_schema_unref(x->snap);
    x->magic = 0;
    free(x);
}

static void send_call(wctx_t *x);

static void on_written(PGresult *res, const char *err, void *arg)
{
    wctx_t *x = arg;
    if (x->magic != WCTX_MAGIC)
        abort();
    tp_wb_answer_t ans;
    memset(&ans, 0, sizeof ans);
    if (tp_wb_finish(x->call, res, err, &ans) == TP_WB_RESEND) {
        send_call(x);
        return;
    }
    if (ans.status >= 500) {
        const char *kv[] = {"request_id", x->r->id, "error", err ? err : "", NULL};
        tp_logkv(TP_LOG_WARN, kv, "write failed");
    }
    send_answer(x->r, &ans);
    tp_wb_answer_free(&ans);
    wctx_free(x);
}

static void send_call(wctx_t *x)
{
    tp_pg_submit_t st = tp_pgpool_query(writes_pool(x->r->w), x->call->sql, x->call->nparams,
                                        NULL, x->call->params, on_written, x, NULL);
    if (st != TP_PG_QUEUED) {
        rq_pool_refused(x->r, st);
        wctx_free(x);
    }
}

static bool json_content(rq_t *r)
{
    const char *ct = rq_in_header(r, "Content-Type");
    size_t n = strlen("application/json");
    if (ct && strncasecmp(ct, "application/json", n) == 0 &&
        (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' '))
        return true;
    rq_problem(r, 415, "unsupported-media-type",
               "a write body must be JSON (Content-Type: application/json)", "Content-Type",
               "must be application/json", 0);
    return false;
}

/* The raw path of the request (percent-encoded, no trailing slash), owned. */
static char *raw_path(rq_t *r)
{
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(r->req);
    const char *p = u ? evhttp_uri_get_path(u) : NULL;
    char *s = tp_xstrdup(p && *p ? p : "/");
    size_t n = strlen(s);
    if (n > 1 && s[n - 1] == '/')
        s[n - 1] = '\0';
    return s;
}

static void h_write(rq_t *r, enum evhttp_cmd_type m, const char *table, const char *pk_raw,
                    const char *raw)
{
    tp_wb_schema_t *snap = snap_acquire();
    if (snap && !tp_wb_find(snap, table) && tables_find(r->tables, table)) {
        /* an exposed (read-only) table: the resource exists, the method does not */
        tp_wb_schema_unref(snap);
        rq_header(r, "Allow", "GET, HEAD");
        rq_problem(r, 405, "method-not-allowed", "this table is exposed for reading only", NULL,
                   NULL, 0);
        return;
    }
    if (!rq_authenticate(r)) {
        tp_wb_schema_unref(snap);
        return;
    }
    if (!snap) {
        rq_problem(r, 503, "not-ready", "writable tables have not been reflected yet", NULL, NULL,
                   1);
        return;
    }
    const tp_wb_table_t *t = tp_wb_find(snap, table);
    if (!t) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "%s is not a writable table", table);
        rq_problem(r, 404, "unknown-table", d.data, "table", "is not a writable table", 0);
        tp_buf_free(&d);
        tp_wb_schema_unref(snap);
        return;
    }
    size_t nroles = 0;
    while (t->write_roles && t->write_roles[nroles])
        nroles++;
    char *body = NULL;
    size_t blen = 0;
    if (!rq_authorize(r, t->write_roles, nroles) ||
        (m != EVHTTP_REQ_DELETE && !json_content(r)) || !rq_body(r, &body, &blen)) {
        tp_wb_schema_unref(snap);
        return;
    }
    tp_wb_request_t req = {
        .op = m == EVHTTP_REQ_POST ? TP_WB_INSERT
              : m == EVHTTP_REQ_PATCH ? TP_WB_UPDATE
                                      : TP_WB_DELETE,
        .method = m == EVHTTP_REQ_POST ? "POST" : m == EVHTTP_REQ_PATCH ? "PATCH" : "DELETE",
        .path = raw,
        .pk = pk_raw,
        .body = blen ? body : NULL,
        .body_len = blen,
        .if_match = rq_in_header(r, "If-Match"),
        .idem_key = rq_in_header(r, "Idempotency-Key"),
        .actor = r->auth.principal->id,
        .request_id = r->id,
        .key_ttl_s = atomic_load(&g_srv.idem_ttl_ms) / 1000,
    };
    tp_wb_call_t *call = NULL;
    tp_wb_answer_t ans;
    memset(&ans, 0, sizeof ans);
    bool ok = tp_wb_prepare(t, &req, &call, &ans);
    free(body);
    if (!ok) {
        send_answer(r, &ans);
        tp_wb_answer_free(&ans);
        tp_wb_schema_unref(snap);
        return;
    }
    wctx_t *x = tp_xcalloc(1, sizeof *x);
    x->magic = WCTX_MAGIC;
    x->r = r;
    x->snap = snap;
    x->call = call;
    send_call(x);
}

bool writes_route(rq_t *r, const char *path)
{
    static const char prefix[] = "/api/v1/tables/";
    enum evhttp_cmd_type m = evhttp_request_get_command(r->req);
    if ((m != EVHTTP_REQ_POST && m != EVHTTP_REQ_PATCH && m != EVHTTP_REQ_DELETE) ||
        strncmp(path, prefix, sizeof prefix - 1) != 0)
        return false;
    const char *rest = path + sizeof prefix - 1;
    const char *slash = strchr(rest, '/');
    char *raw = raw_path(r);
    /* the table is the decoded segment; the key stays percent-encoded (',' splits it) */
    bool literal = strncmp(raw, prefix, sizeof prefix - 1) == 0;
    const char *raw_rest = literal ? raw + sizeof prefix - 1 : raw;
    const char *raw_slash = strchr(raw_rest, '/');
    r->route = RT_WRITE;
    r->route_name = "/api/v1/tables/{table}[/{pk}] (write)";
    if (!literal || (slash && (!raw_slash || strchr(raw_slash + 1, '/')))) {
        /* an encoded prefix ("/api/v1/%74ables/") or a '/' inside a segment */
        rq_problem(r, 404, "unknown-route", "no route matches this path", NULL, NULL, 0);
    } else if (!slash && m == EVHTTP_REQ_DELETE) {
        rq_header(r, "Allow", "GET, HEAD, POST, PATCH");
        rq_problem(r, 405, "method-not-allowed", "DELETE needs a key: /api/v1/tables/{t}/{pk}",
                   NULL, NULL, 0);
    } else if (slash && m == EVHTTP_REQ_POST) {
        rq_header(r, "Allow", "PATCH, DELETE");
        rq_problem(r, 405, "method-not-allowed", "POST goes to /api/v1/tables/{t} without a key",
                   NULL, NULL, 0);
    } else {
        char *table = slash ? tp_xstrndup(rest, (size_t)(slash - rest)) : tp_xstrdup(rest);
        h_write(r, m, table, raw_slash ? raw_slash + 1 : NULL, raw);
        free(table);
    }
    free(raw);
    return true;
}

/* ---- OpenAPI ---- */

static json_t *problems(const char *const *codes, size_t n)
{
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++)
        json_object_set_new(o, codes[i],
                            json_pack("{s:s,s:{s:{s:{s:s}}}}", "description", "problem details",
                                      "content", "application/problem+json", "schema", "$ref",
                                      "#/components/schemas/Problem"));
    return o;
}

static json_t *op(const char *summary, json_t *body_schema, const char *ok, json_t *row,
                  json_t *params)
{
    static const char *const codes[] = {"400", "401", "403", "404", "409", "412",
                                        "413", "415", "422", "428", "503"};
    json_t *resp = problems(codes, TP_ARRAY_LEN(codes));
    json_object_set_new(resp, ok,
                        json_pack("{s:s,s:{s:{s:s}},s:{s:{s:o}}}", "description",
                                  "the rows as written", "headers", "ETag", "description",
                                  "row version (single-row answers)", "content",
                                  "application/json", "schema", row));
    json_t *o = json_pack("{s:s,s:o}", "summary", summary, "responses", resp);
    json_t *hp = json_array();
    const char *hdrs[] = {"Idempotency-Key", "If-Match"};
    for (size_t i = 0; i < 2; i++)
        json_array_append_new(hp, json_pack("{s:s,s:s,s:{s:s}}", "name", hdrs[i], "in", "header",
                                            "schema", "type", "string"));
    if (params)
        json_array_extend(hp, params), json_decref(params);
    json_object_set_new(o, "parameters", hp);
    if (body_schema)
        json_object_set_new(o, "requestBody",
                            json_pack("{s:b,s:{s:{s:o}}}", "required", 1, "content",
                                      "application/json", "schema", body_schema));
    return o;
}

void writes_openapi(rq_t *r, void *paths_v)
{
    json_t *paths = paths_v;
    tp_wb_schema_t *s = snap_acquire();
    for (int i = 0; s && i < tp_wb_count(s); i++) {
        const tp_wb_table_t *t = tp_wb_table_at(s, i);
        if (!rq_allowed(r, t->write_roles,
                        tp_auth_strv_len((const char *const *)t->write_roles)))
            continue; /* as the write handlers would answer 403 */
        tp_buf_t b = {0};
        tp_wb_json_schema(t, &b);
        json_t *row = json_loadb(b.data, b.len, 0, NULL);
        tp_buf_free(&b);
        if (!row)
            continue;
        char *p1 = tp_xasprintf("/api/v1/tables/%s", t->qualified);
        char *p2 = tp_xasprintf("/api/v1/tables/%s/{pk}", t->qualified);
        json_t *item = json_object_get(paths, p1);
        if (!item) {
            item = json_object();
            json_object_set_new(paths, p1, item);
        }
        json_t *rows = json_pack("{s:s,s:O}", "type", "array", "items", row);
        json_object_set_new(
            item, "post",
            op("insert one row or an array of rows (one transaction)",
               json_pack("{s:[O,O]}", "oneOf", row, rows), "201",
               json_pack("{s:[O,O]}", "oneOf", row, rows), NULL));
        json_object_set_new(
            item, "patch",
            op("bulk update: [{pk columns..., \"changes\": {...}, \"if_match\": version}]",
               json_pack("{s:s,s:{s:s}}", "type", "array", "items", "type", "object"), "200",
               json_incref(rows), NULL));
        json_t *pkp = json_pack("[{s:s,s:s,s:b,s:s,s:{s:s}}]", "name", "pk", "in", "path",
                                "required", 1, "description",
                                "primary key; composite keys joined by ',' (percent-encoded)",
                                "schema", "type", "string");
        json_t *item2 = json_object();
        json_object_set_new(item2, "patch",
                            op("update one row", json_pack("{s:s}", "type", "object"), "200",
                               json_incref(row), json_deep_copy(pkp)));
        json_object_set_new(item2, "delete",
                            op("delete one row (answers the row as it was)", NULL, "200",
                               json_incref(row), pkp));
        json_object_set_new(paths, p2, item2);
        json_decref(rows);
        json_decref(row);
        free(p1);
        free(p2);
    }
    tp_wb_schema_unref(s);
}

/* For /api/v1/sync (syncapi.c): a Postgres text[] literal of the mirrored tables. */
char *writes_mirrored_array(void)
{
    tp_buf_t b = {0};
    tp_buf_putc(&b, '{');
    tp_wb_schema_t *s = snap_acquire();
    int n = 0;
    for (int i = 0; s && i < tp_wb_count(s); i++) {
        const tp_wb_table_t *t = tp_wb_table_at(s, i);
        if (t->mirror) /* identifiers: [A-Za-z0-9_.] only, safe inside quotes */
            tp_buf_printf(&b, "%s\"%s\"", n++ ? "," : "", t->qualified);
    }
    tp_wb_schema_unref(s);
    tp_buf_putc(&b, '}');
    return tp_buf_steal(&b);
}
