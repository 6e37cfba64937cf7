/* lib/pgasync.c against the harness Postgres on a real libevent loop: typed
 * prepared statements (prepared once per connection), server errors as error
 * results, NULL parameters, the bounded wait queue (TP_PG_BUSY), reconnecting
 * after the backends are terminated (TP_PG_DOWN meanwhile, recovery without
 * a new pool), and the LISTEN connection (notifications, resync callback after
 * a reconnect). */
#include "../tp_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "tidepool/pgasync.h"
#include "tidepool/util.h"

static const char *DSN;
static struct event_base *base;

typedef struct done {
    int calls;
    bool ok;
    char value[128];
    char err[256];
    char sqlstate[8];
} done_t;

static void on_done(PGresult *res, const char *err, void *arg)
{
    done_t *d = arg;
    d->calls++;
    d->ok = err == NULL;
    if (err)
        snprintf(d->err, sizeof d->err, "%s", err);
    if (res && err) {
        const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        snprintf(d->sqlstate, sizeof d->sqlstate, "%s", st ? st : "");
    }
    if (res && !err && PQntuples(res) > 0)
        snprintf(d->value, sizeof d->value, "%s",
                 PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
}

/* Runs the loop until *counter reaches want or timeout_ms passes. */
static bool run_until(const int *counter, int want, int timeout_ms)
{
    int64_t end = tp_now_ms() + timeout_ms;
    while (*counter < want && tp_now_ms() < end) {
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        usleep(1000);
    }
    return *counter >= want;
}

static tp_pgpool_t *new_pool(int size, int queue)
{
    tp_pgpool_opts_t o = {.dsn = DSN, .size = size, .max_queue = queue,
                          .connect_timeout_ms = 3000, .max_statements = 8, .name = "test"};
    tp_pgpool_t *p = tp_pgpool_new(base, &o);
    int64_t end = tp_now_ms() + 5000;
    tp_pgpool_stats_t st = {0};
    while (tp_now_ms() < end) {
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        tp_pgpool_stats(p, &st);
        if (st.connected == size)
            break;
        usleep(1000);
    }
    return p;
}

static void test_typed_prepared_queries(void)
{
    tp_pgpool_t *p = new_pool(2, 8);
    CHECK(tp_pgpool_up(p));
    unsigned types[2] = {23, 25}; /* int4, text */
    done_t d[6] = {{0}};
    for (int i = 0; i < 6; i++) {
        char n[16];
        snprintf(n, sizeof n, "%d", i);
        const char *vals[2] = {n, i == 5 ? NULL : "x"};
        CHECK_INT_EQ(tp_pgpool_query(p, "SELECT ($1 + 1)::text || coalesce($2, 'null')", 2, types,
                                     vals, on_done, &d[i], NULL),
                     TP_PG_QUEUED);
    }
    int calls = 0;
    int64_t end = tp_now_ms() + 5000;
    while (calls < 6 && tp_now_ms() < end) {
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        calls = 0;
        for (int i = 0; i < 6; i++)
            calls += d[i].calls;
    }
    CHECK_INT_EQ(calls, 6);
    CHECK_STR_EQ(d[0].value, "1x");
    CHECK_STR_EQ(d[4].value, "5x");
    CHECK_STR_EQ(d[5].value, "6null");
    /* the statement was prepared once per connection, not per query */
    done_t c = {0};
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT count(*)::text FROM pg_prepared_statements", 0, NULL,
                                 NULL, on_done, &c, NULL),
                 TP_PG_QUEUED);
    CHECK(run_until(&c.calls, 1, 5000));
    CHECK(strcmp(c.value, "1") == 0 || strcmp(c.value, "2") == 0);
    tp_pgpool_free(p);
}

static void test_server_error(void)
{
    tp_pgpool_t *p = new_pool(1, 8);
    done_t d = {0};
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT 1/0", 0, NULL, NULL, on_done, &d, NULL), TP_PG_QUEUED);
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK(!d.ok);
    CHECK_STR_EQ(d.sqlstate, "22012");
    CHECK_CONTAINS(d.err, "division by zero");
    /* the connection is reusable afterwards */
    done_t e = {0};
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT 'fine'", 0, NULL, NULL, on_done, &e, NULL), TP_PG_QUEUED);
    CHECK(run_until(&e.calls, 1, 5000));
    CHECK_STR_EQ(e.value, "fine");
    tp_pgpool_free(p);
}

static void test_queue_bound_and_cancel(void)
{
    tp_pgpool_t *p = new_pool(1, 2);
    done_t d[4] = {{0}};
    tp_pgreq_t *h = NULL;
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT pg_sleep(0.2)::text", 0, NULL, NULL, on_done, &d[0], NULL), TP_PG_QUEUED);
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT '2'", 0, NULL, NULL, on_done, &d[1], &h), TP_PG_QUEUED);
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT '3'", 0, NULL, NULL, on_done, &d[2], NULL), TP_PG_QUEUED);
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT '4'", 0, NULL, NULL, on_done, &d[3], NULL), TP_PG_BUSY);
    tp_pgpool_cancel(h); /* queued: dropped without a callback */
    CHECK(run_until(&d[2].calls, 1, 5000));
    CHECK_INT_EQ(d[0].calls, 1);
    CHECK_INT_EQ(d[1].calls, 0);
    CHECK_STR_EQ(d[2].value, "3");
    tp_pgpool_stats_t st;
    tp_pgpool_stats(p, &st);
    CHECK_INT_EQ(st.rejected_busy, 1);
    tp_pgpool_free(p);
}

static int notes, resyncs;
static char last_payload[64];

static void on_note(const char *channel, const char *payload, void *arg)
{
    (void)arg;
    if (!channel) {
        resyncs++;
        return;
    }
    notes++;
    snprintf(last_payload, sizeof last_payload, "%s", payload ? payload : "");
}

static void test_reconnect_and_listen(void)
{
    tp_pgpool_t *p = new_pool(2, 8);
    tp_pglisten_t *l = tp_pglisten_new(base, DSN, "tp_test_chan", 3000, on_note, NULL);
    CHECK(run_until(&resyncs, 1, 5000));
    free(tp_test_sql(DSN, "NOTIFY tp_test_chan, 'job:1'"));
    CHECK(run_until(&notes, 1, 5000));
    CHECK_STR_EQ(last_payload, "job:1");
    free(tp_test_sql(DSN, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"));
    /* the pool notices, refuses while down, then comes back by itself */
    int64_t end = tp_now_ms() + 10000;
    bool saw_down = false, back = false;
    while (tp_now_ms() < end && !back) {
        event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        if (!tp_pgpool_up(p)) {
            saw_down = true;
            CHECK(tp_pgpool_retry_ms(p) > 0);
        } else if (saw_down) {
            back = true;
        }
        usleep(1000);
    }
    CHECK(saw_down);
    CHECK(back);
    done_t d = {0};
    CHECK_INT_EQ(tp_pgpool_query(p, "SELECT 'again'", 0, NULL, NULL, on_done, &d, NULL), TP_PG_QUEUED);
    CHECK(run_until(&d.calls, 1, 5000));
    CHECK_STR_EQ(d.value, "again");
    /* the LISTEN connection reconnected too and said so (resync) */
    CHECK(run_until(&resyncs, 2, 10000));
    free(tp_test_sql(DSN, "NOTIFY tp_test_chan, 'job:2'"));
    CHECK(run_until(&notes, 2, 5000));
    CHECK_STR_EQ(last_payload, "job:2");
    tp_pglisten_free(l);
    tp_pgpool_free(p);
}

int main(void)
{
    DSN = tp_test_dsn();
    if (!DSN) {
        tp_test_skip("test_pgasync", "no harness Postgres");
        return tp_test_done();
    }
    base = event_base_new();
    TP_RUN(test_typed_prepared_queries);
    TP_RUN(test_server_error);
    TP_RUN(test_queue_bound_and_cancel);
    TP_RUN(test_reconnect_and_listen);
    event_base_free(base);
    return tp_test_done();
}
