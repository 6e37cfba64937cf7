/* tidepool-sync as a daemon: a reader polling the target during repeated
 * snapshots never sees an empty or mixed table; NOTIFY tidepool_trigger runs
 * a job now and tidepool_sync announces job:generation; two daemons run each
 * job once at a time (sync_runs intervals never overlap); SIGTERM cancels the
 * statement in flight (the emulator logs the cancel and its backend stops)
 * and exits within 10 s; SIGHUP with a broken file keeps
 * the old jobs running, and re-reads the config file; warehouse faults are
 * survived; the sd_notify protocol (READY, STATUS, WATCHDOG, RELOADING,
 * STOPPING) against a test NOTIFY_SOCKET. */
#include "sync_fixture.h"

static const char lake_sql[] =
    "CREATE SCHEMA src;"
    "CREATE TABLE src.flip (id int, v int);"
    "INSERT INTO src.flip SELECT i, i FROM generate_series(1, 200) i;"
    "CREATE FUNCTION src.slow(x int) RETURNS int LANGUAGE sql AS $$ SELECT pg_sleep(0.05); SELECT x $$;"
    "CREATE TABLE src.big (id int, v text);"
    "INSERT INTO src.big SELECT i, repeat('x', 50) || i FROM generate_series(1, 2000) i;";

#define FLIP_JOB                                                                                   \
    "-- @target sink.flip\n-- @mode snapshot\n-- @key id\n-- @every 1s\nSELECT id, v FROM src.flip\n"

static PGconn *connect_or_fail(const char *dsn)
{
    PGconn *c = PQconnectdb(dsn);
    CHECK_MSG(PQstatus(c) == CONNECTION_OK, "connect: %s", PQerrorMessage(c));
    return c;
}

static void reader_never_sees_empty_or_mixed_table(void)
{
    char *dir = fx_jobs_dir("jobs_reader");
    fx_job(dir, "flip", FLIP_JOB);
    char *conf = fx_config("reader", dir, 2);
    pid_t d = fx_daemon(conf, "reader.log");
    CHECK(fx_wait_value("SELECT count(*)::text FROM tidepool.sync_state WHERE generation > 0 AND job = 'flip'",
                        "1", 15000));
    PGconn *lake = connect_or_fail(fx.wh_dsn);
    PGconn *rd = connect_or_fail(fx.dsn);
    /* Version k of the source: v = id + k for every row (sum 20100 + 200k). */
    long long deadline = fx_ms() + 6000, next_flip = 0;
    int k = 0, polls = 0, bad = 0;
    char seen[64] = "";
    int distinct = 0;
    long long last_sum = -1;
    while (fx_ms() < deadline) {
        if (fx_ms() >= next_flip) {
            k++;
            char sql[128];
            snprintf(sql, sizeof(sql), "UPDATE src.flip SET v = id + %d", k);
            PQclear(PQexec(lake, sql));
            next_flip = fx_ms() + 300;
        }
        PGresult *r = PQexec(rd, "SELECT count(*), sum(v), count(DISTINCT v - id) FROM sink.flip");
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            bad++;
            fprintf(stderr, "# reader error: %s", PQerrorMessage(rd));
        } else {
            long long n = atoll(PQgetvalue(r, 0, 0)), sum = atoll(PQgetvalue(r, 0, 1));
            long long offsets = atoll(PQgetvalue(r, 0, 2));
            if (n != 200 || offsets != 1 || (sum - 20100) % 200 != 0) {
                bad++;
                fprintf(stderr, "# reader saw count=%lld sum=%lld offsets=%lld\n", n, sum, offsets);
            }
            if (sum != last_sum) {
                distinct++;
                last_sum = sum;
            }
        }
        PQclear(r);
        polls++;
    }
    (void)seen;
    CHECK_INT_EQ(bad, 0);
    CHECK_MSG(distinct >= 3, "only %d versions seen in %d polls", distinct, polls);
    CHECK_MSG(polls > 100, "only %d polls", polls);
    PQfinish(lake);
    PQfinish(rd);
    long long t0 = fx_ms();
    int st = tp_test_stop(d, 10000);
    CHECK_MSG(fx_ms() - t0 < 10000, "SIGTERM took %lld ms", fx_ms() - t0);
    CHECK_INT_EQ(st, 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE status = 'running'"), 0);
    /* @every 1s, jittered by +-10%: from one run's end to the next run's start
     * is 0.9 s to 1.1 s (plus scheduling slack), and not the same every time */
    static const char gaps[] =
        "WITH g AS (SELECT extract(epoch FROM lead(started_at) OVER (ORDER BY started_at) - "
        "finished_at) * 1000 AS ms FROM tidepool.sync_runs WHERE job = 'flip') "
        "SELECT count(ms) || ' ' || floor(min(ms)) || ' ' || ceil(max(ms)) FROM g";
    char *v = fx_sql(fx.dsn, gaps);
    long long n = 0, lo = 0, hi = 0;
    CHECK(v && sscanf(v, "%lld %lld %lld", &n, &lo, &hi) == 3);
    fprintf(stderr, "# flip: %lld gaps between runs, %lld..%lld ms\n", n, lo, hi);
    CHECK_MSG(n >= 3, "only %lld runs followed one another", n);
    CHECK_MSG(lo >= 850 && hi <= 1700, "gaps %lld..%lld ms, want about 900..1100", lo, hi);
    CHECK_MSG(hi - lo >= 5, "every gap %lld ms: no jitter", lo);
    free(v);
    free(dir);
    free(conf);
}

