/* Unit tests for lib/jwt.c and auth mode jwt: strict base64url, HS256 and
 * RS256 (JWKS with kid, PEM) with keys generated at run time, and every bad
 * token: missing, malformed (segments, base64url, JSON), expired, not yet
 * valid, wrong audience/issuer, wrong secret, another RSA key, alg none, alg
 * confusion, unknown kid, oversized, crit; roles and groups from claims; no
 * token or secret text in any refusal. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "../jwt_tokens.h"
#include "../tp_test.h"
#include "tidepool/auth.h"
#include "tidepool/config.h"
#include "tidepool/jwt.h"

#define HS_SECRET "hs256-test-secret-0123456789abcdefghijkl"
#define AUD "tidepool-api"
#define ISS "https://idp.example.com/"
#define AUD_ISS "jwt_audience = " AUD "\njwt_issuer = " ISS "\n"

static EVP_PKEY *g_key1, *g_key2, *g_other; /* key1/key2 in the JWKS; other is not */
static char *g_pem1;                        /* public PEM of key1 */
static int64_t g_now;

/* ---- token building (the test signs its own tokens) ---- */

static char *claims(const char *extra)
{
    return tp_xasprintf("{\"sub\":\"u-123\",\"email\":\"alice@example.com\",\"aud\":\"" AUD
                        "\",\"iss\":\"" ISS "\",\"exp\":%lld,\"iat\":%lld%s%s}",
                        (long long)(g_now + 600), (long long)g_now, extra ? "," : "",
                        extra ? extra : "");
}

static char *hs_token(const char *payload)
{
    return sign_with("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", payload, NULL, HS_SECRET,
                     strlen(HS_SECRET));
}

static char *rs_token(const char *kid, EVP_PKEY *key, const char *payload)
{
    char *h = kid ? tp_xasprintf("{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", kid)
                  : tp_xstrdup("{\"alg\":\"RS256\",\"typ\":\"JWT\"}");
    char *t = sign_with(h, payload, key, NULL, 0);
    free(h);
    return t;
}

/* ---- keys ---- */

/* ---- auth verifiers from config ---- */

static tp_auth_t *auth_from(const char *conf_text, char *err, size_t errlen)
{
    char *path = tp_test_write_tmp("jwt.conf", conf_text);
    tp_config_t c = {0};
    tp_auth_t *a = NULL;
    if (tp_config_load(&c, path, err, errlen))
        a = tp_auth_new(&c, err, errlen);
    tp_config_free(&c);
    free(path);
    return a;
}

