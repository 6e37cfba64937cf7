/* tidepool-server authorization on every endpoint family (auth mode token):
 * table read roles (@expose roles=), row-level scoping (@expose owner=)
 * enforced in the SQL, a bad @expose option keeping a table unexposed,
 * /metrics needing admin, datasets (GET and POST) by @roles, the open
 * probes, /api/v1/openapi.json needing credentials and listing only what the
 * caller's roles allow; running a sync job by auth.sync_roles; rate limits
 * per address (X-Real-Ip from a trusted proxy) and per identity with 429 +
 * Retry-After; failed authentication (a bearer token over 8 KiB, a header
 * block over server.max_header_bytes) logged without the credential; SIGHUP reloading [auth] and the limits (a
 * broken file keeps the old settings and logs file:line; a setting needing a
 * restart is logged); mode databricks-apps refusing forwarded identity from
 * a peer outside trusted_proxies and identity headers sent twice; and
 * Databricks Apps mode started with only the variables the Apps runtime
 * injects. */
#include "server_harness.h"

#include <ifaddrs.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <openssl/sha.h>

static srv_h_t S;
static const char *DSN;

static const char *VIEWER = "tpk_viewer-authz-secret";
static const char *BOSS = "tpk_boss-authz-secret";
static const char *ANA = "tpk_analyst-authz-secret";
static const char *ALICE = "tpk_alice-authz-secret";
static const char *BOB = "tpk_bob-authz-secret";
static const char *CAROL = "tpk_carol-authz-secret";

static void sha_hex(const char *s, char out[65])
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)s, strlen(s), d);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* A request as token (NULL: no credentials) from client address ip (NULL:
 * no X-Real-Ip). */
static resp_t as_from(srv_h_t *s, const char *token, const char *ip, const char *method,
                      const char *path, const char *body)
{
    char *auth = NULL, rip[64];
    const char *hs[4] = {NULL, NULL, NULL, NULL};
    int n = 0;
    if (body)
        hs[n++] = "Content-Type: application/json";
    if (token) {
        auth = tp_xasprintf("Authorization: Bearer %s", token); /* any length */
        hs[n++] = auth;
    }
    if (ip) {
        snprintf(rip, sizeof rip, "X-Real-Ip: %s", ip);
        hs[n++] = rip;
    }
    resp_t r = http(s, method, path, hs, body, body ? strlen(body) : 0);
    free(auth);
    return r;
}

static resp_t as(const char *token, const char *path)
{
    return as_from(&S, token, NULL, "GET", path, NULL);
}

static long status_as(const char *token, const char *path)
{
    resp_t r = as(token, path);
    long st = r.status;
    resp_free(&r);
    return st;
}

/* Waits (up to 10 s) until the server log contains needle. */
static bool log_has(const srv_h_t *s, const char *needle)
{
    for (int i = 0; i < 100; i++) {
        char *log = tp_read_file(s->log, NULL);
        bool found = log && strstr(log, needle);
        free(log);
        if (found)
            return true;
        usleep(100000);
    }
    return false;
}

static void sql(const char *stmt)
{
    free(tp_test_sql(DSN, stmt));
}

static void tables_set_up(void)
{
    sql("CREATE TABLE iot.notes(id int PRIMARY KEY, owner text NOT NULL, body text);"
        "INSERT INTO iot.notes VALUES (1, 'token:alice', 'b alice one'),"
        " (2, 'token:alice', 'c alice two'), (3, 'token:bob', 'a bob one');"
        "COMMENT ON TABLE iot.notes IS 'private notes @expose owner=owner roles=reader';"
        "CREATE TABLE iot.finance(x int); INSERT INTO iot.finance VALUES (7);"
        "COMMENT ON TABLE iot.finance IS '@expose roles=analyst max_limit=5';"
        "CREATE TABLE iot.typo(x int, who int);"
        "COMMENT ON TABLE iot.typo IS '@expose owner=who';"
        "CREATE TABLE iot.typo2(x int);"
        "COMMENT ON TABLE iot.typo2 IS '@expose roles=no*good';");
    /* SIGHUP re-reflects the exposed tables */
    kill(S.pid, SIGHUP);
    for (int i = 0; i < 100 && status_as(BOSS, "/api/v1/tables/iot.finance") != 200; i++)
        usleep(100000);
}