/* --once on a terminal shows a progress line (rows, bytes, rate) that the
 * summary then replaces; without a terminal (cron, scripts) it shows none.
 * script(1) gives the daemon a pseudo-terminal. */
static void once_shows_progress_on_a_terminal(void)
{
    char *dir = fx_jobs_dir("jobs_progress");
    fx_job(dir, "prog", "-- @target sink.prog\n-- @mode snapshot\n-- @every 1h\n"
                        "SELECT id, src.slow(v) AS v FROM src.flip WHERE id <= 30\n");
    char *conf = fx_config("progress", dir, 1);
    char *out = NULL;
    char *cmd = fx_printf("script -qec '%s --config %s --once prog' /dev/null",
                          tp_test_bin("tidepool-sync"), conf);
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK_CONTAINS(out, "1 job(s) running: ");
    CHECK_CONTAINS(out, " rows/s");
    free(out);
    free(cmd);
    cmd = fx_printf("%s --config %s --once prog", tp_test_bin("tidepool-sync"), conf);
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK(out && strstr(out, "job(s) running:") == NULL);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.prog"), 30);
    free(out);
    free(cmd);
    free(conf);
    free(dir);
}

static void notify_trigger_runs_a_job_now(void)
{
    char *dir = fx_jobs_dir("jobs_trigger");
    fx_job(dir, "hourly", "-- @target sink.hourly\n-- @mode snapshot\n-- @every 1h\nSELECT id, v FROM src.flip\n");
    char *conf = fx_config("trigger", dir, 2);
    pid_t d = fx_daemon(conf, "trigger.log");
    CHECK(fx_wait_value("SELECT generation::text FROM tidepool.sync_state WHERE job = 'hourly'", "1", 15000));
    PGconn *l = connect_or_fail(fx.dsn);
    PQclear(PQexec(l, "LISTEN tidepool_sync"));
    usleep(300000); /* let the daemon's LISTEN connection settle */
    free(fx_sql(fx.dsn, "NOTIFY tidepool_trigger, 'hourly'"));
    CHECK(fx_wait_value("SELECT generation::text FROM tidepool.sync_state WHERE job = 'hourly'", "2", 10000));
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'hourly'"
                                " AND trigger = 'notify' AND status = 'succeeded'"),
                 1);
    /* The NOTIFY tidepool_sync 'hourly:2' reached a listener. */
    bool got = false;
    for (int i = 0; i < 50 && !got; i++) {
        PQconsumeInput(l);
        PGnotify *n;
        while ((n = PQnotifies(l)) != NULL) {
            if (strcmp(n->relname, "tidepool_sync") == 0 && strcmp(n->extra, "hourly:2") == 0)
                got = true;
            PQfreemem(n);
        }
        if (!got)
            usleep(100000);
    }
    CHECK(got);
    PQfinish(l);
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(dir);
    free(conf);
}

