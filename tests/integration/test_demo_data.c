/* Integration test of the demo lakehouse and demo definitions (DESIGN §14):
 * loads sql/warehouse (without the bench file) with scripts/load-warehouse.sh
 * into a fresh database, checks its shape and a recomputed moving average, then
 * copies every sync job's result (its warehouse SQL translated the way the
 * emulator does: demo.iot.x -> iot.x, backticks -> double quotes) into a second
 * database, into tables typed by DESIGN §7's mapping, and runs each dataset's
 * Postgres SQL (after :name -> $n) there as a prepared statement, and each
 * warehouse body on the warehouse database. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "../tp_test.h"
#include "tidepool/defs.h"
#include "tidepool/util.h"

static const char *g_wh;      /* the lakehouse database */
static char *g_pg;            /* the synced Postgres side */
static tp_defs_set_t *g_defs; /* sql/sync + sql/queries */
static char g_first_day[16], g_last_day[16];

static const char *root(void)
{
    return getenv("TP_ROOT") ? getenv("TP_ROOT") : ".";
}

static PGconn *connect_or_fail(const char *dsn)
{
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK)
        tp_test_fail(__FILE__, __LINE__, "connect: %s", PQerrorMessage(c));
    return c;
}

static long long sql_int(const char *dsn, const char *sql)
{
    char *v = tp_test_sql(dsn, sql);
    long long n = v ? atoll(v) : -1;
    free(v);
    return n;
}

/* Replaces every occurrence of from with to (a new string). */
static char *replace_all(const char *s, const char *from, const char *to)
{
    tp_buf_t b = {0};
    size_t fl = strlen(from);
    for (const char *p = s, *hit; ; p = hit + fl) {
        hit = strstr(p, from);
        if (hit == NULL) {
            tp_buf_puts(&b, p);
            break;
        }
        tp_buf_append(&b, p, (size_t)(hit - p));
        tp_buf_puts(&b, to);
    }
    return tp_buf_steal(&b);
}

/* Warehouse SQL as the emulator's dialect bridge runs it on Postgres. */
static char *emulate_dialect(const char *sql)
{
    char *a = replace_all(sql, "demo.iot.", "iot.");
    char *b = replace_all(a, "`", "\"");
    free(a);
    return b;
}

static void warehouse_loads_and_has_demo_shape(void)
{
    g_wh = tp_test_dsn();
    char *cmd = tp_xasprintf("'%s/scripts/load-warehouse.sh' '%s' 2>&1", root(), g_wh);
    char *out = NULL;
    int64_t t0 = tp_now_ms();
    int rc = tp_test_cmd(cmd, &out);
    printf("# load-warehouse.sh took %lld ms\n", (long long)(tp_now_ms() - t0));
    CHECK_MSG(rc == 0, "load-warehouse.sh exited %d: %s", rc, out ? out : "");
    free(out);
    free(cmd);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(*) FROM iot.silver_users"), 1000);
    CHECK(sql_int(g_wh, "SELECT count(*) FROM iot.silver_sensors") >= 3000000);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(*) FROM (SELECT user_id FROM iot.gold_user_daily_metrics "
                               "GROUP BY 1 HAVING count(*) = 90) x"),
                 1000);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(DISTINCT user_id) FROM iot.silver_sensors"), 1000);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT sum(users) FROM iot.gold_cohort_risk"), 1000);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(*) FROM iot.device_assignments"), 1333);
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(*) FROM pg_tables WHERE schemaname = 'iot' AND "
                               "tablename = 'bench_daily'"), 0);
    /* every reading lands on a day of the configured range */
    CHECK_INT_EQ(sql_int(g_wh, "SELECT count(*) FROM iot.silver_sensors s, iot.demo_config c WHERE "
                               "(s.\"timestamp\" AT TIME ZONE 'UTC')::date NOT BETWEEN c.first_day "
                               "AND c.last_day"),
                 0);
    char *v = tp_test_sql(g_wh, "SELECT first_day::text FROM iot.demo_config");
    snprintf(g_first_day, sizeof g_first_day, "%s", v ? v : "");
    free(v);
    v = tp_test_sql(g_wh, "SELECT last_day::text FROM iot.demo_config");
    snprintf(g_last_day, sizeof g_last_day, "%s", v ? v : "");
    free(v);
}

