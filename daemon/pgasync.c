/* Non-blocking libpq connections on the daemon's libevent loop.
 * Owns one PGconn, its read/write events and a connect timer. States:
 * IDLE -> CONNECTING -> READY <-> QUERY | COPY_START -> COPY_IN -> COPY_END,
 * and BROKEN once the socket failed. One operation runs at a time; its
 * callback runs exactly once. COPY data is queued into libpq and flushed as
 * the socket allows; copy_put reports "stop producing" while unflushed bytes
 * remain, so a fast warehouse never makes us buffer a result in memory.
 * A callback may free the connection: the free is deferred until the
 * callback returns. Does not retry or reconnect: callers decide that. */
#include "pgasync.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"

#define PGASYNC_MAGIC 0x70676173u

typedef enum {
    ST_IDLE,
    ST_CONNECTING,
    ST_READY,
    ST_QUERY,
    ST_COPY_START,
    ST_COPY_IN,
    ST_COPY_END,
    ST_BROKEN,
} pg_state_t;

struct tp_pgasync {
    unsigned magic;
    struct event_base *base;
    char *dsn;
    char *appname;
    PGconn *conn;
    int sock;
    struct event *ev_read;
    struct event *ev_write;
    struct event *ev_timer;
    pg_state_t state;
    tp_pgasync_done_fn cb;
    void *cb_arg;
    PGresult *result;  /* last result of the operation in flight */
    char *first_error; /* first error result's message */
    void (*drain_fn)(void *);
    void *drain_arg;
    bool want_drain;
    tp_pgasync_notify_fn notify_fn;
    void *notify_arg;
    int in_callback;
    bool dead;
    char err[1024];
};

static tp_pgasync_password_fn password_hook;
static void *password_hook_arg;
static void (*refused_hook)(void *arg);
static void *refused_hook_arg;

static void on_socket(evutil_socket_t fd, short what, void *arg);
static void on_timer(evutil_socket_t fd, short what, void *arg);

void tp_pgasync_set_password_hook(tp_pgasync_password_fn fn, void *arg)
{
    password_hook = fn;
    password_hook_arg = arg;
}

void tp_pgasync_set_refused_hook(void (*fn)(void *arg), void *arg)
{
    refused_hook = fn;
    refused_hook_arg = arg;
}

tp_pgasync_t *tp_pgasync_new(struct event_base *base, const char *dsn, const char *appname)
{
    tp_pgasync_t *c = tp_xcalloc(1, sizeof(*c));
    c->magic = PGASYNC_MAGIC;
    c->base = base;
    c->dsn = tp_xstrdup(dsn ? dsn : "");
    c->appname = tp_xstrdup(appname ? appname : "tidepool-sync");
    c->sock = -1;
    c->ev_timer = evtimer_new(base, on_timer, c);
    return c;
}

static void drop_events(tp_pgasync_t *c)
{
    if (c->ev_read) {
        event_free(c->ev_read);
        c->ev_read = NULL;
    }
    if (c->ev_write) {
        event_free(c->ev_write);
        c->ev_write = NULL;
    }
    c->sock = -1;
}

/* (Re)creates the socket events when libpq's socket changed. */
static void sync_socket(tp_pgasync_t *c)
{
    int s = c->conn ? PQsocket(c->conn) : -1;
    if (s == c->sock && c->ev_read)
        return;
    drop_events(c);
    if (s < 0)
        return;
    c->sock = s;
    c->ev_read = event_new(c->base, s, EV_READ | EV_PERSIST, on_socket, c);
    c->ev_write = event_new(c->base, s, EV_WRITE | EV_PERSIST, on_socket, c);
}

static void want(tp_pgasync_t *c, bool rd, bool wr)
{
    sync_socket(c);
    if (!c->ev_read)
        return;
    if (rd)
        event_add(c->ev_read, NULL);
    else
        event_del(c->ev_read);
    if (wr)
        event_add(c->ev_write, NULL);
    else
        event_del(c->ev_write);
}

