/* lib/lakebase.c end to end: tidepool-warehouse serves the Lakebase credential
 * endpoints (--lakebase-role lb_app --lakebase-ttl 3), each mint sets lb_app's
 * real Postgres password with VALID UNTIL now+3 s, and the harness makes
 * lb_app log in over TCP with scram-sha-256. Covered: minting (Provisioned
 * with a PAT, Autoscaling with OAuth M2M), connecting with the token, an old
 * session outliving the token while new logins with it fail (28P01), the
 * provider minting anew before expiry, re-minting once when the password is
 * rotated behind its back, the async pool (lib/pgasync) reconnecting with a
 * fresh token after pg_terminate_backend, precise errors for bad
 * configuration and refused credentials, and no token in any log line. */
#include "../tp_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "tidepool/config.h"
#include "tidepool/lakebase.h"
#include "tidepool/log.h"
#include "tidepool/pg.h"
#include "tidepool/pgasync.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

#define PAT "dapi-lakebase-test-pat"
#define CLIENT_ID "lb-sp-client"
#define CLIENT_SECRET "lb-sp-secret"
#define ROLE "lb_app"
#define TTL_S 3

static const char *DSN;  /* the test database, as the harness superuser */
static char LB_DSN[512]; /* the same database as lb_app over TCP, no password */
static char URL[64];
static char EMU_LOG[512];
static char OUR_LOG[512];
static pid_t EMU_PID = -1;
static FILE *LOGF;

/* every token handed to us, to look for in the logs at the end */
static char *SEEN[256];
static int NSEEN;

static void seen(const char *tok)
{
    for (int i = 0; i < NSEEN; i++)
        if (strcmp(SEEN[i], tok) == 0)
            return;
    if (NSEEN < 256)
        SEEN[NSEEN++] = tp_xstrdup(tok);
}

static void wh_cfg(tp_wh_config_t *c, bool oauth)
{
    tp_wh_config_init(c);
    c->host = URL;
    c->warehouse_id = "tidepool-local";
    if (oauth) {
        c->client_id = CLIENT_ID;
        c->client_secret = CLIENT_SECRET;
    } else {
        c->token = PAT;
    }
    c->retry_budget_ms = 3000;
}

static tp_lakebase_t *blocking_provider(bool oauth, const char *instance, const char *endpoint)
{
    tp_wh_config_t wc;
    wh_cfg(&wc, oauth);
    tp_lakebase_config_t lc;
    tp_lakebase_config_init(&lc);
    lc.instance = instance;
    lc.endpoint = endpoint;
    char *err = NULL;
    tp_lakebase_t *lb = tp_lakebase_new_blocking(&wc, &lc, &err);
    CHECK_MSG(lb != NULL, "provider: %s", err ? err : "?");
    free(err);
    return lb;
}

/* Runs one query on conn; returns the first cell (caller frees) or NULL. */
static char *one(PGconn *conn, const char *sql)
{
    char err[256];
    PGresult *r = tp_pg_query(conn, sql, 0, NULL, err, sizeof err);
    if (r == NULL)
        return NULL;
    char *v = PQntuples(r) > 0 ? tp_xstrdup(PQgetvalue(r, 0, 0)) : tp_xstrdup("");
    PQclear(r);
    return v;
}

static int terminate_lb_backends(void)
{
    char *n = tp_test_sql(DSN, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE usename = '" ROLE "'");
    int v = n ? atoi(n) : -1;
    free(n);
    return v;
}

/* ---- blocking provider ---- */

static void provisioned_token_logs_in(void)
{
    tp_lakebase_t *lb = blocking_provider(false, "tidepool-instance", NULL);
    if (lb == NULL)
        return;
    char *err = NULL;
    int64_t t0 = tp_now_us();
    char *tok = tp_lakebase_token(lb, NULL, &err);
    int64_t mint_us = tp_now_us() - t0;
    CHECK_MSG(tok != NULL, "token: %s", err ? err : "?");
    if (tok != NULL) {
        seen(tok);
        CHECK(strncmp(tok, "lbt-", 4) == 0);
        t0 = tp_now_us();
        char *cached = tp_lakebase_token(lb, NULL, &err);
        int64_t cached_us = tp_now_us() - t0;
        free(cached);
        printf("# figures: first mint (HTTP + ALTER ROLE) %.2f ms, cached token %.3f ms\n",
               (double)mint_us / 1000.0, (double)cached_us / 1000.0);
        char e[512];
        PGconn *c = tp_pg_connect_password(LB_DSN, tok, 5000, e, sizeof e);
        CHECK_MSG(c != NULL, "connect with the minted token: %s", e);
        char *who = c ? one(c, "SELECT current_user") : NULL;
        CHECK_STR_EQ(who, ROLE);
        free(who);
        PQfinish(c);
        /* the same provider hands out the cached token while it is fresh */
        char *again = tp_lakebase_token(lb, NULL, &err);
        CHECK_STR_EQ(again, tok);
        free(again);
        /* without the token, lb_app cannot log in at all */
        c = tp_pg_connect_password(LB_DSN, "not-the-token", 5000, e, sizeof e);
        CHECK(c == NULL);
        CHECK(tp_pg_password_refused(e));
        CHECK(strstr(e, "not-the-token") == NULL);
        PQfinish(c);
    }
    tp_lakebase_stats_t st;
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mints, 1);
    int64_t left = st.expires_wall_ms - tp_wall_ms();
    CHECK_MSG(left > 0 && left <= TTL_S * 1000 + 1000, "expiry %lld ms away", (long long)left);
    free(tok);
    free(err);
    tp_lakebase_free(lb);
}

