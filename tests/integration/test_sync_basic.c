/* tidepool-sync against the real emulator and Postgres: snapshot and
 * incremental correctness row for row (CSV and JSON_ARRAY paths), deletes by
 * flag and by reconcile, schema drift (added column added, changed type
 * refused), duplicate and NULL keys (snapshot and incremental), values that
 * do not fit their column and a warehouse type with no Postgres mapping
 * failing the job with the target left as it was, bad definitions reported
 * with file:line, bookkeeping rows. */
#include "sync_fixture.h"

static const char lake_sql[] =
    "CREATE SCHEMA src;"
    "CREATE TABLE src.readings (id int, user_id int, v double precision, name text, ts timestamptz,"
    " flag boolean, amount numeric(10,2), payload bytea, d date, big bigint);"
    "INSERT INTO src.readings SELECT i, i % 7, i * 1.5, 'name ' || i || E'\\t\"q\",\\\\ \\n x',"
    " timestamptz '2025-01-01 00:00:00+00' + i * interval '1 minute', i % 2 = 0, i * 0.25,"
    " decode(md5(i::text), 'hex'), date '2025-01-01' + i, i * 1000000000::bigint"
    " FROM generate_series(1, 250) i;"
    "UPDATE src.readings SET name = NULL, v = NULL, payload = NULL WHERE id % 50 = 0;"
    "UPDATE src.readings SET name = 'null' WHERE id = 7;"
    "UPDATE src.readings SET name = '' WHERE id = 8;"
    "CREATE TABLE src.events (id int, user_id int, val int, updated_at timestamptz, deleted boolean);"
    "INSERT INTO src.events SELECT i, i % 5, i * 10, timestamptz '2025-02-01 00:00:00+00' + i * interval '1 second',"
    " false FROM generate_series(1, 120) i;"
    "CREATE TABLE src.keyed (id int, v int);"
    "INSERT INTO src.keyed SELECT i, i FROM generate_series(1, 30) i;"
    "CREATE TABLE src.drift (id int, val int, updated_at timestamptz);"
    "INSERT INTO src.drift SELECT i, i, timestamptz '2025-03-01 00:00:00+00' + i * interval '1 second'"
    " FROM generate_series(1, 20) i;"
    "CREATE TABLE src.recon (id int, v int, updated_at timestamptz);"
    "INSERT INTO src.recon SELECT i, i, timestamptz '2025-04-01 00:00:00+00' + i * interval '1 second'"
    " FROM generate_series(1, 25) i;";

#define READINGS_SUM(tbl)                                                                        \
    "SELECT count(*) || ':' || md5(string_agg(concat_ws('|', id, user_id, v, coalesce(name, '<N>'), " \
    "ts, flag, amount, coalesce(encode(payload, 'hex'), '<N>'), d, big), ',' ORDER BY id)) FROM " tbl

#define EVENTS_SUM(tbl, where)                                                                   \
    "SELECT count(*) || ':' || coalesce(md5(string_agg(concat_ws('|', id, user_id, val, updated_at), ',' " \
    "ORDER BY id)), '') FROM " tbl " WHERE " where

static char *jobs;
static char *conf;

static void snapshot_csv_matches_warehouse(void)
{
    char *out = NULL;
    int rc = fx_once(conf, "readings", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    CHECK(fx_same(READINGS_SUM("src.readings"), READINGS_SUM("sink.readings"), NULL));
    char *t = fx_sql(fx.dsn, "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum)"
                             " FROM pg_attribute WHERE attrelid = 'sink.readings'::regclass AND attnum > 0");
    CHECK_STR_EQ(t, "integer,integer,double precision,text,timestamp with time zone,boolean,"
                    "numeric(10,2),bytea,date,bigint");
    free(t);
    /* The string "null" stayed a string, the empty string stayed empty. */
    t = fx_sql(fx.dsn, "SELECT name || '/' || (SELECT quote_literal(name) FROM sink.readings WHERE id = 8)"
                       " FROM sink.readings WHERE id = 7");
    CHECK_STR_EQ(t, "null/''");
    free(t);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'readings'"), 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT rows FROM tidepool.sync_runs WHERE job = 'readings'"
                                " AND status = 'succeeded' ORDER BY id DESC LIMIT 1"),
                 250);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'readings'"
                                " AND statement_id IS NOT NULL AND bytes > 0 AND duration_ms >= 0"),
                 1);
    /* Primary key from @key, the extra @index. */
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'sink'"
                                " AND tablename = 'readings'"),
                 2);
    free(out);
}