static void two_daemons_run_each_job_once_at_a_time(void)
{
    char *dir = fx_jobs_dir("jobs_ha");
    fx_job(dir, "ha1", "-- @target sink.ha1\n-- @mode snapshot\n-- @key id\n-- @every 1s\nSELECT id, v FROM src.flip\n");
    fx_job(dir, "ha2", "-- @target sink.ha2\n-- @mode snapshot\n-- @every 1s\n"
                       "SELECT id, src.slow(v) AS v FROM src.flip WHERE id <= 6\n");
    char *conf = fx_config("ha", dir, 2);
    pid_t a = fx_daemon(conf, "ha-a.log");
    pid_t b = fx_daemon(conf, "ha-b.log");
    sleep(6);
    CHECK_INT_EQ(tp_test_stop(a, 10000), 0);
    CHECK_INT_EQ(tp_test_stop(b, 10000), 0);
    long long runs = fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job IN ('ha1', 'ha2')"
                                    " AND status = 'succeeded'");
    CHECK_MSG(runs >= 5, "only %lld runs", runs);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs x JOIN tidepool.sync_runs y"
                                " ON x.job = y.job AND x.id < y.id AND x.job IN ('ha1', 'ha2')"
                                " AND x.started_at < coalesce(y.finished_at, 'infinity')"
                                " AND y.started_at < coalesce(x.finished_at, 'infinity')"),
                 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(DISTINCT daemon) FROM tidepool.sync_runs WHERE job IN ('ha1', 'ha2')"),
                 2);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job IN ('ha1', 'ha2')"
                                " AND status = 'failed'"),
                 0);
    free(dir);
    free(conf);
}

/* Lines of the emulator's request log that contain both strings. */
static int emu_log_count(const char *a, const char *b)
{
    FILE *f = fopen(fx.emu_log, "r");
    if (f == NULL)
        return -1;
    int n = 0;
    char line[4096];
    while (fgets(line, sizeof(line), f))
        if (strstr(line, a) && (b == NULL || strstr(line, b)))
            n++;
    fclose(f);
    return n;
}

/* Backends of the lakehouse database running the slow job's statement. */
static const char slow_backends[] = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                    " AND state = 'active' AND query LIKE '%src.slow(v)%'"
                                    " AND pid <> pg_backend_pid()";

static void sigterm_cancels_the_run_in_flight(void)
{
    char *dir = fx_jobs_dir("jobs_term");
    /* 200 rows x 50 ms: ten seconds of warehouse work. */
    fx_job(dir, "slow", "-- @target sink.slow\n-- @mode snapshot\n-- @every 1h\n"
                        "SELECT id, src.slow(v) AS v FROM src.flip\n");
    char *conf = fx_config("term", dir, 2);
    pid_t d = fx_daemon(conf, "term.log");
    CHECK(fx_wait_value("SELECT count(*)::text FROM tidepool.sync_runs WHERE job = 'slow' AND status = 'running'",
                        "1", 15000));
    usleep(500000);
    /* the warehouse is running it: the statement has seconds of work left */
    CHECK_INT_EQ(fx_num(fx.wh_dsn, slow_backends), 1);
    int cancels = emu_log_count("\"method\":\"POST\"", "/cancel\"");
    long long t0 = fx_ms();
    int st = tp_test_stop(d, 10000);
    long long took = fx_ms() - t0;
    CHECK_INT_EQ(st, 0);
    CHECK_MSG(took < 10000, "exit took %lld ms", took);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'slow'"
                                " AND status = 'canceled' AND error LIKE '%SIGTERM%'"),
                 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'slow'"), 0);
    /* The warehouse saw the cancel (statements are not cancelled by silence,
     * protocol §1.10) and its Postgres backend stopped long before the ~10 s
     * the statement would otherwise have run. */
    char *sid = fx_sql(fx.dsn, "SELECT statement_id FROM tidepool.sync_runs WHERE job = 'slow'"
                               " AND status = 'canceled'");
    CHECK_MSG(sid != NULL && *sid, "the canceled run has no statement id");
    if (sid != NULL && *sid) {
        char *path = fx_printf("/api/2.0/sql/statements/%s/cancel\"", sid);
        CHECK_INT_EQ(emu_log_count("\"method\":\"POST\"", path), 1);
        free(path);
    }
    free(sid);
    CHECK_MSG(emu_log_count("\"method\":\"POST\"", "/cancel\"") == cancels + 1, "cancels %d -> %d", cancels,
              emu_log_count("\"method\":\"POST\"", "/cancel\""));
    CHECK(fx_wait_value_on(fx.wh_dsn, slow_backends, "0", 2000));
    free(dir);
    free(conf);
}

