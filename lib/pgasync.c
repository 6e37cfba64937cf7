/* Asynchronous PostgreSQL on libevent (see include/tidepool/pgasync.h).
 *
 * Owns: the pool's connections (each a tp_pgconn_t, lib/pgconn.c, which holds
 * the libpq state machine: connect, send, flush, results, notifications), their
 * reconnect timers, the statement registry and the FIFO wait queue.
 * Connection states here: DOWN (waiting for the backoff timer) -> CONNECTING
 * (password and login, inside pgconn) -> IDLE -> PREPARING (first use of a
 * statement on this connection) -> BUSY (executing) -> IDLE. Any failure goes
 * through conn_lost, which fails the request in hand, closes the connection
 * and schedules a reconnect with exponential backoff (100 ms .. 5 s, jittered;
 * at once, once, after a refused password so the provider mints anew). When no
 * connection is up the waiting requests fail at once (the caller answers 503).
 * The LISTEN connection is one more such connection, in LISTEN_SETUP then
 * LISTENING. Not done here: pipeline mode (one statement per round trip per
 * connection; dashboards' concurrency is spread over the pool), COPY,
 * transactions. */
#include "tidepool/pgasync.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"

#define CONN_MAGIC 0x50474331u
#define REQ_MAGIC 0x50475251u
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

typedef enum conn_state {
    C_DOWN,
    C_CONNECTING,
    C_IDLE,
    C_PREPARING,
    C_BUSY,
    C_LISTEN_SETUP,
    C_LISTENING,
} conn_state_t;

typedef struct conn conn_t;

struct tp_pgreq {
    uint32_t magic;
    tp_pgpool_t *pool;
    conn_t *conn; /* running it, or NULL while queued */
    int stmt; /* index in the registry, or -1: unnamed statement */
    char *sql; /* only for stmt == -1 */
    Oid *types; /* only for stmt == -1 */
    int nparams;
    char **values;
    tp_pg_done_cb cb;
    void *arg;
    bool cancelled;
    tp_pgreq_t *prev, *next; /* wait queue */
};

struct conn {
    uint32_t magic;
    tp_pgpool_t *pool;   /* NULL for a LISTEN connection */
    tp_pglisten_t *lsn;  /* NULL for a pool connection */
    const char *label;
    int connect_timeout_ms;
    bool has_pw;     /* passwords come from a provider */
    bool pw_retried; /* refused once since the last success: back off now */
    tp_pgconn_t *pg;
    conn_state_t st;
    struct event *timer; /* reconnect */
    int64_t backoff_ms;
    int64_t retry_at_ms;
    bool was_up; /* for logging transitions once */
    bool *prepared;
    tp_pgreq_t *req;
};

typedef struct stmt {
    uint64_t hash;
    char *sql;
    int ntypes;
    Oid *types; /* NULL: all inferred */
} stmt_t;

struct tp_pgpool {
    struct event_base *base;
    char *dsn;
    char *name;
    int max_queue;
    int nconns;
    conn_t *conns;
    stmt_t *stmts;
    int nstmts, max_stmts;
    tp_pgreq_t *qhead, *qtail;
    int queued;
    uint64_t submitted, rejected_busy, rejected_down, reconnects;
};

struct tp_pglisten {
    conn_t c;
    char *channel;
    tp_pg_notify_cb cb;
    void *arg;
};

static void conn_start(conn_t *c);
static void pool_dispatch(tp_pgpool_t *pool);

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h;
}

static conn_t *conn_of(void *arg)
{
    conn_t *c = arg;
    if (c->magic != CONN_MAGIC)
        abort();
    return c;
}

static void req_free(tp_pgreq_t *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->nparams; i++)
        free(r->values[i]);
    free(r->values);
    free(r->sql);
    free(r->types);
    r->magic = 0;
    free(r);
}

/* Runs the request's callback (unless cancelled) and frees it. */
static void req_complete(tp_pgreq_t *r, PGresult *res, const char *err)
{
    if (!r->cancelled && r->cb)
        r->cb(res, err, r->arg);
    req_free(r);
}

static void queue_remove(tp_pgpool_t *p, tp_pgreq_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        p->qhead = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        p->qtail = r->prev;
    r->prev = r->next = NULL;
    p->queued--;
}