/* jwt mode with the HS256 secret and the JWKS holding key1 ("k1") and key2 ("k2"). */
static tp_auth_t *full_auth(const char *extra_conf)
{
    char *j1 = jwk(g_key1, "k1"), *j2 = jwk(g_key2, "k2");
    /* an EC key in the set is skipped, not an error */
    char *jwks = tp_xasprintf("{\"keys\":[%s,{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"ec\"},%s]}",
                              j1, j2);
    char *jpath = tp_test_write_tmp("jwks.json", jwks);
    char *conf = tp_xasprintf("[auth]\nmode = jwt\njwt_secret = " HS_SECRET "\n"
                              "jwt_jwks_file = %s\njwt_audience = " AUD "\njwt_issuer = " ISS
                              "\n%s",
                              jpath, extra_conf ? extra_conf : "");
    char err[512] = "";
    tp_auth_t *a = auth_from(conf, err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    free(j1);
    free(j2);
    free(jwks);
    free(jpath);
    free(conf);
    return a;
}

static tp_jwt_err_t verify(tp_jwt_keys_t *k, const char *tok)
{
    tp_jwt_opts_t o = {.audience = AUD, .issuer = ISS, .skew_s = 60, .now_s = g_now};
    json_t *cl = NULL;
    char why[256];
    tp_jwt_err_t e = tp_jwt_verify(k, tok, &o, &cl, why, sizeof why);
    if ((e == TP_JWT_OK) != (cl != NULL))
        tp_test_fail(__FILE__, __LINE__, "claims %p with result %s", (void *)cl,
                     tp_jwt_err_name(e));
    json_decref(cl);
    return e;
}

/* Runs tok through tp_auth_check; expects a refusal whose reason names want
 * and that quotes neither the token, its signature, nor the secret. */
static void expect_refused_at(const char *file, int line, tp_auth_t *a, const char *tok,
                              const char *want)
{
    tp_auth_request_t r = {.peer = "203.0.113.9", .now_s = g_now};
    char *hdr = tok ? tp_xasprintf("Bearer %s", tok) : NULL;
    if (hdr)
        tp_auth_request_header(&r, "authorization", hdr);
    tp_auth_result_t res;
    if (tp_auth_check(a, &r, &res)) {
        tp_test_fail(file, line, "accepted a bad token (want %s)", want);
        tp_auth_result_clear(&res);
        free(hdr);
        return;
    }
    if (res.status != 401)
        tp_test_fail(file, line, "status %d", res.status);
    if (strstr(res.reason, want) == NULL)
        tp_test_fail(file, line, "reason \"%s\" lacks \"%s\"", res.reason, want);
    if (res.message == NULL || res.code == NULL || res.www_authenticate == NULL)
        tp_test_fail(file, line, "refusal without message/code/WWW-Authenticate");
    if (strstr(res.reason, HS_SECRET) || strstr(res.message, HS_SECRET))
        tp_test_fail(file, line, "secret in refusal");
    if (tok != NULL && strlen(tok) >= 12) {
        const char *sig = strrchr(tok, '.');
        char head[13];
        memcpy(head, tok, 12);
        head[12] = '\0';
        if (strstr(res.reason, head) || strstr(res.message, head) ||
            (sig && strlen(sig) > 8 && strstr(res.reason, sig + 1)))
            tp_test_fail(file, line, "token text in refusal: %s", res.reason);
    }
    /* the client message never says which check failed */
    if (strstr(res.message, "expired") || strstr(res.message, "signature") ||
        strstr(res.message, "audience"))
        tp_test_fail(file, line, "client message too revealing: %s", res.message);
    tp_auth_result_clear(&res);
    free(hdr);
}
#define EXPECT_REFUSED(a, tok, want) expect_refused_at(__FILE__, __LINE__, a, tok, want)

static tp_principal_t *expect_accepted_at(const char *file, int line, tp_auth_t *a,
                                          const char *tok)
{
    tp_auth_request_t r = {.peer = "203.0.113.9", .now_s = g_now};
    char *hdr = tp_xasprintf("Bearer %s", tok);
    tp_auth_request_header(&r, "Authorization", hdr);
    tp_auth_result_t res;
    tp_principal_t *p = NULL;
    if (!tp_auth_check(a, &r, &res))
        tp_test_fail(file, line, "refused: %s", res.reason);
    else
        p = res.principal;
    free(hdr);
    return p;
}
#define EXPECT_ACCEPTED(a, tok) expect_accepted_at(__FILE__, __LINE__, a, tok)

/* ---- cases ---- */

static void base64url_is_strict(void)
{
    static const char *const good[] = {"", "Zg", "Zm8", "Zm9v", "-_8"};
    static const char *const bad[] = {"Z", "Zh", "Zm9=", "Zm9v=", "Zm+v", "Zm/v", "Zm v", "Z\n8"};
    for (size_t i = 0; i < TP_ARRAY_LEN(good); i++) {
        size_t n;
        unsigned char *d = tp_b64url_decode(good[i], strlen(good[i]), &n);
        CHECK_MSG(d != NULL, "refused \"%s\"", good[i]);
        if (d) {
            char *back = tp_b64url_encode(d, n);
            CHECK_STR_EQ(back, good[i]);
            free(back);
        }
        free(d);
    }
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        size_t n;
        unsigned char *d = tp_b64url_decode(bad[i], strlen(bad[i]), &n);
        CHECK_MSG(d == NULL, "accepted \"%s\"", bad[i]);
        free(d);
    }
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    for (size_t len = 0; len <= 256; len += 37) {
        char *e = tp_b64url_encode(all, len);
        size_t n = 0;
        unsigned char *d = tp_b64url_decode(e, strlen(e), &n);
        CHECK(d != NULL && n == len && memcmp(d, all, len) == 0);
        free(d);
        free(e);
    }
}