static void sighup_with_broken_file_keeps_old_jobs(void)
{
    char *dir = fx_jobs_dir("jobs_hup");
    fx_job(dir, "hup1", "-- @target sink.hup1\n-- @mode snapshot\n-- @every 1s\nSELECT id, v FROM src.flip\n");
    char *conf = fx_config("hup", dir, 2);
    pid_t d = fx_daemon(conf, "hup.log");
    CHECK(fx_wait_value("SELECT (generation > 0)::text FROM tidepool.sync_state WHERE job = 'hup1'", "true", 15000));
    fx_job(dir, "hup2", "-- @target sink.hup2\n-- @mode incremental\n-- @every 1s\nSELECT 1 AS id\n");
    kill(d, SIGHUP);
    usleep(500000);
    long long g = fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'hup1'");
    char want[32];
    snprintf(want, sizeof(want), "%lld", g + 2);
    CHECK(fx_wait_value("SELECT generation::text FROM tidepool.sync_state WHERE job = 'hup1'", want, 10000));
    char *log = fx_read_log("hup.log");
    CHECK_CONTAINS(log, "reload refused");
    CHECK_CONTAINS(log, "hup2.sql:");
    free(log);
    fx_job(dir, "hup2", "-- @target sink.hup2\n-- @mode snapshot\n-- @every 1s\nSELECT id FROM src.flip\n");
    kill(d, SIGHUP);
    CHECK(fx_wait_value("SELECT count(*)::text FROM sink.hup2", "200", 10000));
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(dir);
    free(conf);
}

/* SIGHUP re-reads the config file: a new sync.definitions directory and
 * max_concurrent_jobs apply at once; a changed warehouse token is logged as
 * needing a restart (without its value); a broken file keeps everything. */
static void sighup_rereads_the_config_file(void)
{
    char *dir_a = fx_jobs_dir("jobs_cfg_a"), *dir_b = fx_jobs_dir("jobs_cfg_b");
    fx_job(dir_a, "cfga", "-- @target sink.cfga\n-- @mode snapshot\n-- @every 1s\nSELECT id, v FROM src.flip\n");
    fx_job(dir_b, "cfgb", "-- @target sink.cfgb\n-- @mode snapshot\n-- @every 1s\nSELECT id FROM src.flip\n");
    char *conf = fx_config("cfg", dir_a, 2);
    pid_t d = fx_daemon(conf, "cfg.log");
    CHECK(fx_wait_value("SELECT (generation > 0)::text FROM tidepool.sync_state WHERE job = 'cfga'", "true", 15000));
    char *text = fx_printf("[postgres]\ndsn = %s\n\n[warehouse]\nhost = http://127.0.0.1:%d\n"
                           "warehouse_id = tidepool-local\ntoken = tok-changed-secret\n\n"
                           "[sync]\ndefinitions = %s\nmax_concurrent_jobs = 3\n\n[log]\nlevel = info\n",
                           fx.dsn, fx.port, dir_b);
    free(tp_test_write_tmp("cfg.conf", text));
    free(text);
    kill(d, SIGHUP);
    CHECK(fx_wait_value("SELECT count(*)::text FROM sink.cfgb", "200", 15000));
    char *log = fx_read_log("cfg.log");
    CHECK_CONTAINS(log, "at most 3 job(s) at once");
    CHECK_CONTAINS(log, "\"setting\":\"warehouse.token\"");
    CHECK(strstr(log, "tok-changed-secret") == NULL);
    free(log);
    /* the job of the old directory is gone: its generation stops moving */
    long long g = fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'cfga'");
    sleep(3);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'cfga'"), g);
    /* a broken file: refused with file:line, cfgb keeps running */
    free(tp_test_write_tmp("cfg.conf", "[sync]\nmax_concurrent_jobs = lots\n"));
    kill(d, SIGHUP);
    g = fx_num(fx.dsn, "SELECT generation FROM tidepool.sync_state WHERE job = 'cfgb'");
    char want[32];
    snprintf(want, sizeof want, "%lld", g + 2);
    CHECK(fx_wait_value("SELECT generation::text FROM tidepool.sync_state WHERE job = 'cfgb'", want, 15000));
    log = fx_read_log("cfg.log");
    CHECK_CONTAINS(log, "config reload failed");
    CHECK_CONTAINS(log, "cfg.conf:2");
    free(log);
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    free(dir_a);
    free(dir_b);
    free(conf);
}