static void snapshot_json_matches_and_swaps_again(void)
{
    free(fx_sql(fx.dsn, "DO $$ BEGIN CREATE ROLE tp_sync_reader; EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
                        "GRANT USAGE ON SCHEMA sink TO tp_sync_reader;"
                        "GRANT SELECT ON sink.readings TO tp_sync_reader;"
                        "GRANT SELECT ON sink.readings TO PUBLIC"));
    char *out = NULL;
    int rc = fx_once(conf, "readings", "TIDEPOOL_SYNC_FORMAT=json", &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_same(READINGS_SUM("src.readings"), READINGS_SUM("sink.readings"), NULL));
    rc = fx_once(conf, "readings", "TIDEPOOL_SYNC_FORMAT=inline", &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_same(READINGS_SUM("src.readings"), READINGS_SUM("sink.readings"), NULL));
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'readings'"), 3);
    /* No leftovers of the fresh tables, the constraint names are stable. */
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_tp\\_%'"), 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_constraint WHERE conname = 'readings_pkey'"), 1);
    /* Grants survive the swaps. */
    char *g = fx_sql(fx.dsn, "SELECT has_table_privilege('tp_sync_reader', 'sink.readings', 'SELECT')::text"
                             " || (SELECT count(*) FROM aclexplode((SELECT relacl FROM pg_class"
                             " WHERE oid = 'sink.readings'::regclass)) WHERE grantee = 0)");
    CHECK_STR_EQ(g, "true1");
    free(g);
}

static void incremental_upserts_deletes_and_advances_watermark(void)
{
    char *out = NULL;
    int rc = fx_once(conf, "events", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_same(EVENTS_SUM("src.events", "NOT deleted"), EVENTS_SUM("sink.events", "true"), NULL));
    char *wm = fx_sql(fx.dsn, "SELECT watermark::timestamptz = '2025-02-01 00:02:00+00' FROM tidepool.sync_state"
                              " WHERE job = 'events'");
    CHECK_STR_EQ(wm, "t");
    free(wm);
    /* Changes: updates, inserts, deletes by flag; an untouched row changed
     * in place without a newer watermark must NOT be fetched (proves the range). */
    free(fx_sql(fx.wh_dsn,
                "UPDATE src.events SET val = val + 1, updated_at = updated_at + interval '1 day' WHERE id <= 10;"
                "INSERT INTO src.events SELECT i, 1, i, timestamptz '2025-02-03 00:00:00+00', false"
                " FROM generate_series(121, 130) i;"
                "UPDATE src.events SET deleted = true, updated_at = updated_at + interval '2 days'"
                " WHERE id IN (50, 51, 125);"
                "UPDATE src.events SET val = -1 WHERE id = 100;"));
    rc = fx_once(conf, "events", "TIDEPOOL_SYNC_FORMAT=json", &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_same(EVENTS_SUM("src.events", "NOT deleted AND id <> 100"),
                  EVENTS_SUM("sink.events", "id <> 100"), NULL));
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT val FROM sink.events WHERE id = 100"), 1000);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.events WHERE id IN (50, 51, 125)"), 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT rows FROM tidepool.sync_runs WHERE job = 'events'"
                                " ORDER BY id DESC LIMIT 1"),
                 22); /* 10 updated, 10 inserted, 3 flagged (one of them new) */
    /* Nothing new: a run loads nothing and keeps the generation. */
    long long gen = fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'events'");
    rc = fx_once(conf, "events", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'events'"), gen);
}

