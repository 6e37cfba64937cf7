/* Unit tests for lib/defs.c: every load error with its exact file:line text,
 * body scanning and $n rewriting edge cases, twins, @covers routing, request
 * value validation, and that the demo definitions in sql/ all parse. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../tp_test.h"
#include "tidepool/defs.h"
#include "tidepool/util.h"

/* A fresh directory holding the given NULL-terminated name, text pairs. */
static char *dir_with(const char *first, ...)
{
    static int seq;
    char *dir = tp_xasprintf("%s/d%d", tp_test_tmpdir(), ++seq);
    mkdir(dir, 0755);
    va_list ap;
    va_start(ap, first);
    for (const char *name = first; name != NULL; name = va_arg(ap, const char *)) {
        const char *text = va_arg(ap, const char *);
        char *path = tp_xasprintf("%s/%s", dir, name);
        FILE *f = fopen(path, "w");
        if (f != NULL) {
            fputs(text, f);
            fclose(f);
        }
        free(path);
    }
    va_end(ap);
    return dir;
}

/* Loads dir as jobs (kind 'j') or datasets ('d'); returns all messages joined by
 * newlines with the directory prefix replaced by "D" ("" when it loaded cleanly). */
static char *load(char kind, const char *dir)
{
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    bool ok = kind == 'j' ? tp_defs_load_jobs(s, dir, &diag) : tp_defs_load_datasets(s, dir, &diag);
    CHECK(ok == (diag.n == 0));
    tp_buf_t b = {0};
    size_t dl = strlen(dir);
    for (size_t i = 0; i < diag.n; i++) {
        const char *m = diag.msgs[i];
        if (i > 0)
            tp_buf_putc(&b, '\n');
        if (strncmp(m, dir, dl) == 0) {
            tp_buf_putc(&b, 'D');
            m += dl;
        }
        tp_buf_puts(&b, m);
    }
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
    return tp_buf_steal(&b);
}

#define EXPECT_LOAD(kind, dir, want)                                                        \
    do {                                                                                    \
        char *_got = load((kind), (dir));                                                   \
        CHECK_STR_EQ(_got, (want));                                                         \
        free(_got);                                                                         \
        free(dir);                                                                          \
    } while (0)

#define JOB_HEAD "-- @target iot.t\n-- @mode snapshot\n-- @every 5m\n"

