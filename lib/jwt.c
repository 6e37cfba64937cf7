/* JWT verification (HS256, RS256) with OpenSSL and jansson.
 *
 * Owns the key set (one optional HMAC secret, a list of RSA public keys each
 * with an optional kid), strict base64url, and the verification pipeline:
 * size limit -> three segments -> header JSON -> alg allow-list matched to a
 * configured key TYPE (the defence against alg confusion: an HS256 token is
 * only ever checked with the HMAC secret, never with RSA key bytes) -> kid ->
 * signature (CRYPTO_memcmp for HMAC, EVP_DigestVerify for RSA) -> claims JSON
 * -> exp/nbf with skew -> iss -> aud. Claims are only parsed after the
 * signature verified.
 *
 * Deliberately not here: fetching JWKS over HTTP (the key set is built from a
 * file at start-up or reload), other algorithms (ES*, PS*), JWE. Reasons
 * written to `why` never quote token text. */
#include "tidepool/jwt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

#define MIN_RSA_BITS 2048
#define MIN_HMAC_LEN 32

typedef struct rsa_key {
    char *kid; /* NULL: matches any kid (PEM) */
    EVP_PKEY *pkey;
} rsa_key_t;

struct tp_jwt_keys {
    unsigned char *hmac;
    size_t hmac_len;
    rsa_key_t *rsa;
    size_t nrsa;
};

const char *tp_jwt_err_name(tp_jwt_err_t e)
{
    switch (e) {
    case TP_JWT_OK: return "ok";
    case TP_JWT_OVERSIZED: return "oversized";
    case TP_JWT_MALFORMED: return "malformed";
    case TP_JWT_BAD_ALG: return "bad_alg";
    case TP_JWT_UNKNOWN_KID: return "unknown_kid";
    case TP_JWT_BAD_SIGNATURE: return "bad_signature";
    case TP_JWT_EXPIRED: return "expired";
    case TP_JWT_NOT_YET_VALID: return "not_yet_valid";
    case TP_JWT_BAD_AUDIENCE: return "bad_audience";
    case TP_JWT_BAD_ISSUER: return "bad_issuer";
    }
    return "unknown";
}

/* ---- base64url ---- */

static const char b64url_alpha[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

char *tp_b64url_encode(const void *data, size_t len)
{
    const unsigned char *p = data;
    char *out = tp_xmalloc((len + 2) / 3 * 4 + 1);
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        out[o++] = b64url_alpha[v >> 18 & 63];
        out[o++] = b64url_alpha[v >> 12 & 63];
        out[o++] = b64url_alpha[v >> 6 & 63];
        out[o++] = b64url_alpha[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        out[o++] = b64url_alpha[v >> 18 & 63];
        out[o++] = b64url_alpha[v >> 12 & 63];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
        out[o++] = b64url_alpha[v >> 18 & 63];
        out[o++] = b64url_alpha[v >> 12 & 63];
        out[o++] = b64url_alpha[v >> 6 & 63];
    }
    out[o] = '\0';
    return out;
}

static int b64url_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

unsigned char *tp_b64url_decode(const char *s, size_t slen, size_t *len_out)
{
    if (slen % 4 == 1)
        return NULL;
    unsigned char *out = tp_xmalloc(slen / 4 * 3 + 3);
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < slen; i++) {
        int v = b64url_val((unsigned char)s[i]);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) { /* leftover bits must be zero: one canonical encoding */
        free(out);
        return NULL;
    }
    out[o] = '\0';
    *len_out = o;
    return out;
}

/* ---- key set ---- */

tp_jwt_keys_t *tp_jwt_keys_new(void)
{
    return tp_xcalloc(1, sizeof(tp_jwt_keys_t));
}

void tp_jwt_keys_free(tp_jwt_keys_t *k)
{
    if (k == NULL)
        return;
    if (k->hmac != NULL)
        OPENSSL_cleanse(k->hmac, k->hmac_len);
    free(k->hmac);
    for (size_t i = 0; i < k->nrsa; i++) {
        free(k->rsa[i].kid);
        EVP_PKEY_free(k->rsa[i].pkey);
    }
    free(k->rsa);
    free(k);
}