/* Deterministic: a second load with the same anchor gives identical rows. */
static void load_is_idempotent_and_deterministic(void)
{
    const char *sum_sql = "SELECT sum(num_steps)::text || '/' || sum(hashtext(device_id::text || "
                          "\"timestamp\"::text))::text FROM iot.silver_sensors WHERE user_id % 97 = 0";
    char *before = tp_test_sql(g_wh, sum_sql);
    char *cmd = tp_xasprintf("'%s/scripts/load-warehouse.sh' '%s' --anchor %s 2>&1", root(), g_wh,
                             g_last_day);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    CHECK_MSG(rc == 0, "second load exited %d: %s", rc, out ? out : "");
    char *after = tp_test_sql(g_wh, sum_sql);
    CHECK_STR_EQ(after, before);
    free(out);
    free(cmd);
    free(before);
    free(after);
    /* a bad argument is refused before touching the database */
    cmd = tp_xasprintf("'%s/scripts/load-warehouse.sh' '%s' --anchor yesterday 2>&1", root(), g_wh);
    rc = tp_test_cmd(cmd, &out);
    CHECK_INT_EQ(rc, 2);
    CHECK_CONTAINS(out, "--anchor must be YYYY-MM-DD");
    free(out);
    free(cmd);
}

/* The gold moving averages match a recomputation from the raw readings. */
static void moving_averages_match_recomputation(void)
{
    PGconn *c = connect_or_fail(g_wh);
    PGresult *raw = PQexec(c, "SELECT (\"timestamp\" AT TIME ZONE 'UTC')::date, sum(num_steps), "
                              "sum(calories_burnt) FROM iot.silver_sensors WHERE user_id = 417 "
                              "GROUP BY 1 ORDER BY 1");
    PGresult *gold = PQexec(c, "SELECT day, steps, steps_ma7, calories_ma7 FROM "
                               "iot.gold_user_daily_metrics WHERE user_id = 417 ORDER BY day");
    CHECK(PQresultStatus(raw) == PGRES_TUPLES_OK && PQresultStatus(gold) == PGRES_TUPLES_OK);
    CHECK_INT_EQ(PQntuples(raw), 90);
    CHECK_INT_EQ(PQntuples(gold), 90);
    double steps[90], cal[90];
    for (int i = 0; i < 90 && i < PQntuples(raw) && i < PQntuples(gold); i++) {
        steps[i] = atof(PQgetvalue(raw, i, 1));
        cal[i] = atof(PQgetvalue(raw, i, 2));
        CHECK_STR_EQ(PQgetvalue(gold, i, 0), PQgetvalue(raw, i, 0));
        CHECK_INT_EQ(atoll(PQgetvalue(gold, i, 1)), (long long)steps[i]);
        double s = 0, k = 0;
        int n = 0;
        for (int j = i; j >= 0 && j > i - 7; j--, n++)
            s += steps[j], k += cal[j];
        double want_s = s / n, want_c = k / n;
        double got_s = atof(PQgetvalue(gold, i, 2)), got_c = atof(PQgetvalue(gold, i, 3));
        CHECK_MSG(fabs(got_s - want_s) <= 0.051, "day %d steps_ma7 %f != %f", i, got_s, want_s);
        CHECK_MSG(fabs(got_c - want_c) <= 0.2, "day %d calories_ma7 %f != %f", i, got_c, want_c);
    }
    PQclear(raw);
    PQclear(gold);
    PQfinish(c);
}

