/* Authentication and authorization, independent of the HTTP server (DESIGN §11,
 * databricks-protocol.md §3.3-3.4, docs/auth.md).
 *
 * The server copies the facts of a request it needs into a tp_auth_request_t
 * (peer address, a few headers WITH how often each appeared, the wall clock)
 * and calls tp_auth_check: a pure, non-blocking function that answers with a
 * principal or a refusal (401, a stable code, a client-safe message and a
 * log-safe reason). tp_auth_authorize then checks the principal's roles for
 * the endpoint (403). Nothing here does I/O on the request path; loading the
 * tidepool.api_tokens snapshot (auth_tokens.h) is the server's job, off the
 * event loop, and handed over with tp_auth_set_tokens.
 *
 * Role model: roles are names. `admin` implies every role (including custom
 * ones); `writer` implies `reader`; any other name is matched exactly. A
 * requirement is a list of alternatives: the principal needs ANY one of them;
 * an empty or NULL list accepts every authenticated principal. */
#ifndef TIDEPOOL_AUTH_H
#define TIDEPOOL_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tidepool/config.h"
#include "tidepool/util.h"

typedef struct tp_auth_tokens tp_auth_tokens_t; /* see auth_tokens.h */

typedef enum tp_auth_mode {
    TP_AUTH_MODE_NONE,
    TP_AUTH_MODE_TOKEN,
    TP_AUTH_MODE_DATABRICKS_APPS,
    TP_AUTH_MODE_JWT,
} tp_auth_mode_t;

/* The request headers auth reads. */
typedef enum tp_auth_hdr {
    TP_AUTH_HDR_AUTHORIZATION,
    TP_AUTH_HDR_FWD_EMAIL,              /* X-Forwarded-Email */
    TP_AUTH_HDR_FWD_USER,               /* X-Forwarded-User */
    TP_AUTH_HDR_FWD_PREFERRED_USERNAME, /* X-Forwarded-Preferred-Username */
    TP_AUTH_HDR_FWD_ACCESS_TOKEN,       /* X-Forwarded-Access-Token (on-behalf-of) */
    TP_AUTH_HDR_FWD_GROUPS,             /* X-Forwarded-Groups, comma-separated */
    TP_AUTH_HDR_REAL_IP,                /* X-Real-Ip */
    TP_AUTH_HDR_COUNT
} tp_auth_hdr_t;

/* The header names, indexed by tp_auth_hdr_t, in their canonical spelling. */
extern const char *const tp_auth_header_names[TP_AUTH_HDR_COUNT];

/* Facts about one request. Zero-initialise, set peer and now_s, then feed
 * every request header through tp_auth_request_header. All strings are
 * borrowed and must outlive tp_auth_check. */
typedef struct tp_auth_request {
    const char *peer; /* numeric TCP peer address ("10.0.0.7", "::1"); NULL = unknown */
    int64_t now_s;    /* wall clock, Unix seconds (exp/nbf, token expiry) */
    struct {
        const char *value; /* the first occurrence */
        unsigned count;    /* occurrences; > 1 makes the request refused */
    } hdr[TP_AUTH_HDR_COUNT];
} tp_auth_request_t;

/* Records one header (name compared case-insensitively); other names are
 * ignored. Cheap enough to call for every header of a request. */
void tp_auth_request_header(tp_auth_request_t *r, const char *name, const char *value);

/* Who made a request. Owned by the tp_auth_result_t it came in (or by whoever
 * takes it from there); free with tp_principal_free. */
typedef struct tp_principal {
    tp_auth_mode_t mode;
    char *id;     /* stable identity for audit and row scoping: "anonymous",
                     "token:NAME", the e-mail/user from the proxy, or the JWT sub */
    char *name;   /* for display */
    char *email;  /* NULL when unknown */
    char **roles; /* NULL-terminated, deduplicated, never NULL itself */
    char **groups; /* NULL-terminated (databricks-apps header, jwt groups claim) */
    /* X-Forwarded-Access-Token from a trusted proxy, for on-behalf-of warehouse
     * calls. Never log, print or store it: tp_principal_describe redacts it.
     * NULL when absent or sent by a peer outside auth.trusted_proxies. */
    char *access_token;
    char credential_id[17]; /* first 16 hex digits of SHA-256(credential); "" */
} tp_principal_t;

/* Frees p, wiping the access token first; NULL is a no-op. */
void tp_principal_free(tp_principal_t *p);
/* Appends a JSON object describing p (id, name, email, roles, groups, mode,
 * credential_id) to b; the access token appears only as
 * "[redacted sha256:XXXXXXXX]" or null. Safe for logs. */
void tp_principal_describe(const tp_principal_t *p, tp_buf_t *b);

/* Stable refusal codes (the problem+json "code", hyphenated like the server's). */
#define TP_AUTH_CODE_MISSING "missing-credentials"   /* 401: nothing presented */
#define TP_AUTH_CODE_INVALID "invalid-credentials"   /* 401: presented but refused */
#define TP_AUTH_CODE_FORBIDDEN "forbidden"           /* 403: authenticated, role missing */
#define TP_AUTH_CODE_RATE_LIMITED "rate-limited"     /* 429: for the server's limiter replies */

