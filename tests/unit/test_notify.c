/* Unit tests for lib/notify.c: a real AF_UNIX datagram socket stands in for
 * the service manager, and every datagram is compared byte for byte. */
#include <event2/event.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../tp_test.h"
#include "tidepool/notify.h"
#include "tidepool/util.h"

/* Binds a datagram socket (a file in the test's tmpdir, or an abstract name)
 * and points NOTIFY_SOCKET at it. Returns the fd or -1. */
static int listen_notify(bool abstract)
{
    static int seq;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char name[100];
    socklen_t len;
    if (abstract) {
        snprintf(name, sizeof(name), "@tidepool-test-notify-%d-%d", (int)getpid(), ++seq);
        memcpy(sa.sun_path, name, strlen(name));
        sa.sun_path[0] = '\0';
        len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name));
    } else {
        snprintf(name, sizeof(name), "%s/notify-%d.sock", tp_test_tmpdir(), ++seq);
        unlink(name);
        strcpy(sa.sun_path, name);
        len = (socklen_t)sizeof(sa);
    }
    if (bind(fd, (struct sockaddr *)&sa, len) != 0) {
        close(fd);
        return -1;
    }
    setenv("NOTIFY_SOCKET", name, 1);
    return fd;
}

/* Receives one datagram into buf (NUL-terminated); -1 if none within timeout_ms. */
static int recv_msg(int fd, char *buf, size_t cap, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) != 1)
        return -1;
    ssize_t n = recv(fd, buf, cap - 1, MSG_DONTWAIT);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return (int)n;
}

/* Counts datagrams already queued, checking each equals want. */
static int drain_expect(int fd, const char *want)
{
    char buf[256];
    int count = 0;
    while (recv_msg(fd, buf, sizeof(buf), 0) >= 0) {
        CHECK_STR_EQ(buf, want);
        count++;
    }
    return count;
}

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void expect_next(int fd, const char *want)
{
    char buf[2048];
    int n = recv_msg(fd, buf, sizeof(buf), 1000);
    CHECK_MSG(n >= 0, "no datagram arrived, wanted \"%s\"", want);
    if (n >= 0)
        CHECK_STR_EQ(buf, want);
}

static void silent_without_notify_socket(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    unsetenv("NOTIFY_SOCKET");
    CHECK(tp_notify_send("READY=1"));
    tp_notify_ready();
    tp_notify_status("working %d", 1);
    tp_notify_reloading();
    tp_notify_watchdog();
    tp_notify_stopping();
    setenv("NOTIFY_SOCKET", "", 1);
    CHECK(tp_notify_send("READY=1"));
    unsetenv("NOTIFY_SOCKET");
    char buf[64];
    CHECK_INT_EQ(recv_msg(fd, buf, sizeof(buf), 50), -1);
    close(fd);
}