static void test_table_roles(void)
{
    CHECK_INT_EQ(status_as(NULL, "/api/v1/tables/iot.finance"), 401);
    resp_t r = as(VIEWER, "/api/v1/tables/iot.finance");
    CHECK_PROBLEM(r, 403, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "forbidden");
    resp_free(&r);
    r = as(ANA, "/api/v1/tables/iot.finance");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(r.body, "[{\"x\":7}]");
    resp_free(&r);
    CHECK_INT_EQ(status_as(BOSS, "/api/v1/tables/iot.finance"), 200); /* admin implies all */
    /* max_limit= still works next to roles= */
    r = as(ANA, "/api/v1/tables/iot.finance?limit=6");
    CHECK_PROBLEM(r, 400, "limit");
    resp_free(&r);
    /* no roles= : any authenticated caller, including a custom-role-only one */
    CHECK_INT_EQ(status_as(ANA, "/api/v1/tables/iot.users?limit=1"), 200);
    CHECK_INT_EQ(status_as(NULL, "/api/v1/tables/iot.users?limit=1"), 401);
    /* roles=reader: the analyst (no reader role) is refused */
    CHECK_INT_EQ(status_as(ANA, "/api/v1/tables/iot.notes"), 403);
    /* the refusal is logged with the client address (from the trusted proxy) */
    r = as_from(&S, VIEWER, "192.0.2.77", "GET", "/api/v1/tables/iot.finance", NULL);
    CHECK_INT_EQ(r.status, 403);
    resp_free(&r);
    CHECK(log_has(&S, "authorization refused"));
    CHECK(log_has(&S, "\"client\":\"192.0.2.77\""));
}

static void test_row_scoping(void)
{
    resp_t r = as(ALICE, "/api/v1/tables/iot.notes?order=id");
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 2);
    CHECK_CONTAINS(r.body, "alice one");
    CHECK(strstr(r.body, "bob") == NULL);
    resp_free(&r);
    r = as(BOB, "/api/v1/tables/iot.notes");
    CHECK_INT_EQ(json_array_size(r.json), 1);
    CHECK_CONTAINS(r.body, "a bob one");
    resp_free(&r);
    /* Enforced in the SQL, not after it: bob's row sorts first, so a filter
     * applied after LIMIT 1 would leave alice with nothing. */
    r = as(ALICE, "/api/v1/tables/iot.notes?order=body&limit=1");
    CHECK_INT_EQ(json_array_size(r.json), 1);
    CHECK_CONTAINS(r.body, "b alice one");
    resp_free(&r);
    /* a client filter cannot widen the scope */
    r = as(ALICE, "/api/v1/tables/iot.notes?owner=eq.token:bob");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    r = as(ALICE, "/api/v1/tables/iot.notes?owner=neq.token:alice");
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    /* the identity is bound as a value: nothing of it reaches SQL text */
    r = as(VIEWER, "/api/v1/tables/iot.notes");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    /* admin is scoped too: the column names whose rows a caller sees */
    r = as(BOSS, "/api/v1/tables/iot.notes");
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
}

static void test_bad_expose_stays_hidden(void)
{
    resp_t r = as(BOSS, "/api/v1/tables/iot.typo");
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    CHECK_INT_EQ(status_as(BOSS, "/api/v1/tables/iot.typo2"), 404);
    CHECK(log_has(&S, "owner=who is not a text column of the table"));
    CHECK(log_has(&S, "@expose comment rejected"));
    CHECK(log_has(&S, "iot.typo2"));
}

static void test_metrics_needs_admin(void)
{
    resp_t r = as(NULL, "/metrics");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    r = as(VIEWER, "/metrics");
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    r = as(BOSS, "/metrics");
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(r.body, "tidepool_http_requests_total");
    /* no secret in /metrics */
    CHECK(strstr(r.body, "authz-secret") == NULL);
    resp_free(&r);
}

