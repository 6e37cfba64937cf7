/* Datasets: GET /api/v1/datasets and GET|POST /api/v1/datasets/{name}.
 *
 * A request's parameters come from the query string (GET) or a JSON object
 * body (POST, application/json); each is checked against its @param type with
 * the definitions' value parser (422 naming the field), unknown names are 400,
 * defaults are applied, and the canonical values are bound as $n of the
 * prepared body. Flow: response cache (per worker; skipped on
 * Cache-Control: no-cache or ?fresh=1) -> single flight (identical concurrent
 * misses on this worker share one query) -> the worker's sync_state view
 * (refreshed when the invalidation epoch moved, else at most once a second)
 * -> the query -> encode once, answer every waiter, store in the cache.
 * Headers: ETag (hash of the body; 304 on If-None-Match), Last-Modified and
 * X-Tidepool-Generation from sync_state of the @requires jobs,
 * X-Tidepool-Source postgres|cache. Whether a read goes to the warehouse
 * instead (warehouse-only, ?source=warehouse, @covers, staleness, Postgres
 * down) is fb_dataset's decision (fallback_routes.c). */
#include "server.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <jansson.h>

#include "tidepool/log.h"

#define FLIGHT_MAGIC 0x464c5431u

typedef struct flight {
    uint32_t magic;
    worker_t *w;
    char *key; /* NULL for a private (bypass) flight */
    uint64_t fill_epoch;
    rq_t *waiters; /* leader first */
    int ds_idx;
    int64_t ttl_ms;
    int *jobs; /* job registry indices of the dataset's @requires */
    size_t njobs;
    tp_pgreq_t *pgh; /* the pool request, once sent */
    struct flight *next;
} flight_t;

static const char *SS_SQL =
    "SELECT job, generation, (extract(epoch FROM last_success_at) * 1000)::bigint, "
    "consecutive_failures FROM tidepool.sync_state";

/* ---- sync_state view ---- */

static void ss_done(PGresult *res, const char *err, void *arg);

/* Starts a sync_state read on the worker's pool; on refusal, completes at once. */
static void ss_fetch(worker_t *w)
{
    w->ss_epoch = epoch_now();
    w->ss_fetching = true;
    tp_pg_submit_t s = tp_pgpool_query(w->pool, SS_SQL, 0, NULL, NULL, ss_done, w, NULL);
    if (s != TP_PG_QUEUED)
        ss_done(NULL, "postgres unavailable", w); /* waiters go on; their queries say why */
}

static void ss_done(PGresult *res, const char *err, void *arg)
{
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    w->ss_fetching = false;
    w->ss_fetched_ms = tp_now_ms();
    if (!err && res) {
        for (int i = 0; i < SRV_MAX_JOBS; i++)
            w->jobs[i].known = false;
        for (int i = 0; i < PQntuples(res); i++) {
            int idx = job_index(PQgetvalue(res, i, 0));
            if (idx < 0)
                continue;
            jobstate_t *j = &w->jobs[idx];
            j->known = true;
            j->generation = strtoll(PQgetvalue(res, i, 1), NULL, 10);
            j->last_success_ms =
                PQgetisnull(res, i, 2) ? 0 : strtoll(PQgetvalue(res, i, 2), NULL, 10);
            j->failures = strtoll(PQgetvalue(res, i, 3), NULL, 10);
        }
        w->ss_ok = true;
    } else {
        const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        const char *kv[] = {"error", err, "sqlstate", state, NULL};
        tp_logkv(TP_LOG_WARN, kv, "reading tidepool.sync_state failed; freshness unknown");
        w->ss_ok = false;
    }
    /* A notification arrived while reading: the rows may predate it; read again. */
    if (w->ss_ok && w->ss_waiters && w->ss_epoch != epoch_now()) {
        ss_fetch(w);
        return;
    }
    rq_t *list = w->ss_waiters;
    w->ss_waiters = NULL;
    while (list) {
        rq_t *r = list;
        list = r->next;
        r->next = NULL;
        r->cont(r);
    }
}