static void autoscaling_with_oauth(void)
{
    tp_lakebase_t *lb = blocking_provider(true, NULL, "projects/p1/branches/main/endpoints/ep1");
    if (lb == NULL)
        return;
    char e[512];
    PGconn *c = tp_lakebase_connect(lb, LB_DSN, 5000, e, sizeof e);
    CHECK_MSG(c != NULL, "connect: %s", e);
    char *who = c ? one(c, "SELECT current_user") : NULL;
    CHECK_STR_EQ(who, ROLE);
    free(who);
    PQfinish(c);
    tp_lakebase_free(lb);
}

static void expired_token_old_session_lives_new_login_refreshes(void)
{
    tp_lakebase_t *lb = blocking_provider(false, "tidepool-instance", NULL);
    if (lb == NULL)
        return;
    char *err = NULL;
    char *tok1 = tp_lakebase_token(lb, NULL, &err);
    CHECK(tok1 != NULL);
    char e[512];
    PGconn *old = tok1 ? tp_pg_connect_password(LB_DSN, tok1, 5000, e, sizeof e) : NULL;
    CHECK_MSG(old != NULL, "connect: %s", e);
    usleep((TTL_S * 1000 + 700) * 1000);
    /* the token has expired: the open session keeps working ... */
    char *v = old ? one(old, "SELECT 41 + 1") : NULL;
    CHECK_STR_EQ(v, "42");
    free(v);
    /* ... a new login with it fails with 28P01 ... */
    PGconn *c = tok1 ? tp_pg_connect_password(LB_DSN, tok1, 5000, e, sizeof e) : NULL;
    CHECK(c == NULL);
    CHECK_MSG(tp_pg_password_refused(e), "expected a refused password, got: %s", e);
    PQfinish(c);
    /* ... and the provider mints a new token on its own (refresh before expiry) */
    c = tp_lakebase_connect(lb, LB_DSN, 5000, e, sizeof e);
    CHECK_MSG(c != NULL, "connect after expiry: %s", e);
    PQfinish(c);
    tp_lakebase_stats_t st;
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mints, 2);
    CHECK_INT_EQ(st.refused_drops, 0); /* refreshed ahead, never refused */
    char *tok2 = tp_lakebase_token(lb, NULL, &err);
    CHECK(tok2 != NULL && tok1 != NULL && strcmp(tok1, tok2) != 0);
    if (tok2)
        seen(tok2);
    if (tok1)
        seen(tok1);
    PQfinish(old);
    free(tok1);
    free(tok2);
    free(err);
    tp_lakebase_free(lb);
}