static void test_dataset_roles(void)
{
    CHECK_INT_EQ(status_as(NULL, "/api/v1/datasets"), 401);
    CHECK_INT_EQ(status_as(NULL, "/api/v1/datasets/users"), 401);
    CHECK_INT_EQ(status_as(VIEWER, "/api/v1/datasets/users"), 200);
    CHECK_INT_EQ(status_as(ANA, "/api/v1/datasets/users"), 403); /* @roles reader */
    CHECK_INT_EQ(status_as(VIEWER, "/api/v1/datasets/admin_only"), 403);
    CHECK_INT_EQ(status_as(BOSS, "/api/v1/datasets/admin_only"), 200);
    resp_t r = as_from(&S, VIEWER, NULL, "POST", "/api/v1/datasets/admin_only", "{}");
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    r = as_from(&S, BOSS, NULL, "POST", "/api/v1/datasets/admin_only", "{}");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    r = as_from(&S, NULL, NULL, "POST", "/api/v1/datasets/admin_only", "{}");
    CHECK_INT_EQ(r.status, 401);
    resp_free(&r);
}

static void test_operational_endpoints_open(void)
{
    /* the probes answer without credentials */
    CHECK_INT_EQ(status_as(NULL, "/healthz"), 200);
    CHECK_INT_EQ(status_as(NULL, "/readyz"), 200);
    CHECK_INT_EQ(status_as(NULL, "/no/such/route"), 404);
}

/* Whether the OpenAPI document token sees has path (1) or not (0). */
static int openapi_has(const char *token, const char *path)
{
    resp_t r = as(token, "/api/v1/openapi.json");
    CHECK_INT_EQ(r.status, 200);
    int has = json_object_get(json_object_get(r.json, "paths"), path) != NULL;
    resp_free(&r);
    return has;
}

/* The API description needs credentials and lists only what the caller's
 * roles may use, as /api/v1/datasets does: it must not undo that filter. */
static void test_openapi_filtered_by_role(void)
{
    resp_t r = as(NULL, "/api/v1/openapi.json");
    CHECK_PROBLEM(r, 401, NULL);
    CHECK(strstr(r.body, "admin_only") == NULL && strstr(r.body, "iot.finance") == NULL);
    resp_free(&r);
    r = as("tpk_wrong-token", "/api/v1/openapi.json");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    /* reader: @roles reader datasets and reader tables, not admin or analyst ones */
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/datasets/users"), 1);
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/datasets/daily_metrics"), 1); /* no @roles */
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/datasets/admin_only"), 0);
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/tables/iot.notes"), 1);
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/tables/iot.finance"), 0);
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/tables/iot.users"), 1);
    /* analyst (a custom role only) */
    CHECK_INT_EQ(openapi_has(ANA, "/api/v1/datasets/users"), 0);
    CHECK_INT_EQ(openapi_has(ANA, "/api/v1/tables/iot.finance"), 1);
    CHECK_INT_EQ(openapi_has(ANA, "/api/v1/tables/iot.notes"), 0);
    /* writable tables: reader sees no write operations, admin does */
    CHECK_INT_EQ(openapi_has(VIEWER, "/api/v1/tables/app.user_notes/{pk}"), 0);
    CHECK_INT_EQ(openapi_has(BOSS, "/api/v1/tables/app.user_notes/{pk}"), 1);
    /* admin: everything */
    CHECK_INT_EQ(openapi_has(BOSS, "/api/v1/datasets/admin_only"), 1);
    CHECK_INT_EQ(openapi_has(BOSS, "/api/v1/tables/iot.finance"), 1);
    /* and it agrees with /api/v1/datasets */
    r = as(VIEWER, "/api/v1/datasets");
    CHECK(r.status == 200 && strstr(r.body, "admin_only") == NULL);
    resp_free(&r);
}

/* Running a sync job needs a role of auth.sync_roles (here: analyst; admin
 * implies it); reading the sync status needs only credentials. */