size_t tp_jwt_keys_rsa_count(const tp_jwt_keys_t *k)
{
    return k->nrsa;
}

bool tp_jwt_keys_has_hmac(const tp_jwt_keys_t *k)
{
    return k->hmac != NULL;
}

bool tp_jwt_keys_set_hmac(tp_jwt_keys_t *k, const void *secret, size_t len, char *err,
                          size_t errlen)
{
    if (len < MIN_HMAC_LEN) {
        snprintf(err, errlen, "HS256 secret is %zu bytes; at least %d are required", len,
                 MIN_HMAC_LEN);
        return false;
    }
    if (k->hmac != NULL)
        OPENSSL_cleanse(k->hmac, k->hmac_len);
    free(k->hmac);
    k->hmac = tp_xmalloc(len);
    memcpy(k->hmac, secret, len);
    k->hmac_len = len;
    return true;
}

/* Takes ownership of pkey (freed on failure). */
static bool add_rsa(tp_jwt_keys_t *k, EVP_PKEY *pkey, const char *kid, const char *what,
                    char *err, size_t errlen)
{
    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
        snprintf(err, errlen, "%s: not an RSA key", what);
        EVP_PKEY_free(pkey);
        return false;
    }
    int bits = EVP_PKEY_get_bits(pkey);
    if (bits < MIN_RSA_BITS) {
        snprintf(err, errlen, "%s: RSA key of %d bits; at least %d are required", what, bits,
                 MIN_RSA_BITS);
        EVP_PKEY_free(pkey);
        return false;
    }
    k->rsa = tp_xrealloc(k->rsa, (k->nrsa + 1) * sizeof *k->rsa);
    k->rsa[k->nrsa].kid = kid ? tp_xstrdup(kid) : NULL;
    k->rsa[k->nrsa].pkey = pkey;
    k->nrsa++;
    return true;
}

/* n, e (base64url big-endian) -> EVP_PKEY via OSSL_PARAM_BLD. NULL on failure. */
static EVP_PKEY *rsa_from_ne(const char *n64, const char *e64)
{
    size_t nlen = 0, elen = 0;
    unsigned char *n = tp_b64url_decode(n64, strlen(n64), &nlen);
    unsigned char *e = tp_b64url_decode(e64, strlen(e64), &elen);
    EVP_PKEY *pkey = NULL;
    BIGNUM *bn_n = NULL, *bn_e = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    if (n == NULL || e == NULL || nlen == 0 || elen == 0)
        goto out;
    bn_n = BN_bin2bn(n, (int)nlen, NULL);
    bn_e = BN_bin2bn(e, (int)elen, NULL);
    /* a public exponent of 1 (or even) would make signatures forgeable */
    if (bn_n == NULL || bn_e == NULL || !BN_is_odd(bn_e) || BN_num_bits(bn_e) < 2 ||
        BN_num_bits(bn_e) > 64)
        goto out;
    bld = OSSL_PARAM_BLD_new();
    if (bld == NULL ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e))
        goto out;
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    if (params == NULL || ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pkey = NULL;
out:
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn_n);
    BN_free(bn_e);
    free(n);
    free(e);
    return pkey;
}