static void reconcile_removes_keys_the_warehouse_lost(void)
{
    char *out = NULL;
    int rc = fx_once(conf, "recon", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.recon"), 25);
    free(fx_sql(fx.wh_dsn, "DELETE FROM src.recon WHERE id IN (3, 4)"));
    /* Not due yet (reconcile:1h): the rows stay. */
    rc = fx_once(conf, "recon", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.recon"), 25);
    free(fx_sql(fx.dsn, "UPDATE tidepool.sync_state SET last_reconcile_at = now() - interval '2 hours'"
                        " WHERE job = 'recon'"));
    rc = fx_once(conf, "recon", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.recon"), 23);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.recon WHERE id IN (3, 4)"), 0);
}

static void drift_adds_columns_and_refuses_type_changes(void)
{
    char *out = NULL;
    int rc = fx_once(conf, "drift", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    free(fx_sql(fx.wh_dsn, "ALTER TABLE src.drift ADD COLUMN extra text DEFAULT 'x';"
                           "UPDATE src.drift SET updated_at = updated_at + interval '1 day' WHERE id <= 3;"));
    rc = fx_once(conf, "drift", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.drift WHERE extra = 'x'"), 3);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.drift"), 20);
    char *before = fx_sql(fx.dsn, "SELECT md5(string_agg(concat_ws('|', id, val, extra), ',' ORDER BY id))"
                                  " FROM sink.drift");
    free(fx_sql(fx.wh_dsn, "ALTER TABLE src.drift ALTER COLUMN val TYPE text;"
                           "UPDATE src.drift SET val = 'v' || val, updated_at = updated_at + interval '2 days'"
                           " WHERE id <= 5;"));
    rc = fx_once(conf, "drift", NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "column val changed type");
    free(out);
    char *after = fx_sql(fx.dsn, "SELECT md5(string_agg(concat_ws('|', id, val, extra), ',' ORDER BY id))"
                                 " FROM sink.drift");
    CHECK_STR_EQ(before, after);
    free(before);
    free(after);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'drift'"
                                " AND status = 'failed' AND error LIKE '%column val changed type%'"),
                 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_state WHERE job = 'drift'"
                                " AND last_error LIKE '%val%' AND consecutive_failures = 1"),
                 1);
}