static void test_sync_roles(void)
{
    resp_t r = as_from(&S, NULL, NULL, "POST", "/api/v1/sync/users/run", NULL);
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    r = as_from(&S, VIEWER, NULL, "POST", "/api/v1/sync/users/run", NULL);
    CHECK_PROBLEM(r, 403, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "forbidden");
    resp_free(&r);
    r = as_from(&S, ANA, NULL, "POST", "/api/v1/sync/users/run", NULL);
    CHECK_INT_EQ(r.status, 202);
    CHECK_CONTAINS(r.body, "\"triggered\":true");
    resp_free(&r);
    r = as_from(&S, BOSS, NULL, "POST", "/api/v1/sync/daily_metrics/run", NULL);
    CHECK_INT_EQ(r.status, 202);
    resp_free(&r);
    CHECK(log_has(&S, "\"actor\":\"token:ana\""));
    CHECK_INT_EQ(status_as(VIEWER, "/api/v1/sync"), 200);
}

static void test_failed_auth_logged_without_secrets(void)
{
    /* (a JWT, alg none included, is just an unknown token in this mode; the JWT
     * checks themselves are exercised over HTTP by test_server_jwt) */
    static const char *bad[] = {
        "tpk_guessed-secret-value-one",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5In0.",
        "not a token at all",
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        resp_t r = as(bad[i], "/api/v1/datasets/users");
        CHECK_PROBLEM(r, 401, NULL);
        /* the problem does not say which check failed beyond the code */
        CHECK(strstr(r.body, bad[i]) == NULL);
        resp_free(&r);
    }
    /* A token over the 8 KiB bearer limit of lib/auth.c, within this server's
     * 16k header limit: refused by the length check, before any lookup. */
    char big[8 * 1024 + 2];
    memset(big, 'k', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    memcpy(big, "tpk_", 4);
    resp_t r = as(big, "/api/v1/datasets/users");
    CHECK_PROBLEM(r, 401, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "invalid-credentials");
    CHECK(strstr(r.body, "8 KiB") == NULL); /* the client is not told which check */
    resp_free(&r);
    CHECK(log_has(&S, "bearer token longer than 8 KiB"));
    /* beyond server.max_header_bytes the header block itself is refused */
    char *huge = tp_xmalloc(20 * 1024);
    memset(huge, 'k', 20 * 1024 - 1);
    huge[20 * 1024 - 1] = '\0';
    r = as(huge, "/api/v1/datasets/users");
    CHECK_PROBLEM(r, 431, NULL);
    resp_free(&r);
    free(huge);
    /* the same header twice */
    char h[128];
    snprintf(h, sizeof h, "Authorization: Bearer %s", VIEWER);
    const char *twice[] = {h, h, NULL};
    r = http(&S, "GET", "/api/v1/datasets/users", twice, NULL, 0);
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    CHECK(log_has(&S, "authentication refused"));
    char *log = tp_read_file(S.log, NULL);
    CHECK(log != NULL);
    for (size_t i = 0; log && i < TP_ARRAY_LEN(bad); i++)
        CHECK_MSG(strstr(log, bad[i]) == NULL, "the log holds credential %zu", i);
    CHECK(log && strstr(log, "kkkkkkkkkkkkkkkk") == NULL);
    CHECK(log && strstr(log, "authz-secret") == NULL);
    free(log);
}

/* A second server with small limits: per address (X-Real-Ip believed from
 * the loopback proxy) and per identity; then SIGHUP reloads. */
static void test_rate_limits_and_reload(void)
{
    char ah[65], ch[65], conf[1024];
    sha_hex(ALICE, ah);
    sha_hex(CAROL, ch);
    snprintf(conf, sizeof conf,
             "[auth]\nmode = token\ntoken_table = false\ntokens = alice:reader:%s\n"
             "rate_per_address = 1\nburst_per_address = 3\n"
             "rate_per_identity = 1\nburst_per_identity = 2\n",
             ah);
    srv_h_t R = {0};
    snprintf(R.qdir, sizeof R.qdir, "%s", S.qdir);
    R.extra_conf = conf;
    bool up = harness_start(&R, DSN, 2) && harness_ready(&R);
    CHECK(up);
    if (!up) {
        free(R.conf);
        free(R.log);
        return;
    }
    /* per address (burst 3, for the whole process: two threads, each request a
     * new connection landing on either): the fourth request from one address
     * is refused before authentication; another address is not */
    long st[6];
    for (int i = 0; i < 6; i++) {
        resp_t r = as_from(&R, NULL, "192.0.2.10", "GET", "/api/v1/datasets", NULL);
        st[i] = r.status;
        if (r.status == 429) {
            CHECK_PROBLEM(r, 429, NULL);
            CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "rate-limited");
            const char *ra = hdr(&r, "Retry-After");
            CHECK(ra != NULL && atoi(ra) >= 1);
        }
        resp_free(&r);
    }
    CHECK_INT_EQ(st[0], 401);
    CHECK_INT_EQ(st[2], 401);
    CHECK_INT_EQ(st[3], 429);
    CHECK_INT_EQ(st[4], 429);
    CHECK_INT_EQ(st[5], 429);
    resp_t r = as_from(&R, NULL, "192.0.2.11", "GET", "/api/v1/datasets", NULL);
    CHECK_INT_EQ(r.status, 401);
    resp_free(&r);
    /* per identity (burst 2), each request from a fresh address */
    long ist[5];
    for (int i = 0; i < 5; i++) {
        char ip[32];
        snprintf(ip, sizeof ip, "198.51.100.%d", i + 1);
        r = as_from(&R, ALICE, ip, "GET", "/api/v1/datasets", NULL);
        ist[i] = r.status;
        if (i == 4) {
            CHECK_PROBLEM(r, 429, NULL);
            CHECK(hdr(&r, "Retry-After") != NULL);
            CHECK_CONTAINS(r.body, "identity");
        }
        resp_free(&r);
    }
    CHECK_INT_EQ(ist[0], 200);
    CHECK_INT_EQ(ist[1], 200);
    CHECK_INT_EQ(ist[2], 429);
    CHECK_INT_EQ(ist[3], 429);

    /* SIGHUP: a new token, the identity limit off, a restart-only change */
    char *text = tp_read_file(R.conf, NULL);
    CHECK(text != NULL);
    if (!text) {
        tp_test_stop(R.pid, 10000);
        return;
    }
    tp_buf_t b = {0};
    const char *p = text;
    const struct {
        const char *from, *to;
    } edits[] = {{"threads = 2", "threads = 3"}, /* in file order */
                 {"timeout = 10s\n", "timeout = 10s\ntable_max_limit = 5\n"},
                 {"tokens = ", NULL},
                 {"rate_per_identity = 1", "rate_per_identity = 0"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(edits); i++) {
        const char *at = strstr(p, edits[i].from);
        CHECK(at != NULL);
        if (!at)
            break;
        tp_buf_append(&b, p, (size_t)(at - p));
        if (edits[i].to)
            tp_buf_puts(&b, edits[i].to);
        else
            tp_buf_printf(&b, "tokens = carol:reader:%s, ", ch);
        p = at + strlen(edits[i].from);
    }
    tp_buf_puts(&b, p);
    FILE *f = fopen(R.conf, "w");
    fputs(b.data, f);
    fclose(f);
    kill(R.pid, SIGHUP);
    CHECK(log_has(&R, "configuration reloaded"));
    CHECK(log_has(&R, "server.threads"));
    CHECK(log_has(&R, "needs a restart"));
    r = as_from(&R, CAROL, "203.0.113.1", "GET", "/api/v1/datasets", NULL);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    /* server.table_max_limit is reloadable: the tables are re-reflected with it */
    long lst = 0;
    for (int i = 0; i < 50 && lst != 400; i++) {
        r = as_from(&R, CAROL, "203.0.113.2", "GET", "/api/v1/tables/iot.users?limit=6", NULL);
        lst = r.status;
        resp_free(&r);
        if (lst != 400)
            usleep(100000);
    }
    CHECK_INT_EQ(lst, 400);
    for (int i = 0; i < 5; i++) {
        char ip[32];
        snprintf(ip, sizeof ip, "203.0.113.%d", i + 10);
        r = as_from(&R, ALICE, ip, "GET", "/api/v1/datasets", NULL);
        CHECK_INT_EQ(r.status, 200); /* identity limit now off */
        resp_free(&r);
    }
    /* a broken file keeps everything and names file:line */
    f = fopen(R.conf, "a");
    fputs("[auth]\nrate_per_address = lots\n", f);
    fclose(f);
    int nlines = 0;
    for (const char *s = b.data; *s; s++)
        nlines += *s == '\n';
    char where[700];
    snprintf(where, sizeof where, "%s:%d:", R.conf, nlines + 2);
    kill(R.pid, SIGHUP);
    CHECK(log_has(&R, "config reload failed"));
    CHECK_MSG(log_has(&R, where), "log lacks %s", where);
    r = as_from(&R, CAROL, "203.0.113.99", "GET", "/api/v1/datasets", NULL);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    /* a file that loads but whose [auth] does not build: kept too */
    char *bad_tokens = tp_xstrdup(b.data);
    char *tk = strstr(bad_tokens, "tokens = ");
    if (tk)
        memcpy(tk, "tokens = X", 10); /* "Xarol:reader:..." stays, but as a broken entry */
    char *colon = tk ? strchr(tk, ':') : NULL;
    if (colon)
        *colon = ' ';
    f = fopen(R.conf, "w");
    fputs(bad_tokens, f);
    fclose(f);
    free(bad_tokens);
    kill(R.pid, SIGHUP);
    CHECK(log_has(&R, "auth.tokens"));
    r = as_from(&R, CAROL, "203.0.113.98", "GET", "/api/v1/datasets", NULL);
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    CHECK_INT_EQ(tp_test_stop(R.pid, 15000), 0);
    tp_buf_free(&b);
    free(text);
    free(R.conf);
    free(R.log);
}

/* A non-loopback IPv4 address of this machine into out; false if none. */
static bool outside_address(char *out, size_t n)
{
    struct ifaddrs *ifs = NULL;
    bool found = false;
    if (getifaddrs(&ifs) != 0)
        return false;
    for (struct ifaddrs *i = ifs; i && !found; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET)
            continue;
        struct in_addr a = ((struct sockaddr_in *)i->ifa_addr)->sin_addr;
        if ((ntohl(a.s_addr) >> 24) == 127)
            continue;
        found = inet_ntop(AF_INET, &a, out, (socklen_t)n) != NULL;
    }
    freeifaddrs(ifs);
    return found;
}

