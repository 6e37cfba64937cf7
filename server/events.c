/* GET /api/v1/events: Server-Sent Events, one event per committed sync (DESIGN §8).
 *
 * The main thread's LISTEN callback (events_publish) appends each tidepool_sync
 * notification ("job:generation") to a mutex-protected ring of the last
 * SSE_RING events, numbered by one process-wide sequence, and event_active()s
 * every worker's wake event. Each worker then writes the new events to its own
 * streams (a list on its loop, no lock but for copying out of the ring).
 * Event ids are "<boot-id>-<seq>" (boot id random per process): a client's
 * Last-Event-ID from this process still in the ring gets the missed events
 * replayed, anything else one `event: reset` (refetch everything). So does a
 * live stream whose worker wakes only after more than SSE_RING events came in
 * (one big transaction while the thread was busy): its gap left the ring. A
 * LISTEN reconnect (notifications may have been lost) sends reset to everyone.
 * Streams are bounded: server.max_event_streams per process (503 beyond); at
 * most SSE_MAX_PENDING bytes wait unsent per stream (the rest follows as the
 * client reads; one that reads nothing is closed after server.timeout); a
 * client that goes away is freed from evhttp's close callback. SIGTERM ends every stream
 * with the chunked terminator after what is already queued (events held back
 * are not sent); the drain waits for those connections at most SSE_GRACE_MS,
 * then cuts the ones that have not read to the end. */
#include "server.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <jansson.h>

#include "tidepool/log.h"

#define SSE_MAGIC 0x53534531u    /* "SSE1" */
#define SSEW_MAGIC 0x53534557u   /* "SSEW" */
#define SSE_RING 1024            /* events kept for Last-Event-ID replay */
#define SSE_MAX_PENDING (256 * 1024) /* unsent bytes before a slow reader is dropped */
#define SSE_RETRY_MS 3000
#define SSE_KEEPALIVE_S 15
#define SSE_GRACE_MS 1000        /* SIGTERM: time for a stream's last bytes to leave */

typedef struct sse_rec {
    uint64_t seq;
    char *job;  /* NULL: a reset event */
    char *data; /* the JSON of the data: line */
} sse_rec_t;

typedef struct stream stream_t;

struct sse_worker {
    uint32_t magic;
    worker_t *w;
    struct event *wake;
    struct event *grace; /* SIGTERM: ends what has not closed after SSE_GRACE_MS */
    stream_t *head;
};

struct stream {
    uint32_t magic;
    struct sse_worker *sw;
    struct evhttp_request *req; /* NULL once ending */
    struct evhttp_connection *evcon;
    struct event *ka;
    char **jobs; /* NULL: every job */
    size_t njobs;
    uint64_t seq; /* the last event this stream was given (or skipped) */
    bool behind;  /* held back until the client reads what waits (on_flushed) */
    bool ending;
    char client[64];
    stream_t *prev, *next;
};

static struct {
    pthread_mutex_t mu; /* guards ring, seq */
    sse_rec_t ring[SSE_RING];
    uint64_t seq;   /* the last published event; 0 = none yet */
    char boot[17];  /* hex, set once before the workers start */
    bool listened;  /* main thread: the LISTEN connection was up before */
    atomic_int streams;
    atomic_uint_fast64_t sent;
} E = {.mu = PTHREAD_MUTEX_INITIALIZER};

void events_global_init(void)
{
    snprintf(E.boot, sizeof E.boot, "%016llx", (unsigned long long)tp_random_u64());
}

void events_global_free(void)
{
    for (size_t i = 0; i < SSE_RING; i++) {
        free(E.ring[i].job);
        free(E.ring[i].data);
        E.ring[i].job = E.ring[i].data = NULL;
    }
}

/* ---- publishing (main thread) ---- */

/* Appends an event (job NULL: reset) to the ring; takes data. */
static void ring_push(const char *job, char *data)
{
    pthread_mutex_lock(&E.mu);
    sse_rec_t *rec = &E.ring[(E.seq + 1) % SSE_RING];
    free(rec->job);
    free(rec->data);
    rec->seq = ++E.seq;
    rec->job = job ? tp_xstrdup(job) : NULL;
    rec->data = data;
    pthread_mutex_unlock(&E.mu);
}

