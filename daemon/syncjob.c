/* One run of a sync job, as a chain of non-blocking steps on the event loop.
 * Owns the run's Postgres session (which holds the job's advisory lock, so a
 * daemon that dies releases the job), the warehouse statement, and the COPY
 * between them. Steps: connect -> try lock -> record 'running' -> read the
 * target's columns -> submit -> (manifest) BEGIN + create fresh/staging table
 * -> COPY chunk by chunk, pausing the warehouse while Postgres drains ->
 * checks -> apply (snapshot: PK, indexes, lock, drop, rename; incremental:
 * upsert, deletes, watermark) -> bookkeeping + NOTIFY -> COMMIT. Everything
 * that changes the target happens in the one transaction, so a failure or a
 * crash at any point leaves the target as it was and repeats the range.
 * A failure rolls back, then records the error in sync_runs/sync_state.
 * CSV results are passed to COPY untouched (FORMAT csv, HEADER, NULL 'null');
 * JSON_ARRAY cells are re-encoded in COPY text format. */
#include "syncjob.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/pgconn.h"
#include "synctypes.h"
#include "tidepool/log.h"

#define SYNCJOB_MAGIC 0x73796e6au

typedef enum {
    PH_MAIN = 0, /* the job's own query */
    PH_KEYS,     /* reconcile: the key set of the whole source */
} phase_t;

typedef struct {
    char *name;
    char *pg_type;
} tcol_t;

struct tp_syncjob {
    unsigned magic;
    const tp_syncenv_t *env;
    const tp_defs_job_t *job;
    char *trigger;
    tp_syncjob_done_fn done;
    void *done_arg;
    tp_pgconn_t *pg;
    tp_wh_stmt_t *stmt;
    struct event *ev_timeout;
    int64_t started_ms;
    int64_t manifest_ms; /* when the result was ready (statement SUCCEEDED) */
    int64_t rows;  /* rows loaded (COPY counts) */
    int64_t bytes; /* result bytes received */
    int64_t live_rows; /* while streaming: rows seen (CSV: lines, with its header) */
    bool rows_known;   /* rows is COPY's own count */
    int64_t run_id;
    char *statement_id;
    char *watermark_from;
    char *watermark_type;
    bool reconcile_due;
    bool in_tx;
    bool locked;
    bool finished;
    bool done_scheduled;
    bool retryable; /* failed for a transient reason (network, truncated chunk) */
    bool inline_req;  /* the statement in flight asked for INLINE */
    bool recording;   /* the failure is being written to sync_runs */
    bool force_links; /* INLINE hit the size limit: use EXTERNAL_LINKS */
    bool canceled;
    char *cancel_reason;
    tp_syncjob_outcome_t outcome;
    char *error;
    /* target as it is now */
    tcol_t *tcols;
    size_t n_tcols;
    /* the load in progress */
    phase_t phase;
    tp_synccol_t *cols;
    size_t n_cols;
    bool csv;
    bool copy_ready;
    bool copy_ended;
    bool wh_done;
    bool wh_ok;
    bool paused;
    char *load_table; /* quoted name of the fresh/staging table */
    char *load_sql;   /* BEGIN + CREATE of the load table */
    tp_buf_t buf;
    int64_t generation;
};

static void fail(tp_syncjob_t *r, const char *fmt, ...) TP_PRINTF(2, 3);
static void step_submit(tp_syncjob_t *r);
static void step_after_copy(tp_syncjob_t *r);

/* ---- small helpers ---- */

static const char *jname(const tp_syncjob_t *r)
{
    return r->job->name;
}

static tp_syncjob_t *check(void *arg)
{
    tp_syncjob_t *r = arg;
    if (r == NULL || r->magic != SYNCJOB_MAGIC)
        abort();
    return r;
}

static void target_qname(tp_buf_t *b, const tp_defs_job_t *j)
{
    tp_synctypes_qname(b, j->target_schema, j->target_table);
}

/* "_tp_new_<table>" truncated to Postgres' 63-byte identifier limit. */
static char *prefixed(const char *prefix, const char *table)
{
    return tp_xasprintf("%s%.*s", prefix, (int)(63 - strlen(prefix)), table);
}

static void key_list(tp_buf_t *b, const tp_defs_job_t *j, const char *alias)
{
    for (size_t i = 0; i < j->n_key; i++) {
        if (i)
            tp_buf_puts(b, ", ");
        if (alias)
            tp_buf_printf(b, "%s.", alias);
        tp_synctypes_ident(b, j->key[i]);
    }
}

static bool is_key(const tp_defs_job_t *j, const char *col)
{
    for (size_t i = 0; i < j->n_key; i++)
        if (strcmp(j->key[i], col) == 0)
            return true;
    return false;
}

static const tcol_t *tcol_find(const tp_syncjob_t *r, const char *name)
{
    for (size_t i = 0; i < r->n_tcols; i++)
        if (strcmp(r->tcols[i].name, name) == 0)
            return &r->tcols[i];
    return NULL;
}

static const tp_synccol_t *col_find(const tp_syncjob_t *r, const char *name)
{
    for (size_t i = 0; i < r->n_cols; i++)
        if (strcmp(r->cols[i].name, name) == 0)
            return &r->cols[i];
    return NULL;
}