static long apps_get_h(const char *host, int port, const char *path, const char *email,
                       const char *extra)
{
    CURL *c = curl_easy_init();
    char url[256], h[256];
    snprintf(url, sizeof url, "http://%s:%d%s", host, port, path);
    snprintf(h, sizeof h, "X-Forwarded-Email: %s", email ? email : "");
    struct curl_slist *sl = email ? curl_slist_append(NULL, h) : NULL;
    if (extra)
        sl = curl_slist_append(sl, extra);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, sl);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    tp_buf_t b = {0};
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    long st = 0;
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
    curl_slist_free_all(sl);
    curl_easy_cleanup(c);
    tp_buf_free(&b);
    return st;
}

static long apps_get(const char *host, int port, const char *path, const char *email)
{
    return apps_get_h(host, port, path, email, NULL);
}

/* Mode databricks-apps outside Databricks Apps (no DATABRICKS_APP_NAME), over
 * HTTP: with trusted_proxies naming loopback the forwarded identity is
 * believed, but each identity header sent twice is refused; with
 * trusted_proxies elsewhere the same headers from 127.0.0.1 are refused 401,
 * and the answer does not say why beyond the code. */
static void test_databricks_apps_trusted_proxies(void)
{
    static const char *const confs[] = {
        "[auth]\nmode = databricks-apps\ntrusted_proxies = 127.0.0.1/32, ::1\nroles = *:reader\n",
        "[auth]\nmode = databricks-apps\ntrusted_proxies = 192.0.2.0/24, 2001:db8::/32\n"
        "roles = *:reader\n"};
    static const char *const alice[] = {"X-Forwarded-Email: alice@example.com",
                                        "X-Forwarded-User: 4242", NULL};
    for (int i = 0; i < 2; i++) {
        srv_h_t A = {0};
        snprintf(A.qdir, sizeof A.qdir, "%s", S.qdir);
        A.extra_conf = confs[i];
        bool up = harness_start(&A, DSN, 1) && harness_ready(&A);
        CHECK_MSG(up, "server did not start; see %s", A.log);
        resp_t r = http(&A, "GET", "/api/v1/datasets/users", alice, NULL, 0);
        if (i == 0) {
            CHECK_INT_EQ(r.status, 200);
            resp_free(&r);
            /* each forwarded identity header injected twice: refused */
            static const char *const twice[][3] = {
                {"X-Forwarded-Email: alice@example.com", "X-Forwarded-Email: boss@example.com", NULL},
                {"X-Forwarded-User: 4242", "X-Forwarded-User: 1", NULL},
                {"X-Forwarded-Preferred-Username: alice", "X-Forwarded-Preferred-Username: boss",
                 NULL},
            };
            for (size_t k = 0; k < TP_ARRAY_LEN(twice); k++) {
                r = http(&A, "GET", "/api/v1/datasets/users", twice[k], NULL, 0);
                CHECK_PROBLEM(r, 401, NULL);
                CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")),
                             "invalid-credentials");
                CHECK(strstr(r.body, "boss") == NULL && strstr(r.body, "twice") == NULL);
                resp_free(&r);
            }
            CHECK(log_has(&A, "X-Forwarded-Email appears 2 times"));
        } else {
            /* loopback is not a trusted proxy here: the identity is not believed */
            CHECK_PROBLEM(r, 401, NULL);
            CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")),
                         "invalid-credentials");
            CHECK(strstr(r.body, "alice") == NULL && strstr(r.body, "proxy") == NULL);
            resp_free(&r);
            const char *with_token[] = {"X-Forwarded-Email: alice@example.com",
                                        "X-Forwarded-Access-Token: obo-untrusted-never-logged",
                                        NULL};
            r = http(&A, "GET", "/api/v1/tables/iot.users?limit=1", with_token, NULL, 0);
            CHECK_PROBLEM(r, 401, NULL);
            resp_free(&r);
            r = http(&A, "GET", "/api/v1/datasets", NULL, NULL, 0);
            CHECK_PROBLEM(r, 401, NULL);
            CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")),
                         "missing-credentials");
            resp_free(&r);
            CHECK(log_has(&A, "peer 127.0.0.1 is not a trusted proxy"));
            char *log = tp_read_file(A.log, NULL);
            CHECK(log && strstr(log, "obo-untrusted-never-logged") == NULL);
            free(log);
        }
        if (A.pid > 0)
            CHECK_INT_EQ(tp_test_stop(A.pid, 15000), 0);
        if (tp_test_failed_checks) {
            char *log = tp_read_file(A.log, NULL);
            printf("# apps server %d log:\n%s\n", i, log ? log : "");
            free(log);
        }
        free(A.conf);
        free(A.log);
    }
}