void syncstate_then(rq_t *r, void (*cont)(rq_t *r))
{
    worker_t *w = r->w;
    if (w->ss_ok && w->ss_epoch == epoch_now()) {
        /* Current as of the last notification: answer now; if it is older than
         * a second (an UPDATE without NOTIFY), refresh in the background. */
        if (!w->ss_fetching && tp_now_ms() - w->ss_fetched_ms >= 1000)
            ss_fetch(w);
        cont(r);
        return;
    }
    /* Never read, or a sync was announced since: wait for a fresh read. */
    r->cont = cont;
    r->next = w->ss_waiters;
    w->ss_waiters = r;
    if (!w->ss_fetching)
        ss_fetch(w);
}

void syncstate_refresh(worker_t *w)
{
    if (!w->ss_fetching &&
        (!w->ss_ok || w->ss_epoch != epoch_now() || tp_now_ms() - w->ss_fetched_ms >= 1000))
        ss_fetch(w);
}

void freshness_headers(worker_t *w, const defgen_t *g, int ds_idx, centry_t *meta)
{
    const tp_defs_dataset_t *ds = &g->set->datasets[ds_idx];
    meta->last_modified[0] = meta->generation[0] = '\0';
    int64_t last = 0;
    size_t off = 0;
    for (size_t i = 0; i < ds->n_requires; i++) {
        int idx = g->job_idx[ds_idx][i];
        const jobstate_t *j = idx >= 0 ? &w->jobs[idx] : NULL;
        int64_t gen = j && j->known ? j->generation : 0;
        if (j && j->known && j->last_success_ms > last)
            last = j->last_success_ms;
        if (ds->n_requires == 1)
            snprintf(meta->generation, sizeof meta->generation, "%lld", (long long)gen);
        else if (off < sizeof meta->generation)
            off += (size_t)snprintf(meta->generation + off, sizeof meta->generation - off, "%s%s:%lld",
                                    i ? "," : "", ds->requires[i], (long long)gen);
    }
    if (last > 0)
        http_date(last, meta->last_modified, sizeof meta->last_modified);
}

/* ---- replies ---- */

static bool etag_matches(const char *inm, const char *etag)
{
    if (!inm)
        return false;
    if (strcmp(inm, "*") == 0)
        return true;
    /* A list of (possibly weak, W/"...") tags: ours are quoted 16-hex strings,
     * so finding one inside the list is an exact tag match. */
    return strstr(inm, etag) != NULL;
}

static void send_entry(rq_t *r, const centry_t *e, const char *body, size_t len, const char *source)
{
    rq_header(r, "ETag", e->etag);
    if (e->last_modified[0])
        rq_header(r, "Last-Modified", e->last_modified);
    if (e->generation[0])
        rq_header(r, "X-Tidepool-Generation", e->generation);
    rq_header(r, "X-Tidepool-Source", source);
    rq_header(r, "Cache-Control", "private, no-cache");
    rq_header(r, "Vary", "Accept");
    if (etag_matches(rq_in_header(r, "If-None-Match"), e->etag)) {
        rq_reply(r, 304, NULL, NULL, 0);
        return;
    }
    rq_reply(r, 200, e->ctype, body, len);
}

static void set_etag(centry_t *e, const char *body, size_t len)
{
    snprintf(e->etag, sizeof e->etag, "\"%016llx\"", (unsigned long long)hash64(body, len));
}

void send_body(rq_t *r, const char *body, size_t len, const char *ctype, const char *source)
{
    centry_t e = {0};
    e.ctype = ctype;
    set_etag(&e, body, len);
    send_entry(r, &e, body, len, source);
}

/* ---- list ---- */

