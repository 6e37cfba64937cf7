/* tidepool-server with [auth] mode = jwt, over real HTTP (issue 8, docs/auth.md).
 * The test makes its own keys: an HS256 secret, and an RSA key published in a
 * JWKS file under a kid (plus an RSA key the server does not know). Checked:
 * a good HS256 token (200; identity from sub in the audit log and the owner
 * column, roles from the configured dotted claim), RS256 by kid, exp and nbf
 * inside the clock skew accepted; and each bad token refused with 401: alg
 * none, expired, nbf beyond the skew, wrongly signed (other secret, other RSA
 * key, tampered payload, HS256 keyed with the RSA public key), unknown kid,
 * wrong or missing aud, wrong iss, malformed, over 8 KiB; a valid token
 * lacking the role gets 403. Every refusal is the same problem+json for the
 * client (no hint of which check failed) while the server's log, found by
 * X-Request-Id, names the check and never the token. Also: --check refuses
 * jwt mode without audience or issuer with FILE:LINE and exit 2. */
#include "server_harness.h"

#include <time.h>

#include <openssl/evp.h>
#include <openssl/rsa.h>

#include "../jwt_tokens.h"

#define HS_SECRET "jwt-server-test-secret-0123456789-abcdefgh"
#define AUD "tidepool-test-api"
#define ISS "https://idp.test.example/"
#define KID "k-test-1"

static srv_h_t S;
static const char *DSN;
static EVP_PKEY *g_rsa;   /* published in the JWKS as KID */
static EVP_PKEY *g_other; /* not published */
static int64_t g_now;
static int g_reqno;

/* ---- tokens (signed here, with OpenSSL) ---- */

/* Claims with sub, aud, iss, exp = now + 600 and the roles in the configured
 * claim app.roles, then extra (",\"k\":v..." without the leading comma). */
static char *claims(const char *sub, const char *roles, const char *extra)
{
    return tp_xasprintf("{\"sub\":\"%s\",\"email\":\"%s@example.com\",\"aud\":[\"other-api\",\"" AUD
                        "\"],\"iss\":\"" ISS "\",\"exp\":%lld,\"iat\":%lld,"
                        "\"app\":{\"roles\":[%s]}%s%s}",
                        sub, sub, (long long)(g_now + 600), (long long)g_now, roles,
                        extra ? "," : "", extra ? extra : "");
}

/* "input.signature" with input taken as is (segments already encoded, or not)
 * and signed with the HS256 secret: for payloads that are bad only after the
 * signature checks out (the payload is parsed only then). */
static char *hs_raw(const char *input)
{
    return sign_input(input, NULL, HS_SECRET, strlen(HS_SECRET));
}

static char *hs(const char *payload)
{
    return sign_with("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", payload, NULL, HS_SECRET,
                     strlen(HS_SECRET));
}

