/* Statements: the table of live statements, one worker thread per statement
 * with its own blocking libpq connection (the emulator is a test double; the
 * event loop never waits on Postgres), the state machine and the JSON answers.
 * States: PENDING (worker connecting) -> RUNNING -> SUCCEEDED | FAILED |
 * CANCELED; CLOSED after DELETE or when results expire (--result-ttl).
 * Terminal statements are forgotten after --forget-ttl (then 404).
 * The worker streams rows in single-row mode into the chunk builder, so no
 * PGresult ever holds the whole result; it publishes a terminal state under
 * g.mu and wakes the loop (g.done_ev), which joins it and answers waiters.
 * A cancel marks the statement CANCELED at once (the race with completion is
 * allowed by the protocol) and the worker sends PQcancel from its own thread.
 * Result fields are written only by the worker before it publishes, and read
 * by the loop only after it has seen a terminal state. */
#include "emu.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "tidepool/log.h"

static void lock(void)
{
    pthread_mutex_lock(&g.mu);
}

static void unlock(void)
{
    pthread_mutex_unlock(&g.mu);
}

static const char *const state_names[] = {"PENDING", "RUNNING", "SUCCEEDED",
                                          "FAILED",  "CANCELED", "CLOSED"};

const char *emu_state_name(emu_state_t s)
{
    return state_names[s];
}

bool emu_state_terminal(emu_state_t s)
{
    return s >= EMU_SUCCEEDED;
}

emu_state_t emu_stmt_state(emu_stmt_t *st)
{
    lock();
    emu_state_t s = st->state;
    unlock();
    return s;
}

static void random_hex(char *out, size_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < nbytes; i += 8) {
        uint64_t r = tp_random_u64();
        for (size_t k = 0; k < 8 && i + k < nbytes; k++) {
            out[2 * (i + k)] = hex[(r >> (8 * k + 4)) & 15];
            out[2 * (i + k) + 1] = hex[(r >> (8 * k)) & 15];
        }
    }
    out[2 * nbytes] = '\0';
}

/* ---- errors ---- */

static const struct {
    const char *sqlstate;
    const char *cls;
} error_classes[] = {
    {"42601", "PARSE_SYNTAX_ERROR"},   {"42P01", "TABLE_OR_VIEW_NOT_FOUND"},
    {"3F000", "SCHEMA_NOT_FOUND"},     {"42703", "UNRESOLVED_COLUMN"},
    {"42883", "UNRESOLVED_ROUTINE"},   {"22012", "DIVIDE_BY_ZERO"},
    {"22P02", "CAST_INVALID_INPUT"},   {"22007", "CAST_INVALID_INPUT"},
    {"22008", "DATETIME_OVERFLOW"},    {"22003", "ARITHMETIC_OVERFLOW"},
    {"42804", "DATATYPE_MISMATCH"},    {"42P07", "TABLE_OR_VIEW_ALREADY_EXISTS"},
    {"23505", "DUPLICATE_KEY"},        {"42501", "INSUFFICIENT_PERMISSIONS"},
};

static const char *error_code_for(const char *sqlstate)
{
    if (strncmp(sqlstate, "53", 2) == 0 || strncmp(sqlstate, "54", 2) == 0)
        return "RESOURCE_EXHAUSTED";
    if (strncmp(sqlstate, "08", 2) == 0)
        return "IO_ERROR";
    if (strncmp(sqlstate, "40", 2) == 0)
        return "ABORTED";
    if (strcmp(sqlstate, "57014") == 0)
        return "CANCELLED";
    if (strncmp(sqlstate, "57", 2) == 0)
        return "TEMPORARILY_UNAVAILABLE";
    if (strncmp(sqlstate, "XX", 2) == 0 || strncmp(sqlstate, "58", 2) == 0)
        return "INTERNAL_ERROR";
    return "BAD_REQUEST";
}

