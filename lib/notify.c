/* sd_notify protocol and watchdog keep-alive, implemented directly.
 * The protocol is one datagram of "KEY=VALUE\n..." text sent to the AF_UNIX
 * socket named by $NOTIFY_SOCKET (a path, or "@name" for the abstract
 * namespace). That is twenty lines of code, so we do not link libsystemd for
 * it: the binaries stay free of a dependency that Databricks Apps, containers
 * and static builds do not have, and there is no dlopen dance. Each call opens
 * a SOCK_DGRAM|SOCK_CLOEXEC|SOCK_NONBLOCK socket, sends, and closes it: no
 * global state, safe from any thread, and never blocks an event loop (a full
 * receiver queue is a logged failure, not a stall). Not supported: passing
 * file descriptors (FDSTORE), vsock: addresses, and sending on behalf of
 * another pid. The watchdog helper is a persistent libevent timer at half of
 * WATCHDOG_USEC on the caller's loop, so a stuck loop stops the keep-alives. */
#include "tidepool/notify.h"

#include <errno.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "tidepool/log.h"

#define WD_MAGIC 0x7764746eu /* "ntdw" */
#define STATUS_MAX 1000

struct tp_notify_wd {
    uint32_t magic;
    struct event *timer;
    uint64_t sent;
    bool (*healthy)(void *arg, char *why, size_t whylen);
    void *healthy_arg;
    bool withholding; /* the last tick withheld its keep-alive (logged once) */
};

/* Fills *sa from NOTIFY_SOCKET's value; returns the address length or 0 with
 * a reason in *why. */
static socklen_t notify_addr(const char *name, struct sockaddr_un *sa, const char **why)
{
    size_t len = strlen(name);
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (name[0] != '/' && name[0] != '@') {
        *why = "NOTIFY_SOCKET is neither an absolute path nor an @abstract name";
        return 0;
    }
    if (len < 2 || len >= sizeof(sa->sun_path)) {
        *why = "NOTIFY_SOCKET has an invalid length";
        return 0;
    }
    memcpy(sa->sun_path, name, len);
    if (name[0] == '@') {
        /* Abstract namespace: leading NUL, and the length counts exactly the
         * name's bytes (no terminator), or the kernel sees another name. */
        sa->sun_path[0] = '\0';
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    }
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
}

/* True when a service manager listens; lets callers skip formatting. */
static bool notify_wanted(void)
{
    const char *name = getenv("NOTIFY_SOCKET");
    return name != NULL && name[0] != '\0';
}

bool tp_notify_send(const char *state)
{
    if (!notify_wanted())
        return true;
    const char *name = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa;
    const char *why = NULL;
    socklen_t salen = notify_addr(name, &sa, &why);
    if (salen == 0) {
        tp_warn("sd_notify: %s", why);
        return false;
    }
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        tp_warn("sd_notify: socket: %s", strerror(errno));
        return false;
    }
    size_t n = strlen(state);
    ssize_t rc;
    do {
        rc = sendto(fd, state, n, MSG_NOSIGNAL, (const struct sockaddr *)&sa, salen);
    } while (rc < 0 && errno == EINTR);
    int saved = errno;
    close(fd);
    if (rc < 0 || (size_t)rc != n) {
        /* The socket path is the service manager's, not a secret. */
        tp_warn("sd_notify: send to %s: %s", name, rc < 0 ? strerror(saved) : "short write");
        return false;
    }
    return true;
}

/* Sends a fixed message; failures are logged by tp_notify_send. */
static void send_quietly(const char *state)
{
    bool sent = tp_notify_send(state);
    (void)sent; /* a failure was logged where it was found */
}

void tp_notify_ready(void) { send_quietly("READY=1"); }
void tp_notify_stopping(void) { send_quietly("STOPPING=1"); }
void tp_notify_watchdog(void) { send_quietly("WATCHDOG=1"); }

void tp_notify_reloading(void)
{
    if (!notify_wanted())
        return;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    char msg[64];
    snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)us);
    send_quietly(msg);
}

