/* tidepool-server entry point: configuration, the worker threads and the
 * process's lifecycle.
 *
 * Threads: N workers (server.threads, 0 = one per core), each with its own
 * event_base, evhttp, SO_REUSEPORT listener, Postgres pool and response cache;
 * the main thread runs a small event_base for signals and the LISTEN
 * connection on tidepool_sync (which bumps the invalidation epochs the caches
 * read); a status thread does the blocking work that must stay off every
 * loop: migration status for /readyz and reflecting @expose tables (retried
 * until Postgres answers).
 * SIGHUP: the config file is re-read; when it loads and its [auth] builds, the
 * reloadable settings take effect (a new verifier swapped in, rate limits,
 * log level, drain timeout, table limit, TLS certificate and key, the
 * [warehouse] fallback limits for reads that start afterwards) and each
 * changed setting that needs a restart is logged; a broken file keeps everything
 * and logs file:line. Then the definitions are parsed into a new generation
 * and swapped in whole (a broken one keeps the old generation and logs why).
 * Requests hold a reference on the generation and verifier they started with.
 * Shutdown (SIGTERM/SIGINT): stop listening, let in-flight requests finish
 * within server.drain_timeout (default 10 s), then exit. SIGPIPE is ignored.
 * Service manager: a Postgres unreachable at start does not stop the start;
 * the server listens (503 until ready) and READY=1 waits until /readyz would
 * say 200 (migrations current, which the status thread applies once Postgres
 * answers; pools, LISTEN and tables up). STATUS= says what start-up waits for,
 * then what runs; RELOADING=1/READY=1 frame a SIGHUP, STOPPING=1 a SIGTERM. */
#include "server.h"
#include "static.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/thread.h>
#include <event2/util.h>

#include "tidepool/auth_tokens.h"
#include "tidepool/isots.h"
#include "tidepool/log.h"
#include "tidepool/migrate.h"
#include "tidepool/notify.h"
#include "tidepool/pg.h"

srv_t g_srv;

static pthread_mutex_t status_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t status_cv = PTHREAD_COND_INITIALIZER;
static bool status_stop, status_reflect = true;

/* ---- generations and the job registry ---- */

defgen_t *gen_acquire(void)
{
    pthread_mutex_lock(&g_srv.lock);
    defgen_t *g = g_srv.gen;
    atomic_fetch_add(&g->refs, 1);
    pthread_mutex_unlock(&g_srv.lock);
    return g;
}

static void gen_free(defgen_t *g)
{
    if (g->set && g->job_idx)
        for (size_t i = 0; i < g->set->n_datasets; i++)
            free(g->job_idx[i]);
    free(g->job_idx);
    tp_defs_set_free(g->set);
    free(g);
}

void gen_release(defgen_t *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        gen_free(g);
}

tables_t *tables_acquire(void)
{
    pthread_mutex_lock(&g_srv.lock);
    tables_t *t = g_srv.tables;
    atomic_fetch_add(&t->refs, 1);
    pthread_mutex_unlock(&g_srv.lock);
    return t;
}

void tables_swap(tables_t *t)
{
    pthread_mutex_lock(&g_srv.lock);
    tables_t *old = g_srv.tables;
    g_srv.tables = t;
    pthread_mutex_unlock(&g_srv.lock);
    tables_release(old);
}

int job_index(const char *name)
{
    pthread_mutex_lock(&g_srv.lock);
    int idx = -1;
    for (int i = 0; i < g_srv.njobs; i++)
        if (strcmp(g_srv.job_names[i], name) == 0)
            idx = i;
    if (idx < 0 && g_srv.njobs < SRV_MAX_JOBS) {
        g_srv.job_names[g_srv.njobs] = tp_xstrdup(name);
        idx = g_srv.njobs++;
    }
    pthread_mutex_unlock(&g_srv.lock);
    return idx;
}

tp_auth_t *auth_acquire(void)
{
    pthread_mutex_lock(&g_srv.lock);
    tp_auth_t *a = tp_auth_ref(g_srv.auth);
    pthread_mutex_unlock(&g_srv.lock);
    return a;
}

/* The rate limiters are one pair for the whole process (each locks itself),
 * so a client on one keep-alive connection, which stays on one thread, gets
 * the configured rate and not a thread's share of it. Workers keep a
 * reference and swap it when the settings change; the last reference frees. */
void rl_pair_unref(rl_pair_t *p)
{
    if (p && atomic_fetch_sub(&p->refs, 1) == 1) {
        tp_ratelimit_free(p->addr);
        tp_ratelimit_free(p->ident);
        free(p);
    }
}

/* Publishes the rate-limit settings of c: new limiters when they changed (a
 * new limiter starts every key with a full bucket); workers pick them up on
 * their next request. */
static void limits_publish(const tp_config_t *c)
{
    rl_pair_t want = {.rate_addr = (double)c->auth.rate_per_address,
                      .burst_addr = (double)c->auth.burst_per_address,
                      .rate_ident = (double)c->auth.rate_per_identity,
                      .burst_ident = (double)c->auth.burst_per_identity,
                      .keys = (size_t)c->auth.rate_limit_keys};
    pthread_mutex_lock(&g_srv.lock);
    const rl_pair_t *cur = g_srv.rl;
    bool same = cur && cur->keys == want.keys && cur->rate_addr == want.rate_addr &&
                cur->burst_addr == want.burst_addr && cur->rate_ident == want.rate_ident &&
                cur->burst_ident == want.burst_ident;
    rl_pair_t *old = NULL;
    if (!same) {
        rl_pair_t *p = tp_xmalloc(sizeof *p);
        *p = want;
        atomic_init(&p->refs, 1);
        p->addr = tp_ratelimit_new(want.rate_addr, want.burst_addr, want.keys);
        p->ident = tp_ratelimit_new(want.rate_ident, want.burst_ident, want.keys);
        old = g_srv.rl;
        g_srv.rl = p;
        atomic_fetch_add(&g_srv.rl_gen, 1);
    }
    pthread_mutex_unlock(&g_srv.lock);
    rl_pair_unref(old);
}