/* Databricks Apps: no config file, only what the runtime injects. */
static void test_databricks_apps_mode(void)
{
    PQconninfoOption *opts = PQconninfoParse(DSN, NULL);
    CHECK(opts != NULL);
    if (!opts)
        return;
    static const struct {
        const char *kw, *env;
    } pg[] = {{"host", "PGHOST"}, {"port", "PGPORT"}, {"user", "PGUSER"},
              {"dbname", "PGDATABASE"}, {"password", "PGPASSWORD"}};
    for (PQconninfoOption *o = opts; o->keyword; o++)
        for (size_t i = 0; i < TP_ARRAY_LEN(pg); i++)
            if (strcmp(o->keyword, pg[i].kw) == 0 && o->val && *o->val)
                setenv(pg[i].env, o->val, 1);
    PQconninfoFree(opts);
    int port = tp_test_free_port();
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    const char *vars[][2] = {{"DATABRICKS_APP_NAME", "tidepool-test"},
                             {"DATABRICKS_APP_PORT", ps},
                             {"DATABRICKS_HOST", "https://adb-1.2.azuredatabricks.net"},
                             {"DATABRICKS_CLIENT_ID", "app-sp-id"},
                             {"DATABRICKS_CLIENT_SECRET", "app-sp-secret-never-logged"},
                             {"DATABRICKS_WORKSPACE_ID", "1234567890"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(vars); i++)
        setenv(vars[i][0], vars[i][1], 1);
    char *log = tp_xasprintf("%s/apps-%d.log", tp_test_tmpdir(), port);
    char *argv[] = {(char *)tp_test_bin("tidepool-server"), NULL};
    pid_t pid = tp_test_spawn(argv, log);
    for (size_t i = 0; i < TP_ARRAY_LEN(vars); i++)
        unsetenv(vars[i][0]);
    CHECK(pid > 0 && tp_test_wait_port(port, 10000));
    long st = 0;
    for (int i = 0; i < 100 && st != 200; i++) {
        st = apps_get("127.0.0.1", port, "/readyz", NULL);
        if (st != 200)
            usleep(100000);
    }
    CHECK_INT_EQ(st, 200);
    CHECK_INT_EQ(apps_get("127.0.0.1", port, "/api/v1/datasets", NULL), 401);
    CHECK_INT_EQ(apps_get("127.0.0.1", port, "/api/v1/datasets", "alice@example.com"), 200);
    /* the on-behalf-of token is accepted but never logged; a doubled identity is refused */
    CHECK_INT_EQ(apps_get_h("127.0.0.1", port, "/api/v1/datasets", "alice@example.com",
                            "X-Forwarded-Access-Token: obo-user-token-never-logged"),
                 200);
    CHECK_INT_EQ(apps_get_h("127.0.0.1", port, "/api/v1/datasets", "alice@example.com",
                            "X-Forwarded-Email: mallory@example.com"),
                 401);
    /* the proxy is not on loopback in Databricks Apps: any peer is trusted */
    char outside[64];
    if (outside_address(outside, sizeof outside))
        CHECK_INT_EQ(apps_get(outside, port, "/api/v1/datasets", "alice@example.com"), 200);
    else
        printf("# no non-loopback address: the any-peer check was skipped\n");
    int64_t t0 = tp_now_ms();
    int rc = tp_test_stop(pid, 15000);
    int64_t took = tp_now_ms() - t0;
    CHECK_INT_EQ(rc, 0);
    CHECK_MSG(took < 15000, "stopping took %lld ms", (long long)took);
    char *text = tp_read_file(log, NULL);
    CHECK(text && strstr(text, "app-sp-secret-never-logged") == NULL);
    CHECK(text && strstr(text, "obo-user-token-never-logged") == NULL);
    CHECK(text && strstr(text, "authentication refused") != NULL);
    if (tp_test_failed_checks && text)
        printf("# apps log:\n%s\n", text);
    free(text);
    free(log);
}

int main(void)
{
    char conf[1024], hv[65], hb[65], ha[65], hal[65], hbo[65];
    sha_hex(VIEWER, hv);
    sha_hex(BOSS, hb);
    sha_hex(ANA, ha);
    sha_hex(ALICE, hal);
    sha_hex(BOB, hbo);
    snprintf(conf, sizeof conf,
             "[auth]\nmode = token\ntokens = viewer:reader:%s, boss:admin:%s, ana:analyst:%s, "
             "alice:reader:%s, bob:reader:%s\nsync_roles = analyst\n",
             hv, hb, ha, hal, hbo);
    S.extra_conf = conf;
    S.max_header_bytes = "16k"; /* room for a bearer token over lib/auth.c's 8 KiB */
    snprintf(S.qdir, sizeof S.qdir, "%s/queries", tp_test_tmpdir());
    mkdir(S.qdir, 0755);
    harness_def(&S, "admin_only.sql", "-- @roles admin\nSELECT 42 AS answer\n");
    if (!harness_setup(&S, "test_server_authz", &DSN, 1))
        return tp_test_done();
    tables_set_up();
    TP_RUN(test_table_roles);
    TP_RUN(test_row_scoping);
    TP_RUN(test_bad_expose_stays_hidden);
    TP_RUN(test_metrics_needs_admin);
    TP_RUN(test_dataset_roles);
    TP_RUN(test_operational_endpoints_open);
    TP_RUN(test_openapi_filtered_by_role);
    TP_RUN(test_sync_roles);
    TP_RUN(test_failed_auth_logged_without_secrets);
    TP_RUN(test_rate_limits_and_reload);
    TP_RUN(test_databricks_apps_trusted_proxies);
    TP_RUN(test_databricks_apps_mode);
    harness_finish(&S);
    return tp_test_done();
}
