/* Lakebase credential provider (see include/tidepool/lakebase.h).
 *
 * Owns: the cached {token, expiry} of one Lakebase instance or endpoint, the
 * one credential request in flight (a tp_wh_api_post through the warehouse
 * client's auth), the waiters parked on it, and the blocking wrappers (a
 * private event_base and warehouse client driven until an answer arrives).
 * Waiters are answered from the loop only: a cached token through a zero
 * timer, a fresh one when the request completes; a waiter added while the
 * answer is being handed out waits for the next one (generation numbers).
 * The token is secret: it goes to callbacks and libpq, never to a log line,
 * an error message or a stat; cached copies are zeroed before being freed.
 * Login failures are classified by tp_pg_password_refused and
 * tp_pg_error_transient (lib/pg.c).
 * Threads: a blocking provider's state (cache, waiters, its private loop and
 * warehouse client) is only touched under lb->mu, so the daemon's loop thread
 * and its outbox shipper thread (or the server's status thread and workers)
 * may share one; an asynchronous provider belongs to its loop's thread. */
#include "tidepool/lakebase.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"
#include "tidepool/wh_settings.h"

#define LB_MAGIC 0x4c4b4250u   /* "LKBP" */
#define WAIT_MAGIC 0x4c4b5754u /* "LKWT" */
#define SYNC_MAGIC 0x4c4b5359u /* "LKSY" */
#define PATH_PROVISIONED "/api/2.0/database/credentials"
#define PATH_AUTOSCALING "/api/2.0/postgres/credentials"
#define DEFAULT_REFRESH_BEFORE_MS (2 * 60 * 1000)

struct tp_lakebase_wait {
    uint32_t magic;
    tp_lakebase_t *lb;
    uint64_t gen;
    tp_lakebase_cb cb;
    void *arg;
    tp_lakebase_wait_t *prev, *next;
};

struct tp_lakebase {
    uint32_t magic;
    struct event_base *base;
    tp_wh_t *wh;
    bool blocking; /* owns base (and wh) */
    bool own_wh;
    pthread_mutex_t mu; /* blocking providers: one caller at a time drives the loop */
    char *instance;
    char *endpoint;
    int64_t refresh_before_ms;
    char *token;            /* secret */
    int64_t refresh_at_ms;  /* monotonic: mint anew from here on */
    int64_t expires_wall_ms;
    tp_wh_api_t *call;
    tp_lakebase_wait_t *waiters;
    uint64_t gen;
    struct event *defer;
    tp_lakebase_stats_t stats;
};

void tp_lakebase_config_init(tp_lakebase_config_t *c)
{
    memset(c, 0, sizeof *c);
    c->refresh_before_ms = DEFAULT_REFRESH_BEFORE_MS;
}

static void drop_token(tp_lakebase_t *lb)
{
    if (lb->token != NULL) {
        explicit_bzero(lb->token, strlen(lb->token));
        free(lb->token);
    }
    lb->token = NULL;
    lb->refresh_at_ms = 0;
    lb->expires_wall_ms = 0;
}

static bool cache_fresh(const tp_lakebase_t *lb)
{
    return lb->token != NULL && tp_now_ms() < lb->refresh_at_ms;
}

static void unlink_waiter(tp_lakebase_wait_t *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        w->lb->waiters = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

static void free_waiter(tp_lakebase_wait_t *w)
{
    w->magic = 0;
    free(w);
}

/* Hands token (or err) to every waiter that was waiting before this call. A
 * callback may add waiters (they wait for the next answer) or cancel others. */
static void answer_all(tp_lakebase_t *lb, const char *token, const char *err)
{
    uint64_t upto = lb->gen++;
    for (;;) {
        tp_lakebase_wait_t *w = lb->waiters;
        while (w != NULL && w->gen > upto)
            w = w->next;
        if (w == NULL)
            return;
        unlink_waiter(w);
        tp_lakebase_cb cb = w->cb;
        void *arg = w->arg;
        free_waiter(w);
        cb(token, err, arg);
    }
}

static void uuid4(char out[37])
{
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        uint64_t x = tp_random_u64(), y = tp_random_u64();
        memcpy(b, &x, 8);
        memcpy(b + 8, &y, 8);
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
             b[15]);
}

