/* JSON Web Tokens (RFC 7519) verified with OpenSSL: HS256 against a shared
 * secret, RS256 against RSA public keys from a JWKS document (selected by
 * `kid`) or a PEM file. Verification only: this module never issues tokens
 * except through tp_jwt_sign_hs256 (tests and tools). It knows nothing of
 * HTTP or roles; lib/auth.c maps verified claims to a principal. */
#ifndef TIDEPOOL_JWT_H
#define TIDEPOOL_JWT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "tidepool/util.h"

/* Tokens longer than this are refused before any decoding. */
#define TP_JWT_MAX_LEN 8192

/* Why a token was refused. Stable names via tp_jwt_err_name (for logs). */
typedef enum tp_jwt_err {
    TP_JWT_OK = 0,
    TP_JWT_OVERSIZED,       /* longer than TP_JWT_MAX_LEN */
    TP_JWT_MALFORMED,       /* not three segments, bad base64url, bad JSON, bad claim types */
    TP_JWT_BAD_ALG,         /* alg none/unknown, or no key of the alg's type configured */
    TP_JWT_UNKNOWN_KID,     /* RS256 with a kid no configured key has */
    TP_JWT_BAD_SIGNATURE,   /* signature does not verify */
    TP_JWT_EXPIRED,         /* exp + skew <= now, or exp missing */
    TP_JWT_NOT_YET_VALID,   /* nbf - skew > now */
    TP_JWT_BAD_AUDIENCE,    /* audience configured and not in aud */
    TP_JWT_BAD_ISSUER,      /* issuer configured and iss differs */
} tp_jwt_err_t;

/* "oversized", "malformed", "bad_alg", ... ; never NULL. */
const char *tp_jwt_err_name(tp_jwt_err_t e);

/* Key material. Immutable after building; safe to share between threads for
 * tp_jwt_verify. */
typedef struct tp_jwt_keys tp_jwt_keys_t;

/* Returns an empty, owned key set (free with tp_jwt_keys_free). */
tp_jwt_keys_t *tp_jwt_keys_new(void);
/* Frees k, wiping the HMAC secret first; NULL is a no-op. */
void tp_jwt_keys_free(tp_jwt_keys_t *k);
/* Sets the HS256 secret (copied; at least 32 bytes, RFC 7518 §3.2). False with
 * err set (never containing the secret) when too short. */
bool tp_jwt_keys_set_hmac(tp_jwt_keys_t *k, const void *secret, size_t len, char *err,
                          size_t errlen) TP_WUR;
/* Adds every RSA signing key of a JWKS document ({"keys": [...]}): kty RSA,
 * n and e base64url, optional kid, alg (must be RS256 if present) and use
 * (must be "sig" if present). Keys of other types are skipped. False with err
 * naming the key index when the JSON is malformed, a key is unusable (RSA key
 * under 2048 bits, bad base64url) or no RSA key is present. */
bool tp_jwt_keys_add_jwks(tp_jwt_keys_t *k, const char *json, char *err, size_t errlen) TP_WUR;
/* Adds an RSA public key in PEM ("BEGIN PUBLIC KEY"). It has no kid and so
 * verifies RS256 tokens whatever kid they carry. */
bool tp_jwt_keys_add_pem(tp_jwt_keys_t *k, const char *pem, char *err, size_t errlen) TP_WUR;
/* Counts of configured keys, for start-up logs. */
size_t tp_jwt_keys_rsa_count(const tp_jwt_keys_t *k);
bool tp_jwt_keys_has_hmac(const tp_jwt_keys_t *k);

typedef struct tp_jwt_opts {
    const char *audience; /* NULL or "": aud not checked */
    const char *issuer;   /* NULL or "": iss not checked */
    int64_t skew_s;       /* leeway for exp and nbf */
    int64_t now_s;        /* wall clock, Unix seconds */
} tp_jwt_opts_t;

/* Verifies token (the compact serialisation, without "Bearer "). The algorithm
 * must be HS256 or RS256 AND a key of that type must be configured (so an
 * HS256 token is never checked against an RSA key); `crit` headers are
 * refused; exp is required. On success returns TP_JWT_OK and *claims_out
 * (owned, json_decref it). On failure returns the reason, *claims_out = NULL,
 * and why holds a log-safe detail (no token text, no claim values except
 * exp/nbf times). */
tp_jwt_err_t tp_jwt_verify(const tp_jwt_keys_t *k, const char *token, const tp_jwt_opts_t *o,
                           json_t **claims_out, char *why, size_t whylen) TP_WUR;

/* Follows a dotted path ("realm_access.roles") through nested objects;
 * returns a borrowed reference or NULL. A key that itself holds a dot is
 * found when the whole path matches a top-level key first. */
json_t *tp_jwt_claim(json_t *claims, const char *path);

/* Signs claims as an HS256 token (header {"alg":"HS256","typ":"JWT"}); caller
 * frees. For tests and tools. */
char *tp_jwt_sign_hs256(const char *claims_json, const void *secret, size_t len);

/* base64url without padding. decode: strict (only the URL alphabet, no '=',
 * no impossible lengths, unused bits zero); returns an owned buffer with a
 * NUL after len bytes, or NULL. */
char *tp_b64url_encode(const void *data, size_t len);
unsigned char *tp_b64url_decode(const char *s, size_t slen, size_t *len_out);

#endif
