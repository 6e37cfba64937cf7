/* Fallback reads (include/tidepool/fallback.h): the routing decision, the
 * process-wide statement registry and the in-memory warehouse results.
 *
 * Objects, all under fb->lock (hash-indexed): flights (one warehouse
 * statement, keyed by dataset + parameters [+ owner and token digest for
 * @obo]), handles (what a requester polls), waiters (a request waiting with a
 * budget, with its own event on its own loop) and the result cache (LRU by
 * bytes, TTL). A flight's statement is only touched on the loop that started
 * it; other loops mark interest and that loop's sweep timer acts on it.
 * Completion wakes waiters with event_active (the server enables evthread).
 * A flight lives while it runs or a handle refers to it.
 *
 * Not here: HTTP (the server maps outcomes to responses), persistence
 * (handles die with the process), results over max_result_bytes (413). */
#include "tidepool/fallback.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <openssl/evp.h>

#include "tidepool/isots.h"
#include "tidepool/log.h"

#define FLIGHT_MAGIC 0x46424c54u
#define WAITER_MAGIC 0x46425754u
#define LOOP_MAGIC 0x46424c50u
#define BUSY_RETRY_S 2

/* ---- routing ---- */

static const char *const reason_names[] = {
    [TP_FB_REASON_FRESH] = "fresh",
    [TP_FB_REASON_ASKED_POSTGRES] = "requested-postgres",
    [TP_FB_REASON_NO_TWIN] = "no-warehouse-twin",
    [TP_FB_REASON_WAREHOUSE_ONLY] = "warehouse-only",
    [TP_FB_REASON_REQUESTED] = "requested",
    [TP_FB_REASON_POSTGRES_DOWN] = "postgres-unavailable",
    [TP_FB_REASON_NEVER_SYNCED] = "never-synced",
    [TP_FB_REASON_STALE] = "stale",
    [TP_FB_REASON_COVERS] = "covers",
};

const char *tp_fb_reason_name(tp_fb_reason_t r)
{
    return (size_t)r < TP_ARRAY_LEN(reason_names) ? reason_names[r] : "unknown";
}

static tp_fb_route_t route_to(const tp_defs_dataset_t *ds, tp_fb_reason_t why)
{
    tp_fb_route_t r = {.source = TP_FB_SRC_WAREHOUSE, .reason = why};
    if (!ds->has_wh) {
        r.source = why == TP_FB_REASON_REQUESTED ? TP_FB_SRC_NONE : TP_FB_SRC_POSTGRES;
        r.reason = why == TP_FB_REASON_REQUESTED ? why : TP_FB_REASON_NO_TWIN;
    }
    return r;
}

tp_fb_route_t tp_fb_route(const tp_fb_route_in_t *in)
{
    const tp_defs_dataset_t *ds = in->ds;
    tp_fb_route_t r = {.source = TP_FB_SRC_POSTGRES, .reason = TP_FB_REASON_FRESH};
    if (in->source && strcmp(in->source, "postgres") == 0) {
        r.reason = TP_FB_REASON_ASKED_POSTGRES;
        if (!ds->has_pg)
            r.source = TP_FB_SRC_NONE;
        snprintf(r.detail, sizeof r.detail, "the client asked for postgres");
        return r;
    }
    if (!ds->has_pg) {
        r = route_to(ds, TP_FB_REASON_WAREHOUSE_ONLY);
        snprintf(r.detail, sizeof r.detail, "%s has only a warehouse definition", ds->name);
        return r;
    }
    if (in->source && strcmp(in->source, "warehouse") == 0) {
        r = route_to(ds, TP_FB_REASON_REQUESTED);
        snprintf(r.detail, sizeof r.detail, "the client asked for the warehouse");
        return r;
    }
    if (in->postgres_down) {
        r = route_to(ds, TP_FB_REASON_POSTGRES_DOWN);
        snprintf(r.detail, sizeof r.detail, "postgres is unavailable");
        return r;
    }
    for (size_t i = 0; in->jobs && i < ds->n_requires; i++) {
        const tp_fb_job_fact_t *j = &in->jobs[i];
        if (!j->known || j->last_success_ms <= 0) {
            r = route_to(ds, TP_FB_REASON_NEVER_SYNCED);
            snprintf(r.detail, sizeof r.detail, "sync job %s never succeeded", ds->requires[i]);
            return r;
        }
        int64_t age = in->now_ms - j->last_success_ms;
        if (ds->max_staleness_ms > 0 && age > ds->max_staleness_ms) {
            r = route_to(ds, TP_FB_REASON_STALE);
            snprintf(r.detail, sizeof r.detail, "sync job %s last succeeded %llds ago",
                     ds->requires[i], (long long)(age / 1000));
            return r;
        }
    }
    int c = in->values ? tp_defs_covers_exceeded(ds, in->values, in->now_ms) : -1;
    if (c >= 0) {
        r = route_to(ds, TP_FB_REASON_COVERS);
        snprintf(r.detail, sizeof r.detail, "parameter %s reaches past what postgres holds",
                 ds->params[ds->covers[c].param].name);
    }
    return r;
}

/* ---- results ---- */

struct tp_fb_result {
    atomic_int refs;
    size_t ncols;
    char **names, **types;
    size_t nrows;
    tp_buf_t data;     /* every cell's bytes, back to back */
    size_t *off;       /* cell i is data[off[i] .. off[i+1]) */
    unsigned char *isnull;
    size_t ncells, cap;
    bool truncated;
};

static tp_fb_result_t *result_new(const tp_wh_manifest_t *m)
{
    tp_fb_result_t *r = tp_xcalloc(1, sizeof *r);
    atomic_init(&r->refs, 1);
    r->ncols = m->n_columns;
    r->names = tp_xcalloc(r->ncols ? r->ncols : 1, sizeof(char *));
    r->types = tp_xcalloc(r->ncols ? r->ncols : 1, sizeof(char *));
    for (size_t i = 0; i < r->ncols; i++) {
        r->names[i] = tp_xstrdup(m->columns[i].name);
        r->types[i] = tp_xstrdup(m->columns[i].type_name ? m->columns[i].type_name : "STRING");
    }
    r->truncated = m->truncated;
    r->cap = 64;
    r->off = tp_xcalloc(r->cap + 1, sizeof(size_t));
    r->isnull = tp_xcalloc(r->cap, 1);
    tp_buf_init(&r->data);
    return r;
}