void worker_limits_refresh(worker_t *w)
{
    uint64_t gen = atomic_load_explicit(&g_srv.rl_gen, memory_order_acquire);
    if (w->rl && w->rl_gen == gen)
        return;
    pthread_mutex_lock(&g_srv.lock);
    rl_pair_t *p = g_srv.rl;
    atomic_fetch_add(&p->refs, 1);
    gen = atomic_load(&g_srv.rl_gen);
    pthread_mutex_unlock(&g_srv.lock);
    rl_pair_unref(w->rl);
    w->rl = p;
    w->rl_gen = gen;
}

uint64_t epoch_now(void)
{
    return atomic_load(&g_srv.epoch);
}

bool jobs_unchanged(const int *jobs, size_t n, uint64_t fill_epoch)
{
    if (atomic_load_explicit(&g_srv.all_inval, memory_order_acquire) > fill_epoch)
        return false;
    for (size_t i = 0; i < n; i++)
        if (jobs[i] >= 0 &&
            atomic_load_explicit(&g_srv.job_inval[jobs[i]], memory_order_acquire) > fill_epoch)
            return false;
    return true;
}

/* Builds a generation from the definitions directory; NULL (diagnostics logged
 * or printed) when anything is wrong. */
static defgen_t *gen_build(bool print)
{
    tp_defs_set_t *set = tp_defs_set_new();
    const char *dir = g_srv.defs_dir;
    if (dir && *dir) {
        tp_defs_diag_t diag = {0};
        if (!tp_defs_load_datasets(set, dir, &diag)) {
            for (size_t i = 0; i < diag.n; i++) {
                if (print)
                    fprintf(stderr, "%s\n", diag.msgs[i]);
                const char *kv[] = {"problem", diag.msgs[i], NULL};
                tp_logkv(TP_LOG_ERROR, kv, "definitions rejected");
            }
            tp_defs_diag_free(&diag);
            tp_defs_set_free(set);
            return NULL;
        }
        tp_defs_diag_free(&diag);
    }
    defgen_t *g = tp_xcalloc(1, sizeof *g);
    atomic_init(&g->refs, 1);
    g->set = set;
    g->job_idx = tp_xcalloc(set->n_datasets ? set->n_datasets : 1, sizeof(int *));
    for (size_t i = 0; i < set->n_datasets; i++) {
        const tp_defs_dataset_t *ds = &set->datasets[i];
        g->job_idx[i] = tp_xcalloc(ds->n_requires ? ds->n_requires : 1, sizeof(int));
        for (size_t j = 0; j < ds->n_requires; j++)
            g->job_idx[i][j] = job_index(ds->requires[j]);
    }
    return g;
}

static void gen_swap(defgen_t *g)
{
    pthread_mutex_lock(&g_srv.lock);
    defgen_t *old = g_srv.gen;
    g->id = ++g_srv.gen_counter;
    g_srv.gen = g;
    pthread_mutex_unlock(&g_srv.lock);
    gen_release(old);
}

/* ---- status thread: blocking Postgres work, off every loop ---- */

/* Token table snapshot for auth mode token: at start, on NOTIFY tidepool_auth
 * and every minute. A failed load keeps the previous snapshot. */
static void load_tokens(PGconn *c)
{
    static int64_t last_ms;
    tp_auth_t *a = auth_acquire();
    bool dirty = atomic_exchange(&g_srv.tokens_dirty, false);
    if (!tp_auth_wants_token_table(a) || (!dirty && last_ms && tp_now_ms() - last_ms < 60000)) {
        tp_auth_free(a);
        return;
    }
    char err[512];
    tp_auth_tokens_t *t = tp_auth_tokens_load(c, err, sizeof err);
    if (!t) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_WARN, kv, "loading tidepool.api_tokens failed; keeping the previous tokens");
        tp_auth_free(a);
        return;
    }
    last_ms = tp_now_ms();
    tp_auth_set_tokens(a, t);
    tp_auth_free(a);
}

static pthread_mutex_t lb_sync_mu = PTHREAD_MUTEX_INITIALIZER;

PGconn *srv_pg_connect(const char *dsn, int64_t timeout_ms, char *err, size_t errlen)
{
    if (!g_srv.lakebase)
        return tp_pg_connect(dsn, timeout_ms, err, errlen);
    pthread_mutex_lock(&lb_sync_mu);
    if (g_srv.lb_sync == NULL) {
        char *e = NULL;
        g_srv.lb_sync = tp_lakebase_new_blocking(&g_srv.lb_wh, &g_srv.lb_cfg, &e);
        if (g_srv.lb_sync == NULL) {
            snprintf(err, errlen, "%s", e ? e : "Lakebase: cannot create the credential provider");
            free(e);
            pthread_mutex_unlock(&lb_sync_mu);
            return NULL;
        }
    }
    pthread_mutex_unlock(&lb_sync_mu);
    return tp_lakebase_connect(g_srv.lb_sync, dsn, timeout_ms, err, errlen);
}