static void bad_keys_fail_the_job_and_keep_the_target(void)
{
    char *out = NULL;
    int rc = fx_once(conf, "keyed", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    const char *sum = "SELECT count(*) || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM sink.keyed";
    char *before = fx_sql(fx.dsn, sum);
    free(fx_sql(fx.wh_dsn, "UPDATE src.keyed SET v = v + 100; INSERT INTO src.keyed VALUES (3, 33)"));
    rc = fx_once(conf, "keyed", NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "job keyed");
    CHECK_CONTAINS(out, "Key (id)=(3)");
    free(out);
    char *after = fx_sql(fx.dsn, sum);
    CHECK_STR_EQ(before, after);
    free(after);
    free(fx_sql(fx.wh_dsn, "DELETE FROM src.keyed WHERE v = 33; INSERT INTO src.keyed VALUES (NULL, 7)"));
    rc = fx_once(conf, "keyed", "TIDEPOOL_SYNC_FORMAT=json", &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "null value in column");
    CHECK_CONTAINS(out, "line 31"); /* the row: 30 good rows came first */
    free(out);
    after = fx_sql(fx.dsn, sum);
    CHECK_STR_EQ(before, after);
    free(after);
    free(before);
    /* Incremental: a key twice in one batch names the key. */
    free(fx_sql(fx.wh_dsn, "INSERT INTO src.events VALUES (5, 1, 1, '2030-01-01', false),"
                           " (5, 1, 2, '2030-01-01', false)"));
    rc = fx_once(conf, "events", NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "duplicate key in the warehouse result: {\\\"id\\\" : 5}");
    free(out);
    free(fx_sql(fx.wh_dsn, "DELETE FROM src.events WHERE updated_at = '2030-01-01'"));
}

/* Incremental: a NULL key in a batch fails the run at the COPY into the
 * staging table, naming the row; the target and the watermark stay. */
static void incremental_null_key_keeps_target_and_watermark(void)
{
    const char *state = "SELECT watermark || '/' || generation FROM tidepool.sync_state WHERE job = 'events'";
    char *sum = fx_sql(fx.dsn, EVENTS_SUM("sink.events", "true"));
    char *wm = fx_sql(fx.dsn, state);
    /* one good row first (so the bad one is line 2), then a NULL key */
    free(fx_sql(fx.wh_dsn, "INSERT INTO src.events VALUES (500, 1, 1, '2031-01-01', false),"
                           " (NULL, 1, 2, '2031-01-02', false)"));
    const char *fmts[] = {NULL, "TIDEPOOL_SYNC_FORMAT=csv"};
    const char *lines[] = {"line 2", "line 3"}; /* CSV: the header is line 1 */
    for (int i = 0; i < 2; i++) {
        char *out = NULL;
        int rc = fx_once(conf, "events", fmts[i], &out);
        CHECK_INT_EQ(rc, 1);
        CHECK_CONTAINS(out, "job events:");
        CHECK_CONTAINS(out, "null value in column \\\"id\\\"");
        CHECK_CONTAINS(out, lines[i]);
        free(out);
        char *after = fx_sql(fx.dsn, EVENTS_SUM("sink.events", "true"));
        CHECK_STR_EQ(sum, after);
        free(after);
        after = fx_sql(fx.dsn, state);
        CHECK_STR_EQ(wm, after);
        free(after);
    }
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.events WHERE id = 500"), 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'events'"
                                " AND status = 'failed' AND error LIKE '%null value in column%'"),
                 2);
    /* the NULL row gone, the next run picks the good row up */
    free(fx_sql(fx.wh_dsn, "DELETE FROM src.events WHERE id IS NULL"));
    char *out = NULL;
    int rc = fx_once(conf, "events", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.events WHERE id = 500"), 1);
    free(fx_sql(fx.wh_dsn, "DELETE FROM src.events WHERE id = 500"));
    free(fx_sql(fx.dsn, "DELETE FROM sink.events WHERE id = 500"));
    free(sum);
    free(wm);
}

/* Checksum of a sink table (all columns, by id). */
static char *sink_sum(const char *table)
{
    char *q = fx_printf("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '')"
                        " FROM %s t", table);
    char *v = fx_sql(fx.dsn, q);
    free(q);
    return v;
}

#define FIT_JOBS 6
static const char *const fit_jobs[FIT_JOBS] = {"fit_ok", "fit_num", "fit_ts", "fit_int", "fit_vc", "fit_geo"};

/* Values and types that do not fit their column: a numeric beyond the
 * column's precision and a timestamp Postgres refuses (COPY names line and
 * column), an out-of-range integer for an existing integer column and a
 * varchar(N) target (refused by type before any row), a warehouse type with
 * no Postgres mapping. Each fails its job only, with the job's name; every
 * target stays exactly as it was; the good job in the same pass succeeds. */