static void result_add_cell(tp_fb_result_t *r, const char *v, size_t len)
{
    if (r->ncells == r->cap) {
        r->cap *= 2;
        r->off = tp_xrealloc(r->off, (r->cap + 1) * sizeof(size_t));
        r->isnull = tp_xrealloc(r->isnull, r->cap);
    }
    r->isnull[r->ncells] = v == NULL;
    if (v)
        tp_buf_append(&r->data, v, len);
    r->ncells++;
    r->off[r->ncells] = r->data.len;
}

size_t tp_fb_result_rows(const tp_fb_result_t *r)
{
    return r->nrows;
}

size_t tp_fb_result_bytes(const tp_fb_result_t *r)
{
    return r->data.len + r->cap * (sizeof(size_t) + 1) + r->ncols * 32 + sizeof *r;
}

tp_fb_result_t *tp_fb_result_ref(tp_fb_result_t *r)
{
    if (r)
        atomic_fetch_add(&r->refs, 1);
    return r;
}

void tp_fb_result_release(tp_fb_result_t *r)
{
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1)
        return;
    for (size_t i = 0; i < r->ncols; i++) {
        free(r->names[i]);
        free(r->types[i]);
    }
    free(r->names);
    free(r->types);
    free(r->off);
    free(r->isnull);
    tp_buf_free(&r->data);
    free(r);
}

enum { K_STR, K_NUM, K_BOOL, K_TS, K_TSTZ };

static int kind_of(const char *type_name)
{
    static const char *const nums[] = {"INT", "LONG", "SHORT", "BYTE", "FLOAT", "DOUBLE", "DECIMAL"};
    for (size_t i = 0; i < TP_ARRAY_LEN(nums); i++)
        if (strcmp(type_name, nums[i]) == 0)
            return K_NUM;
    if (strcmp(type_name, "TIMESTAMP") == 0)
        return K_TSTZ;
    if (strcmp(type_name, "TIMESTAMP_NTZ") == 0)
        return K_TS;
    return strcmp(type_name, "BOOLEAN") == 0 ? K_BOOL : K_STR;
}

/* The canonical form (tidepool/isots.h) of a TIMESTAMP[_NTZ] cell in out and
 * its length, so the answer matches Postgres' byte for byte; 0 for other
 * kinds or text that is not an ISO 8601 timestamp (sent as it came). */
static size_t canon_ts(const char *v, size_t n, int kind, char out[TP_ISOTS_MAX])
{
    return kind == K_TS || kind == K_TSTZ ? tp_isots_canon(v, n, kind == K_TSTZ, out) : 0;
}

/* Appends a JSON string of n bytes (which may hold NUL) to b. */
static void json_strn(tp_buf_t *b, const char *s, size_t n)
{
    if (memchr(s, '\0', n) == NULL) {
        char *tmp = tp_xstrndup(s, n);
        tp_buf_json_str(b, tmp);
        free(tmp);
        return;
    }
    tp_buf_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            tp_buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            tp_buf_printf(b, "\\u%04x", c);
        else
            tp_buf_putc(b, (char)c);
    }
    tp_buf_putc(b, '"');
}

static bool plain_number(const char *s, size_t n)
{
    /* JSON number grammar, loosely: sign, digits, '.', exponent; no NaN/Infinity. */
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789+-.eE", s[i]))
            return false;
    return s[n - 1] >= '0' && s[n - 1] <= '9' && (s[0] == '-' || (s[0] >= '0' && s[0] <= '9'));
}

static void json_cell(tp_buf_t *b, const tp_fb_result_t *r, size_t cell, int kind)
{
    if (r->isnull[cell]) {
        tp_buf_puts(b, "null");
        return;
    }
    const char *v = r->data.data + r->off[cell];
    size_t n = r->off[cell + 1] - r->off[cell];
    char ts[TP_ISOTS_MAX];
    size_t tn = canon_ts(v, n, kind, ts);
    if (tn > 0) {
        tp_buf_putc(b, '"');
        tp_buf_append(b, ts, tn);
        tp_buf_putc(b, '"');
    } else if (kind == K_NUM && plain_number(v, n))
        tp_buf_append(b, v, n);
    else if (kind == K_BOOL && (n == 4 || n == 5))
        tp_buf_puts(b, v[0] == 't' ? "true" : "false");
    else
        json_strn(b, v, n);
}

static void csv_cell(tp_buf_t *b, const char *v, size_t n)
{
    if (!memchr(v, ',', n) && !memchr(v, '"', n) && !memchr(v, '\r', n) && !memchr(v, '\n', n)) {
        tp_buf_append(b, v, n);
        return;
    }
    tp_buf_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '"')
            tp_buf_putc(b, '"');
        tp_buf_putc(b, v[i]);
    }
    tp_buf_putc(b, '"');
}

void tp_fb_result_encode(const tp_fb_result_t *r, tp_fb_shape_t shape, tp_buf_t *out)
{
    size_t nc = r->ncols;
    int kinds[nc ? nc : 1];
    for (size_t c = 0; c < nc; c++)
        kinds[c] = kind_of(r->types[c]);
    tp_buf_reserve(out, r->data.len + r->ncells * 4 + 64);
    if (shape == TP_FB_CSV) {
        for (size_t c = 0; c < nc; c++) {
            if (c)
                tp_buf_putc(out, ',');
            csv_cell(out, r->names[c], strlen(r->names[c]));
        }
        tp_buf_puts(out, "\r\n");
        for (size_t i = 0; i < r->ncells; i++) {
            if (i % nc)
                tp_buf_putc(out, ',');
            if (!r->isnull[i]) {
                const char *v = r->data.data + r->off[i];
                size_t n = r->off[i + 1] - r->off[i];
                char ts[TP_ISOTS_MAX];
                size_t tn = canon_ts(v, n, kinds[i % nc], ts);
                if (tn > 0)
                    tp_buf_append(out, ts, tn);
                else
                    csv_cell(out, v, n);
            }
            if (i % nc == nc - 1)
                tp_buf_puts(out, "\r\n");
        }
        return;
    }
    if (shape == TP_FB_COLUMNS) {
        tp_buf_putc(out, '{');
        for (size_t c = 0; c < nc; c++) {
            tp_buf_puts(out, c ? ",": "");
            tp_buf_json_str(out, r->names[c]);
            tp_buf_puts(out, ":[");
            for (size_t row = 0; row < r->nrows; row++) {
                if (row)
                    tp_buf_putc(out, ',');
                json_cell(out, r, row * nc + c, kinds[c]);
            }
            tp_buf_putc(out, ']');
        }
        tp_buf_putc(out, '}');
        return;
    }
    tp_buf_putc(out, '[');
    for (size_t row = 0; row < r->nrows; row++) {
        tp_buf_puts(out, row ? ",{" : "{");
        for (size_t c = 0; c < nc; c++) {
            if (c)
                tp_buf_putc(out, ',');
            tp_buf_json_str(out, r->names[c]);
            tp_buf_putc(out, ':');
            json_cell(out, r, row * nc + c, kinds[c]);
        }
        tp_buf_putc(out, '}');
    }
    tp_buf_putc(out, ']');
}