static void really_free(tp_pgasync_t *c)
{
    drop_events(c);
    if (c->ev_timer)
        event_free(c->ev_timer);
    if (c->result)
        PQclear(c->result);
    if (c->conn)
        PQfinish(c->conn);
    free(c->first_error);
    free(c->dsn);
    free(c->appname);
    c->magic = 0;
    free(c);
}

void tp_pgasync_free(tp_pgasync_t *c)
{
    if (c == NULL)
        return;
    if (c->in_callback) {
        c->dead = true;
        c->cb = NULL;
        c->drain_fn = NULL;
        c->notify_fn = NULL;
        drop_events(c);
        evtimer_del(c->ev_timer);
        return;
    }
    really_free(c);
}

char *tp_pgasync_result_error(const PGresult *res)
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

/* Runs the operation's callback once; returns false if c was freed inside. */
static bool finish(tp_pgasync_t *c, pg_state_t next, const char *err)
{
    tp_pgasync_done_fn cb = c->cb;
    void *arg = c->cb_arg;
    PGresult *res = c->result;
    c->cb = NULL;
    c->result = NULL;
    if (c->state != ST_BROKEN)
        c->state = next;
    if (c->state == ST_READY || c->state == ST_IDLE)
        want(c, c->notify_fn != NULL, false);
    c->in_callback++;
    if (cb)
        cb(c, err ? NULL : res, err, arg);
    c->in_callback--;
    if (res)
        PQclear(res);
    if (c->dead && c->in_callback == 0) {
        really_free(c);
        return false;
    }
    return true;
}

static void conn_error(tp_pgasync_t *c, const char *what)
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

static void broken(tp_pgasync_t *c, const char *what)
{
    conn_error(c, what);
    c->state = ST_BROKEN;
    drop_events(c);
    evtimer_del(c->ev_timer);
    tp_pgasync_done_fn cb = c->cb;
    if (cb)
        (void)finish(c, ST_BROKEN, c->err);
}

bool tp_pgasync_ok(const tp_pgasync_t *c)
{
    return c && c->conn && c->state != ST_BROKEN && c->state != ST_IDLE &&
           c->state != ST_CONNECTING && PQstatus(c->conn) == CONNECTION_OK;
}

bool tp_pgasync_busy(const tp_pgasync_t *c)
{
    return c && (c->state == ST_QUERY || c->state == ST_COPY_START || c->state == ST_COPY_END ||
                 c->state == ST_CONNECTING);
}

bool tp_pgasync_in_copy(const tp_pgasync_t *c)
{
    return c && c->state == ST_COPY_IN;
}

const char *tp_pgasync_error(const tp_pgasync_t *c)
{
    return c ? c->err : "";
}

PGconn *tp_pgasync_conn(tp_pgasync_t *c)
{
    return c->conn;
}

static void connect_step(tp_pgasync_t *c)
{
    PostgresPollingStatusType st = PQconnectPoll(c->conn);
    switch (st) {
    case PGRES_POLLING_READING:
        want(c, true, false);
        return;
    case PGRES_POLLING_WRITING:
        want(c, false, true);
        return;
    case PGRES_POLLING_OK:
        evtimer_del(c->ev_timer);
        if (PQsetnonblocking(c->conn, 1) != 0) {
            broken(c, "set non-blocking");
            return;
        }
        c->err[0] = '\0';
        (void)finish(c, ST_READY, NULL);
        return;
    default: {
        char what[300];
        snprintf(what, sizeof(what), "connect to Postgres %s:%s", PQhost(c->conn) ? PQhost(c->conn) : "?",
                 PQport(c->conn) ? PQport(c->conn) : "?");
        evtimer_del(c->ev_timer);
        bool refused = tp_pg_password_refused(PQerrorMessage(c->conn));
        broken(c, what);
        if (refused && refused_hook != NULL)
            refused_hook(refused_hook_arg);
        return;
    }
    }
}

bool tp_pgasync_connect(tp_pgasync_t *c, int timeout_ms, tp_pgasync_done_fn cb, void *arg)
{
    if (c->state != ST_IDLE) {
        snprintf(c->err, sizeof(c->err), "connect: connection already used");
        return false;
    }
    const char *keys[4];
    const char *vals[4];
    int n = 0;
    char *pw = password_hook ? password_hook(password_hook_arg) : NULL;
    keys[n] = "dbname";
    vals[n++] = c->dsn;
    keys[n] = "fallback_application_name";
    vals[n++] = c->appname;
    if (pw) {
        keys[n] = "password";
        vals[n++] = pw;
    }
    keys[n] = NULL;
    vals[n] = NULL;
    c->conn = PQconnectStartParams(keys, vals, 1);
    if (pw) {
        memset(pw, 0, strlen(pw));
        free(pw);
    }
    if (c->conn == NULL || PQstatus(c->conn) == CONNECTION_BAD) {
        conn_error(c, "connect to Postgres");
        c->state = ST_BROKEN;
        return false;
    }
    c->state = ST_CONNECTING;
    c->cb = cb;
    c->cb_arg = arg;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    evtimer_add(c->ev_timer, &tv);
    /* The first poll happens once the socket is writable, per libpq's docs. */
    want(c, false, true);
    return true;
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_pgasync_t *c = arg;
    if (c->magic != PGASYNC_MAGIC)
        abort();
    if (c->state == ST_CONNECTING) {
        char msg[300];
        snprintf(msg, sizeof(msg), "connect to Postgres %s:%s: timed out",
                 PQhost(c->conn) ? PQhost(c->conn) : "?", PQport(c->conn) ? PQport(c->conn) : "?");
        snprintf(c->err, sizeof(c->err), "%s", msg);
        c->state = ST_BROKEN;
        drop_events(c);
        (void)finish(c, ST_BROKEN, c->err);
    }
}

/* Flushes libpq's output; returns false if the connection broke. */
static bool flush_out(tp_pgasync_t *c, bool *pending)
{
    int r = PQflush(c->conn);
    if (r < 0) {
        broken(c, "send to Postgres");
        return false;
    }
    *pending = r == 1;
    return true;
}