static void demo_definitions_load(void)
{
    g_defs = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    char *jd = tp_xasprintf("%s/sql/sync", root()), *qd = tp_xasprintf("%s/sql/queries", root());
    CHECK(tp_defs_load_jobs(g_defs, jd, &diag));
    CHECK(tp_defs_load_datasets(g_defs, qd, &diag));
    CHECK(tp_defs_check_requires(g_defs, g_defs, &diag));
    for (size_t i = 0; i < diag.n; i++)
        CHECK_MSG(false, "%s", diag.msgs[i]);
    tp_defs_diag_free(&diag);
    free(jd);
    free(qd);
}

/* DESIGN §7: the Postgres type a synced column gets, from the emulator's column
 * type (the emulator reports INT, LONG, DOUBLE, ... for these Postgres types). */
static const char *synced_type(Oid oid)
{
    switch (oid) {
    case 16: return "boolean";
    case 20: return "bigint";
    case 21: return "smallint";
    case 23: return "integer";
    case 25: return "text";
    case 700: return "real";
    case 701: return "double precision";
    case 1082: return "date";
    case 1184: return "timestamptz";
    case 1114: return "timestamp";
    default: return NULL;
    }
}

/* A one-job sync: create the target from the result's columns, COPY the rows. */
static void sync_job(PGconn *wh, PGconn *pg, const tp_defs_job_t *j)
{
    char *sql = emulate_dialect(j->body.sql);
    char *nowm = replace_all(sql, ":watermark", "NULL");
    char *probe = tp_xasprintf("SELECT * FROM (%s) q LIMIT 0", nowm);
    PGresult *r = PQexec(wh, probe);
    CHECK_MSG(PQresultStatus(r) == PGRES_TUPLES_OK, "job %s: %s", j->name, PQerrorMessage(wh));
    tp_buf_t ddl = {0};
    tp_buf_printf(&ddl, "CREATE SCHEMA IF NOT EXISTS %s; CREATE TABLE %s (", j->target_schema,
                  j->target);
    for (int i = 0; i < PQnfields(r); i++) {
        const char *t = synced_type(PQftype(r, i));
        CHECK_MSG(t != NULL, "job %s: column %s has unmapped type %u", j->name, PQfname(r, i),
                  PQftype(r, i));
        tp_buf_printf(&ddl, "%s\"%s\" %s", i ? ", " : "", PQfname(r, i), t ? t : "text");
    }
    if (j->n_key > 0) {
        tp_buf_puts(&ddl, ", PRIMARY KEY (");
        for (size_t k = 0; k < j->n_key; k++)
            tp_buf_printf(&ddl, "%s%s", k ? ", " : "", j->key[k]);
        tp_buf_puts(&ddl, ")");
    }
    tp_buf_puts(&ddl, ")");
    PQclear(r);
    r = PQexec(pg, ddl.data);
    CHECK_MSG(PQresultStatus(r) == PGRES_COMMAND_OK, "job %s: %s", j->name, PQerrorMessage(pg));
    PQclear(r);

    char *copy_out = tp_xasprintf("COPY (%s) TO STDOUT", nowm);
    char *copy_in = tp_xasprintf("COPY %s FROM STDIN", j->target);
    PGresult *ro = PQexec(wh, copy_out), *ri = PQexec(pg, copy_in);
    bool ok = PQresultStatus(ro) == PGRES_COPY_OUT && PQresultStatus(ri) == PGRES_COPY_IN;
    CHECK_MSG(ok, "job %s: copy: %s %s", j->name, PQerrorMessage(wh), PQerrorMessage(pg));
    PQclear(ro);
    PQclear(ri);
    if (ok) {
        char *buf;
        int n;
        while ((n = PQgetCopyData(wh, &buf, 0)) > 0) {
            CHECK(PQputCopyData(pg, buf, n) == 1);
            PQfreemem(buf);
        }
        CHECK(PQputCopyEnd(pg, NULL) == 1);
        while ((r = PQgetResult(wh)) != NULL) {
            CHECK(PQresultStatus(r) == PGRES_COMMAND_OK);
            PQclear(r);
        }
        while ((r = PQgetResult(pg)) != NULL) {
            CHECK_MSG(PQresultStatus(r) == PGRES_COMMAND_OK, "job %s: %s", j->name,
                      PQerrorMessage(pg));
            PQclear(r);
        }
    }
    free(copy_out);
    free(copy_in);
    tp_buf_free(&ddl);
    free(probe);
    free(nowm);
    free(sql);
}