static void rotated_password_remints_once(void)
{
    tp_lakebase_t *lb = blocking_provider(false, "tidepool-instance", NULL);
    if (lb == NULL)
        return;
    char *err = NULL;
    char *tok = tp_lakebase_token(lb, NULL, &err);
    CHECK(tok != NULL);
    /* someone else rotates the role's password while our token is still fresh */
    free(tp_test_sql(DSN, "ALTER ROLE " ROLE " PASSWORD 'rotated-behind-our-back'"));
    char e[512];
    PGconn *c = tp_lakebase_connect(lb, LB_DSN, 5000, e, sizeof e);
    CHECK_MSG(c != NULL, "connect after rotation: %s", e);
    PQfinish(c);
    tp_lakebase_stats_t st;
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.refused_drops, 1);
    CHECK_INT_EQ(st.mints, 2);
    char *cur = tp_lakebase_token(lb, NULL, &err);
    if (cur)
        seen(cur);
    free(cur);
    /* a login failure that is not about the password: no re-mint, a precise error */
    free(tp_test_sql(DSN, "ALTER ROLE " ROLE " NOLOGIN"));
    c = tp_lakebase_connect(lb, LB_DSN, 5000, e, sizeof e);
    CHECK(c == NULL);
    CHECK_CONTAINS(e, "not permitted to log in");
    CHECK_MSG(strstr(e, "127.0.0.1") != NULL, "error names the server: %s", e);
    PQfinish(c);
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mints, 2);
    CHECK_INT_EQ(st.refused_drops, 1);
    free(tp_test_sql(DSN, "ALTER ROLE " ROLE " LOGIN"));
    free(tok);
    free(err);
    tp_lakebase_free(lb);
}

static void bad_configuration_and_refused_credentials(void)
{
    tp_wh_config_t wc;
    wh_cfg(&wc, false);
    tp_lakebase_config_t lc;
    tp_lakebase_config_init(&lc);
    char *err = NULL;
    CHECK(tp_lakebase_new_blocking(&wc, &lc, &err) == NULL);
    CHECK_CONTAINS(err, "neither an instance");
    free(err);
    lc.instance = "i";
    lc.endpoint = "projects/p/branches/b/endpoints/e";
    CHECK(tp_lakebase_new_blocking(&wc, &lc, &err) == NULL);
    CHECK_CONTAINS(err, "not both");
    free(err);
    lc.instance = NULL;
    lc.endpoint = "ep-123";
    CHECK(tp_lakebase_new_blocking(&wc, &lc, &err) == NULL);
    CHECK_CONTAINS(err, "projects/<project>");
    free(err);
    wc.token = NULL;
    lc.endpoint = "projects/p/branches/b/endpoints/e";
    CHECK(tp_lakebase_new_blocking(&wc, &lc, &err) == NULL);
    CHECK_CONTAINS(err, "no credentials");
    free(err);

    /* a PAT the workspace does not know: the endpoint's own answer, no secret */
    wc.token = "dapi-wrong";
    tp_lakebase_t *lb = tp_lakebase_new_blocking(&wc, &lc, &err);
    CHECK(lb != NULL);
    char *tok = lb ? tp_lakebase_token(lb, NULL, &err) : NULL;
    CHECK(tok == NULL);
    CHECK_CONTAINS(err, "HTTP 403");
    CHECK_CONTAINS(err, "/api/2.0/postgres/credentials");
    CHECK(err == NULL || strstr(err, "dapi-wrong") == NULL);
    free(err);
    err = NULL;
    char e[512];
    PGconn *c = lb ? tp_lakebase_connect(lb, LB_DSN, 5000, e, sizeof e) : NULL;
    CHECK(c == NULL);
    CHECK_CONTAINS(e, "Lakebase database credential");
    tp_lakebase_free(lb);

    /* the emulator checks the endpoint's shape like the service */
    wc.token = PAT;
    lc.endpoint = "projects/p/endpoints/e";
    lb = tp_lakebase_new_blocking(&wc, &lc, &err);
    tok = lb ? tp_lakebase_token(lb, NULL, &err) : NULL;
    CHECK(tok == NULL);
    CHECK_CONTAINS(err, "HTTP 400");
    CHECK_CONTAINS(err, "INVALID_PARAMETER_VALUE");
    free(err);
    tp_lakebase_free(lb);
}

/* POST /admin/faults on the emulator (test plumbing). */
static bool faults(const char *spec)
{
    char *cmd = tp_xasprintf("curl -sf -o /dev/null -H 'Authorization: Bearer " PAT "' "
                             "-X %s -d '{\"spec\":\"%s\"}' %s/admin/faults",
                             spec ? "POST" : "DELETE", spec ? spec : "", URL);
    char *out = NULL;
    int rc = tp_test_cmd(cmd, &out);
    free(cmd);
    free(out);
    return rc == 0;
}

