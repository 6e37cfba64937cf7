/* Routing and the operational endpoints of tidepool-server.
 *
 * route_request is evhttp's one callback: it enforces the limits evhttp 2.1
 * cannot express as problem+json (header block size -> 431, in-flight request
 * cap per worker -> 503), rejects unsafe paths (percent-encoded NUL, invalid
 * UTF-8, "." or ".." segments -> 400), matches the route (404 unknown route,
 * 405 with Allow for a wrong method), parses the query string strictly and the
 * output format (?shape=rows|columns, Accept: text/csv), then hands over to a
 * handler. Also here: /healthz, /readyz (Postgres reachable through this
 * worker's pool, LISTEN connection up, migrations current), /metrics
 * (Prometheus text, summed over workers) and /api/v1/openapi.json (OpenAPI 3.1
 * generated from the current datasets and exposed tables; it needs a caller
 * and describes only what that caller's roles may read or write, as
 * /api/v1/datasets lists only what the caller may read). */
#include "server.h"
#include "static.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "tidepool/log.h"

static const char *const route_names[RT__N] = {
    "/api/v1/datasets", "/api/v1/datasets/{name}", "/api/v1/tables/{table}", "/healthz",
    "/readyz", "/metrics", "/api/v1/openapi.json", "other",
    "/api/v1/tables/{table}[/{pk}] (write)", "/api/v1/sync", "/api/v1/statements/{id}",
    "/api/v1/events"};

static void not_allowed(rq_t *r, const char *allow)
{
    rq_header(r, "Allow", allow);
    rq_problem(r, 405, "method-not-allowed", "this route does not accept that method", NULL, NULL,
               0);
}

static bool method_is(rq_t *r, int mask)
{
    return (evhttp_request_get_command(r->req) & mask) != 0;
}

static size_t header_bytes(struct evhttp_request *req)
{
    size_t n = 0;
    for (struct evkeyval *kv = evhttp_request_get_input_headers(req)->tqh_first; kv;
         kv = kv->next.tqe_next)
        n += strlen(kv->key) + strlen(kv->value) + 4;
    return n;
}

/* Validates each segment of the decoded path; false (problem sent) if unsafe. */
static char *safe_path(rq_t *r, const char *raw)
{
    const char *why = NULL;
    char *p = pct_decode(raw, strlen(raw), false, &why);
    if (!p) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "the path %s", why);
        rq_problem(r, 400, "invalid-path", d.data, "path", why, 0);
        tp_buf_free(&d);
        return NULL;
    }
    for (const char *s = p; *s;) {
        const char *slash = strchr(s + 1, '/');
        size_t n = slash ? (size_t)(slash - s) : strlen(s);
        if ((n == 2 && strncmp(s, "/.", 2) == 0) || (n == 3 && strncmp(s, "/..", 3) == 0)) {
            free(p);
            rq_problem(r, 400, "invalid-path", "the path must not contain . or .. segments",
                       "path", "contains a . or .. segment", 0);
            return NULL;
        }
        s += n;
    }
    return p;
}

static bool parse_format(rq_t *r)
{
    if (!rq_parse_query(r))
        return false;
    const char *shape = rq_q(r, "shape");
    const char *accept = rq_in_header(r, "Accept");
    r->fmt = FMT_ROWS;
    if (accept && strstr(accept, "text/csv"))
        r->fmt = FMT_CSV;
    if (shape) {
        if (strcmp(shape, "columns") == 0) {
            r->fmt = FMT_COLUMNS;
        } else if (strcmp(shape, "csv") == 0) {
            r->fmt = FMT_CSV;
        } else if (strcmp(shape, "rows") != 0) {
            rq_problem(r, 400, "invalid-parameter", "shape must be rows, columns or csv", "shape",
                       "must be rows, columns or csv", 0);
            return false;
        }
    }
    const char *fresh = rq_q(r, "fresh");
    const char *cc = rq_in_header(r, "Cache-Control");
    r->bypass = (fresh && (strcmp(fresh, "1") == 0 || strcmp(fresh, "true") == 0)) ||
                (cc && (strcasestr(cc, "no-cache") || strcasestr(cc, "no-store")));
    return true;
}

/* /metrics needs admin, except in auth mode none (the local demo); false
 * with the 401/403/429 problem sent. */
