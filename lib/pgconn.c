/* One non-blocking libpq connection on a libevent loop (tidepool/pgconn.h).
 *
 * Owns one PGconn, its read and write events, a connect timer and the
 * password it logged in with. States: IDLE -> [PASSWORD: waiting for the
 * provider] -> CONNECTING (PQconnectPoll driven by the socket, PQsocket re-read
 * after every poll, bounded by our own timer since libpq ignores
 * connect_timeout here) -> READY <-> QUERY | COPY_START -> COPY_IN -> COPY_END,
 * and BROKEN once anything failed (connect may start again from BROKEN or
 * IDLE). One operation at a time; its callback runs exactly once; results are
 * drained to NULL before the next. COPY data is queued into libpq and flushed
 * as the socket allows; copy_put reports "stop producing" while unflushed
 * bytes remain. Between operations the socket is watched only when someone
 * listens (notifications, on_lost), so a connection that drops while idle is
 * noticed then, else at its next use. A callback may
 * free the connection: the free waits until the callback returns. Cancel
 * requests go to one background thread, because PQcancel blocks.
 * Not done here: retries, reconnection, pooling, pipeline mode. */
#include "tidepool/pgconn.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"

#define PGCONN_MAGIC 0x7067636eu

typedef enum {
    ST_IDLE,
    ST_PASSWORD,
    ST_CONNECTING,
    ST_READY,
    ST_QUERY,
    ST_COPY_START,
    ST_COPY_IN,
    ST_COPY_END,
    ST_BROKEN,
} pg_state_t;

typedef struct op_gate op_gate_t;

struct tp_pgconn {
    uint32_t magic;
    struct event_base *base;
    char *dsn;
    char *appname;
    tp_pg_password_provider_t pw;
    bool has_pw;
    void *pw_wait;  /* pending provider request */
    char *password; /* the last one handed to libpq (secret) */
    bool refused;   /* ... and the server refused it at login (28P01) */
    PGconn *conn;
    int sock;
    struct event *ev_read, *ev_write, *ev_timer;
    bool rd_on, wr_on;
    pg_state_t state;
    tp_pgconn_done_fn cb;
    void *cb_arg;
    PGresult *result;  /* the first error result, else the last result */
    char *first_error; /* the operation's first error, formatted */
    void (*drain_fn)(void *);
    void *drain_arg;
    bool want_drain;
    bool cancel_sent; /* for the operation in flight */
    op_gate_t *gate;
    tp_pgconn_notify_fn notify_fn;
    void *notify_arg;
    tp_pgconn_lost_fn lost_fn;
    void *lost_arg;
    int in_callback;
    bool dead;
    char err[1024];
};

static void on_socket(evutil_socket_t fd, short what, void *arg);
static void on_timer(evutil_socket_t fd, short what, void *arg);

/* ---- cancel requests, sent from one background thread ---- */

/* Which operation a connection is on, shared with the canceller thread so
 * that a cancel whose statement ended meanwhile is dropped instead of hitting
 * the next one. Freed by its last holder. */
struct op_gate {
    atomic_uint op;
    atomic_int refs;
};

static void gate_unref(op_gate_t *g)
{
    if (atomic_fetch_sub(&g->refs, 1) == 1)
        free(g);
}

typedef struct cancel_job {
    PGcancel *key;
    op_gate_t *gate;
    unsigned op; /* the operation to cancel */
    struct cancel_job *next;
} cancel_job_t;

static pthread_mutex_t cq_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cq_cv = PTHREAD_COND_INITIALIZER;
static cancel_job_t *cq_head, *cq_tail;
static bool cq_started;

static void *canceller(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&cq_mu);
        while (cq_head == NULL)
            pthread_cond_wait(&cq_cv, &cq_mu);
        cancel_job_t *j = cq_head;
        cq_head = j->next;
        if (cq_head == NULL)
            cq_tail = NULL;
        pthread_mutex_unlock(&cq_mu);
        char buf[256];
        if (atomic_load(&j->gate->op) == j->op && !PQcancel(j->key, buf, sizeof buf))
            tp_warn("cancel of a Postgres statement failed: %s", buf);
        PQfreeCancel(j->key);
        gate_unref(j->gate);
        free(j);
    }
    return NULL;
}