/* Postgres type of the watermark column -> warehouse parameter type. */
static char *wh_param_type(const char *pg)
{
    static const struct {
        const char *pg, *wh;
    } m[] = {
        {"timestamp with time zone", "TIMESTAMP"},
        {"timestamp without time zone", "TIMESTAMP_NTZ"},
        {"date", "DATE"},
        {"integer", "INT"},
        {"bigint", "BIGINT"},
        {"smallint", "SMALLINT"},
        {"double precision", "DOUBLE"},
        {"real", "FLOAT"},
        {"text", "STRING"},
        {"boolean", "BOOLEAN"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(m); i++)
        if (strcmp(pg, m[i].pg) == 0)
            return tp_xstrdup(m[i].wh);
    int p, s;
    if (sscanf(pg, "numeric(%d,%d)", &p, &s) == 2)
        return tp_xasprintf("DECIMAL(%d,%d)", p, s);
    return NULL;
}

/* ---- completion ---- */

static void on_finish_deferred(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_syncjob_t *r = check(arg);
    r->done(r, r->outcome, r->done_arg);
}

/* done runs once the warehouse statement is gone too (its on_done holds r). */
static void schedule_done(tp_syncjob_t *r)
{
    if (!r->finished || r->done_scheduled || r->stmt)
        return;
    r->done_scheduled = true;
    event_base_once(r->env->base, -1, EV_TIMEOUT, on_finish_deferred, r, NULL);
}

/* Ends the run: closes the session (releasing the advisory lock) and calls
 * done from a fresh loop iteration. */
static void complete(tp_syncjob_t *r, tp_syncjob_outcome_t outcome)
{
    if (r->finished)
        return;
    r->finished = true;
    r->outcome = outcome;
    if (r->ev_timeout)
        evtimer_del(r->ev_timeout);
    tp_pgconn_free(r->pg);
    r->pg = NULL;
    int64_t ms = tp_now_ms() - r->started_ms;
    char rows[32], bytes[32], dur[32], load[32];
    snprintf(rows, sizeof(rows), "%lld", (long long)r->rows);
    snprintf(bytes, sizeof(bytes), "%lld", (long long)r->bytes);
    snprintf(dur, sizeof(dur), "%lld", (long long)ms);
    /* load_ms: from the result being ready to the commit (our share of the run). */
    snprintf(load, sizeof(load), "%lld", (long long)(r->manifest_ms ? tp_now_ms() - r->manifest_ms : 0));
    const char *kv[] = {"job", jname(r), "rows", rows, "bytes", bytes, "duration_ms", dur, "load_ms", load,
                        "statement_id", r->statement_id, NULL};
    if (outcome == TP_SYNCJOB_SUCCEEDED)
        tp_logkv(TP_LOG_INFO, kv, "sync run succeeded");
    else if (outcome == TP_SYNCJOB_SKIPPED)
        tp_logkv(TP_LOG_DEBUG, kv, "sync run skipped: another daemon holds the job");
    schedule_done(r);
}

static tp_syncjob_outcome_t failed_outcome(const tp_syncjob_t *r)
{
    return r->canceled ? TP_SYNCJOB_CANCELED : TP_SYNCJOB_FAILED;
}

static void unwind(tp_syncjob_t *r);

static void on_failure_recorded(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (err)
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), NULL}),
                 "could not record failed run: %s", err);
    complete(r, failed_outcome(r));
}

static void record_failure(tp_syncjob_t *r)
{
    if (r->run_id <= 0) {
        complete(r, failed_outcome(r));
        return;
    }
    char id[32], rows[32], bytes[32], dur[32];
    snprintf(id, sizeof(id), "%lld", (long long)r->run_id);
    snprintf(rows, sizeof(rows), "%lld", (long long)r->rows);
    snprintf(bytes, sizeof(bytes), "%lld", (long long)r->bytes);
    snprintf(dur, sizeof(dur), "%lld", (long long)(tp_now_ms() - r->started_ms));
    const char *params[] = {id, r->canceled ? "canceled" : "failed", r->error, rows, bytes, dur,
                            r->statement_id, jname(r)};
    static const char sql[] =
        "WITH run AS (UPDATE tidepool.sync_runs SET status = $2, error = $3, rows = $4, bytes = $5,"
        " duration_ms = $6, statement_id = $7, finished_at = greatest(clock_timestamp(), started_at)"
        " WHERE id = $1 RETURNING id)"
        " UPDATE tidepool.sync_state SET last_error = $3, last_error_at = now(),"
        " consecutive_failures = consecutive_failures + 1, last_run_id = (SELECT id FROM run),"
        " updated_at = now() WHERE job = $8";
    r->recording = true;
    if (!tp_pgconn_query(r->pg, sql, 8, NULL, params, on_failure_recorded, r))
        complete(r, failed_outcome(r));
}

static void on_rolled_back(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    r->in_tx = false;
    if (err) {
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), NULL}), "rollback failed: %s", err);
        complete(r, failed_outcome(r));
        return;
    }
    unwind(r);
}

static void after_copy_aborted(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    (void)err; /* the COPY was aborted on purpose; its error is expected */
    unwind(check(arg));
}

/* Takes a failed run one step closer to its end, from whatever state its
 * session is in: abort a COPY, wait for (and cancel) a statement in flight,
 * roll back, record the failure, close. Each async step comes back here. */
static void unwind(tp_syncjob_t *r)
{
    if (r->finished)
        return;
    if (r->pg == NULL || !tp_pgconn_ok(r->pg) || r->recording) {
        complete(r, failed_outcome(r));
        return;
    }
    if (tp_pgconn_in_copy(r->pg)) {
        r->copy_ended = true;
        if (!tp_pgconn_copy_end(r->pg, "sync run failed", after_copy_aborted, r))
            complete(r, failed_outcome(r));
        return;
    }
    if (tp_pgconn_busy(r->pg)) {
        /* Its callback (pg_step_ok) comes back here once it ends. */
        tp_pgconn_cancel(r->pg);
        return;
    }
    if (r->in_tx) {
        if (!tp_pgconn_query(r->pg, "ROLLBACK", 0, NULL, NULL, on_rolled_back, r))
            complete(r, failed_outcome(r));
        return;
    }
    if (!r->locked) {
        complete(r, failed_outcome(r));
        return;
    }
    record_failure(r);
}

/* Fails the run once: logs, stops the warehouse statement, then unwinds the
 * Postgres side (the target is never touched outside the transaction). */
static void fail(tp_syncjob_t *r, const char *fmt, ...)
{
    if (r->error || r->finished)
        return;
    va_list ap;
    va_start(ap, fmt);
    char tmp[2048];
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    r->error = tp_xasprintf("job %s: %s", jname(r), tmp);
    /* A run stopped before its result arrived (cancel, @timeout) still names
     * its statement in sync_runs, so it can be found in the warehouse. */
    if (r->statement_id == NULL && r->stmt && tp_wh_stmt_id(r->stmt))
        r->statement_id = tp_xstrdup(tp_wh_stmt_id(r->stmt));
    tp_logkv(TP_LOG_ERROR,
             ((const char *[]){"job", jname(r), "statement_id", r->statement_id, NULL}), "%s",
             r->error);
    if (r->stmt)
        tp_wh_cancel(r->stmt); /* on_done still comes; it sees r->error and does nothing */
    unwind(r);
}

/* Common entry for Postgres step callbacks: true when the step may go on. */
static bool pg_step_ok(tp_syncjob_t *r, const char *err, const char *what)
{
    if (r->finished)
        return false;
    if (r->error) {
        unwind(r); /* the run failed while this statement was in flight */
        return false;
    }
    if (err) {
        if (!tp_pgconn_ok(r->pg))
            r->retryable = true; /* the connection broke: Postgres restarted, network */
        fail(r, "%s: %s", what, err);
        return false;
    }
    return true;
}