/* ---- a string-keyed hash index (keys are borrowed from the values) ---- */

typedef struct ixnode {
    uint64_t h;
    const char *key;
    void *val;
    struct ixnode *next;
} ixnode_t;

typedef struct ix {
    ixnode_t **b;
    size_t nb, n;
} ix_t;

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static void ix_grow(ix_t *ix)
{
    size_t nb = ix->nb ? ix->nb * 2 : 64;
    ixnode_t **b = tp_xcalloc(nb, sizeof *b);
    for (size_t i = 0; i < ix->nb; i++)
        for (ixnode_t *n = ix->b[i], *next; n; n = next) {
            next = n->next;
            n->next = b[n->h & (nb - 1)];
            b[n->h & (nb - 1)] = n;
        }
    free(ix->b);
    ix->b = b;
    ix->nb = nb;
}

static void ix_put(ix_t *ix, const char *key, void *val)
{
    if (ix->n >= ix->nb)
        ix_grow(ix);
    ixnode_t *n = tp_xmalloc(sizeof *n);
    n->h = fnv1a(key);
    n->key = key;
    n->val = val;
    n->next = ix->b[n->h & (ix->nb - 1)];
    ix->b[n->h & (ix->nb - 1)] = n;
    ix->n++;
}

static void *ix_get(const ix_t *ix, const char *key)
{
    if (!ix->nb)
        return NULL;
    uint64_t h = fnv1a(key);
    for (ixnode_t *n = ix->b[h & (ix->nb - 1)]; n; n = n->next)
        if (n->h == h && strcmp(n->key, key) == 0)
            return n->val;
    return NULL;
}

/* Removes the entry for key whose value is val (no-op when absent). */
static void ix_del(ix_t *ix, const char *key, const void *val)
{
    if (!ix->nb)
        return;
    uint64_t h = fnv1a(key);
    for (ixnode_t **pp = &ix->b[h & (ix->nb - 1)]; *pp; pp = &(*pp)->next)
        if ((*pp)->val == val) {
            ixnode_t *n = *pp;
            *pp = n->next;
            free(n);
            ix->n--;
            return;
        }
}

static void ix_free(ix_t *ix)
{
    for (size_t i = 0; i < ix->nb; i++)
        for (ixnode_t *n = ix->b[i], *next; n; n = next) {
            next = n->next;
            free(n);
        }
    free(ix->b);
    memset(ix, 0, sizeof *ix);
}

/* ---- registry objects ---- */

typedef struct handle handle_t;
typedef struct flight flight_t;

struct tp_fb_waiter {
    uint32_t magic;
    tp_fb_t *fb;
    tp_fb_loop_t *lp; /* the waiter's loop (where ev lives) */
    handle_t *h;
    struct event *ev;
    tp_fb_wait_fn fn;
    void *arg;
    tp_fb_waiter_t *next; /* flight's waiters */
};

struct handle {
    char id[33];
    char *owner;
    flight_t *f;
    bool exposed; /* its id was given out (PENDING): polls keep it alive */
    bool deleted;
    int64_t touched_ms;
    int nwaiters;
    handle_t *next, *prev; /* fb->handles */
    handle_t *fnext; /* f->handles */
};

struct flight {
    uint32_t magic;
    tp_fb_t *fb;
    tp_fb_loop_t *lp; /* owner loop; NULL once done */
    char *key;
    char *label;
    tp_wh_stmt_t *st; /* owner loop only */
    bool done;
    bool cacheable;
    bool too_large;
    bool counted;           /* counts in fb->st.in_flight (until done or cancelled) */
    const char *cancel_why; /* set when we cancelled it */
    int64_t max_bytes;
    tp_fb_result_t *building; /* owner loop only, until done */
    tp_fb_result_t *result;
    tp_fb_problem_t problem;
    int64_t started_ms, finished_ms;
    int refs; /* handles + 1 while running */
    tp_fb_waiter_t *waiters;
    handle_t *handles;
    flight_t *next; /* fb->flights (all live flights) */
};

typedef struct centry {
    char *key;
    tp_fb_result_t *result;
    size_t bytes;
    int64_t expires_ms;
    struct centry *prev, *next; /* LRU: head is most recent */
} centry_t;

struct tp_fb {
    pthread_mutex_t lock;
    tp_fb_config_t cfg;
    char *catalog, *schema;
    flight_t *flights;
    handle_t *handles;
    centry_t *lru_head, *lru_tail;
    ix_t cache_ix;  /* key -> centry */
    ix_t handle_ix; /* id -> handle */
    ix_t flight_ix; /* key -> flight that a request may still join */
    tp_fb_stats_t st;
};

struct tp_fb_loop {
    uint32_t magic;
    tp_fb_t *fb;
    struct event_base *base;
    tp_wh_t *wh;
    struct event *sweep;
};

/* ---- problems and outcomes ---- */

static void problem_set(tp_fb_problem_t *p, int status, const char *code, const char *stmt_id,
                        int retry_after_s, const char *fmt, ...) TP_PRINTF(6, 7);
