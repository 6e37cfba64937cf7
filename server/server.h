/* tidepool-server internals shared by the server/ sources: the process-wide state, one
 * worker per thread (event_base, evhttp, listener, Postgres pool, response
 * cache, sync-state view), the per-request context, and the helpers every
 * handler uses (problem+json, replies, query strings, metrics). Program-private:
 * nothing outside server/ includes this. */
#ifndef TIDEPOOL_SERVER_H
#define TIDEPOOL_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <event2/event.h>
#include <event2/http.h>
#include <libpq-fe.h>

#include "tidepool/auth.h"
#include "tidepool/auth_ratelimit.h"
#include "tidepool/config.h"
#include "tidepool/defs.h"
#include "tidepool/lakebase.h"
#include "tidepool/pgasync.h"
#include "tidepool/util.h"

#define SRV_MAX_JOBS 256
#define WORKER_MAGIC 0x574b5231u
#define RQ_MAGIC 0x52513031u

/* ---- reflected tables (tables.c) ---- */

typedef struct tcol {
    char *name;
    char *type;   /* format_type(), e.g. "integer", "text", "timestamp with time zone" */
    unsigned oid; /* atttypid */
} tcol_t;

typedef struct ttable {
    char *name;  /* "schema.table" as used in the URL */
    char *schema, *table;
    tcol_t *cols;
    size_t ncols;
    int64_t max_limit;
    char **roles;       /* @expose roles=a,b: NULL-terminated read roles; empty = any caller */
    const tcol_t *owner; /* @expose owner=COL: rows where COL = caller's identity; NULL = all */
} ttable_t;

typedef struct tables {
    atomic_int refs;
    ttable_t *t;
    size_t n;
} tables_t;

/* ---- definitions generation: swapped whole on SIGHUP, refcounted ---- */

typedef struct defgen {
    atomic_int refs;
    tp_defs_set_t *set;
    int **job_idx; /* per dataset: index of each @requires job in the job registry */
    uint64_t id;
} defgen_t;

/* ---- metrics (written by the owning worker, read by any scrape: relaxed atomics) ---- */

enum { RT_DATASETS, RT_DATASET, RT_TABLE, RT_HEALTHZ, RT_READYZ, RT_METRICS, RT_OPENAPI, RT_OTHER,
       RT_WRITE, RT_SYNC, RT_STATEMENT, RT_EVENTS, RT__N };
#define N_STATUS 25
#define N_BUCKETS 13

typedef struct metrics {
    atomic_uint_fast64_t req[RT__N][N_STATUS];
    atomic_uint_fast64_t lat_bucket[N_BUCKETS]; /* cumulative at scrape */
    atomic_uint_fast64_t lat_sum_us, lat_count;
    atomic_uint_fast64_t cache_hits, cache_misses, cache_bytes, cache_entries, cache_evictions;
    atomic_uint_fast64_t flights_joined;
    atomic_int pool_in_use, pool_queued, pool_size, pool_connected;
} metrics_t;

/* ---- cache (cache.c): one per worker thread ---- */

typedef struct cache cache_t;
typedef struct centry {
    char *body;
    size_t len;
    const char *ctype;
    char etag[24];
    char last_modified[40];
    char generation[128];
} centry_t;

/* ---- per-worker sync-state view ---- */

typedef struct jobstate {
    bool known;
    int64_t generation;
    int64_t last_success_ms; /* wall clock; 0 = never */
    int64_t failures;        /* consecutive failed runs (0 after a success) */
} jobstate_t;

typedef struct rq rq_t;

/* The process's two rate limiters (per address, per identity), shared by the
 * worker threads by reference (see limits_publish in main.c). */
typedef struct rl_pair {
    atomic_int refs;
    tp_ratelimit_t *addr, *ident;
    /* the settings they were built with */
    double rate_addr, burst_addr, rate_ident, burst_ident;
    size_t keys;
} rl_pair_t;