static void credential_endpoint_faults(void)
{
    tp_lakebase_t *lb = blocking_provider(false, "tidepool-instance", NULL);
    if (lb == NULL)
        return;
    /* a 503 with Retry-After is retried by the workspace client */
    CHECK(faults("status=503x1@lakebase,retry_after=1"));
    char *err = NULL;
    int64_t t0 = tp_now_ms();
    char *tok = tp_lakebase_token(lb, NULL, &err);
    CHECK_MSG(tok != NULL, "token after a 503: %s", err ? err : "?");
    CHECK(tp_now_ms() - t0 >= 900);
    if (tok)
        seen(tok);
    free(tok);
    free(err);
    err = NULL;
    tp_lakebase_free(lb);
    /* a failing endpoint: retried within the budget (3 s here), then a precise error */
    lb = blocking_provider(false, "tidepool-instance", NULL);
    CHECK(faults("status=500x100@lakebase"));
    tok = lb ? tp_lakebase_token(lb, NULL, &err) : NULL;
    CHECK(faults(NULL));
    CHECK(tok == NULL);
    CHECK_CONTAINS(err, "POST /api/2.0/database/credentials: HTTP 500: INTERNAL_ERROR");
    free(err);
    tp_lakebase_stats_t st;
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mint_failures, 1);
    CHECK_INT_EQ(st.mints, 0);
    tp_lakebase_free(lb);
}

/* ---- async provider and the pool ---- */

static struct event_base *BASE;

typedef struct qdone {
    int calls;
    bool ok;
    char value[128];
    char err[256];
} qdone_t;

static void on_q(PGresult *res, const char *err, void *arg)
{
    qdone_t *d = arg;
    d->calls++;
    d->ok = err == NULL;
    snprintf(d->err, sizeof d->err, "%s", err ? err : "");
    if (res && !err && PQntuples(res) > 0)
        snprintf(d->value, sizeof d->value, "%s", PQgetvalue(res, 0, 0));
}

