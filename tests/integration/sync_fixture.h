/* Shared set-up for the tidepool-sync integration tests (header-only, static):
 * a "lakehouse" database served by the real emulator over HTTP, the harness
 * Postgres as the target, job directories and config files in the test's
 * temporary directory, and helpers to run the daemon. */
#ifndef TIDEPOOL_TESTS_SYNC_FIXTURE_H
#define TIDEPOOL_TESTS_SYNC_FIXTURE_H

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "../tp_test.h"

typedef struct fx {
    char *wh_dsn;    /* the emulator's database */
    const char *dsn; /* the target database */
    int port;
    pid_t emu;
    char *emu_log;
} fx_t;

static fx_t fx;

static __attribute__((unused)) char *fx_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static __attribute__((unused)) char *fx_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    va_end(ap);
    return s;
}

/* Runs sql on dsn; returns the first cell (caller frees) or NULL on error. */
static __attribute__((unused)) char *fx_sql(const char *dsn, const char *sql)
{
    return tp_test_sql(dsn, sql);
}

static __attribute__((unused)) long long fx_num(const char *dsn, const char *sql)
{
    char *v = fx_sql(dsn, sql);
    long long n = v && *v ? atoll(v) : -1;
    free(v);
    return n;
}

/* Same value in both databases? (e.g. a checksum of the source and the target) */
static __attribute__((unused)) bool fx_same(const char *sql_wh, const char *sql_tgt, char **a_out)
{
    char *a = fx_sql(fx.wh_dsn, sql_wh);
    char *b = fx_sql(fx.dsn, sql_tgt);
    bool same = a && b && strcmp(a, b) == 0;
    if (!same)
        fprintf(stderr, "# differ: warehouse=%s target=%s\n", a ? a : "(err)", b ? b : "(err)");
    if (a_out)
        *a_out = a;
    else
        free(a);
    free(b);
    return same;
}

static __attribute__((unused)) bool fx_start_emulator(const char *faults)
{
    fx.port = tp_test_free_port();
    char listen[64];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", fx.port);
    char *argv[16];
    int n = 0;
    argv[n++] = (char *)tp_test_bin("tidepool-warehouse");
    argv[n++] = "--listen";
    argv[n++] = listen;
    argv[n++] = "--dsn";
    argv[n++] = fx.wh_dsn;
    argv[n++] = "--token";
    argv[n++] = "tok-sync-test";
    argv[n++] = "--chunk-rows";
    argv[n++] = "40";
    if (faults) {
        argv[n++] = "--faults";
        argv[n++] = (char *)faults;
    }
    argv[n] = NULL;
    free(fx.emu_log);
    fx.emu_log = fx_printf("%s/emulator-%d.log", tp_test_tmpdir(), fx.port);
    fx.emu = tp_test_spawn(argv, fx.emu_log);
    return fx.emu > 0 && tp_test_wait_port(fx.port, 10000);
}

static __attribute__((unused)) void fx_stop_emulator(void)
{
    if (fx.emu > 0)
        tp_test_stop(fx.emu, 3000);
    fx.emu = 0;
}

/* Creates the lakehouse database (wh_setup runs there) and starts the emulator.
 * Returns false (and skips) when the harness has no Postgres. */
static __attribute__((unused)) bool fx_setup(const char *prog, const char *wh_setup, const char *faults)
{
    fx.dsn = tp_test_dsn();
    if (fx.dsn == NULL) {
        tp_test_skip(prog, "no harness Postgres");
        return false;
    }
    fx.wh_dsn = tp_test_new_db("lake");
    char *r = fx_sql(fx.wh_dsn, wh_setup);
    free(r);
    char *root = getenv("TP_ROOT");
    if (root) {
        char *m = fx_printf("%s/sql/migrations", root);
        setenv("TIDEPOOL_MIGRATIONS_DIR", m, 1);
        free(m);
    }
    return fx_start_emulator(faults);
}

/* A fresh directory of job definitions under the test's tmpdir. */
static __attribute__((unused)) char *fx_jobs_dir(const char *name)
{
    char *d = fx_printf("%s/%s", tp_test_tmpdir(), name);
    mkdir(d, 0755);
    return d;
}

static __attribute__((unused)) void fx_job(const char *dir, const char *name, const char *text)
{
    const char *base = strrchr(dir, '/') + 1;
    char *rel = fx_printf("%s/%s.sql", base, name);
    free(tp_test_write_tmp(rel, text));
    free(rel);
}