void events_publish(const char *channel, const char *payload)
{
    if (!channel) {
        /* (re)connected: after a gap, notifications may have been missed */
        bool again = E.listened;
        E.listened = true;
        if (!again)
            return;
        ring_push(NULL, tp_xstrdup("{}"));
    } else {
        const char *p = payload ? payload : "";
        const char *colon = strrchr(p, ':');
        char *job = colon ? tp_xstrndup(p, (size_t)(colon - p)) : tp_xstrdup(p);
        int64_t gen = 0;
        bool has_gen = colon && tp_parse_int64(colon + 1, INT64_MIN, INT64_MAX, &gen);
        char at[32];
        tp_rfc3339_format(tp_wall_ms(), at);
        tp_buf_t b = {0};
        tp_buf_puts(&b, "{\"job\":");
        tp_buf_json_str(&b, job);
        if (has_gen)
            tp_buf_printf(&b, ",\"generation\":%lld", (long long)gen);
        else
            tp_buf_puts(&b, ",\"generation\":null");
        tp_buf_printf(&b, ",\"at\":\"%s\"}", at);
        ring_push(job, tp_buf_steal(&b));
        free(job);
    }
    for (int i = 0; i < g_srv.nthreads; i++)
        if (g_srv.workers[i].sse)
            event_active(g_srv.workers[i].sse->wake, EV_READ, 0);
}

/* ---- writing to streams (worker threads) ---- */

static bool stream_wants(const stream_t *s, const char *job)
{
    if (!job || !s->jobs)
        return true; /* resets go to everyone */
    for (size_t i = 0; i < s->njobs; i++)
        if (strcmp(s->jobs[i], job) == 0)
            return true;
    return false;
}

static void frame(tp_buf_t *b, uint64_t seq, const char *job, const char *data)
{
    tp_buf_printf(b, "id: %s-%llu\nevent: %s\ndata: %s\n\n", E.boot, (unsigned long long)seq,
                  job ? "sync" : "reset", data);
}

static size_t stream_pending(const stream_t *s)
{
    struct bufferevent *bev = evhttp_connection_get_bufferevent(s->evcon);
    return bev ? evbuffer_get_length(bufferevent_get_output(bev)) : 0;
}

static void on_flushed(struct evhttp_connection *evcon, void *arg);

/* Queues b's bytes on s (every write asks for on_flushed: evhttp keeps only
 * the last write's callback). */
static void stream_send(stream_t *s, const tp_buf_t *b)
{
    if (s->ending || !b->len)
        return;
    struct evbuffer *eb = evbuffer_new();
    evbuffer_add(eb, b->data, b->len);
    evhttp_send_reply_chunk_with_cb(s->req, eb, on_flushed, s);
    evbuffer_free(eb);
}

/* Writes to s the events it has not had among recs[0..n) (sequence from..to,
 * copied out of the ring), after any prefix (the first reply's retry: line);
 * a gap older than the ring is one reset. Stops once SSE_MAX_PENDING bytes
 * wait unsent: the rest follows when the client has read them (on_flushed),
 * so a slow reader costs at most that much memory; one that reads nothing
 * is closed by evhttp after server.timeout without progress. */
static void stream_catch_up(stream_t *s, const char *prefix, const sse_rec_t *recs, size_t n,
                            uint64_t from, uint64_t to)
{
    tp_buf_t b = {0};
    if (prefix)
        tp_buf_puts(&b, prefix);
    size_t pending = stream_pending(s), k = 0;
    if (s->seq < to && s->seq + 1 < from) { /* some of them left the ring */
        frame(&b, to, NULL, "{}");
        k++;
        s->seq = to;
    }
    for (size_t i = 0; i < n && s->seq < to; i++) {
        if (recs[i].seq <= s->seq)
            continue;
        if (pending + b.len >= SSE_MAX_PENDING) {
            s->behind = true;
            break;
        }
        if (stream_wants(s, recs[i].job)) {
            frame(&b, recs[i].seq, recs[i].job, recs[i].data);
            k++;
        }
        s->seq = recs[i].seq;
    }
    stream_send(s, &b);
    tp_buf_free(&b);
    atomic_fetch_add_explicit(&E.sent, k, memory_order_relaxed);
}

/* Copies the ring's events after seq `after` (at most SSE_RING) into *out;
 * *from / *to: the sequence range copied (from > to when none). */
static size_t ring_copy(uint64_t after, sse_rec_t **out, uint64_t *from, uint64_t *to)
{
    pthread_mutex_lock(&E.mu);
    uint64_t last = E.seq;
    uint64_t first = last >= SSE_RING ? last - SSE_RING + 1 : 1;
    if (after + 1 > first)
        first = after + 1;
    size_t n = last >= first ? (size_t)(last - first + 1) : 0;
    sse_rec_t *recs = tp_xcalloc(n ? n : 1, sizeof *recs);
    for (size_t i = 0; i < n; i++) {
        const sse_rec_t *r = &E.ring[(first + i) % SSE_RING];
        recs[i].seq = r->seq;
        recs[i].job = r->job ? tp_xstrdup(r->job) : NULL;
        recs[i].data = tp_xstrdup(r->data);
    }
    pthread_mutex_unlock(&E.mu);
    *out = recs;
    *from = first;
    *to = last;
    return n;
}

