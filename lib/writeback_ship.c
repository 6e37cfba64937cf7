/* Write-back outbox shipper: turns unshipped tidepool.writeback_outbox rows into one
 * idempotent MERGE INTO statement for the warehouse (Databricks SQL with :named,
 * typed parameters) and records the outcome (shipped, or an attempt with backoff).
 *
 * Order per key: a batch takes, from the oldest unshipped rows of one table, the
 * earliest change of each key (DISTINCT ON pk), so the MERGE never sees one key twice
 * and a key's later change waits until the earlier one is marked shipped. A key whose
 * earliest change is backing off holds back its later changes, not other keys.
 * Idempotency: rows carry full images; the MERGE updates-or-inserts them, and deletes
 * a key if present, so re-shipping after a crash changes nothing.
 * It does not talk to the warehouse (the daemon does, with tp_wh_submit) and it
 * blocks on libpq: run it off any event loop. */
#include "tidepool/writeback.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char TP_WB_BACKLOG_SQL[] =
    "SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS NULL";

const char TP_WB_DUE_IN_SQL[] =
    "SELECT (extract(epoch FROM min(next_attempt_at) - now()) * 1000)::bigint "
    "FROM tidepool.writeback_outbox WHERE shipped_at IS NULL";

/* One row per (outbox row, column) of the batch, in outbox id order. */
static const char SELECT_SQL[] =
    "WITH head AS (SELECT table_name, warehouse_table FROM tidepool.writeback_outbox "
    "WHERE shipped_at IS NULL ORDER BY id LIMIT 1), "
    "win AS (SELECT o.* FROM tidepool.writeback_outbox o JOIN head h ON h.table_name = "
    "o.table_name AND h.warehouse_table = o.warehouse_table WHERE o.shipped_at IS NULL "
    "ORDER BY o.id LIMIT $1::integer), "
    "firsts AS (SELECT DISTINCT ON (pk) * FROM win ORDER BY pk, id) "
    "SELECT f.id::text, f.op, f.table_name, f.warehouse_table, e.key, e.value "
    "FROM firsts f CROSS JOIN LATERAL jsonb_each_text(COALESCE(f.row, f.pk)) e "
    "WHERE f.next_attempt_at <= now() ORDER BY f.id, e.key";

static const char DONE_SQL[] =
    "UPDATE tidepool.writeback_outbox SET attempts = attempts + 1, statement_id = $3::text, "
    "shipped_at = CASE WHEN $2::boolean THEN now() END, "
    "last_error = CASE WHEN $2::boolean THEN NULL ELSE left($4::text, 2000) END, "
    "next_attempt_at = CASE WHEN $2::boolean THEN next_attempt_at ELSE now() + "
    "make_interval(secs => least(300, power(2, attempts)) * (0.75 + random() / 2)) END "
    "WHERE id = ANY ($1::bigint[]) AND shipped_at IS NULL";

void tp_wb_batch_free(tp_wb_batch_t *b)
{
    if (!b)
        return;
    if (b->magic != TP_WB_BATCH_MAGIC)
        abort();
    for (size_t i = 0; i < b->nparams; i++) {
        free(b->params[i].name);
        free(b->params[i].value);
        free(b->params[i].type);
    }
    free(b->params);
    free(b->ids);
    free(b->table);
    free(b->warehouse_table);
    free(b->sql);
    b->magic = 0;
    free(b);
}

/* Databricks type of a column for a typed parameter. */
static char *wh_type(const tp_wb_col_t *c)
{
    static const char *const names[] = {
        [TP_WB_INT2] = "SMALLINT",         [TP_WB_INT4] = "INT",
        [TP_WB_INT8] = "BIGINT",           [TP_WB_NUMERIC] = "DECIMAL(38,18)",
        [TP_WB_FLOAT] = "DOUBLE",          [TP_WB_BOOL] = "BOOLEAN",
        [TP_WB_TEXT] = "STRING",           [TP_WB_DATE] = "DATE",
        [TP_WB_TIMESTAMPTZ] = "TIMESTAMP", [TP_WB_TIMESTAMP] = "TIMESTAMP_NTZ",
        [TP_WB_UUID] = "STRING",           [TP_WB_JSON] = "STRING",
        [TP_WB_OTHER] = "STRING",
    };
    int p, sc;
    if (c->kind == TP_WB_NUMERIC && sscanf(c->type_sql, "numeric(%d,%d)", &p, &sc) == 2)
        return tp_xasprintf("DECIMAL(%d,%d)", p, sc);
    if (c->kind == TP_WB_FLOAT && strcmp(c->type_sql, "real") == 0)
        return tp_xstrdup("FLOAT");
    return tp_xstrdup(names[c->kind]);
}