bool tp_jwt_keys_add_jwks(tp_jwt_keys_t *k, const char *json, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *doc = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    if (doc == NULL) {
        snprintf(err, errlen, "JWKS is not valid JSON: line %d: %s", jerr.line, jerr.text);
        return false;
    }
    bool ok = false;
    size_t added = 0;
    json_t *keys = json_object_get(doc, "keys");
    if (!json_is_array(keys)) {
        snprintf(err, errlen, "JWKS has no \"keys\" array");
        goto out;
    }
    size_t i;
    json_t *key;
    json_array_foreach(keys, i, key) {
        char what[64];
        snprintf(what, sizeof what, "JWKS key %zu", i);
        if (!json_is_object(key)) {
            snprintf(err, errlen, "%s: not an object", what);
            goto out;
        }
        const char *kty = json_string_value(json_object_get(key, "kty"));
        if (kty == NULL || strcmp(kty, "RSA") != 0)
            continue; /* EC, oct, ...: not supported, not an error */
        const char *alg = json_string_value(json_object_get(key, "alg"));
        const char *use = json_string_value(json_object_get(key, "use"));
        json_t *kidj = json_object_get(key, "kid");
        if ((alg != NULL && strcmp(alg, "RS256") != 0) || (use != NULL && strcmp(use, "sig") != 0))
            continue; /* a key meant for something else */
        if (kidj != NULL && !json_is_string(kidj)) {
            snprintf(err, errlen, "%s: kid is not a string", what);
            goto out;
        }
        const char *n = json_string_value(json_object_get(key, "n"));
        const char *e = json_string_value(json_object_get(key, "e"));
        if (n == NULL || e == NULL) {
            snprintf(err, errlen, "%s: RSA key without string \"n\" and \"e\"", what);
            goto out;
        }
        EVP_PKEY *pkey = rsa_from_ne(n, e);
        if (pkey == NULL) {
            snprintf(err, errlen,
                     "%s: \"n\" or \"e\" is not a valid base64url RSA value (e odd, 3 or more)",
                     what);
            goto out;
        }
        if (!add_rsa(k, pkey, json_string_value(kidj), what, err, errlen))
            goto out;
        added++;
    }
    if (added == 0) {
        snprintf(err, errlen, "JWKS holds no RSA signing key");
        goto out;
    }
    ok = true;
out:
    json_decref(doc);
    return ok;
}

bool tp_jwt_keys_add_pem(tp_jwt_keys_t *k, const char *pem, char *err, size_t errlen)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *pkey = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (pkey == NULL) {
        snprintf(err, errlen, "not a PEM public key (expected \"-----BEGIN PUBLIC KEY-----\")");
        return false;
    }
    return add_rsa(k, pkey, NULL, "PEM key", err, errlen);
}

/* ---- verification ---- */

static tp_jwt_err_t refuse(tp_jwt_err_t e, char *why, size_t whylen, const char *fmt, ...)
    TP_PRINTF(4, 5);
static tp_jwt_err_t refuse(tp_jwt_err_t e, char *why, size_t whylen, const char *fmt, ...)
{
    if (why != NULL && whylen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, whylen, fmt, ap);
        va_end(ap);
    }
    return e;
}

/* Decodes one segment as a JSON object; NULL if it is not one. */
static json_t *segment_json(const char *s, size_t len)
{
    size_t n = 0;
    unsigned char *raw = tp_b64url_decode(s, len, &n);
    if (raw == NULL)
        return NULL;
    json_t *j = json_loadb((const char *)raw, n, JSON_REJECT_DUPLICATES, NULL);
    free(raw);
    if (j != NULL && !json_is_object(j)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static bool verify_hs256(const tp_jwt_keys_t *k, const char *signing_input, size_t in_len,
                         const unsigned char *sig, size_t sig_len)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    if (HMAC(EVP_sha256(), k->hmac, (int)k->hmac_len, (const unsigned char *)signing_input,
             in_len, mac, &mac_len) == NULL)
        return false;
    return sig_len == mac_len && CRYPTO_memcmp(mac, sig, mac_len) == 0;
}

static bool verify_rs256(EVP_PKEY *pkey, const char *signing_input, size_t in_len,
                         const unsigned char *sig, size_t sig_len)
{
    if (sig_len != (size_t)EVP_PKEY_get_size(pkey))
        return false;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pkey) == 1 &&
              EVP_DigestVerify(md, sig, sig_len, (const unsigned char *)signing_input,
                               in_len) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

/* A NumericDate claim: absent -> false with *present = false. */
static bool numeric_date(json_t *claims, const char *name, int64_t *out, bool *present)
{
    json_t *v = json_object_get(claims, name);
    *present = v != NULL;
    if (v == NULL)
        return true;
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return true;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d < -9e15 || d > 9e15)
            return false;
        *out = (int64_t)d;
        return true;
    }
    return false;
}

