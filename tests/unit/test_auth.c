/* Unit tests for lib/auth.c and the config-side of lib/auth_tokens.c: modes
 * none, token (config entries and a snapshot built from rows) and
 * databricks-apps (trusted proxies with IPv4/IPv6 CIDRs, duplicate headers,
 * on-behalf-of token kept but redacted), the role mapping and role model,
 * client address, build errors naming the setting, and that no token or
 * secret appears in any refusal or log line. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/sha.h>

#include "../tp_test.h"
#include "tidepool/auth.h"
#include "tidepool/auth_tokens.h"
#include "tidepool/config.h"
#include "tidepool/log.h"

#define TOK_CI "tpk_ci-token-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
#define TOK_OPS "tpk_ops-token-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
#define TOK_FILE "tpk_file-token-CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC"
#define OBO "eyJraWQiOiJvYm8tc2VjcmV0LWFjY2Vzcy10b2tlbiJ9.obo-payload.obo-sig"

static int64_t g_now;

static char *sha_hex(const char *s)
{
    unsigned char d[32];
    SHA256((const unsigned char *)s, strlen(s), d);
    char *h = tp_xmalloc(65);
    for (int i = 0; i < 32; i++)
        snprintf(h + 2 * i, 3, "%02x", d[i]);
    return h;
}

static tp_auth_t *auth_from(const char *conf_text, char *err, size_t errlen)
{
    char *path = tp_test_write_tmp("auth.conf", conf_text);
    tp_config_t c = {0};
    tp_auth_t *a = NULL;
    if (tp_config_load(&c, path, err, errlen))
        a = tp_auth_new(&c, err, errlen);
    tp_config_free(&c);
    free(path);
    return a;
}

/* Secrets and tokens that must never reach a refusal or a log line. */
static const char *const g_secrets[] = {TOK_CI, TOK_OPS, TOK_FILE, OBO, "ci-token", "obo-secret"};

static void no_secret_in(const char *file, int line, const char *text)
{
    for (size_t i = 0; i < TP_ARRAY_LEN(g_secrets); i++)
        if (text != NULL && strstr(text, g_secrets[i]) != NULL)
            tp_test_fail(file, line, "secret \"%s\" in \"%s\"", g_secrets[i], text);
}

/* Checks a refusal and that neither it nor its log line leaks a secret. */
static void refused_at(const char *file, int line, tp_auth_t *a, tp_auth_request_t *r, int status,
                       const char *code, const char *reason_part)
{
    tp_auth_result_t res;
    if (tp_auth_check(a, r, &res)) {
        tp_test_fail(file, line, "accepted as %s (want %s)", res.principal->id, reason_part);
        tp_auth_result_clear(&res);
        return;
    }
    if (res.status != status || res.code == NULL || strcmp(res.code, code) != 0)
        tp_test_fail(file, line, "got %d %s, want %d %s (%s)", res.status,
                     res.code ? res.code : "(null)", status, code, res.reason);
    if (strstr(res.reason, reason_part) == NULL)
        tp_test_fail(file, line, "reason \"%s\" lacks \"%s\"", res.reason, reason_part);
    if (res.principal != NULL || res.message == NULL || res.message[0] == '\0')
        tp_test_fail(file, line, "refusal shape");
    no_secret_in(file, line, res.reason);
    no_secret_in(file, line, res.message);
    char *logged = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&logged, &len);
    tp_log_set_stream(f);
    tp_auth_log_refusal(&res, tp_auth_client_address(a, r), "req-1");
    tp_log_set_stream(NULL);
    fclose(f);
    if (strstr(logged, "\"msg\":\"authentication refused\"") == NULL ||
        strstr(logged, "\"request_id\":\"req-1\"") == NULL)
        tp_test_fail(file, line, "log line: %s", logged);
    no_secret_in(file, line, logged);
    free(logged);
    tp_auth_result_clear(&res);
}
#define REFUSED(a, r, status, code, part) refused_at(__FILE__, __LINE__, a, r, status, code, part)

static tp_principal_t *granted_at(const char *file, int line, tp_auth_t *a, tp_auth_request_t *r)
{
    tp_auth_result_t res;
    if (!tp_auth_check(a, r, &res)) {
        tp_test_fail(file, line, "refused: %s", res.reason);
        return NULL;
    }
    if (res.status != 0 || res.code != NULL)
        tp_test_fail(file, line, "success with status %d", res.status);
    return res.principal;
}
#define GRANTED(a, r) granted_at(__FILE__, __LINE__, a, r)

static void bearer_request(tp_auth_request_t *r, const char *token)
{
    static char hdr[256];
    memset(r, 0, sizeof *r);
    r->peer = "198.51.100.4";
    r->now_s = g_now;
    if (token != NULL) {
        snprintf(hdr, sizeof hdr, "Bearer %s", token);
        tp_auth_request_header(r, "Authorization", hdr);
    }
}