/* A config file for the daemon: target Postgres, emulator, jobs dir. */
static __attribute__((unused)) char *fx_config(const char *name, const char *jobs_dir, int max_jobs)
{
    char *text = fx_printf("[postgres]\ndsn = %s\n\n[warehouse]\nhost = http://127.0.0.1:%d\n"
                           "warehouse_id = tidepool-local\ntoken = tok-sync-test\n\n"
                           "[sync]\ndefinitions = %s\nmax_concurrent_jobs = %d\n\n[log]\nlevel = info\n",
                           fx.dsn, fx.port, jobs_dir, max_jobs);
    char *rel = fx_printf("%s.conf", name);
    char *path = tp_test_write_tmp(rel, text);
    free(rel);
    free(text);
    return path;
}

/* Runs tidepool-sync --once [job] with env prefix; returns the exit status. */
static __attribute__((unused)) int fx_once(const char *conf, const char *job, const char *env, char **out)
{
    char *cmd = fx_printf("%s %s --config %s --once %s 2>&1", env ? env : "",
                          tp_test_bin("tidepool-sync"), conf, job ? job : "");
    char *o = NULL;
    int rc = tp_test_cmd(cmd, &o);
    free(cmd);
    if (out)
        *out = o;
    else
        free(o);
    return rc;
}

/* Starts the daemon in the background (log in tmpdir). */
static __attribute__((unused)) pid_t fx_daemon(const char *conf, const char *log_name)
{
    char *log = fx_printf("%s/%s", tp_test_tmpdir(), log_name);
    char *argv[] = {(char *)tp_test_bin("tidepool-sync"), "--config", (char *)conf, NULL};
    pid_t p = tp_test_spawn(argv, log);
    free(log);
    return p;
}

static __attribute__((unused)) char *fx_read_log(const char *log_name)
{
    char *p = fx_printf("%s/%s", tp_test_tmpdir(), log_name);
    FILE *f = fopen(p, "r");
    free(p);
    if (!f)
        return strdup("");
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    char tmp[4096];
    size_t n;
    while ((n = fread(tmp, 1, sizeof(tmp), f)) > 0)
        fwrite(tmp, 1, n, m);
    fclose(f);
    fclose(m);
    return buf;
}

/* Polls until sql on dsn returns want (as text) or timeout. */
static __attribute__((unused)) bool fx_wait_value_on(const char *dsn, const char *sql, const char *want,
                                                     int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 100) {
        PGconn *c = PQconnectdb(dsn);
        bool ok = false;
        if (PQstatus(c) == CONNECTION_OK) {
            PGresult *r = PQexec(c, sql);
            ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 &&
                 strcmp(PQgetvalue(r, 0, 0), want) == 0;
            PQclear(r);
        }
        PQfinish(c);
        if (ok)
            return true;
        usleep(100000);
    }
    return false;
}

/* Polls until sql on the target returns want (as text) or timeout. */
static __attribute__((unused)) bool fx_wait_value(const char *sql, const char *want, int timeout_ms)
{
    return fx_wait_value_on(fx.dsn, sql, want, timeout_ms);
}

/* Sets the emulator's faults at run time (POST /admin/faults); NULL clears. */
static __attribute__((unused)) bool fx_faults(const char *spec)
{
    char *cmd = spec ? fx_printf("curl -sf -X POST -H 'Authorization: Bearer tok-sync-test'"
                                 " -d '{\"spec\": \"%s\"}' http://127.0.0.1:%d/admin/faults", spec, fx.port)
                     : fx_printf("curl -sf -X DELETE -H 'Authorization: Bearer tok-sync-test'"
                                 " http://127.0.0.1:%d/admin/faults", fx.port);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    if (rc != 0)
        fprintf(stderr, "# faults: %s\n", out ? out : "");
    free(out);
    free(cmd);
    return rc == 0;
}

/* The last n bytes of s (for failure messages). */
static __attribute__((unused)) const char *fx_tail(const char *s, size_t n)
{
    if (s == NULL)
        return "(null)";
    size_t len = strlen(s);
    return len > n ? s + len - n : s;
}

/* Milliseconds since an arbitrary start. */
static __attribute__((unused)) long long fx_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif
