/* Fuzz target: JWT verification (lib/jwt.c) on arbitrary token bytes, with an
 * HS256 secret and an RSA key (generated once) configured so every branch up
 * to the signature check is reachable; inputs starting with '{' also go
 * through the JWKS loader, and base64url decoding is exercised directly.
 * Any result is fine; crashes, leaks and sanitizer reports are not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "tidepool/jwt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tp_jwt_keys_t *keys(void)
{
    static tp_jwt_keys_t *k;
    if (k != NULL)
        return k;
    k = tp_jwt_keys_new();
    char err[256];
    static const char secret[] = "fuzz-hs256-secret-0123456789abcdefgh";
    EVP_PKEY *rsa = EVP_RSA_gen(2048);
    BIO *bio = BIO_new(BIO_s_mem());
    char *pem = NULL;
    if (rsa == NULL || bio == NULL || !PEM_write_bio_PUBKEY(bio, rsa))
        abort();
    long n = BIO_get_mem_data(bio, &pem);
    char *copy = strndup(pem, (size_t)n);
    if (!tp_jwt_keys_set_hmac(k, secret, strlen(secret), err, sizeof err) ||
        !tp_jwt_keys_add_pem(k, copy, err, sizeof err))
        abort();
    free(copy);
    BIO_free(bio);
    EVP_PKEY_free(rsa);
    return k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    tp_jwt_opts_t o = {.audience = "api", .issuer = "iss", .skew_s = 60, .now_s = 1700000000};
    json_t *claims = NULL;
    char why[256];
    tp_jwt_err_t e = tp_jwt_verify(keys(), text, &o, &claims, why, sizeof why);
    if ((e == TP_JWT_OK) != (claims != NULL))
        abort();
    if (claims != NULL) {
        (void)tp_jwt_claim(claims, "realm_access.roles");
        json_decref(claims);
    }
    size_t n = 0;
    free(tp_b64url_decode(text, size, &n));
    if (size > 0 && text[0] == '{') {
        tp_jwt_keys_t *k = tp_jwt_keys_new();
        char err[256];
        (void)!tp_jwt_keys_add_jwks(k, text, err, sizeof err);
        tp_jwt_keys_free(k);
    }
    free(text);
    return 0;
}