static void query_or_fail(tp_syncjob_t *r, const char *sql, int n, const char *const *params,
                          tp_pgconn_done_fn cb, const char *what)
{
    if (!tp_pgconn_query(r->pg, sql, n, NULL, n > 0 ? params : NULL, cb, r))
        fail(r, "%s: %s", what, tp_pgconn_error(r->pg));
}

/* ---- final transaction ---- */

static void on_committed(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "commit"))
        return;
    r->in_tx = false;
    complete(r, TP_SYNCJOB_SUCCEEDED);
}

static void on_booked(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "record run"))
        return;
    if (res && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
        r->generation = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    query_or_fail(r, "COMMIT", 0, NULL, on_committed, "commit");
}

/* Records success, bumps the generation and NOTIFYs, all inside the transaction. */
static void step_book(tp_syncjob_t *r)
{
    char id[32], rows[32], bytes[32], dur[32];
    snprintf(id, sizeof(id), "%lld", (long long)r->run_id);
    snprintf(rows, sizeof(rows), "%lld", (long long)r->rows);
    snprintf(bytes, sizeof(bytes), "%lld", (long long)r->bytes);
    snprintf(dur, sizeof(dur), "%lld", (long long)(tp_now_ms() - r->started_ms));
    bool bump = r->job->mode == TP_DEFS_SNAPSHOT || r->rows > 0 || r->reconcile_due;
    tp_buf_t q;
    tp_buf_init(&q);
    tp_buf_puts(&q, "WITH st AS (UPDATE tidepool.sync_state SET generation = generation + $6::int,"
                    " last_success_at = now(), last_error = NULL, consecutive_failures = 0,"
                    " last_run_id = $1, updated_at = now()");
    if (r->job->mode == TP_DEFS_SNAPSHOT)
        tp_buf_puts(&q, ", rows = $2::bigint");
    if (r->reconcile_due)
        tp_buf_puts(&q, ", last_reconcile_at = now()");
    tp_buf_puts(&q, " WHERE job = $7 RETURNING generation, watermark),"
                    " run AS (UPDATE tidepool.sync_runs SET status = 'succeeded', rows = $2,"
                    " bytes = $3, duration_ms = $4, statement_id = $5,"
                    " generation = (SELECT generation FROM st), watermark_to = (SELECT watermark FROM st),"
                    " finished_at = greatest(clock_timestamp(), started_at) WHERE id = $1 RETURNING id)"
                    " SELECT generation, CASE WHEN $6::int = 1 THEN"
                    " pg_notify('tidepool_sync', $7 || ':' || generation) END,"
                    " (SELECT count(*) FROM run) FROM st");
    const char *params[] = {id, rows, bytes, dur, r->statement_id, bump ? "1" : "0", jname(r)};
    if (!tp_pgconn_query(r->pg, q.data, 7, NULL, params, on_booked, r))
        fail(r, "record run: %s", tp_pgconn_error(r->pg));
    tp_buf_free(&q);
}

static void on_applied(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, r->job->mode == TP_DEFS_SNAPSHOT ? "swap" : "apply"))
        return;
    if (r->phase == PH_MAIN && r->reconcile_due) {
        /* Second statement in the same transaction: the source's key set. */
        r->phase = PH_KEYS;
        step_submit(r);
        return;
    }
    step_book(r);
}

static void column_defs(tp_buf_t *q, const tp_syncjob_t *r, bool load_types, bool not_null_keys)
{
    for (size_t i = 0; i < r->n_cols; i++) {
        if (i)
            tp_buf_puts(q, ", ");
        tp_synctypes_ident(q, r->cols[i].name);
        tp_buf_printf(q, " %s", load_types && r->csv && r->cols[i].binary ? "text" : r->cols[i].pg_type);
        if (not_null_keys && is_key(r->job, r->cols[i].name))
            tp_buf_puts(q, " NOT NULL");
    }
}

static void col_list(tp_buf_t *q, const tp_syncjob_t *r, const char *alias)
{
    for (size_t i = 0; i < r->n_cols; i++) {
        if (i)
            tp_buf_puts(q, ", ");
        if (alias)
            tp_buf_printf(q, "%s.", alias);
        tp_synctypes_ident(q, r->cols[i].name);
    }
}

static void extra_indexes(tp_buf_t *q, const tp_syncjob_t *r, const char *table_q, const char *name_prefix)
{
    for (size_t i = 0; i < r->job->n_indexes; i++) {
        char *iname = tp_xasprintf("%s_idx%zu", name_prefix, i + 1);
        tp_buf_puts(q, "CREATE INDEX ");
        tp_synctypes_ident(q, iname);
        tp_buf_printf(q, " ON %s (", table_q);
        for (size_t k = 0; k < r->job->indexes[i].n_columns; k++) {
            if (k)
                tp_buf_puts(q, ", ");
            tp_synctypes_ident(q, r->job->indexes[i].columns[k]);
        }
        tp_buf_puts(q, ");\n");
        free(iname);
    }
}

/* Snapshot: PK and indexes on the fresh table, then swap it in. */
static void apply_snapshot(tp_syncjob_t *r, tp_buf_t *q)
{
    const tp_defs_job_t *j = r->job;
    tp_buf_t tq;
    tp_buf_init(&tq);
    target_qname(&tq, j);
    char *pk_tmp = prefixed("_tp_new_pk_", j->target_table);
    char *pk_final = tp_xasprintf("%.*s_pkey", 58, j->target_table);
    char *idx_tmp = prefixed("_tp_new_ix_", j->target_table);
    if (j->n_key > 0) {
        tp_buf_printf(q, "ALTER TABLE %s ADD CONSTRAINT ", r->load_table);
        tp_synctypes_ident(q, pk_tmp);
        tp_buf_puts(q, " PRIMARY KEY (");
        key_list(q, j, NULL);
        tp_buf_puts(q, ");\n");
    }
    extra_indexes(q, r, r->load_table, idx_tmp);
    tp_buf_printf(q, "ANALYZE %s;\n", r->load_table);
    if (r->n_tcols > 0) {
        tp_buf_printf(q, "LOCK TABLE %s IN ACCESS EXCLUSIVE MODE;\n", tq.data);
        /* Readers keep their grants: copy the old table's ACL to the new one. */
        tp_buf_puts(q, "DO $tp$ DECLARE g record; BEGIN FOR g IN SELECT CASE WHEN a.grantee = 0"
                       " THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS who,"
                       " a.privilege_type AS priv FROM pg_class c, aclexplode(c.relacl) a"
                       " WHERE c.oid = ");
        tp_synctypes_literal(q, tq.data);
        tp_buf_puts(q, "::regclass AND a.grantee <> c.relowner LOOP"
                       " EXECUTE format('GRANT %s ON %s TO %s', g.priv, ");
        tp_synctypes_literal(q, r->load_table);
        tp_buf_puts(q, ", g.who); END LOOP; END $tp$;\n");
        tp_buf_printf(q, "DROP TABLE %s;\n", tq.data);
    }
    tp_buf_printf(q, "ALTER TABLE %s RENAME TO ", r->load_table);
    tp_synctypes_ident(q, j->target_table);
    tp_buf_puts(q, ";\n");
    if (j->n_key > 0) {
        tp_buf_printf(q, "ALTER TABLE %s RENAME CONSTRAINT ", tq.data);
        tp_synctypes_ident(q, pk_tmp);
        tp_buf_puts(q, " TO ");
        tp_synctypes_ident(q, pk_final);
        tp_buf_puts(q, ";\n");
    }
    for (size_t i = 0; i < j->n_indexes; i++) {
        char *from = tp_xasprintf("%s_idx%zu", idx_tmp, i + 1);
        char *to = tp_xasprintf("%.*s_tp_idx%zu", 40, j->target_table, i + 1);
        tp_buf_puts(q, "ALTER INDEX ");
        tp_synctypes_qname(q, j->target_schema, from);
        tp_buf_puts(q, " RENAME TO ");
        tp_synctypes_ident(q, to);
        tp_buf_puts(q, ";\n");
        free(from);
        free(to);
    }
    free(pk_tmp);
    free(pk_final);
    free(idx_tmp);
    tp_buf_free(&tq);
}