/* Records the failure (first one wins) in Databricks' message form. */
static void set_error(emu_stmt_t *st, const char *code, const char *sqlstate, const char *msg)
{
    if (st->err_code)
        return;
    const char *cls = "SQL_ERROR";
    for (size_t i = 0; i < TP_ARRAY_LEN(error_classes); i++)
        if (sqlstate && strcmp(error_classes[i].sqlstate, sqlstate) == 0)
            cls = error_classes[i].cls;
    char *m = tp_xstrdup(msg ? msg : "unknown error");
    size_t n = strlen(m);
    while (n > 0 && (m[n - 1] == '\n' || m[n - 1] == ' '))
        m[--n] = '\0';
    const char *body = strncmp(m, "ERROR:  ", 8) == 0 ? m + 8 : m;
    st->err_code = tp_xstrdup(code ? code : error_code_for(sqlstate ? sqlstate : "XX000"));
    st->err_msg = sqlstate ? tp_xasprintf("[%s] %s SQLSTATE: %s", cls, body, sqlstate)
                           : tp_xstrdup(body);
    st->sql_state = sqlstate ? tp_xstrdup(sqlstate) : NULL;
    free(m);
}

static void set_pg_error(emu_stmt_t *st, const PGresult *res)
{
    const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    set_error(st, NULL, ss ? ss : "XX000", msg ? msg : PQresultErrorMessage(res));
}

/* ---- result reading on the worker ---- */

static void take_columns(emu_stmt_t *st, const PGresult *res)
{
    st->has_manifest = true;
    st->ncols = PQnfields(res);
    st->cols = st->ncols ? tp_xcalloc((size_t)st->ncols, sizeof *st->cols) : NULL;
    for (int j = 0; j < st->ncols; j++) {
        st->cols[j].name = tp_xstrdup(PQfname(res, j));
        emu_column_map(&st->cols[j], PQftype(res, j), PQfmod(res, j));
    }
}

static void set_long_columns(emu_stmt_t *st, const char *const *names, int n)
{
    st->has_manifest = true;
    st->ncols = n;
    st->cols = tp_xcalloc((size_t)n, sizeof *st->cols);
    for (int j = 0; j < n; j++) {
        st->cols[j].name = tp_xstrdup(names[j]);
        emu_column_map(&st->cols[j], 20, -1); /* int8: BIGINT / LONG */
    }
}

/* DML answers one row of counts, as Databricks does; DDL answers no result set. */
static void command_result(emu_stmt_t *st, emu_builder_t *b, const PGresult *res)
{
    const char *tag = PQcmdStatus((PGresult *)res);
    const char *count = PQcmdTuples((PGresult *)res);
    static const char *const ins[] = {"num_affected_rows", "num_inserted_rows"};
    static const char *const aff[] = {"num_affected_rows"};
    if (st->has_manifest)
        return;
    if (strncmp(tag, "INSERT ", 7) == 0) {
        set_long_columns(st, ins, 2);
        char *cells[2] = {(char *)count, (char *)count};
        emu_builder_row(b, cells);
    } else if (strncmp(tag, "UPDATE ", 7) == 0 || strncmp(tag, "DELETE ", 7) == 0 ||
               strncmp(tag, "MERGE ", 6) == 0) {
        set_long_columns(st, aff, 1);
        char *cells[1] = {(char *)count};
        emu_builder_row(b, cells);
    } else {
        st->has_manifest = true;
        st->ncols = 0;
    }
}

static void handle_result(emu_stmt_t *st, emu_builder_t *b, PGresult *res, char ***cells)
{
    switch (PQresultStatus(res)) {
    case PGRES_SINGLE_TUPLE:
        if (!st->has_manifest) {
            take_columns(st, res);
            *cells = tp_xcalloc((size_t)st->ncols + 1, sizeof **cells);
        }
        if (st->err_code)
            break;
        for (int j = 0; j < st->ncols; j++)
            (*cells)[j] = PQgetisnull(res, 0, j) ? NULL : PQgetvalue(res, 0, j);
        emu_builder_row(b, *cells);
        if (st->disp == EMU_INLINE && st->total_bytes + (int64_t)b->cur.len > EMU_INLINE_LIMIT) {
            set_error(st, "BAD_REQUEST", "54000",
                      "Inline byte limit exceeded: the result is larger than 25 MiB; "
                      "use disposition EXTERNAL_LINKS");
            b->stop = true;
        }
        break;
    case PGRES_TUPLES_OK:
        if (!st->has_manifest)
            take_columns(st, res);
        break;
    case PGRES_COMMAND_OK:
        command_result(st, b, res);
        break;
    case PGRES_FATAL_ERROR: set_pg_error(st, res); break;
    default: break;
    }
}