typedef struct worker {
    uint32_t magic;
    int id;
    pthread_t th;
    struct event_base *base;
    struct evhttp *http;
    struct evhttp_bound_socket *bound;
    struct evhttp *https;                  /* server.tls_listen, NULL when off */
    struct evhttp_bound_socket *tls_bound;
    uint64_t rl_gen;                       /* g_srv.rl_gen of the limiters in rl */
    struct event *stop_ev;
    struct event *drain_timer;
    struct event *tick; /* publishes pool gauges into metrics once a second */
    _Atomic int64_t beat_ms; /* tp_now_ms() of the last tick: the watchdog's proof of life */
    struct rl_pair *rl; /* a reference to the process's rate limiters */
    int64_t drain_deadline_ms;
    tp_pgpool_t *pool;
    tp_lakebase_t *lb;          /* postgres.password_source = lakebase, else NULL */
    tp_pg_password_provider_t pw;
    cache_t *cache;
    int inflight;
    int closing; /* connections closing after their last reply while draining */
    int max_inflight;
    metrics_t m;
    /* sync_state view: refreshed when the invalidation epoch moved or after 1 s */
    jobstate_t jobs[SRV_MAX_JOBS];
    uint64_t ss_epoch;
    int64_t ss_fetched_ms;
    bool ss_fetching;
    bool ss_ok;
    rq_t *ss_waiters;
    struct flight *flights; /* single-flight table (linked list; few in flight at once) */
    struct sse_worker *sse; /* this thread's /api/v1/events streams (events.c) */
} worker_t;

/* ---- process-wide state ---- */

typedef struct srv {
    tp_config_t cfg;
    const char *dsn, *read_dsn;
    int nthreads;
    worker_t *workers;
    pthread_mutex_t lock; /* guards gen and the job registry names */
    defgen_t *gen;
    tables_t *tables;
    uint64_t gen_counter;
    char *job_names[SRV_MAX_JOBS];
    int njobs;
    atomic_uint_fast64_t epoch;               /* bumped by every invalidation */
    atomic_uint_fast64_t job_inval[SRV_MAX_JOBS]; /* epoch of the job's last invalidation */
    atomic_uint_fast64_t all_inval;           /* epoch of the last "everything changed" */
    atomic_bool draining;
    atomic_bool listen_up;
    atomic_bool migrations_ok;
    atomic_bool migrations_known;
    atomic_bool migrate_pending; /* Postgres was unreachable at start: the status thread migrates */
    atomic_bool tables_ready; /* exposed tables reflected at least once */
    char migrations_why[600]; /* guarded by lock */
    atomic_int_fast64_t drain_ms;        /* server.drain_timeout (reloadable) */
    int64_t cache_bytes; /* per worker */
    atomic_int_fast64_t table_max_limit; /* reloadable: read when tables are reflected */
    atomic_int_fast64_t idem_ttl_ms;     /* reloadable: server.idempotency_ttl */
    int pool_queue;
    int64_t started_ms;
    tp_auth_t *auth; /* guarded by lock, swapped on SIGHUP: use auth_acquire */
    char *defs_dir;  /* server.definitions of the config in force (main thread) */
    tp_config_t *live; /* the last config loaded by SIGHUP (main thread), or NULL */
    atomic_uint_fast64_t rl_gen; /* bumped when the rate-limit settings change */
    struct rl_pair *rl;          /* guarded by lock; workers hold references */
    atomic_bool tokens_dirty; /* NOTIFY tidepool_auth: reload the token table */
    bool lakebase; /* postgres.password_source = lakebase (docs/lakebase.md) */
    tp_lakebase_config_t lb_cfg;
    tp_wh_config_t lb_wh;
    tp_lakebase_t *lb_sync; /* blocking provider, made on first use (srv_pg_connect) */
} srv_t;

extern srv_t g_srv;

/* tp_pg_connect for the server's blocking paths (start-up, status thread, token
 * command, table reflection): with Lakebase, the password is a fresh credential
 * (tp_lakebase_connect). Thread-safe. */
PGconn *srv_pg_connect(const char *dsn, int64_t timeout_ms, char *err, size_t errlen);

/* Readiness as /readyz answers it and as READY=1 waits for it (routes.c): the
 * Postgres pool up (w's, or with w NULL every worker's as last published by
 * its tick), migrations current, the LISTEN connection up, exposed tables
 * reflected. When not ready, appends the reasons to why and sets *field to the
 * first check that failed (either may be NULL). Any thread (w: its own). */