/* Takes the answer of a credential request; false with why set when unusable. */
static bool take_answer(tp_lakebase_t *lb, const char *body, size_t len, char *why, size_t whylen)
{
    json_error_t je;
    json_t *j = json_loadb(body ? body : "", len, 0, &je);
    const char *exp_key = lb->instance != NULL ? "expiration_time" : "expire_time";
    json_t *tok = json_object_get(j, "token");
    json_t *exp = json_object_get(j, exp_key);
    bool ok = false;
    if (!json_is_object(j))
        snprintf(why, whylen, "answer is not a JSON object (%s)", je.text);
    else if (!json_is_string(tok) || json_string_length(tok) == 0)
        snprintf(why, whylen, "answer has no \"token\"");
    else if (!json_is_string(exp))
        snprintf(why, whylen, "answer has no \"%s\"", exp_key);
    else {
        int64_t exp_ms = tp_rfc3339_parse(json_string_value(exp));
        int64_t life = exp_ms - tp_wall_ms();
        if (exp_ms < 0)
            snprintf(why, whylen, "\"%s\" is not an RFC 3339 time: \"%.60s\"", exp_key,
                     json_string_value(exp));
        else if (life <= 0)
            snprintf(why, whylen, "the token arrived expired (%s = %.60s; clock skew?)", exp_key,
                     json_string_value(exp));
        else {
            drop_token(lb);
            lb->token = tp_xstrdup(json_string_value(tok));
            int64_t before = lb->refresh_before_ms < life / 2 ? lb->refresh_before_ms : life / 2;
            lb->refresh_at_ms = tp_now_ms() + life - before;
            lb->expires_wall_ms = exp_ms;
            char in_s[32], at_s[32];
            snprintf(in_s, sizeof in_s, "%lld", (long long)(life / 1000));
            snprintf(at_s, sizeof at_s, "%lld", (long long)((life - before) / 1000));
            const char *kv[] = {"instance", lb->instance, "endpoint", lb->endpoint, "expires_in_s", in_s,
                                "refresh_in_s", at_s, NULL};
            tp_logkv(TP_LOG_INFO, kv, "lakebase credential minted");
            ok = true;
        }
    }
    json_decref(j);
    return ok;
}

static void on_minted(int http, const char *body, size_t len, const char *err, tp_wh_errkind_t kind,
                      void *arg)
{
    (void)http;
    (void)kind;
    tp_lakebase_t *lb = arg;
    if (lb->magic != LB_MAGIC)
        abort();
    lb->call = NULL;
    char why[700] = "", bad[600];
    if (err != NULL)
        snprintf(why, sizeof why, "cannot get a Lakebase database credential: %s", err);
    else if (!take_answer(lb, body, len, bad, sizeof bad))
        snprintf(why, sizeof why, "Lakebase credential endpoint: %s", bad);
    if (why[0] != '\0') {
        lb->stats.mint_failures++;
        const char *kv[] = {"error", why, NULL};
        tp_logkv(TP_LOG_ERROR, kv, "lakebase credential failed");
        answer_all(lb, NULL, why);
        return;
    }
    lb->stats.mints++;
    lb->stats.expires_wall_ms = lb->expires_wall_ms;
    char *copy = tp_xstrdup(lb->token); /* a callback may drop the cache */
    answer_all(lb, copy, NULL);
    explicit_bzero(copy, strlen(copy));
    free(copy);
}