static char *rs(const char *kid, EVP_PKEY *key, const char *payload)
{
    char *h = tp_xasprintf("{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid);
    char *t = sign_with(h, payload, key, NULL, 0);
    free(h);
    return t;
}

/* ---- keys ---- */

/* Writes {"keys":[the RSA key as a JWK under KID]} and returns its path. */
static char *write_jwks(EVP_PKEY *k)
{
    char *key = jwk(k, KID);
    char *text = tp_xasprintf("{\"keys\":[%s]}", key);
    char *path = tp_test_write_tmp("jwks.json", text);
    free(key);
    free(text);
    return path;
}

/* ---- requests ---- */

/* GET path with "Authorization: Bearer token" (NULL: none) and a fresh
 * X-Request-Id, copied into rid. */
static resp_t get_as(const char *token, const char *path, char rid[40])
{
    snprintf(rid, 40, "jwt-test-%d", ++g_reqno);
    char *auth = token ? tp_xasprintf("Authorization: Bearer %s", token) : NULL;
    char *id = tp_xasprintf("X-Request-Id: %s", rid);
    const char *hs_[] = {id, auth, NULL};
    resp_t r = http(&S, "GET", path, hs_, NULL, 0);
    free(auth);
    free(id);
    return r;
}

static long status_of(const char *token, const char *path)
{
    char rid[40];
    resp_t r = get_as(token, path, rid);
    long st = r.status;
    resp_free(&r);
    return st;
}

/* The server's log line for request id rid whose msg is msg (waits up to 5 s);
 * owned, or NULL. */
static json_t *log_line(const char *rid, const char *msg)
{
    for (int i = 0; i < 50; i++) {
        char *log = tp_read_file(S.log, NULL);
        json_t *found = NULL;
        for (char *line = log ? strtok(log, "\n") : NULL; line && !found;
             line = strtok(NULL, "\n")) {
            json_t *j = json_loads(line, 0, NULL);
            const char *id = json_string_value(json_object_get(j, "request_id"));
            const char *m = json_string_value(json_object_get(j, "msg"));
            if (id && m && strcmp(id, rid) == 0 && strcmp(m, msg) == 0)
                found = j;
            else
                json_decref(j);
        }
        free(log);
        if (found)
            return found;
        usleep(100000);
    }
    return NULL;
}

static char g_detail401[256]; /* the one 401 detail every refused token gets */

/* token is refused with 401 invalid-credentials, a problem that names no
 * check, and the log's reason for this request contains why. */
static void refused_at(const char *file, int line, const char *token, const char *why)
{
    char rid[40];
    resp_t r = get_as(token, "/api/v1/datasets/users", rid);
    if (r.status != 401) {
        tp_test_fail(file, line, "%s: status %ld, want 401", why, r.status);
        resp_free(&r);
        return;
    }
    CHECK_PROBLEM(r, 401, NULL);
    const char *code = json_string_value(json_object_get(r.json, "code"));
    const char *detail = json_string_value(json_object_get(r.json, "detail"));
    if (!code || strcmp(code, "invalid-credentials") != 0)
        tp_test_fail(file, line, "%s: code %s", why, code ? code : "(none)");
    /* every bad token looks the same to the client */
    if (!g_detail401[0] && detail)
        snprintf(g_detail401, sizeof g_detail401, "%s", detail);
    if (!detail || strcmp(detail, g_detail401) != 0)
        tp_test_fail(file, line, "%s: detail \"%s\" differs from \"%s\"", why,
                     detail ? detail : "", g_detail401);
    static const char *const tells[] = {"expired", "audience", "issuer", "signature", "kid",
                                        "alg", "nbf", "8 KiB", "malformed", "not yet"};
    for (size_t i = 0; i < TP_ARRAY_LEN(tells); i++)
        if (strcasestr(r.body, tells[i]))
            tp_test_fail(file, line, "%s: the answer says \"%s\": %s", why, tells[i], r.body);
    if (token && strlen(token) > 20 && strstr(r.body, token + strlen(token) - 20))
        tp_test_fail(file, line, "%s: the answer echoes the token", why);
    const char *www = hdr(&r, "WWW-Authenticate");
    if (!www || !strstr(www, "error=\"invalid_token\""))
        tp_test_fail(file, line, "%s: WWW-Authenticate %s", why, www ? www : "(none)");
    resp_free(&r);
    json_t *l = log_line(rid, "authentication refused");
    const char *reason = json_string_value(json_object_get(l, "reason"));
    if (!reason || !strstr(reason, why))
        tp_test_fail(file, line, "log reason for %s: %s", why, reason ? reason : "(no line)");
    json_decref(l);
}
#define REFUSED(token, why) refused_at(__FILE__, __LINE__, token, why)

/* ---- cases ---- */

static void good_hs256_identity_and_roles(void)
{
    char *pl = claims("u-alice", "\"reader\"", NULL);
    char *t = hs(pl);
    char rid[40];
    resp_t r = get_as(t, "/api/v1/datasets/users", rid);
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 40);
    resp_free(&r);
    /* roles come from the configured claim (app.roles), not from "roles" */
    char *pl2 = tp_xasprintf("{\"sub\":\"u-bob\",\"aud\":\"" AUD "\",\"iss\":\"" ISS
                             "\",\"exp\":%lld,\"roles\":[\"admin\"]}",
                             (long long)(g_now + 600));
    char *t2 = hs(pl2);
    r = get_as(t2, "/api/v1/datasets/users", rid);
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    CHECK_INT_EQ(status_of(t2, "/api/v1/datasets/daily_metrics?user_id=1"), 200); /* no @roles */
    /* identity: the sub is the actor of the audit log and the owner of the row */
    char *pw = claims("u-writer-7", "\"writer\"", NULL);
    char *tw = hs(pw);
    char *auth = tp_xasprintf("Authorization: Bearer %s", tw);
    const char *h[] = {auth, "Content-Type: application/json", "Idempotency-Key: jwt-note-1",
                       NULL};
    static const char note[] = "{\"user_id\": 7, \"note\": \"written with a JWT\"}";
    long st = 0;
    for (int i = 0; i < 100 && st != 201; i++) { /* writable tables are reflected shortly */
        r = http(&S, "POST", "/api/v1/tables/app.user_notes", h, note, strlen(note));
        st = r.status;
        if (st == 201)
            CHECK_STR_EQ(json_string_value(json_object_get(r.json, "author")), "u-writer-7");
        resp_free(&r);
        if (st != 201)
            usleep(100000);
    }
    CHECK_INT_EQ(st, 201);
    char *actor = tp_test_sql(DSN, "SELECT string_agg(DISTINCT actor, ',') FROM tidepool.audit_log"
                                   " WHERE table_name = 'app.user_notes'");
    CHECK_STR_EQ(actor, "u-writer-7");
    free(actor);
    /* the owner column scopes the read to the caller */
    r = get_as(tw, "/api/v1/tables/app.user_notes", rid);
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 1);
    resp_free(&r);
    r = get_as(t, "/api/v1/tables/app.user_notes", rid); /* alice: reader, none of hers */
    CHECK_STR_EQ(r.body, "[]");
    resp_free(&r);
    free(auth);
    free(tw);
    free(pw);
    free(t2);
    free(pl2);
    free(t);
    free(pl);
}