/* Postgres was unreachable at start, so nobody here has applied the pending
 * migrations yet: the first connection of the status thread does (under the
 * migrator's advisory lock, like at start). A failure (a database newer than
 * this build, an edited migration) keeps the server unready, says why in
 * /readyz and is logged once per distinct message; it is retried with every
 * status round in case another process fixes it. */
static void migrate_late(PGconn *c)
{
    static char last_err[600];
    char err[600];
    int applied = 0;
    if (!tp_migrate_apply(c, tp_migrate_default_dir(), &applied, err, sizeof err)) {
        if (strcmp(err, last_err) != 0) {
            snprintf(last_err, sizeof last_err, "%s", err);
            const char *kv[] = {"error", err, NULL};
            tp_logkv(TP_LOG_ERROR, kv, "migrations failed; not ready until they are applied");
        }
        return;
    }
    atomic_store(&g_srv.migrate_pending, false);
    char n[16];
    snprintf(n, sizeof n, "%d", applied);
    const char *kv[] = {"applied", n, NULL};
    tp_logkv(TP_LOG_INFO, kv, "postgres reachable: migrations checked");
}

static void status_once(void)
{
    char err[512];
    PGconn *c = srv_pg_connect(g_srv.dsn, 3000, err, sizeof err);
    if (!c) {
        atomic_store(&g_srv.migrations_known, false);
        pthread_mutex_lock(&g_srv.lock);
        snprintf(g_srv.migrations_why, sizeof g_srv.migrations_why, "%s", err);
        pthread_mutex_unlock(&g_srv.lock);
        return;
    }
    if (atomic_load(&g_srv.migrate_pending))
        migrate_late(c);
    tp_migrate_status_t st;
    char why[600] = "";
    bool ok = false;
    if (tp_migrate_status(c, tp_migrate_default_dir(), &st, err, sizeof err))
        ok = tp_migrate_status_current(&st, why, sizeof why);
    else
        snprintf(why, sizeof why, "%s", err);
    pthread_mutex_lock(&g_srv.lock);
    snprintf(g_srv.migrations_why, sizeof g_srv.migrations_why, "%s", why);
    pthread_mutex_unlock(&g_srv.lock);
    atomic_store(&g_srv.migrations_ok, ok);
    atomic_store(&g_srv.migrations_known, true);
    load_tokens(c);
    writes_status(c);
    PQfinish(c);

    pthread_mutex_lock(&status_mu);
    bool reflect = status_reflect;
    pthread_mutex_unlock(&status_mu);
    if (!reflect)
        return;
    tables_t *t = tables_reflect(g_srv.read_dsn, err, sizeof err);
    if (!t) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_WARN, kv, "reflecting exposed tables failed; will retry");
        return;
    }
    pthread_mutex_lock(&status_mu);
    status_reflect = false;
    pthread_mutex_unlock(&status_mu);
    tables_swap(t);
    atomic_store(&g_srv.tables_ready, true);
    char n[16];
    snprintf(n, sizeof n, "%zu", t->n);
    const char *kv[] = {"tables", n, NULL};
    tp_logkv(TP_LOG_INFO, kv, "exposed tables reflected");
}

/* Whichever program starts first applies pending migrations (under the
 * migrator's advisory lock, so the others wait and then find nothing to do).
 * A database newer than this build, or an edited applied migration, stops the
 * start; an unreachable Postgres does not: the server listens, answers 503
 * (and /readyz says why), holds back READY=1, and the status thread migrates
 * once Postgres answers (migrate_late). */
static bool migrate_at_start(void)
{
    char err[600];
    PGconn *c = srv_pg_connect(g_srv.dsn, g_srv.cfg.postgres.connect_timeout_ms, err, sizeof err);
    if (!c) {
        atomic_store(&g_srv.migrate_pending, true);
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_WARN, kv,
                 "postgres unreachable at start; answering 503 and not ready until it is back");
        return true;
    }
    int applied = 0;
    bool ok = tp_migrate_apply(c, tp_migrate_default_dir(), &applied, err, sizeof err);
    PQfinish(c);
    if (!ok) {
        fprintf(stderr, "tidepool-server: migrations: %s\n", err);
        return false;
    }
    return true;
}

static void *status_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&status_mu);
    while (!status_stop) {
        pthread_mutex_unlock(&status_mu);
        status_once();
        pthread_mutex_lock(&status_mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        /* quick retries while something is missing, a slow pulse otherwise */
        ts.tv_sec += status_reflect || !atomic_load(&g_srv.migrations_ok) ? 1 : 5;
        if (!status_stop)
            pthread_cond_timedwait(&status_cv, &status_mu, &ts);
    }
    pthread_mutex_unlock(&status_mu);
    return NULL;
}

static void status_wake(bool reflect)
{
    pthread_mutex_lock(&status_mu);
    if (reflect)
        status_reflect = true;
    pthread_cond_signal(&status_cv);
    pthread_mutex_unlock(&status_mu);
}

/* ---- workers ---- */