/* Incremental: create/extend the target, upsert, deletes, watermark. */
static void apply_incremental(tp_syncjob_t *r, tp_buf_t *q)
{
    const tp_defs_job_t *j = r->job;
    tp_buf_t tq;
    tp_buf_init(&tq);
    target_qname(&tq, j);
    if (r->n_tcols == 0) {
        tp_buf_printf(q, "CREATE TABLE %s (", tq.data);
        column_defs(q, r, false, false);
        tp_buf_puts(q, ", PRIMARY KEY (");
        key_list(q, j, NULL);
        tp_buf_puts(q, "));\n");
        char *pfx = tp_xasprintf("%.*s_tp", 50, j->target_table);
        extra_indexes(q, r, tq.data, pfx);
        free(pfx);
    } else {
        for (size_t i = 0; i < r->n_cols; i++) {
            if (tcol_find(r, r->cols[i].name))
                continue;
            tp_buf_printf(q, "ALTER TABLE %s ADD COLUMN ", tq.data);
            tp_synctypes_ident(q, r->cols[i].name);
            tp_buf_printf(q, " %s;\n", r->cols[i].pg_type);
        }
    }
    const char *flag = j->deletes == TP_DEFS_DELETES_FLAG ? j->deletes_column : NULL;
    tp_buf_printf(q, "INSERT INTO %s AS t (", tq.data);
    col_list(q, r, NULL);
    tp_buf_puts(q, ") SELECT ");
    col_list(q, r, NULL);
    tp_buf_printf(q, " FROM %s", r->load_table);
    if (flag) {
        tp_buf_puts(q, " WHERE ");
        tp_synctypes_ident(q, flag);
        tp_buf_puts(q, " IS NOT TRUE");
    }
    tp_buf_puts(q, " ON CONFLICT (");
    key_list(q, j, NULL);
    bool any = false;
    for (size_t i = 0; i < r->n_cols; i++) {
        if (is_key(j, r->cols[i].name))
            continue;
        tp_buf_puts(q, any ? ", " : ") DO UPDATE SET ");
        any = true;
        tp_synctypes_ident(q, r->cols[i].name);
        tp_buf_puts(q, " = EXCLUDED.");
        tp_synctypes_ident(q, r->cols[i].name);
    }
    if (!any)
        tp_buf_puts(q, ") DO NOTHING");
    tp_buf_puts(q, ";\n");
    if (flag) {
        tp_buf_printf(q, "DELETE FROM %s AS t USING %s AS s WHERE s.", tq.data, r->load_table);
        tp_synctypes_ident(q, flag);
        tp_buf_puts(q, " IS TRUE");
        for (size_t i = 0; i < j->n_key; i++) {
            tp_buf_puts(q, " AND t.");
            tp_synctypes_ident(q, j->key[i]);
            tp_buf_puts(q, " = s.");
            tp_synctypes_ident(q, j->key[i]);
        }
        tp_buf_puts(q, ";\n");
    }
    if (j->watermark) {
        tp_buf_puts(q, "UPDATE tidepool.sync_state SET watermark = COALESCE((SELECT to_json(max(");
        tp_synctypes_ident(q, j->watermark);
        tp_buf_printf(q, "))#>>'{}' FROM %s), watermark) WHERE job = ", r->load_table);
        tp_synctypes_literal(q, jname(r));
        tp_buf_puts(q, ";\n");
    }
    tp_buf_free(&tq);
}

/* Reconcile: delete target rows whose key the source no longer has. */
static void apply_reconcile(tp_syncjob_t *r, tp_buf_t *q)
{
    const tp_defs_job_t *j = r->job;
    tp_buf_puts(q, "DELETE FROM ");
    target_qname(q, j);
    tp_buf_printf(q, " AS t WHERE NOT EXISTS (SELECT 1 FROM %s AS k WHERE ", r->load_table);
    for (size_t i = 0; i < j->n_key; i++) {
        if (i)
            tp_buf_puts(q, " AND ");
        tp_buf_puts(q, "k.");
        tp_synctypes_ident(q, j->key[i]);
        tp_buf_puts(q, " = t.");
        tp_synctypes_ident(q, j->key[i]);
    }
    tp_buf_puts(q, ");\n");
}

static void step_apply(tp_syncjob_t *r)
{
    tp_buf_t q;
    tp_buf_init(&q);
    if (r->phase == PH_KEYS)
        apply_reconcile(r, &q);
    else if (r->job->mode == TP_DEFS_SNAPSHOT)
        apply_snapshot(r, &q);
    else
        apply_incremental(r, &q);
    tp_logkv(TP_LOG_DEBUG, ((const char *[]){"job", jname(r), NULL}), "apply: %s", q.data);
    query_or_fail(r, q.data, 0, NULL, on_applied, "apply");
    tp_buf_free(&q);
}

static void on_checked(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "check keys"))
        return;
    if (res && PQntuples(res) > 0) {
        fail(r, "duplicate key in the warehouse result: %s appears %s times", PQgetvalue(res, 0, 0),
             PQgetvalue(res, 0, 1));
        return;
    }
    step_apply(r);
}