static void rs256_by_kid_from_jwks(void)
{
    char *pl = claims("u-rsa", "\"reader\"", NULL);
    char *t = rs(KID, g_rsa, pl);
    CHECK_INT_EQ(status_of(t, "/api/v1/datasets/users"), 200);
    char *unknown = rs("k-not-published", g_rsa, pl);
    REFUSED(unknown, "unknown_kid");
    char *other = rs(KID, g_other, pl); /* right kid, another key */
    REFUSED(other, "bad_signature");
    /* alg confusion: HS256 keyed with the published RSA public key */
    char *pem = pem_of(g_rsa);
    char *conf = sign_with("{\"alg\":\"HS256\",\"kid\":\"" KID "\"}", pl, NULL, pem, strlen(pem));
    REFUSED(conf, "bad_signature");
    free(conf);
    free(pem);
    free(other);
    free(unknown);
    free(t);
    free(pl);
}

static void alg_none_refused(void)
{
    char *pl = claims("u-mallory", "\"admin\"", NULL);
    char *t = sign_with("{\"alg\":\"none\",\"typ\":\"JWT\"}", pl, NULL, NULL, 0);
    CHECK(t[strlen(t) - 1] == '.'); /* an empty signature */
    REFUSED(t, "bad_alg");
    char *t2 = sign_with("{\"alg\":\"None\"}", pl, NULL, HS_SECRET, strlen(HS_SECRET));
    REFUSED(t2, "bad_alg");
    char *t3 = sign_with("{\"alg\":\"HS512\"}", pl, NULL, HS_SECRET, strlen(HS_SECRET));
    REFUSED(t3, "bad_alg");
    free(t3);
    free(t2);
    free(t);
    free(pl);
}