static void warehouse_faults_are_survived(void)
{
    char *dir = fx_jobs_dir("jobs_faults");
    fx_job(dir, "big", "-- @target sink.big\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                       "SELECT id, v FROM src.big\n");
    fx_job(dir, "bigjson", "-- @target sink.bigjson\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                           "SELECT id, v FROM src.big\n");
    char *conf = fx_config("faults", dir, 1);
    CHECK(fx_faults("status=503x2@execute,retry_after=1,status=500x1@get,drop_chunk=1,truncate_chunk=1,"
                    "status=429x1@chunk"));
    char *out = NULL;
    int rc = fx_once(conf, "big", NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_faults("status=503x1@execute,drop_chunk=2,latency=20@chunk"));
    rc = fx_once(conf, "bigjson", "TIDEPOOL_SYNC_FORMAT=json", &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK(fx_faults(NULL));
    const char *sum = "SELECT count(*) || md5(string_agg(id || v, ',' ORDER BY id)) FROM ";
    char *q1 = fx_printf("%s src.big", sum), *q2 = fx_printf("%s sink.big", sum), *q3 = fx_printf("%s sink.bigjson", sum);
    CHECK(fx_same(q1, q2, NULL));
    CHECK(fx_same(q1, q3, NULL));
    free(q1);
    free(q2);
    free(q3);
    free(dir);
    free(conf);
}

static void timeout_fails_the_run(void)
{
    char *dir = fx_jobs_dir("jobs_timeout");
    fx_job(dir, "late", "-- @target sink.late\n-- @mode snapshot\n-- @every 1h\n-- @timeout 1s\n"
                        "SELECT id, src.slow(v) AS v FROM src.flip\n");
    char *conf = fx_config("timeout", dir, 2);
    char *out = NULL;
    long long t0 = fx_ms();
    int rc = fx_once(conf, NULL, NULL, &out);
    CHECK_INT_EQ(rc, 1);
    CHECK_MSG(fx_ms() - t0 < 6000, "took %lld ms", fx_ms() - t0);
    CHECK_CONTAINS(out, "timed out after 1000 ms");
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'late'"
                                " AND status = 'failed' AND error LIKE '%timed out%' AND statement_id IS NOT NULL"),
                 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'late'"), 0);
    free(dir);
    free(conf);
}

static void postgres_connection_loss_is_retried(void)
{
    char *dir = fx_jobs_dir("jobs_pgloss");
    fx_job(dir, "pgloss", "-- @target sink.pgloss\n-- @mode snapshot\n-- @every 1h\n"
                          "SELECT id, src.slow(v) AS v FROM src.flip WHERE id <= 30\n");
    char *conf = fx_config("pgloss", dir, 2);
    char *argv[] = {(char *)tp_test_bin("tidepool-sync"), "--config", conf, "--once", NULL};
    char *log = fx_printf("%s/pgloss.log", tp_test_tmpdir());
    pid_t p = tp_test_spawn(argv, log);
    free(log);
    CHECK(fx_wait_value("SELECT count(*)::text FROM tidepool.sync_runs WHERE job = 'pgloss' AND status = 'running'",
                        "1", 10000));
    free(fx_sql(fx.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'tidepool-sync' AND pid <> pg_backend_pid()"));
    int st = -1;
    for (int i = 0; i < 200; i++) {
        if (waitpid(p, &st, WNOHANG) == p)
            break;
        usleep(100000);
    }
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d: %s", st, fx_tail(fx_read_log("pgloss.log"), 600));
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.pgloss"), 30);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'pgloss'"
                                " AND status = 'succeeded'"),
                 1);
    free(dir);
    free(conf);
}

/* Pairs of runs (of different jobs in conc_*) whose intervals overlap. */
static long long overlapping_runs(void)
{
    return fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs x JOIN tidepool.sync_runs y"
                          " ON x.id < y.id AND x.job LIKE 'conc%' AND y.job LIKE 'conc%'"
                          " AND x.started_at < y.finished_at AND y.started_at < x.finished_at");
}

static void max_concurrent_jobs_is_respected(void)
{
    char *dir = fx_jobs_dir("jobs_conc");
    for (int i = 0; i < 3; i++) {
        char name[16], text[256];
        snprintf(name, sizeof(name), "conc%d", i);
        snprintf(text, sizeof(text), "-- @target sink.conc%d\n-- @mode snapshot\n-- @every 1h\n"
                 "SELECT id, src.slow(v) AS v FROM src.flip WHERE id <= 8\n", i);
        fx_job(dir, name, text);
    }
    char *one = fx_config("conc1", dir, 1);
    char *out = NULL;
    int rc = fx_once(one, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job LIKE 'conc%'"
                                " AND status = 'succeeded'"),
                 3);
    CHECK_INT_EQ(overlapping_runs(), 0);
    /* With room for three they do overlap (so the check above can fail). */
    free(fx_sql(fx.dsn, "DELETE FROM tidepool.sync_runs WHERE job LIKE 'conc%'"));
    char *three = fx_config("conc3", dir, 3);
    rc = fx_once(three, NULL, NULL, &out);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, fx_tail(out, 700));
    free(out);
    CHECK_MSG(overlapping_runs() > 0, "three slots, yet no runs overlapped");
    free(dir);
    free(one);
    free(three);
}