static bool run_simple(PGconn *conn, emu_stmt_t *st, const char *sql, int n, const char *const *v)
{
    PGresult *r = PQexecParams(conn, sql, n, NULL, v, NULL, NULL, 0);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok)
        set_pg_error(st, r);
    PQclear(r);
    return ok;
}

static void execute(emu_stmt_t *st, PGconn *conn)
{
    static const char *const setup[] = {
        "SET TimeZone = 'UTC'", "SET DateStyle = 'ISO, YMD'", "SET bytea_output = 'hex'",
        "SET IntervalStyle = 'postgres'", "SET extra_float_digits = 1"};
    for (size_t i = 0; i < TP_ARRAY_LEN(setup); i++)
        if (!run_simple(conn, st, setup[i], 0, NULL))
            return;
    if (st->schema) {
        const char *v[1] = {st->schema};
        if (!run_simple(conn, st,
                        "SELECT set_config('search_path', quote_ident($1) || ', public', false)",
                        1, v))
            return;
    }
    if (st->unbound_param) {
        char *m = tp_xasprintf("Found the unbound parameter: %s. Please, fix `args` and provide "
                               "a mapping of the parameter to a SQL literal.",
                               st->unbound_param);
        set_error(st, "BAD_REQUEST", NULL, m);
        free(st->err_msg);
        st->err_msg = tp_xasprintf("[UNBOUND_SQL_PARAMETER] %s SQLSTATE: 42P02", m);
        st->sql_state = tp_xstrdup("42P02");
        free(m);
        return;
    }
    if (!PQsendQueryParams(conn, st->sql, st->nparams, NULL,
                           (const char *const *)st->param_values, NULL, NULL, 0)) {
        set_error(st, "IO_ERROR", "08006", PQerrorMessage(conn));
        return;
    }
    PQsetSingleRowMode(conn);
    emu_builder_t b;
    emu_builder_init(&b, st);
    char **cells = NULL;
    bool cancel_sent = false;
    for (;;) {
        /* A row or byte limit does not cancel: the rest is drained unread, so a
         * statement that writes (INSERT ... RETURNING) still commits. A failing
         * one (INLINE too large) is cancelled. */
        if (!cancel_sent && (atomic_load(&st->cancel) || (b.stop && st->err_code))) {
            PGcancel *c = PQgetCancel(conn);
            char eb[256];
            if (c && !PQcancel(c, eb, sizeof eb))
                tp_warn("statement %s: cancel request failed: %s", st->id, eb);
            PQfreeCancel(c);
            cancel_sent = true;
        }
        bool finished = false;
        while (!PQisBusy(conn)) {
            PGresult *res = PQgetResult(conn);
            if (res == NULL) {
                finished = true;
                break;
            }
            handle_result(st, &b, res, &cells);
            PQclear(res);
        }
        if (finished)
            break;
        struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
        poll(&pfd, 1, 100);
        if (!PQconsumeInput(conn)) {
            set_error(st, "IO_ERROR", "08006", PQerrorMessage(conn));
            break;
        }
    }
    emu_builder_finish(&b);
    emu_builder_free(&b);
    free(cells);
    if (st->err_code == NULL && !st->has_manifest) {
        st->has_manifest = true;
        st->ncols = 0;
    }
}

static void free_result(emu_stmt_t *st)
{
    for (int i = 0; i < st->nchunks; i++)
        free(st->chunks[i].data);
    free(st->chunks);
    st->chunks = NULL;
    st->nchunks = 0;
    while (st->links) {
        emu_link_t *l = st->links;
        st->links = l->next;
        free(l);
    }
}

