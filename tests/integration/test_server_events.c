/* GET /api/v1/events (Server-Sent Events) against the real server and the
 * harness Postgres: a NOTIFY tidepool_sync (as tidepool-sync sends when a sync
 * commits) reaches every open stream on both worker threads as `event: sync`
 * with job and generation; ?job= filters (malformed values are 400); the
 * keepalive comment; Last-Event-ID replays missed events or sends `reset`
 * (another process's id, an id pushed out of the ring); a client that goes
 * away is freed (the gauge drops); a reader that never reads is dropped; auth
 * mode token answers 401 without a credential; the stream cap answers 503
 * with Retry-After; SIGHUP keeps the streams; SIGTERM ends them cleanly and
 * the server exits promptly with status 0 although drain_timeout is a minute. */
#include "server_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <sys/socket.h>

static srv_h_t S; /* threads = 2, drain_timeout = 60s */
static srv_h_t A; /* auth mode token, max_event_streams = 2 */
static const char *DSN;
static const char *TOKEN = "tpk_events-secret-for-tests";

typedef struct sse_ev {
    char id[64];
    char event[32];
    json_t *data;
} sse_ev_t;

typedef struct sse {
    CURL *h;
    struct curl_slist *sl;
    tp_buf_t in, hdrs;
    size_t parsed;
    sse_ev_t *ev;
    int n, cap;
    int keepalives;
    int retry;
    bool done;
    CURLcode rc;
} sse_t;

static CURLM *M;

static void sse_block(sse_t *s, const char *p, size_t n)
{
    sse_ev_t e;
    memset(&e, 0, sizeof e);
    bool any = false;
    for (size_t i = 0; i < n;) {
        const char *eol = memchr(p + i, '\n', n - i);
        size_t len = eol ? (size_t)(eol - (p + i)) : n - i;
        char *line = tp_xstrndup(p + i, len);
        if (line[0] == ':')
            s->keepalives++;
        else if (strncmp(line, "retry: ", 7) == 0)
            s->retry = atoi(line + 7);
        else if (strncmp(line, "id: ", 4) == 0)
            snprintf(e.id, sizeof e.id, "%s", line + 4), any = true;
        else if (strncmp(line, "event: ", 7) == 0)
            snprintf(e.event, sizeof e.event, "%s", line + 7), any = true;
        else if (strncmp(line, "data: ", 6) == 0)
            e.data = json_loads(line + 6, 0, NULL), any = true;
        free(line);
        i += len + 1;
    }
    if (!any)
        return;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->ev = tp_xrealloc(s->ev, (size_t)s->cap * sizeof *s->ev);
    }
    s->ev[s->n++] = e;
}

static size_t sse_write(char *p, size_t sz, size_t n, void *arg)
{
    sse_t *s = arg;
    tp_buf_append(&s->in, p, sz * n);
    for (;;) {
        const char *start = s->in.data + s->parsed;
        const char *end = memmem(start, s->in.len - s->parsed, "\n\n", 2);
        if (!end)
            break;
        sse_block(s, start, (size_t)(end - start));
        s->parsed = (size_t)(end - s->in.data) + 2;
    }
    return sz * n;
}

/* Opens a stream on srv; hdr1 (may be NULL) is one extra request header. */
static sse_t *sse_open(srv_h_t *srv, const char *path, const char *hdr1)
{
    sse_t *s = tp_xcalloc(1, sizeof *s);
    char url[1024];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", srv->port, path);
    s->h = curl_easy_init();
    curl_easy_setopt(s->h, CURLOPT_URL, url);
    curl_easy_setopt(s->h, CURLOPT_WRITEFUNCTION, sse_write);
    curl_easy_setopt(s->h, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(s->h, CURLOPT_HEADERFUNCTION, on_body);
    curl_easy_setopt(s->h, CURLOPT_HEADERDATA, &s->hdrs);
    curl_easy_setopt(s->h, CURLOPT_PRIVATE, s);
    s->sl = curl_slist_append(NULL, "Accept: text/event-stream");
    if (hdr1)
        s->sl = curl_slist_append(s->sl, hdr1);
    curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, s->sl);
    curl_multi_add_handle(M, s->h);
    return s;
}