static void put_bt(tp_buf_t *b, const char *name)
{
    tp_buf_putc(b, '`');
    for (; *name; name++) {
        if (*name == '`')
            tp_buf_putc(b, '`');
        tp_buf_putc(b, *name);
    }
    tp_buf_putc(b, '`');
}

typedef struct srcrow {
    int64_t id;
    bool del;
    char **vals; /* per table column, NULL = absent/NULL */
} srcrow_t;

static void build_merge(tp_wb_batch_t *b, const tp_wb_table_t *t, srcrow_t *rows, size_t n)
{
    tp_buf_t q = {0};
    size_t cap = n * ((size_t)t->ncols + 1);
    b->params = tp_xcalloc(cap, sizeof *b->params);
    tp_buf_puts(&q, "MERGE INTO ");
    char *parts = tp_xstrdup(b->warehouse_table), *save = NULL;
    int np = 0;
    for (char *p = strtok_r(parts, ".", &save); p; p = strtok_r(NULL, ".", &save)) {
        if (np++)
            tp_buf_putc(&q, '.');
        put_bt(&q, p);
    }
    free(parts);
    tp_buf_puts(&q, " AS t USING (");
    for (size_t r = 0; r < n; r++) {
        tp_buf_puts(&q, r ? " UNION ALL SELECT " : "SELECT ");
        tp_wb_param_t *op = &b->params[b->nparams++];
        op->name = tp_xasprintf("op%zu", r);
        op->value = tp_xstrdup(rows[r].del ? "delete" : "upsert");
        op->type = tp_xstrdup("STRING");
        tp_buf_printf(&q, ":%s AS tp_op", op->name);
        for (int c = 0; c < t->ncols; c++) {
            tp_wb_param_t *p = &b->params[b->nparams++];
            p->name = tp_xasprintf("p%zu_%d", r, c);
            p->value = rows[r].vals[c] ? tp_xstrdup(rows[r].vals[c]) : NULL;
            p->type = wh_type(&t->cols[c]);
            tp_buf_printf(&q, ", :%s AS ", p->name);
            put_bt(&q, t->cols[c].name);
        }
    }
    tp_buf_puts(&q, ") AS s ON ");
    for (int i = 0; i < t->npk; i++) {
        if (i)
            tp_buf_puts(&q, " AND ");
        tp_buf_puts(&q, "t.");
        put_bt(&q, t->cols[t->pk[i]].name);
        tp_buf_puts(&q, " = s.");
        put_bt(&q, t->cols[t->pk[i]].name);
    }
    tp_buf_puts(&q, " WHEN MATCHED AND s.tp_op = 'delete' THEN DELETE");
    if (t->ncols > t->npk) {
        tp_buf_puts(&q, " WHEN MATCHED THEN UPDATE SET ");
        int k = 0;
        for (int c = 0; c < t->ncols; c++) {
            if (t->cols[c].pk_pos >= 0)
                continue;
            tp_buf_puts(&q, k++ ? ", " : "");
            put_bt(&q, t->cols[c].name);
            tp_buf_puts(&q, " = s.");
            put_bt(&q, t->cols[c].name);
        }
    }
    tp_buf_puts(&q, " WHEN NOT MATCHED AND s.tp_op <> 'delete' THEN INSERT (");
    for (int c = 0; c < t->ncols; c++) {
        tp_buf_puts(&q, c ? ", " : "");
        put_bt(&q, t->cols[c].name);
    }
    tp_buf_puts(&q, ") VALUES (");
    for (int c = 0; c < t->ncols; c++) {
        tp_buf_puts(&q, c ? ", s." : "s.");
        put_bt(&q, t->cols[c].name);
    }
    tp_buf_puts(&q, ")");
    b->sql = tp_buf_steal(&q);
}