static void time_claims_with_bounded_skew(void)
{
    char extra[96];
    /* expired an hour ago: refused; 30 s ago, inside the 60 s skew: accepted */
    char *pl = tp_xasprintf("{\"sub\":\"u-late\",\"aud\":\"" AUD "\",\"iss\":\"" ISS
                            "\",\"exp\":%lld,\"app\":{\"roles\":[\"reader\"]}}",
                            (long long)(g_now - 3600));
    char *t = hs(pl);
    REFUSED(t, "expired");
    free(t);
    free(pl);
    pl = tp_xasprintf("{\"sub\":\"u-late\",\"aud\":\"" AUD "\",\"iss\":\"" ISS
                      "\",\"exp\":%lld,\"app\":{\"roles\":[\"reader\"]}}",
                      (long long)(time(NULL) - 30));
    t = hs(pl);
    CHECK_INT_EQ(status_of(t, "/api/v1/datasets/users"), 200);
    free(t);
    free(pl);
    /* no exp at all: refused (tokens must expire) */
    pl = tp_xstrdup("{\"sub\":\"u-forever\",\"aud\":\"" AUD "\",\"iss\":\"" ISS
                    "\",\"app\":{\"roles\":[\"reader\"]}}");
    t = hs(pl);
    REFUSED(t, "expired");
    free(t);
    free(pl);
    /* nbf ten minutes ahead: refused; 30 s ahead: accepted */
    snprintf(extra, sizeof extra, "\"nbf\":%lld", (long long)(g_now + 600));
    pl = claims("u-early", "\"reader\"", extra);
    t = hs(pl);
    REFUSED(t, "not_yet_valid");
    free(t);
    free(pl);
    snprintf(extra, sizeof extra, "\"nbf\":%lld", (long long)(time(NULL) + 30));
    pl = claims("u-early", "\"reader\"", extra);
    t = hs(pl);
    CHECK_INT_EQ(status_of(t, "/api/v1/datasets/users"), 200);
    free(t);
    free(pl);
}

static void wrongly_signed(void)
{
    char *pl = claims("u-alice", "\"reader\"", NULL);
    static const char other_secret[] = "another-secret-of-enough-length-0123456789";
    char *t = sign_with("{\"alg\":\"HS256\"}", pl, NULL, other_secret, strlen(other_secret));
    REFUSED(t, "bad_signature");
    /* a good token whose payload is swapped for one with more roles */
    char *good = hs(pl);
    char *pl_admin = claims("u-alice", "\"admin\"", NULL);
    char *b = b64(pl_admin);
    char *dot1 = strchr(good, '.'), *dot2 = strrchr(good, '.');
    char *tampered = tp_xasprintf("%.*s.%s%s", (int)(dot1 - good), good, b, dot2);
    REFUSED(tampered, "bad_signature");
    /* the signature of one token on another */
    char *t2 = hs(pl_admin);
    char *swapped = tp_xasprintf("%.*s%s", (int)(strrchr(t2, '.') - t2), t2, dot2);
    REFUSED(swapped, "bad_signature");
    free(swapped);
    free(t2);
    free(tampered);
    free(b);
    free(pl_admin);
    free(good);
    free(t);
    free(pl);
}

static void audience_and_issuer(void)
{
    char *pl = tp_xasprintf("{\"sub\":\"u-a\",\"aud\":\"some-other-api\",\"iss\":\"" ISS
                            "\",\"exp\":%lld,\"app\":{\"roles\":[\"reader\"]}}",
                            (long long)(g_now + 600));
    char *t = hs(pl);
    REFUSED(t, "bad_audience");
    free(t);
    free(pl);
    pl = tp_xasprintf("{\"sub\":\"u-a\",\"iss\":\"" ISS
                      "\",\"exp\":%lld,\"app\":{\"roles\":[\"reader\"]}}",
                      (long long)(g_now + 600));
    t = hs(pl);
    REFUSED(t, "bad_audience"); /* no aud at all */
    free(t);
    free(pl);
    pl = tp_xasprintf("{\"sub\":\"u-a\",\"aud\":\"" AUD "\",\"iss\":\"https://evil.example/\","
                      "\"exp\":%lld,\"app\":{\"roles\":[\"reader\"]}}",
                      (long long)(g_now + 600));
    t = hs(pl);
    REFUSED(t, "bad_issuer");
    free(t);
    free(pl);
}