/* The outcome of tp_auth_check / tp_auth_authorize. */
typedef struct tp_auth_result {
    tp_principal_t *principal; /* owned on success, NULL on refusal */
    int status;                /* 0 on success, else 401 or 403 */
    const char *code;          /* static: TP_AUTH_CODE_*, NULL on success */
    const char *message;       /* static, client-safe; says nothing about which check failed */
    const char *www_authenticate; /* static value for a WWW-Authenticate header, or NULL */
    char reason[256]; /* for the server's log only: which check failed, the
                         credential's short SHA-256 id; never a token or secret */
} tp_auth_result_t;

/* Frees the principal (if any) and zeroes r. */
void tp_auth_result_clear(tp_auth_result_t *r);

typedef struct tp_auth tp_auth_t;

/* Builds the verifier for c->auth (mode and the settings it uses: token
 * entries and files, trusted proxies, role mapping, JWT keys read from their
 * files). Returns owned, or NULL with err set to one line naming the setting
 * ("FILE:LINE: auth.tokens: entry 2: ..."), never quoting a secret.
 * Reload: build a new one and swap it in when this succeeds (carry the token
 * table snapshot over with tp_auth_set_tokens(new, tp_auth_tokens_ref(...))). */
tp_auth_t *tp_auth_new(const tp_config_t *c, char *err, size_t errlen) TP_WUR;
/* A verifier is reference-counted so a reload can swap it while requests
 * still use the old one: tp_auth_new returns one reference, tp_auth_ref adds
 * one (returns a), tp_auth_free drops one and the last frees everything
 * (wiping secrets). NULL is a no-op for both. */
tp_auth_t *tp_auth_ref(tp_auth_t *a);
void tp_auth_free(tp_auth_t *a);
/* The mode a was built for. */
tp_auth_mode_t tp_auth_mode(const tp_auth_t *a);
/* The roles that may run a sync job (auth.sync_roles; any one of them, never
 * empty), NULL-terminated. Borrowed: valid while the caller holds a. */
const char *const *tp_auth_sync_roles(const tp_auth_t *a);
/* True when mode is token and auth.token_table is on: the server should load
 * the tidepool.api_tokens snapshot and keep it fresh (auth_tokens.h). */
bool tp_auth_wants_token_table(const tp_auth_t *a);
/* Replaces the token-table snapshot (takes ownership of the caller's
 * reference; NULL drops it). Thread-safe against concurrent tp_auth_check. */
void tp_auth_set_tokens(tp_auth_t *a, tp_auth_tokens_t *snapshot);
/* A new reference to the current snapshot (NULL if none); release it with
 * tp_auth_tokens_release. */
tp_auth_tokens_t *tp_auth_get_tokens(tp_auth_t *a);

/* Decides who made the request. Non-blocking, thread-safe. Returns true with
 * out->principal set, or false with status 401, code, message, and reason.
 * Refused: a header the mode reads appearing more than once, a missing or malformed credential, an
 * unknown, wrong, expired or revoked token, a JWT failing any check, forwarded
 * identity from a peer outside auth.trusted_proxies, header values with
 * control characters or over their size limits. In every mode the principal's
 * access_token is X-Forwarded-Access-Token only when the peer is a trusted
 * proxy (from anyone else the header is ignored). */
bool tp_auth_check(tp_auth_t *a, const tp_auth_request_t *r, tp_auth_result_t *out) TP_WUR;

/* The address to rate-limit and log: X-Real-Ip when the peer is a trusted
 * proxy and the header appears once and holds a valid IP; else the peer.
 * Borrowed from r; "" when the peer is unknown. */
const char *tp_auth_client_address(const tp_auth_t *a, const tp_auth_request_t *r);

/* True when p holds any of required (NULL-terminated; NULL or empty = any
 * authenticated principal), with admin implying everything and writer
 * implying reader. p == NULL: false. */
bool tp_auth_allowed(const tp_principal_t *p, const char *const *required);
/* tp_auth_allowed, and on refusal fills *refusal (status 403, code forbidden,
 * reason naming p->id and the roles required; principal untouched = NULL). */
bool tp_auth_authorize(const tp_principal_t *p, const char *const *required,
                       tp_auth_result_t *refusal) TP_WUR;

/* Logs a refusal as one warn line: msg "authentication refused" (or
 * "authorization refused" for 403) with status, code, reason, client and
 * request_id (either may be NULL). */
void tp_auth_log_refusal(const tp_auth_result_t *r, const char *client, const char *request_id);

/* Role lists: parses "a, b+c" (',' and '+' both separate) into a
 * NULL-terminated, deduplicated list (owned; free with tp_auth_strv_free).
 * Names are 1-64 of [A-Za-z0-9_.-]; false with err naming the bad one. */
bool tp_auth_roles_parse(const char *text, char ***out, char *err, size_t errlen) TP_WUR;
void tp_auth_strv_free(char **v);
size_t tp_auth_strv_len(const char *const *v);

/* The credential id used in logs and `token list`: the first 16 hex digits
 * of SHA-256(secret) into out[17]. */
void tp_auth_credential_id(const char *secret, size_t len, char out[17]);

#endif
