/* Asynchronous PostgreSQL on libevent (see include/tidepool/pgasync.h).
 *
 * Owns: connections (PGconn in non-blocking mode), their socket events and
 * timers, the pool's statement registry and its FIFO wait queue.
 * Connection states: DOWN (waiting for the backoff timer) -> CONNECTING
 * (PQconnectPoll driven by the socket, bounded by our own timer, PQsocket
 * re-read after every poll) -> IDLE -> PREPARING (first use of a statement on
 * this connection) -> BUSY (PQsendQueryPrepared sent, PQflush until done,
 * PQgetResult drained to NULL) -> IDLE. Any failure goes through conn_lost,
 * which fails the request in hand, closes the socket and schedules a reconnect
 * with exponential backoff (100 ms .. 5 s, jittered). When no connection is up
 * the waiting requests fail at once (the caller answers 503).
 * Not done here: pipeline mode (one statement per round trip per connection;
 * dashboards' concurrency is spread over the pool instead), COPY, transactions. */
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
    C_PASSWORD, /* waiting for the password provider (before PQconnectStartParams) */
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
    struct event_base *base;
    tp_pgpool_t *pool;   /* NULL for a LISTEN connection */
    tp_pglisten_t *lsn;  /* NULL for a pool connection */
    const char *dsn;
    const char *label;
    int connect_timeout_ms;
    const tp_pg_password_provider_t *pw; /* NULL: the dsn's password */
    void *pw_wait;  /* pending provider request */
    char *password; /* the one this connection used (secret), for "refused" */
    bool refused;   /* the server refused it at login (28P01) */
    bool pw_retried; /* refused once since the last success: back off now */
    PGconn *pg;
    conn_state_t st;
    struct event *sock;
    int sock_fd;
    short sock_what;
    struct event *timer;
    int64_t backoff_ms;
    int64_t retry_at_ms;
    bool was_up; /* for logging transitions once */
    bool *prepared;
    tp_pgreq_t *req;
    PGresult *last;
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
    tp_pg_password_provider_t pw;
    bool has_pw;
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
    char *dsn;
    tp_pg_password_provider_t pw;
    char *channel;
    tp_pg_notify_cb cb;
    void *arg;
};

static void on_sock(evutil_socket_t fd, short what, void *arg);
static void on_timer(evutil_socket_t fd, short what, void *arg);
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

/* Watches the connection's socket for what (EV_READ and/or EV_WRITE); the
 * event is re-assigned only when the descriptor or the interest changed. */
static void watch(conn_t *c, short what)
{
    int fd = c->pg ? PQsocket(c->pg) : -1;
    if (fd == c->sock_fd && what == c->sock_what && event_pending(c->sock, EV_READ | EV_WRITE, NULL))
        return;
    event_del(c->sock);
    c->sock_fd = fd;
    c->sock_what = what;
    if (fd < 0 || what == 0)
        return;
    event_assign(c->sock, c->base, fd, what | EV_PERSIST, on_sock, c);
    event_add(c->sock, NULL);
}