static void problem_set(tp_fb_problem_t *p, int status, const char *code, const char *stmt_id,
                        int retry_after_s, const char *fmt, ...)
{
    p->status = status;
    p->code = code;
    p->retry_after_s = retry_after_s;
    free(p->detail);
    va_list ap;
    va_start(ap, fmt);
    p->detail = tp_xvasprintf(fmt, ap);
    va_end(ap);
    free(p->warehouse_statement_id);
    p->warehouse_statement_id = stmt_id ? tp_xstrdup(stmt_id) : NULL;
}

static void problem_copy(tp_fb_problem_t *dst, const tp_fb_problem_t *src)
{
    *dst = *src;
    dst->detail = src->detail ? tp_xstrdup(src->detail) : NULL;
    dst->warehouse_statement_id =
        src->warehouse_statement_id ? tp_xstrdup(src->warehouse_statement_id) : NULL;
}

static void problem_clear(tp_fb_problem_t *p)
{
    free(p->detail);
    free(p->warehouse_statement_id);
    memset(p, 0, sizeof *p);
}

void tp_fb_outcome_clear(tp_fb_outcome_t *o)
{
    if (!o)
        return;
    tp_fb_result_release(o->result);
    problem_clear(&o->problem);
    memset(o, 0, sizeof *o);
}

/* Maps how the warehouse statement ended to an HTTP problem (DESIGN §8, issue 6). */
static void map_failure(flight_t *f, const tp_wh_result_t *res)
{
    const char *id = res->statement_id;
    const char *msg = res->message ? res->message : "no message";
    tp_fb_problem_t *p = &f->problem;
    if (f->too_large) {
        problem_set(p, 413, "result-too-large", id, 0,
                    "the warehouse result is larger than warehouse.max_result_bytes (%lld bytes); "
                    "ask for a narrower range or fewer rows",
                    (long long)f->max_bytes);
        return;
    }
    if (f->cancel_why) {
        problem_set(p, 503, "statement-cancelled", id, 0, "the statement was cancelled: %s",
                    f->cancel_why);
        return;
    }
    bool param = (res->sql_state && strncmp(res->sql_state, "22", 2) == 0) ||
                 (res->error_code && strcmp(res->error_code, "INVALID_PARAMETER_VALUE") == 0);
    switch (res->status) {
    case TP_WH_FAILED:
        if (param)
            problem_set(p, 422, "warehouse-rejected-parameter", id, 0,
                        "the warehouse rejected a parameter: %s", msg);
        else if (res->error_code && (strcmp(res->error_code, "TEMPORARILY_UNAVAILABLE") == 0 ||
                                     strcmp(res->error_code, "RESOURCE_EXHAUSTED") == 0))
            problem_set(p, 503, "warehouse-unavailable", id, 5, "the warehouse failed: %s", msg);
        else
            problem_set(p, 502, "warehouse-failed", id, 0, "the warehouse statement failed: %s", msg);
        return;
    case TP_WH_CANCELED:
        problem_set(p, 502, "warehouse-cancelled", id, 0,
                    "the warehouse cancelled the statement: %s", msg);
        return;
    case TP_WH_CLOSED:
        problem_set(p, 502, "warehouse-failed", id, 0, "the warehouse closed the statement: %s", msg);
        return;
    default:
        break;
    }
    switch (res->kind) {
    case TP_WH_ERR_HTTP:
        if (res->http_status == 429)
            problem_set(p, 503, "warehouse-rate-limited", id, 5,
                        "the warehouse is rate-limiting requests: %s", msg);
        else if (res->http_status == 503)
            problem_set(p, 503, "warehouse-unavailable", id, 5, "the warehouse is unavailable: %s",
                        msg);
        else if (res->http_status == 400 && param)
            problem_set(p, 422, "warehouse-rejected-parameter", id, 0,
                        "the warehouse rejected a parameter: %s", msg);
        else
            problem_set(p, 502, "warehouse-error", id, 0, "the warehouse answered HTTP %d: %s",
                        res->http_status, msg);
        return;
    case TP_WH_ERR_AUTH:
        problem_set(p, 502, "warehouse-auth-failed", id, 0,
                    "the warehouse refused the credentials: %s", msg);
        return;
    case TP_WH_ERR_TRANSPORT:
        problem_set(p, 503, "warehouse-unavailable", id, 5, "the warehouse is unreachable: %s", msg);
        return;
    case TP_WH_ERR_TIMEOUT:
        problem_set(p, 504, "warehouse-timeout", id, 0, "the warehouse did not answer in time: %s",
                    msg);
        return;
    case TP_WH_ERR_PROTOCOL:
        problem_set(p, 502, "warehouse-bad-response", id, 0,
                    "the warehouse sent a malformed answer: %s", msg);
        return;
    default:
        problem_set(p, 502, "warehouse-error", id, 0, "warehouse statement error: %s", msg);
        return;
    }
}

/* Fills o from a finished flight (under lock). */
static void outcome_from_flight(const flight_t *f, tp_fb_outcome_t *o, int64_t now)
{
    if (f->result) {
        o->state = TP_FB_READY;
        o->result = tp_fb_result_ref(f->result);
    } else {
        o->state = TP_FB_FAILED;
        problem_copy(&o->problem, &f->problem);
    }
    o->elapsed_ms = (f->done ? f->finished_ms : now) - f->started_ms;
}

/* ---- cache (under lock) ---- */