static bool metrics_allowed(rq_t *r)
{
    tp_auth_t *a = auth_acquire();
    bool open = tp_auth_mode(a) == TP_AUTH_MODE_NONE;
    tp_auth_free(a);
    static const char *const admin[] = {"admin", NULL};
    return open || (rq_authenticate(r) && rq_require(r, admin));
}

static void h_healthz(rq_t *r)
{
    static const char body[] = "{\"status\":\"ok\"}";
    rq_header(r, "Cache-Control", "no-store");
    rq_reply(r, 200, "application/json", body, sizeof body - 1);
}

bool srv_readiness(const worker_t *w, tp_buf_t *why, const char **field)
{
    bool pg = true;
    if (w != NULL) {
        pg = tp_pgpool_up(w->pool);
    } else {
        for (int i = 0; i < g_srv.nthreads; i++)
            pg = pg && atomic_load_explicit(&g_srv.workers[i].m.pool_connected,
                                            memory_order_relaxed) > 0;
    }
    bool lsn = atomic_load(&g_srv.listen_up);
    bool known = atomic_load(&g_srv.migrations_known);
    bool mig = known && atomic_load(&g_srv.migrations_ok);
    bool tables = atomic_load(&g_srv.tables_ready);
    if (pg && mig && lsn && tables)
        return true;
    if (why != NULL) {
        char mwhy[600];
        pthread_mutex_lock(&g_srv.lock);
        snprintf(mwhy, sizeof mwhy, "%s", g_srv.migrations_why);
        pthread_mutex_unlock(&g_srv.lock);
        if (!pg)
            tp_buf_puts(why, "Postgres is not reachable");
        if (!mig)
            tp_buf_printf(why, "%smigrations: %s", why->len ? "; " : "",
                          known     ? mwhy
                          : mwhy[0] ? "not checked (Postgres unreachable)"
                                    : "not checked yet");
        if (!lsn)
            tp_buf_printf(why, "%sthe LISTEN connection for cache invalidation is down",
                          why->len ? "; " : "");
        if (!tables)
            tp_buf_printf(why, "%sexposed tables not reflected yet", why->len ? "; " : "");
    }
    if (field != NULL)
        *field = !pg ? "postgres" : !mig ? "migrations" : !lsn ? "listen" : "tables";
    return false;
}

static void h_readyz(rq_t *r)
{
    tp_buf_t d = {0};
    const char *field = NULL;
    if (srv_readiness(r->w, &d, &field)) {
        static const char body[] = "{\"status\":\"ready\",\"checks\":{\"postgres\":true,"
                                   "\"migrations\":true,\"listen\":true,\"tables\":true}}";
        rq_header(r, "Cache-Control", "no-store");
        rq_reply(r, 200, "application/json", body, sizeof body - 1);
        return;
    }
    rq_problem(r, 503, "not-ready", d.data, field, d.data, 1);
    tp_buf_free(&d);
}