static void list_cont(rq_t *r)
{
    const tp_defs_set_t *s = r->gen->set;
    tp_buf_t b = {0};
    tp_buf_putc(&b, '[');
    int64_t now = tp_wall_ms();
    bool first = true;
    for (size_t i = 0; i < s->n_datasets; i++) {
        const tp_defs_dataset_t *ds = &s->datasets[i];
        if (!rq_allowed(r, ds->roles, ds->n_roles))
            continue; /* only what the caller may read */
        if (!first)
            tp_buf_putc(&b, ',');
        first = false;
        tp_buf_puts(&b, "{\"name\":");
        tp_buf_json_str(&b, ds->name);
        tp_buf_puts(&b, ",\"description\":");
        if (ds->description)
            tp_buf_json_str(&b, ds->description);
        else
            tp_buf_puts(&b, "null");
        tp_buf_puts(&b, ",\"params\":[");
        for (size_t k = 0; k < ds->n_params; k++) {
            const tp_defs_param_t *p = &ds->params[k];
            tp_buf_printf(&b, "%s{\"name\":", k ? "," : "");
            tp_buf_json_str(&b, p->name);
            tp_buf_puts(&b, ",\"type\":");
            tp_buf_json_str(&b, tp_defs_type_name(p->type));
            tp_buf_printf(&b, ",\"required\":%s,\"default\":", p->has_default ? "false" : "true");
            if (p->default_text)
                tp_buf_json_str(&b, p->default_text);
            else
                tp_buf_puts(&b, "null");
            tp_buf_putc(&b, '}');
        }
        tp_buf_puts(&b, "],\"roles\":[");
        for (size_t k = 0; k < ds->n_roles; k++) {
            if (k)
                tp_buf_putc(&b, ',');
            tp_buf_json_str(&b, ds->roles[k]);
        }
        tp_buf_puts(&b, "],\"requires\":[");
        for (size_t k = 0; k < ds->n_requires; k++) {
            const int idx = r->gen->job_idx[i][k];
            const jobstate_t *j = idx >= 0 ? &r->w->jobs[idx] : NULL;
            tp_buf_printf(&b, "%s{\"job\":", k ? "," : "");
            tp_buf_json_str(&b, ds->requires[k]);
            if (j && j->known) {
                tp_buf_printf(&b, ",\"generation\":%lld", (long long)j->generation);
                if (j->last_success_ms > 0)
                    tp_buf_printf(&b, ",\"last_success_ms\":%lld,\"age_seconds\":%.3f",
                                  (long long)j->last_success_ms,
                                  (double)(now - j->last_success_ms) / 1000.0);
                else
                    tp_buf_puts(&b, ",\"last_success_ms\":null,\"age_seconds\":null");
            } else {
                tp_buf_puts(&b, ",\"generation\":null,\"last_success_ms\":null,\"age_seconds\":null");
            }
            tp_buf_putc(&b, '}');
        }
        tp_buf_printf(&b, "],\"cache_seconds\":%.3f,\"max_staleness_seconds\":%.3f,"
                          "\"sources\":{\"postgres\":%s,\"warehouse\":%s}}",
                      (double)ds->cache_ms / 1000.0, (double)ds->max_staleness_ms / 1000.0,
                      ds->has_pg ? "true" : "false", ds->has_wh ? "true" : "false");
    }
    tp_buf_putc(&b, ']');
    send_body(r, b.data, b.len, "application/json", "postgres");
    tp_buf_free(&b);
}

void h_datasets(rq_t *r)
{
    syncstate_then(r, list_cont);
}

/* ---- one dataset ---- */

static bool is_reserved(const char *k)
{
    return strcmp(k, "shape") == 0 || strcmp(k, "fresh") == 0 || strcmp(k, "source") == 0;
}

static void unknown_param(rq_t *r, const char *name)
{
    tp_buf_t d = {0};
    tp_buf_printf(&d, "dataset %s has no parameter %s", r->ds->name, name);
    rq_problem(r, 400, "unknown-parameter", d.data, name, "unknown parameter", 0);
    tp_buf_free(&d);
}

/* Text of a JSON scalar for a parameter; NULL (problem sent) for objects/arrays. */
static char *json_param_text(rq_t *r, const char *name, json_t *v, bool *is_null)
{
    *is_null = false;
    if (json_is_string(v))
        return tp_xstrndup(json_string_value(v), json_string_length(v));
    if (json_is_integer(v))
        return tp_xasprintf("%lld", (long long)json_integer_value(v));
    if (json_is_real(v))
        return tp_xasprintf("%.17g", json_real_value(v));
    if (json_is_boolean(v))
        return tp_xstrdup(json_is_true(v) ? "true" : "false");
    if (json_is_null(v)) {
        *is_null = true;
        return NULL;
    }
    rq_problem(r, 422, "invalid-value", "parameters must be strings, numbers or booleans", name,
               "must be a scalar", 0);
    return NULL;
}