static int pool_connected(const tp_pgpool_t *p)
{
    int n = 0;
    for (int i = 0; i < p->nconns; i++)
        if (p->conns[i].st >= C_IDLE)
            n++;
    return n;
}

/* Fails every waiting request: nothing can serve them now. */
static void pool_fail_queue(tp_pgpool_t *p, const char *why)
{
    while (p->qhead) {
        tp_pgreq_t *r = p->qhead;
        queue_remove(p, r);
        req_complete(r, NULL, why);
    }
}

static void timer_in(conn_t *c, int64_t ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    event_del(c->timer);
    event_add(c->timer, &tv);
}

/* One teardown for every failure: fail the request in hand, close, back off. */
static void conn_lost(conn_t *c, const char *why)
{
    char msg[256];
    snprintf(msg, sizeof msg, "%s", why && *why ? why : "connection lost");
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = '\0';
    bool connecting = c->st == C_CONNECTING;
    tp_pgconn_close(c->pg);
    if (c->prepared && c->pool)
        memset(c->prepared, 0, sizeof(bool) * (size_t)c->pool->max_stmts);
    bool was_up = c->was_up;
    c->was_up = false;
    /* an expired or rotated password: ask the provider for a new one at once */
    bool fresh_pw = c->has_pw && connecting && tp_pg_password_refused(msg) && !c->pw_retried;
    if (fresh_pw) {
        c->pw_retried = true;
        const char *kv[] = {"pool", c->label, NULL};
        tp_logkv(TP_LOG_INFO, kv, "postgres refused the password; getting a new credential");
    }
    c->st = C_DOWN;
    c->backoff_ms = fresh_pw ? 0 : c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (c->backoff_ms > BACKOFF_MAX_MS)
        c->backoff_ms = BACKOFF_MAX_MS;
    int64_t delay = fresh_pw ? 0 : tp_jitter_ms(c->backoff_ms, 0.2);
    c->retry_at_ms = tp_now_ms() + delay;
    timer_in(c, delay);
    if (was_up || c->backoff_ms == BACKOFF_MIN_MS) {
        const char *kv[] = {"pool", c->label, "error", msg, NULL};
        tp_logkv(TP_LOG_WARN, kv, "postgres connection lost; reconnecting");
    }
    tp_pgreq_t *r = c->req;
    c->req = NULL;
    if (r)
        req_complete(r, NULL, msg);
    if (c->pool) {
        c->pool->reconnects++;
        if (pool_connected(c->pool) == 0)
            pool_fail_queue(c->pool, "postgres unavailable");
    }
}

static void stmt_name(char *buf, size_t n, int id)
{
    snprintf(buf, n, "tp_s%d", id);
}

static void on_result(tp_pgconn_t *pg, PGresult *res, const char *err, void *arg);

/* Sends the next step of r on c: prepare (first use here) or execute. */
static void conn_send(conn_t *c, tp_pgreq_t *r)
{
    char name[32];
    bool ok;
    const char *const *values = (const char *const *)r->values;
    c->req = r;
    r->conn = c;
    if (r->stmt >= 0 && !c->prepared[r->stmt]) {
        stmt_name(name, sizeof name, r->stmt);
        const stmt_t *st = &c->pool->stmts[r->stmt];
        ok = tp_pgconn_prepare(c->pg, name, st->sql, st->ntypes, st->types, on_result, c);
        c->st = C_PREPARING;
    } else if (r->stmt >= 0) {
        stmt_name(name, sizeof name, r->stmt);
        ok = tp_pgconn_query_prepared(c->pg, name, r->nparams, values, on_result, c);
        c->st = C_BUSY;
    } else {
        ok = tp_pgconn_query(c->pg, r->sql, r->nparams, r->types, values, on_result, c);
        c->st = C_BUSY;
    }
    if (!ok)
        conn_lost(c, tp_pgconn_error(c->pg));
}

static void pool_dispatch(tp_pgpool_t *p)
{
    for (int i = 0; i < p->nconns && p->qhead; i++) {
        conn_t *c = &p->conns[i];
        if (c->st != C_IDLE)
            continue;
        tp_pgreq_t *r = p->qhead;
        queue_remove(p, r);
        if (r->cancelled) {
            req_free(r);
            i--;
            continue;
        }
        conn_send(c, r);
    }
}