static void mint_start(tp_lakebase_t *lb)
{
    if (lb->call != NULL)
        return;
    tp_buf_t b;
    tp_buf_init(&b);
    const char *path;
    if (lb->instance != NULL) {
        char id[37];
        uuid4(id);
        tp_buf_puts(&b, "{\"instance_names\":[");
        tp_buf_json_str(&b, lb->instance);
        tp_buf_printf(&b, "],\"request_id\":\"%s\"}", id);
        path = PATH_PROVISIONED;
    } else {
        tp_buf_puts(&b, "{\"endpoint\":");
        tp_buf_json_str(&b, lb->endpoint);
        tp_buf_putc(&b, '}');
        path = PATH_AUTOSCALING;
    }
    lb->call = tp_wh_api_post(lb->wh, path, b.data, on_minted, lb);
    tp_buf_free(&b);
}

/* From the loop: answer with the cache, or make sure a request is on its way. */
static void on_defer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_lakebase_t *lb = arg;
    if (lb->magic != LB_MAGIC)
        abort();
    if (cache_fresh(lb)) {
        char *copy = tp_xstrdup(lb->token);
        answer_all(lb, copy, NULL);
        explicit_bzero(copy, strlen(copy));
        free(copy);
    } else if (lb->waiters != NULL) {
        mint_start(lb);
    }
}

static tp_lakebase_t *make(struct event_base *base, tp_wh_t *wh, const tp_lakebase_config_t *cfg,
                           char **err)
{
    *err = NULL;
    bool inst = cfg->instance != NULL && cfg->instance[0] != '\0';
    bool ep = cfg->endpoint != NULL && cfg->endpoint[0] != '\0';
    if (inst == ep) {
        *err = tp_xstrdup(inst ? "Lakebase: set either an instance (Provisioned) or an endpoint "
                                 "(Autoscaling), not both"
                               : "Lakebase: neither an instance (Provisioned) nor an endpoint "
                                 "(Autoscaling) is set");
        return NULL;
    }
    if (ep && strncmp(cfg->endpoint, "projects/", 9) != 0) {
        *err = tp_xstrdup("Lakebase: the endpoint must look like "
                          "projects/<project>/branches/<branch>/endpoints/<endpoint>");
        return NULL;
    }
    if (!tp_wh_has_auth(wh)) {
        *err = tp_xstrdup("Lakebase: the workspace client has no credentials (set DATABRICKS_TOKEN or "
                          "DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET)");
        return NULL;
    }
    tp_lakebase_t *lb = tp_xcalloc(1, sizeof *lb);
    lb->magic = LB_MAGIC;
    lb->base = base;
    lb->wh = wh;
    lb->instance = inst ? tp_xstrdup(cfg->instance) : NULL;
    lb->endpoint = ep ? tp_xstrdup(cfg->endpoint) : NULL;
    lb->refresh_before_ms = cfg->refresh_before_ms > 0 ? cfg->refresh_before_ms : 0;
    lb->defer = evtimer_new(base, on_defer, lb);
    return lb;
}

tp_lakebase_t *tp_lakebase_new(struct event_base *base, tp_wh_t *wh, const tp_lakebase_config_t *cfg,
                               char **err)
{
    return make(base, wh, cfg, err);
}

static const char *nonempty(const char *s)
{
    return s != NULL && *s != '\0' ? s : NULL;
}

tp_lakebase_t *tp_lakebase_new_on(struct event_base *base, const tp_wh_config_t *whcfg,
                                  const tp_lakebase_config_t *cfg, char **err)
{
    tp_wh_config_t c = *whcfg;
    if (c.warehouse_id == NULL || c.warehouse_id[0] == '\0')
        c.warehouse_id = "-"; /* only workspace API calls are made */
    tp_wh_t *wh = tp_wh_new(base, &c, err);
    if (wh == NULL)
        return NULL;
    tp_lakebase_t *lb = make(base, wh, cfg, err);
    if (lb == NULL) {
        tp_wh_free(wh);
        return NULL;
    }
    lb->own_wh = true;
    return lb;
}