static bool content_type_json(const char *ct)
{
    if (!ct)
        return false;
    while (*ct == ' ')
        ct++;
    return strncasecmp(ct, "application/json", 16) == 0 &&
           (ct[16] == '\0' || ct[16] == ';' || ct[16] == ' ');
}

static void flight_run(rq_t *r);
static void flight_gone(rq_t *r);
static void flight_done(PGresult *res, const char *err, void *arg);

void h_dataset(rq_t *r, const char *name)
{
    const tp_defs_set_t *set = r->gen->set;
    const tp_defs_dataset_t *ds = tp_defs_dataset_find(set, name);
    if (!ds) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "no dataset is called %s", name);
        rq_problem(r, 404, "unknown-dataset", d.data, NULL, NULL, 0);
        tp_buf_free(&d);
        return;
    }
    r->ds = ds;
    r->ds_idx = (int)(ds - set->datasets);
    if (!rq_authorize(r, ds->roles, ds->n_roles))
        return;
    const char *src = rq_q(r, "source");
    if (src && strcmp(src, "postgres") != 0 && strcmp(src, "warehouse") != 0) {
        rq_problem(r, 400, "invalid-parameter", "source must be postgres or warehouse", "source",
                   "must be postgres or warehouse", 0);
        return;
    }
    /* Gather the request's raw texts per parameter. */
    size_t np = ds->n_params;
    char **raw = tp_xcalloc(np ? np : 1, sizeof(char *));
    bool *given = tp_xcalloc(np ? np : 1, sizeof(bool));
    bool *nul = tp_xcalloc(np ? np : 1, sizeof(bool));
    tp_defs_value_t *vals = tp_xcalloc(np ? np : 1, sizeof *vals);
    bool ok = true;
    json_t *root = NULL;
    if (evhttp_request_get_command(r->req) == EVHTTP_REQ_POST) {
        char *body = NULL;
        size_t blen = 0;
        const char *ct = rq_in_header(r, "Content-Type");
        struct evbuffer *in = evhttp_request_get_input_buffer(r->req);
        if (evbuffer_get_length(in) > 0 && !content_type_json(ct)) {
            rq_problem(r, 415, "unsupported-media-type",
                       "POST a JSON object of parameters with Content-Type: application/json",
                       "Content-Type", "must be application/json", 0);
            ok = false;
        } else if (!rq_body(r, &body, &blen)) {
            ok = false;
        } else if (blen > 0) {
            json_error_t je;
            root = json_loadb(body, blen, JSON_REJECT_DUPLICATES, &je);
            if (!root) {
                tp_buf_t d = {0};
                tp_buf_printf(&d, "malformed JSON at line %d column %d: %s", je.line, je.column,
                              je.text);
                rq_problem(r, 400, "malformed-json", d.data, "body", je.text, 0);
                tp_buf_free(&d);
                ok = false;
            } else if (!json_is_object(root)) {
                rq_problem(r, 400, "malformed-json", "the body must be a JSON object of parameters",
                           "body", "must be a JSON object", 0);
                ok = false;
            }
        }
        free(body);
        if (ok && root) {
            const char *k;
            json_t *v;
            json_object_foreach(root, k, v)
            {
                int idx = tp_defs_param_find(ds, k);
                if (idx < 0) {
                    unknown_param(r, k);
                    ok = false;
                    break;
                }
                raw[idx] = json_param_text(r, k, v, &nul[idx]);
                if (!raw[idx] && !nul[idx]) {
                    ok = false;
                    break;
                }
                given[idx] = true;
            }
        }
    }
    for (size_t i = 0; ok && i < r->nq; i++) {
        const char *k = r->q[i].key;
        if (is_reserved(k))
            continue;
        int idx = tp_defs_param_find(ds, k);
        if (idx < 0) {
            unknown_param(r, k);
            ok = false;
            break;
        }
        if (given[idx]) {
            rq_problem(r, 400, "duplicate-parameter", "a parameter was given more than once", k,
                       "given more than once", 0);
            ok = false;
            break;
        }
        raw[idx] = tp_xstrdup(r->q[i].val);
        given[idx] = true;
    }
    /* Validate and apply defaults. */
    tp_buf_t key = {0};
    if (ok) {
        /* The role part: the principal's roles (answers never depend on more). */
        tp_buf_printf(&key, "%s\x1f%d\x1f", ds->name, (int)r->fmt);
        for (char **ro = r->auth.principal->roles; ro && *ro; ro++)
            tp_buf_printf(&key, "%s+", *ro);
        for (size_t i = 0; i < np && ok; i++) {
            const tp_defs_param_t *p = &ds->params[i];
            const char *why = NULL;
            if (!given[i] || nul[i]) {
                if (!given[i] && !p->has_default) {
                    tp_buf_t d = {0};
                    tp_buf_printf(&d, "parameter %s (%s) is required", p->name,
                                  tp_defs_type_name(p->type));
                    rq_problem(r, 422, "missing-parameter", d.data, p->name, "is required", 0);
                    tp_buf_free(&d);
                    ok = false;
                    break;
                }
                if (nul[i] && !(p->has_default && p->dflt.is_null)) {
                    rq_problem(r, 422, "invalid-value", "this parameter cannot be null", p->name,
                               "must not be null", 0);
                    ok = false;
                    break;
                }
                vals[i] = p->dflt;
                free(raw[i]);
                raw[i] = p->default_text ? tp_xstrdup(p->default_text) : NULL;
                if (nul[i] || p->dflt.is_null) {
                    vals[i].is_null = true;
                    free(raw[i]);
                    raw[i] = NULL;
                }
            } else if (!tp_defs_value_parse(p->type, raw[i], &vals[i], &why)) {
                tp_buf_t d = {0};
                tp_buf_printf(&d, "parameter %s %s", p->name, why);
                rq_problem(r, 422, "invalid-value", d.data, p->name, why, 0);
                tp_buf_free(&d);
                ok = false;
                break;
            } else if (p->type == TP_DEFS_STRING && !utf8_valid(raw[i], strlen(raw[i]))) {
                rq_problem(r, 400, "invalid-parameter", "parameter is not valid UTF-8", p->name,
                           "is not valid UTF-8", 0);
                ok = false;
                break;
            }
            tp_buf_putc(&key, '\x1f');
            if (vals[i].is_null)
                tp_buf_puts(&key, "\x1e");
            else
                tp_buf_puts(&key, tp_defs_value_text(&vals[i], raw[i] ? raw[i] : ""));
        }
    }
    if (ok) {
        const tp_defs_body_t *b = &ds->pg;
        r->nvals = (int)b->n_names;
        r->vals = tp_xcalloc(b->n_names ? b->n_names : 1, sizeof(char *));
        for (size_t k = 0; k < b->n_names; k++) {
            size_t pi = b->index[k];
            r->vals[k] = vals[pi].is_null ? NULL
                                          : tp_xstrdup(tp_defs_value_text(&vals[pi], raw[pi] ? raw[pi] : ""));
        }
        r->key = tp_buf_steal(&key);
    }
    tp_buf_free(&key);
    /* Warehouse-only, ?source=, @covers, staleness: fallback_routes.c decides. */
    bool taken = ok && fb_dataset(r, vals, (const char *const *)raw);
    for (size_t i = 0; i < np; i++)
        free(raw[i]);
    free(raw);
    free(given);
    free(nul);
    free(vals);
    json_decref(root);
    if (ok && !taken)
        dataset_postgres(r);
}