static void collect_results(tp_pgasync_t *c)
{
    while (!PQisBusy(c->conn)) {
        PGresult *r = PQgetResult(c->conn);
        if (r == NULL) {
            char *e = c->first_error;
            c->first_error = NULL;
            if (e) {
                snprintf(c->err, sizeof(c->err), "%s", e);
                free(e);
                (void)finish(c, ST_READY, c->err);
            } else {
                (void)finish(c, ST_READY, NULL);
            }
            return;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN && c->state == ST_COPY_START) {
            if (c->result)
                PQclear(c->result);
            c->result = r;
            (void)finish(c, ST_COPY_IN, NULL);
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
        if (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE || st == PGRES_NONFATAL_ERROR) {
            if (c->first_error == NULL)
                c->first_error = tp_pgasync_result_error(r);
            PQclear(r);
            continue;
        }
        if (c->result)
            PQclear(c->result);
        c->result = r;
    }
}

static void dispatch_notifies(tp_pgasync_t *c)
{
    PGnotify *n;
    while ((n = PQnotifies(c->conn)) != NULL) {
        if (c->notify_fn) {
            c->in_callback++;
            c->notify_fn(c, n->relname, n->extra, c->notify_arg);
            c->in_callback--;
        }
        PQfreemem(n);
        if (c->dead)
            return;
    }
}

static void on_socket(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    tp_pgasync_t *c = arg;
    if (c->magic != PGASYNC_MAGIC)
        abort();
    c->in_callback++;
    if (c->state == ST_CONNECTING) {
        connect_step(c);
        goto out;
    }
    if (what & EV_WRITE) {
        bool pending = false;
        if (!flush_out(c, &pending))
            goto out;
        if (!pending) {
            want(c, true, false);
            if (c->want_drain && c->drain_fn) {
                c->want_drain = false;
                c->drain_fn(c->drain_arg);
                if (c->dead)
                    goto out;
            }
        }
    }
    if (what & EV_READ) {
        if (!PQconsumeInput(c->conn)) {
            broken(c, "receive from Postgres");
            goto out;
        }
        dispatch_notifies(c);
        if (c->dead)
            goto out;
        if (c->state == ST_QUERY || c->state == ST_COPY_START || c->state == ST_COPY_END)
            collect_results(c);
    }
out:
    c->in_callback--;
    if (c->dead && c->in_callback == 0)
        really_free(c);
}

static bool start_op(tp_pgasync_t *c, pg_state_t st, tp_pgasync_done_fn cb, void *arg)
{
    c->state = st;
    c->cb = cb;
    c->cb_arg = arg;
    free(c->first_error);
    c->first_error = NULL;
    bool pending = false;
    int r = PQflush(c->conn);
    if (r < 0) {
        conn_error(c, "send to Postgres");
        c->state = ST_BROKEN;
        c->cb = NULL;
        return false;
    }
    pending = r == 1;
    want(c, true, pending);
    /* libpq reads input while a send would block (pqSendSome), so the answer
     * may already sit in its buffer (a COPY that Postgres rejected mid-stream
     * answers before CopyDone): the socket would never turn readable again.
     * Look once from the loop instead of waiting for it. */
    event_active(c->ev_read, EV_READ, 0);
    return true;
}

static bool check_ready(tp_pgasync_t *c, const char *what)
{
    if (c->state != ST_READY) {
        if (c->state != ST_BROKEN)
            snprintf(c->err, sizeof(c->err), "%s: connection busy or not connected", what);
        return false;
    }
    return true;
}

bool tp_pgasync_query(tp_pgasync_t *c, const char *sql, int nparams, const char *const *params,
                      tp_pgasync_done_fn cb, void *arg)
{
    if (!check_ready(c, "query"))
        return false;
    int ok = nparams > 0 ? PQsendQueryParams(c->conn, sql, nparams, NULL, params, NULL, NULL, 0)
                         : PQsendQuery(c->conn, sql);
    if (!ok) {
        conn_error(c, "send query");
        return false;
    }
    return start_op(c, ST_QUERY, cb, arg);
}

bool tp_pgasync_copy_begin(tp_pgasync_t *c, const char *sql, tp_pgasync_done_fn cb, void *arg)
{
    if (!check_ready(c, "copy"))
        return false;
    if (!PQsendQuery(c->conn, sql)) {
        conn_error(c, "send COPY");
        return false;
    }
    return start_op(c, ST_COPY_START, cb, arg);
}

int tp_pgasync_copy_put(tp_pgasync_t *c, const void *data, size_t len)
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

void tp_pgasync_on_drain(tp_pgasync_t *c, void (*fn)(void *arg), void *arg)
{
    c->drain_fn = fn;
    c->drain_arg = arg;
}

bool tp_pgasync_copy_end(tp_pgasync_t *c, const char *errmsg, tp_pgasync_done_fn cb, void *arg)
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
        return false;
    }
    return start_op(c, ST_COPY_END, cb, arg);
}

void tp_pgasync_on_notify(tp_pgasync_t *c, tp_pgasync_notify_fn fn, void *arg)
{
    c->notify_fn = fn;
    c->notify_arg = arg;
    if (c->state == ST_READY)
        want(c, fn != NULL, false);
}

void tp_pgasync_cancel(tp_pgasync_t *c)
{
    if (c == NULL || c->conn == NULL || c->state == ST_BROKEN || c->state == ST_IDLE ||
        c->state == ST_CONNECTING)
        return;
    PGcancel *k = PQgetCancel(c->conn);
    if (k) {
        char buf[256];
        if (!PQcancel(k, buf, sizeof(buf)))
            tp_warn("cancel of Postgres statement failed: %s", buf);
        PQfreeCancel(k);
    }
}