void route_request(struct evhttp_request *req, void *arg)
{
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    rq_t *r = rq_new(w, req, RT_OTHER, route_names[RT_OTHER]);
    if (w->inflight > w->max_inflight) {
        rq_problem(r, 503, "overloaded", "too many requests in progress", NULL, NULL, 1);
        return;
    }
    if ((int64_t)header_bytes(req) > g_srv.cfg.server.max_header_bytes) {
        char d[128];
        snprintf(d, sizeof d, "the request headers exceed %lld bytes",
                 (long long)g_srv.cfg.server.max_header_bytes);
        rq_problem(r, 431, "headers-too-large", d, "headers", "are too large", 0);
        return;
    }
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
    const char *raw = u ? evhttp_uri_get_path(u) : NULL;
    char *path = safe_path(r, raw && *raw ? raw : "/");
    if (!path)
        return;
    enum { GET = EVHTTP_REQ_GET | EVHTTP_REQ_HEAD };
    const char *ds_prefix = "/api/v1/datasets/", *tb_prefix = "/api/v1/tables/";
    size_t len = strlen(path);
    if (len > 1 && path[len - 1] == '/')
        path[--len] = '\0';
    if (writes_route(r, path) || sync_route(r, path) || events_route(r, path)) {
        free(path);
        return;
    }
    int route = RT_OTHER;
    const char *name = NULL;
    if (strcmp(path, "/healthz") == 0)
        route = RT_HEALTHZ;
    else if (strcmp(path, "/readyz") == 0)
        route = RT_READYZ;
    else if (strcmp(path, "/metrics") == 0)
        route = RT_METRICS;
    else if (strcmp(path, "/api/v1/openapi.json") == 0)
        route = RT_OPENAPI;
    else if (strcmp(path, "/api/v1/datasets") == 0)
        route = RT_DATASETS;
    else if (strncmp(path, ds_prefix, strlen(ds_prefix)) == 0 && !strchr(path + strlen(ds_prefix), '/'))
        route = RT_DATASET, name = path + strlen(ds_prefix);
    else if (strncmp(path, tb_prefix, strlen(tb_prefix)) == 0 && !strchr(path + strlen(tb_prefix), '/'))
        route = RT_TABLE, name = path + strlen(tb_prefix);
    else if (fb_statement_path(path, &name))
        route = RT_STATEMENT;
    r->route = route;
    r->route_name = route_names[route];
    if (route == RT_OTHER && static_serve(r, path)) {
        /* the demo page (static.c) */
    } else if (route == RT_OTHER) {
        tp_buf_t d = {0};
        tp_buf_puts(&d, "no route matches this path");
        rq_problem(r, 404, "unknown-route", d.data, NULL, NULL, 0);
        tp_buf_free(&d);
    } else if (route == RT_DATASET && !method_is(r, GET | EVHTTP_REQ_POST)) {
        not_allowed(r, "GET, HEAD, POST");
    } else if (route == RT_STATEMENT && !method_is(r, GET | EVHTTP_REQ_DELETE)) {
        not_allowed(r, "GET, HEAD, DELETE");
    } else if (route != RT_DATASET && route != RT_STATEMENT && !method_is(r, GET)) {
        not_allowed(r, "GET, HEAD");
    } else if (route == RT_HEALTHZ) {
        h_healthz(r);
    } else if (route == RT_READYZ) {
        h_readyz(r);
    } else if (route == RT_METRICS) {
        if (metrics_allowed(r)) {
            /* per-job gauges: this answer uses the view as it is, the next a fresher one */
            syncstate_refresh(r->w);
            h_metrics(r);
        }
    } else if (route == RT_OPENAPI) {
        if (rq_authenticate(r)) /* mode none: the anonymous principal */
            h_openapi(r);
    } else if (!rq_authenticate(r) || !parse_format(r)) {
        /* problem sent */
    } else if (route == RT_DATASETS) {
        h_datasets(r);
    } else if (route == RT_DATASET) {
        h_dataset(r, name);
    } else if (route == RT_STATEMENT) {
        h_statement(r, name);
    } else {
        h_table(r, name);
    }
    free(path);
}

/* ---- /metrics ---- */

static uint64_t sum_u64(size_t offset)
{
    uint64_t s = 0;
    for (int i = 0; i < g_srv.nthreads; i++)
        s += atomic_load_explicit(
            (atomic_uint_fast64_t *)((char *)&g_srv.workers[i].m + offset), memory_order_relaxed);
    return s;
}

static int sum_int(size_t offset)
{
    int s = 0;
    for (int i = 0; i < g_srv.nthreads; i++)
        s += atomic_load_explicit((atomic_int *)((char *)&g_srv.workers[i].m + offset),
                                  memory_order_relaxed);
    return s;
}