static void sigterm_during_copy_records_the_cancel(void)
{
    char *dir = fx_jobs_dir("jobs_term2");
    fx_job(dir, "stream", "-- @target sink.stream\n-- @mode snapshot\n-- @key id\n-- @every 1h\n"
                          "SELECT id, v FROM src.big\n");
    char *conf = fx_config("term2", dir, 2);
    CHECK(fx_faults("latency=100@chunk"));
    pid_t d = fx_daemon(conf, "term2.log");
    /* 50 chunks x 100 ms: wait until rows are flowing into COPY. */
    CHECK(fx_wait_value("SELECT (coalesce(max(tuples_processed), 0) > 0)::text FROM pg_stat_progress_copy",
                        "true", 15000));
    long long t0 = fx_ms();
    int st = tp_test_stop(d, 10000);
    CHECK_INT_EQ(st, 0);
    CHECK_MSG(fx_ms() - t0 < 10000, "exit took %lld ms", fx_ms() - t0);
    CHECK(fx_faults(NULL));
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'stream'"
                                " AND status = 'canceled' AND error LIKE '%SIGTERM%' AND bytes > 0"),
                 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM pg_class WHERE relname IN ('stream', '_tp_new_stream')"), 0);
    free(dir);
    free(conf);
}

/* The sd_notify protocol of the real daemon against a test NOTIFY_SOCKET
 * (with WATCHDOG_USEC): READY=1 after migrations and the first connection,
 * then STATUS= with the job count, one STATUS= per finished run (rows and
 * time, or the failure and how many jobs fail), WATCHDOG=1 keep-alives,
 * RELOADING=1 then READY=1 and a new STATUS= on SIGHUP, STOPPING=1 on SIGTERM. */