static void malformed_and_oversized(void)
{
    REFUSED("not-a-jwt", "malformed");
    REFUSED("a.b", "malformed");
    REFUSED("e30.e30.", "malformed"); /* {} header: no alg */
    REFUSED("eyJhbGciOiJIUzI1NiJ9=.e30.AAAA", "malformed"); /* padding is not base64url */
    /* correctly signed, but the payload is padded base64 / not JSON / not an object */
    static const char *const payloads[] = {"e30=", "bm90IGpzb24", "WzFd"};
    for (size_t i = 0; i < TP_ARRAY_LEN(payloads); i++) {
        char *in = tp_xasprintf("eyJhbGciOiJIUzI1NiJ9.%s", payloads[i]);
        char *t = hs_raw(in);
        REFUSED(t, "payload is not base64url JSON object");
        free(t);
        free(in);
    }
    /* a duplicate key in the header */
    char *dup = sign_with("{\"alg\":\"none\",\"alg\":\"HS256\"}", "{}", NULL, HS_SECRET,
                          strlen(HS_SECRET));
    REFUSED(dup, "malformed");
    free(dup);
    /* a validly signed token over the 8 KiB limit (lib/auth.c, TP_JWT_MAX_LEN),
     * within this server's 16k header limit: refused before any parsing */
    char *pad = tp_xmalloc(TP_JWT_MAX_LEN);
    memset(pad, 'x', TP_JWT_MAX_LEN - 1);
    pad[TP_JWT_MAX_LEN - 1] = '\0';
    char *extra = tp_xasprintf("\"pad\":\"%s\"", pad);
    char *pl = claims("u-big", "\"reader\"", extra);
    char *big = hs(pl);
    CHECK(strlen(big) > TP_JWT_MAX_LEN && strlen(big) < 15000);
    REFUSED(big, "longer than 8 KiB");
    free(big);
    free(pl);
    free(extra);
    free(pad);
    /* missing credentials: 401 missing-credentials with a Bearer challenge */
    char rid[40];
    resp_t r = get_as(NULL, "/api/v1/datasets/users", rid);
    CHECK_PROBLEM(r, 401, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "missing-credentials");
    CHECK(hdr(&r, "WWW-Authenticate") && strncmp(hdr(&r, "WWW-Authenticate"), "Bearer", 6) == 0);
    resp_free(&r);
    /* another scheme */
    const char *basic[] = {"Authorization: Basic dTpw", NULL};
    r = http(&S, "GET", "/api/v1/datasets/users", basic, NULL, 0);
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
}

static void valid_token_lacking_role(void)
{
    char *pl = claims("u-reader", "\"reader\",\"not a role!\"", NULL);
    char *t = hs(pl);
    char rid[40];
    resp_t r = get_as(t, "/api/v1/datasets/admin_only", rid);
    CHECK_PROBLEM(r, 403, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "forbidden");
    CHECK(strstr(r.body, "lacks") == NULL && strstr(r.body, "u-reader") == NULL);
    resp_free(&r);
    json_t *l = log_line(rid, "authorization refused");
    CHECK_CONTAINS(json_string_value(json_object_get(l, "reason")), "u-reader lacks any of roles");
    json_decref(l);
    /* /metrics and running a sync need admin too; the admin may */
    CHECK_INT_EQ(status_of(t, "/metrics"), 403);
    char *pa = claims("u-boss", "\"admin\"", NULL);
    char *ta = hs(pa);
    CHECK_INT_EQ(status_of(ta, "/api/v1/datasets/admin_only"), 200);
    CHECK_INT_EQ(status_of(ta, "/metrics"), 200);
    free(ta);
    free(pa);
    free(t);
    free(pl);
}