static void hs256_and_rs256_verify(void)
{
    tp_auth_t *a = full_auth("jwt_roles_claim = realm_access.roles\n");
    char *pl = claims("\"preferred_username\":\"alice\",\"realm_access\":{\"roles\":[\"writer\","
                      "\"bad role!\"]},\"groups\":[\"analysts\"]");
    char *t1 = hs_token(pl), *t2 = rs_token("k1", g_key1, pl), *t3 = rs_token("k2", g_key2, pl);
    char *toks[] = {t1, t2, t3};
    for (int i = 0; i < 3; i++) {
        tp_principal_t *p = EXPECT_ACCEPTED(a, toks[i]);
        if (p == NULL)
            continue;
        CHECK_STR_EQ(p->id, "u-123");
        CHECK_STR_EQ(p->email, "alice@example.com");
        CHECK_STR_EQ(p->name, "alice");
        CHECK_INT_EQ(tp_auth_strv_len((const char *const *)p->roles), 1); /* "bad role!" skipped */
        CHECK_STR_EQ(p->roles[0], "writer");
        CHECK_STR_EQ(p->groups[0], "analysts");
        CHECK_INT_EQ(strlen(p->credential_id), 16);
        CHECK(p->mode == TP_AUTH_MODE_JWT && p->access_token == NULL);
        tp_principal_free(p);
    }
    free(t1);
    free(t2);
    free(t3);
    free(pl);
    tp_auth_free(a);
}