static void sse_close(sse_t *s)
{
    if (!s)
        return;
    curl_multi_remove_handle(M, s->h);
    curl_easy_cleanup(s->h);
    curl_slist_free_all(s->sl);
    for (int i = 0; i < s->n; i++)
        json_decref(s->ev[i].data);
    free(s->ev);
    tp_buf_free(&s->in);
    tp_buf_free(&s->hdrs);
    free(s);
}

static long sse_status(sse_t *s)
{
    long st = 0;
    curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &st);
    return st;
}

/* Runs the transfers for up to ms. */
static void pump(int ms)
{
    int64_t end = tp_now_ms() + ms;
    while (tp_now_ms() < end) {
        int running = 0;
        curl_multi_perform(M, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(M, &left)) != NULL)
            if (msg->msg == CURLMSG_DONE) {
                sse_t *s = NULL;
                curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
                s->done = true;
                s->rc = msg->data.result;
            }
        curl_multi_poll(M, NULL, 0, 20, NULL);
    }
}

/* Pumps until each of the n streams has at least want events (or is done),
 * up to ms; true when they all have. */
static bool await_events(sse_t **ss, int n, int want, int ms)
{
    int64_t end = tp_now_ms() + ms;
    for (;;) {
        bool all = true;
        for (int i = 0; i < n; i++)
            all = all && ss[i]->n >= want;
        if (all)
            return true;
        if (tp_now_ms() >= end)
            return false;
        pump(50);
    }
}

/* Pumps until the stream answered headers and its retry: line (200) or ended. */
static bool await_open(sse_t *s)
{
    int64_t end = tp_now_ms() + 10000;
    while (tp_now_ms() < end && !s->done && s->retry == 0)
        pump(50);
    return s->retry != 0;
}

/* Opens n plain streams on S and waits until each has started. */
static void open_streams(sse_t **ss, int n)
{
    for (int i = 0; i < n; i++)
        ss[i] = sse_open(&S, "/api/v1/events", NULL);
    for (int i = 0; i < n; i++)
        CHECK(await_open(ss[i]));
}

static void notify(const char *payload)
{
    char q[512];
    snprintf(q, sizeof q, "SELECT pg_notify('tidepool_sync', '%s')", payload);
    free(tp_test_sql(DSN, q));
}

static const char *ev_job(const sse_ev_t *e)
{
    return json_string_value(json_object_get(e->data, "job"));
}

static long long ev_gen(const sse_ev_t *e)
{
    return json_integer_value(json_object_get(e->data, "generation"));
}

/* The sequence part of an event id ("<boot-id>-<seq>"); 0 without one. */
static unsigned long long ev_seq(const sse_ev_t *e)
{
    const char *dash = strrchr(e->id, '-');
    return dash ? strtoull(dash + 1, NULL, 10) : 0;
}

/* s's events as "event seq data; ..." into buf, for a failed check's message. */
static const char *ev_list(const sse_t *s, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; i < s->n && len < size; i++) {
        char *d = s->ev[i].data ? json_dumps(s->ev[i].data, JSON_COMPACT) : NULL;
        int k = snprintf(buf + len, size - len, "%s%s %llu %s", i ? "; " : "", s->ev[i].event,
                         ev_seq(&s->ev[i]), d ? d : "(no data)");
        free(d);
        len += k > 0 ? (size_t)k : 0;
    }
    return buf;
}

/* Pumps until s has the sync event job:gen, up to ms; its index, or -1. */
static int await_sync(sse_t *s, const char *job, long long gen, int ms)
{
    int64_t end = tp_now_ms() + ms;
    for (int seen = 0;;) {
        for (; seen < s->n; seen++)
            if (strcmp(s->ev[seen].event, "sync") == 0 && ev_job(&s->ev[seen]) &&
                strcmp(ev_job(&s->ev[seen]), job) == 0 && ev_gen(&s->ev[seen]) == gen)
                return seen;
        if (tp_now_ms() >= end || s->done)
            return -1;
        pump(50);
    }
}

static long metric(srv_h_t *srv, const char *name)
{
    return harness_metric(srv, name);
}