static int open_listener(const char *addr, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    int sslen = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (evutil_parse_sockaddr_port(addr, (struct sockaddr *)&ss, &sslen) != 0) {
        snprintf(err, errlen, "server.listen \"%s\" is not ADDR:PORT", addr);
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Accepted sockets inherit TCP_NODELAY on Linux: no Nagle delay on the
     * last segment of a reply (evhttp never sets it itself). */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&ss, (socklen_t)sslen) != 0 || listen(fd, 1024) != 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", addr, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    if ((w->inflight == 0 && w->closing <= 0) || tp_now_ms() >= w->drain_deadline_ms) {
        if (w->inflight > 0) {
            char n[16];
            snprintf(n, sizeof n, "%d", w->inflight);
            const char *kv[] = {"inflight", n, NULL};
            tp_logkv(TP_LOG_WARN, kv, "drain deadline reached; abandoning requests");
        }
        event_base_loopexit(w->base, NULL);
        return;
    }
    struct timeval tv = {0, 20000};
    evtimer_add(w->drain_timer, &tv);
}

static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    if (w->bound) {
        evhttp_del_accept_socket(w->http, w->bound);
        w->bound = NULL;
    }
    if (w->tls_bound) {
        evhttp_del_accept_socket(w->https, w->tls_bound);
        w->tls_bound = NULL;
    }
    event_del(w->tick);
    events_worker_stop(w);
    w->drain_deadline_ms = tp_now_ms() + atomic_load(&g_srv.drain_ms);
    on_drain_tick(-1, 0, w);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    atomic_store_explicit(&w->beat_ms, tp_now_ms(), memory_order_relaxed);
    tp_pgpool_stats_t st;
    tp_pgpool_stats(w->pool, &st);
    atomic_store_explicit(&w->m.pool_size, st.size, memory_order_relaxed);
    atomic_store_explicit(&w->m.pool_connected, st.connected, memory_order_relaxed);
    atomic_store_explicit(&w->m.pool_in_use, st.in_use, memory_order_relaxed);
    atomic_store_explicit(&w->m.pool_queued, st.queued, memory_order_relaxed);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char name[16];
    snprintf(name, sizeof name, "tp-worker-%d", w->id);
    pthread_setname_np(pthread_self(), name);
    event_base_dispatch(w->base);
    if (w->inflight == 0) {
        fb_worker_free(w);
        writes_worker_stop(w);
        evhttp_free(w->http);
        if (w->https)
            evhttp_free(w->https);
        events_worker_free(w);
        tp_pgpool_free(w->pool);
        tp_lakebase_free(w->lb);
        cache_free(w->cache);
        event_free(w->stop_ev);
        event_free(w->drain_timer);
        event_free(w->tick);
        event_base_free(w->base);
        rl_pair_unref(w->rl);
        w->rl = NULL;
    }
    return NULL;
}

/* An evhttp on w's loop listening on addr (*bound: its socket), or NULL with err. */
static struct evhttp *http_new(worker_t *w, const char *addr, struct evhttp_bound_socket **bound,
                               char *err, size_t errlen)
{
    struct evhttp *h = evhttp_new(w->base);
    const tp_config_t *c = &g_srv.cfg;
    /* evhttp's own limits are hard ceilings above ours, so that the common
     * oversize cases get our problem+json 413/431 instead of a bare close. */
    evhttp_set_max_body_size(h, c->server.max_body_bytes * 4 + 65536);
    evhttp_set_max_headers_size(h, c->server.max_header_bytes * 4 + 8192);
    struct timeval tv = {.tv_sec = c->server.timeout_ms / 1000,
                         .tv_usec = (c->server.timeout_ms % 1000) * 1000};
    evhttp_set_timeout_tv(h, &tv);
    evhttp_set_allowed_methods(h, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                      EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
                                      EVHTTP_REQ_PATCH);
    evhttp_set_gencb(h, route_request, w);
    int fd = open_listener(addr, err, errlen);
    if (fd < 0) {
        evhttp_free(h);
        return NULL;
    }
    *bound = evhttp_accept_socket_with_handle(h, fd);
    if (!*bound) {
        snprintf(err, errlen, "evhttp_accept_socket failed on %s", addr);
        close(fd);
        evhttp_free(h);
        return NULL;
    }
    return h;
}

static bool worker_init(worker_t *w, int id, int pool_size, char *err, size_t errlen)
{
    memset(w, 0, sizeof *w);
    w->magic = WORKER_MAGIC;
    w->id = id;
    /* The epoll changelist folds the add/remove of write interest that every
     * reply causes within one loop iteration into fewer epoll_ctl calls. */
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    w->base = event_base_new_with_config(ec);
    event_config_free(ec);
    if (!w->base) {
        snprintf(err, errlen, "event_base_new failed");
        return false;
    }
    const tp_config_t *c = &g_srv.cfg;
    w->http = http_new(w, c->server.listen, &w->bound, err, errlen);
    if (!w->http)
        return false;
    if (*c->server.tls_listen) {
        w->https = http_new(w, c->server.tls_listen, &w->tls_bound, err, errlen);
        if (!w->https)
            return false;
        evhttp_set_bevcb(w->https, tls_bevcb, w);
    }
    int64_t maxc = c->server.max_connections > 0 ? c->server.max_connections : 1024;
    w->max_inflight = (int)(maxc / g_srv.nthreads);
    if (w->max_inflight < 1)
        w->max_inflight = 1;
    tp_pgpool_opts_t po = {
        .dsn = g_srv.read_dsn,
        .size = pool_size,
        .max_queue = g_srv.pool_queue,
        .connect_timeout_ms = (int)c->postgres.connect_timeout_ms,
        .max_statements = 512,
        .name = "read",
    };
    if (g_srv.lakebase) {
        char *e = NULL;
        w->lb = tp_lakebase_new_on(w->base, &g_srv.lb_wh, &g_srv.lb_cfg, &e);
        if (w->lb == NULL) {
            snprintf(err, errlen, "%s", e ? e : "Lakebase: cannot create the credential provider");
            free(e);
            return false;
        }
        tp_lakebase_pg_provider(w->lb, &w->pw);
        po.password = &w->pw;
    }
    w->pool = tp_pgpool_new(w->base, &po);
    w->cache = cache_new(g_srv.cache_bytes, &w->m);
    fb_worker_init(w);
    w->stop_ev = event_new(w->base, -1, 0, on_stop, w);
    w->drain_timer = evtimer_new(w->base, on_drain_tick, w);
    worker_limits_refresh(w);
    atomic_init(&w->beat_ms, tp_now_ms());
    w->tick = event_new(w->base, -1, EV_PERSIST, on_tick, w);
    struct timeval sec = {1, 0};
    event_add(w->tick, &sec);
    writes_worker_start(w);
    events_worker_init(w);
    return true;
}