static bool has_role(const tp_principal_t *p, const char *role)
{
    for (size_t i = 0; p && p->roles[i]; i++)
        if (strcmp(p->roles[i], role) == 0)
            return true;
    return false;
}

/* ---- none ---- */

static void mode_none_gives_anonymous(void)
{
    char err[512] = "";
    tp_auth_t *a = auth_from("[auth]\nmode = none\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    tp_auth_request_t r = {.peer = "127.0.0.1", .now_s = g_now};
    tp_principal_t *p = GRANTED(a, &r);
    CHECK(p != NULL && strcmp(p->id, "anonymous") == 0 && p->mode == TP_AUTH_MODE_NONE);
    CHECK(has_role(p, "reader") && has_role(p, "writer") && has_role(p, "admin"));
    tp_principal_free(p);
    /* a second reference keeps the verifier alive after the first is dropped */
    tp_auth_t *held = tp_auth_ref(a);
    tp_auth_free(a);
    p = GRANTED(held, &r);
    CHECK(p != NULL && has_role(p, "admin"));
    tp_principal_free(p);
    tp_auth_free(held);
    tp_auth_free(NULL);
    CHECK(tp_auth_ref(NULL) == NULL);
    a = auth_from("[auth]\nanonymous_roles = reader\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    p = GRANTED(a, &r);
    CHECK_INT_EQ(tp_auth_strv_len((const char *const *)p->roles), 1);
    static const char *const need_writer[] = {"writer", NULL};
    CHECK(!tp_auth_allowed(p, need_writer));
    tp_principal_free(p);
    tp_auth_free(a);
    a = auth_from("[auth]\nanonymous_roles = reader, wr!ter\n", err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, ":2: auth.anonymous_roles: role \"wr!ter\" is not");
}

/* ---- token ---- */

static tp_auth_t *token_auth(bool table)
{
    char *h_ci = sha_hex(TOK_CI), *h_ops = sha_hex(TOK_OPS), *h_file = sha_hex(TOK_FILE);
    char *file_text = tp_xasprintf("# tokens for the batch jobs\nbatch:writer:%s  # nightly\n\n",
                                   h_file);
    char *fpath = tp_test_write_tmp("tokens.txt", file_text);
    char *conf = tp_xasprintf("[auth]\nmode = token\ntokens = ci:reader+writer:%s, "
                              "ops : admin : %s\ntokens_file = %s\ntoken_table = %s\n",
                              h_ci, h_ops, fpath, table ? "true" : "false");
    char err[512] = "";
    tp_auth_t *a = auth_from(conf, err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    free(h_ci);
    free(h_ops);
    free(h_file);
    free(file_text);
    free(fpath);
    free(conf);
    return a;
}

static void mode_token_from_config(void)
{
    tp_auth_t *a = token_auth(false);
    CHECK(!tp_auth_wants_token_table(a));
    tp_auth_request_t r;
    bearer_request(&r, TOK_CI);
    tp_principal_t *p = GRANTED(a, &r);
    CHECK(p != NULL && strcmp(p->id, "token:ci") == 0 && strcmp(p->name, "ci") == 0);
    CHECK(has_role(p, "reader") && has_role(p, "writer") && !has_role(p, "admin"));
    char cid[17];
    tp_auth_credential_id(TOK_CI, strlen(TOK_CI), cid);
    CHECK_STR_EQ(p->credential_id, cid);
    tp_principal_free(p);
    bearer_request(&r, TOK_OPS);
    p = GRANTED(a, &r);
    CHECK(p != NULL && has_role(p, "admin"));
    tp_principal_free(p);
    bearer_request(&r, TOK_FILE);
    p = GRANTED(a, &r);
    CHECK(p != NULL && strcmp(p->id, "token:batch") == 0 && has_role(p, "writer"));
    tp_principal_free(p);
    /* the scheme is case-insensitive; extra spaces are tolerated */
    tp_auth_request_t r2 = {.peer = "::1", .now_s = g_now};
    tp_auth_request_header(&r2, "authorization", "bearer   " TOK_CI "  ");
    tp_principal_free(GRANTED(a, &r2));

    bearer_request(&r, NULL);
    REFUSED(a, &r, 401, TP_AUTH_CODE_MISSING, "no Authorization header");
    bearer_request(&r, "tpk_wrong-token-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "unknown token (credential id ");
    bearer_request(&r, TOK_CI "x"); /* a prefix match is no match */
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "unknown token");
    bearer_request(&r, "tpk_ci-token"); /* nor is a truncated token */
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "unknown token");
    tp_auth_request_t r3 = {.peer = "198.51.100.4", .now_s = g_now};
    tp_auth_request_header(&r3, "Authorization", "Basic " TOK_CI);
    REFUSED(a, &r3, 401, TP_AUTH_CODE_INVALID, "scheme is not Bearer");
    tp_auth_request_header(&r3, "Authorization", "Bearer " TOK_CI);
    REFUSED(a, &r3, 401, TP_AUTH_CODE_INVALID, "Authorization appears 2 times");
    char big[9000];
    memset(big, 'A', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    tp_auth_request_t r4 = {.peer = "198.51.100.4", .now_s = g_now};
    char *bighdr = tp_xasprintf("Bearer %s", big);
    tp_auth_request_header(&r4, "Authorization", bighdr);
    REFUSED(a, &r4, 401, TP_AUTH_CODE_INVALID, "longer than 8 KiB");
    free(bighdr);
    tp_auth_free(a);
}

/* A snapshot as built from api_tokens rows (the DB itself: integration test). */
static void mode_token_snapshot(void)
{
    tp_auth_t *a = token_auth(true);
    CHECK(tp_auth_wants_token_table(a));
    tp_auth_request_t r;
    static const char *const tok_db = "tpk_db-token-DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD";
    static const char *const tok_old = "tpk_old-token-EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE";
    static const char *const tok_rev = "tpk_rev-token-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF";
    bearer_request(&r, tok_db);
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "token table not loaded");
    char *h1 = sha_hex(tok_db), *h2 = sha_hex(tok_old), *h3 = sha_hex(tok_rev);
    /* build a PGresult-free snapshot through the config parser, then flags */
    char *text = tp_xasprintf("dbtok:reader:%s\nold:reader:%s\nrev:admin:%s\n", h1, h2, h3);
    char err[256];
    tp_auth_tokens_t *t = tp_auth_tokens_parse(text, "snapshot", err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    CHECK_INT_EQ(tp_auth_tokens_count(t), 3);
    unsigned char d[32];
    SHA256((const unsigned char *)tok_old, strlen(tok_old), d);
    tp_auth_token_entry_t *old = (tp_auth_token_entry_t *)tp_auth_tokens_find(t, d);
    SHA256((const unsigned char *)tok_rev, strlen(tok_rev), d);
    tp_auth_token_entry_t *rev = (tp_auth_token_entry_t *)tp_auth_tokens_find(t, d);
    CHECK(old != NULL && rev != NULL && old != rev);
    old->expires_at = g_now - 1;
    rev->revoked = true;
    tp_auth_set_tokens(a, t);
    bearer_request(&r, tok_db);
    tp_principal_t *p = GRANTED(a, &r);
    CHECK(p != NULL && strcmp(p->id, "token:dbtok") == 0 && has_role(p, "reader"));
    tp_principal_free(p);
    bearer_request(&r, tok_old);
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "\"old\" (id 0) expired at");
    bearer_request(&r, tok_rev);
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "\"rev\" (id 0) is revoked");
    bearer_request(&r, TOK_CI); /* config tokens still work beside the table */
    tp_principal_free(GRANTED(a, &r));
    /* a reference survives replacement */
    tp_auth_tokens_t *held = tp_auth_get_tokens(a);
    tp_auth_set_tokens(a, NULL);
    CHECK_INT_EQ(tp_auth_tokens_count(held), 3);
    tp_auth_tokens_release(held);
    bearer_request(&r, tok_db);
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "unknown token");
    free(h1);
    free(h2);
    free(h3);
    free(text);
    tp_auth_free(a);
}

/* Lookup in a large set: every token is found as itself, none as another. */
static void token_lookup_many(void)
{
    enum { N = 2000 };
    tp_buf_t b = {0};
    char tok[64];
    for (int i = 0; i < N; i++) {
        snprintf(tok, sizeof tok, "tpk_many-%d", i);
        char *h = sha_hex(tok);
        tp_buf_printf(&b, "t%d:reader:%s\n", i, h);
        free(h);
    }
    char err[256];
    tp_auth_tokens_t *t = tp_auth_tokens_parse(b.data, "many", err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    CHECK_INT_EQ(tp_auth_tokens_count(t), N);
    for (int i = 0; i < N + 50; i++) {
        snprintf(tok, sizeof tok, "tpk_many-%d", i);
        unsigned char d[32];
        SHA256((const unsigned char *)tok, strlen(tok), d);
        const tp_auth_token_entry_t *e = tp_auth_tokens_find(t, d);
        char name[16];
        snprintf(name, sizeof name, "t%d", i);
        if (i < N)
            CHECK_MSG(e != NULL && strcmp(e->name, name) == 0, "token %d", i);
        else
            CHECK_MSG(e == NULL, "token %d found", i);
    }
    CHECK(tp_auth_tokens_find(NULL, (const unsigned char *)"0123456789abcdef0123456789abcdef") == NULL);
    tp_auth_tokens_release(t);
    tp_buf_free(&b);
}

typedef struct checker {
    tp_auth_t *a;
    const char *token;
    int granted, refused;
} checker_t;

static void *check_loop(void *arg)
{
    checker_t *c = arg;
    char hdr[128];
    snprintf(hdr, sizeof hdr, "Bearer %s", c->token);
    for (int i = 0; i < 3000; i++) {
        tp_auth_request_t r = {.peer = "127.0.0.1", .now_s = g_now};
        tp_auth_request_header(&r, "Authorization", hdr);
        tp_auth_result_t res;
        if (tp_auth_check(c->a, &r, &res))
            c->granted++;
        else
            c->refused++;
        tp_auth_result_clear(&res);
    }
    return NULL;
}

/* Requests on three threads while the snapshot is replaced 300 times: config
 * tokens always pass, the table token passes or not depending on the
 * snapshot, and nothing is freed under a reader (ASan build). */
static void snapshot_swaps_under_load(void)
{
    tp_auth_t *a = token_auth(true);
    static const char tok_db[] = "tpk_swap-token-GGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGG";
    char *h = sha_hex(tok_db);
    char *text = tp_xasprintf("swap:reader:%s", h);
    checker_t c[3] = {{a, TOK_CI, 0, 0}, {a, tok_db, 0, 0}, {a, tok_db, 0, 0}};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, check_loop, &c[i]);
    char err[256];
    for (int i = 0; i < 300; i++) {
        tp_auth_tokens_t *t = i % 2 ? NULL : tp_auth_tokens_parse(text, "swap", err, sizeof err);
        tp_auth_set_tokens(a, t);
    }
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    CHECK_INT_EQ(c[0].granted, 3000);
    CHECK_INT_EQ(c[1].granted + c[1].refused, 3000);
    CHECK_INT_EQ(c[2].granted + c[2].refused, 3000);
    tp_auth_free(a);
    free(text);
    free(h);
}

static void token_entries_errors(void)
{
    char err[512];
    char *h = sha_hex(TOK_CI);
    struct {
        const char *text;
        const char *want;
    } cases[] = {
        {"ci:reader", "entry 1: expected name:role+role:sha256hex"},
        {"ci:reader:abc", "entry 1 (ci): the hash must be 64 hex digits"},
        {"ci:re ader:H", "entry 1 (ci): role \"re ader\""},
        {" :reader:H", "entry 1: name must be"},
        {"a:reader:H, a:writer:H", "entry 2 (a): same name as token \"a\""},
        {"a:reader:H\nb:writer:H", ":2: entry 2 (b): same hash as token \"a\""},
        {"a:b:c:d", "entry 1: expected"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        tp_buf_t b = {0};
        for (const char *p = cases[i].text; *p; p++) {
            if (*p == 'H')
                tp_buf_puts(&b, h);
            else
                tp_buf_putc(&b, *p);
        }
        tp_auth_tokens_t *t = tp_auth_tokens_parse(b.data, "where", err, sizeof err);
        CHECK_MSG(t == NULL, "case %zu parsed", i);
        tp_auth_tokens_release(t);
        char want[256];
        snprintf(want, sizeof want, "where%s%s", cases[i].want[0] == ':' ? "" : ": ",
                 cases[i].want);
        CHECK_MSG(strncmp(err, want, strlen(want)) == 0, "case %zu: \"%s\"", i, err);
        CHECK_MSG(strstr(err, h) == NULL, "case %zu quotes the hash", i);
        tp_buf_free(&b);
    }
    /* through the config: FILE:LINE: auth.tokens */
    char *conf = tp_xasprintf("[auth]\nmode = token\n\ntokens = x:reader:%s, y:reader:123\n", h);
    tp_auth_t *a = auth_from(conf, err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, ":4: auth.tokens: entry 2 (y): the hash must be 64 hex digits");
    free(conf);
    char *ftext = tp_xasprintf("# comment\nx:reader:%s\n\ny:reader:%s\n", h, h);
    char *fpath = tp_test_write_tmp("bad_tokens.txt", ftext);
    conf = tp_xasprintf("[auth]\nmode = token\ntokens_file = %s\n", fpath);
    a = auth_from(conf, err, sizeof err);
    CHECK(a == NULL);
    char *want = tp_xasprintf("%s:4: entry 2 (y): same hash as token \"x\"", fpath);
    CHECK_STR_EQ(err, want);
    free(want);
    free(conf);
    free(fpath);
    free(ftext);
    a = auth_from("[auth]\nmode = token\ntoken_table = false\n", err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "token mode with no tokens");
    a = auth_from("[auth]\nmode = token\ntokens_file = /nonexistent/tokens\n", err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "auth.tokens_file: cannot read /nonexistent/tokens");
    free(h);
}

/* Modes none and token (jwt shares the code): X-Forwarded-Access-Token is
 * kept only from a trusted proxy, ignored from anyone else, refused twice. */
static void access_token_only_from_trusted_proxy(void)
{
    tp_auth_t *a = token_auth(false); /* trusted_proxies: loopback (the default) */
    tp_auth_request_t r;
    bearer_request(&r, TOK_CI); /* peer 198.51.100.4: not a trusted proxy */
    tp_auth_request_header(&r, "X-Forwarded-Access-Token", OBO);
    tp_principal_t *p = GRANTED(a, &r);
    CHECK(p != NULL && p->access_token == NULL);
    tp_principal_free(p);
    r.peer = "127.0.0.1";
    p = GRANTED(a, &r);
    CHECK(p != NULL && p->access_token != NULL && strcmp(p->access_token, OBO) == 0);
    tp_principal_free(p);
    r.peer = "::1";
    r.hdr[TP_AUTH_HDR_FWD_ACCESS_TOKEN].value = "obo\r\nX-Evil: 1";
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "X-Forwarded-Access-Token is empty, too long");
    r.hdr[TP_AUTH_HDR_FWD_ACCESS_TOKEN].value = OBO;
    tp_auth_request_header(&r, "X-Forwarded-Access-Token", "obo-secret-two");
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "X-Forwarded-Access-Token appears 2 times");
    tp_auth_free(a);
    /* mode none: the same rule, with the proxies configured */
    char err[512] = "";
    a = auth_from("[auth]\nmode = none\ntrusted_proxies = 10.9.0.0/16\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    tp_auth_request_t n = {.peer = "127.0.0.1", .now_s = g_now};
    tp_auth_request_header(&n, "X-Forwarded-Access-Token", OBO);
    p = GRANTED(a, &n);
    CHECK(p != NULL && p->access_token == NULL);
    tp_principal_free(p);
    n.peer = "10.9.3.4";
    p = GRANTED(a, &n);
    CHECK(p != NULL && p->access_token != NULL);
    tp_principal_free(p);
    tp_auth_free(a);
}

/* auth.sync_roles: admin by default, custom lists, never empty. */
static void sync_roles_setting(void)
{
    char err[512] = "";
    tp_auth_t *a = auth_from("[auth]\nmode = none\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    const char *const *sr = a ? tp_auth_sync_roles(a) : NULL;
    CHECK(sr != NULL && sr[0] != NULL && strcmp(sr[0], "admin") == 0 && sr[1] == NULL);
    tp_auth_free(a);
    a = auth_from("[auth]\nmode = none\nsync_roles = operator, data.eng\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    sr = a ? tp_auth_sync_roles(a) : NULL;
    CHECK(sr != NULL && tp_auth_strv_len(sr) == 2);
    tp_auth_request_t r = {.peer = "127.0.0.1", .now_s = g_now};
    tp_principal_t *p = GRANTED(a, &r); /* anonymous: reader, writer, admin */
    CHECK(sr != NULL && tp_auth_allowed(p, sr)); /* admin implies operator */
    tp_principal_free(p);
    tp_auth_free(a);
    a = auth_from("[auth]\nsync_roles = ,\n", err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, ":2: auth.sync_roles: name at least one role");
    a = auth_from("[auth]\n\nsync_roles = admin, ops!\n", err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, ":3: auth.sync_roles: role \"ops!\" is not");
}

/* ---- databricks-apps ---- */

static void apps_request(tp_auth_request_t *r, const char *peer)
{
    memset(r, 0, sizeof *r);
    r->peer = peer;
    r->now_s = g_now;
    tp_auth_request_header(r, "x-forwarded-email", "Alice@Example.com");
    tp_auth_request_header(r, "X-Forwarded-User", "4242@example");
    tp_auth_request_header(r, "X-Forwarded-Preferred-Username", "alice");
    tp_auth_request_header(r, "X-Forwarded-Access-Token", OBO);
    tp_auth_request_header(r, "X-Real-Ip", "203.0.113.77");
    tp_auth_request_header(r, "X-Request-Id", "ignored");
}

static tp_auth_t *apps_auth(void)
{
    char err[512] = "";
    tp_auth_t *a = auth_from("[auth]\nmode = databricks-apps\n"
                             "trusted_proxies = 127.0.0.1/32, ::1, 10.1.0.0/16, fd00:ab::/32\n"
                             "roles = alice@example.com:writer, group:analysts:reader, "
                             "bob:admin, *:viewer\n",
                             err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    return a;
}

static void mode_databricks_apps(void)
{
    tp_auth_t *a = apps_auth();
    tp_auth_request_t r;
    static const char *const trusted[] = {"127.0.0.1", "::1", "10.1.255.3", "fd00:ab:1::9",
                                          "::ffff:127.0.0.1", "[::1]"};
    for (size_t i = 0; i < TP_ARRAY_LEN(trusted); i++) {
        apps_request(&r, trusted[i]);
        tp_principal_t *p = GRANTED(a, &r);
        if (p == NULL)
            continue;
        CHECK_STR_EQ(p->id, "Alice@Example.com");
        CHECK_STR_EQ(p->email, "Alice@Example.com");
        CHECK_STR_EQ(p->name, "alice");
        CHECK_STR_EQ(p->access_token, OBO);
        CHECK(has_role(p, "writer") && has_role(p, "viewer") && !has_role(p, "reader"));
        CHECK(p->mode == TP_AUTH_MODE_DATABRICKS_APPS);
        tp_buf_t b = {0};
        tp_principal_describe(p, &b);
        CHECK_CONTAINS(b.data, "\"access_token\":\"[redacted sha256:");
        CHECK_CONTAINS(b.data, "\"id\":\"Alice@Example.com\"");
        no_secret_in(__FILE__, __LINE__, b.data);
        tp_buf_free(&b);
        tp_principal_free(p);
        CHECK_STR_EQ(tp_auth_client_address(a, &r), "203.0.113.77");
    }
    static const char *const untrusted[] = {"10.2.0.1", "192.0.2.1", "fd00:ac::1", "::2",
                                            "::ffff:10.2.0.1", "", "not-an-ip", "127.0.0.1/32"};
    for (size_t i = 0; i < TP_ARRAY_LEN(untrusted); i++) {
        apps_request(&r, untrusted[i]);
        REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "is not a trusted proxy");
        CHECK_STR_EQ(tp_auth_client_address(a, &r), untrusted[i]); /* X-Real-Ip ignored */
    }
    memset(&r, 0, sizeof r);
    r.now_s = g_now; /* unknown peer, no headers */
    REFUSED(a, &r, 401, TP_AUTH_CODE_MISSING, "(unknown) is not a trusted proxy");
    r.peer = "127.0.0.1";
    REFUSED(a, &r, 401, TP_AUTH_CODE_MISSING, "no X-Forwarded-Email/User");
    /* each identity header injected twice */
    static const char *const dup[] = {"X-Forwarded-Email", "X-Forwarded-User",
                                      "X-Forwarded-Preferred-Username",
                                      "X-Forwarded-Access-Token", "X-Forwarded-Groups"};
    for (size_t i = 0; i < TP_ARRAY_LEN(dup); i++) {
        apps_request(&r, "127.0.0.1");
        tp_auth_request_header(&r, dup[i], "mallory@example.com");
        if (i == 4)
            tp_auth_request_header(&r, dup[i], "admins");
        char want[96];
        snprintf(want, sizeof want, "%s appears 2 times", dup[i]);
        REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, want);
    }
    /* a repeated Authorization header is no concern of this mode */
    apps_request(&r, "127.0.0.1");
    tp_auth_request_header(&r, "Authorization", "Bearer a");
    tp_auth_request_header(&r, "Authorization", "Bearer b");
    tp_principal_free(GRANTED(a, &r));
    /* control characters and sizes */
    apps_request(&r, "127.0.0.1");
    r.hdr[TP_AUTH_HDR_FWD_EMAIL].value = "alice@example.com\r\nX-Evil: 1";
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "X-Forwarded-Email is empty, too long");
    char longv[600];
    memset(longv, 'a', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    apps_request(&r, "127.0.0.1");
    r.hdr[TP_AUTH_HDR_FWD_PREFERRED_USERNAME].value = longv;
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "X-Forwarded-Preferred-Username is empty");
    apps_request(&r, "127.0.0.1");
    r.hdr[TP_AUTH_HDR_FWD_ACCESS_TOKEN].value = "";
    REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "X-Forwarded-Access-Token is empty");
    tp_auth_free(a);
}