static bool audience_matches(json_t *aud, const char *want)
{
    if (json_is_string(aud))
        return strcmp(json_string_value(aud), want) == 0;
    size_t i;
    json_t *a;
    if (!json_is_array(aud))
        return false;
    json_array_foreach(aud, i, a) {
        if (json_is_string(a) && strcmp(json_string_value(a), want) == 0)
            return true;
    }
    return false;
}

static tp_jwt_err_t check_claims(json_t *claims, const tp_jwt_opts_t *o, char *why,
                                 size_t whylen)
{
    int64_t exp = 0, nbf = 0;
    bool has_exp, has_nbf;
    if (!numeric_date(claims, "exp", &exp, &has_exp) || !numeric_date(claims, "nbf", &nbf, &has_nbf))
        return refuse(TP_JWT_MALFORMED, why, whylen, "exp or nbf is not a number");
    if (!has_exp)
        return refuse(TP_JWT_EXPIRED, why, whylen, "no exp claim (tokens must expire)");
    if (exp <= INT64_MAX - o->skew_s && exp + o->skew_s <= o->now_s)
        return refuse(TP_JWT_EXPIRED, why, whylen, "expired at %lld, now %lld, skew %llds",
                          (long long)exp, (long long)o->now_s, (long long)o->skew_s);
    if (has_nbf && nbf > INT64_MIN + o->skew_s && nbf - o->skew_s > o->now_s)
        return refuse(TP_JWT_NOT_YET_VALID, why, whylen,
                      "not valid before %lld, now %lld, skew %llds", (long long)nbf,
                      (long long)o->now_s, (long long)o->skew_s);
    if (o->issuer != NULL && *o->issuer != '\0') {
        const char *iss = json_string_value(json_object_get(claims, "iss"));
        if (iss == NULL || strcmp(iss, o->issuer) != 0)
            return refuse(TP_JWT_BAD_ISSUER, why, whylen, "issuer is not the configured one");
    }
    if (o->audience != NULL && *o->audience != '\0' &&
        !audience_matches(json_object_get(claims, "aud"), o->audience))
        return refuse(TP_JWT_BAD_AUDIENCE, why, whylen,
                      "audience does not include the configured one");
    return TP_JWT_OK;
}

/* Picks the RSA key for kid (NULL when the token has none). */
static EVP_PKEY *find_rsa(const tp_jwt_keys_t *k, const char *kid)
{
    for (size_t i = 0; i < k->nrsa; i++)
        if (kid != NULL && k->rsa[i].kid != NULL && strcmp(kid, k->rsa[i].kid) == 0)
            return k->rsa[i].pkey;
    for (size_t i = 0; i < k->nrsa; i++)
        if (k->rsa[i].kid == NULL)
            return k->rsa[i].pkey; /* PEM key: any kid */
    if (kid == NULL && k->nrsa == 1)
        return k->rsa[0].pkey;
    return NULL;
}