static void sync_jobs_run_on_the_warehouse(void)
{
    g_pg = tp_test_new_db("test_demo_data_pg");
    CHECK(g_pg != NULL && g_defs != NULL);
    if (g_pg == NULL || g_defs == NULL)
        return;
    PGconn *wh = connect_or_fail(g_wh), *pg = connect_or_fail(g_pg);
    for (size_t i = 0; i < g_defs->n_jobs; i++)
        sync_job(wh, pg, &g_defs->jobs[i]);
    CHECK_INT_EQ(sql_int(g_pg, "SELECT count(*) FROM iot.users"), 1000);
    CHECK_INT_EQ(sql_int(g_pg, "SELECT count(*) FROM iot.user_daily_metrics"), 90000);
    CHECK_INT_EQ(sql_int(g_pg, "SELECT sum(users) FROM iot.cohort_risk"), 1000);
    /* the incremental body with a watermark set returns only newer days */
    const tp_defs_job_t *dm = tp_defs_job_find(g_defs, "daily_metrics");
    if (dm != NULL) {
        char *sql = emulate_dialect(dm->body.sql);
        char *wm = tp_xasprintf("'%s 12:00:00'", g_last_day);
        char *q1 = replace_all(sql, ":watermark", wm);
        char *q = tp_xasprintf("SELECT count(*) FROM (%s) q", q1);
        CHECK_INT_EQ(sql_int(g_wh, q), 1000); /* only the last day's rows */
        free(q), free(q1), free(wm), free(sql);
    }
    PQfinish(wh);
    PQfinish(pg);
}

/* Prepares body (already in Postgres syntax with $n) with its params' types,
 * runs it with values, returns the result (caller clears) or NULL. */
static PGresult *run_prepared(PGconn *c, const char *name, const char *sql,
                              const tp_defs_dataset_t *d, const tp_defs_body_t *b,
                              const char *const *values)
{
    Oid types[16];
    const char *vals[16];
    for (size_t i = 0; i < b->n_names && i < 16; i++) {
        types[i] = tp_defs_type_oid(d->params[b->index[i]].type);
        vals[i] = values[b->index[i]];
    }
    PGresult *r = PQprepare(c, name, sql, (int)b->n_names, types);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    CHECK_MSG(ok, "prepare %s: %s", name, PQerrorMessage(c));
    PQclear(r);
    if (!ok)
        return NULL;
    r = PQexecPrepared(c, name, (int)b->n_names, vals, NULL, NULL, 0);
    CHECK_MSG(PQresultStatus(r) == PGRES_TUPLES_OK, "run %s: %s", name, PQerrorMessage(c));
    return r;
}

/* Runs dataset name with values (indexed like its params) on Postgres and on
 * the warehouse (where it has those bodies); checks the row counts. */