static void apps_groups_and_fallbacks(void)
{
    tp_auth_t *a = apps_auth();
    tp_auth_request_t r = {.peer = "10.1.0.1", .now_s = g_now};
    tp_auth_request_header(&r, "X-Forwarded-User", "bob");
    tp_auth_request_header(&r, "X-Forwarded-Groups", "analysts, ops ,");
    tp_principal_t *p = GRANTED(a, &r);
    if (p != NULL) {
        CHECK_STR_EQ(p->id, "bob");
        CHECK(p->email == NULL && p->access_token == NULL);
        CHECK_INT_EQ(tp_auth_strv_len((const char *const *)p->groups), 2);
        CHECK(has_role(p, "reader") && has_role(p, "admin") && has_role(p, "viewer"));
        tp_buf_t b = {0};
        tp_principal_describe(p, &b);
        CHECK_CONTAINS(b.data, "\"access_token\":null");
        CHECK_CONTAINS(b.data, "\"email\":null");
        tp_buf_free(&b);
    }
    tp_principal_free(p);
    /* X-Real-Ip sent twice or junk: the peer is the client address */
    tp_auth_request_header(&r, "X-Real-Ip", "203.0.113.1");
    CHECK_STR_EQ(tp_auth_client_address(a, &r), "203.0.113.1");
    tp_auth_request_header(&r, "X-Real-Ip", "203.0.113.2");
    CHECK_STR_EQ(tp_auth_client_address(a, &r), "10.1.0.1");
    tp_auth_request_t r2 = {.peer = "10.1.0.1", .now_s = g_now};
    tp_auth_request_header(&r2, "X-Real-Ip", "evil");
    CHECK_STR_EQ(tp_auth_client_address(a, &r2), "10.1.0.1");
    tp_auth_free(a);
}