static int col_of(const tp_wb_table_t *t, const char *name)
{
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->cols[i].name, name) == 0)
            return i;
    return -1;
}

int tp_wb_ship_next(PGconn *conn, const tp_wb_schema_t *s, int max_rows, tp_wb_batch_t **out,
                    char *err, size_t errlen)
{
    *out = NULL;
    char lim[16];
    snprintf(lim, sizeof lim, "%d", max_rows > 0 ? max_rows : 100);
    const char *pv[1] = {lim};
    PGresult *r = PQexecParams(conn, SELECT_SQL, 1, NULL, pv, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "reading the write-back outbox: %s", PQresultErrorMessage(r));
        PQclear(r);
        return -1;
    }
    int n = PQntuples(r);
    if (n == 0) {
        PQclear(r);
        return 0;
    }
    const tp_wb_table_t *t = tp_wb_find(s, PQgetvalue(r, 0, 2));
    if (!t) {
        snprintf(err, errlen, "the write-back outbox holds changes of %s, which is not @writable",
                 PQgetvalue(r, 0, 2));
        PQclear(r);
        return -1;
    }
    srcrow_t *rows = tp_xcalloc((size_t)n, sizeof *rows);
    size_t nrows = 0;
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
        if (nrows == 0 || rows[nrows - 1].id != id) {
            srcrow_t *row = &rows[nrows++];
            row->id = id;
            row->del = strcmp(PQgetvalue(r, i, 1), "delete") == 0;
            row->vals = tp_xcalloc((size_t)t->ncols, sizeof *row->vals);
        }
        int c = col_of(t, PQgetvalue(r, i, 4));
        if (c >= 0 && !PQgetisnull(r, i, 5)) /* columns dropped since: ignored */
            rows[nrows - 1].vals[c] = tp_xstrdup(PQgetvalue(r, i, 5));
    }
    tp_wb_batch_t *b = tp_xcalloc(1, sizeof *b);
    b->magic = TP_WB_BATCH_MAGIC;
    b->table = tp_xstrdup(PQgetvalue(r, 0, 2));
    b->warehouse_table = tp_xstrdup(PQgetvalue(r, 0, 3));
    b->ids = tp_xcalloc(nrows, sizeof *b->ids);
    b->nids = nrows;
    for (size_t i = 0; i < nrows; i++)
        b->ids[i] = rows[i].id;
    PQclear(r);
    build_merge(b, t, rows, nrows);
    for (size_t i = 0; i < nrows; i++) {
        for (int c = 0; c < t->ncols; c++)
            free(rows[i].vals[c]);
        free(rows[i].vals);
    }
    free(rows);
    *out = b;
    return 1;
}

bool tp_wb_ship_done(PGconn *conn, const tp_wb_batch_t *b, bool ok, const char *statement_id,
                     const char *error, char *err, size_t errlen)
{
    if (!b || b->magic != TP_WB_BATCH_MAGIC)
        abort();
    tp_buf_t ids = {0};
    tp_buf_putc(&ids, '{');
    for (size_t i = 0; i < b->nids; i++)
        tp_buf_printf(&ids, "%s%lld", i ? "," : "", (long long)b->ids[i]);
    tp_buf_putc(&ids, '}');
    const char *pv[4] = {ids.data, ok ? "true" : "false", statement_id,
                         ok ? NULL : (error ? error : "unknown error")};
    PGresult *r = PQexecParams(conn, DONE_SQL, 4, NULL, pv, NULL, NULL, 0);
    bool good = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!good)
        snprintf(err, errlen, "recording the write-back shipment: %s", PQresultErrorMessage(r));
    PQclear(r);
    tp_buf_free(&ids);
    return good;
}