void h_metrics(rq_t *r)
{
    tp_buf_t b = {0};
    tp_buf_puts(&b, "# HELP tidepool_http_requests_total HTTP requests by route and status.\n"
                    "# TYPE tidepool_http_requests_total counter\n");
    for (int rt = 0; rt < RT__N; rt++)
        for (int s = 0; s < N_STATUS; s++) {
            uint64_t n = 0;
            for (int i = 0; i < g_srv.nthreads; i++)
                n += atomic_load_explicit(&g_srv.workers[i].m.req[rt][s], memory_order_relaxed);
            if (!n)
                continue;
            int code = status_code_at(s);
            tp_buf_printf(&b, "tidepool_http_requests_total{route=\"%s\",status=\"", route_names[rt]);
            if (code)
                tp_buf_printf(&b, "%d", code);
            else
                tp_buf_puts(&b, "other");
            tp_buf_printf(&b, "\"} %llu\n", (unsigned long long)n);
        }
    tp_buf_puts(&b, "# HELP tidepool_http_request_duration_seconds Time from request to reply.\n"
                    "# TYPE tidepool_http_request_duration_seconds histogram\n");
    uint64_t cum = 0;
    for (int k = 0; k < N_BUCKETS; k++) {
        for (int i = 0; i < g_srv.nthreads; i++)
            cum += atomic_load_explicit(&g_srv.workers[i].m.lat_bucket[k], memory_order_relaxed);
        tp_buf_printf(&b, "tidepool_http_request_duration_seconds_bucket{le=\"%g\"} %llu\n",
                      bucket_bound_ms(k) / 1000.0, (unsigned long long)cum);
    }
    uint64_t count = sum_u64(offsetof(metrics_t, lat_count));
    tp_buf_printf(&b,
                  "tidepool_http_request_duration_seconds_bucket{le=\"+Inf\"} %llu\n"
                  "tidepool_http_request_duration_seconds_sum %.6f\n"
                  "tidepool_http_request_duration_seconds_count %llu\n",
                  (unsigned long long)count,
                  (double)sum_u64(offsetof(metrics_t, lat_sum_us)) / 1e6,
                  (unsigned long long)count);
    tp_buf_printf(&b,
                  "# HELP tidepool_pg_pool_connections Postgres pool connections (all workers).\n"
                  "# TYPE tidepool_pg_pool_connections gauge\n"
                  "tidepool_pg_pool_connections{state=\"size\"} %d\n"
                  "tidepool_pg_pool_connections{state=\"connected\"} %d\n"
                  "tidepool_pg_pool_connections{state=\"in_use\"} %d\n"
                  "# HELP tidepool_pg_pool_queued Requests waiting for a Postgres connection.\n"
                  "# TYPE tidepool_pg_pool_queued gauge\n"
                  "tidepool_pg_pool_queued %d\n",
                  sum_int(offsetof(metrics_t, pool_size)),
                  sum_int(offsetof(metrics_t, pool_connected)),
                  sum_int(offsetof(metrics_t, pool_in_use)),
                  sum_int(offsetof(metrics_t, pool_queued)));
    tp_buf_printf(&b,
                  "# TYPE tidepool_cache_hits_total counter\ntidepool_cache_hits_total %llu\n"
                  "# TYPE tidepool_cache_misses_total counter\ntidepool_cache_misses_total %llu\n"
                  "# TYPE tidepool_cache_evictions_total counter\ntidepool_cache_evictions_total %llu\n"
                  "# TYPE tidepool_cache_bytes gauge\ntidepool_cache_bytes %llu\n"
                  "# TYPE tidepool_cache_entries gauge\ntidepool_cache_entries %llu\n"
                  "# HELP tidepool_singleflight_joined_total Requests answered by another's identical query.\n"
                  "# TYPE tidepool_singleflight_joined_total counter\n"
                  "tidepool_singleflight_joined_total %llu\n",
                  (unsigned long long)sum_u64(offsetof(metrics_t, cache_hits)),
                  (unsigned long long)sum_u64(offsetof(metrics_t, cache_misses)),
                  (unsigned long long)sum_u64(offsetof(metrics_t, cache_evictions)),
                  (unsigned long long)sum_u64(offsetof(metrics_t, cache_bytes)),
                  (unsigned long long)sum_u64(offsetof(metrics_t, cache_entries)),
                  (unsigned long long)sum_u64(offsetof(metrics_t, flights_joined)));
    tp_buf_printf(&b,
                  "# TYPE tidepool_postgres_up gauge\ntidepool_postgres_up %d\n"
                  "# TYPE tidepool_listen_up gauge\ntidepool_listen_up %d\n"
                  "# TYPE tidepool_migrations_current gauge\ntidepool_migrations_current %d\n",
                  tp_pgpool_up(r->w->pool) ? 1 : 0, atomic_load(&g_srv.listen_up) ? 1 : 0,
                  atomic_load(&g_srv.migrations_ok) ? 1 : 0);
    tp_buf_puts(&b, "# HELP tidepool_job_freshness_seconds Seconds since the job's last successful sync.\n"
                    "# TYPE tidepool_job_freshness_seconds gauge\n"
                    "# TYPE tidepool_job_generation gauge\n"
                    "# HELP tidepool_job_consecutive_failures Failed runs of the job since its "
                    "last success (tidepool.sync_state).\n"
                    "# TYPE tidepool_job_consecutive_failures gauge\n");
    int64_t now = tp_wall_ms();
    pthread_mutex_lock(&g_srv.lock);
    int nj = g_srv.njobs;
    pthread_mutex_unlock(&g_srv.lock);
    for (int j = 0; j < nj; j++) {
        const jobstate_t *js = &r->w->jobs[j];
        if (!js->known)
            continue;
        const char *name = g_srv.job_names[j]; /* append-only: stable once published */
        if (js->last_success_ms > 0)
            tp_buf_printf(&b, "tidepool_job_freshness_seconds{job=\"%s\"} %.3f\n", name,
                          (double)(now - js->last_success_ms) / 1000.0);
        tp_buf_printf(&b, "tidepool_job_generation{job=\"%s\"} %lld\n", name,
                      (long long)js->generation);
        tp_buf_printf(&b, "tidepool_job_consecutive_failures{job=\"%s\"} %lld\n", name,
                      (long long)js->failures);
    }
    writes_metrics(&b);
    events_metrics(&b);
    fb_metrics(&b);
    rq_header(r, "Cache-Control", "no-store");
    rq_reply(r, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    tp_buf_free(&b);
}

/* ---- /api/v1/openapi.json ---- */

static json_t *schema_for(tp_defs_type_t t)
{
    switch (t) {
    case TP_DEFS_INT: return json_pack("{s:s,s:s}", "type", "integer", "format", "int32");
    case TP_DEFS_BIGINT: return json_pack("{s:s,s:s}", "type", "integer", "format", "int64");
    case TP_DEFS_DOUBLE: return json_pack("{s:s,s:s}", "type", "number", "format", "double");
    case TP_DEFS_DECIMAL: return json_pack("{s:s}", "type", "number");
    case TP_DEFS_BOOLEAN: return json_pack("{s:s}", "type", "boolean");
    case TP_DEFS_DATE: return json_pack("{s:s,s:s}", "type", "string", "format", "date");
    case TP_DEFS_TIMESTAMP: return json_pack("{s:s,s:s}", "type", "string", "format", "date-time");
    default: return json_pack("{s:s}", "type", "string");
    }
}

static json_t *problem_responses(void)
{
    json_t *ref = json_pack("{s:{s:{s:{s:s}}}}", "content", "application/problem+json", "schema",
                            "$ref", "#/components/schemas/Problem");
    json_t *o = json_object();
    const char *codes[] = {"400", "401", "403", "404", "413", "415", "422", "429", "503"};
    for (size_t i = 0; i < TP_ARRAY_LEN(codes); i++) {
        json_t *x = json_deep_copy(ref);
        json_object_set_new(x, "description", json_string("problem details"));
        json_object_set_new(o, codes[i], x);
    }
    json_decref(ref);
    return o;
}

static json_t *ok_response(void)
{
    return json_pack("{s:s,s:{s:{},s:{}}}", "description", "rows, columns or CSV", "content",
                     "application/json", "text/csv");
}

static json_t *simple_get(const char *summary, const char *ctype)
{
    return json_pack("{s:{s:s,s:{s:{s:s,s:{s:{}}}}}}", "get", "summary", summary, "responses",
                     "200", "description", "OK", "content", ctype);
}

void h_openapi(rq_t *r)
{
    json_t *paths = json_object();
    json_object_set_new(paths, "/healthz", simple_get("liveness", "application/json"));
    json_object_set_new(paths, "/readyz", simple_get("readiness: Postgres and migrations", "application/json"));
    json_object_set_new(paths, "/metrics", simple_get("Prometheus metrics", "text/plain"));
    json_object_set_new(paths, "/api/v1/openapi.json", simple_get("this document", "application/json"));
    json_object_set_new(paths, "/api/v1/datasets", simple_get("list datasets with parameters, roles and freshness", "application/json"));
    const tp_defs_set_t *s = r->gen->set;
    for (size_t i = 0; i < s->n_datasets; i++) {
        const tp_defs_dataset_t *ds = &s->datasets[i];
        if (!rq_allowed(r, ds->roles, ds->n_roles))
            continue; /* only what the caller may read (fb_openapi skips it too) */
        json_t *params = json_array(), *props = json_object(), *required = json_array();
        for (size_t k = 0; k < ds->n_params; k++) {
            const tp_defs_param_t *p = &ds->params[k];
            json_t *sch = schema_for(p->type);
            if (p->default_text)
                json_object_set_new(sch, "default", json_string(p->default_text));
            json_array_append_new(params, json_pack("{s:s,s:s,s:b,s:O}", "name", p->name, "in",
                                                    "query", "required", !p->has_default,
                                                    "schema", sch));
            json_object_set_new(props, p->name, sch);
            if (!p->has_default)
                json_array_append_new(required, json_string(p->name));
        }
        json_array_append_new(params, json_pack("{s:s,s:s,s:{s:s,s:[s,s,s]}}", "name", "shape",
                                                "in", "query", "schema", "type", "string", "enum",
                                                "rows", "columns", "csv"));
        json_t *get = json_pack("{s:s,s:o,s:o}", "summary",
                                ds->description ? ds->description : ds->name, "parameters", params,
                                "responses", problem_responses());
        json_object_set_new(json_object_get(get, "responses"), "200", ok_response());
        json_t *post = json_pack(
            "{s:s,s:{s:b,s:{s:{s:{s:s,s:o,s:o,s:b}}}},s:o}", "summary",
            ds->description ? ds->description : ds->name, "requestBody", "required", 0, "content",
            "application/json", "schema", "type", "object", "properties", props, "required",
            required, "additionalProperties", 0, "responses", problem_responses());
        json_object_set_new(json_object_get(post, "responses"), "200", ok_response());
        char *path = tp_xasprintf("/api/v1/datasets/%s", ds->name);
        json_object_set_new(paths, path, json_pack("{s:o,s:o}", "get", get, "post", post));
        free(path);
    }
    fb_openapi(paths, s);
    const tables_t *t = r->tables;
    for (size_t i = 0; i < t->n; i++) {
        const ttable_t *tb = &t->t[i];
        if (!rq_allowed(r, tb->roles, tp_auth_strv_len((const char *const *)tb->roles)))
            continue; /* read roles (@expose roles=) */
        json_t *params = json_array();
        const char *std[] = {"select", "order", "limit", "offset"};
        for (size_t k = 0; k < TP_ARRAY_LEN(std); k++)
            json_array_append_new(params, json_pack("{s:s,s:s,s:{s:s}}", "name", std[k], "in",
                                                    "query", "schema", "type",
                                                    k >= 2 ? "integer" : "string"));
        for (size_t k = 0; k < tb->ncols; k++) {
            char *desc = tp_xasprintf("filter on %s (%s): op.value with op in eq neq gt gte lt "
                                      "lte in like is",
                                      tb->cols[k].name, tb->cols[k].type);
            json_array_append_new(params, json_pack("{s:s,s:s,s:s,s:{s:s}}", "name",
                                                    tb->cols[k].name, "in", "query",
                                                    "description", desc, "schema", "type",
                                                    "string"));
            free(desc);
        }
        json_t *get = json_pack("{s:s,s:o,s:o}", "summary", tb->name, "parameters", params,
                                "responses", problem_responses());
        json_object_set_new(json_object_get(get, "responses"), "200", ok_response());
        char *path = tp_xasprintf("/api/v1/tables/%s", tb->name);
        json_object_set_new(paths, path, json_pack("{s:o}", "get", get));
        free(path);
    }
    writes_openapi(r, paths);
    sync_openapi(paths);
    events_openapi(paths);
    json_t *doc = json_pack(
        "{s:s,s:{s:s,s:s},s:o,s:{s:{s:{s:s,s:{s:{s:s},s:{s:s},s:{s:s},s:{s:s},s:{s:s},s:{s:s}}}}}}",
        "openapi", "3.1.0", "info", "title", "Tidepool", "version", TP_VERSION, "paths", paths,
        "components", "schemas", "Problem", "type", "object", "properties", "type", "type",
        "string", "title", "type", "string", "status", "type", "integer", "detail", "type",
        "string", "code", "type", "string", "errors", "type", "array");
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text) {
        rq_problem(r, 500, "openapi-failed", "could not build the OpenAPI document", NULL, NULL, 0);
        return;
    }
    send_body(r, text, strlen(text), "application/json", "postgres");
    free(text);
}
