/* Minimal test framework: each tests/{unit,integration}/test_*.c is one program
 * whose main() calls TP_RUN for each case. Output is one line per case,
 * "ok - name" or "not ok - name: file:line: what", which tests/run counts.
 * Integration helpers: the throwaway Postgres from the harness (PG* variables),
 * free ports, spawning the project's programs and waiting for them. */
#ifndef TIDEPOOL_TP_TEST_H
#define TIDEPOOL_TP_TEST_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

extern int tp_test_failed_checks;

void tp_test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Runs fn as one test case, prints its result line; returns false if it failed. */
bool tp_test_run(const char *name, void (*fn)(void));
/* True once any case has failed, or any check outside a case. */
bool tp_test_any_failure(void);
/* Prints the per-program summary and returns main()'s exit status; checks
 * that failed outside any case count as one more failed case. */
int tp_test_done(void);
/* Marks the whole program skipped (printed as "skip - name: why") and counted as such. */
void tp_test_skip(const char *name, const char *why);

#define TP_RUN(fn) tp_test_run(#fn, fn)

#define CHECK(cond)                                                                \
    do {                                                                           \
        if (!(cond))                                                               \
            tp_test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond);                  \
    } while (0)
#define CHECK_MSG(cond, ...)                                                       \
    do {                                                                           \
        if (!(cond))                                                               \
            tp_test_fail(__FILE__, __LINE__, __VA_ARGS__);                         \
    } while (0)
#define CHECK_INT_EQ(a, b)                                                         \
    do {                                                                           \
        long long _a = (long long)(a), _b = (long long)(b);                        \
        if (_a != _b)                                                              \
            tp_test_fail(__FILE__, __LINE__, "%s == %s: %lld != %lld", #a, #b, _a, _b); \
    } while (0)
#define CHECK_STR_EQ(a, b)                                                         \
    do {                                                                           \
        const char *_a = (a), *_b = (b);                                           \
        if (_a == NULL || _b == NULL || strcmp(_a, _b) != 0)                       \
            tp_test_fail(__FILE__, __LINE__, "%s == %s: \"%s\" != \"%s\"", #a, #b, \
                         _a ? _a : "(null)", _b ? _b : "(null)");                  \
    } while (0)
#define CHECK_CONTAINS(hay, needle)                                                \
    do {                                                                           \
        const char *_h = (hay), *_n = (needle);                                    \
        if (_h == NULL || strstr(_h, _n) == NULL)                                  \
            tp_test_fail(__FILE__, __LINE__, "%s contains \"%s\": got \"%s\"", #hay, _n, \
                         _h ? _h : "(null)");                                      \
    } while (0)

/* ---- integration support ---- */

/* Conninfo for a fresh database named after the test program: created on first
 * call (dropped first if left over). NULL when no harness Postgres is running. */
const char *tp_test_dsn(void);
/* Creates another empty database and returns its conninfo (caller frees). */
char *tp_test_new_db(const char *name);
/* Conninfo for the harness's maintenance database "postgres". */
const char *tp_test_admin_dsn(void);
/* Runs SQL on dsn and returns the first cell of the first row (caller frees),
 * or NULL on error (the error is recorded as a test failure). */
char *tp_test_sql(const char *dsn, const char *sql);
/* A TCP port on 127.0.0.1 that was free a moment ago. */
int tp_test_free_port(void);
/* Path of one of the project's programs ("tidepool-warehouse") in TP_BINDIR. */
const char *tp_test_bin(const char *program);
/* Starts argv[0] with argv (stdout/stderr to log_path, NULL = /dev/null).
 * Returns the pid, or -1. */
pid_t tp_test_spawn(char *const argv[], const char *log_path);
/* Waits until something accepts TCP connections on 127.0.0.1:port. */
bool tp_test_wait_port(int port, int timeout_ms);
/* SIGTERM, then SIGKILL after timeout_ms; returns the exit status (or -signal). */
int tp_test_stop(pid_t pid, int timeout_ms);
/* Runs a shell command, captures stdout+stderr into *out (caller frees); returns exit status. */
int tp_test_cmd(const char *cmd, char **out);
/* Writes text to a fresh file in the test's temporary directory; returns its path (caller frees). */
char *tp_test_write_tmp(const char *name, const char *text);
/* The test program's private temporary directory (created on first use). */
const char *tp_test_tmpdir(void);

/* ---- a stand-in for systemd's notification socket (sd_notify) ---- */

typedef struct tp_test_notify {
    int fd;
    char path[108];
    char **msgs; /* every datagram received so far, in order */
    size_t n, cap;
} tp_test_notify_t;

/* Binds a datagram socket in the tmpdir and sets NOTIFY_SOCKET to it (unset it
 * once the program under test is spawned). False if it cannot. */
bool tp_test_notify_open(tp_test_notify_t *n);
/* Index of the first datagram at index >= from containing want, receiving more
 * for up to timeout_ms if none has yet; -1 if none came. */
int tp_test_notify_wait(tp_test_notify_t *n, size_t from, const char *want, int timeout_ms);
/* The same among the datagrams already received (no waiting). */
int tp_test_notify_find(const tp_test_notify_t *n, size_t from, const char *want);
/* Receives whatever arrives during ms. */
void tp_test_notify_collect(tp_test_notify_t *n, int ms);
/* How many datagrams at index >= from contain want. */
int tp_test_notify_count(const tp_test_notify_t *n, size_t from, const char *want);
/* Prints the datagrams from index from as "#" comment lines (keep-alives left out). */
void tp_test_notify_dump(const tp_test_notify_t *n, size_t from);
/* Closes and unlinks the socket, frees the datagrams. */
void tp_test_notify_close(tp_test_notify_t *n);

#endif