/* Polls a metric until it equals want (10 s at most); returns the last value. */
static long await_metric(srv_h_t *srv, const char *name, long want)
{
    long v = -1;
    for (int i = 0; i < 100 && (v = metric(srv, name)) != want; i++)
        usleep(100000);
    return v;
}

static void test_sync_event(void)
{
    long sent0 = metric(&S, "tidepool_events_sent_total");
    sse_t *s = sse_open(&S, "/api/v1/events", NULL);
    CHECK(await_open(s));
    CHECK_INT_EQ(sse_status(s), 200);
    CHECK_INT_EQ(s->retry, 3000);
    resp_t h = {.headers = s->hdrs.data};
    CHECK_STR_EQ(hdr(&h, "Content-Type"), "text/event-stream");
    CHECK_STR_EQ(hdr(&h, "Cache-Control"), "no-cache");
    CHECK_STR_EQ(hdr(&h, "X-Accel-Buffering"), "no");
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", 1), 1);
    notify("daily_metrics:7");
    CHECK(await_events(&s, 1, 1, 10000));
    if (s->n >= 1) {
        CHECK_STR_EQ(s->ev[0].event, "sync");
        CHECK_STR_EQ(ev_job(&s->ev[0]), "daily_metrics");
        CHECK_INT_EQ(ev_gen(&s->ev[0]), 7);
        const char *at = json_string_value(json_object_get(s->ev[0].data, "at"));
        CHECK(at && strlen(at) == 24 && at[10] == 'T' && at[23] == 'Z');
        CHECK(strchr(s->ev[0].id, '-') != NULL);
    }
    /* a payload without a generation still makes an event */
    notify("users");
    CHECK(await_events(&s, 1, 2, 10000));
    if (s->n >= 2) {
        CHECK_STR_EQ(ev_job(&s->ev[1]), "users");
        CHECK(json_is_null(json_object_get(s->ev[1].data, "generation")));
    }
    CHECK(metric(&S, "tidepool_events_sent_total") >= sent0 + 2);
    sse_close(s);
    /* the client went away: its stream is freed at once, not at the next write */
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", 0), 0);
}

static void test_every_stream_on_both_threads(void)
{
    enum { N = 8 };
    sse_t *ss[N];
    open_streams(ss, N);
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", N), N);
    notify("daily_metrics:8");
    CHECK(await_events(ss, N, 1, 10000));
    for (int i = 0; i < N; i++) {
        CHECK_INT_EQ(ss[i]->n, 1);
        if (ss[i]->n >= 1)
            CHECK_INT_EQ(ev_gen(&ss[i]->ev[0]), 8);
        sse_close(ss[i]);
    }
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", 0), 0);
}

static void test_job_filter(void)
{
    sse_t *a = sse_open(&S, "/api/v1/events?job=users", NULL);
    sse_t *b = sse_open(&S, "/api/v1/events?job=daily_metrics,not_yet_a_job", NULL);
    CHECK(await_open(a));
    CHECK(await_open(b));
    notify("daily_metrics:9");
    notify("users:10");
    notify("other:11");
    sse_t *both[] = {a, b};
    CHECK(await_events(both, 2, 1, 10000));
    pump(500); /* anything wrongly let through has arrived by now */
    CHECK_INT_EQ(a->n, 1);
    CHECK_INT_EQ(b->n, 1);
    if (a->n && b->n) {
        CHECK_STR_EQ(ev_job(&a->ev[0]), "users");
        CHECK_STR_EQ(ev_job(&b->ev[0]), "daily_metrics");
    }
    sse_close(a);
    sse_close(b);

    const char *bad[] = {"/api/v1/events?job=", "/api/v1/events?job=a,,b",
                         "/api/v1/events?job=a,", "/api/v1/events?job=bad%20name"};
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        resp_t r = get(&S, bad[i]);
        CHECK_PROBLEM(r, 400, "job");
        resp_free(&r);
    }
    resp_t r = get(&S, "/api/v1/events?keepalive=0");
    CHECK_PROBLEM(r, 400, "keepalive");
    resp_free(&r);
    r = http(&S, "POST", "/api/v1/events", NULL, "{}", 2);
    CHECK_PROBLEM(r, 405, NULL);
    CHECK_STR_EQ(hdr(&r, "Allow"), "GET, HEAD");
    resp_free(&r);
    r = get(&S, "/api/v1/openapi.json");
    json_t *op = json_object_get(json_object_get(json_object_get(r.json, "paths"), "/api/v1/events"), "get");
    CHECK(json_object_get(json_object_get(json_object_get(op, "responses"), "200"), "content") != NULL);
    CHECK_INT_EQ(json_array_size(json_object_get(op, "parameters")), 3);
    resp_free(&r);
    r = http(&S, "HEAD", "/api/v1/events", NULL, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/event-stream");
    resp_free(&r);
}

