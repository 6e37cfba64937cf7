/* lib/pgconn.c against the harness Postgres on a real libevent loop: connect
 * (and its timeout against a socket that never answers), queries with
 * parameters and server errors (message, SQLSTATE, the error result), prepared
 * statements, COPY FROM STDIN with back-pressure and a rejected row (the error
 * names the line, the connection stays usable), a COPY rejected mid-stream
 * whose answer libpq already buffered (must not hang), notifications,
 * cancelling a pg_sleep without blocking the loop, a backend killed while idle
 * (on_lost), the password provider (failure, timeout with cancel), and freeing
 * the connection from inside its own callback. */
#include "../tp_test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#include "tidepool/pgconn.h"
#include "tidepool/util.h"

static const char *DSN;
static struct event_base *base;

typedef struct done {
    int calls;
    bool ok;
    char value[128];
    char err[512];
    char sqlstate[8];
    bool had_res;
    bool free_inside;
} done_t;

static void on_done(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    done_t *d = arg;
    d->calls++;
    d->ok = err == NULL;
    d->had_res = res != NULL;
    snprintf(d->err, sizeof d->err, "%s", err ? err : "");
    d->sqlstate[0] = '\0';
    d->value[0] = '\0';
    if (res && err) {
        const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        snprintf(d->sqlstate, sizeof d->sqlstate, "%s", st ? st : "");
    }
    if (res && !err && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0)
        snprintf(d->value, sizeof d->value, "%s",
                 PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
    if (d->free_inside)
        tp_pgconn_free(c);
}

static bool run_until(const int *counter, int want, int timeout_ms)
{
    int64_t end = tp_now_ms() + timeout_ms;
    while (*counter < want && tp_now_ms() < end) {
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        usleep(500);
    }
    return *counter >= want;
}

static tp_pgconn_t *connected(void)
{
    tp_pgconn_t *c = tp_pgconn_new(base, DSN, "tidepool-test-pgconn", NULL);
    done_t d = {0};
    CHECK(tp_pgconn_connect(c, 5000, on_done, &d));
    CHECK(tp_pgconn_busy(c));
    CHECK_MSG(run_until(&d.calls, 1, 6000) && d.ok, "connect: %s", d.err);
    CHECK(tp_pgconn_ok(c));
    CHECK(!d.had_res);
    return c;
}

/* Runs sql to completion on c. */
static done_t run_sql(tp_pgconn_t *c, const char *sql, int n, const char *const *values)
{
    done_t d = {0};
    CHECK_MSG(tp_pgconn_query(c, sql, n, NULL, values, on_done, &d), "%s", tp_pgconn_error(c));
    CHECK_MSG(run_until(&d.calls, 1, 10000), "no answer to %s", sql);
    CHECK_INT_EQ(d.calls, 1);
    return d;
}

static void test_connect_timeout(void)
{
    /* a listening socket nobody accepts: TCP connects, the startup packet is never answered */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(s, (struct sockaddr *)&a, sizeof a) == 0 && listen(s, 4) == 0);
    socklen_t len = sizeof a;
    CHECK(getsockname(s, (struct sockaddr *)&a, &len) == 0);
    char dsn[128];
    snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d dbname=x user=x sslmode=disable",
             ntohs(a.sin_port));
    tp_pgconn_t *c = tp_pgconn_new(base, dsn, NULL, NULL);
    done_t d = {0};
    int64_t t0 = tp_now_ms();
    CHECK(tp_pgconn_connect(c, 300, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000));
    int64_t took = tp_now_ms() - t0;
    CHECK(!d.ok);
    CHECK_CONTAINS(d.err, "timed out");
    CHECK_CONTAINS(d.err, "127.0.0.1");
    CHECK_MSG(took >= 250 && took < 3000, "took %lld ms", (long long)took);
    CHECK(!tp_pgconn_ok(c));
    tp_pgconn_free(c);
    close(s);

    /* a dsn libpq cannot even parse fails at once, without the callback */
    c = tp_pgconn_new(base, "no_such_option=1", NULL, NULL);
    d.calls = 0;
    CHECK(!tp_pgconn_connect(c, 300, on_done, &d));
    CHECK_CONTAINS(tp_pgconn_error(c), "no_such_option");
    CHECK_INT_EQ(d.calls, 0);
    tp_pgconn_free(c);
}