static void lru_unlink(tp_fb_t *fb, centry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        fb->lru_head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        fb->lru_tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push(tp_fb_t *fb, centry_t *e)
{
    e->next = fb->lru_head;
    e->prev = NULL;
    if (fb->lru_head)
        fb->lru_head->prev = e;
    fb->lru_head = e;
    if (!fb->lru_tail)
        fb->lru_tail = e;
}

static void centry_drop(tp_fb_t *fb, centry_t *e)
{
    ix_del(&fb->cache_ix, e->key, e);
    lru_unlink(fb, e);
    fb->st.cache_bytes -= (int64_t)e->bytes;
    fb->st.cache_entries--;
    tp_fb_result_release(e->result);
    free(e->key);
    free(e);
}

static centry_t *cache_find(tp_fb_t *fb, const char *key, int64_t now)
{
    centry_t *e = ix_get(&fb->cache_ix, key);
    if (!e)
        return NULL;
    if (e->expires_ms <= now) {
        centry_drop(fb, e);
        return NULL;
    }
    lru_unlink(fb, e);
    lru_push(fb, e);
    return e;
}

static void cache_put(tp_fb_t *fb, const char *key, tp_fb_result_t *r, int64_t now)
{
    size_t bytes = tp_fb_result_bytes(r) + strlen(key);
    if (fb->cfg.result_ttl_ms <= 0 || (int64_t)bytes > fb->cfg.result_cache_bytes)
        return;
    centry_t *old = ix_get(&fb->cache_ix, key);
    if (old)
        centry_drop(fb, old);
    while (fb->lru_tail && fb->st.cache_bytes + (int64_t)bytes > fb->cfg.result_cache_bytes)
        centry_drop(fb, fb->lru_tail);
    centry_t *e = tp_xcalloc(1, sizeof *e);
    e->key = tp_xstrdup(key);
    e->result = tp_fb_result_ref(r);
    e->bytes = bytes;
    e->expires_ms = now + fb->cfg.result_ttl_ms;
    lru_push(fb, e);
    ix_put(&fb->cache_ix, e->key, e);
    fb->st.cache_bytes += (int64_t)bytes;
    fb->st.cache_entries++;
}

/* ---- flights and handles (under lock) ---- */

static void flight_unref(flight_t *f)
{
    if (--f->refs > 0)
        return;
    tp_fb_t *fb = f->fb;
    for (flight_t **pp = &fb->flights; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    f->magic = 0;
    tp_fb_result_release(f->result);
    tp_fb_result_release(f->building);
    problem_clear(&f->problem);
    free(f->key);
    free(f->label);
    free(f);
}

static handle_t *handle_new(tp_fb_t *fb, flight_t *f, const char *owner, int64_t now)
{
    handle_t *h = tp_xcalloc(1, sizeof *h);
    snprintf(h->id, sizeof h->id, "%016llx%016llx", (unsigned long long)tp_random_u64(),
             (unsigned long long)tp_random_u64());
    h->owner = tp_xstrdup(owner);
    h->f = f;
    h->touched_ms = now;
    f->refs++;
    h->fnext = f->handles;
    f->handles = h;
    h->next = fb->handles;
    if (fb->handles)
        fb->handles->prev = h;
    fb->handles = h;
    ix_put(&fb->handle_ix, h->id, h);
    fb->st.handles++;
    return h;
}

static void handle_free(tp_fb_t *fb, handle_t *h)
{
    ix_del(&fb->handle_ix, h->id, h);
    if (h->prev)
        h->prev->next = h->next;
    else
        fb->handles = h->next;
    if (h->next)
        h->next->prev = h->prev;
    for (handle_t **pp = &h->f->handles; *pp; pp = &(*pp)->fnext)
        if (*pp == h) {
            *pp = h->fnext;
            break;
        }
    fb->st.handles--;
    flight_t *f = h->f;
    free(h->owner);
    free(h);
    flight_unref(f);
}

static handle_t *handle_find(tp_fb_t *fb, const char *id, const char *owner)
{
    handle_t *h = ix_get(&fb->handle_ix, id);
    return h && !h->deleted && strcmp(h->owner, owner) == 0 ? h : NULL;
}

/* True while someone still wants a running flight's answer. */
static bool flight_wanted(const flight_t *f, int64_t now, int64_t abandon_ms)
{
    if (f->waiters)
        return true;
    for (const handle_t *h = f->handles; h; h = h->fnext)
        if (!h->deleted && h->exposed && now - h->touched_ms <= abandon_ms)
            return true;
    return false;
}

/* Handles nobody can use any more: deleted, never given out and not waited
 * on, or finished longer than result_ttl ago. */
static bool handle_dead(const handle_t *h, int64_t now, int64_t ttl_ms)
{
    if (h->nwaiters > 0)
        return false;
    if (h->deleted || !h->exposed)
        return true;
    return h->f->done && now - h->f->finished_ms > ttl_ms;
}

/* ---- waiters ---- */

static void waiter_unlink(tp_fb_waiter_t *w)
{
    flight_t *f = w->h->f;
    for (tp_fb_waiter_t **pp = &f->waiters; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    w->h->nwaiters--;
}

static void on_waiter(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_fb_waiter_t *w = arg;
    if (w->magic != WAITER_MAGIC)
        abort();
    tp_fb_t *fb = w->fb;
    tp_fb_outcome_t o = {0};
    int64_t now = tp_now_ms();
    pthread_mutex_lock(&fb->lock);
    handle_t *h = w->h;
    waiter_unlink(w);
    snprintf(o.id, sizeof o.id, "%s", h->id);
    if (h->f->done) {
        outcome_from_flight(h->f, &o, now);
    } else {
        o.state = TP_FB_PENDING;
        o.elapsed_ms = now - h->f->started_ms;
        h->exposed = true;
        h->touched_ms = now;
    }
    o.shared = h->f->handles != h || h->fnext != NULL;
    pthread_mutex_unlock(&fb->lock);
    w->magic = 0;
    event_free(w->ev);
    tp_fb_wait_fn fn = w->fn;
    void *cb_arg = w->arg;
    free(w);
    fn(&o, cb_arg);
}

/* Under lock: a waiter on h with budget_ms. */
static tp_fb_waiter_t *waiter_new(tp_fb_loop_t *lp, handle_t *h, int64_t budget_ms,
                                  tp_fb_wait_fn fn, void *arg)
{
    tp_fb_waiter_t *w = tp_xcalloc(1, sizeof *w);
    w->magic = WAITER_MAGIC;
    w->fb = lp->fb;
    w->lp = lp;
    w->h = h;
    w->fn = fn;
    w->arg = arg;
    w->ev = event_new(lp->base, -1, 0, on_waiter, w);
    if (!w->ev)
        abort();
    struct timeval tv = {(time_t)(budget_ms / 1000), (suseconds_t)(budget_ms % 1000) * 1000};
    event_add(w->ev, &tv);
    w->next = h->f->waiters;
    h->f->waiters = w;
    h->nwaiters++;
    return w;
}

/* ---- running statements (owner loop) ---- */

static bool on_manifest(tp_wh_stmt_t *st, const tp_wh_manifest_t *m, void *arg)
{
    (void)st;
    flight_t *f = arg;
    if (f->magic != FLIGHT_MAGIC)
        abort();
    tp_fb_result_release(f->building);
    f->building = result_new(m);
    return true;
}

static bool on_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *rows, void *arg)
{
    (void)st;
    flight_t *f = arg;
    if (f->magic != FLIGHT_MAGIC)
        abort();
    tp_fb_result_t *r = f->building;
    if (!r || rows->n_cols != r->ncols)
        return false;
    for (size_t i = 0; i < rows->n_rows * rows->n_cols; i++)
        result_add_cell(r, rows->cells[i], rows->lens[i]);
    r->nrows += rows->n_rows;
    if ((int64_t)tp_fb_result_bytes(r) > f->max_bytes) {
        f->too_large = true;
        return false;
    }
    return true;
}

static void on_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    (void)st;
    flight_t *f = arg;
    if (f->magic != FLIGHT_MAGIC)
        abort();
    tp_fb_t *fb = f->fb;
    int64_t now = tp_now_ms();
    bool ok = res->status == TP_WH_SUCCEEDED && !f->too_large;
    if (!ok)
        map_failure(f, res);
    const char *kv[] = {"dataset", f->label, "statement_id", res->statement_id,
                        "status", tp_wh_status_name(res->status), NULL};
    if (ok)
        tp_logkv(TP_LOG_DEBUG, kv, "fallback statement finished: %lld rows in %lld ms",
                 (long long)res->rows, (long long)(now - f->started_ms));
    else
        tp_logkv(f->cancel_why ? TP_LOG_INFO : TP_LOG_WARN, kv, "fallback statement failed: %s",
                 f->problem.detail);
    pthread_mutex_lock(&fb->lock);
    ix_del(&fb->flight_ix, f->key, f);
    f->st = NULL;
    f->done = true;
    f->lp = NULL;
    f->finished_ms = now;
    if (f->counted)
        fb->st.in_flight--;
    f->counted = false;
    if (ok) {
        if (!f->building) { /* no rows and no manifest (should not happen on SUCCEEDED) */
            tp_wh_manifest_t m = {0};
            f->building = result_new(&m);
        }
        f->result = f->building;
        f->building = NULL;
        fb->st.succeeded++;
        if (f->cacheable)
            cache_put(fb, f->key, f->result, now);
    } else {
        fb->st.failed++;
    }
    for (tp_fb_waiter_t *w = f->waiters; w; w = w->next)
        event_active(w->ev, EV_READ, 1);
    flight_unref(f); /* the running reference */
    pthread_mutex_unlock(&fb->lock);
}

/* Cancels f at the warehouse if nobody wants it (owner loop, outside lock). */
static void maybe_cancel(tp_fb_loop_t *lp, flight_t *f, const char *why)
{
    tp_fb_t *fb = lp->fb;
    tp_wh_stmt_t *st = NULL;
    pthread_mutex_lock(&fb->lock);
    if (!f->done && f->lp == lp && f->st && !f->cancel_why &&
        !flight_wanted(f, tp_now_ms(), fb->cfg.abandon_ms)) {
        f->cancel_why = why;
        ix_del(&fb->flight_ix, f->key, f);
        st = f->st;
        fb->st.cancelled++;
        fb->st.in_flight--; /* the warehouse stops it; it no longer costs */
        f->counted = false;
    }
    pthread_mutex_unlock(&fb->lock);
    if (st) {
        const char *kv[] = {"dataset", f->label, "statement_id", tp_wh_stmt_id(st), NULL};
        tp_logkv(TP_LOG_INFO, kv, "cancelling fallback statement: %s", why);
        tp_wh_cancel(st);
    }
}

/* ---- sweep timer ---- */

static int64_t sweep_interval_ms(const tp_fb_t *fb)
{
    int64_t ms = fb->cfg.abandon_ms / 4;
    return ms < 50 ? 50 : ms > 1000 ? 1000 : ms;
}

static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_fb_loop_t *lp = arg;
    if (lp->magic != LOOP_MAGIC)
        abort();
    tp_fb_t *fb = lp->fb;
    int64_t now = tp_now_ms();
    enum { MAX_CANCEL = 64 };
    flight_t *cancel[MAX_CANCEL];
    size_t nc = 0;
    pthread_mutex_lock(&fb->lock);
    for (handle_t *h = fb->handles, *next; h; h = next) {
        next = h->next;
        if (handle_dead(h, now, fb->cfg.result_ttl_ms))
            handle_free(fb, h);
    }
    for (centry_t *e = fb->lru_head, *next; e; e = next) {
        next = e->next;
        if (e->expires_ms <= now)
            centry_drop(fb, e);
    }
    for (flight_t *f = fb->flights; f && nc < MAX_CANCEL; f = f->next)
        if (f->lp == lp && !f->done && f->st && !f->cancel_why &&
            !flight_wanted(f, now, fb->cfg.abandon_ms))
            cancel[nc++] = f;
    int64_t next_ms = sweep_interval_ms(fb);
    pthread_mutex_unlock(&fb->lock);
    for (size_t i = 0; i < nc; i++)
        maybe_cancel(lp, cancel[i], "abandoned: nobody waited for or polled it");
    struct timeval tv = {(time_t)(next_ms / 1000), (suseconds_t)(next_ms % 1000) * 1000};
    evtimer_add(lp->sweep, &tv);
}