static void recs_free(sse_rec_t *recs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(recs[i].job);
        free(recs[i].data);
    }
    free(recs);
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct sse_worker *sw = arg;
    if (sw->magic != SSEW_MAGIC)
        abort();
    if (!sw->head)
        return;
    uint64_t min = UINT64_MAX;
    for (stream_t *s = sw->head; s; s = s->next)
        if (!s->ending && !s->behind && s->seq < min)
            min = s->seq;
    sse_rec_t *recs;
    uint64_t from, to;
    size_t n = ring_copy(min, &recs, &from, &to);
    for (stream_t *s = sw->head; s; s = s->next)
        if (!s->ending && !s->behind && s->seq < to)
            stream_catch_up(s, NULL, recs, n, from, to);
    recs_free(recs, n);
}

/* evhttp wrote out everything queued on s: a stream held back resumes. */
static void on_flushed(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    stream_t *s = arg;
    if (s->magic != SSE_MAGIC)
        abort();
    if (!s->behind || s->ending)
        return;
    s->behind = false;
    sse_rec_t *recs;
    uint64_t from, to;
    size_t n = ring_copy(s->seq, &recs, &from, &to);
    stream_catch_up(s, NULL, recs, n, from, to);
    recs_free(recs, n);
}

static void on_keepalive(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    stream_t *s = arg;
    if (s->magic != SSE_MAGIC)
        abort();
    static const tp_buf_t ka = {.data = ": keepalive\n\n", .len = 13};
    if (!s->behind && stream_pending(s) < SSE_MAX_PENDING)
        stream_send(s, &ka);
}

static void stream_free(stream_t *s)
{
    for (size_t i = 0; i < s->njobs; i++)
        free(s->jobs[i]);
    free(s->jobs);
    s->magic = 0;
    free(s);
}

/* evhttp closes the connection: the client went away, a write failed or
 * timed out, we dropped it, the stream ended (SIGTERM), or the worker frees
 * its evhttp. */
static void on_close(struct evhttp_connection *evcon, void *arg)
{
    (void)evcon;
    stream_t *s = arg;
    if (s->magic != SSE_MAGIC)
        abort();
    struct sse_worker *sw = s->sw;
    if (s->prev)
        s->prev->next = s->next;
    else
        sw->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->ka)
        event_free(s->ka);
    size_t unsent = s->ending ? 0 : stream_pending(s);
    if (unsent > 0) {
        char n[24];
        snprintf(n, sizeof n, "%zu", unsent);
        const char *kv[] = {"client", s->client, "unsent_bytes", n, NULL};
        tp_logkv(TP_LOG_WARN, kv, "event stream dropped: the client stopped reading");
    }
    if (s->ending) {
        sw->w->closing--;
    } else if (s->req && evhttp_request_get_connection(s->req) == NULL) {
        /* evhttp detached the unfinished reply from the failed connection:
         * it is ours to free */
        evhttp_request_free(s->req);
    }
    atomic_fetch_sub(&E.streams, 1);
    stream_free(s);
}

/* ---- opening a stream ---- */

/* ?job=a,b into s->jobs; false with a 400 problem sent. */
static bool parse_jobs(rq_t *r, stream_t *s, const char *v)
{
    const char *why = NULL;
    if (!*v)
        why = "must list one or more job names separated by commas";
    for (const char *p = v; !why && *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        char *name = tp_xstrndup(p, n);
        if (!sync_job_name_ok(name)) {
            free(name);
            why = "each job name is 1..1024 of [A-Za-z0-9_.-], separated by commas";
            break;
        }
        s->jobs = tp_xrealloc(s->jobs, (s->njobs + 1) * sizeof *s->jobs);
        s->jobs[s->njobs++] = name;
        if (comma && !comma[1])
            why = "must not end with a comma";
        p = comma ? comma + 1 : p + n;
    }
    if (!why)
        return true;
    tp_buf_t d = {0};
    tp_buf_printf(&d, "job %s", why);
    rq_problem(r, 400, "invalid-parameter", d.data, "job", why, 0);
    tp_buf_free(&d);
    return false;
}

/* Where a Last-Event-ID resumes: *after = its seq when it names this process
 * and is not ahead of the ring; false otherwise (the stream starts with a reset). */