static void on_converted(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "decode BINARY columns"))
        return;
    if (r->job->mode == TP_DEFS_INCREMENTAL && r->phase == PH_MAIN) {
        /* ON CONFLICT cannot take one key twice: name the first duplicate. */
        tp_buf_t q;
        tp_buf_init(&q);
        tp_buf_puts(&q, "SELECT json_build_object(");
        for (size_t i = 0; i < r->job->n_key; i++) {
            if (i)
                tp_buf_puts(&q, ", ");
            tp_synctypes_literal(&q, r->job->key[i]);
            tp_buf_puts(&q, ", ");
            tp_synctypes_ident(&q, r->job->key[i]);
        }
        tp_buf_puts(&q, ")::text, count(*) FROM ");
        tp_buf_puts(&q, r->load_table);
        tp_buf_puts(&q, " GROUP BY ");
        key_list(&q, r->job, NULL);
        tp_buf_puts(&q, " HAVING count(*) > 1 LIMIT 1");
        query_or_fail(r, q.data, 0, NULL, on_checked, "check keys");
        tp_buf_free(&q);
        return;
    }
    step_apply(r);
}

/* After COPY: decode hex BINARY columns that came as CSV text. */
static void step_after_copy(tp_syncjob_t *r)
{
    tp_buf_t q;
    tp_buf_init(&q);
    tp_buf_puts(&q, "SELECT 1;\n");
    for (size_t i = 0; r->csv && i < r->n_cols; i++) {
        if (!r->cols[i].binary)
            continue;
        tp_buf_printf(&q, "ALTER TABLE %s ALTER COLUMN ", r->load_table);
        tp_synctypes_ident(&q, r->cols[i].name);
        tp_buf_puts(&q, " TYPE bytea USING decode(");
        tp_synctypes_ident(&q, r->cols[i].name);
        tp_buf_puts(&q, ", 'hex');\n");
    }
    query_or_fail(r, q.data, 0, NULL, on_converted, "decode BINARY columns");
    tp_buf_free(&q);
}

/* ---- COPY ---- */

static void on_copy_done(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "load into Postgres (COPY)"))
        return;
    int64_t n = res ? strtoll(PQcmdTuples(res), NULL, 10) : 0;
    if (r->phase == PH_MAIN) {
        r->rows = n;
        r->rows_known = true;
    }
    step_after_copy(r);
}

static void end_copy(tp_syncjob_t *r)
{
    r->copy_ended = true;
    if (!tp_pgconn_copy_end(r->pg, NULL, on_copy_done, r))
        fail(r, "end COPY: %s", tp_pgconn_error(r->pg));
}

static void on_drain(void *arg)
{
    tp_syncjob_t *r = check(arg);
    if (r->paused && r->stmt) {
        r->paused = false;
        tp_wh_resume(r->stmt);
    }
}

/* Pushes buf into COPY; pauses the warehouse while Postgres is behind. */
static bool push(tp_syncjob_t *r, const char *data, size_t len)
{
    int rc = tp_pgconn_copy_put(r->pg, data, len);
    if (rc < 0) {
        fail(r, "load into Postgres (COPY): %s", tp_pgconn_error(r->pg));
        return false;
    }
    if (rc == 0 && r->stmt) {
        r->paused = true;
        tp_wh_pause(r->stmt);
    }
    return true;
}

static bool on_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *rows, void *arg)
{
    (void)st;
    tp_syncjob_t *r = check(arg);
    if (r->error || !r->copy_ready)
        return r->error == NULL;
    tp_buf_reset(&r->buf);
    for (size_t i = 0; i < rows->n_rows; i++) {
        for (size_t k = 0; k < rows->n_cols; k++) {
            if (k)
                tp_buf_putc(&r->buf, '\t');
            size_t idx = i * rows->n_cols + k;
            bool bin = k < r->n_cols && r->cols[k].binary;
            tp_synctypes_copy_cell(&r->buf, rows->cells[idx], rows->lens[idx], bin);
            if (rows->cells[idx])
                r->bytes += (int64_t)rows->lens[idx];
        }
        tp_buf_putc(&r->buf, '\n');
    }
    r->live_rows += (int64_t)rows->n_rows;
    return push(r, r->buf.data, r->buf.len);
}

static bool on_csv(tp_wh_stmt_t *st, const tp_wh_csv_t *csv, void *arg)
{
    (void)st;
    tp_syncjob_t *r = check(arg);
    if (r->error || !r->copy_ready)
        return r->error == NULL;
    r->bytes += (int64_t)csv->len;
    const char *p = csv->data, *e = csv->data + csv->len;
    while ((p = memchr(p, '\n', (size_t)(e - p))) != NULL) {
        r->live_rows++;
        p++;
    }
    return push(r, csv->data, csv->len);
}

static void on_copy_ready(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "start COPY"))
        return;
    r->copy_ready = true;
    tp_pgconn_on_drain(r->pg, on_drain, r);
    if (r->wh_done) {
        end_copy(r);
        return;
    }
    if (r->stmt) {
        r->paused = false;
        tp_wh_resume(r->stmt);
    }
}

static void on_load_table(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "create load table"))
        return;
    r->in_tx = true;
    tp_buf_t q;
    tp_buf_init(&q);
    tp_buf_printf(&q, "COPY %s (", r->load_table);
    col_list(&q, r, NULL);
    tp_buf_puts(&q, ") FROM STDIN WITH (FREEZE true");
    if (r->csv)
        tp_buf_puts(&q, ", FORMAT csv, HEADER true, NULL 'null'");
    tp_buf_puts(&q, ")");
    if (!tp_pgconn_copy_begin(r->pg, q.data, on_copy_ready, r))
        fail(r, "start COPY: %s", tp_pgconn_error(r->pg));
    tp_buf_free(&q);
}

/* ---- warehouse side ---- */

static void begin_load(tp_syncjob_t *r)
{
    r->in_tx = true;
    if (!tp_pgconn_query(r->pg, r->load_sql, 0, NULL, NULL, on_load_table, r))
        fail(r, "create load table: %s", tp_pgconn_error(r->pg));
}

static void on_schema(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    /* A concurrent CREATE SCHEMA may win the race (23505/42P06): that is fine. */
    if (err && (strstr(err, "SQLSTATE 23505") || strstr(err, "SQLSTATE 42P06")))
        err = NULL;
    if (!pg_step_ok(r, err, "create schema"))
        return;
    begin_load(r);
}

