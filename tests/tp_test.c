/* Support code for the test programs: result lines, counters, and the
 * integration helpers declared in tp_test.h. Databases come from the harness
 * Postgres described by PGHOST/PGPORT/PGUSER (see tests/harness/pg.sh). */
#include "tp_test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

int tp_test_failed_checks;
static int n_pass, n_fail, n_skip;
static char first_failure[1024];
/* Checks that fail outside any TP_RUN case (set-up, tear-down such as a
 * server's exit status) must fail the program too, not vanish. */
static bool in_case;
static int n_outside;
static char first_outside[1024];
static char prog_name[256] = "test";
static char *g_dsn, *g_admin_dsn, *g_tmpdir;

void tp_test_fail(const char *file, int line, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!in_case && n_outside++ == 0)
        snprintf(first_outside, sizeof first_outside, "%s:%d: %s", file, line, msg);
    if (tp_test_failed_checks++ == 0)
        snprintf(first_failure, sizeof first_failure, "%s:%d: %s", file, line, msg);
    fprintf(stderr, "#   %s:%d: %s\n", file, line, msg);
}

bool tp_test_run(const char *name, void (*fn)(void))
{
    tp_test_failed_checks = 0;
    first_failure[0] = '\0';
    in_case = true;
    fn();
    in_case = false;
    if (tp_test_failed_checks == 0) {
        n_pass++;
        printf("ok - %s\n", name);
    } else {
        n_fail++;
        printf("not ok - %s: %s\n", name, first_failure);
    }
    fflush(stdout);
    return tp_test_failed_checks == 0;
}

void tp_test_skip(const char *name, const char *why)
{
    n_skip++;
    printf("skip - %s: %s\n", name, why);
    fflush(stdout);
}

bool tp_test_any_failure(void)
{
    return n_fail > 0 || n_outside > 0;
}

int tp_test_done(void)
{
    if (n_outside > 0) {
        n_fail++;
        printf("not ok - outside any case (set-up or tear-down): %s\n", first_outside);
    }
    printf("# %s: %d passed, %d failed, %d skipped\n", prog_name, n_pass, n_fail, n_skip);
    if (g_tmpdir) {
        char *cmd = NULL;
        if (asprintf(&cmd, "rm -rf '%s'", g_tmpdir) > 0 && getenv("TP_KEEP_TMP") == NULL)
            (void)!system(cmd);
        free(cmd);
    }
    return n_fail ? 1 : 0;
}

__attribute__((constructor)) static void init_name(void)
{
    char buf[256];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n > 0) {
        buf[n] = '\0';
        snprintf(prog_name, sizeof prog_name, "%s", basename(buf));
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
}

static char *conninfo_for(const char *db)
{
    const char *host = getenv("PGHOST"), *port = getenv("PGPORT"), *user = getenv("PGUSER");
    if (host == NULL || port == NULL)
        return NULL;
    char *s = NULL;
    if (asprintf(&s, "host=%s port=%s user=%s dbname=%s", host, port, user ? user : "tidepool", db) < 0)
        abort();
    return s;
}

const char *tp_test_admin_dsn(void)
{
    if (g_admin_dsn == NULL)
        g_admin_dsn = conninfo_for("postgres");
    return g_admin_dsn;
}

static bool exec_admin(const char *sql)
{
    PGconn *c = PQconnectdb(tp_test_admin_dsn());
    bool ok = PQstatus(c) == CONNECTION_OK;
    if (ok) {
        PGresult *r = PQexec(c, sql);
        ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "# admin sql failed: %s: %s", sql, PQerrorMessage(c));
        PQclear(r);
    } else {
        fprintf(stderr, "# cannot connect to harness postgres: %s", PQerrorMessage(c));
    }
    PQfinish(c);
    return ok;
}

/* Without PGHOST/PGPORT there is no harness and NULL means "skip". With them,
 * a database that cannot be made is a broken harness: a failure, so that a
 * program skipping its cases for it cannot pass `make check` unnoticed. */
char *tp_test_new_db(const char *name)
{
    if (tp_test_admin_dsn() == NULL)
        return NULL;
    char sql[512];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS \"%s\" WITH (FORCE)", name);
    bool ok = exec_admin(sql);
    if (ok) {
        snprintf(sql, sizeof sql, "CREATE DATABASE \"%s\"", name);
        ok = exec_admin(sql);
    }
    if (!ok) {
        tp_test_fail(__FILE__, __LINE__, "cannot create test database %s on the harness Postgres",
                     name);
        return NULL;
    }
    return conninfo_for(name);
}

const char *tp_test_dsn(void)
{
    if (g_dsn == NULL) {
        char name[300];
        snprintf(name, sizeof name, "t_%s", prog_name);
        for (char *p = name; *p; p++)
            if (*p == '-' || *p == '.')
                *p = '_';
        g_dsn = tp_test_new_db(name);
    }
    return g_dsn;
}

char *tp_test_sql(const char *dsn, const char *sql)
{
    PGconn *c = PQconnectdb(dsn);
    char *out = NULL;
    if (PQstatus(c) != CONNECTION_OK) {
        tp_test_fail(__FILE__, __LINE__, "connect: %s", PQerrorMessage(c));
    } else {
        PGresult *r = PQexec(c, sql);
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && PQnfields(r) > 0)
            out = strdup(PQgetisnull(r, 0, 0) ? "" : PQgetvalue(r, 0, 0));
        else if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
            out = strdup("");
        else
            tp_test_fail(__FILE__, __LINE__, "sql %s: %s", sql, PQerrorMessage(c));
        PQclear(r);
    }
    PQfinish(c);
    return out;
}