/* A statement's results have been drained (prepare or execute). */
static void on_result(tp_pgconn_t *pg, PGresult *res, const char *err, void *arg)
{
    conn_t *c = conn_of(arg);
    if (!tp_pgconn_ok(pg)) {
        conn_lost(c, err);
        return;
    }
    tp_pgreq_t *r = c->req;
    bool failed = err != NULL || (res && PQresultStatus(res) != PGRES_COMMAND_OK &&
                                  PQresultStatus(res) != PGRES_TUPLES_OK);
    if (c->st == C_PREPARING && !failed) {
        c->prepared[r->stmt] = true;
        conn_send(c, r);
        return;
    }
    c->req = NULL;
    c->st = C_IDLE;
    r->conn = NULL;
    char *msg = failed ? tp_xstrdup(res ? PQresultErrorMessage(res) : err) : NULL;
    if (msg) {
        size_t n = strlen(msg);
        while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
            msg[--n] = '\0';
    }
    req_complete(r, res, res ? msg : msg ? msg : "no result");
    free(msg);
    pool_dispatch(c->pool);
}

static void listen_start(conn_t *c);

static void on_connected(tp_pgconn_t *pg, PGresult *res, const char *err, void *arg)
{
    (void)pg;
    (void)res;
    conn_t *c = conn_of(arg);
    if (err) {
        conn_lost(c, err);
        return;
    }
    c->backoff_ms = 0;
    c->was_up = true;
    c->pw_retried = false;
    if (c->lsn) {
        listen_start(c);
        return;
    }
    c->st = C_IDLE;
    const char *kv[] = {"pool", c->label, NULL};
    tp_logkv(TP_LOG_DEBUG, kv, "postgres connection ready");
    pool_dispatch(c->pool);
}

/* The connection dropped while idle (or listening). */
static void on_lost(tp_pgconn_t *pg, const char *err, void *arg)
{
    (void)pg;
    conn_lost(conn_of(arg), err);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = conn_of(arg);
    if (c->st == C_DOWN)
        conn_start(c);
}

static void conn_start(conn_t *c)
{
    c->st = C_CONNECTING;
    if (!tp_pgconn_connect(c->pg, c->connect_timeout_ms, on_connected, c))
        conn_lost(c, tp_pgconn_error(c->pg));
}

static void conn_init(conn_t *c, struct event_base *base, const char *dsn, const char *label,
                      int connect_timeout_ms, const tp_pg_password_provider_t *pw)
{
    memset(c, 0, sizeof *c);
    c->magic = CONN_MAGIC;
    c->has_pw = pw != NULL;
    c->label = label;
    c->connect_timeout_ms = connect_timeout_ms > 0 ? connect_timeout_ms : 5000;
    c->pg = tp_pgconn_new(base, dsn, NULL, pw);
    tp_pgconn_on_lost(c->pg, on_lost, c);
    c->timer = evtimer_new(base, on_timer, c);
    c->st = C_DOWN;
}

static void conn_destroy(conn_t *c)
{
    if (c->timer) {
        event_del(c->timer);
        event_free(c->timer);
    }
    tp_pgconn_free(c->pg);
    req_free(c->req);
    free(c->prepared);
    c->magic = 0;
}

tp_pgpool_t *tp_pgpool_new(struct event_base *base, const tp_pgpool_opts_t *o)
{
    tp_pgpool_t *p = tp_xcalloc(1, sizeof *p);
    p->base = base;
    p->dsn = tp_xstrdup(o->dsn ? o->dsn : "");
    p->name = tp_xstrdup(o->name ? o->name : "pool");
    p->max_queue = o->max_queue > 0 ? o->max_queue : 0;
    p->nconns = o->size > 0 ? o->size : 1;
    p->max_stmts = o->max_statements > 0 ? o->max_statements : 256;
    p->stmts = tp_xcalloc((size_t)p->max_stmts, sizeof *p->stmts);
    p->conns = tp_xcalloc((size_t)p->nconns, sizeof *p->conns);
    for (int i = 0; i < p->nconns; i++) {
        conn_t *c = &p->conns[i];
        conn_init(c, base, p->dsn, p->name, o->connect_timeout_ms, o->password);
        c->pool = p;
        c->prepared = tp_xcalloc((size_t)p->max_stmts, sizeof(bool));
        conn_start(c);
    }
    return p;
}