static void values_and_types_that_do_not_fit(void)
{
    free(fx_sql(fx.wh_dsn, "CREATE TABLE src.fit (id int, small int, big numeric, ts timestamptz, name text,"
                           " updated_at timestamptz);"
                           "INSERT INTO src.fit SELECT i, i * 10, i * 1.5, timestamptz '2025-05-01 00:00:00+00'"
                           " + i * interval '1 hour', 'n' || (i % 10), timestamptz '2025-05-01 00:00:00+00'"
                           " + i * interval '1 second' FROM generate_series(1, 30) i"));
    free(fx_sql(fx.dsn, "CREATE TABLE sink.fit_vc (id int PRIMARY KEY, name varchar(4), updated_at timestamptz);"
                        "INSERT INTO sink.fit_vc VALUES (1, 'keep', '2020-01-01')"));
    char *dir = fx_jobs_dir("jobs_fit2");
    const char *inc = "-- @mode incremental\n-- @key id\n-- @watermark updated_at\n-- @every 1h\n";
    const char *where = "WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n";
    char *t;
    fx_job(dir, "fit_ok", "-- @target sink.fit_ok\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                          "SELECT id, small FROM src.fit\n");
    fx_job(dir, "fit_num", "-- @target sink.fit_num\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                           "SELECT id, big FROM src.fit ORDER BY id\n");
    fx_job(dir, "fit_ts", "-- @target sink.fit_ts\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                          "SELECT id, ts FROM src.fit ORDER BY id\n");
    t = fx_printf("-- @target sink.fit_int\n%sSELECT id, small AS v, updated_at FROM src.fit\n%s", inc, where);
    fx_job(dir, "fit_int", t);
    free(t);
    fx_job(dir, "fit_geo", "-- @target sink.fit_geo\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                           "SELECT id, small FROM src.fit\n");
    char *c = fx_config("fit2", dir, 2);
    char *out = NULL;
    int rc = fx_once(c, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    /* the varchar(4) target made by hand: its job joins now */
    t = fx_printf("-- @target sink.fit_vc\n%sSELECT id, name, updated_at FROM src.fit\n%s", inc, where);
    fx_job(dir, "fit_vc", t);
    free(t);

    char *before[FIT_JOBS];
    for (int i = 0; i < FIT_JOBS; i++) {
        char *tbl = fx_printf("sink.%s", fit_jobs[i]);
        before[i] = sink_sum(tbl);
        free(tbl);
    }
    const char *gens = "SELECT string_agg(job || '=' || generation, ',' ORDER BY job) FROM tidepool.sync_state"
                       " WHERE job LIKE 'fit\\_%'";
    char *gen_before = fx_sql(fx.dsn, gens);
    /* Now the data no longer fits: a numeric beyond DECIMAL(38,18) in row 17,
     * year 10000 in row 5, 3000000000 for the integer column, a later
     * updated_at everywhere; a geometry column added to fit_geo. */
    free(fx_sql(fx.wh_dsn, "UPDATE src.fit SET big = 1e25 WHERE id = 17;"
                           "UPDATE src.fit SET ts = timestamptz '10000-01-01 00:00:00+00' WHERE id = 5;"
                           "UPDATE src.fit SET updated_at = updated_at + interval '1 day', name = name || '-longer'"));
    t = fx_printf("-- @target sink.fit_int\n%sSELECT id, CASE WHEN id = 9 THEN 3000000000 ELSE small END AS v,"
                  " updated_at FROM src.fit\n%s", inc, where);
    fx_job(dir, "fit_int", t);
    free(t);
    fx_job(dir, "fit_geo", "-- @target sink.fit_geo\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                           "SELECT id, small, point(id, small) AS location FROM src.fit\n");
    const char *fmts[] = {NULL, "TIDEPOOL_SYNC_FORMAT=json"};
    for (int f = 0; f < 2; f++) {
        rc = fx_once(c, NULL, fmts[f], &out);
        CHECK_INT_EQ(rc, 1);
        /* COPY names the row (CSV counts its header as line 1) and the column */
        CHECK_CONTAINS(out, "job fit_num:");
        CHECK_CONTAINS(out, "numeric field overflow");
        CHECK_CONTAINS(out, f ? "line 17, column big" : "line 18, column big");
        CHECK_CONTAINS(out, "job fit_ts:");
        CHECK_CONTAINS(out, f ? "line 5, column ts" : "line 6, column ts");
        CHECK_CONTAINS(out, "+10000-01-01T00:00:00.000Z");
        /* refused by type before any row: the column and both types named */
        CHECK_CONTAINS(out, "job fit_int: schema drift: column v changed type: target sink.fit_int has integer,"
                            " the warehouse now returns BIGINT (bigint); target left unchanged");
        CHECK_CONTAINS(out, "job fit_vc: schema drift: column name changed type: target sink.fit_vc has"
                            " character varying(4), the warehouse now returns STRING (text)");
        CHECK_CONTAINS(out, "job fit_geo: column location has warehouse type GEOMETRY(0), which has no"
                            " Postgres mapping");
        free(out);
        for (int i = 1; i < FIT_JOBS; i++) {
            char *tbl = fx_printf("sink.%s", fit_jobs[i]);
            char *after = sink_sum(tbl);
            CHECK_MSG(strcmp(before[i], after) == 0, "%s changed: %s -> %s", tbl, before[i], after);
            free(after);
            free(tbl);
        }
    }
    /* nothing left behind; each failure recorded; the good job ran twice more */
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_tp\\_new\\_fit%'"), 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_state WHERE job LIKE 'fit\\_%'"
                                " AND job <> 'fit_ok' AND consecutive_failures = 2 AND last_error LIKE"
                                " 'job ' || job || ':%'"),
                 FIT_JOBS - 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job LIKE 'fit\\_%'"
                                " AND status = 'failed'"),
                 2 * (FIT_JOBS - 1));
    char *gen_after = fx_sql(fx.dsn, gens);
    CHECK_STR_EQ(gen_before, "fit_geo=1,fit_int=1,fit_num=1,fit_ok=1,fit_ts=1");
    CHECK_STR_EQ(gen_after, "fit_geo=1,fit_int=1,fit_num=1,fit_ok=3,fit_ts=1,fit_vc=0");
    char *ok_now = sink_sum("sink.fit_ok");
    CHECK_STR_EQ(before[0], ok_now);  /* same rows, swapped in twice */
    free(ok_now);
    char *vc = fx_sql(fx.dsn, "SELECT string_agg(name, ',') FROM sink.fit_vc");
    CHECK_STR_EQ(vc, "keep");
    free(vc);
    for (int i = 0; i < FIT_JOBS; i++)
        free(before[i]);
    free(gen_before);
    free(gen_after);
    free(dir);
    free(c);
}

static void snapshot_refuses_changed_type(void)
{
    char *dir = fx_jobs_dir("jobs_fit");
    fx_job(dir, "fit", "-- @target sink.fit\n-- @mode snapshot\n-- @every 1h\n"
                       "SELECT id, CAST(v AS INT) AS v FROM src.keyed\n");
    char *c = fx_config("fit", dir, 2);
    char *out = NULL;
    int rc = fx_once(c, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    /* The target column is integer; the query now returns a string. */
    fx_job(dir, "fit", "-- @target sink.fit\n-- @mode snapshot\n-- @every 1h\n"
                       "SELECT id, concat(v, '') AS v FROM src.keyed\n");
    rc = fx_once(c, NULL, NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "column v changed type");
    free(out);
    free(dir);
    free(c);
}

static void check_reports_bad_definitions_with_file_line(void)
{
    char *dir = fx_jobs_dir("jobs_bad");
    fx_job(dir, "broken", "-- @target sink.broken\n-- @mode sometimes\n-- @every 1m\nSELECT 1 AS x\n");
    char *c = fx_config("bad", dir, 2);
    char *cmd = fx_printf("%s --config %s --check 2>&1", tp_test_bin("tidepool-sync"), c);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    CHECK_INT_EQ(rc, 2);
    CHECK_CONTAINS(out, "broken.sql:2:");
    free(out);
    free(cmd);
    rc = fx_once(c, NULL, NULL, &out);
    CHECK_INT_EQ(rc, 2);
    CHECK_CONTAINS(out, "broken.sql:2:");
    free(out);
    cmd = fx_printf("%s --config %s --check 2>&1", tp_test_bin("tidepool-sync"), conf);
    rc = tp_test_cmd(cmd, &out);
    CHECK_INT_EQ(rc, 0);
    CHECK_CONTAINS(out, "job readings: snapshot -> sink.readings");
    free(out);
    free(cmd);
    rc = fx_once(conf, "nosuchjob", NULL, &out);
    CHECK_INT_EQ(rc, 2);
    CHECK_CONTAINS(out, "no job named nosuchjob");
    free(out);
    free(dir);
    free(c);
}

static void concurrent_jobs_create_one_schema(void)
{
    char *dir = fx_jobs_dir("jobs_schema");
    for (int i = 0; i < 4; i++) {
        char name[16], text[256];
        snprintf(name, sizeof(name), "s%d", i);
        snprintf(text, sizeof(text), "-- @target newschema.t%d\n-- @mode %s\n-- @key id\n-- @every 1h\n"
                 "SELECT id, v FROM src.keyed WHERE id IS NOT NULL\n", i, i % 2 ? "incremental" : "snapshot");
        fx_job(dir, name, text);
    }
    char *c = fx_config("schema", dir, 4);
    char *out = NULL;
    int rc = fx_once(c, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'newschema'"), 4);
    free(dir);
    free(c);
}

static void large_incremental_batch_falls_back_to_links(void)
{
    char *dir = fx_jobs_dir("jobs_wide");
    fx_job(dir, "wide", "-- @target sink.wide\n-- @mode incremental\n-- @key id\n-- @watermark updated_at\n"
                        "-- @every 1h\nSELECT id, body, updated_at FROM src.wide\n"
                        "WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n");
    char *c = fx_config("wide", dir, 2);
    free(fx_sql(fx.wh_dsn, "CREATE TABLE src.wide (id int, body text, updated_at timestamptz);"
                           "INSERT INTO src.wide VALUES (1, 'small', '2025-01-01')"));
    char *out = NULL;
    int rc = fx_once(c, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    /* 28 rows of 1 MiB: over the 25 MiB INLINE limit. */
    free(fx_sql(fx.wh_dsn, "INSERT INTO src.wide SELECT i, repeat(chr(65 + i % 26), 1048576),"
                           " '2025-01-02' FROM generate_series(2, 29) i"));
    rc = fx_once(c, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    CHECK_CONTAINS(out, "too large for INLINE");
    free(out);
    CHECK(fx_same("SELECT count(*) || md5(string_agg(md5(body), ',' ORDER BY id)) FROM src.wide",
                  "SELECT count(*) || md5(string_agg(md5(body), ',' ORDER BY id)) FROM sink.wide", NULL));
    free(dir);
    free(c);
}

static void failing_jobs_do_not_stop_the_others(void)
{
    /* By now "drift" (changed type) and "keyed" (NULL key) fail; the rest run. */
    const char *gens = "SELECT string_agg(job || '=' || generation, ',' ORDER BY job) FROM tidepool.sync_state"
                       " WHERE job IN ('drift', 'keyed', 'readings')";
    char *before = fx_sql(fx.dsn, gens);
    char *out = NULL;
    int rc = fx_once(conf, NULL, NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_CONTAINS(out, "job drift:");
    CHECK_CONTAINS(out, "job keyed:");
    free(out);
    char *after = fx_sql(fx.dsn, gens);
    CHECK_STR_EQ(before, "drift=2,keyed=1,readings=3");
    CHECK_STR_EQ(after, "drift=2,keyed=1,readings=4");
    free(before);
    free(after);
    CHECK(fx_same(READINGS_SUM("src.readings"), READINGS_SUM("sink.readings"), NULL));
}

static void migrate_flag_applies_the_schema(void)
{
    char *db = tp_test_new_db("sync_migr");
    char *text = fx_printf("[postgres]\ndsn = %s\n[sync]\ndefinitions = %s\n", db, jobs);
    char *c = tp_test_write_tmp("migr.conf", text);
    char *cmd = fx_printf("%s --config %s --migrate 2>&1", tp_test_bin("tidepool-sync"), c);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 500));
    free(out);
    CHECK_INT_EQ(fx_num(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'tidepool'"
                            " AND tablename IN ('sync_state', 'sync_runs')"),
                 2);
    free(cmd);
    free(c);
    free(text);
    free(db);
}

static void complex_types_map_to_jsonb_interval_timestamp(void)
{
    char *dir = fx_jobs_dir("jobs_types");
    fx_job(dir, "types", "-- @target sink.types\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                         "SELECT id, ARRAY[id, id + 1] AS arr, ARRAY['a', NULL] AS sarr,"
                         " id * interval '1 day 2 hours' AS iv,"
                         " timestamp '2025-01-01 10:00:00' + id * interval '1 second' AS ntz,"
                         " CAST(NULL AS text) AS nothing, true AS yes"
                         " FROM src.keyed WHERE id IS NOT NULL AND id <= 3\n");
    char *c = fx_config("types", dir, 2);
    const char *fmts[] = {NULL, "TIDEPOOL_SYNC_FORMAT=json"};
    for (int i = 0; i < 2; i++) {
        char *out = NULL;
        int rc = fx_once(c, NULL, fmts[i], &out);
        CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
        free(out);
        char *t = fx_sql(fx.dsn, "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum)"
                                 " FROM pg_attribute WHERE attrelid = 'sink.types'::regclass AND attnum > 0");
        CHECK_STR_EQ(t, "integer,jsonb,jsonb,interval,timestamp without time zone,text,boolean");
        free(t);
        t = fx_sql(fx.dsn, "SELECT concat_ws('|', arr, sarr, iv, ntz, coalesce(nothing, '<N>'), yes)"
                           " FROM sink.types WHERE id = 2");
        CHECK_STR_EQ(t, "[2, 3]|[\"a\", null]|2 days 04:00:00|2025-01-01 10:00:02|<N>|t");
        free(t);
    }
    free(dir);
    free(c);
}

int main(void)
{
    if (!fx_setup("test_sync_basic", lake_sql, NULL))
        return tp_test_done();
    jobs = fx_jobs_dir("jobs");
    fx_job(jobs, "readings",
           "-- @target sink.readings\n-- @mode snapshot\n-- @key id\n-- @index user_id\n-- @every 1h\n"
           "SELECT id, user_id, v, name, ts, flag, amount, payload, d, big FROM lake.src.readings\n");
    fx_job(jobs, "events",
           "-- @target sink.events\n-- @mode incremental\n-- @key id\n-- @watermark updated_at\n"
           "-- @deletes flag:deleted\n-- @every 1h\n"
           "SELECT id, user_id, val, updated_at, deleted FROM src.events\n"
           "WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n");
    fx_job(jobs, "keyed", "-- @target sink.keyed\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                          "SELECT id, v FROM src.keyed\n");
    fx_job(jobs, "drift",
           "-- @target sink.drift\n-- @mode incremental\n-- @key id\n-- @watermark updated_at\n-- @every 1h\n"
           "SELECT * FROM src.drift WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n");
    fx_job(jobs, "recon",
           "-- @target sink.recon\n-- @mode incremental\n-- @key id\n-- @watermark updated_at\n"
           "-- @deletes reconcile:1h\n-- @every 1h\n"
           "SELECT * FROM src.recon WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n");
    conf = fx_config("basic", jobs, 2);
    TP_RUN(snapshot_csv_matches_warehouse);
    TP_RUN(snapshot_json_matches_and_swaps_again);
    TP_RUN(incremental_upserts_deletes_and_advances_watermark);
    TP_RUN(reconcile_removes_keys_the_warehouse_lost);
    TP_RUN(drift_adds_columns_and_refuses_type_changes);
    TP_RUN(bad_keys_fail_the_job_and_keep_the_target);
    TP_RUN(incremental_null_key_keeps_target_and_watermark);
    TP_RUN(values_and_types_that_do_not_fit);
    TP_RUN(snapshot_refuses_changed_type);
    TP_RUN(failing_jobs_do_not_stop_the_others);
    TP_RUN(check_reports_bad_definitions_with_file_line);
    TP_RUN(concurrent_jobs_create_one_schema);
    TP_RUN(migrate_flag_applies_the_schema);
    TP_RUN(complex_types_map_to_jsonb_interval_timestamp);
    TP_RUN(large_incremental_batch_falls_back_to_links);
    fx_stop_emulator();
    free(jobs);
    free(conf);
    return tp_test_done();
}