/* Checks the result schema against the job and the existing target. */
static bool validate_columns(tp_syncjob_t *r)
{
    const tp_defs_job_t *j = r->job;
    for (size_t i = 0; i < j->n_key; i++)
        if (!col_find(r, j->key[i])) {
            fail(r, "@key column %s is not in the query's result", j->key[i]);
            return false;
        }
    if (r->phase == PH_KEYS)
        return true;
    if (j->watermark && !col_find(r, j->watermark)) {
        fail(r, "@watermark column %s is not in the query's result", j->watermark);
        return false;
    }
    if (j->deletes == TP_DEFS_DELETES_FLAG) {
        const tp_synccol_t *f = col_find(r, j->deletes_column);
        if (!f || strcmp(f->pg_type, "boolean") != 0) {
            fail(r, "@deletes flag column %s must be a BOOLEAN column of the result", j->deletes_column);
            return false;
        }
    }
    for (size_t i = 0; i < r->n_cols; i++)
        for (size_t k = i + 1; k < r->n_cols; k++)
            if (strcmp(r->cols[i].name, r->cols[k].name) == 0) {
                fail(r, "the result has two columns named %s", r->cols[i].name);
                return false;
            }
    if (r->n_tcols == 0)
        return true;
    for (size_t i = 0; i < r->n_cols; i++) {
        const tcol_t *t = tcol_find(r, r->cols[i].name);
        if (t == NULL) {
            tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), "column", r->cols[i].name, NULL}),
                     "schema drift: column %s (%s) added to %s", r->cols[i].name, r->cols[i].pg_type,
                     j->target);
            continue;
        }
        if (strcmp(t->pg_type, r->cols[i].pg_type) != 0) {
            fail(r,
                 "schema drift: column %s changed type: target %s has %s, the warehouse now returns %s "
                 "(%s); target left unchanged",
                 r->cols[i].name, j->target, t->pg_type, r->cols[i].type_text, r->cols[i].pg_type);
            return false;
        }
    }
    for (size_t i = 0; i < r->n_tcols; i++)
        if (!col_find(r, r->tcols[i].name))
            tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), "column", r->tcols[i].name, NULL}),
                     "schema drift: column %s of %s is no longer in the result (%s)", r->tcols[i].name,
                     j->target, j->mode == TP_DEFS_SNAPSHOT ? "dropped by this snapshot" : "left as is");
    return true;
}

static bool on_manifest(tp_wh_stmt_t *st, const tp_wh_manifest_t *m, void *arg)
{
    tp_syncjob_t *r = check(arg);
    if (r->error)
        return false;
    if (!r->statement_id && tp_wh_stmt_id(st))
        r->statement_id = tp_xstrdup(tp_wh_stmt_id(st));
    if (r->phase == PH_MAIN)
        r->manifest_ms = tp_now_ms();
    if (m->truncated) {
        fail(r, "the warehouse truncated the result (row or byte limit); refusing a partial load");
        return false;
    }
    if (m->n_columns == 0) {
        fail(r, "the query returned no columns");
        return false;
    }
    tp_synccols_free(r->cols, r->n_cols);
    r->cols = tp_xcalloc(m->n_columns, sizeof(*r->cols));
    r->n_cols = m->n_columns;
    r->csv = m->format == TP_WH_CSV;
    for (size_t i = 0; i < m->n_columns; i++) {
        const tp_wh_column_t *c = &m->columns[i];
        r->cols[i].name = tp_xstrdup(c->name ? c->name : "");
        r->cols[i].type_text = tp_xstrdup(c->type_text && *c->type_text ? c->type_text
                                                                         : (c->type_name ? c->type_name : "?"));
        r->cols[i].pg_type = tp_synctypes_map(c->type_name, c->type_text, c->precision, c->scale);
        r->cols[i].binary = r->cols[i].pg_type && strcmp(r->cols[i].pg_type, "bytea") == 0;
        if (r->cols[i].pg_type == NULL) {
            fail(r, "column %s has warehouse type %s, which has no Postgres mapping", r->cols[i].name,
                 r->cols[i].type_text);
            return false;
        }
    }
    if (!validate_columns(r))
        return false;
    /* Hold the rows until COPY is ready. */
    r->paused = true;
    tp_wh_pause(st);
    r->copy_ready = false;
    r->copy_ended = false;
    tp_buf_t q;
    tp_buf_init(&q);
    const tp_defs_job_t *j = r->job;
    free(r->load_table);
    tp_buf_t ln;
    tp_buf_init(&ln);
    if (r->phase == PH_KEYS) {
        tp_synctypes_ident(&ln, "_tp_keys");
        tp_buf_printf(&q, "CREATE TEMP TABLE %s (", ln.data);
        column_defs(&q, r, true, false);
        tp_buf_puts(&q, ") ON COMMIT DROP");
    } else if (j->mode == TP_DEFS_SNAPSHOT) {
        char *fresh = prefixed("_tp_new_", j->target_table);
        tp_synctypes_qname(&ln, j->target_schema, fresh);
        free(fresh);
        tp_buf_printf(&q, "BEGIN;\nDROP TABLE IF EXISTS %s;\nCREATE TABLE %s (", ln.data, ln.data);
        column_defs(&q, r, true, true);
        tp_buf_puts(&q, ")");
    } else {
        tp_synctypes_ident(&ln, "_tp_stage");
        tp_buf_printf(&q, "BEGIN;\nCREATE TEMP TABLE %s (", ln.data);
        column_defs(&q, r, true, true);
        tp_buf_puts(&q, ") ON COMMIT DROP");
    }
    r->load_table = tp_buf_steal(&ln);
    free(r->load_sql);
    r->load_sql = tp_buf_steal(&q);
    if (r->phase == PH_MAIN && r->n_tcols == 0) {
        /* The target's schema may be missing. Created outside the run's
         * transaction: two jobs creating it at once must not collide. */
        tp_buf_puts(&q, "CREATE SCHEMA IF NOT EXISTS ");
        tp_synctypes_ident(&q, j->target_schema);
        bool ok = tp_pgconn_query(r->pg, q.data, 0, NULL, NULL, on_schema, r);
        tp_buf_free(&q);
        if (!ok)
            fail(r, "create schema: %s", tp_pgconn_error(r->pg));
        return ok;
    }
    begin_load(r);
    return r->error == NULL;
}

