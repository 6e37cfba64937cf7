/* JWT building for tests that sign their own tokens (tests/unit/test_auth_jwt.c,
 * tests/integration/test_server_jwt.c): base64url segments, RS256 or HS256
 * signatures made with OpenSSL (or none), and RSA keys as JWK or PEM. Every
 * function returns a string the caller frees. */
#ifndef TIDEPOOL_TESTS_JWT_TOKENS_H
#define TIDEPOOL_TESTS_JWT_TOKENS_H

#include <string.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include "tidepool/jwt.h"
#include "tidepool/util.h"

#define JT_UNUSED __attribute__((unused))

static JT_UNUSED char *b64(const char *s)
{
    return tp_b64url_encode(s, strlen(s));
}

/* "input.signature": input as given (segments already encoded, or not), signed
 * RS256 with rsa, else HS256 with hmac_key, else with an empty signature. */
static JT_UNUSED char *sign_input(const char *input, EVP_PKEY *rsa, const void *hmac_key,
                                  size_t hmac_len)
{
    unsigned char sig[1024];
    size_t sig_len = 0;
    if (rsa != NULL) {
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        sig_len = sizeof sig;
        if (EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, rsa) != 1 ||
            EVP_DigestSign(md, sig, &sig_len, (const unsigned char *)input, strlen(input)) != 1)
            sig_len = 0;
        EVP_MD_CTX_free(md);
    } else if (hmac_key != NULL) {
        unsigned int n = 0;
        HMAC(EVP_sha256(), hmac_key, (int)hmac_len, (const unsigned char *)input, strlen(input),
             sig, &n);
        sig_len = n;
    }
    char *s = tp_b64url_encode(sig, sig_len);
    char *tok = tp_xasprintf("%s.%s", input, s);
    free(s);
    return tok;
}

/* header.payload (both JSON text, encoded here), signed as sign_input does. */
static JT_UNUSED char *sign_with(const char *header, const char *payload, EVP_PKEY *rsa,
                                 const void *hmac_key, size_t hmac_len)
{
    char *h = b64(header), *p = b64(payload);
    char *input = tp_xasprintf("%s.%s", h, p);
    char *tok = sign_input(input, rsa, hmac_key, hmac_len);
    free(h);
    free(p);
    free(input);
    return tok;
}

/* A big-number parameter of an RSA key (OSSL_PKEY_PARAM_RSA_N or _E), base64url. */
static JT_UNUSED char *bn_b64(EVP_PKEY *k, const char *name)
{
    BIGNUM *bn = NULL;
    unsigned char buf[1024];
    int n = EVP_PKEY_get_bn_param(k, name, &bn) == 1 ? BN_bn2bin(bn, buf) : 0;
    BN_free(bn);
    return tp_b64url_encode(buf, (size_t)n);
}

/* The RSA key k as one JWK (RS256, use sig) under kid. */
static JT_UNUSED char *jwk(EVP_PKEY *k, const char *kid)
{
    char *n = bn_b64(k, OSSL_PKEY_PARAM_RSA_N), *e = bn_b64(k, OSSL_PKEY_PARAM_RSA_E);
    char *s = tp_xasprintf("{\"kty\":\"RSA\",\"use\":\"sig\",\"alg\":\"RS256\",\"kid\":\"%s\","
                           "\"n\":\"%s\",\"e\":\"%s\"}",
                           kid, n, e);
    free(n);
    free(e);
    return s;
}

/* The public half of k as PEM. */
static JT_UNUSED char *pem_of(EVP_PKEY *k)
{
    BIO *bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(bio, k);
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    char *s = tp_xstrndup(data, (size_t)n);
    BIO_free(bio);
    return s;
}

#endif