static bool run_until(const int *counter, int want, int timeout_ms)
{
    int64_t end = tp_now_ms() + timeout_ms;
    while (*counter < want && tp_now_ms() < end) {
        event_base_loop(BASE, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        usleep(1000);
    }
    return *counter >= want;
}

/* Wraps the provider to see the tokens the pool gets (for the log check). */
typedef struct spy {
    tp_pg_password_provider_t inner;
    int gets, refused;
} spy_t;

typedef struct spy_wait {
    tp_pg_password_cb cb;
    void *arg;
} spy_wait_t;

static spy_t SPY;
static spy_wait_t SPY_WAITS[64];
static int NSPY;

static void spy_cb(const char *pw, const char *err, void *arg)
{
    spy_wait_t *w = arg;
    if (pw)
        seen(pw);
    w->cb(pw, err, w->arg);
}

static void *spy_get(void *self, const char *refused, tp_pg_password_cb cb, void *arg)
{
    spy_t *s = self;
    s->gets++;
    s->refused += refused != NULL;
    spy_wait_t *w = &SPY_WAITS[NSPY++ % 64];
    w->cb = cb;
    w->arg = arg;
    return s->inner.get(s->inner.self, refused, spy_cb, w);
}

static void spy_cancel(void *h)
{
    SPY.inner.cancel(h);
}

static void on_note(const char *channel, const char *payload, void *arg)
{
    (void)channel;
    (void)payload;
    (*(int *)arg)++;
}

static bool pool_query(tp_pgpool_t *pool, const char *sql, qdone_t *d, int timeout_ms)
{
    int64_t end = tp_now_ms() + timeout_ms;
    while (tp_now_ms() < end) {
        memset(d, 0, sizeof *d);
        tp_pg_submit_t s = tp_pgpool_query(pool, sql, 0, NULL, NULL, on_q, d, NULL);
        if (s == TP_PG_QUEUED && run_until(&d->calls, 1, 5000) && d->ok)
            return true;
        int wait = 0;
        run_until(&wait, 1, 50);
    }
    return false;
}

static void pool_reconnects_with_fresh_token(void)
{
    BASE = event_base_new();
    /* configured the way the server is: [warehouse] OAuth client + [postgres] lakebase */
    char *text = tp_xasprintf("[warehouse]\nhost = %s\nclient_id = " CLIENT_ID "\n"
                              "client_secret = " CLIENT_SECRET "\n[postgres]\n"
                              "password_source = lakebase\nlakebase_instance = tidepool-instance\n",
                              URL);
    char *path = tp_test_write_tmp("tidepool.conf", text);
    tp_config_t cfg = {0};
    char cerr[512];
    CHECK_MSG(tp_config_load(&cfg, path, cerr, sizeof cerr), "config: %s", cerr);
    free(text);
    free(path);
    tp_lakebase_config_t lc;
    tp_wh_config_t wc;
    CHECK(tp_lakebase_from_config(&cfg, &lc, &wc));
    CHECK_STR_EQ(lc.instance, "tidepool-instance");
    CHECK(wc.token == NULL && wc.client_id != NULL);
    char *err = NULL;
    tp_lakebase_t *lb = tp_lakebase_new_on(BASE, &wc, &lc, &err);
    CHECK_MSG(lb != NULL, "provider: %s", err ? err : "?");
    free(err);
    tp_config_free(&cfg);
    if (lb == NULL) {
        event_base_free(BASE);
        return;
    }
    memset(&SPY, 0, sizeof SPY);
    tp_lakebase_pg_provider(lb, &SPY.inner);
    tp_pg_password_provider_t pw = {.get = spy_get, .cancel = spy_cancel, .self = &SPY};
    tp_pgpool_opts_t o = {.dsn = LB_DSN, .size = 2, .max_queue = 16, .connect_timeout_ms = 5000,
                          .max_statements = 8, .name = "lakebase", .password = &pw};
    tp_pgpool_t *pool = tp_pgpool_new(BASE, &o);
    qdone_t d;
    CHECK_MSG(pool_query(pool, "SELECT current_user", &d, 10000), "first query: %s", d.err);
    CHECK_STR_EQ(d.value, ROLE);
    tp_lakebase_stats_t st;
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mints, 1); /* both connections shared one mint */
    CHECK_INT_EQ(SPY.gets, 2);

    /* the token expires; the pool's sessions keep working */
    int zero = 0;
    run_until(&zero, 1, TTL_S * 1000 + 700);
    CHECK_MSG(pool_query(pool, "SELECT 2", &d, 3000), "query on old sessions: %s", d.err);
    tp_pgpool_stats_t ps;
    tp_pgpool_stats(pool, &ps);
    uint64_t reconnects = ps.reconnects;
    /* the backends die: new connections need (and get) a fresh token */
    CHECK(terminate_lb_backends() >= 1);
    run_until(&zero, 1, 200);
    CHECK_MSG(pool_query(pool, "SELECT current_user", &d, 10000), "after terminate: %s", d.err);
    CHECK_STR_EQ(d.value, ROLE);
    tp_lakebase_stats(lb, &st);
    CHECK_INT_EQ(st.mints, 2);
    tp_pgpool_stats(pool, &ps);
    CHECK(ps.reconnects > reconnects);

    /* rotated behind our back, then the backends die: 28P01, re-mint, reconnect */
    free(tp_test_sql(DSN, "ALTER ROLE " ROLE " PASSWORD 'rotated-for-the-pool'"));
    int refused_before = SPY.refused;
    CHECK(terminate_lb_backends() >= 1);
    run_until(&zero, 1, 200);
    CHECK_MSG(pool_query(pool, "SELECT current_user", &d, 10000), "after rotation: %s", d.err);
    CHECK(SPY.refused > refused_before);
    tp_lakebase_stats(lb, &st);
    CHECK(st.refused_drops >= 1);
    CHECK_INT_EQ(st.mints, 3);

    /* a LISTEN connection takes its password from the provider too */
    int notes = 0;
    tp_pglisten_t *lsn = tp_pglisten_new_pw(BASE, LB_DSN, "lb_test", 5000, &pw, on_note, &notes);
    CHECK(run_until(&notes, 1, 10000)); /* the resync call after connecting */
    CHECK(tp_pglisten_up(lsn));
    free(tp_test_sql(DSN, "NOTIFY lb_test, 'hello'"));
    CHECK(run_until(&notes, 2, 5000));

    tp_pglisten_free(lsn);
    tp_pgpool_free(pool);
    tp_lakebase_free(lb);
    event_base_free(BASE);
}

/* A pending request is dropped cleanly when the pool goes away first. */
static void free_with_request_in_flight(void)
{
    BASE = event_base_new();
    tp_wh_config_t wc;
    wh_cfg(&wc, false);
    char *err = NULL;
    tp_wh_t *wh = tp_wh_new(BASE, &wc, &err);
    tp_lakebase_config_t lc;
    tp_lakebase_config_init(&lc);
    lc.instance = "tidepool-instance";
    tp_lakebase_t *lb = wh ? tp_lakebase_new(BASE, wh, &lc, &err) : NULL;
    CHECK(lb != NULL);
    free(err);
    if (lb != NULL) {
        tp_pg_password_provider_t pw;
        tp_lakebase_pg_provider(lb, &pw);
        tp_pgpool_opts_t o = {.dsn = LB_DSN, .size = 3, .connect_timeout_ms = 5000, .name = "x",
                              .password = &pw};
        tp_pgpool_t *pool = tp_pgpool_new(BASE, &o);
        event_base_loop(BASE, EVLOOP_ONCE | EVLOOP_NONBLOCK); /* the mint is on its way */
        tp_pgpool_free(pool);
        tp_lakebase_free(lb);
    }
    tp_wh_free(wh);
    event_base_free(BASE);
}