/* Queues key (taken) for the canceller thread, starting it on first use. */
static void cancel_enqueue(PGcancel *key, op_gate_t *gate)
{
    cancel_job_t *j = tp_xcalloc(1, sizeof *j);
    j->key = key;
    j->gate = gate;
    j->op = atomic_load(&gate->op);
    atomic_fetch_add(&gate->refs, 1);
    pthread_mutex_lock(&cq_mu);
    if (!cq_started) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        cq_started = pthread_create(&t, &at, canceller, NULL) == 0;
        pthread_attr_destroy(&at);
        if (!cq_started) {
            pthread_mutex_unlock(&cq_mu);
            tp_warn("cannot start the Postgres cancel thread; statement not cancelled");
            PQfreeCancel(key);
            gate_unref(gate);
            free(j);
            return;
        }
    }
    if (cq_tail)
        cq_tail->next = j;
    else
        cq_head = j;
    cq_tail = j;
    pthread_cond_signal(&cq_cv);
    pthread_mutex_unlock(&cq_mu);
}

/* ---- socket events ---- */

/* Watches the socket for reading and/or writing; the events are re-assigned
 * only when libpq's socket changed. */
static void want(tp_pgconn_t *c, bool rd, bool wr)
{
    int s = c->conn ? PQsocket(c->conn) : -1;
    if (s != c->sock) {
        event_del(c->ev_read);
        event_del(c->ev_write);
        c->rd_on = c->wr_on = false;
        c->sock = s;
        if (s < 0)
            return;
        event_assign(c->ev_read, c->base, s, EV_READ | EV_PERSIST, on_socket, c);
        event_assign(c->ev_write, c->base, s, EV_WRITE | EV_PERSIST, on_socket, c);
    }
    if (s < 0)
        return;
    if (rd != c->rd_on) {
        if (rd)
            event_add(c->ev_read, NULL);
        else
            event_del(c->ev_read);
        c->rd_on = rd;
    }
    if (wr != c->wr_on) {
        if (wr)
            event_add(c->ev_write, NULL);
        else
            event_del(c->ev_write);
        c->wr_on = wr;
    }
}

/* Between operations the socket is read only for someone who listens:
 * notifications, or the news that an idle connection dropped. */
static void want_idle(tp_pgconn_t *c)
{
    want(c, c->notify_fn != NULL || c->lost_fn != NULL, false);
}

static void drop_events(tp_pgconn_t *c)
{
    event_del(c->ev_read);
    event_del(c->ev_write);
    c->rd_on = c->wr_on = false;
    c->sock = -1;
}

static void burn(char **s)
{
    if (*s != NULL) {
        explicit_bzero(*s, strlen(*s));
        free(*s);
        *s = NULL;
    }
}

static void clear_op(tp_pgconn_t *c)
{
    if (c->result) {
        PQclear(c->result);
        c->result = NULL;
    }
    free(c->first_error);
    c->first_error = NULL;
}

/* ---- life cycle ---- */

tp_pgconn_t *tp_pgconn_new(struct event_base *base, const char *dsn, const char *appname,
                           const tp_pg_password_provider_t *pw)
{
    tp_pgconn_t *c = tp_xcalloc(1, sizeof *c);
    c->magic = PGCONN_MAGIC;
    c->base = base;
    c->dsn = tp_xstrdup(dsn ? dsn : "");
    c->appname = appname ? tp_xstrdup(appname) : NULL;
    if (pw != NULL) {
        c->pw = *pw;
        c->has_pw = true;
    }
    c->sock = -1;
    c->ev_read = event_new(base, -1, 0, on_socket, c);
    c->ev_write = event_new(base, -1, 0, on_socket, c);
    c->ev_timer = evtimer_new(base, on_timer, c);
    c->gate = tp_xcalloc(1, sizeof *c->gate);
    atomic_init(&c->gate->op, 0);
    atomic_init(&c->gate->refs, 1);
    return c;
}

void tp_pgconn_close(tp_pgconn_t *c)
{
    if (c->pw_wait) {
        c->pw.cancel(c->pw_wait);
        c->pw_wait = NULL;
    }
    evtimer_del(c->ev_timer);
    drop_events(c);
    clear_op(c);
    if (c->conn) {
        PQfinish(c->conn);
        c->conn = NULL;
    }
    c->cb = NULL;
    c->want_drain = false;
    atomic_fetch_add(&c->gate->op, 1);
    c->state = ST_IDLE;
}