/* ---- main loop: signals and LISTEN ---- */

static void on_notify(const char *channel, const char *payload, void *arg)
{
    (void)arg;
    events_publish(channel, payload);
    uint64_t e = atomic_fetch_add(&g_srv.epoch, 1) + 1;
    if (!channel) {
        atomic_store(&g_srv.all_inval, e);
        atomic_store(&g_srv.listen_up, true);
        return;
    }
    char job[160];
    snprintf(job, sizeof job, "%s", payload ? payload : "");
    char *colon = strrchr(job, ':');
    if (colon)
        *colon = '\0';
    int idx = job[0] ? job_index(job) : -1;
    if (idx >= 0)
        atomic_store(&g_srv.job_inval[idx], e);
    else
        atomic_store(&g_srv.all_inval, e);
    const char *kv[] = {"job", job, "payload", payload, NULL};
    tp_logkv(TP_LOG_INFO, kv, "sync notification: cache entries of the job dropped");
}

static void on_auth_notify(const char *channel, const char *payload, void *arg)
{
    (void)payload;
    (void)arg;
    atomic_store(&g_srv.tokens_dirty, true);
    if (channel)
        status_wake(false);
}

static struct event_base *g_main_base;

/* The watchdog's health check: keep-alives come from the main loop, so they
 * also vouch for the worker loops, each of which ticks once a second. A
 * worker silent for half the watchdog interval (at least 3 s) is stuck. While
 * draining, workers stop ticking on purpose. */
static bool workers_turning(void *arg, char *why, size_t whylen)
{
    (void)arg;
    if (atomic_load(&g_srv.draining))
        return true;
    int64_t limit = (int64_t)(tp_notify_watchdog_usec() / 2000u);
    if (limit < 3000)
        limit = 3000;
    int64_t now = tp_now_ms();
    for (int i = 0; i < g_srv.nthreads; i++) {
        int64_t quiet = now - atomic_load_explicit(&g_srv.workers[i].beat_ms, memory_order_relaxed);
        if (quiet > limit) {
            snprintf(why, whylen, "worker loop %d has not turned for %lld ms", i, (long long)quiet);
            return false;
        }
    }
    return true;
}

/* ---- readiness (READY=1) and STATUS= lines, on the main loop ---- */

static tp_pglisten_t *g_lsn;     /* the tidepool_sync LISTEN connection */
static struct event *g_status_ev; /* status tick: 200 ms until ready, then 1 s */
static bool g_ready_sent;        /* READY=1 went out: start-up is over */
static bool g_reload_failed;     /* the last SIGHUP kept something old (logged) */
static char g_status_last[700];  /* last STATUS= text sent (sent again only when it changes) */
static char g_pg_where[256];     /* HOST:PORT of postgres.dsn, for "waiting for" lines */

/* Sends STATUS= when the one-line summary changed: before READY what start-up
 * waits for, then the listener, threads, datasets and whether Postgres is up. */
static void status_publish(void)
{
    char line[sizeof g_status_last];
    tp_buf_t why = {0};
    bool ready = srv_readiness(NULL, &why, NULL);
    if (!g_ready_sent) {
        char mwhy[600];
        pthread_mutex_lock(&g_srv.lock);
        snprintf(mwhy, sizeof mwhy, "%s", g_srv.migrations_why);
        pthread_mutex_unlock(&g_srv.lock);
        if (!atomic_load(&g_srv.migrations_known))
            snprintf(line, sizeof line, "%s PostgreSQL %s",
                     mwhy[0] ? "waiting for" : "connecting to", g_pg_where);
        else if (!atomic_load(&g_srv.migrations_ok))
            snprintf(line, sizeof line, "waiting for migrations: %.400s", mwhy);
        else
            snprintf(line, sizeof line, "starting: %.400s", why.data ? why.data : "");
    } else {
        pthread_mutex_lock(&g_srv.lock);
        size_t nds = g_srv.gen->set->n_datasets;
        pthread_mutex_unlock(&g_srv.lock);
        int connected = 0;
        for (int i = 0; i < g_srv.nthreads; i++)
            connected += atomic_load_explicit(&g_srv.workers[i].m.pool_connected,
                                              memory_order_relaxed);
        const char *tls = g_srv.cfg.server.tls_listen;
        snprintf(line, sizeof line,
                 "listening on %s%s%s, %d thread%s, %zu dataset%s; PostgreSQL %s%s%.300s%s",
                 g_srv.cfg.server.listen, *tls ? " and https " : "", tls, g_srv.nthreads,
                 g_srv.nthreads == 1 ? "" : "s", nds, nds == 1 ? "" : "s",
                 connected > 0 ? "up" : "down", ready || connected == 0 ? "" : "; not ready: ",
                 ready || connected == 0 ? "" : why.data ? why.data : "",
                 g_reload_failed ? "; last reload failed (see log)" : "");
    }
    tp_buf_free(&why);
    if (strcmp(line, g_status_last) == 0)
        return;
    snprintf(g_status_last, sizeof g_status_last, "%s", line);
    tp_notify_status("%s", line);
}