static void notify_protocol(void)
{
    int fails0 = tp_test_failed_checks;
    char *dir = fx_jobs_dir("jobs_notify");
    fx_job(dir, "flip", FLIP_JOB);
    fx_job(dir, "broken", "-- @target sink.broken\n-- @mode snapshot\n-- @every 1h\n"
                          "SELECT id FROM src.no_such_table\n");
    char *conf = fx_config("notify", dir, 2);
    tp_test_notify_t nt;
    CHECK(tp_test_notify_open(&nt));
    setenv("WATCHDOG_USEC", "1000000", 1);
    pid_t d = fx_daemon(conf, "notify.log");
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    int ready = tp_test_notify_wait(&nt, 0, "READY=1", 15000);
    CHECK_MSG(ready >= 0, "no READY=1");
    CHECK(tp_test_notify_wait(&nt, 0, "STATUS=running 2 jobs, at most 2 at once", 5000) >= 0);
    int ok = tp_test_notify_wait(&nt, 0, "STATUS=flip ok ", 15000);
    CHECK_MSG(ok >= 0, "no STATUS= for the run that succeeded");
    if (ok >= 0)
        CHECK_CONTAINS(nt.msgs[ok], "flip ok 200 rows in "); /* COPY's count, not CSV lines */
    int failed = tp_test_notify_wait(&nt, 0, "STATUS=broken failed after ", 15000);
    CHECK_MSG(failed >= 0, "no STATUS= for the failed run");
    if (failed >= 0) {
        CHECK_CONTAINS(nt.msgs[failed], "no_such_table");
        CHECK_CONTAINS(nt.msgs[failed], "; 2 jobs, 1 failing");
    }
    CHECK(tp_test_notify_wait(&nt, 0, "WATCHDOG=1", 3000) >= 0);

    size_t mark = nt.n;
    fx_job(dir, "broken", "-- @target sink.broken\n-- @mode snapshot\n-- @every 1h\n"
                          "SELECT id FROM src.flip\n");
    kill(d, SIGHUP);
    int reloading = tp_test_notify_wait(&nt, mark, "RELOADING=1", 5000);
    CHECK_MSG(reloading >= 0, "no RELOADING=1 after SIGHUP");
    if (reloading >= 0) {
        CHECK_CONTAINS(nt.msgs[reloading], "MONOTONIC_USEC=");
        CHECK(tp_test_notify_wait(&nt, (size_t)reloading + 1, "READY=1", 5000) > reloading);
    }
    CHECK(tp_test_notify_wait(&nt, mark, "STATUS=reloaded: running 2 jobs", 5000) >= 0);

    mark = nt.n;
    kill(d, SIGTERM);
    CHECK_MSG(tp_test_notify_wait(&nt, mark, "STOPPING=1", 5000) >= 0,
              "no STOPPING=1 after SIGTERM");
    CHECK_INT_EQ(tp_test_stop(d, 10000), 0);
    if (tp_test_failed_checks > fails0)
        tp_test_notify_dump(&nt, 0);
    tp_test_notify_close(&nt);
    free(dir);
    free(conf);
}

static void a_dead_daemon_releases_its_jobs(void)
{
    char *dir = fx_jobs_dir("jobs_dead");
    fx_job(dir, "orphan", "-- @target sink.orphan\n-- @mode snapshot\n-- @every 1h\n"
                          "SELECT id, src.slow(v) AS v FROM src.flip WHERE id <= 40\n");
    char *conf = fx_config("dead", dir, 2);
    pid_t a = fx_daemon(conf, "dead-a.log");
    CHECK(fx_wait_value("SELECT count(*)::text FROM tidepool.sync_runs WHERE job = 'orphan' AND status = 'running'",
                        "1", 15000));
    kill(a, SIGKILL);
    int st;
    waitpid(a, &st, 0);
    pid_t b = fx_daemon(conf, "dead-b.log");
    CHECK(fx_wait_value("SELECT generation::text FROM tidepool.sync_state WHERE job = 'orphan'", "1", 15000));
    CHECK_INT_EQ(tp_test_stop(b, 10000), 0);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM tidepool.sync_runs WHERE job = 'orphan'"
                                " AND status = 'failed' AND error LIKE 'abandoned%'"),
                 1);
    CHECK_INT_EQ(fx_num(fx.dsn, "SELECT count(*) FROM sink.orphan"), 40);
    free(dir);
    free(conf);
}

int main(void)
{
    if (!fx_setup("test_sync_daemon", lake_sql, NULL))
        return tp_test_done();
    TP_RUN(reader_never_sees_empty_or_mixed_table);
    TP_RUN(once_shows_progress_on_a_terminal);
    TP_RUN(notify_trigger_runs_a_job_now);
    TP_RUN(two_daemons_run_each_job_once_at_a_time);
    TP_RUN(a_dead_daemon_releases_its_jobs);
    TP_RUN(notify_protocol);
    TP_RUN(sigterm_cancels_the_run_in_flight);
    TP_RUN(sigterm_during_copy_records_the_cancel);
    TP_RUN(sighup_with_broken_file_keeps_old_jobs);
    TP_RUN(sighup_rereads_the_config_file);
    TP_RUN(warehouse_faults_are_survived);
    TP_RUN(timeout_fails_the_run);
    TP_RUN(postgres_connection_loss_is_retried);
    TP_RUN(max_concurrent_jobs_is_respected);
    fx_stop_emulator();
    return tp_test_done();
}