static void job_errors_name_file_and_line(void)
{
    char *d;
    d = dir_with("a.sql", "-- @target iot.t\n-- @mode snapshot\n-- @every 5m\n-- @colour red\nSELECT 1",
                 NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: unknown key @colour");
    d = dir_with("a.sql", "-- @mode snapshot\n-- @every 5m\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:1: missing required @target");
    d = dir_with("a.sql", "-- @target iot.t\n-- @every 5m\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:1: missing required @mode");
    d = dir_with("a.sql", "-- @target iot.t\n-- @mode snapshot\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:1: missing required @every");
    d = dir_with("a.sql", "-- @target iot.t\n-- @mode full\n-- @every 5m\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:2: @mode must be snapshot or incremental, not \"full\"");
    d = dir_with("a.sql", "-- @target iot.t\n-- @mode snapshot\n-- @every 5 minutes\nSELECT 1", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:3: @every: bad duration \"5 minutes\" (a number with s, m, h or d, at "
                "least 1s)");
    d = dir_with("a.sql", JOB_HEAD "-- @timeout 0s\nSELECT 1", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:4: @timeout: bad duration \"0s\" (a number with s, m, h or d, at least 1s)");
    d = dir_with("a.sql", JOB_HEAD "-- @mode incremental\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: duplicate @mode (first on line 2)");
    d = dir_with("a.sql", "-- @target iot.t\n-- @mode incremental\n-- @every 5m\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:2: @mode incremental needs @key");
    d = dir_with("a.sql", "-- @target t\n-- @mode snapshot\n-- @every 5m\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:1: @target must be schema.table in lower-case identifiers, not \"t\"");
    d = dir_with("a.sql", "-- @target tidepool.sync_state\n-- @mode snapshot\n-- @every 5m\nSELECT 1",
                 NULL);
    EXPECT_LOAD('j', d, "D/a.sql:1: @target schema tidepool is reserved");
    d = dir_with("a.sql", JOB_HEAD "-- @deletes reconcile:1h\nSELECT 1", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:4: @deletes reconcile only applies to @mode incremental (a snapshot "
                "replaces the whole table)");
    d = dir_with("a.sql", JOB_HEAD "-- @deletes drop\nSELECT 1", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:4: @deletes must be none, flag:COLUMN or reconcile:DURATION, not \"drop\"");
    d = dir_with("a.sql", JOB_HEAD "-- @watermark updated_at\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: @watermark only applies to @mode incremental");
    d = dir_with("a.sql", JOB_HEAD "-- @key id, , day\nSELECT 1", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: @key: \"\" is not a valid column name");
    d = dir_with("a.sql", JOB_HEAD "SELECT 1 WHERE x > :since", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:4: :since is not a parameter here (a sync job body may only use "
                ":watermark)");
    d = dir_with("a.sql", JOB_HEAD "SELECT 1\nWHERE x > :watermark", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:5: :watermark needs @watermark COLUMN");
    d = dir_with("a.sql",
                 "-- @target iot.t\n-- @mode incremental\n-- @key id\n-- @watermark ts\n"
                 "-- @every 1m\nSELECT 1",
                 NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: @watermark ts is set but the body never uses :watermark");
    d = dir_with("a.sql", JOB_HEAD "\n-- nothing here\n", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:5: empty SQL body");
    d = dir_with("a.sql", JOB_HEAD "SELECT 1;\n-- trailing comment is fine\nSELECT 2;", NULL);
    EXPECT_LOAD('j', d,
                "D/a.sql:6: more than one SQL statement (this follows the ';' on line 4)");
    d = dir_with("a.sql", JOB_HEAD "SELECT 1\n-- @key id\n", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:5: setting @key must come before the SQL body (line 4)");
    d = dir_with("Bad-Name.sql", JOB_HEAD "SELECT 1", NULL);
    EXPECT_LOAD('j', d,
                "D/Bad-Name.sql:1: definition name \"Bad-Name\" must match [a-z][a-z0-9_]* (files "
                "are NAME.sql)");
    d = dir_with("a.sql", JOB_HEAD "SELECT 1", "b.sql",
                 "-- @mode snapshot\n-- @every 5m\n-- @target iot.t\nSELECT 2", NULL);
    char *want = NULL;
    {
        char *got = load('j', d);
        want = tp_xasprintf("D/b.sql:3: @target iot.t is already the target of job a (%s/a.sql)", d);
        CHECK_STR_EQ(got, want);
        free(got);
        free(want);
        free(d);
    }
    d = dir_with("a.sql", JOB_HEAD "-- @obo yes\n-- @every 1h\nSELECT 'unterminated", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: unknown key @obo\nD/a.sql:5: duplicate @every (first on line 3)");
    d = dir_with("a.sql", JOB_HEAD "SELECT 'it''s\nunterminated", NULL);
    EXPECT_LOAD('j', d, "D/a.sql:4: unterminated string literal");
}

static void jobs_load_with_defaults_and_lookup(void)
{
    char *d = dir_with(
        "zeta.sql", JOB_HEAD "SELECT 1;\n",
        "alpha.sql",
        "-- a leading plain comment\n\n-- @target iot.user_daily_metrics\n-- @mode incremental\n"
        "-- @key user_id, day\n-- @watermark updated_at\n-- @every 5m\n-- @timeout 2m\n"
        "-- @deletes reconcile:24h\n-- @index day\n-- @index user_id, steps\n"
        "-- @description Daily metrics\n\nSELECT * FROM demo.iot.t\n"
        "WHERE updated_at > COALESCE(CAST(:watermark AS TIMESTAMP), TIMESTAMP '1970-01-01')\n",
        "notes.txt", "ignored", NULL);
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    CHECK(tp_defs_load_jobs(s, d, &diag));
    CHECK_INT_EQ(diag.n, 0);
    CHECK_INT_EQ(s->n_jobs, 2);
    CHECK_STR_EQ(s->jobs[0].name, "alpha");
    CHECK_STR_EQ(s->jobs[1].name, "zeta");
    const tp_defs_job_t *j = tp_defs_job_find(s, "alpha");
    CHECK(j != NULL);
    if (j != NULL) {
        CHECK_STR_EQ(j->target_schema, "iot");
        CHECK_STR_EQ(j->target_table, "user_daily_metrics");
        CHECK(j->mode == TP_DEFS_INCREMENTAL);
        CHECK_INT_EQ(j->n_key, 2);
        CHECK_STR_EQ(j->key[1], "day");
        CHECK_STR_EQ(j->watermark, "updated_at");
        CHECK(j->uses_watermark);
        CHECK_INT_EQ(j->every_ms, 300000);
        CHECK_INT_EQ(j->timeout_ms, 120000);
        CHECK(j->deletes == TP_DEFS_DELETES_RECONCILE);
        CHECK_INT_EQ(j->reconcile_ms, 86400000);
        CHECK_INT_EQ(j->n_indexes, 2);
        CHECK_INT_EQ(j->indexes[1].n_columns, 2);
        CHECK_STR_EQ(j->indexes[1].columns[1], "steps");
        CHECK_STR_EQ(j->description, "Daily metrics");
        CHECK_INT_EQ(j->body.line, 14);
        CHECK(strncmp(j->body.sql, "SELECT * FROM demo.iot.t\nWHERE", 30) == 0);
        CHECK_CONTAINS(j->body.sql, "CAST(:watermark AS TIMESTAMP)");
    }
    const tp_defs_job_t *z = tp_defs_job_find(s, "zeta");
    CHECK(z != NULL && z->timeout_ms == 600000 && z->deletes == TP_DEFS_DELETES_NONE);
    CHECK(z != NULL && strcmp(z->body.sql, "SELECT 1") == 0);
    CHECK(tp_defs_job_find(s, "nope") == NULL);
    /* a second directory with the same name is a duplicate */
    char *d2 = dir_with("zeta.sql", "-- @target iot.other\n-- @mode snapshot\n-- @every 5m\nSELECT 1",
                        NULL);
    CHECK(!tp_defs_load_jobs(s, d2, &diag));
    CHECK_INT_EQ(diag.n, 1);
    char *want = tp_xasprintf("%s/zeta.sql:1: sync job zeta is already defined in %s/zeta.sql", d2, d);
    CHECK_STR_EQ(diag.n ? diag.msgs[0] : NULL, want);
    free(want);
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
    free(d);
    free(d2);
    /* a directory that does not exist */
    s = tp_defs_set_new();
    CHECK(!tp_defs_load_jobs(s, "/nonexistent/dir", &diag));
    CHECK_CONTAINS(diag.n ? diag.msgs[0] : NULL, "/nonexistent/dir:0: cannot open");
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
}

#define DS_HEAD "-- @param user_id INT\n-- @param since DATE = 2025-01-01\n"

static void dataset_errors_name_file_and_line(void)
{
    char *d;
    d = dir_with("a.sql", "-- @param x FLOAT\nSELECT :x", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:1: @param x: unknown type \"FLOAT\" (STRING INT BIGINT DOUBLE DECIMAL "
                "BOOLEAN DATE TIMESTAMP)");
    d = dir_with("a.sql", "-- @param since DATE = 2025-02-30\nSELECT :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:1: @param since: default \"2025-02-30\" must be a date YYYY-MM-DD");
    d = dir_with("a.sql", "-- @param n INT = 3000000000\nSELECT :n", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:1: @param n: default \"3000000000\" is out of range for INT "
                "(-2147483648 to 2147483647)");
    d = dir_with("a.sql", "-- @param Bad INT\nSELECT 1", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param name \"Bad\" must match [a-z][a-z0-9_]*");
    d = dir_with("a.sql", "-- @param lonely\nSELECT 1", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param must be \"name TYPE [IN (a, b)] [= default]\", not \"lonely\"");
    d = dir_with("a.sql", DS_HEAD "-- @param user_id BIGINT\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:3: duplicate @param user_id (first on line 1)");
    d = dir_with("a.sql", DS_HEAD "-- @cache 1m\n-- @cache 2m\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:4: duplicate @cache (first on line 3)");
    d = dir_with("a.sql", DS_HEAD "-- @target iot.x\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:3: unknown key @target");
    d = dir_with("a.sql", DS_HEAD "SELECT :user_id,\n  :since, :until", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:4: :until is not a declared @param");
    d = dir_with("a.sql", DS_HEAD "SELECT :user_id", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:2: @param since is never used in the Postgres body");
    d = dir_with("a.sql", DS_HEAD "SELECT 1 WHERE $1 = :user_id AND :since IS NULL", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:3: positional parameter $1: use :name markers");
    d = dir_with("a.sql", DS_HEAD "-- @covers since > 400d\n-- @cache soon\nSELECT :user_id, :since",
                 "a.warehouse.sql", DS_HEAD "SELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:3: @covers must be \"PARAM >= DURATION\" (e.g. since >= 400d), not "
                "\"since > 400d\"\nD/a.sql:4: @cache: bad duration \"soon\" (a number with s, "
                "m, h or d)");
    d = dir_with("a.sql", DS_HEAD "-- @covers user_id >= 400d\nSELECT :user_id, :since",
                 "a.warehouse.sql", DS_HEAD "SELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:3: @covers: user_id must be a DATE or TIMESTAMP @param");
    d = dir_with("a.sql", DS_HEAD "-- @covers since >= 400d\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:3: @covers: it needs a warehouse twin NAME.warehouse.sql to fall back to");
    d = dir_with("a.sql", DS_HEAD "-- @max_staleness 1h\nSELECT :user_id, :since",
                 "a.warehouse.sql", DS_HEAD "SELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:3: @max_staleness needs @requires (the jobs whose age it measures)");
    d = dir_with("a.sql", DS_HEAD "-- @obo\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.sql:3: @obo: it needs a warehouse twin NAME.warehouse.sql (it applies to "
                "warehouse queries only)");
    d = dir_with("a.warehouse.sql", "-- @obo true\n-- @roles reader, Admin\nSELECT 1", NULL);
    EXPECT_LOAD('d', d,
                "D/a.warehouse.sql:1: @obo takes no value\nD/a.warehouse.sql:2: @roles: \"Admin\" "
                "is not a valid role name");
    d = dir_with("a.warehouse.sql", "-- @param since DATE\n-- @covers since >= 1d\nSELECT :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.warehouse.sql:2: @covers: a warehouse-only dataset always runs on the "
                "warehouse");
    d = dir_with("a.sql", "SELECT 1; SELECT 2", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: more than one SQL statement (this follows the ';' on line 1)");
    d = dir_with("a.sql", "-- @description only settings\n", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: empty SQL body");
    d = dir_with("a.b.sql", "SELECT 1", NULL);
    EXPECT_LOAD('d', d,
                "D/a.b.sql:1: definition name \"a.b\" must match [a-z][a-z0-9_]* (files are "
                "NAME.sql or NAME.warehouse.sql)");
    d = dir_with("a.sql", "SELECT 1 /* never closed", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: unterminated /* comment");
    d = dir_with("a.sql", "SELECT $x$ never closed", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: unterminated dollar-quoted string");
    d = dir_with("a.sql", "SELECT 1 AS \"open", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: unterminated quoted identifier");
    d = dir_with("a.sql", "-- @requires daily, daily\nSELECT 1", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @requires: \"daily\" is listed twice");
}

static void twins_must_match(void)
{
    char *d;
    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 "-- @param user_id BIGINT\n-- @param since DATE = 2025-01-01\nSELECT :user_id, :since",
                 NULL);
    char *got = load('d', d);
    char *want = tp_xasprintf("D/a.warehouse.sql:1: @param user_id differs from %s/a.sql:1 (the "
                              "twin must declare the same parameters)", d);
    CHECK_STR_EQ(got, want);
    free(got), free(want), free(d);

    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 "-- @param since DATE = 2025-01-02\n-- @param user_id INT\nSELECT :user_id, :since",
                 NULL);
    got = load('d', d);
    want = tp_xasprintf("D/a.warehouse.sql:1: @param since differs from %s/a.sql:2 (the twin "
                        "must declare the same parameters)", d);
    CHECK_STR_EQ(got, want);
    free(got), free(want), free(d);

    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 "-- @param user_id INT\nSELECT :user_id", NULL);
    got = load('d', d);
    want = tp_xasprintf("D/a.warehouse.sql:1: @param since of %s/a.sql:2 is missing here", d);
    CHECK_STR_EQ(got, want);
    free(got), free(want), free(d);

    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 DS_HEAD "-- @param extra STRING\nSELECT :user_id, :since, :extra", NULL);
    got = load('d', d);
    want = tp_xasprintf("D/a.warehouse.sql:3: @param extra is not declared in %s/a.sql", d);
    CHECK_STR_EQ(got, want);
    free(got), free(want), free(d);

    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 DS_HEAD "-- @cache 1m\nSELECT :user_id, :since", NULL);
    EXPECT_LOAD('d', d,
                "D/a.warehouse.sql:3: unknown key @cache (a twin may only repeat the @param "
                "lines; other settings belong in the main file)");
    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 DS_HEAD "SELECT :user_id", NULL);
    EXPECT_LOAD('d', d, "D/a.warehouse.sql:2: @param since is never used in the warehouse body");
    d = dir_with("a.sql", DS_HEAD "SELECT :user_id, :since", "a.warehouse.sql",
                 DS_HEAD "SELECT :user_id, :since, :nope", NULL);
    EXPECT_LOAD('d', d, "D/a.warehouse.sql:3: :nope is not a declared @param");

    /* a good pair */
    d = dir_with("m.sql",
                 "-- @description Daily metrics\n" DS_HEAD "-- @param until DATE = NULL\n"
                 "-- @requires daily_metrics\n-- @max_staleness 2h\n-- @covers since >= 400d\n"
                 "-- @cache 30s\n-- @roles reader, admin\n-- @obo\n"
                 "SELECT * FROM t WHERE user_id = :user_id AND day >= :since\n"
                 "  AND (:until::date IS NULL OR day <= :until) AND user_id = :user_id;\n",
                 "m.warehouse.sql",
                 "-- @param until DATE = NULL\n" DS_HEAD
                 "SELECT * FROM demo.iot.t WHERE user_id = :user_id AND day >= :since\n"
                 "  AND (:until IS NULL OR day <= :until)\n",
                 "w.warehouse.sql", "-- @param s STRING = 'a b'\n-- @roles admin\nSELECT :s", NULL);
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    CHECK(tp_defs_load_datasets(s, d, &diag));
    CHECK_INT_EQ(diag.n, 0);
    for (size_t i = 0; i < diag.n; i++)
        fprintf(stderr, "%s\n", diag.msgs[i]);
    CHECK_INT_EQ(s->n_datasets, 2);
    const tp_defs_dataset_t *m = tp_defs_dataset_find(s, "m");
    CHECK(m != NULL);
    if (m != NULL) {
        CHECK(m->has_pg && m->has_wh && m->obo);
        CHECK_INT_EQ(m->n_params, 3);
        CHECK_STR_EQ(m->pg.sql, "SELECT * FROM t WHERE user_id = $1 AND day >= $2\n"
                                "  AND ($3::date IS NULL OR day <= $3) AND user_id = $1");
        CHECK_INT_EQ(m->pg.n_names, 3);
        CHECK_INT_EQ(m->pg.index[0], 0);
        CHECK_INT_EQ(m->pg.index[1], 1);
        CHECK_INT_EQ(m->pg.index[2], 2);
        CHECK_INT_EQ(m->pg.line, 11);
        CHECK_CONTAINS(m->wh.sql, "(:until IS NULL OR day <= :until)");
        CHECK_STR_EQ(m->wh.names[0], "user_id");
        CHECK_INT_EQ(m->wh.index[2], 2);
        CHECK(m->params[2].has_default && m->params[2].dflt.is_null && !m->params[2].default_text);
        CHECK_STR_EQ(m->params[1].default_text, "2025-01-01");
        CHECK_INT_EQ(m->max_staleness_ms, 7200000);
        CHECK_INT_EQ(m->cache_ms, 30000);
        CHECK_INT_EQ(m->n_roles, 2);
        CHECK_STR_EQ(m->roles[1], "admin");
        CHECK_INT_EQ(m->n_requires, 1);
        CHECK_STR_EQ(m->description, "Daily metrics");
        CHECK_INT_EQ(m->n_covers, 1);
        CHECK_INT_EQ(m->covers[0].param, 1);
        CHECK_INT_EQ(m->covers[0].max_age_ms, 400LL * 86400000);
    }
    const tp_defs_dataset_t *w = tp_defs_dataset_find(s, "w");
    CHECK(w != NULL && !w->has_pg && w->has_wh && w->pg.sql == NULL);
    CHECK(w != NULL && strcmp(w->params[0].default_text, "a b") == 0);

    /* the same dataset name from a second directory is a duplicate */
    char *d2 = dir_with("w.sql", "SELECT 1", NULL);
    CHECK(!tp_defs_load_datasets(s, d2, &diag));
    want = tp_xasprintf("%s/w.sql:1: dataset w is already defined in %s/w.warehouse.sql", d2, d);
    CHECK_STR_EQ(diag.n ? diag.msgs[0] : NULL, want);
    CHECK_INT_EQ(s->n_datasets, 2);
    free(want);
    free(d2);
    tp_defs_diag_free(&diag);

    /* cross-check of @requires against the jobs */
    tp_defs_set_t *jobs = tp_defs_set_new();
    CHECK(!tp_defs_check_requires(s, jobs, &diag));
    want = tp_xasprintf("%s/m.sql:5: @requires unknown sync job daily_metrics", d);
    CHECK_STR_EQ(diag.n ? diag.msgs[0] : NULL, want);
    free(want);
    tp_defs_diag_free(&diag);
    char *jd = dir_with("daily_metrics.sql", JOB_HEAD "SELECT 1", NULL);
    CHECK(tp_defs_load_jobs(jobs, jd, &diag));
    CHECK(tp_defs_check_requires(s, jobs, &diag));
    CHECK_INT_EQ(diag.n, 0);
    tp_defs_set_free(jobs);
    tp_defs_set_free(s);
    free(jd);
    free(d);
}

static char *rewrite(const char *sql, bool pg, char *names_out, size_t nlen)
{
    tp_defs_body_t b = {0};
    char err[200];
    int line = 0;
    if (!tp_defs_scan_body(sql, pg, pg, &b, &line, err, sizeof err))
        return tp_xasprintf("ERR %d: %s", line, err);
    names_out[0] = '\0';
    for (size_t i = 0; i < b.n_names; i++) {
        strncat(names_out, b.names[i], nlen - strlen(names_out) - 1);
        strncat(names_out, ",", nlen - strlen(names_out) - 1);
    }
    char *out = tp_xstrdup(b.sql);
    tp_defs_body_free(&b);
    return out;
}

#define EXPECT_REWRITE(pg, in, want, want_names)                                            \
    do {                                                                                    \
        char _n[256];                                                                       \
        char *_o = rewrite((in), (pg), _n, sizeof _n);                                      \
        CHECK_STR_EQ(_o, (want));                                                           \
        if (strncmp(_o, "ERR", 3) != 0)                                                     \
            CHECK_STR_EQ(_n, (want_names));                                                 \
        free(_o);                                                                           \
    } while (0)

static void markers_skip_literals_comments_and_casts(void)
{
    EXPECT_REWRITE(true, "SELECT :a, :b, :a", "SELECT $1, $2, $1", "a,b,");
    EXPECT_REWRITE(true, "SELECT ':x', :y", "SELECT ':x', $1", "y,");
    EXPECT_REWRITE(true, "SELECT 'it''s :x', :y", "SELECT 'it''s :x', $1", "y,");
    EXPECT_REWRITE(true, "SELECT E'\\' :x', :y", "SELECT E'\\' :x', $1", "y,");
    EXPECT_REWRITE(true, "SELECT '\\', :y", "SELECT '\\', $1", "y,");
    EXPECT_REWRITE(true, "SELECT \":x\" FROM t WHERE c = :y", "SELECT \":x\" FROM t WHERE c = $1",
                   "y,");
    EXPECT_REWRITE(true, "SELECT 1 -- :x\n, :y", "SELECT 1 -- :x\n, $1", "y,");
    EXPECT_REWRITE(true, "SELECT /* :x /* :z */ :w */ :y", "SELECT /* :x /* :z */ :w */ $1", "y,");
    EXPECT_REWRITE(true, "SELECT :d::date, x::text, :e::int", "SELECT $1::date, x::text, $2::int",
                   "d,e,");
    EXPECT_REWRITE(true, "SELECT $$ :x $$, $tag$ it's :x $tag$, :y",
                   "SELECT $$ :x $$, $tag$ it's :x $tag$, $1", "y,");
    EXPECT_REWRITE(true, "SELECT a$b, :y", "SELECT a$b, $1", "y,");
    EXPECT_REWRITE(true, "SELECT arr[1:2], :y", "SELECT arr[1:2], $1", "y,");
    EXPECT_REWRITE(true, "  SELECT :y ;  -- done\n\n", "  SELECT $1", "y,");
    EXPECT_REWRITE(true, "-- lead\nSELECT :y -- trailing\n/* more */\n", "-- lead\nSELECT $1", "y,");
    EXPECT_REWRITE(true, "SELECT 1 -- c\n;", "SELECT 1", "");
    EXPECT_REWRITE(true, "SELECT 1 WHERE x = :User", "SELECT 1 WHERE x = $1", "User,");
    EXPECT_REWRITE(true, "SELECT 1 ; SELECT 2",
                   "ERR 1: more than one SQL statement (this follows the ';' on line 1)", "");
    EXPECT_REWRITE(true, "SELECT '\n\n", "ERR 1: unterminated string literal", "");
    EXPECT_REWRITE(true, "\n\nSELECT $2", "ERR 3: positional parameter $2: use :name markers", "");
    EXPECT_REWRITE(true, "-- only a comment\n", "ERR 1: empty SQL body", "");
    /* warehouse dialect: markers kept, backslash escapes, "strings" and `identifiers` */
    EXPECT_REWRITE(false, "SELECT 'a\\' :x', \":x\", `:x`, :y, :y", "SELECT 'a\\' :x', \":x\", `:x`, :y, :y",
                   "y,");
    EXPECT_REWRITE(false, "SELECT $x$, :y::date", "SELECT $x$, :y::date", "y,");
}

static void values_are_validated(void)
{
    tp_defs_value_t v;
    const char *why = NULL;
    CHECK(tp_defs_value_parse(TP_DEFS_INT, "-2147483648", &v, &why) && v.i == INT32_MIN);
    CHECK(!tp_defs_value_parse(TP_DEFS_INT, "2147483648", &v, &why));
    CHECK_STR_EQ(why, "is out of range for INT (-2147483648 to 2147483647)");
    CHECK(!tp_defs_value_parse(TP_DEFS_INT, "12a", &v, &why));
    CHECK_STR_EQ(why, "must be an integer");
    CHECK(!tp_defs_value_parse(TP_DEFS_INT, " 12", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_INT, "1.5", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_INT, "", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_INT, "+7", &v, &why) && strcmp(v.canon, "7") == 0);
    CHECK(tp_defs_value_parse(TP_DEFS_BIGINT, "9223372036854775807", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_BIGINT, "9223372036854775808", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_DOUBLE, "-1.5e3", &v, &why) && v.d == -1500.0);
    CHECK(!tp_defs_value_parse(TP_DEFS_DOUBLE, "1e999", &v, &why));
    CHECK_STR_EQ(why, "must be a finite number");
    CHECK(!tp_defs_value_parse(TP_DEFS_DOUBLE, "nan", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DOUBLE, "inf", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DOUBLE, "0x10", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_DECIMAL, "-12.50", &v, &why) && !strcmp(v.canon, "-12.50"));
    CHECK(tp_defs_value_parse(TP_DEFS_DECIMAL, ".5", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DECIMAL, "1e5", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DECIMAL, "123456789012345678901234567890123456789", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DECIMAL, "1.2.3", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_BOOLEAN, "YES", &v, &why) && !strcmp(v.canon, "true"));
    CHECK(tp_defs_value_parse(TP_DEFS_BOOLEAN, "0", &v, &why) && !strcmp(v.canon, "false"));
    CHECK(!tp_defs_value_parse(TP_DEFS_BOOLEAN, "maybe", &v, &why));
    CHECK_STR_EQ(why, "must be true or false");
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2024-02-29", &v, &why));
    CHECK_INT_EQ(v.epoch_us, 1709164800LL * 1000000);
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "2023-02-29", &v, &why));
    CHECK_STR_EQ(why, "must be a date YYYY-MM-DD");
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "2023-04-31", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "2023-4-01", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "2023-04-01T00:00", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "0000-01-01", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, "1900-02-28", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_DATE, "1900-02-29", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2000-02-29", &v, &why));
    CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-02T03:04:05Z", &v, &why));
    CHECK_STR_EQ(v.canon, "2025-01-02T03:04:05Z");
    CHECK_INT_EQ(v.epoch_us, 1735787045LL * 1000000);
    CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-02 03:04:05.25+02:00", &v, &why));
    CHECK_STR_EQ(v.canon, "2025-01-02T01:04:05.250000Z");
    CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-01T00:30-0100", &v, &why));
    CHECK_STR_EQ(v.canon, "2025-01-01T01:30:00Z");
    CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-01T00:30+01", &v, &why));
    CHECK_STR_EQ(v.canon, "2024-12-31T23:30:00Z");
    CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-03-01", &v, &why));
    CHECK_STR_EQ(v.canon, "2025-03-01T00:00:00Z");
    CHECK(!tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-01T24:00:00Z", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-01T10:00:00Zjunk", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-01T10:00:00.1234567890Z", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_TIMESTAMP, "yesterday", &v, &why));
    CHECK_CONTAINS(why, "ISO-8601");
    CHECK(tp_defs_value_parse(TP_DEFS_STRING, "héllo", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_STRING, "bad \xff byte", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_STRING, "\xc0\xaf", &v, &why));
    CHECK(!tp_defs_value_parse(TP_DEFS_STRING, "\xed\xa0\x80", &v, &why));
    CHECK_STR_EQ(tp_defs_value_text(&v, "x"), "x");
    CHECK_STR_EQ(tp_defs_type_name(TP_DEFS_TIMESTAMP), "TIMESTAMP");
    CHECK_STR_EQ(tp_defs_type_pg(TP_DEFS_DOUBLE), "double precision");
    CHECK_INT_EQ(tp_defs_type_oid(TP_DEFS_DATE), 1082);
}

static void covers_route_old_requests(void)
{
    char *d = dir_with("m.sql", "-- @param since DATE\n-- @param at TIMESTAMP = NULL\n"
                                "-- @covers since >= 10d\n-- @covers at >= 1h\nSELECT :since, :at",
                       "m.warehouse.sql",
                       "-- @param since DATE\n-- @param at TIMESTAMP = NULL\nSELECT :since, :at",
                       NULL);
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    CHECK(tp_defs_load_datasets(s, d, &diag));
    const tp_defs_dataset_t *m = tp_defs_dataset_find(s, "m");
    CHECK(m != NULL);
    if (m != NULL) {
        const char *why;
        tp_defs_value_t v[2];
        int64_t now = 1735787045000; /* 2025-01-02T03:04:05Z */
        CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2024-12-23", &v[0], &why)); /* now-10d's day */
        v[1] = m->params[1].dflt;
        CHECK_INT_EQ(tp_defs_covers_exceeded(m, v, now), -1);
        CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2024-12-22", &v[0], &why));
        CHECK_INT_EQ(tp_defs_covers_exceeded(m, v, now), 0);
        CHECK(tp_defs_value_parse(TP_DEFS_DATE, "2025-01-01", &v[0], &why));
        CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-02T02:00:00Z", &v[1], &why));
        CHECK_INT_EQ(tp_defs_covers_exceeded(m, v, now), 1);
        CHECK(tp_defs_value_parse(TP_DEFS_TIMESTAMP, "2025-01-02T02:05:00Z", &v[1], &why));
        CHECK_INT_EQ(tp_defs_covers_exceeded(m, v, now), -1);
        CHECK_INT_EQ(tp_defs_param_find(m, "at"), 1);
        CHECK_INT_EQ(tp_defs_param_find(m, "nope"), -1);
    }
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
    free(d);
}

static void params_with_choices(void)
{
    char *d;
    d = dir_with("a.sql", "-- @param m STRING IN (weight, 'chol esterol') = x\nSELECT :m", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param m: default \"x\" must be one of: weight, chol esterol");
    d = dir_with("a.sql", "-- @param n INT IN (1, two)\nSELECT :n", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param n: choice \"two\" must be an integer");
    d = dir_with("a.sql", "-- @param n INT IN (1, +1)\nSELECT :n", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param n: choice \"+1\" is listed twice");
    d = dir_with("a.sql", "-- @param n INT IN 1, 2\nSELECT :n", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param n: IN needs a list: IN (a, b)");
    d = dir_with("a.sql", "-- @param n INT maybe\nSELECT :n", NULL);
    EXPECT_LOAD('d', d, "D/a.sql:1: @param n: unexpected \"maybe\" (expected IN (a, b) or = default)");
    d = dir_with("a.sql", "-- @param m STRING IN (weight, cholesterol) = weight\nSELECT :m",
                 "a.warehouse.sql", "-- @param m STRING IN (weight) = weight\nSELECT :m", NULL);
    char *got = load('d', d);
    char *want = tp_xasprintf("D/a.warehouse.sql:1: @param m differs from %s/a.sql:1 (the twin "
                              "must declare the same parameters)", d);
    CHECK_STR_EQ(got, want);
    free(got), free(want), free(d);

    d = dir_with("a.sql", "-- @param m STRING IN (weight, cholesterol) = weight\n"
                          "-- @param b BOOLEAN in(true) = yes\nSELECT :m, :b", NULL);
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    CHECK(tp_defs_load_datasets(s, d, &diag));
    const tp_defs_dataset_t *a = tp_defs_dataset_find(s, "a");
    CHECK(a != NULL);
    if (a != NULL) {
        tp_defs_value_t v;
        const char *why = NULL;
        CHECK_INT_EQ(a->params[0].n_choices, 2);
        CHECK(tp_defs_param_parse(&a->params[0], "cholesterol", &v, &why));
        CHECK(!tp_defs_param_parse(&a->params[0], "height", &v, &why));
        CHECK_STR_EQ(why, "must be one of: weight, cholesterol");
        CHECK(tp_defs_param_parse(&a->params[1], "ON", &v, &why));
        CHECK(!tp_defs_param_parse(&a->params[1], "no", &v, &why));
        CHECK_STR_EQ(why, "must be one of: true");
        CHECK(!tp_defs_param_parse(&a->params[1], "perhaps", &v, &why));
        CHECK_STR_EQ(why, "must be true or false");
        CHECK_STR_EQ(a->params[1].default_text, "yes");
        CHECK_STR_EQ(a->params[1].dflt.canon, "true");
    }
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
    free(d);
}

/* Byte-order marks and CRLF line ends are accepted; NUL bytes are not. */
static void files_from_other_editors(void)
{
    char *d = dir_with("a.sql", "\xEF\xBB\xBF-- @target iot.t\r\n-- @mode snapshot\r\n-- @every 5m\r\n"
                                "SELECT 1\r\n", NULL);
    EXPECT_LOAD('j', d, "");
    d = dir_with("a.sql", "-- @param x INT\r\nSELECT :x;\r\n\r\n", NULL);
    EXPECT_LOAD('d', d, "");
    d = dir_with("a.sql", "SELECT 1", NULL);
    char *path = tp_xasprintf("%s/a.sql", d);
    FILE *f = fopen(path, "w");
    if (f != NULL) {
        fwrite("SELECT 1\0;", 1, 11, f);
        fclose(f);
    }
    free(path);
    EXPECT_LOAD('d', d, "D/a.sql:1: file contains a NUL byte");
}

/* Mutated demo files and random bodies never crash the parser (run under
 * SANITIZE=1 too): a deterministic fuzz pass, every result either loads or
 * carries at least one file:line message. */
static void mutated_input_never_crashes(void)
{
    const char *root = getenv("TP_ROOT") ? getenv("TP_ROOT") : ".";
    char *src = tp_xasprintf("%s/sql/queries/daily_metrics.sql", root);
    char *orig = tp_read_file(src, NULL);
    free(src);
    CHECK(orig != NULL);
    if (orig == NULL)
        return;
    static const char alphabet[] = ":;'\"$`-/*@=,()\n\\ aZ9_\xc3";
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    size_t len = strlen(orig);
    for (int iter = 0; iter < 300; iter++) {
        char *m = tp_xstrdup(orig);
        for (int k = 0; k < 1 + iter % 6; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            m[x % len] = alphabet[(x >> 32) % (sizeof alphabet - 1)];
        }
        char *d = dir_with("m.sql", m, "m.warehouse.sql", m, NULL);
        tp_defs_set_t *s = tp_defs_set_new();
        tp_defs_diag_t diag = {0};
        bool ok = tp_defs_load_datasets(s, d, &diag);
        CHECK(ok == (diag.n == 0));
        CHECK(ok == (s->n_datasets == 1));
        for (size_t i = 0; i < diag.n; i++)
            CHECK_MSG(strstr(diag.msgs[i], ".sql:") != NULL, "no file:line in %s", diag.msgs[i]);
        bool okj = tp_defs_load_jobs(s, d, &diag);
        CHECK(!okj); /* m.warehouse.sql is not a job name */
        tp_defs_diag_free(&diag);
        tp_defs_set_free(s);
        tp_defs_body_t b = {0};
        char err[128];
        int line;
        for (int pg = 0; pg < 2; pg++) {
            if (tp_defs_scan_body(m, pg, pg, &b, &line, err, sizeof err))
                tp_defs_body_free(&b);
            else
                CHECK(line >= 1 && err[0] != '\0');
        }
        free(m);
        free(d);
    }
    free(orig);
}

/* The demo definitions shipped in sql/ (DESIGN §14) load and cross-check. */
static void demo_definitions_parse(void)
{
    const char *root = getenv("TP_ROOT") ? getenv("TP_ROOT") : ".";
    char *jd = tp_xasprintf("%s/sql/sync", root), *qd = tp_xasprintf("%s/sql/queries", root);
    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    CHECK(tp_defs_load_jobs(s, jd, &diag));
    CHECK(tp_defs_load_datasets(s, qd, &diag));
    CHECK(tp_defs_check_requires(s, s, &diag));
    for (size_t i = 0; i < diag.n; i++)
        CHECK_MSG(false, "%s", diag.msgs[i]);
    CHECK_INT_EQ(s->n_jobs, 3);
    CHECK_INT_EQ(s->n_datasets, 4);
    const tp_defs_job_t *dm = tp_defs_job_find(s, "daily_metrics");
    CHECK(dm != NULL && dm->mode == TP_DEFS_INCREMENTAL && dm->uses_watermark);
    CHECK(dm != NULL && strcmp(dm->target, "iot.user_daily_metrics") == 0 && dm->n_key == 2);
    const tp_defs_job_t *u = tp_defs_job_find(s, "users");
    CHECK(u != NULL && strcmp(u->target, "iot.users") == 0 && u->mode == TP_DEFS_SNAPSHOT);
    const tp_defs_job_t *cr = tp_defs_job_find(s, "cohort_risk");
    CHECK(cr != NULL && strcmp(cr->target, "iot.cohort_risk") == 0);
    const tp_defs_dataset_t *q = tp_defs_dataset_find(s, "daily_metrics");
    CHECK(q != NULL && q->has_pg && q->has_wh && q->n_covers == 1 && q->n_params == 3);
    CHECK(q != NULL && q->params[0].type == TP_DEFS_INT && q->params[1].type == TP_DEFS_DATE);
    const tp_defs_dataset_t *sr = tp_defs_dataset_find(s, "sensor_readings");
    CHECK(sr != NULL && !sr->has_pg && sr->has_wh && sr->n_params == 4);
    CHECK(sr != NULL && sr->params[2].type == TP_DEFS_TIMESTAMP);
    const tp_defs_dataset_t *c = tp_defs_dataset_find(s, "cohort_risk");
    CHECK(c != NULL && c->n_params == 1 && c->params[0].type == TP_DEFS_STRING);
    CHECK(tp_defs_dataset_find(s, "users") != NULL);
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);
    free(jd);
    free(qd);
}

int main(void)
{
    TP_RUN(job_errors_name_file_and_line);
    TP_RUN(jobs_load_with_defaults_and_lookup);
    TP_RUN(dataset_errors_name_file_and_line);
    TP_RUN(twins_must_match);
    TP_RUN(markers_skip_literals_comments_and_casts);
    TP_RUN(values_are_validated);
    TP_RUN(covers_route_old_requests);
    TP_RUN(params_with_choices);
    TP_RUN(files_from_other_editors);
    TP_RUN(mutated_input_never_crashes);
    TP_RUN(demo_definitions_parse);
    return tp_test_done();
}