tp_lakebase_t *tp_lakebase_new_blocking(const tp_wh_config_t *whcfg, const tp_lakebase_config_t *cfg,
                                        char **err)
{
    *err = NULL;
    struct event_base *base = event_base_new();
    if (base == NULL) {
        *err = tp_xstrdup("Lakebase: cannot create an event loop");
        return NULL;
    }
    tp_lakebase_t *lb = tp_lakebase_new_on(base, whcfg, cfg, err);
    if (lb == NULL) {
        event_base_free(base);
        return NULL;
    }
    lb->blocking = true;
    pthread_mutex_init(&lb->mu, NULL);
    return lb;
}

bool tp_lakebase_from_config(const tp_config_t *c, tp_lakebase_config_t *lc, tp_wh_config_t *wc)
{
    tp_lakebase_config_init(lc);
    tp_wh_config_init(wc);
    if (c->postgres.password_source == NULL || strcmp(c->postgres.password_source, "lakebase") != 0)
        return false;
    lc->instance = nonempty(c->postgres.lakebase_instance);
    lc->endpoint = nonempty(c->postgres.lakebase_endpoint);
    if (c->postgres.lakebase_refresh_before_ms > 0)
        lc->refresh_before_ms = c->postgres.lakebase_refresh_before_ms;
    tp_wh_config_from_settings(wc, c);
    return true;
}

PGconn *tp_lakebase_connect_settings(const tp_config_t *c, const char *dsn, int64_t timeout_ms,
                                     char *err, size_t errlen)
{
    tp_lakebase_config_t lc;
    tp_wh_config_t wc;
    if (!tp_lakebase_from_config(c, &lc, &wc))
        return tp_pg_connect(dsn, timeout_ms, err, errlen);
    char *e = NULL;
    tp_lakebase_t *lb = tp_lakebase_new_blocking(&wc, &lc, &e);
    if (lb == NULL) {
        snprintf(err, errlen, "%s", e ? e : "Lakebase: cannot create the credential provider");
        free(e);
        return NULL;
    }
    PGconn *conn = tp_lakebase_connect(lb, dsn, timeout_ms, err, errlen);
    tp_lakebase_free(lb);
    return conn;
}

void tp_lakebase_free(tp_lakebase_t *lb)
{
    if (lb == NULL)
        return;
    if (lb->magic != LB_MAGIC)
        abort();
    while (lb->waiters != NULL) {
        tp_lakebase_wait_t *w = lb->waiters;
        unlink_waiter(w);
        free_waiter(w);
    }
    tp_wh_api_cancel(lb->call);
    event_free(lb->defer);
    drop_token(lb);
    free(lb->instance);
    free(lb->endpoint);
    if (lb->own_wh)
        tp_wh_free(lb->wh);
    if (lb->blocking) {
        event_base_free(lb->base);
        pthread_mutex_destroy(&lb->mu);
    }
    lb->magic = 0;
    free(lb);
}

tp_lakebase_wait_t *tp_lakebase_get(tp_lakebase_t *lb, const char *refused, tp_lakebase_cb cb,
                                    void *arg)
{
    if (lb == NULL || lb->magic != LB_MAGIC)
        abort();
    if (refused != NULL && lb->token != NULL && strcmp(refused, lb->token) == 0) {
        const char *kv[] = {"instance", lb->instance, "endpoint", lb->endpoint, NULL};
        tp_logkv(TP_LOG_INFO, kv, "postgres refused the cached lakebase credential; minting a new one");
        lb->stats.refused_drops++;
        drop_token(lb);
    }
    tp_lakebase_wait_t *w = tp_xcalloc(1, sizeof *w);
    w->magic = WAIT_MAGIC;
    w->lb = lb;
    w->gen = lb->gen;
    w->cb = cb;
    w->arg = arg;
    w->next = lb->waiters;
    if (lb->waiters)
        lb->waiters->prev = w;
    lb->waiters = w;
    struct timeval tv = {0, 0};
    evtimer_add(lb->defer, &tv);
    return w;
}