int tp_test_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

const char *tp_test_bin(const char *program)
{
    static char path[4][512];
    static int next;
    const char *dir = getenv("TP_BINDIR");
    char *p = path[next++ % 4];
    snprintf(p, 512, "%s/%s", dir ? dir : "bin", program);
    return p;
}

pid_t tp_test_spawn(char *const argv[], const char *log_path)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fd = open(log_path ? log_path : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        signal(SIGPIPE, SIG_DFL);
        /* a test that dies (an ASan abort, a crash) takes its servers with it,
         * instead of leaving them running into the next program's time */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() == 1)
            _exit(127);
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

bool tp_test_wait_port(int port, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 20) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
        close(fd);
        if (rc == 0)
            return true;
        usleep(20000);
    }
    return false;
}

int tp_test_stop(pid_t pid, int timeout_ms)
{
    int status;
    if (pid <= 0)
        return -1;
    kill(pid, SIGTERM);
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -SIGKILL;
}

int tp_test_cmd(const char *cmd, char **out)
{
    char *full = NULL;
    if (asprintf(&full, "(%s) 2>&1", cmd) < 0)
        abort();
    FILE *p = popen(full, "r");
    free(full);
    if (p == NULL)
        return -1;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 2)
            buf = realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    int st = pclose(p);
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

const char *tp_test_tmpdir(void)
{
    if (g_tmpdir == NULL) {
        char tmpl[] = "/tmp/tp_test_XXXXXX";
        char *d = mkdtemp(tmpl);
        if (d == NULL)
            abort();
        chmod(d, 0755);
        g_tmpdir = strdup(d);
    }
    return g_tmpdir;
}

char *tp_test_write_tmp(const char *name, const char *text)
{
    char *path = NULL;
    if (asprintf(&path, "%s/%s", tp_test_tmpdir(), name) < 0)
        abort();
    FILE *f = fopen(path, "w");
    if (f == NULL)
        abort();
    fputs(text, f);
    fclose(f);
    return path;
}

/* ---- a stand-in for the service manager's notification socket ---- */

bool tp_test_notify_open(tp_test_notify_t *n)
{
    static int seq;
    memset(n, 0, sizeof *n);
    n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (n->fd < 0)
        return false;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int len = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/notify-%d-%d.sock", tp_test_tmpdir(),
                       (int)getpid(), ++seq);
    if (len <= 0 || (size_t)len >= sizeof sa.sun_path) {
        close(n->fd);
        n->fd = -1;
        return false;
    }
    unlink(sa.sun_path);
    if (bind(n->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(n->fd);
        n->fd = -1;
        return false;
    }
    snprintf(n->path, sizeof n->path, "%s", sa.sun_path);
    setenv("NOTIFY_SOCKET", n->path, 1);
    return true;
}

/* Receives the datagrams that arrive within timeout_ms (or until one contains
 * stop, when non-NULL); returns the index of that one or -1. */
static int notify_recv(tp_test_notify_t *n, const char *stop, int timeout_ms)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = timeout_ms - ((now.tv_sec - t0.tv_sec) * 1000L +
                                  (now.tv_nsec - t0.tv_nsec) / 1000000L);
        if (left <= 0)
            return -1;
        struct pollfd p = {.fd = n->fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) != 1)
            continue;
        char buf[4096];
        ssize_t got = recv(n->fd, buf, sizeof buf - 1, MSG_DONTWAIT);
        if (got <= 0)
            continue;
        buf[got] = '\0';
        if (n->n == n->cap) {
            n->cap = n->cap ? n->cap * 2 : 64;
            n->msgs = realloc(n->msgs, n->cap * sizeof *n->msgs);
            if (n->msgs == NULL)
                abort();
        }
        n->msgs[n->n] = strdup(buf);
        if (n->msgs[n->n] == NULL)
            abort();
        n->n++;
        if (stop != NULL && strstr(buf, stop) != NULL)
            return (int)n->n - 1;
    }
}

int tp_test_notify_find(const tp_test_notify_t *n, size_t from, const char *want)
{
    for (size_t i = from; i < n->n; i++)
        if (strstr(n->msgs[i], want) != NULL)
            return (int)i;
    return -1;
}

int tp_test_notify_wait(tp_test_notify_t *n, size_t from, const char *want, int timeout_ms)
{
    int i = tp_test_notify_find(n, from, want);
    return i >= 0 ? i : notify_recv(n, want, timeout_ms);
}

void tp_test_notify_collect(tp_test_notify_t *n, int ms)
{
    (void)notify_recv(n, NULL, ms);
}

int tp_test_notify_count(const tp_test_notify_t *n, size_t from, const char *want)
{
    int count = 0;
    for (size_t i = from; i < n->n; i++)
        count += strstr(n->msgs[i], want) != NULL;
    return count;
}

void tp_test_notify_dump(const tp_test_notify_t *n, size_t from)
{
    for (size_t i = from; i < n->n; i++)
        if (strcmp(n->msgs[i], "WATCHDOG=1") != 0)
            fprintf(stdout, "#   notify[%zu]: %s\n", i, n->msgs[i]);
}

void tp_test_notify_close(tp_test_notify_t *n)
{
    if (n->fd >= 0)
        close(n->fd);
    if (n->path[0])
        unlink(n->path);
    for (size_t i = 0; i < n->n; i++)
        free(n->msgs[i]);
    free(n->msgs);
    memset(n, 0, sizeof *n);
    n->fd = -1;
}
