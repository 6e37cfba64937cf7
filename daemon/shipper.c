/* The write-back outbox shipper of tidepool-sync. One thread of its own runs the
 * blocking loop: connect to PostgreSQL (the password from the Lakebase provider
 * when postgres.password_source = lakebase, else $TIDEPOOL_PGPASSWORD_FILE or the
 * conninfo), take the advisory lock TP_WB_SHIP_LOCK (only one daemon ships; the
 * others retry every few seconds, so a standby takes over when the holder dies),
 * LISTEN tidepool_outbox, reflect the writable tables, then repeatedly
 * tp_wb_ship_next -> the MERGE through tp_wh_run -> tp_wb_ship_done. Nothing due:
 * wait for a NOTIFY (sent at commit by each outbox insert, migration 0004), for
 * the earliest backing-off row to become due, or at most sync.outbox_poll (the
 * safety net for a missed notify). A Postgres error drops the connection and
 * reconnects with backoff (with a fresh Lakebase token once the old one expired);
 * a warehouse error is recorded by tp_wb_ship_done (the library's backoff
 * applies). The stop flag is checked between batches and every 100 ms while
 * waiting; each warehouse statement has a 5 s deadline and each Postgres
 * statement a 3 s timeout, so a stop is honoured well within the daemon's 10 s
 * exit budget. Logs one JSON line per shipped batch and per failure (no secrets). */
#include "shipper.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "syncd.h"
#include "tidepool/lakebase.h"
#include "tidepool/log.h"
#include "tidepool/pg.h"
#include "tidepool/wh.h"
#include "tidepool/wh_settings.h"
#include "tidepool/writeback.h"

#define SHIPPER_MAGIC 0x53484950u /* "SHIP" */
#define BATCH_ROWS 500
#define POLL_DEFAULT_MS 5000   /* nothing due and no NOTIFY: look again after this */
#define DUE_MIN_MS 10          /* a backing-off row due sooner: look again after this */
#define LOCK_RETRY_MS 3000     /* another daemon holds the lock */
#define REFLECT_EVERY_MS 60000 /* re-read the writable tables this often */
#define WH_DEADLINE_MS 5000    /* one MERGE on the warehouse */
#define PG_RETRY_MAX_MS 30000

struct tp_shipper {
    uint32_t magic;
    const tp_config_t *cfg;
    tp_lakebase_t *lb; /* blocking provider shared with the daemon's loop, or NULL */
    int64_t poll_ms;
    pthread_t thread;
    atomic_bool stop;
};

/* Sleeps up to ms in small steps; false once a stop was requested. */
static bool nap(tp_shipper_t *sh, int64_t ms)
{
    while (ms > 0 && !atomic_load(&sh->stop)) {
        int64_t step = ms < 100 ? ms : 100;
        struct timespec ts = {0, (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
    return !atomic_load(&sh->stop);
}

static bool noop_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *rows, void *arg)
{
    (void)st, (void)rows, (void)arg;
    return true;
}

static void noop_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    (void)st, (void)res, (void)arg;
}

/* Runs b's MERGE on the warehouse; fills *res (caller clears). */
static bool ship_batch(const tp_wh_config_t *wc, const tp_wb_batch_t *b, tp_wh_result_t *res)
{
    tp_wh_param_t *ps = tp_xcalloc(b->nparams ? b->nparams : 1, sizeof *ps);
    for (size_t i = 0; i < b->nparams; i++)
        ps[i] = (tp_wh_param_t){b->params[i].name, b->params[i].value, b->params[i].type};
    tp_wh_request_t req;
    tp_wh_request_init(&req);
    req.sql = b->sql;
    req.params = ps;
    req.n_params = b->nparams;
    req.on_rows = noop_rows;
    req.on_done = noop_done;
    req.timeout_ms = WH_DEADLINE_MS;
    req.label = "writeback-outbox";
    bool ok = tp_wh_run(wc, &req, res);
    free(ps);
    return ok;
}

static bool exec_ok(PGconn *c, const char *sql, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok)
        snprintf(err, errlen, "%s", PQresultErrorMessage(r));
    PQclear(r);
    return ok;
}

/* A new connection with the configured password source. */
static PGconn *open_conn(tp_shipper_t *sh, char *err, size_t errlen)
{
    int64_t to = sh->cfg->postgres.connect_timeout_ms > 0 ? sh->cfg->postgres.connect_timeout_ms : 10000;
    const char *dsn = sh->cfg->postgres.dsn ? sh->cfg->postgres.dsn : "";
    if (sh->lb != NULL) /* a current token; a refused one is replaced and retried once */
        return tp_lakebase_connect(sh->lb, dsn, to, err, errlen);
    char *pw = tp_syncd_password(); /* $TIDEPOOL_PGPASSWORD_FILE, as the jobs use */
    PGconn *c = tp_pg_connect_password(dsn, pw, to, err, errlen);
    if (pw != NULL) {
        explicit_bzero(pw, strlen(pw));
        free(pw);
    }
    return c;
}

/* Connects and takes the lock: 1 held, 0 another daemon ships, -1 error (err). */
static int connect_locked(tp_shipper_t *sh, PGconn **out, char *err, size_t errlen)
{
    PGconn *c = open_conn(sh, err, errlen);
    if (c == NULL)
        return -1;
    if (!exec_ok(c, "SET statement_timeout = '3s'; SET application_name = 'tidepool-sync shipper'",
                 err, errlen)) {
        PQfinish(c);
        return -1;
    }
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT pg_try_advisory_lock(%lld)", (long long)TP_WB_SHIP_LOCK);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "%s", PQresultErrorMessage(r));
        PQclear(r);
        PQfinish(c);
        return -1;
    }
    bool held = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    if (!held) {
        PQfinish(c);
        return 0;
    }
    if (!exec_ok(c, "LISTEN " TP_WB_NOTIFY_CHANNEL, err, errlen)) {
        PQfinish(c);
        return -1;
    }
    *out = c;
    return 1;
}

/* Drops the notifies libpq has already read; true if there was one. */
static bool drain_notifies(PGconn *c)
{
    bool any = false;
    PGnotify *n;
    while ((n = PQnotifies(c)) != NULL) {
        any = true;
        PQfreemem(n);
    }
    return any;
}

/* How long to wait with nothing to ship: the poll interval, or less when a
 * backing-off row becomes due sooner. -1 on a Postgres error (err). */
static int64_t idle_ms(tp_shipper_t *sh, PGconn *c, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, TP_WB_DUE_IN_SQL);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        snprintf(err, errlen, "%s", PQresultErrorMessage(r));
        PQclear(r);
        return -1;
    }
    int64_t ms = sh->poll_ms;
    if (!PQgetisnull(r, 0, 0)) {
        long long due = atoll(PQgetvalue(r, 0, 0));
        if (due < ms)
            ms = due < DUE_MIN_MS ? DUE_MIN_MS : due;
    }
    PQclear(r);
    return ms;
}

/* Waits up to ms for a NOTIFY on c, checking the stop flag every 100 ms:
 * 1 notified, 0 time is up or stopping, -1 connection lost (err). */
static int wait_notify(tp_shipper_t *sh, PGconn *c, int64_t ms, char *err, size_t errlen)
{
    int64_t end = tp_now_ms() + ms;
    for (;;) {
        if (!PQconsumeInput(c)) {
            snprintf(err, errlen, "%s", PQerrorMessage(c));
            return -1;
        }
        if (drain_notifies(c))
            return 1;
        int64_t left = end - tp_now_ms();
        if (left <= 0 || atomic_load(&sh->stop))
            return 0;
        struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
        if (poll(&p, 1, left < 100 ? (int)left : 100) < 0 && errno != EINTR) {
            snprintf(err, errlen, "poll: %s", strerror(errno));
            return -1;
        }
    }
}

static void log_batch(const tp_wb_batch_t *b, bool ok, const tp_wh_result_t *res, int64_t ms,
                      const char *error)
{
    char rows[24], took[24];
    snprintf(rows, sizeof rows, "%zu", b->nids);
    snprintf(took, sizeof took, "%lld", (long long)ms);
    const char *kv[] = {"event", ok ? "outbox_shipped" : "outbox_ship_failed",
                        "table", b->table,
                        "warehouse_table", b->warehouse_table,
                        "rows", rows,
                        "statement_id", res->statement_id,
                        "ms", took,
                        "error", error,
                        NULL};
    if (ok)
        tp_logkv(TP_LOG_INFO, kv, "shipped %zu outbox row(s) of %s", b->nids, b->table);
    else
        tp_logkv(TP_LOG_WARN, kv, "shipping %zu outbox row(s) of %s failed", b->nids, b->table);
}