static void test_keepalive(void)
{
    sse_t *s = sse_open(&S, "/api/v1/events?keepalive=1", NULL);
    CHECK(await_open(s));
    int64_t end = tp_now_ms() + 10000;
    while (tp_now_ms() < end && s->keepalives < 2)
        pump(100);
    CHECK(s->keepalives >= 2);
    CHECK_INT_EQ(s->n, 0); /* comments are not events */
    sse_close(s);
}

static void test_last_event_id(void)
{
    sse_t *s = sse_open(&S, "/api/v1/events?job=replay", NULL);
    CHECK(await_open(s));
    notify("replay:1");
    notify("replay:2");
    notify("replay:3");
    CHECK(await_events(&s, 1, 3, 10000));
    char first[64] = "", boot[64] = "";
    if (s->n >= 1) {
        snprintf(first, sizeof first, "%s", s->ev[0].id);
        snprintf(boot, sizeof boot, "%s", first);
        if (strchr(boot, '-'))
            *strchr(boot, '-') = '\0';
    }
    sse_close(s);
    notify("replay:4"); /* missed while disconnected */
    notify("elsewhere:5");

    char h[128];
    snprintf(h, sizeof h, "Last-Event-ID: %s", first);
    s = sse_open(&S, "/api/v1/events?job=replay", h);
    CHECK(await_events(&s, 1, 3, 10000));
    pump(300);
    CHECK_INT_EQ(s->n, 3);
    for (int i = 0; i < s->n && i < 3; i++) {
        CHECK_STR_EQ(s->ev[i].event, "sync");
        CHECK_INT_EQ(ev_gen(&s->ev[i]), i + 2);
    }
    /* then live events follow */
    notify("replay:6");
    CHECK(await_events(&s, 1, 4, 10000));
    if (s->n >= 4)
        CHECK_INT_EQ(ev_gen(&s->ev[3]), 6);
    sse_close(s);

    /* an id from another process (or a made-up one): reset */
    const char *others[] = {"Last-Event-ID: 0123456789abcdef-3", "Last-Event-ID: garbage"};
    for (size_t i = 0; i < TP_ARRAY_LEN(others); i++) {
        s = sse_open(&S, "/api/v1/events", others[i]);
        CHECK(await_events(&s, 1, 1, 10000));
        if (s->n >= 1) {
            CHECK_STR_EQ(s->ev[0].event, "reset");
            CHECK(json_is_object(s->ev[0].data) && json_object_size(s->ev[0].data) == 0);
            CHECK(strncmp(s->ev[0].id, boot, strlen(boot)) == 0);
        }
        sse_close(s);
    }
    /* this process, but ahead of anything published: reset */
    snprintf(h, sizeof h, "Last-Event-ID: %s-999999999", boot);
    s = sse_open(&S, "/api/v1/events", h);
    CHECK(await_events(&s, 1, 1, 10000));
    if (s->n >= 1)
        CHECK_STR_EQ(s->ev[0].event, "reset");
    sse_close(s);

    /* pushed out of the ring (1024 events) by one transaction's worth: reset */
    free(tp_test_sql(DSN, "SELECT count(pg_notify('tidepool_sync', 'bulk:' || g)) "
                          "FROM generate_series(1, 1100) g"));
    sse_t *probe = sse_open(&S, "/api/v1/events?job=replay", NULL);
    CHECK(await_open(probe));
    notify("replay:7"); /* published after the bulk: once seen, the bulk is in the ring */
    /* Only replay:7 itself says so. The probe may get a reset before it: the
     * server can still be reading the bulk when the probe opens, and if more
     * than 1024 of it arrive before the probe's worker wakes, the probe fell
     * out of the ring like any stream that far behind. */
    char got[2048];
    int at = await_sync(probe, "replay", 7, 15000);
    CHECK_MSG(at == 0 || (at == 1 && strcmp(probe->ev[0].event, "reset") == 0),
              "probe: want [reset] then replay:7, got %s", ev_list(probe, got, sizeof got));
    unsigned long long seq7 = at >= 0 ? ev_seq(&probe->ev[at]) : 0;
    sse_close(probe);
    snprintf(h, sizeof h, "Last-Event-ID: %s", first);
    s = sse_open(&S, "/api/v1/events?job=replay", h);
    CHECK(await_events(&s, 1, 1, 10000));
    pump(300);
    /* one reset, numbered at or after replay:7 so that it covers it: nothing
     * is published after that, so a second event would be a duplicate or a
     * stale one, which a client must never see after a reset */
    CHECK_MSG(s->n == 1 && strcmp(s->ev[0].event, "reset") == 0 && ev_seq(&s->ev[0]) >= seq7,
              "resumed from an id out of the ring: want one reset at seq >= %llu, got %s", seq7,
              ev_list(s, got, sizeof got));
    sse_close(s);
}