/* ---- public registry API ---- */

static void config_copy(tp_fb_t *fb, const tp_fb_config_t *cfg)
{
    free(fb->catalog);
    free(fb->schema);
    fb->cfg = *cfg;
    fb->catalog = cfg->catalog && *cfg->catalog ? tp_xstrdup(cfg->catalog) : NULL;
    fb->schema = cfg->schema && *cfg->schema ? tp_xstrdup(cfg->schema) : NULL;
    fb->cfg.catalog = fb->catalog;
    fb->cfg.schema = fb->schema;
}

tp_fb_t *tp_fb_new(const tp_fb_config_t *cfg)
{
    tp_fb_t *fb = tp_xcalloc(1, sizeof *fb);
    pthread_mutex_init(&fb->lock, NULL);
    config_copy(fb, cfg);
    return fb;
}

void tp_fb_configure(tp_fb_t *fb, const tp_fb_config_t *cfg)
{
    pthread_mutex_lock(&fb->lock);
    config_copy(fb, cfg);
    while (fb->lru_tail && fb->st.cache_bytes > fb->cfg.result_cache_bytes)
        centry_drop(fb, fb->lru_tail);
    pthread_mutex_unlock(&fb->lock);
}

void tp_fb_free(tp_fb_t *fb)
{
    if (!fb)
        return;
    while (fb->handles)
        handle_free(fb, fb->handles);
    while (fb->lru_head)
        centry_drop(fb, fb->lru_head);
    ix_free(&fb->cache_ix);
    ix_free(&fb->handle_ix);
    ix_free(&fb->flight_ix);
    free(fb->catalog);
    free(fb->schema);
    pthread_mutex_destroy(&fb->lock);
    free(fb);
}