void tp_lakebase_cancel(tp_lakebase_wait_t *w)
{
    if (w == NULL)
        return;
    if (w->magic != WAIT_MAGIC)
        abort();
    unlink_waiter(w);
    free_waiter(w);
}

typedef struct sync_answer {
    uint32_t magic;
    bool done;
    char *token;
    char *err;
} sync_answer_t;

static void on_sync_answer(const char *token, const char *err, void *arg)
{
    sync_answer_t *a = arg;
    if (a->magic != SYNC_MAGIC)
        abort();
    a->done = true;
    a->token = token ? tp_xstrdup(token) : NULL;
    a->err = err ? tp_xstrdup(err) : NULL;
}

char *tp_lakebase_token(tp_lakebase_t *lb, const char *refused, char **err)
{
    *err = NULL;
    if (lb == NULL || lb->magic != LB_MAGIC || !lb->blocking)
        abort();
    sync_answer_t a = {.magic = SYNC_MAGIC};
    pthread_mutex_lock(&lb->mu);
    tp_lakebase_wait_t *w = tp_lakebase_get(lb, refused, on_sync_answer, &a);
    while (!a.done)
        if (event_base_loop(lb->base, EVLOOP_ONCE) < 0) {
            tp_lakebase_cancel(w);
            a.done = true;
            a.err = tp_xstrdup("Lakebase: event loop failed");
        }
    pthread_mutex_unlock(&lb->mu);
    if (a.token == NULL)
        *err = a.err ? a.err : tp_xstrdup("Lakebase: no credential");
    else
        free(a.err);
    return a.token;
}

static void burn(char **tok)
{
    if (*tok != NULL) {
        explicit_bzero(*tok, strlen(*tok));
        free(*tok);
        *tok = NULL;
    }
}

PGconn *tp_lakebase_connect(tp_lakebase_t *lb, const char *conninfo, int64_t timeout_ms, char *err,
                            size_t errlen)
{
    char *e = NULL;
    char *tok = tp_lakebase_token(lb, NULL, &e);
    bool auth_retried = false, transient_retried = false;
    PGconn *conn = NULL;
    while (tok != NULL) {
        conn = tp_pg_connect_password(conninfo, tok, timeout_ms, err, errlen);
        if (conn != NULL)
            break;
        if (!auth_retried && tp_pg_password_refused(err)) {
            auth_retried = true;
            char *fresh = tp_lakebase_token(lb, tok, &e);
            burn(&tok);
            tok = fresh;
            continue;
        }
        if (!transient_retried && tp_pg_error_transient(err)) {
            transient_retried = true;
            const char *kv[] = {"error", err, NULL};
            tp_logkv(TP_LOG_WARN, kv, "postgres connection failed; retrying once");
            usleep(250 * 1000);
            continue;
        }
        break;
    }
    if (tok == NULL && e != NULL)
        snprintf(err, errlen, "%s", e);
    free(e);
    burn(&tok);
    return conn;
}

static void *pg_get(void *self, const char *refused, tp_pg_password_cb cb, void *cb_arg)
{
    return tp_lakebase_get(self, refused, cb, cb_arg);
}

static void pg_cancel(void *handle)
{
    tp_lakebase_cancel(handle);
}

void tp_lakebase_pg_provider(tp_lakebase_t *lb, tp_pg_password_provider_t *out)
{
    out->get = pg_get;
    out->cancel = pg_cancel;
    out->self = lb;
    out->refused_fn = NULL; /* pg_get sees the refused password itself */
}

void tp_lakebase_stats(const tp_lakebase_t *lb, tp_lakebase_stats_t *out)
{
    tp_lakebase_t *m = (tp_lakebase_t *)lb; /* the mutex, not the data, changes */
    if (lb->blocking)
        pthread_mutex_lock(&m->mu);
    *out = lb->stats;
    out->expires_wall_ms = lb->expires_wall_ms;
    if (lb->blocking)
        pthread_mutex_unlock(&m->mu);
}