/* Nothing of any token in the server's log. */
static void no_token_in_log(void)
{
    char *log = tp_read_file(S.log, NULL);
    CHECK(log != NULL);
    CHECK(log && strstr(log, HS_SECRET) == NULL);
    CHECK(log && strstr(log, "eyJ") == NULL); /* no base64url JSON header */
    CHECK(log && strstr(log, "eHh4eHh4eHh4") == NULL); /* the oversized token's padding */
    free(log);
}

/* --check refuses mode jwt without jwt_audience or jwt_issuer: FILE:LINE, exit 2. */
static void check_requires_audience_and_issuer(void)
{
    static const char *const missing[][2] = {
        {"jwt_issuer = " ISS "\n", "needs auth.jwt_audience"},
        {"jwt_audience = " AUD "\n", "needs auth.jwt_issuer"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(missing); i++) {
        char *text = tp_xasprintf("[server]\ndefinitions = %s\n[auth]\nmode = jwt\n"
                                  "jwt_secret = " HS_SECRET "\n%s",
                                  S.qdir, missing[i][0]);
        char *path = tp_test_write_tmp("jwt-noaud.conf", text);
        char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin("tidepool-server"), path);
        char *out = NULL;
        CHECK_INT_EQ(tp_test_cmd(cmd, &out), 2);
        char *want = tp_xasprintf("%s:4: auth.mode = jwt %s", path, missing[i][1]);
        CHECK_CONTAINS(out, want);
        CHECK(out && strstr(out, HS_SECRET) == NULL);
        free(want);
        free(out);
        free(cmd);
        free(path);
        free(text);
    }
}

int main(void)
{
    g_now = (int64_t)time(NULL);
    g_rsa = EVP_RSA_gen(2048);
    g_other = EVP_RSA_gen(2048);
    if (!g_rsa || !g_other) {
        tp_test_fail(__FILE__, __LINE__, "RSA key generation failed");
        return tp_test_done();
    }
    char *jwks = write_jwks(g_rsa);
    char conf[2048];
    snprintf(conf, sizeof conf,
             "[auth]\nmode = jwt\njwt_secret = " HS_SECRET "\njwt_jwks_file = %s\n"
             "jwt_audience = " AUD "\njwt_issuer = " ISS "\njwt_clock_skew = 60s\n"
             "jwt_roles_claim = app.roles\n"
             "rate_per_identity = 100000\nburst_per_identity = 100000\n"
             "rate_per_address = 100000\nburst_per_address = 100000\n",
             jwks);
    S.extra_conf = conf;
    S.max_header_bytes = "16k"; /* room for a token over the 8 KiB bearer limit */
    snprintf(S.qdir, sizeof S.qdir, "%s/queries", tp_test_tmpdir());
    mkdir(S.qdir, 0755);
    harness_def(&S, "admin_only.sql", "-- @roles admin\nSELECT 42 AS answer\n");
    if (harness_setup(&S, "test_server_jwt", &DSN, 1)) { /* else reported */
        TP_RUN(good_hs256_identity_and_roles);
        TP_RUN(rs256_by_kid_from_jwks);
        TP_RUN(alg_none_refused);
        TP_RUN(time_claims_with_bounded_skew);
        TP_RUN(wrongly_signed);
        TP_RUN(audience_and_issuer);
        TP_RUN(malformed_and_oversized);
        TP_RUN(valid_token_lacking_role);
        TP_RUN(no_token_in_log);
        TP_RUN(check_requires_audience_and_issuer);
    }
    harness_finish(&S);
    EVP_PKEY_free(g_rsa);
    EVP_PKEY_free(g_other);
    free(jwks);
    return tp_test_done();
}