tp_fb_loop_t *tp_fb_loop_new(tp_fb_t *fb, struct event_base *base, tp_wh_t *wh)
{
    tp_fb_loop_t *lp = tp_xcalloc(1, sizeof *lp);
    lp->magic = LOOP_MAGIC;
    lp->fb = fb;
    lp->base = base;
    lp->wh = wh;
    lp->sweep = evtimer_new(base, on_sweep, lp);
    if (!lp->sweep)
        abort();
    int64_t ms = sweep_interval_ms(fb);
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(lp->sweep, &tv);
    return lp;
}

void tp_fb_loop_free(tp_fb_loop_t *lp)
{
    if (!lp)
        return;
    tp_fb_t *fb = lp->fb;
    int64_t now = tp_now_ms();
    pthread_mutex_lock(&fb->lock);
    /* Waiters living on this loop go without being called. */
    for (flight_t *f = fb->flights; f; f = f->next)
        for (tp_fb_waiter_t **pp = &f->waiters; *pp;) {
            tp_fb_waiter_t *w = *pp;
            if (w->lp != lp) {
                pp = &w->next;
                continue;
            }
            *pp = w->next;
            w->h->nwaiters--;
            w->magic = 0;
            event_free(w->ev);
            free(w);
        }
    /* Statements this loop runs end now: their handles fail with 503. */
    for (flight_t *f = fb->flights, *next; f; f = next) {
        next = f->next;
        if (f->lp != lp || f->done)
            continue;
        problem_set(&f->problem, 503, "server-shutting-down", f->st ? tp_wh_stmt_id(f->st) : NULL,
                    1, "the server is shutting down; the statement was abandoned");
        ix_del(&fb->flight_ix, f->key, f);
        f->done = true;
        f->lp = NULL;
        f->st = NULL; /* tp_wh_free abandons it without calling on_done */
        f->finished_ms = now;
        if (f->counted)
            fb->st.in_flight--;
        f->counted = false;
        fb->st.failed++;
        for (tp_fb_waiter_t *w = f->waiters; w; w = w->next)
            event_active(w->ev, EV_READ, 1);
        flight_unref(f);
    }
    pthread_mutex_unlock(&fb->lock);
    event_free(lp->sweep);
    lp->magic = 0;
    free(lp);
}

/* Key of a request: dataset, each bind value, and for @obo the owner and a
 * digest of the token (never the token itself). */
static char *request_key(const tp_fb_request_t *req)
{
    const tp_defs_dataset_t *ds = req->ds;
    tp_buf_t k = {0};
    tp_buf_puts(&k, ds->name);
    for (size_t i = 0; i < ds->n_params; i++) {
        tp_buf_putc(&k, '\x1f');
        if (req->values[i])
            tp_buf_puts(&k, req->values[i]);
        else
            tp_buf_putc(&k, '\x1e');
    }
    if (ds->obo) {
        unsigned char md[32];
        unsigned int mdlen = 0;
        const char *t = req->bearer_token;
        if (EVP_Digest(t, strlen(t), md, &mdlen, EVP_sha256(), NULL) != 1)
            abort();
        tp_buf_printf(&k, "\x1d%s\x1d", req->owner);
        for (unsigned i = 0; i < 16; i++)
            tp_buf_printf(&k, "%02x", md[i]);
    }
    return tp_buf_steal(&k);
}

/* Starts a warehouse statement for req (owner loop). Returns NULL with the
 * problem filled when the client refused it. */
static flight_t *flight_start(tp_fb_loop_t *lp, const tp_fb_request_t *req, char *key,
                              tp_fb_problem_t *prob)
{
    tp_fb_t *fb = lp->fb;
    const tp_defs_dataset_t *ds = req->ds;
    flight_t *f = tp_xcalloc(1, sizeof *f);
    f->magic = FLIGHT_MAGIC;
    f->fb = fb;
    f->lp = lp;
    f->key = key;
    f->label = tp_xstrdup(ds->name);
    f->cacheable = true;
    f->max_bytes = fb->cfg.max_result_bytes;
    f->started_ms = tp_now_ms();
    f->refs = 1;
    size_t np = ds->wh.n_names;
    tp_wh_param_t params[np ? np : 1];
    for (size_t k = 0; k < np; k++) {
        size_t pi = ds->wh.index[k];
        params[k].name = ds->wh.names[k];
        params[k].value = req->values[pi];
        params[k].type = tp_defs_type_name(ds->params[pi].type);
    }
    tp_wh_request_t wr;
    tp_wh_request_init(&wr);
    wr.sql = ds->wh.sql;
    wr.params = params;
    wr.n_params = np;
    wr.catalog = fb->cfg.catalog;
    wr.schema = fb->cfg.schema;
    int sw = fb->cfg.submit_wait_s;
    wr.wait_timeout_s = sw >= 5 && sw <= 50 && req->wait_ms >= sw * 1000 ? sw : 0;
    wr.bearer_token = ds->obo ? req->bearer_token : NULL;
    wr.timeout_ms = fb->cfg.timeout_ms;
    wr.label = ds->name;
    wr.on_manifest = on_manifest;
    wr.on_rows = on_rows;
    wr.on_done = on_done;
    wr.arg = f;
    char *err = NULL;
    f->st = tp_wh_submit(lp->wh, &wr, &err);
    if (!f->st) {
        problem_set(prob, 502, "warehouse-error", NULL, 0, "cannot send the statement: %s",
                    err ? err : "unknown error");
        free(err);
        f->magic = 0;
        free(f->key);
        free(f->label);
        free(f);
        return NULL;
    }
    return f;
}