static void really_free(tp_pgconn_t *c)
{
    tp_pgconn_close(c);
    event_free(c->ev_read);
    event_free(c->ev_write);
    event_free(c->ev_timer);
    gate_unref(c->gate);
    burn(&c->password);
    free(c->dsn);
    free(c->appname);
    c->magic = 0;
    free(c);
}

void tp_pgconn_free(tp_pgconn_t *c)
{
    if (c == NULL)
        return;
    if (c->in_callback) {
        c->dead = true;
        c->drain_fn = NULL;
        c->notify_fn = NULL;
        c->lost_fn = NULL;
        tp_pgconn_close(c);
        return;
    }
    really_free(c);
}

/* Every entry from the loop goes through enter/leave, so that a callback may
 * free the connection; leave returns false once it is gone. */
static tp_pgconn_t *enter(void *arg)
{
    tp_pgconn_t *c = arg;
    if (c->magic != PGCONN_MAGIC)
        abort();
    c->in_callback++;
    return c;
}

static void leave(tp_pgconn_t *c)
{
    if (--c->in_callback == 0 && c->dead)
        really_free(c);
}

/* ---- errors and completion ---- */

char *tp_pgconn_result_error(const PGresult *res)
{
    tp_buf_t b;
    tp_buf_init(&b);
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    const char *ctx = PQresultErrorField(res, PG_DIAG_CONTEXT);
    if (msg == NULL) {
        msg = PQresultErrorMessage(res);
        if (msg == NULL || *msg == '\0')
            msg = PQresStatus(PQresultStatus(res));
    }
    tp_buf_puts(&b, msg);
    while (b.len > 0 && (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == ' '))
        b.data[--b.len] = '\0';
    if (detail)
        tp_buf_printf(&b, " (detail: %s)", detail);
    if (ctx) {
        /* Only the first context line: "COPY t, line 3, column x: "abc"". */
        const char *nl = strchr(ctx, '\n');
        tp_buf_printf(&b, " (context: %.*s)", (int)(nl ? nl - ctx : (long)strlen(ctx)), ctx);
    }
    if (state)
        tp_buf_printf(&b, " [SQLSTATE %s]", state);
    return tp_buf_steal(&b);
}

/* c->err = "what: <libpq's message on one line>". */
static void conn_error(tp_pgconn_t *c, const char *what)
{
    const char *m = c->conn ? PQerrorMessage(c->conn) : "no connection";
    char line[600];
    snprintf(line, sizeof(line), "%s", m ? m : "");
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == ' '))
        line[--n] = '\0';
    for (char *p = line; *p; p++)
        if (*p == '\n')
            *p = ' ';
    snprintf(c->err, sizeof(c->err), "%s: %s", what, line);
}

/* Runs the operation's callback once (called from an entry point only). */
static void finish(tp_pgconn_t *c, pg_state_t next, const char *err)
{
    tp_pgconn_done_fn cb = c->cb;
    void *arg = c->cb_arg;
    PGresult *res = c->result;
    c->cb = NULL;
    c->result = NULL;
    atomic_fetch_add(&c->gate->op, 1);
    if (c->state != ST_BROKEN)
        c->state = next;
    if (c->state == ST_READY)
        want_idle(c);
    if (cb)
        cb(c, res, err, arg);
    if (res)
        PQclear(res);
}

/* One teardown for every failure: the operation in flight gets err, else the
 * on_lost callback does. */
static void fail(tp_pgconn_t *c)
{
    c->state = ST_BROKEN;
    drop_events(c);
    evtimer_del(c->ev_timer);
    if (c->pw_wait) {
        c->pw.cancel(c->pw_wait);
        c->pw_wait = NULL;
    }
    clear_op(c);
    if (c->cb)
        finish(c, ST_BROKEN, c->err);
    else if (c->lost_fn)
        c->lost_fn(c, c->err, c->lost_arg);
}

static void broken(tp_pgconn_t *c, const char *what)
{
    conn_error(c, what);
    fail(c);
}

/* ---- state queries ---- */

bool tp_pgconn_ok(const tp_pgconn_t *c)
{
    return c && c->conn && c->state >= ST_READY && c->state != ST_BROKEN &&
           PQstatus(c->conn) == CONNECTION_OK;
}

bool tp_pgconn_busy(const tp_pgconn_t *c)
{
    return c && (c->state == ST_QUERY || c->state == ST_COPY_START || c->state == ST_COPY_END ||
                 c->state == ST_CONNECTING || c->state == ST_PASSWORD);
}