/* A raw connection reading nothing, its receive buffer small; opened on S. */
static int stuck_stream(const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)S.port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path);
    CHECK(write(fd, req, (size_t)n) == n);
    return fd;
}

/* A client that never reads: the server drops it once 256 KiB wait unsent. */
static void test_slow_reader_dropped(void)
{
    /* an idle stream outlives server.timeout (10 s): listeners send nothing */
    sse_t *idle = sse_open(&S, "/api/v1/events?job=idle&keepalive=3600", NULL);
    CHECK(await_open(idle));
    int64_t idle_since = tp_now_ms();
    int fd = stuck_stream("/api/v1/events");
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", 2), 2);
    /* a fast reader next to it gets every event of a burst far bigger than
     * the 256 KiB a stream may have unsent (held back, resumed as it reads) */
    sse_t *fast = sse_open(&S, "/api/v1/events", NULL);
    CHECK(await_open(fast));
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", 3), 3);
    /* ~4 MB of events: far beyond the socket buffers and the 256 KiB bound */
    free(tp_test_sql(DSN, "SELECT count(pg_notify('tidepool_sync', repeat('b', 4000) || ':' || g)) "
                          "FROM generate_series(1, 1000) g"));
    CHECK(await_events(&fast, 1, 1000, 30000));
    CHECK_INT_EQ(fast->n, 1000);
    for (int i = 0; i < fast->n; i++)
        if (ev_gen(&fast->ev[i]) != i + 1 || strlen(ev_job(&fast->ev[i])) != 4000) {
            CHECK_MSG(false, "burst event %d: generation %lld", i, ev_gen(&fast->ev[i]));
            break;
        }
    sse_close(fast);
    /* the one that reads nothing is closed once its writes make no progress
     * for server.timeout (10 s here) */
    long v = -1;
    for (int i = 0; i < 300 && (v = metric(&S, "tidepool_event_streams")) != 1; i++)
        pump(100);
    CHECK_INT_EQ(v, 1); /* the idle one stays */
    char *log = tp_read_file(S.log, NULL);
    CHECK(log && strstr(log, "event stream dropped"));
    free(log);
    close(fd);
    while (tp_now_ms() - idle_since < 12000)
        pump(100);
    notify("idle:1");
    CHECK(await_events(&idle, 1, 1, 10000));
    CHECK(!idle->done);
    sse_close(idle);
}