static void run_dataset(PGconn *pg, PGconn *wh, const char *name, const char *const *values,
                        int want_rows)
{
    const tp_defs_dataset_t *d = tp_defs_dataset_find(g_defs, name);
    CHECK_MSG(d != NULL, "dataset %s missing", name);
    if (d == NULL)
        return;
    for (size_t i = 0; i < d->n_params; i++) {
        tp_defs_value_t v;
        const char *why = NULL;
        CHECK_MSG(tp_defs_param_parse(&d->params[i], values[i], &v, &why), "%s.%s: %s", name,
                  d->params[i].name, why);
    }
    static int seq;
    char stmt[64];
    if (d->has_pg) {
        snprintf(stmt, sizeof stmt, "pg_%s_%d", name, ++seq);
        PGresult *r = run_prepared(pg, stmt, d->pg.sql, d, &d->pg, values);
        CHECK_MSG(r != NULL && PQntuples(r) == want_rows, "%s on Postgres: %d rows, want %d",
                  name, r ? PQntuples(r) : -1, want_rows);
        PQclear(r);
    }
    if (d->has_wh) {
        /* the emulator's bridge: three-part names, backticks, :name -> $n */
        char *sql = emulate_dialect(d->wh.sql);
        tp_defs_body_t b = {0};
        char err[200];
        int line = 0;
        bool ok = tp_defs_scan_body(sql, true, true, &b, &line, err, sizeof err);
        CHECK_MSG(ok, "%s warehouse body: %d: %s", name, line, err);
        if (ok) {
            b.index = tp_xcalloc(b.n_names + 1, sizeof *b.index);
            for (size_t i = 0; i < b.n_names; i++)
                b.index[i] = (size_t)tp_defs_param_find(d, b.names[i]);
            snprintf(stmt, sizeof stmt, "wh_%s_%d", name, ++seq);
            PGresult *r = run_prepared(wh, stmt, b.sql, d, &b, values);
            CHECK_MSG(r != NULL && PQntuples(r) == want_rows, "%s on the warehouse: %d rows, want %d",
                      name, r ? PQntuples(r) : -1, want_rows);
            PQclear(r);
        }
        tp_defs_body_free(&b);
        free(sql);
    }
}

static void datasets_run_against_synced_tables(void)
{
    if (g_pg == NULL || g_defs == NULL)
        return;
    PGconn *pg = connect_or_fail(g_pg), *wh = connect_or_fail(g_wh);
    run_dataset(pg, wh, "users", NULL, 1000);
    run_dataset(pg, wh, "daily_metrics", (const char *[]){"3", g_first_day, g_last_day}, 90);
    run_dataset(pg, wh, "daily_metrics", (const char *[]){"1000", g_last_day, g_last_day}, 1);
    run_dataset(pg, wh, "cohort_risk", (const char *[]){"cholesterol"}, 3);
    char since[40], until[40];
    snprintf(since, sizeof since, "%sT00:00:00Z", g_first_day);
    snprintf(until, sizeof until, "%sT00:00:00Z", g_last_day);
    /* user 3 switches to watch 32 on day 45: 45 days x 36 readings on watch 31 */
    run_dataset(pg, wh, "sensor_readings", (const char *[]){"3", "31", since, until}, 45 * 36);
    run_dataset(pg, wh, "sensor_readings", (const char *[]){"3", "32", since, until}, 44 * 36);
    /* cohorts by weight band: every band, in order, summing to all users */
    const tp_defs_dataset_t *cr = tp_defs_dataset_find(g_defs, "cohort_risk");
    if (cr != NULL) {
        const char *vals[] = {"weight"};
        PGresult *r = run_prepared(pg, "cohort_weight", cr->pg.sql, cr, &cr->pg, vals);
        long long users = 0;
        for (int i = 0; r != NULL && i < PQntuples(r); i++) {
            users += atoll(PQgetvalue(r, i, 1));
            if (i > 0)
                CHECK(atoi(PQgetvalue(r, i, 0)) > atoi(PQgetvalue(r, i - 1, 0)));
        }
        CHECK_INT_EQ(users, 1000);
        CHECK(r != NULL && PQntuples(r) >= 5);
        PQclear(r);
    }
    PQfinish(pg);
    PQfinish(wh);
}

int main(void)
{
    if (tp_test_admin_dsn() == NULL) {
        tp_test_skip("test_demo_data", "no harness Postgres (PGHOST/PGPORT unset)");
        return tp_test_done();
    }
    TP_RUN(warehouse_loads_and_has_demo_shape);
    TP_RUN(load_is_idempotent_and_deterministic);
    TP_RUN(moving_averages_match_recomputation);
    TP_RUN(demo_definitions_load);
    TP_RUN(sync_jobs_run_on_the_warehouse);
    TP_RUN(datasets_run_against_synced_tables);
    tp_defs_set_free(g_defs);
    free(g_pg);
    return tp_test_done();
}