bool srv_readiness(const worker_t *w, tp_buf_t *why, const char **field);

/* ---- request context ---- */

typedef struct qparam {
    char *key, *val;
    bool used;
} qparam_t;

typedef enum fmt { FMT_ROWS, FMT_COLUMNS, FMT_CSV } fmt_t;

struct rq {
    uint32_t magic;
    worker_t *w;
    struct evhttp_request *req;
    char id[40];
    int route;
    const char *route_name;
    int64_t t0_us;
    defgen_t *gen;
    tables_t *tables;
    qparam_t *q;
    size_t nq;
    fmt_t fmt;
    bool bypass;
    tp_auth_result_t auth; /* principal of an authenticated request */
    char client[64];       /* client address (X-Real-Ip from a trusted proxy, else the peer) */
    /* dataset / table work */
    const tp_defs_dataset_t *ds;
    int ds_idx;
    const ttable_t *tbl;
    char *key;      /* cache key */
    char *sql;      /* table reads: generated SQL */
    char **vals;    /* bound values */
    int nvals;
    struct flight *flight;
    rq_t *next;     /* the worker's sync_state waiters */
    rq_t *fnext;    /* the flight's waiters (a leader is on both lists at once) */
    void (*cont)(rq_t *r); /* continuation after sync_state is fresh */
    struct fbreq *fbr; /* a fallback read or statement poll (fallback_routes.c) */
    tp_pgreq_t *pgh;   /* table reads: the pool request in flight */
    struct event *gone_ev; /* EV_CLOSED on the client's socket (rq_watch_gone) */
    bool gone;             /* the client left before its answer */
    void (*on_gone)(rq_t *r);
};

/* ---- http.c ---- */

/* Calls fn(r) once if the client closes its connection before r is answered
 * (EV_CLOSED on its socket: evhttp 2.1 does not read a connection while its
 * request is pending); r->gone is set first. fn must not reply: the pending
 * work's completion still answers (rq_pg_error sends 499 for a gone client).
 * No-op where the loop cannot see early closes. */
void rq_watch_gone(rq_t *r, void (*fn)(rq_t *r));
/* Starts a request context (request id, defs reference, timing). */
rq_t *rq_new(worker_t *w, struct evhttp_request *req, int route, const char *route_name);
/* Sends status with body (may be NULL) of content type ctype, logs the request
 * line, updates metrics and frees r. Exactly one reply per request. */
void rq_reply(rq_t *r, int status, const char *ctype, const char *body, size_t len);
/* RFC 9457 problem+json through one function: field/message may be NULL.
 * retry_after_s > 0 adds Retry-After. */
void rq_problem(rq_t *r, int status, const char *code, const char *detail, const char *field,
                const char *message, int retry_after_s);
/* Adds a response header. */
void rq_header(rq_t *r, const char *name, const char *value);
const char *rq_in_header(rq_t *r, const char *name);
/* Parses the query string: percent-decoding, NUL and invalid UTF-8 rejected
 * (a 400 problem is sent and false returned). */
bool rq_parse_query(rq_t *r) TP_WUR;
const char *rq_q(rq_t *r, const char *key);
bool utf8_valid(const char *s, size_t n);
char *pct_decode(const char *s, size_t n, bool plus, const char **why);
/* ETag from the body, 304 on If-None-Match, else 200 with body. */
void send_body(rq_t *r, const char *body, size_t len, const char *ctype, const char *source);
/* Reads the request body; false (problem sent) when over the configured max. */
bool rq_body(rq_t *r, char **out, size_t *len) TP_WUR;
void http_date(int64_t wall_ms, char *buf, size_t n);
uint64_t hash64(const void *data, size_t n);
/* Maps a Postgres failure to a reply: dependency down -> 503, client-caused
 * (class 22, 42) -> 400/422, anything else -> 500 without internals. */
void rq_pg_error(rq_t *r, PGresult *res, const char *err);
/* 503 + Retry-After when the pool refused (busy or down). */
void rq_pool_refused(rq_t *r, tp_pg_submit_t why);

int status_index(int status);
int status_code_at(int i);
double bucket_bound_ms(int i);

/* Authenticates r (rate limits, tp_auth_check); false with the 401/429
 * problem sent. */
bool rq_authenticate(rq_t *r) TP_WUR;
/* The principal may read an object needing any of roles (n of them; 0 = any
 * authenticated principal); false with a 403 problem sent when denied. */
bool rq_authorize(rq_t *r, char *const *roles, size_t n) TP_WUR;
bool rq_allowed(rq_t *r, char *const *roles, size_t n);

/* The principal may use an object needing any of the NULL-terminated roles
 * (NULL or empty: any authenticated principal); false with a 403 problem
 * sent. For handlers whose roles are fixed, e.g. `/api/v1/sync` writes:
 * rq_require(r, (const char *[]){"admin", NULL}). */
bool rq_require(rq_t *r, const char *const *roles) TP_WUR;

/* ---- tls.c ---- */
/* Builds a TLS 1.2+ context from PEM files and swaps it in; false with err
 * (naming the setting and file, never key material) keeps the previous one. */
bool tls_load(const char *cert, const char *key, char *err, size_t errlen) TP_WUR;
void tls_free(void);
/* evhttp_set_bevcb callback (arg: the worker): an OpenSSL bufferevent. */
struct bufferevent *tls_bevcb(struct event_base *base, void *arg);

/* ---- encode.c ---- */
void encode_result(const PGresult *res, fmt_t fmt, tp_buf_t *out);
const char *fmt_ctype(fmt_t fmt);

/* ---- cache.c ---- */
cache_t *cache_new(int64_t max_bytes, metrics_t *m);
void cache_free(cache_t *c);
/* Borrowed entry valid for key, or NULL. jobs: indices in the job registry. */
const centry_t *cache_get(cache_t *c, const char *key);
/* Takes ownership of body. fill_epoch: epoch read before the query was sent. */
void cache_put(cache_t *c, const char *key, char *body, size_t len, const centry_t *meta,
               uint64_t fill_epoch, int64_t ttl_ms, const int *jobs, size_t njobs);

/* ---- datasets.c ---- */
void h_datasets(rq_t *r);
void h_dataset(rq_t *r, const char *name);
/* Ensures the worker's sync_state view is fresh, then runs r->cont(r). */
void syncstate_then(rq_t *r, void (*cont)(rq_t *r));
/* Starts a background read of the worker's sync_state view when it is older
 * than a second, announced stale or never read; never waits (for /metrics,
 * which must answer while the pool is saturated or down). */
void syncstate_refresh(worker_t *w);
/* Fills Last-Modified / generation for a dataset's required jobs. */
void freshness_headers(worker_t *w, const defgen_t *g, int ds_idx, centry_t *meta);

/* Runs a validated dataset request on Postgres (response cache, single flight, query). */
void dataset_postgres(rq_t *r);

/* ---- fallback_routes.c: reads answered by the warehouse (docs/fallback.md) ---- */
/* Process-wide set-up from g_srv.cfg (before worker_init) and teardown (after the workers). */
void fb_global_init(void);
/* SIGHUP: the reloadable [warehouse] settings of c (wait, max_wait,
 * max_in_flight, timeout, abandon_after, result sizes and TTL, catalog,
 * schema) apply to reads that start from now on; running ones keep theirs. */
void fb_reconfigure(const tp_config_t *c);
void fb_global_free(void);
/* Per worker: the warehouse client and fallback loop on w->base; free from its thread. */
void fb_worker_init(worker_t *w);
void fb_worker_free(worker_t *w);
/* Decides whether a validated dataset request goes to the warehouse (values
 * per ds->params, defaults applied; raw = their request texts). True when it
 * took the request (it replies); false: the caller runs it on Postgres. */
bool fb_dataset(rq_t *r, const tp_defs_value_t *values, const char *const *raw);
/* True when path is /api/v1/statements/{id}; *id points into path. */
bool fb_statement_path(const char *path, const char **id);
/* GET (poll, Prefer: wait) and DELETE (cancel) /api/v1/statements/{id}. */
void h_statement(rq_t *r, const char *id);
/* Appends the fallback's Prometheus metrics (tidepool_fallback_*) to b. */
void fb_metrics(tp_buf_t *b);
/* Adds /api/v1/statements/{id} to an OpenAPI paths object, and the fallback's
 * answers (202, 401, 429, 502, 504) to the datasets of set that have a twin. */
struct json_t;
void fb_openapi(struct json_t *paths, const tp_defs_set_t *set);

/* ---- tables.c ---- */
/* Reflects @expose tables with a blocking connection (status thread only).
 * Returns a set with one reference, or NULL with err. */
tables_t *tables_reflect(const char *dsn, char *err, size_t errlen);
/* Drops a reference; the last one frees. NULL is a no-op. */
void tables_release(tables_t *t);
/* A reference on the current set / replaces it (takes t's reference). */
tables_t *tables_acquire(void);
void tables_swap(tables_t *t);
const ttable_t *tables_find(const tables_t *t, const char *name);
void h_table(rq_t *r, const char *name);

/* ---- routes.c ---- */
void route_request(struct evhttp_request *req, void *arg);
void h_openapi(rq_t *r);
void h_metrics(rq_t *r);

/* ---- writes.c, syncapi.c: write-back and /api/v1/sync ---- */
/* Takes POST/PATCH/DELETE on /api/v1/tables/... (true: answered or in flight). */
bool writes_route(rq_t *r, const char *path);
/* Status thread (blocking conn): reflects writable tables when asked, refreshes
 * the outbox backlog for /metrics. */
void writes_status(PGconn *c);
/* SIGHUP: re-reflect writable tables on the next status pass. */
void writes_reload(void);
/* Worker loop set-up / tear-down (the purge timer runs on worker 0). */
void writes_worker_start(worker_t *w);
void writes_worker_stop(worker_t *w);
/* The pool writes go through (the primary, even when reads use read_dsn). */
tp_pgpool_t *writes_pool(worker_t *w);
void writes_metrics(tp_buf_t *b);
/* Adds to paths (json_t *) the operations of the writable tables r's principal
 * may write (@writable roles). */
void writes_openapi(rq_t *r, void *paths);
char *writes_mirrored_array(void);
/* A job name: 1..1024 of [A-Za-z0-9_.-]. */
bool sync_job_name_ok(const char *s);
/* Takes /api/v1/sync and /api/v1/sync/{job}/run (true: answered or in flight). */
bool sync_route(rq_t *r, const char *path);
void sync_openapi(void *paths);

/* ---- events.c: GET /api/v1/events, Server-Sent Events (docs/server.md) ---- */
/* Process-wide: the boot id and the ring of recent events (before worker_init
 * / after the workers ended). */
void events_global_init(void);
void events_global_free(void);
/* Main thread, from the tidepool_sync LISTEN callback (channel NULL: the
 * connection came (back) up): records the event and wakes every worker. */
void events_publish(const char *channel, const char *payload);
/* Per worker, on its thread: set-up; SIGTERM (streams end cleanly and the
 * drain waits for them through w->closing); free after evhttp_free. */
void events_worker_init(worker_t *w);
void events_worker_stop(worker_t *w);
void events_worker_free(worker_t *w);
/* Takes /api/v1/events (true: answered or streaming). */
bool events_route(rq_t *r, const char *path);
void events_metrics(tp_buf_t *b);
void events_openapi(void *paths); /* json_t * */

/* ---- http.c: streaming replies ---- */
/* Sends status 200 with ctype and the headers set so far, starts a chunked
 * body (evhttp_send_reply_start), logs and counts the request and frees r.
 * The caller owns the evhttp request until evhttp_send_reply_end. */
void rq_stream_begin(rq_t *r, const char *ctype);

/* ---- main.c: definitions generations and jobs ---- */
defgen_t *gen_acquire(void);
void gen_release(defgen_t *g);
/* Registry index of a job name (added if new), or -1 when the registry is full. */
int job_index(const char *name);
uint64_t epoch_now(void);
/* A reference on the verifier in force (release with tp_auth_free). */
tp_auth_t *auth_acquire(void);
/* Rebuilds w's rate limiters when the settings changed since they were built. */
void worker_limits_refresh(worker_t *w);
void rl_pair_unref(rl_pair_t *p);
/* True if nothing affecting jobs changed since fill_epoch. */
bool jobs_unchanged(const int *jobs, size_t n, uint64_t fill_epoch);

#endif
