/* kill -9 of tidepool-sync at random points during 20 runs (the emulator
 * slows each chunk down so kills land mid-stream, mid-COPY and mid-swap):
 * the snapshot target is always absent or one whole version of the source,
 * the incremental target always holds every source row up to the stored
 * watermark (no skipped range), and a final clean run converges. */
#include "sync_fixture.h"

static const char lake_sql[] =
    "CREATE SCHEMA src;"
    "CREATE TABLE src.snap (id int, v int);"
    "INSERT INTO src.snap SELECT i, i FROM generate_series(1, 300) i;"
    "CREATE TABLE src.inc (id int, val int, updated_at timestamptz);"
    "INSERT INTO src.inc SELECT i, i, timestamptz '2025-01-01 00:00:00+00' + i * interval '1 second'"
    " FROM generate_series(1, 200) i;";

/* Every source row with updated_at <= the stored watermark is in the target as is. */
static bool no_skipped_range(int iter)
{
    /* A daemon killed during its start-up migrations may leave no schema yet. */
    if (fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE oid = to_regclass('tidepool.sync_state')") != 1)
        return true;
    char *wm = fx_sql(fx.dsn, "SELECT coalesce(watermark, '') FROM tidepool.sync_state WHERE job = 'inc'");
    bool ok = true;
    if (wm && *wm) {
        char *q = fx_printf("SELECT count(*) || ';' || coalesce(string_agg(format('(%%s,%%s,%%L)', id, val,"
                            " updated_at), ','), '') FROM src.inc WHERE updated_at <= '%s'::timestamptz",
                            wm);
        char *rows = fx_sql(fx.wh_dsn, q);
        free(q);
        char *semi = rows ? strchr(rows, ';') : NULL;
        if (semi && semi[1]) {
            *semi = '\0';
            q = fx_printf("SELECT count(*) FROM sink.inc t JOIN (VALUES %s) s(id, val, ua)"
                          " ON t.id = s.id AND t.val = s.val AND t.updated_at = s.ua::timestamptz",
                          semi + 1);
            long long have = fx_num(fx.dsn, q);
            free(q);
            if (have != atoll(rows)) {
                fprintf(stderr, "# iteration %d: watermark %s: source has %s rows up to it, target %lld\n",
                        iter, wm, rows, have);
                ok = false;
            }
        }
        free(rows);
    }
    free(wm);
    return ok;
}

static void kill9_never_leaves_partial_or_skipped_data(void)
{
    char *dir = fx_jobs_dir("jobs_crash");
    fx_job(dir, "snap", "-- @target sink.snap\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                        "SELECT id, v FROM src.snap\n");
    fx_job(dir, "inc", "-- @target sink.inc\n-- @mode incremental\n-- @key id\n-- @watermark updated_at\n"
                       "-- @every 1h\nSELECT id, val, updated_at FROM src.inc\n"
                       "WHERE :watermark IS NULL OR updated_at > CAST(:watermark AS TIMESTAMP)\n");
    char *conf = fx_config("crash", dir, 2);
    CHECK(fx_faults("latency=60@chunk"));
    unsigned seed = (unsigned)getpid();
    srand(seed);
    int killed_mid = 0;
    for (int i = 1; i <= 20; i++) {
        char *m = fx_printf("UPDATE src.snap SET v = id + %d;"
                            "INSERT INTO src.inc SELECT 1000 + %d * 10 + j, j,"
                            " timestamptz '2025-06-01 00:00:00+00' + (%d * 10 + j) * interval '1 second'"
                            " FROM generate_series(1, 5) j;"
                            "UPDATE src.inc SET val = val + 1,"
                            " updated_at = timestamptz '2025-06-01 00:00:00+00' + (%d * 10 + 6) * interval '1 second'"
                            " WHERE id = %d;",
                            i, i, i, i, 1 + rand() % 200);
        free(fx_sql(fx.wh_dsn, m));
        free(m);
        char *argv[] = {(char *)tp_test_bin("tidepool-sync"), "--config", conf, "--once", NULL};
        char *log = fx_printf("%s/crash-%d.log", tp_test_tmpdir(), i);
        pid_t p = tp_test_spawn(argv, log);
        free(log);
        usleep((useconds_t)(30000 + rand() % 600000));
        int st = 0;
        if (waitpid(p, &st, WNOHANG) == 0) {
            kill(p, SIGKILL);
            waitpid(p, &st, 0);
            killed_mid++;
        }
        long long n = -2;
        if (fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE oid = to_regclass('sink.snap')") == 1)
            n = fx_num(fx.dsn, "SELECT count(*) * 10 + count(DISTINCT v - id) FROM sink.snap");
        CHECK_MSG(n == -2 || n == 3001, "iteration %d (seed %u): snapshot target count*10+versions = %lld", i,
                  seed, n);
        CHECK_MSG(no_skipped_range(i), "iteration %d (seed %u): skipped incremental range", i, seed);
        CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_tp\\_%'"), 0);
    }
    CHECK_MSG(killed_mid >= 10, "only %d of 20 runs were killed mid-way", killed_mid);
    CHECK(fx_faults(NULL));
    char *out = NULL;
    int rc = fx_once(conf, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_same("SELECT count(*) || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM src.snap",
                  "SELECT count(*) || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM sink.snap", NULL));
    CHECK(fx_same("SELECT count(*) || md5(string_agg(concat_ws(':', id, val, updated_at), ',' ORDER BY id))"
                  " FROM src.inc",
                  "SELECT count(*) || md5(string_agg(concat_ws(':', id, val, updated_at), ',' ORDER BY id))"
                  " FROM sink.inc",
                  NULL));
    /* The abandoned 'running' rows were closed by later runs. */
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE status = 'running'"), 0);
    free(dir);
    free(conf);
}

int main(void)
{
    if (!fx_setup("test_sync_crash", lake_sql, NULL))
        return tp_test_done();
    TP_RUN(kill9_never_leaves_partial_or_skipped_data);
    fx_stop_emulator();
    return tp_test_done();
}