static void pem_key_verifies_any_kid(void)
{
    char *pem = tp_test_write_tmp("pub.pem", g_pem1);
    char *conf = tp_xasprintf("[auth]\nmode = jwt\njwt_public_key_file = %s\n" AUD_ISS, pem);
    char err[512] = "";
    tp_auth_t *a = auth_from(conf, err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    char *pl = claims(NULL);
    char *t1 = rs_token(NULL, g_key1, pl), *t2 = rs_token("whatever", g_key1, pl);
    char *t3 = rs_token(NULL, g_key2, pl), *t4 = hs_token(pl);
    tp_principal_free(EXPECT_ACCEPTED(a, t1));
    tp_principal_free(EXPECT_ACCEPTED(a, t2));
    EXPECT_REFUSED(a, t3, "bad_signature");
    EXPECT_REFUSED(a, t4, "bad_alg"); /* no HS256 secret configured */
    free(t1);
    free(t2);
    free(t3);
    free(t4);
    free(pl);
    free(conf);
    free(pem);
    tp_auth_free(a);
}

static void bad_tokens_are_refused(void)
{
    tp_auth_t *a = full_auth(NULL);
    char *pl = claims(NULL);
    char *good = hs_token(pl);
    /* structure */
    EXPECT_REFUSED(a, NULL, "no Authorization header");
    EXPECT_REFUSED(a, "abc.def", "malformed");
    char *four = tp_xasprintf("%s.x", good);
    EXPECT_REFUSED(a, four, "malformed");
    char *badb64 = tp_xstrdup(good);
    badb64[3] = '*'; /* '*' is outside base64url (and token68): refused before decoding */
    EXPECT_REFUSED(a, badb64, "token68");
    char *hdr_pad = tp_xstrdup(good);
    hdr_pad[0] = 'A'; /* still base64url, but no longer a JSON header */
    EXPECT_REFUSED(a, hdr_pad, "malformed");
    char *nojson = sign_with("{\"alg\":\"HS256\"", pl, NULL, HS_SECRET, strlen(HS_SECRET));
    EXPECT_REFUSED(a, nojson, "header is not base64url JSON");
    char *badpl = sign_with("{\"alg\":\"HS256\"}", "{\"sub\":", NULL, HS_SECRET, strlen(HS_SECRET));
    EXPECT_REFUSED(a, badpl, "payload is not base64url JSON");
    char *arraypl = sign_with("{\"alg\":\"HS256\"}", "[1,2]", NULL, HS_SECRET, strlen(HS_SECRET));
    EXPECT_REFUSED(a, arraypl, "malformed");
    char *dupkey = sign_with("{\"alg\":\"HS256\",\"alg\":\"none\"}", pl, NULL, HS_SECRET,
                             strlen(HS_SECRET));
    EXPECT_REFUSED(a, dupkey, "malformed");
    char *sigbad = tp_xasprintf("%.*s!!", (int)(strrchr(good, '.') - good + 1), good);
    EXPECT_REFUSED(a, sigbad, "token68");
    char *sigpad = tp_xasprintf("%s=", good);
    EXPECT_REFUSED(a, sigpad, "signature is not base64url");
    /* time */
    char *pexp = tp_xasprintf("{\"sub\":\"u\",\"aud\":\"" AUD "\",\"iss\":\"" ISS "\",\"exp\":%lld}",
                              (long long)(g_now - 61));
    char *texp = hs_token(pexp);
    EXPECT_REFUSED(a, texp, "expired");
    char *pskew = tp_xasprintf("{\"sub\":\"u\",\"aud\":\"" AUD "\",\"iss\":\"" ISS "\",\"exp\":%lld}",
                               (long long)(g_now - 59));
    char *tskew = hs_token(pskew);
    tp_principal_free(EXPECT_ACCEPTED(a, tskew)); /* within the 60 s skew */
    char *pnoexp = tp_xstrdup("{\"sub\":\"u\",\"aud\":\"" AUD "\",\"iss\":\"" ISS "\"}");
    char *tnoexp = hs_token(pnoexp);
    EXPECT_REFUSED(a, tnoexp, "no exp claim");
    char *pexps = tp_xstrdup("{\"sub\":\"u\",\"aud\":\"" AUD "\",\"iss\":\"" ISS "\",\"exp\":\"soon\"}");
    char *texps = hs_token(pexps);
    EXPECT_REFUSED(a, texps, "malformed");
    char *nbfx = tp_xasprintf("\"nbf\":%lld", (long long)(g_now + 61));
    char *pnbf = claims(nbfx);
    char *tnbf = hs_token(pnbf);
    EXPECT_REFUSED(a, tnbf, "not_yet_valid");
    /* audience and issuer */
    char *paud = tp_xasprintf("{\"sub\":\"u\",\"aud\":\"other\",\"iss\":\"" ISS "\",\"exp\":%lld}",
                              (long long)(g_now + 60));
    char *taud = hs_token(paud);
    EXPECT_REFUSED(a, taud, "bad_audience");
    char *paud2 = tp_xasprintf("{\"sub\":\"u\",\"aud\":[\"x\",\"" AUD "\"],\"iss\":\"" ISS
                               "\",\"exp\":%lld}", (long long)(g_now + 60));
    char *taud2 = hs_token(paud2);
    tp_principal_free(EXPECT_ACCEPTED(a, taud2));
    char *pnoaud = tp_xasprintf("{\"sub\":\"u\",\"iss\":\"" ISS "\",\"exp\":%lld}",
                                (long long)(g_now + 60));
    char *tnoaud = hs_token(pnoaud);
    EXPECT_REFUSED(a, tnoaud, "bad_audience");
    char *piss = tp_xasprintf("{\"sub\":\"u\",\"aud\":\"" AUD "\",\"iss\":\"https://evil/\","
                              "\"exp\":%lld}", (long long)(g_now + 60));
    char *tiss = hs_token(piss);
    EXPECT_REFUSED(a, tiss, "bad_issuer");
    char *pnosub = tp_xasprintf("{\"aud\":\"" AUD "\",\"iss\":\"" ISS "\",\"exp\":%lld}",
                                (long long)(g_now + 60));
    char *tnosub = hs_token(pnosub);
    EXPECT_REFUSED(a, tnosub, "no usable sub");
    /* signatures */
    static const char wrong[] = "another-secret-0123456789abcdefghijklmn";
    char *twrong = sign_with("{\"alg\":\"HS256\"}", pl, NULL, wrong, strlen(wrong));
    EXPECT_REFUSED(a, twrong, "bad_signature");
    char *tother = rs_token("k1", g_other, pl);
    EXPECT_REFUSED(a, tother, "bad_signature");
    char *tswap = rs_token("k2", g_key1, pl); /* a real key, the wrong kid */
    EXPECT_REFUSED(a, tswap, "bad_signature");
    char *tkid = rs_token("k9", g_key1, pl);
    EXPECT_REFUSED(a, tkid, "unknown_kid");
    char *tnokid = rs_token(NULL, g_key1, pl); /* two keys: a kid is needed */
    EXPECT_REFUSED(a, tnokid, "unknown_kid");
    /* algorithms */
    char *tnone = sign_with("{\"alg\":\"none\",\"typ\":\"JWT\"}", pl, NULL, NULL, 0);
    EXPECT_REFUSED(a, tnone, "bad_alg");
    char *tNone = sign_with("{\"alg\":\"None\"}", pl, NULL, HS_SECRET, strlen(HS_SECRET));
    EXPECT_REFUSED(a, tNone, "bad_alg");
    char *tHS512 = sign_with("{\"alg\":\"HS512\"}", pl, NULL, HS_SECRET, strlen(HS_SECRET));
    EXPECT_REFUSED(a, tHS512, "bad_alg");
    char *tcrit = sign_with("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", pl, NULL, HS_SECRET,
                            strlen(HS_SECRET));
    EXPECT_REFUSED(a, tcrit, "crit");
    /* the key confusion attack: HS256 "signed" with the RSA public key as the
     * HMAC secret. Here the secret is configured too, so it fails the HMAC. */
    char *tconf = sign_with("{\"alg\":\"HS256\",\"kid\":\"k1\"}", pl, NULL, g_pem1, strlen(g_pem1));
    EXPECT_REFUSED(a, tconf, "bad_signature");
    /* size */
    char *bigpl = tp_xasprintf("{\"sub\":\"u\",\"pad\":\"%09000d\",\"exp\":%lld}", 0,
                               (long long)(g_now + 60));
    char *tbig = hs_token(bigpl);
    EXPECT_REFUSED(a, tbig, "longer than 8 KiB");
    tp_jwt_keys_t *k = tp_jwt_keys_new();
    char err[128];
    CHECK(tp_jwt_keys_set_hmac(k, HS_SECRET, strlen(HS_SECRET), err, sizeof err));
    CHECK_INT_EQ(verify(k, tbig), TP_JWT_OVERSIZED);
    CHECK_INT_EQ(verify(k, good), TP_JWT_OK);
    CHECK_INT_EQ(verify(k, texp), TP_JWT_EXPIRED);
    CHECK_INT_EQ(verify(k, tnone), TP_JWT_BAD_ALG);
    CHECK_INT_EQ(verify(k, four), TP_JWT_MALFORMED);
    tp_jwt_keys_free(k);

    char *all[] = {pl, good, four, badb64, hdr_pad, nojson, badpl, arraypl, dupkey, sigbad,
                   sigpad, pexp, texp, pskew, tskew, pnoexp, tnoexp, pexps, texps, nbfx, pnbf,
                   tnbf, paud, taud, paud2, taud2, pnoaud, tnoaud, piss, tiss, pnosub, tnosub,
                   twrong, tother, tswap, tkid, tnokid, tnone, tNone, tHS512, tcrit, tconf,
                   bigpl, tbig};
    for (size_t i = 0; i < TP_ARRAY_LEN(all); i++)
        free(all[i]);
    tp_auth_free(a);
}

/* An RSA-only verifier must not accept HS256 tokens keyed with the public key. */
static void alg_confusion_with_rsa_only(void)
{
    char *j1 = jwk(g_key1, "k1");
    char *jwks = tp_xasprintf("{\"keys\":[%s]}", j1);
    char *jpath = tp_test_write_tmp("jwks1.json", jwks);
    char *conf = tp_xasprintf("[auth]\nmode = jwt\njwt_jwks_file = %s\n" AUD_ISS, jpath);
    char err[512] = "";
    tp_auth_t *a = auth_from(conf, err, sizeof err);
    CHECK_MSG(a != NULL, "%s", err);
    char *pl = claims(NULL);
    char *tconf = sign_with("{\"alg\":\"HS256\",\"kid\":\"k1\"}", pl, NULL, g_pem1, strlen(g_pem1));
    EXPECT_REFUSED(a, tconf, "bad_alg");
    /* with one key, a token without kid uses it */
    char *tnokid = rs_token(NULL, g_key1, pl);
    tp_principal_free(EXPECT_ACCEPTED(a, tnokid));
    free(tnokid);
    free(tconf);
    free(pl);
    free(conf);
    free(jpath);
    free(jwks);
    free(j1);
    tp_auth_free(a);
}

static void duplicate_authorization_is_refused(void)
{
    tp_auth_t *a = full_auth(NULL);
    char *pl = claims(NULL);
    char *tok = hs_token(pl);
    char *hdr = tp_xasprintf("Bearer %s", tok);
    tp_auth_request_t r = {.peer = "127.0.0.1", .now_s = g_now};
    tp_auth_request_header(&r, "Authorization", hdr);
    tp_auth_result_t res;
    CHECK(tp_auth_check(a, &r, &res));
    tp_auth_result_clear(&res);
    tp_auth_request_header(&r, "AUTHORIZATION", hdr);
    CHECK(!tp_auth_check(a, &r, &res));
    CHECK_INT_EQ(res.status, 401);
    CHECK_CONTAINS(res.reason, "Authorization appears 2 times");
    CHECK_STR_EQ(res.code, TP_AUTH_CODE_INVALID);
    /* other schemes and junk */
    static const char *const junk[] = {"Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "bearer  ",
                                       "Bearer a b", "Token abc"};
    for (size_t i = 0; i < TP_ARRAY_LEN(junk); i++) {
        tp_auth_request_t r2 = {.peer = "127.0.0.1", .now_s = g_now};
        tp_auth_request_header(&r2, "Authorization", junk[i]);
        CHECK_MSG(!tp_auth_check(a, &r2, &res), "accepted \"%s\"", junk[i]);
        CHECK_INT_EQ(res.status, 401);
        tp_auth_result_clear(&res);
    }
    free(hdr);
    free(tok);
    free(pl);
    tp_auth_free(a);
}

static void key_configuration_errors(void)
{
    char err[512];
    tp_jwt_keys_t *k = tp_jwt_keys_new();
    CHECK(!tp_jwt_keys_set_hmac(k, "short", 5, err, sizeof err));
    CHECK_CONTAINS(err, "at least 32");
    CHECK(strstr(err, "short") == NULL);
    CHECK(!tp_jwt_keys_add_jwks(k, "{", err, sizeof err));
    CHECK_CONTAINS(err, "not valid JSON");
    CHECK(!tp_jwt_keys_add_jwks(k, "{\"keys\":{}}", err, sizeof err));
    CHECK_CONTAINS(err, "no \"keys\" array");
    CHECK(!tp_jwt_keys_add_jwks(k, "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"AQAB\",\"e\":\"AQAB\"}]}",
                                err, sizeof err));
    CHECK_CONTAINS(err, "JWKS key 0: RSA key of 17 bits");
    CHECK(!tp_jwt_keys_add_jwks(k, "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"A=\",\"e\":\"AQAB\"}]}",
                                err, sizeof err));
    CHECK_CONTAINS(err, "not a valid base64url");
    char *n = bn_b64(g_key1, OSSL_PKEY_PARAM_RSA_N);
    static const char *const bad_e[] = {"AQ", "Ag", "AAE", ""}; /* 1, 2, leading zero 1, empty */
    for (size_t i = 0; i < TP_ARRAY_LEN(bad_e); i++) {
        char *jw = tp_xasprintf("{\"keys\":[{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\"}]}", n,
                                bad_e[i]);
        CHECK_MSG(!tp_jwt_keys_add_jwks(k, jw, err, sizeof err), "e=%s accepted", bad_e[i]);
        CHECK_CONTAINS(err, "not a valid base64url RSA value");
        free(jw);
    }
    free(n);
    CHECK(!tp_jwt_keys_add_jwks(k, "{\"keys\":[{\"kty\":\"EC\"}]}", err, sizeof err));
    CHECK_CONTAINS(err, "no RSA signing key");
    CHECK(!tp_jwt_keys_add_pem(k, "-----BEGIN PUBLIC KEY-----\nxx\n", err, sizeof err));
    CHECK_CONTAINS(err, "not a PEM public key");
    CHECK_INT_EQ(tp_jwt_keys_rsa_count(k), 0);
    tp_jwt_keys_free(k);
    /* through the config: each error names the setting */
    tp_auth_t *a = auth_from("[auth]\nmode = jwt\n" AUD_ISS, err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "auth.mode: jwt mode needs auth.jwt_secret");
    /* aud and iss are always checked: the config names the missing one */
    a = auth_from("[auth]\nmode = jwt\njwt_secret = " HS_SECRET "\njwt_issuer = " ISS "\n", err,
                  sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "jwt.conf:2: auth.mode = jwt needs auth.jwt_audience");
    a = auth_from("[auth]\nmode = jwt\njwt_secret = " HS_SECRET "\njwt_audience = " AUD "\n", err,
                  sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "jwt.conf:2: auth.mode = jwt needs auth.jwt_issuer");
    CHECK(strstr(err, HS_SECRET) == NULL);
    /* and a config built without the loader cannot skip them either */
    tp_config_t bare = {0};
    char cerr[512] = "";
    CHECK(tp_config_load(&bare, NULL, cerr, sizeof cerr));
    char *old_mode = bare.auth.mode, *old_secret = bare.auth.jwt_secret;
    bare.auth.mode = (char *)"jwt";
    bare.auth.jwt_secret = (char *)HS_SECRET;
    a = tp_auth_new(&bare, err, sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "auth.jwt_audience: jwt mode needs an audience");
    bare.auth.mode = old_mode;
    bare.auth.jwt_secret = old_secret;
    tp_config_free(&bare);
    a = auth_from("[auth]\nmode = jwt\njwt_secret = tooshort-secret-value\n" AUD_ISS, err,
                  sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, ":3: auth.jwt_secret: HS256 secret is 21 bytes");
    CHECK(strstr(err, "tooshort-secret-value") == NULL);
    a = auth_from("[auth]\nmode = jwt\njwt_jwks_file = /nonexistent/jwks.json\n" AUD_ISS, err,
                  sizeof err);
    CHECK(a == NULL);
    CHECK_CONTAINS(err, "auth.jwt_jwks_file: cannot read /nonexistent/jwks.json");
}

static void claim_paths(void)
{
    json_t *c = json_loads("{\"a\":{\"b\":{\"c\":[\"x\"]}},\"d.e\":\"flat\",\"s\":\"str\"}", 0, NULL);
    CHECK(json_is_array(tp_jwt_claim(c, "a.b.c")));
    CHECK_STR_EQ(json_string_value(tp_jwt_claim(c, "d.e")), "flat");
    CHECK(tp_jwt_claim(c, "a.x.c") == NULL);
    CHECK(tp_jwt_claim(c, "s.t") == NULL);
    CHECK(tp_jwt_claim(c, "a..b") == NULL);
    json_decref(c);
    /* a string roles claim and the role mapping together */
    tp_auth_t *a = full_auth("roles = group:ops:admin, u-123:custom_role\n");
    char *pl = claims("\"roles\":\"reader\",\"groups\":\"ops\"");
    char *tok = hs_token(pl);
    tp_principal_t *p = EXPECT_ACCEPTED(a, tok);
    if (p != NULL) {
        static const char *const want[] = {"reader", "admin", "custom_role"};
        CHECK_INT_EQ(tp_auth_strv_len((const char *const *)p->roles), 3);
        for (int i = 0; i < 3; i++)
            CHECK_STR_EQ(p->roles[i], want[i]);
    }
    tp_principal_free(p);
    free(tok);
    free(pl);
    tp_auth_free(a);
}

/* Random mutations of valid tokens never crash (ASan build) and never verify
 * unless the mutation left the signed bytes intact; the seed is fixed so a
 * failure reproduces. */
static void mutated_tokens_never_verify(void)
{
    tp_auth_t *a = full_auth(NULL);
    char *pl = claims("\"roles\":[\"reader\"]");
    char *base[] = {hs_token(pl), rs_token("k1", g_key1, pl)};
    static const char alphabet[] = "AZaz09-_.=+/ !{}\"\\\x01\xff";
    srand(424242);
    int refused = 0;
    for (int i = 0; i < 3000; i++) {
        const char *orig = base[i % 2];
        size_t len = strlen(orig);
        char *t = tp_xmalloc(len + 8);
        memcpy(t, orig, len + 1);
        int kind = rand() % 4;
        if (kind == 0) { /* truncate */
            t[rand() % (int)len] = '\0';
        } else if (kind == 1) { /* drop a character */
            size_t at = (size_t)(rand() % (int)len);
            memmove(t + at, t + at + 1, len - at);
        } else { /* replace 1-3 characters */
            for (int m = 1 + rand() % 3; m > 0; m--)
                t[rand() % (int)len] = alphabet[rand() % (int)(sizeof alphabet - 1)];
        }
        tp_auth_request_t r = {.peer = "127.0.0.1", .now_s = g_now};
        char *hdr = tp_xasprintf("Bearer %s", t);
        tp_auth_request_header(&r, "Authorization", hdr);
        tp_auth_result_t res;
        if (tp_auth_check(a, &r, &res)) {
            /* only a change the verifier cannot see may pass: none here, since
             * every byte of header, payload and signature is covered */
            CHECK_MSG(strcmp(t, orig) == 0, "mutation %d verified: %s", i, t);
        } else {
            refused++;
            CHECK_MSG(res.status == 401 && strchr(res.reason, '\n') == NULL, "case %d", i);
        }
        tp_auth_result_clear(&res);
        free(hdr);
        free(t);
    }
    CHECK(refused > 2900);
    free(base[0]);
    free(base[1]);
    free(pl);
    tp_auth_free(a);
}

/* Random bytes through the JWKS and PEM loaders: errors, never crashes. */
static void garbage_keys_fail_cleanly(void)
{
    srand(777);
    char buf[300];
    char err[256];
    for (int i = 0; i < 500; i++) {
        size_t n = (size_t)(rand() % (int)(sizeof buf - 1));
        for (size_t j = 0; j < n; j++)
            buf[j] = "{}[]\":,knyteARS01-_ \n"[rand() % 22];
        buf[n] = '\0';
        tp_jwt_keys_t *k = tp_jwt_keys_new();
        bool ok = tp_jwt_keys_add_jwks(k, buf, err, sizeof err);
        CHECK(!ok && err[0] != '\0');
        CHECK(!tp_jwt_keys_add_pem(k, buf, err, sizeof err));
        tp_jwt_keys_free(k);
    }
}

int main(void)
{
    g_now = (int64_t)time(NULL);
    g_key1 = EVP_RSA_gen(2048);
    g_key2 = EVP_RSA_gen(2048);
    g_other = EVP_RSA_gen(2048);
    if (g_key1 == NULL || g_key2 == NULL || g_other == NULL) {
        tp_test_skip("test_auth_jwt", "cannot generate RSA keys");
        return tp_test_done();
    }
    g_pem1 = pem_of(g_key1);
    TP_RUN(base64url_is_strict);
    TP_RUN(hs256_and_rs256_verify);
    TP_RUN(pem_key_verifies_any_kid);
    TP_RUN(bad_tokens_are_refused);
    TP_RUN(alg_confusion_with_rsa_only);
    TP_RUN(duplicate_authorization_is_refused);
    TP_RUN(key_configuration_errors);
    TP_RUN(claim_paths);
    TP_RUN(mutated_tokens_never_verify);
    TP_RUN(garbage_keys_fail_cleanly);
    EVP_PKEY_free(g_key1);
    EVP_PKEY_free(g_key2);
    EVP_PKEY_free(g_other);
    free(g_pem1);
    return tp_test_done();
}