void tp_pgpool_free(tp_pgpool_t *p)
{
    if (!p)
        return;
    while (p->qhead) {
        tp_pgreq_t *r = p->qhead;
        queue_remove(p, r);
        req_free(r);
    }
    for (int i = 0; i < p->nconns; i++)
        conn_destroy(&p->conns[i]);
    for (int i = 0; i < p->nstmts; i++) {
        free(p->stmts[i].sql);
        free(p->stmts[i].types);
    }
    free(p->stmts);
    free(p->conns);
    free(p->dsn);
    free(p->name);
    free(p);
}

static Oid *copy_types(int n, const unsigned *types)
{
    if (!types || n <= 0)
        return NULL;
    Oid *t = tp_xcalloc((size_t)n, sizeof(Oid));
    for (int i = 0; i < n; i++)
        t[i] = (Oid)types[i];
    return t;
}

static bool types_eq(const stmt_t *s, int n, const unsigned *types)
{
    if (!types || n <= 0)
        return s->types == NULL;
    if (!s->types || s->ntypes != n)
        return false;
    for (int i = 0; i < n; i++)
        if (s->types[i] != (Oid)types[i])
            return false;
    return true;
}

static int stmt_lookup(tp_pgpool_t *p, const char *sql, int n, const unsigned *types)
{
    uint64_t h = fnv1a(sql);
    for (int i = 0; i < p->nstmts; i++)
        if (p->stmts[i].hash == h && strcmp(p->stmts[i].sql, sql) == 0 &&
            types_eq(&p->stmts[i], n, types))
            return i;
    if (p->nstmts >= p->max_stmts)
        return -1;
    stmt_t *st = &p->stmts[p->nstmts];
    st->hash = h;
    st->sql = tp_xstrdup(sql);
    st->types = copy_types(n, types);
    st->ntypes = st->types ? n : 0;
    return p->nstmts++;
}

tp_pg_submit_t tp_pgpool_query(tp_pgpool_t *p, const char *sql, int nparams,
                               const unsigned *types, const char *const *values, tp_pg_done_cb cb,
                               void *arg, tp_pgreq_t **handle)
{
    if (handle)
        *handle = NULL;
    if (pool_connected(p) == 0) {
        p->rejected_down++;
        return TP_PG_DOWN;
    }
    conn_t *idle = NULL;
    for (int i = 0; i < p->nconns && !idle; i++)
        if (p->conns[i].st == C_IDLE)
            idle = &p->conns[i];
    if (!idle && p->queued >= p->max_queue) {
        p->rejected_busy++;
        return TP_PG_BUSY;
    }
    tp_pgreq_t *r = tp_xcalloc(1, sizeof *r);
    r->magic = REQ_MAGIC;
    r->pool = p;
    r->stmt = stmt_lookup(p, sql, nparams, types);
    if (r->stmt < 0) {
        r->sql = tp_xstrdup(sql);
        r->types = copy_types(nparams, types);
    }
    r->nparams = nparams;
    r->values = tp_xcalloc((size_t)(nparams > 0 ? nparams : 1), sizeof(char *));
    for (int i = 0; i < nparams; i++)
        r->values[i] = values[i] ? tp_xstrdup(values[i]) : NULL;
    r->cb = cb;
    r->arg = arg;
    p->submitted++;
    if (handle)
        *handle = r;
    if (idle) {
        conn_send(idle, r);
    } else {
        r->prev = p->qtail;
        if (p->qtail)
            p->qtail->next = r;
        else
            p->qhead = r;
        p->qtail = r;
        p->queued++;
    }
    return TP_PG_QUEUED;
}

void tp_pgpool_cancel(tp_pgreq_t *r)
{
    if (!r)
        return;
    if (r->magic != REQ_MAGIC)
        abort();
    tp_pgpool_t *p = r->pool;
    for (tp_pgreq_t *q = p->qhead; q; q = q->next) {
        if (q == r) {
            queue_remove(p, r);
            req_free(r);
            return;
        }
    }
    r->cancelled = true;
}