static bool resume_point(const char *id, uint64_t *after)
{
    size_t bl = strlen(E.boot);
    if (!id || strncmp(id, E.boot, bl) != 0 || id[bl] != '-')
        return false;
    int64_t seq;
    if (!tp_parse_int64(id + bl + 1, 0, INT64_MAX, &seq))
        return false;
    pthread_mutex_lock(&E.mu);
    bool ok = (uint64_t)seq <= E.seq;
    pthread_mutex_unlock(&E.mu);
    *after = (uint64_t)seq;
    return ok;
}

static void h_events(rq_t *r)
{
    worker_t *w = r->w;
    int64_t ka_s = SSE_KEEPALIVE_S;
    const char *v = rq_q(r, "keepalive");
    if (v && !tp_parse_int64(v, 1, 3600, &ka_s)) {
        rq_problem(r, 400, "invalid-parameter", "keepalive must be whole seconds from 1 to 3600",
                   "keepalive", "must be whole seconds from 1 to 3600", 0);
        return;
    }
    stream_t *s = tp_xcalloc(1, sizeof *s);
    s->magic = SSE_MAGIC;
    s->sw = w->sse;
    if ((v = rq_q(r, "job")) != NULL && !parse_jobs(r, s, v)) {
        stream_free(s);
        return;
    }
    struct evhttp_connection *evcon = evhttp_request_get_connection(r->req);
    int cap = (int)g_srv.cfg.server.max_event_streams;
    if (atomic_fetch_add(&E.streams, 1) >= cap || !evcon) {
        atomic_fetch_sub(&E.streams, 1);
        stream_free(s);
        char d[128];
        snprintf(d, sizeof d, "this server already has %d event streams open (the limit)", cap);
        rq_problem(r, 503, "too-many-streams", d, NULL, NULL, 5);
        return;
    }
    s->req = r->req;
    s->evcon = evcon;
    snprintf(s->client, sizeof s->client, "%s", r->client);
    uint64_t after = 0;
    bool resume = resume_point(rq_in_header(r, "Last-Event-ID"), &after);
    bool had_id = rq_in_header(r, "Last-Event-ID") != NULL;
    rq_header(r, "Cache-Control", "no-cache");
    rq_header(r, "X-Accel-Buffering", "no");
    rq_header(r, "Connection", "close"); /* a stream ends only with its connection */
    rq_stream_begin(r, "text/event-stream"); /* frees r */

    /* No read timeout (a listener sends nothing); writes keep server.timeout. */
    struct bufferevent *bev = evhttp_connection_get_bufferevent(evcon);
    struct timeval wt = {.tv_sec = g_srv.cfg.server.timeout_ms / 1000,
                         .tv_usec = (g_srv.cfg.server.timeout_ms % 1000) * 1000};
    bufferevent_set_timeouts(bev, NULL, &wt);
    /* evhttp keeps reading only to see the client close; whatever a client
     * sends on a stream is never consumed, so stop reading after 4 KiB */
    bufferevent_setwatermark(bev, EV_READ, 0, 4096);
    evhttp_connection_set_closecb(evcon, on_close, s);
    s->next = s->sw->head;
    if (s->next)
        s->next->prev = s;
    s->sw->head = s;

    /* resuming: the events after the id (or a reset if they left the ring);
     * an id we cannot resume: a reset; no id: from now on */
    sse_rec_t *recs;
    uint64_t from, to;
    size_t n = ring_copy(resume ? after : UINT64_MAX - 1, &recs, &from, &to);
    tp_buf_t first = {0};
    tp_buf_printf(&first, "retry: %d\n\n", SSE_RETRY_MS);
    if (!resume && had_id) {
        frame(&first, to, NULL, "{}");
        atomic_fetch_add_explicit(&E.sent, 1, memory_order_relaxed);
    }
    s->seq = resume ? after : to;
    stream_catch_up(s, first.data, recs, n, from, to);
    tp_buf_free(&first);
    recs_free(recs, n);
    s->ka = event_new(w->base, -1, EV_PERSIST, on_keepalive, s);
    struct timeval kt = {.tv_sec = ka_s, .tv_usec = 0};
    event_add(s->ka, &kt);
}

bool events_route(rq_t *r, const char *path)
{
    if (strcmp(path, "/api/v1/events") != 0)
        return false;
    r->route = RT_EVENTS;
    r->route_name = "/api/v1/events";
    enum evhttp_cmd_type m = evhttp_request_get_command(r->req);
    if (m != EVHTTP_REQ_GET && m != EVHTTP_REQ_HEAD) {
        rq_header(r, "Allow", "GET, HEAD");
        rq_problem(r, 405, "method-not-allowed", "this route does not accept that method", NULL,
                   NULL, 0);
    } else if (atomic_load(&g_srv.draining)) {
        rq_problem(r, 503, "shutting-down", "this server is shutting down", NULL, NULL, 1);
    } else if (!rq_authenticate(r) || !rq_parse_query(r)) {
        /* problem sent */
    } else if (m == EVHTTP_REQ_HEAD) {
        rq_header(r, "Cache-Control", "no-cache");
        rq_reply(r, 200, "text/event-stream", NULL, 0);
    } else {
        h_events(r);
    }
    return true;
}