void tp_notify_status(const char *fmt, ...)
{
    if (!notify_wanted())
        return;
    char msg[sizeof("STATUS=") + STATUS_MAX];
    memcpy(msg, "STATUS=", 7);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg + 7, STATUS_MAX + 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    /* A newline would start a new assignment the service manager would obey. */
    for (char *p = msg + 7; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    send_quietly(msg);
}

uint64_t tp_notify_watchdog_usec(void)
{
    const char *usec = getenv("WATCHDOG_USEC");
    if (usec == NULL || usec[0] == '\0')
        return 0;
    int64_t v = 0;
    if (!tp_parse_int64(usec, 1, INT64_MAX, &v)) {
        tp_warn("watchdog: WATCHDOG_USEC is not a positive integer; watchdog off");
        return 0;
    }
    const char *pid = getenv("WATCHDOG_PID");
    if (pid != NULL && pid[0] != '\0') {
        int64_t p = 0;
        if (!tp_parse_int64(pid, 1, INT64_MAX, &p)) {
            tp_warn("watchdog: WATCHDOG_PID is not a pid; watchdog off");
            return 0;
        }
        if (p != (int64_t)getpid())
            return 0; /* meant for another process (we are a child) */
    }
    return (uint64_t)v;
}

static void on_watchdog_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_notify_wd_t *wd = arg;
    if (wd == NULL || wd->magic != WD_MAGIC)
        abort();
    char why[256] = "";
    if (wd->healthy && !wd->healthy(wd->healthy_arg, why, sizeof why)) {
        if (!wd->withholding) {
            const char *kv[] = {"why", why, NULL};
            tp_logkv(TP_LOG_ERROR, kv, "watchdog: keep-alives withheld; the service manager "
                                       "will restart this process");
        }
        wd->withholding = true;
        return;
    }
    if (wd->withholding)
        tp_warn("watchdog: healthy again; keep-alives resumed");
    wd->withholding = false;
    if (tp_notify_send("WATCHDOG=1"))
        wd->sent++;
}

void tp_notify_wd_set_check(tp_notify_wd_t *wd, bool (*healthy)(void *arg, char *why, size_t whylen),
                            void *arg)
{
    if (wd == NULL)
        return;
    if (wd->magic != WD_MAGIC)
        abort();
    wd->healthy = healthy;
    wd->healthy_arg = arg;
}

bool tp_notify_wd_start(struct event_base *base, tp_notify_wd_t **out)
{
    *out = NULL;
    uint64_t usec = tp_notify_watchdog_usec();
    if (usec == 0)
        return true;
    /* Half the interval, as sd_watchdog_enabled(3) recommends; at least 1 ms. */
    uint64_t half = usec / 2;
    if (half < 1000)
        half = 1000;
    tp_notify_wd_t *wd = tp_xcalloc(1, sizeof(*wd));
    wd->magic = WD_MAGIC;
    wd->timer = event_new(base, -1, EV_PERSIST, on_watchdog_tick, wd);
    struct timeval tv = {.tv_sec = (time_t)(half / 1000000u),
                         .tv_usec = (suseconds_t)(half % 1000000u)};
    if (wd->timer == NULL || event_add(wd->timer, &tv) != 0) {
        tp_error("watchdog: cannot arm the keep-alive timer");
        tp_notify_wd_free(wd);
        return false;
    }
    char every[32];
    snprintf(every, sizeof(every), "%llu", (unsigned long long)(half / 1000u));
    const char *kv[] = {"every_ms", every, NULL};
    tp_logkv(TP_LOG_INFO, kv, "watchdog keep-alives armed");
    *out = wd;
    return true;
}

void tp_notify_wd_free(tp_notify_wd_t *wd)
{
    if (wd == NULL)
        return;
    if (wd->magic != WD_MAGIC)
        abort();
    if (wd->timer != NULL)
        event_free(wd->timer); /* event_free deletes a pending event first */
    wd->magic = 0;
    free(wd);
}

uint64_t tp_notify_wd_sent(const tp_notify_wd_t *wd)
{
    return wd == NULL ? 0 : wd->sent;
}