tp_jwt_err_t tp_jwt_verify(const tp_jwt_keys_t *k, const char *token, const tp_jwt_opts_t *o,
                           json_t **claims_out, char *why, size_t whylen)
{
    *claims_out = NULL;
    if (why != NULL && whylen > 0)
        why[0] = '\0';
    size_t len = strnlen(token, TP_JWT_MAX_LEN + 1);
    if (len > TP_JWT_MAX_LEN)
        return refuse(TP_JWT_OVERSIZED, why, whylen, "token longer than %d bytes", TP_JWT_MAX_LEN);
    const char *dot1 = memchr(token, '.', len);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
    if (dot1 == NULL || dot2 == NULL || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token)))
        return refuse(TP_JWT_MALFORMED, why, whylen, "not three dot-separated segments");

    json_t *header = segment_json(token, (size_t)(dot1 - token));
    if (header == NULL)
        return refuse(TP_JWT_MALFORMED, why, whylen, "header is not base64url JSON object");
    tp_jwt_err_t rc = TP_JWT_OK;
    json_t *claims = NULL;
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    const char *alg = json_string_value(json_object_get(header, "alg"));
    json_t *kidj = json_object_get(header, "kid");
    const char *typ = json_string_value(json_object_get(header, "typ"));
    if (alg == NULL) {
        rc = refuse(TP_JWT_MALFORMED, why, whylen, "header has no string alg");
        goto out;
    }
    if (json_object_get(header, "crit") != NULL) {
        rc = refuse(TP_JWT_MALFORMED, why, whylen, "header has crit extensions");
        goto out;
    }
    if ((kidj != NULL && !json_is_string(kidj)) ||
        (typ != NULL && strcasecmp(typ, "JWT") != 0 && strcasecmp(typ, "at+jwt") != 0 &&
         strcasecmp(typ, "JOSE") != 0)) {
        rc = refuse(TP_JWT_MALFORMED, why, whylen, "header kid or typ is invalid");
        goto out;
    }
    bool hs = strcmp(alg, "HS256") == 0, rs = strcmp(alg, "RS256") == 0;
    if (!hs && !rs) {
        rc = refuse(TP_JWT_BAD_ALG, why, whylen, "alg %s is not accepted (HS256, RS256 are)",
                    strcmp(alg, "none") == 0 || strcasecmp(alg, "none") == 0 ? "none"
                                                                               : "(other)");
        goto out;
    }
    if ((hs && k->hmac == NULL) || (rs && k->nrsa == 0)) {
        rc = refuse(TP_JWT_BAD_ALG, why, whylen, "alg %s but no %s key is configured", alg,
                    hs ? "HS256 secret" : "RSA");
        goto out;
    }
    EVP_PKEY *pkey = NULL;
    if (rs && (pkey = find_rsa(k, json_string_value(kidj))) == NULL) {
        rc = refuse(TP_JWT_UNKNOWN_KID, why, whylen, "no RSA key with the token's kid");
        goto out;
    }
    sig = tp_b64url_decode(dot2 + 1, len - (size_t)(dot2 + 1 - token), &sig_len);
    if (sig == NULL) {
        rc = refuse(TP_JWT_MALFORMED, why, whylen, "signature is not base64url");
        goto out;
    }
    size_t in_len = (size_t)(dot2 - token);
    bool good = hs ? verify_hs256(k, token, in_len, sig, sig_len)
                   : verify_rs256(pkey, token, in_len, sig, sig_len);
    if (!good) {
        rc = refuse(TP_JWT_BAD_SIGNATURE, why, whylen, "%s signature does not verify", alg);
        goto out;
    }
    claims = segment_json(dot1 + 1, (size_t)(dot2 - dot1 - 1));
    if (claims == NULL) {
        rc = refuse(TP_JWT_MALFORMED, why, whylen, "payload is not base64url JSON object");
        goto out;
    }
    rc = check_claims(claims, o, why, whylen);
out:
    free(sig);
    json_decref(header);
    if (rc == TP_JWT_OK)
        *claims_out = claims;
    else
        json_decref(claims);
    return rc;
}

json_t *tp_jwt_claim(json_t *claims, const char *path)
{
    json_t *v = json_object_get(claims, path);
    if (v != NULL || strchr(path, '.') == NULL)
        return v;
    v = claims;
    const char *p = path;
    while (v != NULL) {
        size_t n = strcspn(p, ".");
        char *key = tp_xstrndup(p, n);
        v = json_is_object(v) ? json_object_get(v, key) : NULL;
        free(key);
        if (p[n] == '\0')
            break;
        p += n + 1;
    }
    return v;
}

char *tp_jwt_sign_hs256(const char *claims_json, const void *secret, size_t len)
{
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    char *h = tp_b64url_encode(header, strlen(header));
    char *c = tp_b64url_encode(claims_json, strlen(claims_json));
    char *input = tp_xasprintf("%s.%s", h, c);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    HMAC(EVP_sha256(), secret, (int)len, (const unsigned char *)input, strlen(input), mac,
         &mac_len);
    char *s = tp_b64url_encode(mac, mac_len);
    char *out = tp_xasprintf("%s.%s", input, s);
    free(h);
    free(c);
    free(input);
    free(s);
    return out;
}