static void timer_in(conn_t *c, int64_t ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    event_del(c->timer);
    event_add(c->timer, &tv);
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

/* One teardown for every failure: fail the request in hand, close, back off. */
static void conn_lost(conn_t *c, const char *why)
{
    char msg[256];
    snprintf(msg, sizeof msg, "%s", why && *why ? why : "connection lost");
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = '\0';
    event_del(c->sock);
    c->sock_fd = -1;
    c->sock_what = 0;
    if (c->last) {
        PQclear(c->last);
        c->last = NULL;
    }
    if (c->pg) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    if (c->prepared && c->pool)
        memset(c->prepared, 0, sizeof(bool) * (size_t)c->pool->max_stmts);
    bool was_up = c->was_up;
    c->was_up = false;
    /* an expired or rotated password: ask the provider for a new one at once */
    c->refused = c->pw != NULL && c->st == C_CONNECTING && tp_pg_password_refused(msg);
    bool fresh_pw = c->refused && !c->pw_retried;
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

static void flush_and_watch(conn_t *c)
{
    int f = PQflush(c->pg);
    if (f < 0) {
        conn_lost(c, PQerrorMessage(c->pg));
        return;
    }
    watch(c, f == 1 ? (EV_READ | EV_WRITE) : EV_READ);
}

static void stmt_name(char *buf, size_t n, int id)
{
    snprintf(buf, n, "tp_s%d", id);
}

/* Sends the next step of r on c: prepare (first use here) or execute. */
static void conn_send(conn_t *c, tp_pgreq_t *r)
{
    char name[32];
    int ok;
    c->req = r;
    if (r->stmt >= 0 && !c->prepared[r->stmt]) {
        stmt_name(name, sizeof name, r->stmt);
        const stmt_t *st = &c->pool->stmts[r->stmt];
        ok = PQsendPrepare(c->pg, name, st->sql, st->ntypes, st->types);
        c->st = C_PREPARING;
    } else if (r->stmt >= 0) {
        stmt_name(name, sizeof name, r->stmt);
        ok = PQsendQueryPrepared(c->pg, name, r->nparams, (const char *const *)r->values, NULL,
                                 NULL, 0);
        c->st = C_BUSY;
    } else {
        ok = PQsendQueryParams(c->pg, r->sql, r->nparams, r->types,
                               (const char *const *)r->values, NULL, NULL, 0);
        c->st = C_BUSY;
    }
    if (!ok) {
        conn_lost(c, PQerrorMessage(c->pg));
        return;
    }
    flush_and_watch(c);
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

/* A whole statement's results have been drained (PQgetResult returned NULL). */
static void conn_finished(conn_t *c)
{
    PGresult *res = c->last;
    c->last = NULL;
    tp_pgreq_t *r = c->req;
    bool failed = res && PQresultStatus(res) != PGRES_COMMAND_OK &&
                  PQresultStatus(res) != PGRES_TUPLES_OK;
    if (c->st == C_PREPARING && !failed) {
        c->prepared[r->stmt] = true;
        PQclear(res);
        conn_send(c, r);
        return;
    }
    c->req = NULL;
    c->st = C_IDLE;
    watch(c, EV_READ);
    char *err = failed ? tp_xstrdup(PQresultErrorMessage(res)) : NULL;
    if (err) {
        size_t n = strlen(err);
        while (n > 0 && (err[n - 1] == '\n' || err[n - 1] == ' '))
            err[--n] = '\0';
    }
    req_complete(r, res, res ? err : "no result");
    free(err);
    PQclear(res);
    pool_dispatch(c->pool);
}

static void listen_ready(conn_t *c);

static void conn_read(conn_t *c)
{
    if (!PQconsumeInput(c->pg)) {
        conn_lost(c, PQerrorMessage(c->pg));
        return;
    }
    if (c->st == C_IDLE || c->st == C_LISTENING) {
        PGnotify *nt;
        while ((nt = PQnotifies(c->pg)) != NULL) {
            if (c->lsn && c->st == C_LISTENING)
                c->lsn->cb(nt->relname, nt->extra, c->lsn->arg);
            PQfreemem(nt);
        }
        return;
    }
    while (!PQisBusy(c->pg)) {
        PGresult *res = PQgetResult(c->pg);
        if (!res) {
            if (c->st == C_LISTEN_SETUP) {
                bool ok = c->last && PQresultStatus(c->last) == PGRES_COMMAND_OK;
                char *err = ok ? NULL : tp_xstrdup(c->last ? PQresultErrorMessage(c->last) : "LISTEN failed");
                if (c->last)
                    PQclear(c->last);
                c->last = NULL;
                if (ok)
                    listen_ready(c);
                else
                    conn_lost(c, err);
                free(err);
            } else {
                conn_finished(c);
            }
            return;
        }
        /* Keep the first error, else the last result. */
        if (c->last && PQresultStatus(c->last) == PGRES_FATAL_ERROR) {
            PQclear(res);
        } else {
            if (c->last)
                PQclear(c->last);
            c->last = res;
        }
    }
}

static void conn_up(conn_t *c)
{
    if (PQsetnonblocking(c->pg, 1) != 0) {
        conn_lost(c, PQerrorMessage(c->pg));
        return;
    }
    event_del(c->timer);
    c->backoff_ms = 0;
    c->was_up = true;
    c->pw_retried = false;
    if (c->lsn) {
        tp_buf_t q = {0};
        tp_buf_printf(&q, "LISTEN %s", c->lsn->channel);
        int ok = PQsendQuery(c->pg, q.data);
        tp_buf_free(&q);
        if (!ok) {
            conn_lost(c, PQerrorMessage(c->pg));
            return;
        }
        c->st = C_LISTEN_SETUP;
        flush_and_watch(c);
        return;
    }
    c->st = C_IDLE;
    watch(c, EV_READ);
    const char *kv[] = {"pool", c->label, NULL};
    tp_logkv(TP_LOG_DEBUG, kv, "postgres connection ready");
    pool_dispatch(c->pool);
}

static void conn_poll(conn_t *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_READING: watch(c, EV_READ); break;
    case PGRES_POLLING_WRITING: watch(c, EV_WRITE); break;
    case PGRES_POLLING_OK: conn_up(c); break;
    default: conn_lost(c, PQerrorMessage(c->pg)); break;
    }
}

static void on_sock(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    conn_t *c = arg;
    if (c->magic != CONN_MAGIC)
        abort();
    if (c->st == C_CONNECTING) {
        conn_poll(c);
        return;
    }
    if (!c->pg)
        return;
    if (what & EV_WRITE) {
        flush_and_watch(c);
        if (!c->pg)
            return;
    }
    if (what & EV_READ)
        conn_read(c);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = arg;
    if (c->magic != CONN_MAGIC)
        abort();
    if (c->st == C_CONNECTING)
        conn_lost(c, "connect timed out");
    else if (c->st == C_PASSWORD) {
        c->pw->cancel(c->pw_wait);
        c->pw_wait = NULL;
        conn_lost(c, "timed out waiting for the database credential");
    }
    else if (c->st == C_DOWN)
        conn_start(c);
}

static void conn_connect(conn_t *c)
{
    if (c->password != NULL) {
        const char *keys[] = {"dbname", "password", NULL};
        const char *vals[] = {c->dsn, c->password, NULL};
        c->pg = PQconnectStartParams(keys, vals, 1); /* dbname is expanded as a conninfo */
    } else {
        c->pg = PQconnectStart(c->dsn);
    }
    if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
        conn_lost(c, c->pg ? PQerrorMessage(c->pg) : "out of memory");
        return;
    }
    c->st = C_CONNECTING;
    timer_in(c, c->connect_timeout_ms);
    watch(c, EV_WRITE);
}

static void forget_password(conn_t *c)
{
    if (c->password != NULL) {
        explicit_bzero(c->password, strlen(c->password));
        free(c->password);
        c->password = NULL;
    }
}

static void on_password(const char *password, const char *err, void *arg)
{
    conn_t *c = arg;
    if (c->magic != CONN_MAGIC)
        abort();
    c->pw_wait = NULL;
    event_del(c->timer);
    if (password == NULL) {
        conn_lost(c, err ? err : "no database credential");
        return;
    }
    c->password = tp_xstrdup(password);
    conn_connect(c);
}

static void conn_start(conn_t *c)
{
    if (c->pw == NULL) {
        conn_connect(c);
        return;
    }
    char *refused = NULL;
    if (c->refused) { /* handed to the provider, then burnt below */
        refused = c->password;
        c->password = NULL;
    }
    forget_password(c);
    c->refused = false;
    c->st = C_PASSWORD;
    timer_in(c, c->connect_timeout_ms);
    c->pw_wait = c->pw->get(c->pw->self, refused, on_password, c);
    if (refused != NULL) {
        explicit_bzero(refused, strlen(refused));
        free(refused);
    }
}

static void conn_init(conn_t *c, struct event_base *base, const char *dsn, const char *label,
                      int connect_timeout_ms, const tp_pg_password_provider_t *pw)
{
    memset(c, 0, sizeof *c);
    c->magic = CONN_MAGIC;
    c->pw = pw;
    c->base = base;
    c->dsn = dsn;
    c->label = label;
    c->connect_timeout_ms = connect_timeout_ms > 0 ? connect_timeout_ms : 5000;
    c->sock = event_new(base, -1, 0, on_sock, c);
    c->timer = evtimer_new(base, on_timer, c);
    c->sock_fd = -1;
    c->st = C_DOWN;
}

static void conn_destroy(conn_t *c)
{
    if (c->sock) {
        event_del(c->sock);
        event_free(c->sock);
    }
    if (c->timer) {
        event_del(c->timer);
        event_free(c->timer);
    }
    if (c->last)
        PQclear(c->last);
    if (c->pg)
        PQfinish(c->pg);
    if (c->pw_wait)
        c->pw->cancel(c->pw_wait);
    forget_password(c);
    req_free(c->req);
    free(c->prepared);
    c->magic = 0;
}

tp_pgpool_t *tp_pgpool_new(struct event_base *base, const tp_pgpool_opts_t *o)
{
    tp_pgpool_t *p = tp_xcalloc(1, sizeof *p);
    p->base = base;
    p->dsn = tp_xstrdup(o->dsn ? o->dsn : "");
    if (o->password != NULL) {
        p->pw = *o->password;
        p->has_pw = true;
    }
    p->name = tp_xstrdup(o->name ? o->name : "pool");
    p->max_queue = o->max_queue > 0 ? o->max_queue : 0;
    p->nconns = o->size > 0 ? o->size : 1;
    p->max_stmts = o->max_statements > 0 ? o->max_statements : 256;
    p->stmts = tp_xcalloc((size_t)p->max_stmts, sizeof *p->stmts);
    p->conns = tp_xcalloc((size_t)p->nconns, sizeof *p->conns);
    for (int i = 0; i < p->nconns; i++) {
        conn_t *c = &p->conns[i];
        conn_init(c, base, p->dsn, p->name, o->connect_timeout_ms, p->has_pw ? &p->pw : NULL);
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

static void listen_ready(conn_t *c)
{
    c->st = C_LISTENING;
    watch(c, EV_READ);
    const char *kv[] = {"channel", c->lsn->channel, NULL};
    tp_logkv(TP_LOG_INFO, kv, "listening for notifications");
    c->lsn->cb(NULL, NULL, c->lsn->arg);
    PGnotify *nt; /* any that arrived with the LISTEN's own reply */
    while ((nt = PQnotifies(c->pg)) != NULL) {
        c->lsn->cb(nt->relname, nt->extra, c->lsn->arg);
        PQfreemem(nt);
    }
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
    if (pw != NULL)
        l->pw = *pw;
    l->dsn = tp_xstrdup(dsn ? dsn : "");
    l->channel = tp_xstrdup(channel);
    for (char *s = l->channel; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
            *s = '_';
    l->cb = cb;
    l->arg = arg;
    conn_init(&l->c, base, l->dsn, "listen", connect_timeout_ms, pw != NULL ? &l->pw : NULL);
    l->c.lsn = l;
    conn_start(&l->c);
    return l;
}

void tp_pglisten_free(tp_pglisten_t *l)
{
    if (!l)
        return;
    conn_destroy(&l->c);
    free(l->dsn);
    free(l->channel);
    free(l);
}

bool tp_pglisten_up(const tp_pglisten_t *l)
{
    return l->c.st == C_LISTENING;
}