static void on_wh_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    (void)st;
    tp_syncjob_t *r = check(arg);
    r->stmt = NULL;
    r->wh_done = true;
    if (!r->statement_id && res->statement_id)
        r->statement_id = tp_xstrdup(res->statement_id);
    if (r->finished) {
        schedule_done(r);
        return;
    }
    if (r->error) {
        /* fail() already unwinds the Postgres side; nothing to add here unless
         * nothing else is pending (the Postgres side was idle and gone). */
        return;
    }
    if (res->status == TP_WH_FAILED && r->inline_req && r->load_table == NULL && !r->canceled &&
        ((res->sql_state && strcmp(res->sql_state, "54000") == 0) ||
         (res->message && (strstr(res->message, "EXTERNAL_LINKS") || strstr(res->message, "byte limit"))))) {
        tp_logkv(TP_LOG_INFO, ((const char *[]){"job", jname(r), NULL}),
                 "batch too large for INLINE; fetching it again with EXTERNAL_LINKS");
        free(r->statement_id);
        r->statement_id = NULL;
        r->force_links = true;
        step_submit(r);
        return;
    }
    if (res->status != TP_WH_SUCCEEDED) {
        r->retryable = res->status == TP_WH_CLOSED ||
                       (res->status == TP_WH_ERROR &&
                        (res->kind == TP_WH_ERR_TRANSPORT || res->kind == TP_WH_ERR_PROTOCOL ||
                         (res->kind == TP_WH_ERR_HTTP && (res->http_status >= 500 || res->http_status == 429))));
        if (r->canceled)
            fail(r, "canceled: %s", r->cancel_reason ? r->cancel_reason : "stopped");
        else
            fail(r, "warehouse statement %s %s: %s%s%s", res->statement_id ? res->statement_id : "(none)",
                 tp_wh_status_name(res->status), res->message ? res->message : "no message",
                 res->error_code ? " " : "", res->error_code ? res->error_code : "");
        return;
    }
    r->wh_ok = true;
    if (r->load_table == NULL) {
        fail(r, "the warehouse returned no result manifest");
        return;
    }
    if (r->copy_ready && !r->copy_ended)
        end_copy(r);
    /* else: COPY not ready yet; on_copy_ready ends it. */
}

static void step_submit(tp_syncjob_t *r)
{
    const tp_defs_job_t *j = r->job;
    tp_wh_request_t req;
    tp_wh_request_init(&req);
    tp_buf_t sql;
    tp_buf_init(&sql);
    tp_wh_param_t param = {"watermark", NULL, NULL};
    if (r->phase == PH_KEYS) {
        tp_buf_puts(&sql, "SELECT ");
        for (size_t i = 0; i < j->n_key; i++) {
            if (i)
                tp_buf_puts(&sql, ", ");
            tp_buf_printf(&sql, "`%s`", j->key[i]);
        }
        tp_buf_printf(&sql, " FROM (\n%s\n) AS _tp_src", j->body.sql);
    } else {
        tp_buf_puts(&sql, j->body.sql);
        param.value = r->watermark_from;
    }
    param.type = r->watermark_type;
    if (j->uses_watermark) {
        req.params = &param;
        req.n_params = 1;
    }
    req.sql = sql.data;
    req.catalog = r->env->catalog && *r->env->catalog ? r->env->catalog : NULL;
    req.schema = r->env->schema && *r->env->schema ? r->env->schema : NULL;
    /* Large results come as EXTERNAL_LINKS + CSV (passed to COPY as is);
     * an incremental batch after the first run is usually small: INLINE JSON
     * saves the link round trips, and a batch over the inline limit falls
     * back to links (on_wh_done). TIDEPOOL_SYNC_FORMAT=csv|json|inline forces one. */
    const char *fmt = getenv("TIDEPOOL_SYNC_FORMAT");
    bool small = r->phase == PH_MAIN && j->mode == TP_DEFS_INCREMENTAL && r->watermark_from && !r->force_links;
    req.disposition = TP_WH_EXTERNAL_LINKS;
    req.format = TP_WH_CSV;
    if (fmt && strcmp(fmt, "json") == 0) {
        req.format = TP_WH_JSON_ARRAY;
    } else if ((fmt && strcmp(fmt, "inline") == 0) || ((fmt == NULL || *fmt == '\0') && small)) {
        req.format = TP_WH_JSON_ARRAY;
        req.disposition = TP_WH_INLINE;
    }
    r->inline_req = req.disposition == TP_WH_INLINE;
    req.wait_timeout_s = 0;
    req.timeout_ms = j->timeout_ms;
    req.label = jname(r);
    req.on_manifest = on_manifest;
    req.on_rows = on_rows;
    req.on_csv = on_csv;
    req.on_done = on_wh_done;
    req.arg = r;
    r->wh_done = false;
    r->wh_ok = false;
    r->copy_ready = false;
    r->copy_ended = false;
    free(r->load_table);
    r->load_table = NULL;
    char *err = NULL;
    r->stmt = tp_wh_submit(r->env->wh, &req, &err);
    tp_buf_free(&sql);
    if (r->stmt == NULL) {
        fail(r, "submit to the warehouse: %s", err ? err : "refused");
        free(err);
    }
}

/* ---- preparation ---- */

static void on_target_cols(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "read target columns"))
        return;
    int n = res ? PQntuples(res) : 0;
    r->tcols = tp_xcalloc((size_t)n + 1, sizeof(*r->tcols));
    r->n_tcols = (size_t)n;
    for (int i = 0; i < n; i++) {
        r->tcols[i].name = tp_xstrdup(PQgetvalue(res, i, 0));
        r->tcols[i].pg_type = tp_xstrdup(PQgetvalue(res, i, 1));
    }
    if (r->job->watermark) {
        const tcol_t *t = tcol_find(r, r->job->watermark);
        if (t)
            r->watermark_type = wh_param_type(t->pg_type);
    }
    if (r->job->mode == TP_DEFS_INCREMENTAL && r->n_tcols == 0 && r->watermark_from) {
        /* The target was dropped by hand: start over from the beginning. */
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), NULL}),
                 "target %s is missing; reloading from the start", r->job->target);
        free(r->watermark_from);
        r->watermark_from = NULL;
    }
    step_submit(r);
}

static void on_prepared(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "record run start"))
        return;
    if (res == NULL || PQntuples(res) != 1) {
        fail(r, "record run start: no row returned");
        return;
    }
    r->run_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    if (!PQgetisnull(res, 0, 1))
        r->watermark_from = tp_xstrdup(PQgetvalue(res, 0, 1));
    r->reconcile_due = r->job->deletes == TP_DEFS_DELETES_RECONCILE &&
                       strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    if (strcmp(PQgetvalue(res, 0, 3), "0") != 0)
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", jname(r), NULL}),
                 "marked %s abandoned run(s) of this job as failed", PQgetvalue(res, 0, 3));
    tp_buf_t q;
    tp_buf_init(&q);
    target_qname(&q, r->job);
    const char *params[] = {q.data};
    query_or_fail(r,
                  "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
                  " WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
                  " ORDER BY a.attnum",
                  1, params, on_target_cols, "read target columns");
    tp_buf_free(&q);
}