static void *worker_main(void *arg)
{
    emu_stmt_t *st = arg;
    if (st == NULL || st->magic != EMU_STMT_MAGIC)
        abort(); /* a corrupted hand-off: nothing sane to do */
    /* connect_timeout bounds a shutdown that waits for this thread; the DSN may override it */
    const char *const keys[] = {"connect_timeout", "dbname", NULL};
    const char *const vals[] = {"10", g.dsn, NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        set_error(st, "TEMPORARILY_UNAVAILABLE", "08006", PQerrorMessage(conn));
    } else {
        lock();
        if (st->state == EMU_PENDING)
            st->state = EMU_RUNNING;
        unlock();
        if (!atomic_load(&st->cancel))
            execute(st, conn);
    }
    PQfinish(conn);
    lock();
    if (!emu_state_terminal(st->state)) {
        st->state = st->err_code ? EMU_FAILED : EMU_SUCCEEDED;
        if (st->err_code && strcmp(st->err_code, "CANCELLED") == 0 && atomic_load(&st->cancel))
            st->state = EMU_CANCELED;
        st->finished_ms = tp_now_ms();
    }
    st->thread_done = true;
    unlock();
    event_active(g.done_ev, EV_READ, 0);
    return NULL;
}

emu_stmt_t *emu_stmt_start(char *sql, char **values, int nvalues, const char *schema,
                           char *unbound, emu_format_t fmt, emu_disp_t disp, int64_t row_limit,
                           int64_t byte_limit)
{
    emu_stmt_t *st = tp_xcalloc(1, sizeof *st);
    st->magic = EMU_STMT_MAGIC;
    char hex[40];
    random_hex(hex, 16);
    snprintf(st->id, sizeof st->id, "01f%.5s-%.4s-%.4s-%.4s-%.12s", hex, hex + 5, hex + 9,
             hex + 13, hex + 17);
    st->sql = sql;
    st->param_values = values;
    st->nparams = nvalues;
    st->schema = schema ? tp_xstrdup(schema) : NULL;
    st->unbound_param = unbound;
    st->format = fmt;
    st->disp = disp;
    st->row_limit = row_limit;
    st->byte_limit = byte_limit;
    st->state = EMU_PENDING;
    atomic_init(&st->cancel, false);
    st->created_ms = tp_now_ms();
    st->next = g.stmts;
    g.stmts = st;
    if (pthread_create(&st->thread, NULL, worker_main, st) != 0) {
        set_error(st, "TEMPORARILY_UNAVAILABLE", NULL, "cannot start a worker thread");
        st->state = EMU_FAILED;
        st->thread_done = true;
        st->joined = true;
        st->finished_ms = tp_now_ms();
    } else {
        st->thread_started = true;
        g.live_workers++;
    }
    return st;
}

emu_stmt_t *emu_stmt_find(const char *id)
{
    for (emu_stmt_t *st = g.stmts; st; st = st->next)
        if (strcmp(st->id, id) == 0)
            return st;
    return NULL;
}

static void answer_waiters(emu_stmt_t *st)
{
    while (st->waiters) {
        emu_defer_t *d = st->waiters;
        st->waiters = d->next;
        d->next = NULL;
        emu_defer_answer(d);
    }
}

void emu_stmt_cancel(emu_stmt_t *st, bool close)
{
    lock();
    if (!emu_state_terminal(st->state)) {
        st->state = close ? EMU_CLOSED : EMU_CANCELED;
        st->finished_ms = tp_now_ms();
        atomic_store(&st->cancel, true);
    } else if (close && st->state != EMU_CLOSED) {
        st->state = EMU_CLOSED;
    }
    bool free_now = st->state == EMU_CLOSED && st->thread_done;
    unlock();
    if (free_now)
        free_result(st);
    answer_waiters(st);
}

static void free_stmt(emu_stmt_t *st)
{
    free_result(st);
    for (int j = 0; j < st->ncols; j++)
        emu_column_free(&st->cols[j]);
    free(st->cols);
    for (int i = 0; i < st->nparams; i++)
        free(st->param_values[i]);
    free(st->param_values);
    free(st->sql);
    free(st->schema);
    free(st->unbound_param);
    free(st->err_code);
    free(st->err_msg);
    free(st->sql_state);
    st->magic = 0;
    free(st);
}

void emu_stmt_reap(void)
{
    for (emu_stmt_t *st = g.stmts; st; st = st->next) {
        lock();
        bool done = st->thread_done && !st->joined;
        emu_state_t s = st->state;
        unlock();
        if (!done)
            continue;
        pthread_join(st->thread, NULL);
        st->joined = true;
        g.live_workers--;
        if (s != EMU_SUCCEEDED)
            free_result(st);
        answer_waiters(st);
    }
}

void emu_stmt_janitor(void)
{
    int64_t now = tp_now_ms();
    int64_t wall = tp_wall_ms();
    emu_stmt_t **pp = &g.stmts;
    while (*pp) {
        emu_stmt_t *st = *pp;
        lock();
        emu_state_t s = st->state;
        unlock();
        if (st->joined && emu_state_terminal(s)) {
            if (s == EMU_SUCCEEDED && now - st->finished_ms >= g.result_ttl_s * 1000) {
                lock();
                st->state = EMU_CLOSED;
                unlock();
                free_result(st);
            }
            if (now - st->finished_ms >= g.forget_ttl_s * 1000 && st->waiters == NULL) {
                *pp = st->next;
                free_stmt(st);
                continue;
            }
        }
        /* drop links that expired more than a minute ago */
        emu_link_t **lp = &st->links;
        while (*lp) {
            if ((*lp)->expires_wall_ms + 60000 < wall) {
                emu_link_t *l = *lp;
                *lp = l->next;
                free(l);
            } else {
                lp = &(*lp)->next;
            }
        }
        pp = &st->next;
    }
}

void emu_stmt_shutdown(void)
{
    for (emu_stmt_t *st = g.stmts; st; st = st->next)
        atomic_store(&st->cancel, true);
    while (g.stmts) {
        emu_stmt_t *st = g.stmts;
        g.stmts = st->next;
        if (st->thread_started && !st->joined)
            pthread_join(st->thread, NULL);
        while (st->waiters) {
            emu_defer_t *d = st->waiters;
            st->waiters = d->next;
            emu_defer_free(d);
        }
        free_stmt(st);
    }
}

/* ---- JSON answers ---- */

static emu_link_t *new_link(emu_stmt_t *st, int idx)
{
    emu_link_t *l = tp_xcalloc(1, sizeof *l);
    random_hex(l->token, 16);
    random_hex(l->key, 16);
    l->chunk = idx;
    if (g.faults.expire_links != 0) {
        l->expires_wall_ms = tp_wall_ms() - 1000;
        if (g.faults.expire_links > 0)
            g.faults.expire_links--;
    } else {
        l->expires_wall_ms = tp_wall_ms() + g.link_ttl_s * 1000;
    }
    l->next = st->links;
    st->links = l;
    return l;
}

static void chunk_common(emu_stmt_t *st, int idx, tp_buf_t *out, bool bytes)
{
    const emu_chunk_t *c = &st->chunks[idx];
    tp_buf_printf(out, "\"chunk_index\":%d,\"row_offset\":%lld,\"row_count\":%lld", idx,
                  (long long)c->row_offset, (long long)c->row_count);
    if (bytes)
        tp_buf_printf(out, ",\"byte_count\":%zu", c->len);
}

static void next_fields(emu_stmt_t *st, int idx, tp_buf_t *out)
{
    if (idx + 1 < st->nchunks)
        tp_buf_printf(out,
                      ",\"next_chunk_index\":%d,\"next_chunk_internal_link\":"
                      "\"/api/2.0/sql/statements/%s/result/chunks/%d\"",
                      idx + 1, st->id, idx + 1);
}

void emu_stmt_chunk_json(emu_stmt_t *st, int idx, const char *host, tp_buf_t *out)
{
    tp_buf_putc(out, '{');
    if (st->disp == EMU_INLINE) {
        chunk_common(st, idx, out, false);
        tp_buf_puts(out, ",\"data_array\":");
        tp_buf_append(out, st->chunks[idx].data, st->chunks[idx].len);
        next_fields(st, idx, out);
    } else {
        emu_link_t *l = new_link(st, idx);
        char exp[32];
        tp_rfc3339_format(l->expires_wall_ms, exp);
        chunk_common(st, idx, out, true);
        tp_buf_printf(out, ",\"external_links\":[{\"external_link\":\"http://%s%s%s/%s\","
                           "\"expiration\":\"%s\",",
                      host, EMU_LINK_PREFIX, st->id, l->token, exp);
        chunk_common(st, idx, out, true);
        next_fields(st, idx, out);
        tp_buf_printf(out, ",\"http_headers\":{\"%s\":\"%s\"}}]", EMU_LINK_HEADER, l->key);
    }
    tp_buf_putc(out, '}');
}

static void manifest_json(emu_stmt_t *st, tp_buf_t *out)
{
    static const char *const fmts[] = {"JSON_ARRAY", "CSV", "ARROW_STREAM"};
    tp_buf_printf(out, ",\"manifest\":{\"format\":\"%s\",\"schema\":{\"column_count\":%d",
                  fmts[st->format], st->ncols);
    if (st->ncols > 0) {
        tp_buf_puts(out, ",\"columns\":[");
        for (int j = 0; j < st->ncols; j++) {
            const emu_column_t *c = &st->cols[j];
            if (j > 0)
                tp_buf_putc(out, ',');
            tp_buf_puts(out, "{\"name\":");
            tp_buf_json_str(out, c->name);
            tp_buf_printf(out, ",\"type_text\":\"%s\",\"type_name\":\"%s\",\"position\":%d",
                          c->type_text, c->type_name, j);
            if (c->precision > 0)
                tp_buf_printf(out, ",\"type_precision\":%d,\"type_scale\":%d", c->precision,
                              c->scale);
            if (c->interval_type)
                tp_buf_printf(out, ",\"type_interval_type\":\"%s\"", c->interval_type);
            tp_buf_putc(out, '}');
        }
        tp_buf_putc(out, ']');
    }
    tp_buf_printf(out, "},\"total_chunk_count\":%d", st->nchunks);
    if (st->nchunks > 0) {
        tp_buf_puts(out, ",\"chunks\":[");
        for (int i = 0; i < st->nchunks; i++) {
            if (i > 0)
                tp_buf_putc(out, ',');
            tp_buf_putc(out, '{');
            chunk_common(st, i, out, st->disp == EMU_LINKS);
            tp_buf_putc(out, '}');
        }
        tp_buf_putc(out, ']');
    }
    tp_buf_printf(out, ",\"total_row_count\":%lld", (long long)st->total_rows);
    if (st->disp == EMU_LINKS)
        tp_buf_printf(out, ",\"total_byte_count\":%lld", (long long)st->total_bytes);
    tp_buf_printf(out, ",\"truncated\":%s}", st->truncated ? "true" : "false");
}

void emu_stmt_response(emu_stmt_t *st, const char *host, tp_buf_t *out)
{
    emu_state_t s = emu_stmt_state(st);
    tp_buf_printf(out, "{\"statement_id\":\"%s\",\"status\":{\"state\":\"%s\"", st->id,
                  emu_state_name(s));
    if (s == EMU_FAILED) {
        tp_buf_printf(out, ",\"error\":{\"error_code\":\"%s\",\"message\":", st->err_code);
        tp_buf_json_str(out, st->err_msg);
        tp_buf_putc(out, '}');
        if (st->sql_state)
            tp_buf_printf(out, ",\"sql_state\":\"%s\"", st->sql_state);
    }
    tp_buf_putc(out, '}');
    if (s == EMU_SUCCEEDED) {
        manifest_json(st, out);
        tp_buf_puts(out, ",\"result\":");
        if (st->nchunks > 0)
            emu_stmt_chunk_json(st, 0, host, out);
        else
            tp_buf_puts(out, "{}");
    }
    tp_buf_putc(out, '}');
}