/* The main loop's status tick: mirrors the LISTEN connection into /readyz,
 * sends READY=1 the first time the server is ready (so READY and /readyz
 * agree: migrations current, Postgres reached, LISTEN up, tables reflected),
 * and keeps STATUS= current. Not re-armed once draining. */
static void on_status_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (atomic_load(&g_srv.draining))
        return;
    atomic_store(&g_srv.listen_up, g_lsn != NULL && tp_pglisten_up(g_lsn));
    if (!g_ready_sent && srv_readiness(NULL, NULL, NULL)) {
        g_ready_sent = true;
        tp_notify_ready();
        char ms[24];
        snprintf(ms, sizeof ms, "%lld", (long long)(tp_wall_ms() - g_srv.started_ms));
        const char *kv[] = {"after_ms", ms, NULL};
        tp_logkv(TP_LOG_INFO, kv,
                 "ready: migrations current, Postgres and LISTEN up, tables reflected");
    }
    status_publish();
    struct timeval tv = {g_ready_sent ? 1 : 0, g_ready_sent ? 0 : 200000};
    evtimer_add(g_status_ev, &tv);
}

/* Applies the settings of c that take effect without a restart (the verifier
 * is already built from c). */
static void settings_apply(const tp_config_t *c)
{
    tp_log_level_t lvl;
    if (c->log.level && tp_log_parse_level(c->log.level, &lvl))
        tp_log_set_level(lvl);
    atomic_store(&g_srv.drain_ms, c->server.drain_timeout_ms);
    atomic_store(&g_srv.table_max_limit, c->server.table_max_limit);
    atomic_store(&g_srv.idem_ttl_ms, c->server.idempotency_ttl_ms);
    g_srv.defs_dir = c->server.definitions;
    limits_publish(c);
}

/* SIGHUP, part one: re-reads the config file. A file that does not load or
 * whose [auth] does not build keeps every setting (the log says file:line);
 * otherwise the reloadable settings are swapped in, each changed setting that
 * needs a restart is logged and keeps its running value, and the TLS
 * certificate and key are re-read (a bad pair keeps the previous one). */
static bool config_reload(void)
{
    tp_config_t eff;
    static const char *const not_ours[] = {"sync", NULL};
    const tp_config_reload_scope_t scope = {.live = NULL, .ignored_sections = not_ours};
    tp_config_t *fresh = tp_config_reload(&g_srv.cfg, &scope, &eff);
    if (!fresh)
        return false;
    char err[512];
    tp_auth_t *a = tp_auth_new(&eff, err, sizeof err);
    if (!a) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_ERROR, kv, "config reload failed: keeping the previous settings");
        tp_config_free(fresh);
        free(fresh);
        return false;
    }
    pthread_mutex_lock(&g_srv.lock);
    tp_auth_t *old = g_srv.auth;
    pthread_mutex_unlock(&g_srv.lock);
    tp_auth_set_tokens(a, tp_auth_get_tokens(old));
    pthread_mutex_lock(&g_srv.lock);
    g_srv.auth = a;
    pthread_mutex_unlock(&g_srv.lock);
    tp_auth_free(old);
    atomic_store(&g_srv.tokens_dirty, true);
    settings_apply(&eff);
    fb_reconfigure(&eff); /* fallback reads started from now on */
    if (*g_srv.cfg.server.tls_listen) {
        if (tls_load(eff.server.tls_cert, eff.server.tls_key, err, sizeof err)) {
            tp_info("TLS certificate and key reloaded");
        } else {
            const char *kv[] = {"error", err, NULL};
            tp_logkv(TP_LOG_ERROR, kv, "TLS reload failed: keeping the previous certificate");
        }
    }
    if (g_srv.live) {
        tp_config_free(g_srv.live);
        free(g_srv.live);
    }
    g_srv.live = fresh;
    status_wake(true); /* tokens and table options (table_max_limit) */
    tp_info("configuration reloaded");
    return true;
}

/* The end of a SIGHUP: READY=1 closes the RELOADING=1 (only once start-up is
 * over: before that READY still waits for readiness) and STATUS= says what is
 * running now. */
static void reload_done(bool ok)
{
    g_reload_failed = !ok;
    if (g_ready_sent)
        tp_notify_ready();
    status_publish();
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    (void)arg;
    if (sig == SIGHUP) {
        if (atomic_load(&g_srv.draining))
            return;
        tp_info("SIGHUP: reloading configuration and definitions");
        if (g_ready_sent)
            tp_notify_reloading();
        bool cfg_ok = config_reload();
        writes_reload(); /* writable tables too, even if the definitions are broken */
        defgen_t *g = gen_build(false);
        if (!g) {
            tp_warn("reload failed: keeping the previous definitions");
            reload_done(false);
            return;
        }
        gen_swap(g);
        status_wake(true);
        char n[16];
        snprintf(n, sizeof n, "%zu", g->set->n_datasets);
        const char *kv[] = {"datasets", n, NULL};
        tp_logkv(TP_LOG_INFO, kv, "definitions reloaded");
        reload_done(cfg_ok);
        return;
    }
    if (atomic_exchange(&g_srv.draining, true))
        return;
    tp_info("shutting down: draining in-flight requests");
    tp_notify_stopping();
    for (int i = 0; i < g_srv.nthreads; i++)
        event_active(g_srv.workers[i].stop_ev, EV_READ, 0);
    event_base_loopexit(g_main_base, NULL);
}