void tp_pgpool_abort(tp_pgreq_t *r)
{
    if (!r)
        return;
    if (r->magic != REQ_MAGIC)
        abort();
    if (r->conn) {
        tp_pgconn_cancel(r->conn->pg);
        return;
    }
    queue_remove(r->pool, r);
    req_complete(r, NULL, "canceled");
}

bool tp_pgpool_up(const tp_pgpool_t *p)
{
    return pool_connected(p) > 0;
}

int64_t tp_pgpool_retry_ms(const tp_pgpool_t *p)
{
    if (pool_connected(p) > 0)
        return 0;
    int64_t now = tp_now_ms(), best = BACKOFF_MAX_MS;
    for (int i = 0; i < p->nconns; i++) {
        int64_t left = p->conns[i].retry_at_ms - now;
        if (left < best)
            best = left;
    }
    return best > 0 ? best : 1;
}

void tp_pgpool_stats(const tp_pgpool_t *p, tp_pgpool_stats_t *out)
{
    memset(out, 0, sizeof *out);
    out->size = p->nconns;
    for (int i = 0; i < p->nconns; i++) {
        conn_state_t st = p->conns[i].st;
        if (st >= C_IDLE)
            out->connected++;
        if (st == C_PREPARING || st == C_BUSY)
            out->in_use++;
    }
    out->queued = p->queued;
    out->submitted = p->submitted;
    out->rejected_busy = p->rejected_busy;
    out->rejected_down = p->rejected_down;
    out->reconnects = p->reconnects;
}

/* ---- LISTEN connection ---- */

static void on_notify(tp_pgconn_t *pg, const char *channel, const char *payload, void *arg)
{
    (void)pg;
    conn_t *c = conn_of(arg);
    if (c->st == C_LISTENING)
        c->lsn->cb(channel, payload, c->lsn->arg);
}

static void on_listening(tp_pgconn_t *pg, PGresult *res, const char *err, void *arg)
{
    (void)res;
    conn_t *c = conn_of(arg);
    if (err) {
        conn_lost(c, err);
        return;
    }
    c->st = C_LISTENING;
    const char *kv[] = {"channel", c->lsn->channel, NULL};
    tp_logkv(TP_LOG_INFO, kv, "listening for notifications");
    /* anything sent before now (also with the LISTEN's own reply) is covered by this */
    c->lsn->cb(NULL, NULL, c->lsn->arg);
    tp_pgconn_on_notify(pg, on_notify, c);
}

static void listen_start(conn_t *c)
{
    tp_buf_t q = {0};
    tp_buf_printf(&q, "LISTEN %s", c->lsn->channel);
    tp_pgconn_on_notify(c->pg, NULL, NULL);
    c->st = C_LISTEN_SETUP;
    bool ok = tp_pgconn_query(c->pg, q.data, 0, NULL, NULL, on_listening, c);
    tp_buf_free(&q);
    if (!ok)
        conn_lost(c, tp_pgconn_error(c->pg));
}

tp_pglisten_t *tp_pglisten_new(struct event_base *base, const char *dsn, const char *channel,
                               int connect_timeout_ms, tp_pg_notify_cb cb, void *arg)
{
    return tp_pglisten_new_pw(base, dsn, channel, connect_timeout_ms, NULL, cb, arg);
}

tp_pglisten_t *tp_pglisten_new_pw(struct event_base *base, const char *dsn, const char *channel,
                                  int connect_timeout_ms, const tp_pg_password_provider_t *pw,
                                  tp_pg_notify_cb cb, void *arg)
{
    tp_pglisten_t *l = tp_xcalloc(1, sizeof *l);
    l->channel = tp_xstrdup(channel);
    for (char *s = l->channel; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
            *s = '_';
    l->cb = cb;
    l->arg = arg;
    conn_init(&l->c, base, dsn ? dsn : "", "listen", connect_timeout_ms, pw);
    l->c.lsn = l;
    conn_start(&l->c);
    return l;
}

void tp_pglisten_free(tp_pglisten_t *l)
{
    if (!l)
        return;
    conn_destroy(&l->c);
    free(l->channel);
    free(l);
}

bool tp_pglisten_up(const tp_pglisten_t *l)
{
    return l->c.st == C_LISTENING;
}