/* ---- worker lifecycle ---- */

/* The streams SIGTERM ended whose connections are still open: closed now. */
static void on_grace(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct sse_worker *sw = arg;
    if (sw->magic != SSEW_MAGIC)
        abort();
    for (stream_t *s = sw->head, *next; s; s = next) {
        next = s->next;
        evhttp_connection_free(s->evcon); /* on_close unlinks and frees s */
    }
}

void events_worker_init(worker_t *w)
{
    struct sse_worker *sw = tp_xcalloc(1, sizeof *sw);
    sw->magic = SSEW_MAGIC;
    sw->w = w;
    sw->wake = event_new(w->base, -1, 0, on_wake, sw);
    sw->grace = evtimer_new(w->base, on_grace, sw);
    w->sse = sw;
}

void events_worker_stop(worker_t *w)
{
    struct sse_worker *sw = w->sse;
    if (!sw)
        return;
    for (stream_t *s = sw->head, *next; s; s = next) {
        next = s->next;
        if (s->ending)
            continue;
        struct evhttp_request *req = s->req;
        s->ending = true;
        s->req = NULL;
        w->closing++; /* on_close gives it back once the connection is gone */
        if (s->ka)
            event_del(s->ka);
        evhttp_send_reply_end(req); /* may free s at once */
    }
    if (sw->head) {
        struct timeval tv = {.tv_sec = SSE_GRACE_MS / 1000, .tv_usec = (SSE_GRACE_MS % 1000) * 1000};
        evtimer_add(sw->grace, &tv);
    }
}

void events_worker_free(worker_t *w)
{
    struct sse_worker *sw = w->sse;
    if (!sw)
        return;
    /* evhttp_free closed every connection: on_close emptied the list */
    event_free(sw->wake);
    event_free(sw->grace);
    sw->magic = 0;
    free(sw);
    w->sse = NULL;
}

/* ---- /metrics and OpenAPI ---- */

void events_metrics(tp_buf_t *b)
{
    tp_buf_printf(b,
                  "# HELP tidepool_event_streams Open /api/v1/events streams.\n"
                  "# TYPE tidepool_event_streams gauge\ntidepool_event_streams %d\n"
                  "# HELP tidepool_events_sent_total Events written to /api/v1/events streams.\n"
                  "# TYPE tidepool_events_sent_total counter\ntidepool_events_sent_total %llu\n",
                  atomic_load(&E.streams),
                  (unsigned long long)atomic_load_explicit(&E.sent, memory_order_relaxed));
}

void events_openapi(void *paths_v)
{
    json_t *paths = paths_v;
    json_t *get = json_pack(
        "{s:s,s:s,s:[{s:s,s:s,s:s,s:{s:s}},{s:s,s:s,s:s,s:{s:s,s:i,s:i}},{s:s,s:s,s:s,s:{s:s}}],"
        "s:{s:{s:s,s:{s:{s:{s:s}}}},s:{s:s},s:{s:s},s:{s:s}}}",
        "summary", "Server-Sent Events: one `sync` event per committed sync",
        "description",
        "text/event-stream. Each event: `id: <boot-id>-<seq>`, `event: sync`, `data: "
        "{\"job\":...,\"generation\":...,\"at\":...}`; `event: reset` (data `{}`) means events "
        "may have been missed: refetch everything. A `: keepalive` comment every 15 s.",
        "parameters", "name", "job", "in", "query", "description",
        "comma-separated job names: only their events (and resets)", "schema", "type", "string",
        "name", "keepalive", "in", "query", "description", "seconds between keepalive comments",
        "schema", "type", "integer", "minimum", 1, "maximum", 3600, "name", "Last-Event-ID",
        "in", "header", "description", "resume after this event id (replay or reset)", "schema",
        "type", "string", "responses", "200", "description", "an event stream", "content",
        "text/event-stream", "schema", "type", "string", "400", "description",
        "malformed job or keepalive", "401", "description", "not authenticated", "503",
        "description", "too many streams or shutting down (Retry-After)");
    json_object_set_new(paths, "/api/v1/events", json_pack("{s:o}", "get", get));
}