static void on_locked(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "take the job's advisory lock"))
        return;
    if (res == NULL || PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
        complete(r, TP_SYNCJOB_SKIPPED);
        return;
    }
    r->locked = true;
    char reconcile[32];
    snprintf(reconcile, sizeof(reconcile), "%lld milliseconds", (long long)r->job->reconcile_ms);
    const char *params[] = {jname(r),
                            r->job->mode == TP_DEFS_SNAPSHOT ? "snapshot" : "incremental",
                            r->job->target,
                            r->trigger,
                            r->env->daemon_id ? r->env->daemon_id : "",
                            reconcile};
    static const char sql[] =
        "WITH st AS (INSERT INTO tidepool.sync_state (job, mode, target_table, last_attempt_at)"
        " VALUES ($1, $2, $3, now()) ON CONFLICT (job) DO UPDATE SET mode = EXCLUDED.mode,"
        " target_table = EXCLUDED.target_table, last_attempt_at = now(), updated_at = now()"
        " RETURNING watermark, last_reconcile_at),"
        " ab AS (UPDATE tidepool.sync_runs SET status = 'failed',"
        " error = 'abandoned: the daemon running it stopped',"
        " finished_at = greatest(now(), started_at) WHERE job = $1 AND status = 'running' RETURNING id),"
        " run AS (INSERT INTO tidepool.sync_runs (job, mode, trigger, daemon, watermark_from)"
        " SELECT $1, $2, $4, $5, watermark FROM st RETURNING id)"
        " SELECT run.id, st.watermark,"
        " (st.last_reconcile_at IS NULL OR st.last_reconcile_at < now() - $6::interval),"
        " (SELECT count(*) FROM ab) FROM run, st";
    query_or_fail(r, sql, 6, params, on_prepared, "record run start");
}

static void on_connected(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    tp_syncjob_t *r = check(arg);
    if (!pg_step_ok(r, err, "connect"))
        return;
    char cls[32];
    snprintf(cls, sizeof(cls), "%d", TP_SYNCJOB_LOCK_CLASS);
    const char *params[] = {cls, jname(r)};
    query_or_fail(r, "SELECT pg_try_advisory_lock($1::int, hashtext($2))", 2, params, on_locked,
                  "take the job's advisory lock");
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_syncjob_t *r = check(arg);
    char why[64];
    snprintf(why, sizeof(why), "timed out after %lld ms (@timeout)", (long long)r->job->timeout_ms);
    if (r->pg)
        tp_pgconn_cancel(r->pg);
    fail(r, "%s", why);
}

tp_syncjob_t *tp_syncjob_start(const tp_syncenv_t *env, const tp_defs_job_t *job, const char *trigger,
                               tp_syncjob_done_fn done, void *arg)
{
    tp_syncjob_t *r = tp_xcalloc(1, sizeof(*r));
    r->magic = SYNCJOB_MAGIC;
    r->env = env;
    r->job = job;
    r->trigger = tp_xstrdup(trigger ? trigger : "schedule");
    r->done = done;
    r->done_arg = arg;
    r->started_ms = tp_now_ms();
    tp_buf_init(&r->buf);
    tp_logkv(TP_LOG_INFO, ((const char *[]){"job", job->name, "trigger", r->trigger, NULL}),
             "sync run starting");
    if (job->timeout_ms > 0) {
        r->ev_timeout = evtimer_new(env->base, on_timeout, r);
        struct timeval tv = {(time_t)(job->timeout_ms / 1000), (suseconds_t)((job->timeout_ms % 1000) * 1000)};
        evtimer_add(r->ev_timeout, &tv);
    }
    r->pg = tp_pgconn_new(env->base, env->dsn, "tidepool-sync", env->pw);
    int64_t cto = env->connect_timeout_ms > 0 ? env->connect_timeout_ms : 10000;
    if (!tp_pgconn_connect(r->pg, (int)cto, on_connected, r)) {
        char *e = tp_xstrdup(tp_pgconn_error(r->pg));
        fail(r, "%s", e);
        free(e);
    }
    return r;
}

void tp_syncjob_cancel(tp_syncjob_t *r, const char *reason)
{
    if (r == NULL || r->finished || r->canceled)
        return;
    r->canceled = true;
    r->cancel_reason = tp_xstrdup(reason ? reason : "canceled");
    if (r->pg && !r->copy_ready)
        tp_pgconn_cancel(r->pg);
    fail(r, "canceled: %s", r->cancel_reason);
}

int64_t tp_syncjob_rows(const tp_syncjob_t *r)
{
    /* live_rows only estimates (a CSV header and quoted newlines count as
     * lines); once COPY has counted, its count is the answer */
    return r->rows_known ? r->rows : r->live_rows;
}

int64_t tp_syncjob_bytes(const tp_syncjob_t *r)
{
    return r->bytes;
}

int64_t tp_syncjob_started_ms(const tp_syncjob_t *r)
{
    return r->started_ms;
}

const char *tp_syncjob_error(const tp_syncjob_t *r)
{
    return r->error ? r->error : "";
}

const char *tp_syncjob_error_detail(const tp_syncjob_t *r)
{
    /* fail() is the only writer: "job NAME: detail" */
    return r->error ? r->error + strlen("job ") + strlen(jname(r)) + strlen(": ") : "";
}

bool tp_syncjob_retryable(const tp_syncjob_t *r)
{
    return r->retryable && !r->canceled;
}

const tp_defs_job_t *tp_syncjob_job(const tp_syncjob_t *r)
{
    return r->job;
}

void tp_syncjob_free(tp_syncjob_t *r)
{
    if (r == NULL)
        return;
    if (r->ev_timeout)
        event_free(r->ev_timeout);
    tp_pgconn_free(r->pg);
    for (size_t i = 0; i < r->n_tcols; i++) {
        free(r->tcols[i].name);
        free(r->tcols[i].pg_type);
    }
    free(r->tcols);
    tp_synccols_free(r->cols, r->n_cols);
    tp_buf_free(&r->buf);
    free(r->trigger);
    free(r->statement_id);
    free(r->watermark_from);
    free(r->watermark_type);
    free(r->cancel_reason);
    free(r->error);
    free(r->load_table);
    free(r->load_sql);
    r->magic = 0;
    free(r);
}