/* Ships while the lock is held: returns when stopping or on a Postgres error (err). */
static void ship_loop(tp_shipper_t *sh, PGconn *c, const tp_wh_config_t *wc, char *err, size_t errlen)
{
    tp_wb_schema_t *s = NULL;
    int64_t reflected = 0;
    while (!atomic_load(&sh->stop)) {
        if (s == NULL || tp_now_ms() - reflected > REFLECT_EVERY_MS) {
            tp_wb_schema_t *n = tp_wb_reflect(c, err, errlen);
            if (n == NULL)
                break;
            tp_wb_schema_unref(s);
            s = n;
            reflected = tp_now_ms();
        }
        tp_wb_batch_t *b = NULL;
        drain_notifies(c); /* what they announced is visible to the next query */
        int rc = tp_wb_ship_next(c, s, BATCH_ROWS, &b, err, errlen);
        if (rc < 0) {
            if (PQstatus(c) != CONNECTION_OK)
                break;
            /* e.g. a table no longer @writable: reflect again, then retry later */
            tp_warn("outbox: %s", err);
            tp_wb_schema_unref(s);
            s = NULL;
            if (!nap(sh, LOCK_RETRY_MS))
                break;
            continue;
        }
        if (rc == 0) {
            int64_t ms = idle_ms(sh, c, err, errlen);
            if (ms < 0 || wait_notify(sh, c, ms, err, errlen) < 0)
                break;
            continue;
        }
        int64_t t0 = tp_now_ms();
        tp_wh_result_t res;
        bool ok = ship_batch(wc, b, &res);
        char *why = ok ? NULL
                       : tp_xasprintf("%s: %s", tp_wh_status_name(res.status),
                                      res.message ? res.message : "no message");
        log_batch(b, ok, &res, tp_now_ms() - t0, why);
        bool recorded = tp_wb_ship_done(c, b, ok, res.statement_id, why, err, errlen);
        free(why);
        tp_wh_result_clear(&res);
        tp_wb_batch_free(b);
        if (!recorded)
            break; /* shipped again after reconnecting: the MERGE is idempotent */
    }
    tp_wb_schema_unref(s);
}

static void *shipper_main(void *arg)
{
    tp_shipper_t *sh = arg;
    if (sh == NULL || sh->magic != SHIPPER_MAGIC)
        return NULL;
    tp_wh_config_t wc;
    tp_wh_config_init(&wc);
    tp_wh_config_from_settings(&wc, sh->cfg);
    int64_t backoff = 1000;
    bool said_standby = false;
    char err[1024];
    while (!atomic_load(&sh->stop)) {
        PGconn *c = NULL;
        err[0] = '\0';
        int rc = connect_locked(sh, &c, err, sizeof err);
        if (rc == 0) {
            if (!said_standby)
                tp_info("outbox: another daemon holds the shipping lock; standing by");
            said_standby = true;
            nap(sh, LOCK_RETRY_MS);
            continue;
        }
        if (rc < 0) {
            tp_warn("outbox shipper: postgres: %s; retrying in %lld ms", err, (long long)backoff);
            nap(sh, backoff);
            backoff = backoff * 2 > PG_RETRY_MAX_MS ? PG_RETRY_MAX_MS : backoff * 2;
            continue;
        }
        said_standby = false;
        backoff = 1000;
        tp_info("outbox shipper: holding the shipping lock");
        err[0] = '\0';
        ship_loop(sh, c, &wc, err, sizeof err);
        PQfinish(c); /* releases the advisory lock */
        if (atomic_load(&sh->stop))
            break;
        tp_warn("outbox shipper: postgres: %s; reconnecting in %lld ms", err[0] ? err : "connection lost",
                (long long)backoff);
        nap(sh, backoff);
        backoff = backoff * 2 > PG_RETRY_MAX_MS ? PG_RETRY_MAX_MS : backoff * 2;
    }
    return NULL;
}

tp_shipper_t *tp_shipper_start(const tp_config_t *cfg, tp_lakebase_t *lb)
{
    tp_shipper_t *sh = tp_xcalloc(1, sizeof *sh);
    sh->magic = SHIPPER_MAGIC;
    sh->cfg = cfg;
    sh->lb = lb;
    sh->poll_ms = cfg->sync.outbox_poll_ms > 0 ? cfg->sync.outbox_poll_ms : POLL_DEFAULT_MS;
    atomic_init(&sh->stop, false);
    int e = pthread_create(&sh->thread, NULL, shipper_main, sh);
    if (e != 0) {
        tp_error("outbox shipper thread: %s", strerror(e));
        free(sh);
        return NULL;
    }
    return sh;
}

void tp_shipper_request_stop(tp_shipper_t *sh)
{
    if (sh)
        atomic_store(&sh->stop, true);
}

void tp_shipper_stop(tp_shipper_t *sh)
{
    if (sh == NULL)
        return;
    tp_shipper_request_stop(sh);
    pthread_join(sh->thread, NULL);
    sh->magic = 0;
    free(sh);
}