void dataset_postgres(rq_t *r)
{
    const tp_defs_dataset_t *ds = r->ds;
    worker_t *w = r->w;
    if (!r->bypass) {
        const centry_t *e = cache_get(w->cache, r->key);
        if (e) {
            send_entry(r, e, e->body, e->len, "cache");
            return;
        }
        for (flight_t *f = w->flights; f; f = f->next) {
            if (f->key && strcmp(f->key, r->key) == 0) {
                /* Join: answered when the leader's query completes. */
                rq_t **pp = &f->waiters;
                while (*pp)
                    pp = &(*pp)->fnext;
                *pp = r;
                r->flight = f;
                atomic_fetch_add_explicit(&w->m.flights_joined, 1, memory_order_relaxed);
                rq_watch_gone(r, flight_gone);
                return;
            }
        }
    }
    flight_t *f = tp_xcalloc(1, sizeof *f);
    f->magic = FLIGHT_MAGIC;
    f->w = w;
    f->key = r->bypass ? NULL : tp_xstrdup(r->key);
    f->fill_epoch = epoch_now();
    f->waiters = r;
    f->ds_idx = r->ds_idx;
    f->ttl_ms = ds->cache_ms;
    f->njobs = ds->n_requires;
    f->jobs = tp_xcalloc(f->njobs ? f->njobs : 1, sizeof(int));
    if (f->njobs)
        memcpy(f->jobs, r->gen->job_idx[r->ds_idx], f->njobs * sizeof(int));
    f->next = w->flights;
    w->flights = f;
    r->flight = f;
    rq_watch_gone(r, flight_gone);
    syncstate_then(r, flight_run);
}