static void test_sighup_keeps_sigterm_ends(void)
{
    enum { N = 4 };
    sse_t *ss[N];
    open_streams(ss, N);
    /* and one that stopped reading with output waiting: it must not hold
     * the drain either */
    int stuck = stuck_stream("/api/v1/events?job=stuck");
    CHECK_INT_EQ(await_metric(&S, "tidepool_event_streams", N + 1), N + 1);
    free(tp_test_sql(DSN, "SELECT count(pg_notify('tidepool_sync', 'stuck:' || g || ':' || "
                          "repeat('s', 4000))) FROM generate_series(1, 300) g"));
    kill(S.pid, SIGHUP);
    pump(1500);
    notify("after_hup:1");
    CHECK(await_events(ss, N, 301, 20000)); /* the 300 "stuck" ones, then this */
    for (int i = 0; i < N; i++)
        if (ss[i]->n == 301)
            CHECK_STR_EQ(ev_job(&ss[i]->ev[300]), "after_hup");
    for (int i = 0; i < N; i++)
        CHECK(!ss[i]->done);
    /* drain_timeout is 60 s: streams holding the drain would show as a kill */
    kill(S.pid, SIGTERM);
    int64_t end = tp_now_ms() + 20000;
    bool all_done = false;
    while (!all_done && tp_now_ms() < end) {
        pump(50);
        all_done = true;
        for (int i = 0; i < N; i++)
            all_done = all_done && ss[i]->done;
    }
    for (int i = 0; i < N; i++) {
        CHECK(ss[i]->done);
        CHECK_MSG(ss[i]->rc == CURLE_OK, "stream %d ended with curl error %d", i, ss[i]->rc);
        sse_close(ss[i]);
    }
    int st = tp_test_stop(S.pid, 20000);
    CHECK_INT_EQ(st, 0);
    S.pid = 0;
    close(stuck);
}

static void test_auth_and_cap(void)
{
    resp_t r = get(&A, "/api/v1/events");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    char auth[128];
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", TOKEN);
    sse_t *a = sse_open(&A, "/api/v1/events", auth);
    sse_t *b = sse_open(&A, "/api/v1/events", auth);
    CHECK(await_open(a));
    CHECK(await_open(b));
    const char *hs[] = {auth, NULL};
    r = http(&A, "GET", "/api/v1/events", hs, NULL, 0);
    CHECK_PROBLEM(r, 503, NULL);
    CHECK(hdr(&r, "Retry-After") != NULL);
    resp_free(&r);
    notify("daily_metrics:12");
    sse_t *both[] = {a, b};
    CHECK(await_events(both, 2, 1, 10000));
    sse_close(a);
    /* the slot of the stream that went away is free again */
    sse_t *c = NULL;
    for (int i = 0; i < 100; i++) {
        c = sse_open(&A, "/api/v1/events", auth);
        if (await_open(c))
            break;
        CHECK_INT_EQ(sse_status(c), 503);
        sse_close(c);
        c = NULL;
        usleep(100000);
    }
    CHECK(c != NULL && sse_status(c) == 200);
    sse_close(b);
    sse_close(c);
}

int main(void)
{
    S.extra_conf = "drain_timeout = 60s\n";
    if (!harness_setup(&S, "test_server_events", &DSN, 2))
        return tp_test_done();
    M = curl_multi_init();
    TP_RUN(test_sync_event);
    TP_RUN(test_every_stream_on_both_threads);
    TP_RUN(test_job_filter);
    TP_RUN(test_keepalive);
    TP_RUN(test_last_event_id);
    TP_RUN(test_slow_reader_dropped);
    TP_RUN(test_sighup_keeps_sigterm_ends);

    char hash[65], conf[512];
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)TOKEN, strlen(TOKEN), d);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(hash + 2 * i, 3, "%02x", d[i]);
    snprintf(conf, sizeof conf, "max_event_streams = 2\n[auth]\nmode = token\ntokens = ev:reader:%s\n",
             hash);
    A.extra_conf = conf;
    snprintf(A.qdir, sizeof A.qdir, "%s", S.qdir);
    if (harness_start(&A, DSN, 1) && harness_ready(&A)) {
        TP_RUN(test_auth_and_cap);
    } else {
        tp_test_fail(__FILE__, __LINE__, "second server did not start; see %s", A.log);
    }
    if (A.pid > 0)
        CHECK_INT_EQ(tp_test_stop(A.pid, 15000), 0);
    free(A.conf);
    free(A.log);
    curl_multi_cleanup(M);
    harness_finish(&S);
    return tp_test_done();
}