tp_fb_state_t tp_fb_start(tp_fb_loop_t *lp, const tp_fb_request_t *req, tp_fb_outcome_t *out,
                          tp_fb_waiter_t **waiter)
{
    tp_fb_t *fb = lp->fb;
    memset(out, 0, sizeof *out);
    if (waiter)
        *waiter = NULL;
    const tp_defs_dataset_t *ds = req->ds;
    if (!ds->has_wh) {
        out->state = TP_FB_FAILED;
        problem_set(&out->problem, 400, "no-warehouse-twin", NULL, 0,
                    "dataset %s has no warehouse definition", ds->name);
        return out->state;
    }
    if (ds->obo && (!req->bearer_token || !*req->bearer_token)) {
        out->state = TP_FB_FAILED;
        problem_set(&out->problem, 401, "missing-access-token", NULL, 0,
                    "dataset %s runs on the warehouse as the caller: send X-Forwarded-Access-Token",
                    ds->name);
        return out->state;
    }
    char *key = request_key(req);
    int64_t now = tp_now_ms();
    pthread_mutex_lock(&fb->lock);
    if (!req->bypass_cache) {
        centry_t *e = cache_find(fb, key, now);
        if (e) {
            fb->st.cache_hits++;
            out->state = TP_FB_READY;
            out->from_cache = true;
            out->result = tp_fb_result_ref(e->result);
            pthread_mutex_unlock(&fb->lock);
            free(key);
            return out->state;
        }
    }
    flight_t *f = ix_get(&fb->flight_ix, key);
    if (f && (f->done || f->cancel_why))
        f = NULL; /* not reachable: both leave the index */
    if (f) {
        fb->st.joined++;
        out->shared = true;
        free(key);
    } else {
        if (fb->st.in_flight >= fb->cfg.max_in_flight) {
            fb->st.busy++;
            pthread_mutex_unlock(&fb->lock);
            free(key);
            out->state = TP_FB_BUSY;
            problem_set(&out->problem, 429, "too-many-warehouse-statements", NULL, BUSY_RETRY_S,
                        "%lld warehouse statements are already running (warehouse.max_in_flight); "
                        "retry later",
                        (long long)fb->cfg.max_in_flight);
            return out->state;
        }
        fb->st.in_flight++; /* reserved; released if the submission fails */
        pthread_mutex_unlock(&fb->lock);
        /* tp_wh_submit never calls back from inside, so f is safe to publish after. */
        f = flight_start(lp, req, key, &out->problem);
        pthread_mutex_lock(&fb->lock);
        if (!f) {
            fb->st.in_flight--;
            fb->st.failed++;
            pthread_mutex_unlock(&fb->lock);
            out->state = TP_FB_FAILED;
            return out->state;
        }
        fb->st.submitted++;
        f->counted = true;
        f->next = fb->flights;
        fb->flights = f;
        ix_put(&fb->flight_ix, f->key, f);
        f->cacheable = fb->cfg.result_cache_bytes > 0;
    }
    handle_t *h = handle_new(fb, f, req->owner, now);
    snprintf(out->id, sizeof out->id, "%s", h->id);
    out->elapsed_ms = now - f->started_ms;
    if (req->wait_ms > 0 && req->on_wait) {
        *waiter = waiter_new(lp, h, req->wait_ms, req->on_wait, req->arg);
        out->state = TP_FB_WAITING;
    } else {
        h->exposed = true;
        out->state = TP_FB_PENDING;
    }
    pthread_mutex_unlock(&fb->lock);
    return out->state;
}

tp_fb_state_t tp_fb_poll(tp_fb_loop_t *lp, const char *id, const char *owner, int64_t wait_ms,
                         tp_fb_wait_fn on_wait, void *arg, tp_fb_outcome_t *out,
                         tp_fb_waiter_t **waiter)
{
    tp_fb_t *fb = lp->fb;
    memset(out, 0, sizeof *out);
    if (waiter)
        *waiter = NULL;
    int64_t now = tp_now_ms();
    pthread_mutex_lock(&fb->lock);
    handle_t *h = handle_find(fb, id, owner);
    if (!h) {
        out->state = TP_FB_NOT_FOUND;
    } else {
        snprintf(out->id, sizeof out->id, "%s", h->id);
        h->touched_ms = now;
        if (h->f->done) {
            outcome_from_flight(h->f, out, now);
        } else if (wait_ms > 0 && on_wait && waiter) {
            *waiter = waiter_new(lp, h, wait_ms, on_wait, arg);
            out->state = TP_FB_WAITING;
        } else {
            out->state = TP_FB_PENDING;
            out->elapsed_ms = now - h->f->started_ms;
        }
    }
    pthread_mutex_unlock(&fb->lock);
    return out->state;
}

bool tp_fb_delete(tp_fb_loop_t *lp, const char *id, const char *owner)
{
    tp_fb_t *fb = lp->fb;
    pthread_mutex_lock(&fb->lock);
    handle_t *h = handle_find(fb, id, owner);
    flight_t *f = h ? h->f : NULL;
    if (h)
        h->deleted = true;
    bool mine = f && !f->done && f->lp == lp;
    pthread_mutex_unlock(&fb->lock);
    if (mine)
        maybe_cancel(lp, f, "deleted by its owner");
    return h != NULL;
}

void tp_fb_waiter_detach(tp_fb_waiter_t *w)
{
    if (!w)
        return;
    if (w->magic != WAITER_MAGIC)
        abort();
    tp_fb_t *fb = w->fb;
    tp_fb_loop_t *lp = w->lp;
    pthread_mutex_lock(&fb->lock);
    flight_t *f = w->h->f;
    waiter_unlink(w);
    bool mine = !f->done && f->lp == lp;
    pthread_mutex_unlock(&fb->lock);
    w->magic = 0;
    event_free(w->ev);
    free(w);
    if (mine)
        maybe_cancel(lp, f, "the client went away");
}

void tp_fb_stats(tp_fb_t *fb, tp_fb_stats_t *out)
{
    pthread_mutex_lock(&fb->lock);
    *out = fb->st;
    pthread_mutex_unlock(&fb->lock);
}