/* A waiter's client left: once all have, the statement is cancelled and
 * flight_done answers them all (499). */
static void flight_gone(rq_t *r)
{
    flight_t *f = r->flight;
    for (rq_t *q = f->waiters; q; q = q->fnext)
        if (!q->gone)
            return;
    tp_pgpool_abort(f->pgh);
}

static void flight_unlink(flight_t *f)
{
    flight_t **pp = &f->w->flights;
    while (*pp && *pp != f)
        pp = &(*pp)->next;
    if (*pp)
        *pp = f->next;
}

static void flight_fail_refused(flight_t *f, tp_pg_submit_t s)
{
    flight_unlink(f);
    rq_t *list = f->waiters;
    while (list) {
        rq_t *r = list;
        list = r->fnext;
        rq_pool_refused(r, s);
    }
    free(f->key);
    free(f->jobs);
    free(f);
}

static void flight_run(rq_t *r)
{
    flight_t *f = r->flight;
    const tp_defs_body_t *b = &r->ds->pg;
    unsigned types[b->n_names > 0 ? b->n_names : 1];
    for (size_t k = 0; k < b->n_names; k++)
        types[k] = tp_defs_type_oid(r->ds->params[b->index[k]].type);
    tp_pg_submit_t s = tp_pgpool_query(r->w->pool, b->sql, r->nvals, types,
                                       (const char *const *)r->vals, flight_done, f, &f->pgh);
    if (s != TP_PG_QUEUED)
        flight_fail_refused(f, s);
}

static void flight_done(PGresult *res, const char *err, void *arg)
{
    flight_t *f = arg;
    if (f->magic != FLIGHT_MAGIC)
        abort();
    flight_unlink(f);
    rq_t *list = f->waiters;
    if (err) {
        while (list) {
            rq_t *r = list;
            list = r->fnext;
            rq_pg_error(r, res, err);
        }
    } else {
        rq_t *leader = list;
        tp_buf_t b = {0};
        encode_result(res, leader->fmt, &b);
        centry_t meta = {0};
        meta.ctype = fmt_ctype(leader->fmt);
        set_etag(&meta, b.data, b.len);
        freshness_headers(f->w, leader->gen, f->ds_idx, &meta);
        while (list) {
            rq_t *r = list;
            list = r->fnext;
            send_entry(r, &meta, b.data, b.len, "postgres");
        }
        if (f->key && f->ttl_ms > 0) {
            size_t len = b.len;
            cache_put(f->w->cache, f->key, tp_buf_steal(&b), len, &meta, f->fill_epoch, f->ttl_ms,
                      f->jobs, f->njobs);
        }
        tp_buf_free(&b);
    }
    free(f->key);
    free(f->jobs);
    free(f);
}