static void usage(FILE *f)
{
    fprintf(f, "Usage: tidepool-server [OPTIONS]\n"
               "       tidepool-server [-c FILE] token create NAME --roles R[,R] [--ttl 90d]\n"
               "       tidepool-server [-c FILE] token list | token revoke NAME|ID\n"
               "tidepool-server answers dashboard reads and write-backs over HTTP.\n\n"
               "  -c, --config FILE  configuration file (default %s if it exists)\n"
               "      --check        validate configuration and definitions, then exit\n"
               "  -h, --help         show this help\n"
               "  -V, --version      show the version\n",
            TP_CONFIG_DEFAULT_PATH);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check", no_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL;
    bool check = false;
    int c;
    while ((c = getopt_long(argc, argv, "+c:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'k': check = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("tidepool-server %s\n", TP_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    bool token_cmd = optind < argc && strcmp(argv[optind], "token") == 0;
    if (optind < argc && !token_cmd) {
        usage(stderr);
        return 2;
    }
    struct stat st;
    if (!config_path && stat(TP_CONFIG_DEFAULT_PATH, &st) == 0)
        config_path = TP_CONFIG_DEFAULT_PATH;
    char err[512];
    if (!tp_config_load(&g_srv.cfg, config_path, err, sizeof err)) {
        fprintf(stderr, "%s\n", err); /* "file:line: message", as the other programs */
        return 2;
    }
    tp_log_set_global("program", "tidepool-server");
    g_srv.lakebase = tp_lakebase_from_config(&g_srv.cfg, &g_srv.lb_cfg, &g_srv.lb_wh);
    if (token_cmd) {
        if (optind + 1 >= argc) {
            usage(stderr);
            tp_config_free(&g_srv.cfg);
            return 2;
        }
        PGconn *conn = srv_pg_connect(g_srv.cfg.postgres.dsn, 10000, err, sizeof err);
        if (!conn) {
            fprintf(stderr, "tidepool-server: %s\n", err);
            tp_config_free(&g_srv.cfg);
            return 1;
        }
        int rc = tp_auth_token_command(conn, argc - optind - 1, argv + optind + 1, stdout, stderr);
        PQfinish(conn);
        tp_config_free(&g_srv.cfg);
        return rc;
    }
    g_srv.auth = tp_auth_new(&g_srv.cfg, err, sizeof err);
    if (!g_srv.auth) {
        fprintf(stderr, "tidepool-server: %s\n", err);
        tp_config_free(&g_srv.cfg);
        return 2;
    }
    /* Every session runs with DateStyle=ISO and TimeZone=UTC: the encoders
     * parse ISO text and write answers (to_jsonb) render timestamptz in UTC. */
    char *dsn = tp_isots_dsn(g_srv.cfg.postgres.dsn);
    char *read_dsn = g_srv.cfg.postgres.read_dsn && *g_srv.cfg.postgres.read_dsn
                         ? tp_isots_dsn(g_srv.cfg.postgres.read_dsn)
                         : NULL;
    g_srv.dsn = dsn;
    g_srv.read_dsn = read_dsn ? read_dsn : dsn;
    g_srv.pool_queue = (int)g_srv.cfg.server.pool_queue;
    pthread_mutex_init(&g_srv.lock, NULL);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    g_srv.nthreads = g_srv.cfg.server.threads > 0 ? (int)g_srv.cfg.server.threads
                                                  : (int)(cores > 0 ? cores : 1);
    settings_apply(&g_srv.cfg);
    if (*g_srv.cfg.server.tls_listen && !tls_load(g_srv.cfg.server.tls_cert,
                                                  g_srv.cfg.server.tls_key, err, sizeof err)) {
        fprintf(stderr, "tidepool-server: %s\n", err);
        tp_auth_free(g_srv.auth);
        rl_pair_unref(g_srv.rl);
        tp_config_free(&g_srv.cfg);
        return 2;
    }

    defgen_t *g0 = gen_build(true);
    if (!g0) {
        tp_auth_free(g_srv.auth);
        rl_pair_unref(g_srv.rl);
        tp_config_free(&g_srv.cfg);
        return 2;
    }
    if (check) {
        tp_config_print(&g_srv.cfg, stdout);
        printf("datasets: %zu\n", g0->set->n_datasets);
        static_load(&g_srv.cfg, stdout);
        static_free();
        for (size_t i = 0; i < g0->set->n_datasets; i++)
            printf("  dataset %s (%zu params)\n", g0->set->datasets[i].name,
                   g0->set->datasets[i].n_params);
        gen_release(g0);
        tp_auth_free(g_srv.auth);
        rl_pair_unref(g_srv.rl);
        tp_config_free(&g_srv.cfg);
        return 0;
    }
    if (!migrate_at_start()) {
        gen_release(g0);
        tp_auth_free(g_srv.auth);
        rl_pair_unref(g_srv.rl);
        tp_config_free(&g_srv.cfg);
        return 1;
    }
    g_srv.gen = g0;
    static_load(&g_srv.cfg, NULL);
    g_srv.tables = tp_xcalloc(1, sizeof(tables_t));
    atomic_init(&g_srv.tables->refs, 1);

    g_srv.cache_bytes = g_srv.cfg.server.cache_bytes / g_srv.nthreads;
    int pool_total = g_srv.cfg.postgres.pool_size > 0 ? (int)g_srv.cfg.postgres.pool_size : 8;
    int per = pool_total / g_srv.nthreads;
    if (per < 1)
        per = 1;
    g_srv.started_ms = tp_wall_ms();

    signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads();
    fb_global_init();
    events_global_init();
    g_srv.workers = tp_xcalloc((size_t)g_srv.nthreads, sizeof(worker_t));
    for (int i = 0; i < g_srv.nthreads; i++) {
        if (!worker_init(&g_srv.workers[i], i, per, err, sizeof err)) {
            fprintf(stderr, "tidepool-server: %s\n", err);
            return 1;
        }
    }
    g_main_base = event_base_new();
    struct event *sigs[3];
    const int signums[3] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        sigs[i] = evsignal_new(g_main_base, signums[i], on_signal, NULL);
        event_add(sigs[i], NULL);
    }
    tp_lakebase_t *main_lb = NULL;
    tp_pg_password_provider_t main_pw;
    if (g_srv.lakebase) {
        char *e = NULL;
        main_lb = tp_lakebase_new_on(g_main_base, &g_srv.lb_wh, &g_srv.lb_cfg, &e);
        if (main_lb == NULL) { /* the workers' providers were made alike: cannot happen */
            tp_error("%s", e ? e : "Lakebase: cannot create the credential provider");
            free(e);
            return 1;
        }
        tp_lakebase_pg_provider(main_lb, &main_pw);
    }
    const tp_pg_password_provider_t *pw = main_lb ? &main_pw : NULL;
    tp_pglisten_t *lsn = tp_pglisten_new_pw(g_main_base, g_srv.dsn, "tidepool_sync",
                                            (int)g_srv.cfg.postgres.connect_timeout_ms, pw,
                                            on_notify, NULL);
    g_lsn = lsn;
    tp_pglisten_t *auth_lsn = NULL;
    if (tp_auth_wants_token_table(g_srv.auth))
        auth_lsn = tp_pglisten_new_pw(g_main_base, g_srv.dsn, "tidepool_auth",
                                      (int)g_srv.cfg.postgres.connect_timeout_ms, pw,
                                      on_auth_notify, NULL);
    pthread_t status_th;
    pthread_create(&status_th, NULL, status_main, NULL);
    for (int i = 0; i < g_srv.nthreads; i++)
        pthread_create(&g_srv.workers[i].th, NULL, worker_main, &g_srv.workers[i]);
    char nth[16], pool[16];
    snprintf(nth, sizeof nth, "%d", g_srv.nthreads);
    snprintf(pool, sizeof pool, "%d", per);
    const char *kv[] = {"listen", g_srv.cfg.server.listen, "tls_listen",
                        *g_srv.cfg.server.tls_listen ? g_srv.cfg.server.tls_listen : NULL,
                        "threads", nth, "pool_per_thread", pool, NULL};
    tp_logkv(TP_LOG_INFO, kv, "tidepool-server listening");
    tp_notify_wd_t *wd = NULL;
    if (!tp_notify_wd_start(g_main_base, &wd))
        tp_warn("systemd watchdog timer could not be armed");
    tp_notify_wd_set_check(wd, workers_turning, NULL);
    /* READY=1 waits for readiness: see on_status_tick. */
    tp_pg_where_conninfo(g_srv.cfg.postgres.dsn, g_pg_where, sizeof g_pg_where);
    g_status_ev = evtimer_new(g_main_base, on_status_tick, NULL);
    event_active(g_status_ev, EV_TIMEOUT, 0);

    event_base_dispatch(g_main_base);

    for (int i = 0; i < g_srv.nthreads; i++)
        pthread_join(g_srv.workers[i].th, NULL);
    pthread_mutex_lock(&status_mu);
    status_stop = true;
    pthread_cond_signal(&status_cv);
    pthread_mutex_unlock(&status_mu);
    pthread_join(status_th, NULL);
    tp_notify_wd_free(wd);
    event_free(g_status_ev);
    g_lsn = NULL;
    tp_pglisten_free(lsn);
    tp_pglisten_free(auth_lsn);
    tp_lakebase_free(main_lb);
    /* A repeated SIGTERM while we finish must not kill us mid-cleanup: block
     * it (every other thread has ended) before libevent restores the default. */
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    for (int i = 0; i < 3; i++)
        event_free(sigs[i]);
    event_base_free(g_main_base);
    bool clean = true;
    for (int i = 0; i < g_srv.nthreads; i++)
        clean = clean && g_srv.workers[i].inflight == 0;
    if (clean) {
        free(g_srv.workers);
        gen_release(g_srv.gen);
        tables_release(g_srv.tables);
        tp_auth_free(g_srv.auth);
        rl_pair_unref(g_srv.rl);
        tls_free();
        if (g_srv.live) {
            tp_config_free(g_srv.live);
            free(g_srv.live);
        }
        for (int i = 0; i < g_srv.njobs; i++)
            free(g_srv.job_names[i]);
        fb_global_free();
        events_global_free();
        tp_lakebase_free(g_srv.lb_sync);
        tp_config_free(&g_srv.cfg);
        static_free();
    }
    if (clean) {
        free(read_dsn);
        free(dsn);
    }
    tp_info("tidepool-server stopped");
    return 0;
}