/* ---- logs ---- */

static void no_token_in_any_log(void)
{
    fflush(LOGF);
    int st = tp_test_stop(EMU_PID, 5000);
    EMU_PID = -1;
    CHECK_INT_EQ(st, 0);
    char *ours = tp_read_file(OUR_LOG, NULL);
    char *emu = tp_read_file(EMU_LOG, NULL);
    CHECK(ours != NULL && emu != NULL);
    CHECK_MSG(NSEEN >= 5, "only %d tokens seen", NSEEN);
    /* the logs are really captured: they tell about the mints */
    CHECK_CONTAINS(ours, "lakebase credential minted");
    CHECK_CONTAINS(emu, "lakebase credential minted");
    CHECK_CONTAINS(emu, "/api/2.0/database/credentials");
    for (int i = 0; i < NSEEN; i++) {
        CHECK_MSG(ours == NULL || strstr(ours, SEEN[i]) == NULL, "token %d in our log", i);
        CHECK_MSG(emu == NULL || strstr(emu, SEEN[i]) == NULL, "token %d in the emulator log", i);
        CHECK(strstr(SEEN[i], "lbt-") == SEEN[i]);
    }
    CHECK(ours == NULL || strstr(ours, "lbt-") == NULL);
    CHECK(emu == NULL || strstr(emu, "lbt-") == NULL);
    free(ours);
    free(emu);
}

int main(void)
{
    DSN = tp_test_dsn();
    if (DSN == NULL) {
        tp_test_skip("test_lakebase", "no harness Postgres");
        return tp_test_done();
    }
    const char *port = getenv("PGPORT");
    const char *db = strstr(DSN, "dbname=");
    snprintf(LB_DSN, sizeof LB_DSN, "host=127.0.0.1 port=%s user=" ROLE " %s", port ? port : "5432",
             db ? db : "");
    free(tp_test_sql(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " ROLE));
    free(tp_test_sql(tp_test_admin_dsn(), "CREATE ROLE " ROLE " LOGIN IN ROLE tp_password_login"));

    snprintf(OUR_LOG, sizeof OUR_LOG, "%s/ours.log", tp_test_tmpdir());
    LOGF = fopen(OUR_LOG, "w");
    tp_log_set_stream(LOGF);
    tp_log_set_level(TP_LOG_DEBUG);

    int p = tp_test_free_port();
    snprintf(URL, sizeof URL, "http://127.0.0.1:%d", p);
    snprintf(EMU_LOG, sizeof EMU_LOG, "%s/emulator.log", tp_test_tmpdir());
    char listen[64], ttl[16];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", p);
    snprintf(ttl, sizeof ttl, "%d", TTL_S);
    const char *argv[] = {tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", DSN,
                          "--token", PAT, "--client", CLIENT_ID ":" CLIENT_SECRET,
                          "--lakebase-role", ROLE, "--lakebase-ttl", ttl, "--log-level", "debug",
                          NULL};
    EMU_PID = tp_test_spawn((char *const *)argv, EMU_LOG);
    if (EMU_PID <= 0 || !tp_test_wait_port(p, 10000)) {
        tp_test_fail(__FILE__, __LINE__, "emulator did not start (log %s)", EMU_LOG);
        return tp_test_done();
    }
    TP_RUN(provisioned_token_logs_in);
    TP_RUN(autoscaling_with_oauth);
    TP_RUN(expired_token_old_session_lives_new_login_refreshes);
    TP_RUN(rotated_password_remints_once);
    TP_RUN(bad_configuration_and_refused_credentials);
    TP_RUN(credential_endpoint_faults);
    TP_RUN(pool_reconnects_with_fresh_token);
    TP_RUN(free_with_request_in_flight);
    TP_RUN(no_token_in_any_log);
    if (EMU_PID > 0)
        tp_test_stop(EMU_PID, 5000);
    free(tp_test_sql(tp_test_admin_dsn(), "DROP ROLE IF EXISTS " ROLE));
    tp_log_set_stream(stderr);
    fclose(LOGF);
    for (int i = 0; i < NSEEN; i++)
        free(SEEN[i]);
    return tp_test_done();
}