static void test_query_and_errors(void)
{
    tp_pgconn_t *c = connected();
    const char *v[] = {"41", NULL};
    done_t d = run_sql(c, "SELECT $1::int + 1, $2::text IS NULL", 2, v);
    CHECK(d.ok);
    CHECK_STR_EQ(d.value, "42");
    /* only one operation at a time */
    done_t d2 = {0};
    CHECK(tp_pgconn_query(c, "SELECT pg_sleep(0.05)", 0, NULL, NULL, on_done, &d2));
    CHECK(!tp_pgconn_query(c, "SELECT 1", 0, NULL, NULL, on_done, &d));
    CHECK_CONTAINS(tp_pgconn_error(c), "busy");
    CHECK(run_until(&d2.calls, 1, 5000) && d2.ok);
    /* a server error: one line with message and SQLSTATE, and the error result */
    d = run_sql(c, "SELECT 1/0", 0, NULL);
    CHECK(!d.ok);
    CHECK(d.had_res);
    CHECK_STR_EQ(d.sqlstate, "22012");
    CHECK_CONTAINS(d.err, "division by zero");
    CHECK_CONTAINS(d.err, "[SQLSTATE 22012]");
    /* several statements: the first error wins and the rest do not run */
    d = run_sql(c, "CREATE TEMP TABLE m(x int); SELECT nope FROM m; SELECT 1/0", 0, NULL);
    CHECK_CONTAINS(d.err, "42703");
    /* prepared statements */
    d = (done_t){0};
    Oid types[1] = {23};
    CHECK(tp_pgconn_prepare(c, "p1", "SELECT $1 * 2", 1, types, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    const char *pv[] = {"21"};
    d = (done_t){0};
    CHECK(tp_pgconn_query_prepared(c, "p1", 1, pv, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    CHECK_STR_EQ(d.value, "42");
    d = run_sql(c, "SELECT 'still usable'", 0, NULL);
    CHECK_STR_EQ(d.value, "still usable");
    tp_pgconn_free(c);
}

static int drains;
static void on_drain(void *arg)
{
    (void)arg;
    drains++;
}

static void test_copy(void)
{
    tp_pgconn_t *c = connected();
    done_t d = run_sql(c, "CREATE TABLE pc_copy(id int PRIMARY KEY, v text)", 0, NULL);
    CHECK(d.ok);
    /* a good COPY, big enough to fill the socket: back-pressure, then drain */
    tp_pgconn_on_drain(c, on_drain, NULL);
    d = (done_t){0};
    CHECK(tp_pgconn_copy_begin(c, "COPY pc_copy FROM STDIN", on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    CHECK(tp_pgconn_in_copy(c));
    int stops = 0;
    char line[128];
    tp_buf_t b;
    tp_buf_init(&b);
    for (int i = 1; i <= 200000; i++) {
        snprintf(line, sizeof line, "%d\tsome text to make the row longer than a few bytes %d\n", i, i);
        tp_buf_puts(&b, line);
        if (b.len < 65536 && i < 200000)
            continue;
        int r = tp_pgconn_copy_put(c, b.data, b.len);
        CHECK(r >= 0);
        b.len = 0;
        if (r == 0) {
            stops++;
            int want = drains + 1;
            CHECK(run_until(&drains, want, 10000));
        }
    }
    tp_buf_free(&b);
    d = (done_t){0};
    CHECK(tp_pgconn_copy_end(c, NULL, on_done, &d));
    CHECK(run_until(&d.calls, 1, 20000));
    CHECK_MSG(d.ok, "%s", d.err);
    CHECK_MSG(stops > 0 && drains == stops, "stops %d drains %d", stops, drains);
    d = run_sql(c, "SELECT count(*) FROM pc_copy", 0, NULL);
    CHECK_STR_EQ(d.value, "200000");

    /* a rejected row: the error names the line, nothing is loaded */
    run_sql(c, "TRUNCATE pc_copy", 0, NULL);
    d = (done_t){0};
    CHECK(tp_pgconn_copy_begin(c, "COPY pc_copy FROM STDIN", on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    const char *rows = "1\ta\n2\tb\nthree\tc\n4\td\n";
    CHECK_INT_EQ(tp_pgconn_copy_put(c, rows, strlen(rows)), 1);
    d = (done_t){0};
    CHECK(tp_pgconn_copy_end(c, NULL, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK(!d.ok);
    CHECK_CONTAINS(d.err, "invalid input syntax for type integer");
    CHECK_CONTAINS(d.err, "line 3");
    CHECK_CONTAINS(d.err, "[SQLSTATE 22P02]");
    CHECK(!tp_pgconn_in_copy(c));
    d = run_sql(c, "SELECT count(*) FROM pc_copy", 0, NULL);
    CHECK_STR_EQ(d.value, "0");

    /* rejected at the first row while megabytes follow: the error may already
     * sit in libpq's buffer when COPY ends; the answer must still come */
    d = (done_t){0};
    CHECK(tp_pgconn_copy_begin(c, "COPY pc_copy FROM STDIN", on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    CHECK(tp_pgconn_copy_put(c, "bad\tx\n", 6) >= 0);
    char *big = tp_xmalloc(1 << 20);
    for (int i = 0; i < (1 << 20); i += 8)
        memcpy(big + i, "9\tzzzzz\n", 8);
    for (int i = 0; i < 16; i++) {
        int r = tp_pgconn_copy_put(c, big, 1 << 20);
        if (r < 0)
            break;
        if (r == 0) {
            int want = drains + 1;
            if (!run_until(&drains, want, 5000))
                break;
        }
    }
    free(big);
    d = (done_t){0};
    if (tp_pgconn_in_copy(c) && tp_pgconn_copy_end(c, NULL, on_done, &d)) {
        CHECK(run_until(&d.calls, 1, 10000));
        CHECK(!d.ok);
        CHECK_CONTAINS(d.err, "22P02");
    }
    d = run_sql(c, "SELECT count(*) FROM pc_copy", 0, NULL);
    CHECK_STR_EQ(d.value, "0");

    /* copy_end with a message aborts; data outside a COPY is refused */
    d = (done_t){0};
    CHECK(tp_pgconn_copy_begin(c, "COPY pc_copy FROM STDIN", on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    d = (done_t){0};
    CHECK(tp_pgconn_copy_end(c, "given up", on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK_CONTAINS(d.err, "given up");
    CHECK_INT_EQ(tp_pgconn_copy_put(c, "1\n", 2), -1);
    CHECK_CONTAINS(tp_pgconn_error(c), "outside COPY");
    tp_pgconn_free(c);
}

typedef struct notes {
    int n;
    char last[64];
} notes_t;

static void on_note(tp_pgconn_t *c, const char *channel, const char *payload, void *arg)
{
    (void)c;
    notes_t *n = arg;
    n->n++;
    snprintf(n->last, sizeof n->last, "%s:%s", channel, payload);
}

static void test_notify(void)
{
    tp_pgconn_t *c = connected();
    notes_t n = {0};
    tp_pgconn_on_notify(c, on_note, &n);
    CHECK(run_sql(c, "LISTEN pc_chan", 0, NULL).ok);
    free(tp_test_sql(DSN, "NOTIFY pc_chan, 'hello'"));
    CHECK(run_until(&n.n, 1, 5000));
    CHECK_STR_EQ(n.last, "pc_chan:hello");
    /* one that arrives while a statement runs is delivered too */
    done_t d = {0};
    CHECK(tp_pgconn_query(c, "SELECT pg_sleep(0.3)", 0, NULL, NULL, on_done, &d));
    free(tp_test_sql(DSN, "NOTIFY pc_chan, 'during'"));
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK(run_until(&n.n, 2, 5000));
    CHECK_STR_EQ(n.last, "pc_chan:during");
    tp_pgconn_free(c);
}

static int losses;
static char lost_err[256];
static void on_lost(tp_pgconn_t *c, const char *err, void *arg)
{
    (void)c;
    (void)arg;
    losses++;
    snprintf(lost_err, sizeof lost_err, "%s", err);
}

static void test_cancel_and_loss(void)
{
    tp_pgconn_t *c = connected();
    done_t pid = run_sql(c, "SELECT pg_backend_pid()", 0, NULL);
    done_t d = {0};
    int64_t t0 = tp_now_ms();
    CHECK(tp_pgconn_query(c, "SELECT pg_sleep(30)", 0, NULL, NULL, on_done, &d));
    CHECK(!run_until(&d.calls, 1, 200));
    int64_t c0 = tp_now_ms();
    tp_pgconn_cancel(c);
    CHECK_MSG(tp_now_ms() - c0 < 50, "cancel blocked the loop for %lld ms",
              (long long)(tp_now_ms() - c0));
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK(!d.ok);
    CHECK_STR_EQ(d.sqlstate, "57014");
    CHECK(tp_now_ms() - t0 < 5000);
    CHECK(tp_pgconn_ok(c));
    /* a cancel with nothing in flight does nothing, so the next statement runs */
    tp_pgconn_cancel(c);
    usleep(100 * 1000);
    CHECK_STR_EQ(run_sql(c, "SELECT 'after'", 0, NULL).value, "after");

    /* the backend killed while the connection is idle: on_lost says so */
    tp_pgconn_on_lost(c, on_lost, NULL);
    char *sql = tp_xasprintf("SELECT pg_terminate_backend(%s)", pid.value);
    free(tp_test_sql(DSN, sql));
    free(sql);
    CHECK(run_until(&losses, 1, 5000));
    CHECK_CONTAINS(lost_err, "receive from Postgres");
    CHECK(!tp_pgconn_ok(c));
    CHECK(!tp_pgconn_query(c, "SELECT 1", 0, NULL, NULL, on_done, &d));
    /* ... and it connects again on the same object */
    d = (done_t){0};
    CHECK(tp_pgconn_connect(c, 5000, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000) && d.ok);
    CHECK_STR_EQ(run_sql(c, "SELECT 'back'", 0, NULL).value, "back");
    CHECK_INT_EQ(losses, 1);
    tp_pgconn_free(c);
}

/* ---- password providers ---- */

typedef struct prov {
    const char *answer_err; /* NULL: never answers */
    int gets, cancels;
    struct event *ev;
    tp_pg_password_cb cb;
    void *cb_arg;
} prov_t;

static void prov_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    prov_t *p = arg;
    p->cb(NULL, p->answer_err, p->cb_arg);
}

static void *prov_get(void *self, const char *refused, tp_pg_password_cb cb, void *cb_arg)
{
    prov_t *p = self;
    CHECK(refused == NULL);
    p->gets++;
    p->cb = cb;
    p->cb_arg = cb_arg;
    if (p->answer_err)
        event_active(p->ev, EV_TIMEOUT, 0);
    return p;
}

static void prov_cancel(void *h)
{
    prov_t *p = h;
    p->cancels++;
    event_del(p->ev);
}

static void test_password_provider(void)
{
    prov_t p = {.answer_err = "no credential for you"};
    p.ev = event_new(base, -1, 0, prov_fire, &p);
    tp_pg_password_provider_t pw = {.get = prov_get, .cancel = prov_cancel, .self = &p};
    tp_pgconn_t *c = tp_pgconn_new(base, DSN, NULL, &pw);
    done_t d = {0};
    CHECK(tp_pgconn_connect(c, 2000, on_done, &d));
    CHECK(run_until(&d.calls, 1, 3000));
    CHECK_STR_EQ(d.err, "no credential for you");
    CHECK_INT_EQ(p.gets, 1);
    /* a provider that never answers: the connect timer covers it */
    p.answer_err = NULL;
    d = (done_t){0};
    CHECK(tp_pgconn_connect(c, 300, on_done, &d));
    CHECK(run_until(&d.calls, 1, 3000));
    CHECK_CONTAINS(d.err, "timed out waiting for the database credential");
    CHECK_INT_EQ(p.cancels, 1);
    /* freed while waiting: the wait is cancelled, no callback */
    d = (done_t){0};
    CHECK(tp_pgconn_connect(c, 5000, on_done, &d));
    tp_pgconn_free(c);
    CHECK_INT_EQ(p.cancels, 2);
    run_until(&d.calls, 1, 100);
    CHECK_INT_EQ(d.calls, 0);
    event_free(p.ev);
}

static void test_free_inside_callback(void)
{
    tp_pgconn_t *c = connected();
    done_t d = {.free_inside = true};
    CHECK(tp_pgconn_query(c, "SELECT 1/0", 0, NULL, NULL, on_done, &d));
    CHECK(run_until(&d.calls, 1, 5000));
    /* the loop goes on without touching the freed connection */
    int zero = 0;
    run_until(&zero, 1, 50);
}

int main(void)
{
    DSN = tp_test_dsn();
    if (!DSN) {
        tp_test_skip("test_pgconn", "no harness Postgres");
        return tp_test_done();
    }
    base = event_base_new();
    TP_RUN(test_connect_timeout);
    TP_RUN(test_query_and_errors);
    TP_RUN(test_copy);
    TP_RUN(test_notify);
    TP_RUN(test_cancel_and_loss);
    TP_RUN(test_password_provider);
    TP_RUN(test_free_inside_callback);
    event_base_free(base);
    return tp_test_done();
}