static void apps_config_errors(void)
{
    char err[512];
    static const struct {
        const char *conf, *want;
    } cases[] = {
        {"trusted_proxies = 10.0.0.1/8\n", "auth.trusted_proxies: \"10.0.0.1/8\" is not an IP"},
        {"trusted_proxies = 10.0.0.0/33\n", "\"10.0.0.0/33\" is not"},
        {"trusted_proxies = ::1/129\n", "\"::1/129\" is not"},
        {"trusted_proxies = proxy.local\n", "\"proxy.local\" is not"},
        {"trusted_proxies = ,\n", "databricks-apps mode needs at least one trusted proxy"},
        {"roles = alice\n", "auth.roles: entry 1: expected USER:ROLE"},
        {"roles = *:reader, bob:re@der\n", "auth.roles: entry 2: role \"re@der\""},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        char *conf = tp_xasprintf("[auth]\nmode = databricks-apps\n%s", cases[i].conf);
        tp_auth_t *a = auth_from(conf, err, sizeof err);
        CHECK_MSG(a == NULL, "case %zu built", i);
        tp_auth_free(a);
        CHECK_MSG(strstr(err, cases[i].want) != NULL, "case %zu: \"%s\" lacks \"%s\"", i, err,
                  cases[i].want);
        free(conf);
    }
    /* IPv6 CIDR edges: /0 trusts everything of the family, odd prefix lengths */
    tp_auth_t *a = auth_from("[auth]\nmode = databricks-apps\ntrusted_proxies = ::/0, "
                             "192.168.1.128/25\n", err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    tp_auth_request_t r = {.now_s = g_now};
    tp_auth_request_header(&r, "X-Forwarded-Email", "e@x");
    static const char *const yes[] = {"2001:db8::1", "192.168.1.128", "192.168.1.255"};
    static const char *const no[] = {"192.168.1.127", "192.168.0.200"};
    for (size_t i = 0; i < TP_ARRAY_LEN(yes); i++) {
        r.peer = yes[i];
        tp_principal_free(GRANTED(a, &r));
    }
    for (size_t i = 0; i < TP_ARRAY_LEN(no); i++) {
        r.peer = no[i];
        REFUSED(a, &r, 401, TP_AUTH_CODE_INVALID, "not a trusted proxy");
    }
    tp_auth_free(a);
}

/* ---- roles ---- */

static void role_model(void)
{
    tp_principal_t p = {.id = "u"};
    char *reader[] = {"reader", NULL}, *writer[] = {"writer", NULL}, *admin[] = {"admin", NULL};
    char *custom[] = {"analysts", NULL}, *none[] = {NULL};
    static const char *const need_r[] = {"reader", NULL}, *const need_w[] = {"writer", NULL},
                             *const need_a[] = {"admin", NULL}, *const need_c[] = {"analysts", NULL},
                             *const need_any[] = {NULL},
                             *const need_cw[] = {"analysts", "writer", NULL};
    struct {
        char **roles;
        const char *const *need;
        bool want;
    } cases[] = {
        {reader, need_r, true},  {reader, need_w, false}, {reader, need_a, false},
        {writer, need_r, true},  {writer, need_w, true},  {writer, need_a, false},
        {admin, need_r, true},   {admin, need_w, true},   {admin, need_a, true},
        {admin, need_c, true},   {custom, need_c, true},  {custom, need_r, false},
        {reader, need_c, false}, {none, need_any, true},  {none, NULL, true},
        {none, need_r, false},   {custom, need_cw, true}, {reader, need_cw, false},
        {writer, need_cw, true},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(cases); i++) {
        p.roles = cases[i].roles;
        CHECK_MSG(tp_auth_allowed(&p, cases[i].need) == cases[i].want, "case %zu", i);
    }
    CHECK(!tp_auth_allowed(NULL, NULL));
    p.roles = reader;
    tp_auth_result_t res;
    CHECK(!tp_auth_authorize(&p, need_cw, &res));
    CHECK_INT_EQ(res.status, 403);
    CHECK_STR_EQ(res.code, TP_AUTH_CODE_FORBIDDEN);
    CHECK_STR_EQ(res.reason, "u lacks any of roles analysts,writer");
    CHECK(res.principal == NULL && res.message != NULL);
    p.roles = admin;
    CHECK(tp_auth_authorize(&p, need_cw, &res));

    char **v = NULL;
    char err[128];
    CHECK(tp_auth_roles_parse(" reader , writer+admin,,reader ", &v, err, sizeof err));
    CHECK_INT_EQ(tp_auth_strv_len((const char *const *)v), 3);
    tp_auth_strv_free(v);
    CHECK(tp_auth_roles_parse("", &v, err, sizeof err) && v != NULL && v[0] == NULL);
    tp_auth_strv_free(v);
    char long_role[80];
    memset(long_role, 'r', 65);
    long_role[65] = '\0';
    CHECK(!tp_auth_roles_parse(long_role, &v, err, sizeof err) && v == NULL);
}

static void header_names_and_counts(void)
{
    tp_auth_request_t r = {0};
    for (int i = 0; i < TP_AUTH_HDR_COUNT; i++)
        tp_auth_request_header(&r, tp_auth_header_names[i], "v");
    tp_auth_request_header(&r, "x-forwarded-access-token", "second");
    tp_auth_request_header(&r, "X-Forwarded-Host", "ignored");
    for (int i = 0; i < TP_AUTH_HDR_COUNT; i++) {
        CHECK_INT_EQ(r.hdr[i].count, i == TP_AUTH_HDR_FWD_ACCESS_TOKEN ? 2 : 1);
        CHECK_STR_EQ(r.hdr[i].value, "v"); /* the first occurrence */
    }
}

/* Random mutations of token entries, role mappings and proxy lists never
 * crash (ASan build) and either build or fail with one line naming the
 * setting; the seed is fixed so a failure reproduces. */
static void mutated_settings_fail_cleanly(void)
{
    char *h = sha_hex(TOK_CI);
    char *base = tp_xasprintf("\ntokens = ci:reader+writer:%s, x:admin:%s\n"
                              "roles = a@b.c:writer, group:g:reader, *:viewer\n"
                              "trusted_proxies = 10.0.0.0/8, fd00::/8, 127.0.0.1\n", h, h);
    static const char *const modes[] = {"token", "databricks-apps"};
    static const char alphabet[] = ":,+*/.#\n af09@";
    srand(9090);
    int built = 0;
    for (int i = 0; i < 1200; i++) {
        char *text = tp_xasprintf("[auth]\nmode = %s%s", modes[i % 2], base);
        size_t len = strlen(text), start = (size_t)(strchr(text, '\n') - text) + 1;
        start = (size_t)(strchr(text + start, '\n') - text) + 1; /* keep [auth] and mode */
        for (int m = 1 + rand() % 3; m > 0; m--)
            text[start + (size_t)rand() % (len - start)] =
                alphabet[rand() % (int)(sizeof alphabet - 1)];
        char err[512] = "";
        tp_auth_t *a = auth_from(text, err, sizeof err);
        if (a != NULL) {
            built++;
        } else {
            /* auth errors name the setting; parse errors the file and line */
            CHECK_MSG((strstr(err, "auth.") != NULL ||
                       strncmp(err, tp_test_tmpdir(), strlen(tp_test_tmpdir())) == 0) &&
                          strchr(err, '\n') == NULL,
                      "case %d: \"%s\"", i, err);
            CHECK_MSG(strstr(err, h) == NULL, "case %d quotes the hash", i);
        }
        tp_auth_free(a);
        free(text);
    }
    CHECK(built > 0 && built < 1200);
    free(base);
    free(h);
}

int main(void)
{
    g_now = (int64_t)time(NULL);
    TP_RUN(mode_none_gives_anonymous);
    TP_RUN(mode_token_from_config);
    TP_RUN(mode_token_snapshot);
    TP_RUN(token_lookup_many);
    TP_RUN(snapshot_swaps_under_load);
    TP_RUN(token_entries_errors);
    TP_RUN(access_token_only_from_trusted_proxy);
    TP_RUN(sync_roles_setting);
    TP_RUN(mode_databricks_apps);
    TP_RUN(apps_groups_and_fallbacks);
    TP_RUN(apps_config_errors);
    TP_RUN(role_model);
    TP_RUN(header_names_and_counts);
    TP_RUN(mutated_settings_fail_cleanly);
    return tp_test_done();
}