static void path_socket_gets_exact_datagrams(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    tp_notify_ready();
    expect_next(fd, "READY=1");
    tp_notify_status("syncing %d jobs, %s", 3, "last ok");
    expect_next(fd, "STATUS=syncing 3 jobs, last ok");
    tp_notify_watchdog();
    expect_next(fd, "WATCHDOG=1");
    tp_notify_stopping();
    expect_next(fd, "STOPPING=1");

    uint64_t before = mono_us();
    tp_notify_reloading();
    uint64_t after = mono_us();
    char buf[256];
    CHECK(recv_msg(fd, buf, sizeof(buf), 1000) > 0);
    unsigned long long stamp = 0;
    int used = 0;
    CHECK_MSG(sscanf(buf, "RELOADING=1\nMONOTONIC_USEC=%llu%n", &stamp, &used) == 1 &&
                  buf[used] == '\0',
              "unexpected reload datagram \"%s\"", buf);
    CHECK_MSG(stamp >= before && stamp <= after, "MONOTONIC_USEC %llu outside [%llu, %llu]",
              stamp, (unsigned long long)before, (unsigned long long)after);
    CHECK(tp_notify_send("READY=1\nSTATUS=reloaded"));
    expect_next(fd, "READY=1\nSTATUS=reloaded");
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

static void status_cannot_inject_assignments(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    tp_notify_status("bad\nREADY=1\r\nx");
    expect_next(fd, "STATUS=bad READY=1  x");
    char longer[3000];
    memset(longer, 'a', sizeof(longer) - 1);
    longer[sizeof(longer) - 1] = '\0';
    tp_notify_status("%s", longer);
    char buf[4096];
    CHECK_INT_EQ(recv_msg(fd, buf, sizeof(buf), 1000), 7 + 1000);
    CHECK(strncmp(buf, "STATUS=aaa", 10) == 0);
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

static void abstract_socket_works(void)
{
    int fd = listen_notify(true);
    CHECK(fd >= 0);
    CHECK(getenv("NOTIFY_SOCKET")[0] == '@');
    tp_notify_ready();
    expect_next(fd, "READY=1");
    tp_notify_stopping();
    expect_next(fd, "STOPPING=1");
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

static void bad_notify_socket_fails_cleanly(void)
{
    setenv("NOTIFY_SOCKET", "relative/notify.sock", 1);
    CHECK(!tp_notify_send("READY=1"));
    setenv("NOTIFY_SOCKET", "@", 1);
    CHECK(!tp_notify_send("READY=1"));
    char longer[300] = "/";
    memset(longer + 1, 'x', 200);
    longer[201] = '\0';
    setenv("NOTIFY_SOCKET", longer, 1);
    CHECK(!tp_notify_send("READY=1"));
    setenv("NOTIFY_SOCKET", "/nonexistent-dir-tidepool/notify.sock", 1);
    CHECK(!tp_notify_send("READY=1"));
    setenv("NOTIFY_SOCKET", "vsock:2:1234", 1);
    CHECK(!tp_notify_send("READY=1"));
    tp_notify_ready(); /* logs, does not crash */
    unsetenv("NOTIFY_SOCKET");
}

static void watchdog_interval_from_environment(void)
{
    char pid[32];
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_USEC", "30000000", 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 30000000);
    snprintf(pid, sizeof(pid), "%d", (int)getpid());
    setenv("WATCHDOG_PID", pid, 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 30000000);
    snprintf(pid, sizeof(pid), "%d", (int)getpid() + 1);
    setenv("WATCHDOG_PID", pid, 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_PID", "12x", 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    unsetenv("WATCHDOG_PID");
    setenv("WATCHDOG_USEC", "0", 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_USEC", "-5", 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    setenv("WATCHDOG_USEC", "10s", 1);
    CHECK_INT_EQ(tp_notify_watchdog_usec(), 0);
    unsetenv("WATCHDOG_USEC");

    struct event_base *base = event_base_new();
    tp_notify_wd_t *wd = (tp_notify_wd_t *)1;
    CHECK(tp_notify_wd_start(base, &wd));
    CHECK(wd == NULL); /* off: nothing armed */
    CHECK_INT_EQ(event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED), 0);
    tp_notify_wd_free(NULL);
    event_base_free(base);
}

static void stop_loop_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopexit(arg, NULL);
}

static void watchdog_timer_fires_on_the_loop(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    char pid[32];
    snprintf(pid, sizeof(pid), "%d", (int)getpid());
    setenv("WATCHDOG_USEC", "100000", 1); /* 100 ms: a keep-alive every 50 ms */
    setenv("WATCHDOG_PID", pid, 1);
    struct event_base *base = event_base_new();
    tp_notify_wd_t *wd = NULL;
    CHECK(tp_notify_wd_start(base, &wd));
    CHECK(wd != NULL);
    /* Nothing is sent until the loop runs. */
    CHECK_INT_EQ(drain_expect(fd, "WATCHDOG=1"), 0);
    struct timeval stop = {.tv_sec = 0, .tv_usec = 280000};
    struct event *ev = evtimer_new(base, stop_loop_cb, base);
    evtimer_add(ev, &stop);
    uint64_t t0 = mono_us();
    event_base_dispatch(base);
    uint64_t elapsed_ms = (mono_us() - t0) / 1000;
    int got = drain_expect(fd, "WATCHDOG=1");
    /* One keep-alive per 50 ms at most (never faster than half the interval);
     * at least two, though a slow, shared machine may miss some ticks. */
    CHECK_MSG(got >= 2 && (uint64_t)got <= elapsed_ms / 50,
              "expected 2..%llu keep-alives in %llu ms, got %d",
              (unsigned long long)(elapsed_ms / 50), (unsigned long long)elapsed_ms, got);
    CHECK_INT_EQ(tp_notify_wd_sent(wd), got);
    tp_notify_wd_free(wd);
    event_free(ev);
    CHECK_INT_EQ(event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED), 0);
    event_base_free(base);
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

static int checks_made;
static bool health_flag;

static bool health_check(void *arg, char *why, size_t whylen)
{
    (void)arg;
    checks_made++;
    if (!health_flag)
        snprintf(why, whylen, "worker loop 1 has not turned");
    return health_flag;
}

static void flip_health(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    health_flag = true;
}

/* Another thread's loop is stuck (the check says so): keep-alives are
 * withheld although the watchdog's own loop turns, then resume. */
static void unhealthy_check_withholds_keepalives(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    char pid[32];
    snprintf(pid, sizeof(pid), "%d", (int)getpid());
    setenv("WATCHDOG_USEC", "100000", 1);
    setenv("WATCHDOG_PID", pid, 1);
    struct event_base *base = event_base_new();
    tp_notify_wd_t *wd = NULL;
    CHECK(tp_notify_wd_start(base, &wd));
    health_flag = false;
    checks_made = 0;
    tp_notify_wd_set_check(wd, health_check, NULL);
    struct timeval flip = {.tv_sec = 0, .tv_usec = 300000}, stop = {.tv_sec = 0, .tv_usec = 600000};
    struct event *fl = evtimer_new(base, flip_health, NULL), *ev = evtimer_new(base, stop_loop_cb, base);
    evtimer_add(fl, &flip);
    evtimer_add(ev, &stop);
    /* first 300 ms unhealthy: checks made, nothing sent; then keep-alives */
    event_base_dispatch(base);
    CHECK_MSG(checks_made >= 4, "%d checks", checks_made);
    int got = drain_expect(fd, "WATCHDOG=1");
    CHECK_INT_EQ(tp_notify_wd_sent(wd), got);
    CHECK_MSG(got >= 1 && got < checks_made, "%d keep-alives for %d checks", got, checks_made);
    tp_notify_wd_free(wd);
    event_free(fl);
    event_free(ev);
    event_base_free(base);
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

/* A callback that never returns in time: the loop is stuck, so no keep-alive. */
static void stuck_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    usleep(300000);
    event_base_loopexit(arg, NULL);
}

static void stuck_loop_sends_no_keepalive(void)
{
    int fd = listen_notify(false);
    CHECK(fd >= 0);
    setenv("WATCHDOG_USEC", "100000", 1);
    unsetenv("WATCHDOG_PID");
    struct event_base *base = event_base_new();
    tp_notify_wd_t *wd = NULL;
    CHECK(tp_notify_wd_start(base, &wd));
    CHECK(wd != NULL);
    struct timeval now = {0, 0};
    struct event *ev = evtimer_new(base, stuck_cb, base);
    evtimer_add(ev, &now);
    event_base_dispatch(base);
    CHECK_INT_EQ(drain_expect(fd, "WATCHDOG=1"), 0);
    CHECK_INT_EQ(tp_notify_wd_sent(wd), 0);
    /* Once the loop runs again, the keep-alives resume. */
    struct timeval stop = {.tv_sec = 0, .tv_usec = 130000};
    event_assign(ev, base, -1, 0, stop_loop_cb, base);
    evtimer_add(ev, &stop);
    event_base_dispatch(base);
    CHECK(drain_expect(fd, "WATCHDOG=1") >= 1);
    tp_notify_wd_free(wd);
    event_free(ev);
    event_base_free(base);
    unsetenv("WATCHDOG_USEC");
    unsetenv("NOTIFY_SOCKET");
    close(fd);
}

int main(void)
{
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    TP_RUN(silent_without_notify_socket);
    TP_RUN(path_socket_gets_exact_datagrams);
    TP_RUN(status_cannot_inject_assignments);
    TP_RUN(abstract_socket_works);
    TP_RUN(bad_notify_socket_fails_cleanly);
    TP_RUN(watchdog_interval_from_environment);
    TP_RUN(watchdog_timer_fires_on_the_loop);
    TP_RUN(stuck_loop_sends_no_keepalive);
    TP_RUN(unhealthy_check_withholds_keepalives);
    return tp_test_done();
}