bool tp_pgconn_in_copy(const tp_pgconn_t *c)
{
    return c && c->state == ST_COPY_IN;
}

const char *tp_pgconn_error(const tp_pgconn_t *c)
{
    return c ? c->err : "";
}

PGconn *tp_pgconn_pg(tp_pgconn_t *c)
{
    return c->conn;
}

/* ---- connect ---- */

static void host_port(tp_pgconn_t *c, char *buf, size_t n, const char *what)
{
    const char *h = c->conn ? PQhost(c->conn) : NULL;
    const char *p = c->conn ? PQport(c->conn) : NULL;
    snprintf(buf, n, "%s %s:%s", what, h ? h : "?", p ? p : "?");
}

static void connect_step(tp_pgconn_t *c)
{
    switch (PQconnectPoll(c->conn)) {
    case PGRES_POLLING_READING: want(c, true, false); return;
    case PGRES_POLLING_WRITING: want(c, false, true); return;
    case PGRES_POLLING_OK:
        evtimer_del(c->ev_timer);
        if (PQsetnonblocking(c->conn, 1) != 0) {
            broken(c, "set non-blocking");
            return;
        }
        c->err[0] = '\0';
        finish(c, ST_READY, NULL);
        return;
    default: {
        char what[300];
        host_port(c, what, sizeof what, "connect to Postgres");
        c->refused = c->password != NULL && tp_pg_password_refused(PQerrorMessage(c->conn));
        if (c->refused && c->pw.refused_fn != NULL)
            c->pw.refused_fn(c->pw.self);
        broken(c, what);
        return;
    }
    }
}

/* Hands the conninfo (and the password, if any) to libpq. */
static bool start_libpq(tp_pgconn_t *c)
{
    const char *keys[4], *vals[4];
    int n = 0;
    keys[n] = "dbname"; /* expanded as a conninfo */
    vals[n++] = c->dsn;
    if (c->appname) {
        keys[n] = "fallback_application_name";
        vals[n++] = c->appname;
    }
    if (c->password && *c->password) {
        keys[n] = "password";
        vals[n++] = c->password;
    }
    keys[n] = vals[n] = NULL;
    c->conn = PQconnectStartParams(keys, vals, 1);
    if (c->conn == NULL || PQstatus(c->conn) == CONNECTION_BAD) {
        conn_error(c, "connect to Postgres");
        return false;
    }
    c->state = ST_CONNECTING;
    /* The first poll happens once the socket is writable, per libpq's docs. */
    want(c, false, true);
    return true;
}

static void on_password(const char *password, const char *err, void *arg)
{
    tp_pgconn_t *c = enter(arg);
    c->pw_wait = NULL;
    if (password == NULL) {
        snprintf(c->err, sizeof c->err, "%s", err ? err : "no database credential");
        fail(c);
    } else {
        c->password = tp_xstrdup(password);
        if (!start_libpq(c))
            fail(c);
    }
    leave(c);
}

bool tp_pgconn_connect(tp_pgconn_t *c, int timeout_ms, tp_pgconn_done_fn cb, void *arg)
{
    if (c->state != ST_IDLE && c->state != ST_BROKEN) {
        snprintf(c->err, sizeof(c->err), "connect: connection already in use");
        return false;
    }
    tp_pgconn_close(c);
    char *refused = NULL;
    if (c->refused) /* handed to the provider, then burnt */
        refused = c->password;
    else
        burn(&c->password);
    c->password = NULL;
    c->refused = false;
    c->err[0] = '\0';
    if (!c->has_pw && !start_libpq(c)) {
        tp_pgconn_close(c);
        c->state = ST_BROKEN;
        return false;
    }
    c->cb = cb;
    c->cb_arg = arg;
    int ms = timeout_ms > 0 ? timeout_ms : 5000;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(c->ev_timer, &tv);
    if (c->has_pw) {
        c->state = ST_PASSWORD;
        c->pw_wait = c->pw.get(c->pw.self, refused, on_password, c);
    }
    burn(&refused);
    return true;
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_pgconn_t *c = enter(arg);
    if (c->state == ST_PASSWORD) {
        snprintf(c->err, sizeof c->err, "timed out waiting for the database credential");
        fail(c);
    } else if (c->state == ST_CONNECTING) {
        char where[300];
        host_port(c, where, sizeof where, "connect to Postgres");
        snprintf(c->err, sizeof(c->err), "%s: timed out", where);
        fail(c);
    }
    leave(c);
}

/* ---- results and notifications ---- */

static void collect_results(tp_pgconn_t *c)
{
    while (!PQisBusy(c->conn)) {
        PGresult *r = PQgetResult(c->conn);
        if (r == NULL) {
            if (c->first_error) {
                snprintf(c->err, sizeof(c->err), "%s", c->first_error);
                free(c->first_error);
                c->first_error = NULL;
                finish(c, ST_READY, c->err);
            } else {
                finish(c, ST_READY, NULL);
            }
            return;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN && c->state == ST_COPY_START) {
            if (c->result)
                PQclear(c->result);
            c->result = r;
            finish(c, ST_COPY_IN, NULL);
            return;
        }
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            /* Not expected here: end it so the connection stays usable. */
            PQclear(r);
            if (c->first_error == NULL)
                c->first_error = tp_xstrdup("unexpected COPY state");
            if (st == PGRES_COPY_IN)
                (void)PQputCopyEnd(c->conn, "unexpected COPY");
            continue;
        }
        bool error = st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE ||
                     st == PGRES_NONFATAL_ERROR;
        if (c->first_error != NULL) { /* keep the first error */
            PQclear(r);
            continue;
        }
        if (error)
            c->first_error = tp_pgconn_result_error(r);
        if (c->result)
            PQclear(c->result);
        c->result = r;
    }
}

/* Delivers queued notifications; false if a callback closed or freed c. */
static bool dispatch_notifies(tp_pgconn_t *c)
{
    PGnotify *n;
    while (c->conn && (n = PQnotifies(c->conn)) != NULL) {
        if (c->notify_fn)
            c->notify_fn(c, n->relname, n->extra, c->notify_arg);
        PQfreemem(n);
    }
    return c->conn != NULL && !c->dead;
}

static bool op_in_flight(const tp_pgconn_t *c)
{
    return c->state == ST_QUERY || c->state == ST_COPY_START || c->state == ST_COPY_END;
}

static void on_socket(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    tp_pgconn_t *c = enter(arg);
    if (c->state == ST_CONNECTING) {
        connect_step(c);
        goto out;
    }
    if (c->conn == NULL || c->state == ST_BROKEN)
        goto out;
    if (what & EV_WRITE) {
        int r = PQflush(c->conn);
        if (r < 0) {
            broken(c, "send to Postgres");
            goto out;
        }
        if (r == 0) {
            if (op_in_flight(c) || c->state == ST_COPY_IN)
                want(c, true, false);
            else
                want_idle(c);
            if (c->want_drain && c->drain_fn) {
                c->want_drain = false;
                c->drain_fn(c->drain_arg);
                if (c->dead || c->conn == NULL)
                    goto out;
            }
        }
    }
    if (what & EV_READ) {
        if (!PQconsumeInput(c->conn)) {
            broken(c, "receive from Postgres");
            goto out;
        }
        if (!dispatch_notifies(c))
            goto out;
        if (op_in_flight(c))
            collect_results(c);
    }
out:
    leave(c);
}

/* ---- operations ---- */

static bool check_ready(tp_pgconn_t *c, const char *what)
{
    if (c->state != ST_READY) {
        if (c->state != ST_BROKEN)
            snprintf(c->err, sizeof(c->err), "%s: connection busy or not connected", what);
        return false;
    }
    return true;
}

/* After a PQsend*: flush, watch, and take the callback. */
static bool start_op(tp_pgconn_t *c, int sent, const char *what, pg_state_t st,
                     tp_pgconn_done_fn cb, void *arg)
{
    if (!sent) {
        conn_error(c, what);
        return false;
    }
    int r = PQflush(c->conn);
    if (r < 0) {
        conn_error(c, "send to Postgres");
        c->state = ST_BROKEN;
        drop_events(c);
        return false;
    }
    clear_op(c);
    c->cancel_sent = false;
    atomic_fetch_add(&c->gate->op, 1);
    c->state = st;
    c->cb = cb;
    c->cb_arg = arg;
    want(c, true, r == 1);
    /* libpq reads input while a send would block (pqSendSome), so the answer
     * may already sit in its buffer (a COPY that Postgres rejected mid-stream
     * answers before CopyDone): the socket would never turn readable again.
     * Look once from the loop instead of waiting for it (PQisBusy only parses
     * what is buffered: false means a whole answer is there already). */
    if (!PQisBusy(c->conn))
        event_active(c->ev_read, EV_READ, 0);
    return true;
}

bool tp_pgconn_query(tp_pgconn_t *c, const char *sql, int nparams, const Oid *types,
                     const char *const *values, tp_pgconn_done_fn cb, void *arg)
{
    if (!check_ready(c, "query"))
        return false;
    int ok = values != NULL ? PQsendQueryParams(c->conn, sql, nparams, types, values, NULL, NULL, 0)
                            : PQsendQuery(c->conn, sql);
    return start_op(c, ok, "send query", ST_QUERY, cb, arg);
}

bool tp_pgconn_prepare(tp_pgconn_t *c, const char *name, const char *sql, int ntypes,
                       const Oid *types, tp_pgconn_done_fn cb, void *arg)
{
    if (!check_ready(c, "prepare"))
        return false;
    int ok = PQsendPrepare(c->conn, name, sql, ntypes, types);
    return start_op(c, ok, "send prepare", ST_QUERY, cb, arg);
}

bool tp_pgconn_query_prepared(tp_pgconn_t *c, const char *name, int nparams,
                              const char *const *values, tp_pgconn_done_fn cb, void *arg)
{
    if (!check_ready(c, "query"))
        return false;
    int ok = PQsendQueryPrepared(c->conn, name, nparams, values, NULL, NULL, 0);
    return start_op(c, ok, "send query", ST_QUERY, cb, arg);
}

bool tp_pgconn_copy_begin(tp_pgconn_t *c, const char *sql, tp_pgconn_done_fn cb, void *arg)
{
    if (!check_ready(c, "copy"))
        return false;
    return start_op(c, PQsendQuery(c->conn, sql), "send COPY", ST_COPY_START, cb, arg);
}

int tp_pgconn_copy_put(tp_pgconn_t *c, const void *data, size_t len)
{
    if (c->state != ST_COPY_IN) {
        if (c->state != ST_BROKEN)
            snprintf(c->err, sizeof(c->err), "copy data outside COPY");
        return -1;
    }
    const char *p = data;
    while (len > 0) {
        int n = len > (1u << 30) ? (1 << 30) : (int)len;
        int r = PQputCopyData(c->conn, p, n);
        if (r < 0) {
            conn_error(c, "COPY data");
            return -1;
        }
        if (r == 0) {
            /* libpq could not grow its output buffer (it only says so when an
             * allocation failed): treat it like a broken connection. */
            snprintf(c->err, sizeof(c->err), "COPY data: libpq could not buffer %d bytes", n);
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    int r = PQflush(c->conn);
    if (r < 0) {
        conn_error(c, "COPY data");
        return -1;
    }
    if (r == 1) {
        c->want_drain = true;
        want(c, true, true);
        return 0;
    }
    return 1;
}

void tp_pgconn_on_drain(tp_pgconn_t *c, void (*fn)(void *arg), void *arg)
{
    c->drain_fn = fn;
    c->drain_arg = arg;
}

bool tp_pgconn_copy_end(tp_pgconn_t *c, const char *errmsg, tp_pgconn_done_fn cb, void *arg)
{
    if (c->state != ST_COPY_IN) {
        if (c->state != ST_BROKEN)
            snprintf(c->err, sizeof(c->err), "copy end outside COPY");
        return false;
    }
    c->want_drain = false;
    if (PQputCopyEnd(c->conn, errmsg) < 0) {
        conn_error(c, "COPY end");
        c->state = ST_BROKEN;
        drop_events(c);
        return false;
    }
    return start_op(c, 1, "COPY end", ST_COPY_END, cb, arg);
}

void tp_pgconn_on_notify(tp_pgconn_t *c, tp_pgconn_notify_fn fn, void *arg)
{
    c->notify_fn = fn;
    c->notify_arg = arg;
    if (c->state == ST_READY)
        want_idle(c);
}

void tp_pgconn_on_lost(tp_pgconn_t *c, tp_pgconn_lost_fn fn, void *arg)
{
    c->lost_fn = fn;
    c->lost_arg = arg;
    if (c->state == ST_READY)
        want_idle(c);
}

void tp_pgconn_cancel(tp_pgconn_t *c)
{
    /* A COPY receiving data is ended by its owner (copy_end), not cancelled. */
    if (c == NULL || c->conn == NULL || !op_in_flight(c) || c->cancel_sent)
        return;
    c->cancel_sent = true;
    PGcancel *k = PQgetCancel(c->conn);
    if (k)
        cancel_enqueue(k, c->gate);
}
