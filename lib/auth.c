/* Authentication decisions for the four modes of DESIGN §11, and role checks.
 *
 * Owns tp_auth_t (built once per config load: mode, trusted proxy CIDRs, the
 * role mapping, config tokens, the JWT key set, and the current token-table
 * snapshot behind a mutex) and the principal. tp_auth_check is a pure
 * function of the verifier and the request facts: no I/O, no blocking, no
 * logging; refusals carry a static client message that never says which
 * check failed, and a log-safe reason that names the check and at most the
 * credential's short SHA-256 id.
 *
 * Order of checks per request: any auth header seen twice -> 401; then the
 * mode's own checks. Deliberately not here: HTTP, problem+json formatting,
 * rate limiting (auth_ratelimit.c), token storage (auth_tokens.c), JWT
 * cryptography (jwt.c). */
#include "tidepool/auth.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "tidepool/auth_tokens.h"
#include "tidepool/jwt.h"
#include "tidepool/log.h"

#define AUTH_MAGIC 0x41555448u /* "AUTH" */
#define MAX_ROLE_LEN 64
#define MAX_IDENTITY_LEN 512    /* forwarded e-mail, user, name */
#define MAX_GROUPS_LEN 8192     /* X-Forwarded-Groups */
#define MAX_ACCESS_TOKEN_LEN 16384
#define MAX_BEARER_LEN TP_JWT_MAX_LEN

const char *const tp_auth_header_names[TP_AUTH_HDR_COUNT] = {
    [TP_AUTH_HDR_AUTHORIZATION] = "Authorization",
    [TP_AUTH_HDR_FWD_EMAIL] = "X-Forwarded-Email",
    [TP_AUTH_HDR_FWD_USER] = "X-Forwarded-User",
    [TP_AUTH_HDR_FWD_PREFERRED_USERNAME] = "X-Forwarded-Preferred-Username",
    [TP_AUTH_HDR_FWD_ACCESS_TOKEN] = "X-Forwarded-Access-Token",
    [TP_AUTH_HDR_FWD_GROUPS] = "X-Forwarded-Groups",
    [TP_AUTH_HDR_REAL_IP] = "X-Real-Ip",
};

static const char MSG_MISSING[] = "Authentication is required.";
static const char MSG_INVALID[] = "The credentials presented are not valid.";
static const char MSG_FORBIDDEN[] = "You do not have a role that allows this request.";
static const char WWW_BEARER[] = "Bearer realm=\"tidepool\"";
static const char WWW_BEARER_INVALID[] = "Bearer realm=\"tidepool\", error=\"invalid_token\"";

typedef struct cidr {
    int family; /* AF_INET or AF_INET6 */
    unsigned char addr[16];
    int bits;
} cidr_t;

typedef enum rule_kind { RULE_USER, RULE_GROUP, RULE_ANY } rule_kind_t;

typedef struct role_rule {
    rule_kind_t kind;
    char *subject; /* user or group name; NULL for RULE_ANY */
    char **roles;
} role_rule_t;

struct tp_auth {
    unsigned magic;
    atomic_int refs;
    tp_auth_mode_t mode;
    cidr_t *proxies;
    size_t nproxies;
    role_rule_t *rules;
    size_t nrules;
    char **anonymous_roles;
    char **sync_roles; /* auth.sync_roles: never empty */
    tp_auth_tokens_t *config_tokens;
    bool token_table;
    tp_jwt_keys_t *jwt_keys;
    char *jwt_audience, *jwt_issuer, *jwt_roles_claim, *jwt_groups_claim;
    int64_t jwt_skew_s;
    pthread_mutex_t mu; /* guards db_tokens */
    tp_auth_tokens_t *db_tokens;
};

/* ---- small helpers ---- */

void tp_auth_request_header(tp_auth_request_t *r, const char *name, const char *value)
{
    for (int i = 0; i < TP_AUTH_HDR_COUNT; i++) {
        if (strcasecmp(name, tp_auth_header_names[i]) == 0) {
            if (r->hdr[i].count++ == 0)
                r->hdr[i].value = value;
            return;
        }
    }
}

void tp_auth_credential_id(const char *secret, size_t len, char out[17])
{
    unsigned char d[32];
    SHA256((const unsigned char *)secret, len, d);
    for (int i = 0; i < 8; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

size_t tp_auth_strv_len(const char *const *v)
{
    size_t n = 0;
    while (v && v[n])
        n++;
    return n;
}

void tp_auth_strv_free(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        free(v[i]);
    free(v);
}

static bool strv_has(char *const *v, const char *s)
{
    for (size_t i = 0; v && v[i]; i++)
        if (strcmp(v[i], s) == 0)
            return true;
    return false;
}

/* Appends a copy of s unless present. *v may be NULL. */
static void strv_add(char ***v, const char *s)
{
    if (strv_has(*v, s))
        return;
    size_t n = tp_auth_strv_len((const char *const *)*v);
    *v = tp_xrealloc(*v, (n + 2) * sizeof **v);
    (*v)[n] = tp_xstrdup(s);
    (*v)[n + 1] = NULL;
}

static char **strv_empty(void)
{
    return tp_xcalloc(1, sizeof(char *));
}

static bool valid_role(const char *s, size_t n)
{
    if (n == 0 || n > MAX_ROLE_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '.' && s[i] != '-')
            return false;
    return true;
}

bool tp_auth_roles_parse(const char *text, char ***out, char *err, size_t errlen)
{
    char **v = strv_empty();
    const char *p = text ? text : "";
    while (*p != '\0') {
        size_t n = strcspn(p, ",+");
        char *one = tp_xstrndup(p, n);
        char *t = tp_strtrim(one);
        bool ok = *t == '\0' || valid_role(t, strlen(t));
        if (!ok)
            snprintf(err, errlen, "role \"%.64s\" is not 1-%d of A-Z a-z 0-9 _ . -", t,
                     MAX_ROLE_LEN);
        else if (*t != '\0')
            strv_add(&v, t);
        free(one);
        if (!ok) {
            tp_auth_strv_free(v);
            *out = NULL;
            return false;
        }
        p += n;
        if (*p != '\0')
            p++;
    }
    *out = v;
    return true;
}

/* A header value is usable when it has no control characters and fits. */
static bool clean_value(const char *v, size_t max)
{
    size_t n = strnlen(v, max + 1);
    if (n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f)
            return false;
    return true;
}

/* ---- results ---- */

static bool refuse(tp_auth_result_t *out, int status, const char *code, const char *fmt, ...)
    TP_PRINTF(4, 5);
static bool refuse(tp_auth_result_t *out, int status, const char *code, const char *fmt, ...)
{
    out->principal = NULL;
    out->status = status;
    out->code = code;
    out->message = status == 403                          ? MSG_FORBIDDEN
                   : strcmp(code, TP_AUTH_CODE_MISSING) == 0 ? MSG_MISSING
                                                          : MSG_INVALID;
    out->www_authenticate = NULL;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out->reason, sizeof out->reason, fmt, ap);
    va_end(ap);
    for (char *p = out->reason; *p; p++) /* one log line whatever was echoed */
        if ((unsigned char)*p < 0x20)
            *p = '?';
    return false;
}

void tp_auth_result_clear(tp_auth_result_t *r)
{
    if (r == NULL)
        return;
    tp_principal_free(r->principal);
    memset(r, 0, sizeof *r);
}

static tp_principal_t *principal_new(tp_auth_mode_t mode, const char *id)
{
    tp_principal_t *p = tp_xcalloc(1, sizeof *p);
    p->mode = mode;
    p->id = tp_xstrdup(id);
    p->roles = strv_empty();
    p->groups = strv_empty();
    return p;
}

static bool grant(tp_auth_result_t *out, tp_principal_t *p)
{
    memset(out, 0, sizeof *out);
    if (p->name == NULL)
        p->name = tp_xstrdup(p->email ? p->email : p->id);
    out->principal = p;
    return true;
}

void tp_principal_free(tp_principal_t *p)
{
    if (p == NULL)
        return;
    free(p->id);
    free(p->name);
    free(p->email);
    tp_auth_strv_free(p->roles);
    tp_auth_strv_free(p->groups);
    if (p->access_token != NULL) {
        OPENSSL_cleanse(p->access_token, strlen(p->access_token));
        free(p->access_token);
    }
    free(p);
}

static const char *mode_name(tp_auth_mode_t m)
{
    switch (m) {
    case TP_AUTH_MODE_NONE: return "none";
    case TP_AUTH_MODE_TOKEN: return "token";
    case TP_AUTH_MODE_DATABRICKS_APPS: return "databricks-apps";
    case TP_AUTH_MODE_JWT: return "jwt";
    }
    return "?";
}

static void put_strv(tp_buf_t *b, char *const *v)
{
    tp_buf_putc(b, '[');
    for (size_t i = 0; v && v[i]; i++) {
        if (i)
            tp_buf_putc(b, ',');
        tp_buf_json_str(b, v[i]);
    }
    tp_buf_putc(b, ']');
}

static void put_opt_str(tp_buf_t *b, const char *s)
{
    if (s == NULL)
        tp_buf_puts(b, "null");
    else
        tp_buf_json_str(b, s);
}

void tp_principal_describe(const tp_principal_t *p, tp_buf_t *b)
{
    tp_buf_puts(b, "{\"id\":");
    put_opt_str(b, p->id);
    tp_buf_puts(b, ",\"name\":");
    put_opt_str(b, p->name);
    tp_buf_puts(b, ",\"email\":");
    put_opt_str(b, p->email);
    tp_buf_printf(b, ",\"mode\":\"%s\",\"roles\":", mode_name(p->mode));
    put_strv(b, p->roles);
    tp_buf_puts(b, ",\"groups\":");
    put_strv(b, p->groups);
    tp_buf_puts(b, ",\"credential_id\":");
    put_opt_str(b, p->credential_id[0] ? p->credential_id : NULL);
    tp_buf_puts(b, ",\"access_token\":");
    if (p->access_token != NULL) {
        char id[17];
        tp_auth_credential_id(p->access_token, strlen(p->access_token), id);
        tp_buf_printf(b, "\"[redacted sha256:%.8s]\"", id);
    } else {
        tp_buf_puts(b, "null");
    }
    tp_buf_putc(b, '}');
}

/* ---- addresses ---- */

/* Parses an address ("10.0.0.1", "::1", "[::1]"); IPv4-mapped IPv6 becomes IPv4. */
static bool parse_addr(const char *s, size_t n, int *family, unsigned char addr[16])
{
    char buf[INET6_ADDRSTRLEN + 3];
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']') {
        s++;
        n -= 2;
    }
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (inet_pton(AF_INET, buf, addr) == 1) {
        *family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, buf, addr) != 1)
        return false;
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (memcmp(addr, mapped, 12) == 0) {
        memmove(addr, addr + 12, 4);
        *family = AF_INET;
    } else {
        *family = AF_INET6;
    }
    return true;
}

static bool cidr_parse(const char *s, cidr_t *c)
{
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    memset(c, 0, sizeof *c);
    if (!parse_addr(s, n, &c->family, c->addr))
        return false;
    int max = c->family == AF_INET ? 32 : 128;
    int64_t bits = max;
    if (slash != NULL && !tp_parse_int64(slash + 1, 0, max, &bits))
        return false;
    c->bits = (int)bits;
    /* host bits must be zero: "10.0.0.1/8" is probably a typo */
    for (int i = c->bits; i < max; i++)
        if (c->addr[i / 8] & (0x80 >> (i % 8)))
            return false;
    return true;
}

static bool cidr_contains(const cidr_t *c, int family, const unsigned char *addr)
{
    if (c->family != family)
        return false;
    int full = c->bits / 8, rest = c->bits % 8;
    if (memcmp(c->addr, addr, (size_t)full) != 0)
        return false;
    if (rest == 0)
        return true;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (c->addr[full] & mask) == (addr[full] & mask);
}

static bool peer_trusted(const tp_auth_t *a, const char *peer)
{
    int family;
    unsigned char addr[16];
    if (peer == NULL || !parse_addr(peer, strlen(peer), &family, addr))
        return false;
    for (size_t i = 0; i < a->nproxies; i++)
        if (cidr_contains(&a->proxies[i], family, addr))
            return true;
    return false;
}

const char *tp_auth_client_address(const tp_auth_t *a, const tp_auth_request_t *r)
{
    const char *real = r->hdr[TP_AUTH_HDR_REAL_IP].value;
    int family;
    unsigned char addr[16];
    if (real != NULL && r->hdr[TP_AUTH_HDR_REAL_IP].count == 1 && peer_trusted(a, r->peer) &&
        parse_addr(real, strlen(real), &family, addr))
        return real;
    return r->peer ? r->peer : "";
}

/* ---- building ---- */

/* "FILE:LINE: auth.KEY" (or "auth.KEY" for defaults) for error messages. */
static void setting_where(const tp_config_t *c, const char *key, char *buf, size_t len)
{
    for (size_t i = 0; i < tp_settings_count; i++) {
        if (strcmp(tp_settings[i].section, "auth") != 0 || strcmp(tp_settings[i].key, key) != 0)
            continue;
        if (c->origin && c->origin[i].source == TP_CFG_SRC_FILE && c->path)
            snprintf(buf, len, "%s:%d: auth.%s", c->path, c->origin[i].line, key);
        else
            snprintf(buf, len, "auth.%s", key);
        return;
    }
    snprintf(buf, len, "auth.%s", key);
}

static bool build_fail(char *err, size_t errlen, const tp_config_t *c, const char *key,
                       const char *fmt, ...) TP_PRINTF(5, 6);
static bool build_fail(char *err, size_t errlen, const tp_config_t *c, const char *key,
                       const char *fmt, ...)
{
    char where[600];
    setting_where(c, key, where, sizeof where);
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(err, errlen, "%s: %s", where, msg);
    return false;
}

static bool build_proxies(tp_auth_t *a, const tp_config_t *c, char *err, size_t errlen)
{
    char *copy = tp_xstrdup(c->auth.trusted_proxies ? c->auth.trusted_proxies : "");
    bool ok = true;
    for (char *tok = copy, *next; ok && tok != NULL; tok = next) {
        next = strchr(tok, ',');
        if (next != NULL)
            *next++ = '\0';
        char *t = tp_strtrim(tok);
        if (*t == '\0')
            continue;
        a->proxies = tp_xrealloc(a->proxies, (a->nproxies + 1) * sizeof *a->proxies);
        if (!cidr_parse(t, &a->proxies[a->nproxies]))
            ok = build_fail(err, errlen, c, "trusted_proxies",
                            "\"%.80s\" is not an IP address or CIDR with zero host bits "
                            "(like 10.0.0.0/8 or fd00::/8)", t);
        else
            a->nproxies++;
    }
    free(copy);
    return ok;
}

/* "alice@example.com:writer+reader", "group:analysts:reader", "*:reader". */
static bool build_rules(tp_auth_t *a, const tp_config_t *c, char *err, size_t errlen)
{
    char *copy = tp_xstrdup(c->auth.roles ? c->auth.roles : "");
    bool ok = true;
    int no = 0;
    for (char *tok = copy, *next; ok && tok != NULL; tok = next) {
        next = strpbrk(tok, ",\n");
        if (next != NULL)
            *next++ = '\0';
        char *t = tp_strtrim(tok);
        if (*t == '\0')
            continue;
        no++;
        char *colon = strrchr(t, ':');
        if (colon == NULL || colon == t) {
            ok = build_fail(err, errlen, c, "roles",
                            "entry %d: expected USER:ROLE+ROLE, group:NAME:ROLE or *:ROLE", no);
            break;
        }
        *colon = '\0';
        char *subject = tp_strtrim(t);
        role_rule_t rule = {0};
        char rerr[160];
        if (!tp_auth_roles_parse(colon + 1, &rule.roles, rerr, sizeof rerr)) {
            ok = build_fail(err, errlen, c, "roles", "entry %d: %s", no, rerr);
            break;
        }
        if (strcmp(subject, "*") == 0) {
            rule.kind = RULE_ANY;
        } else if (strncmp(subject, "group:", 6) == 0 && subject[6] != '\0') {
            rule.kind = RULE_GROUP;
            rule.subject = tp_xstrdup(tp_strtrim(subject + 6));
        } else {
            rule.kind = RULE_USER;
            rule.subject = tp_xstrdup(subject);
        }
        a->rules = tp_xrealloc(a->rules, (a->nrules + 1) * sizeof *a->rules);
        a->rules[a->nrules++] = rule;
    }
    free(copy);
    return ok;
}

static bool build_tokens(tp_auth_t *a, const tp_config_t *c, char *err, size_t errlen)
{
    char where[600];
    setting_where(c, "tokens", where, sizeof where);
    a->config_tokens = tp_auth_tokens_parse(c->auth.tokens, where, err, errlen);
    if (a->config_tokens == NULL)
        return false;
    const char *path = c->auth.tokens_file;
    if (path != NULL && *path != '\0') {
        char *text = tp_read_file(path, NULL);
        if (text == NULL)
            return build_fail(err, errlen, c, "tokens_file", "cannot read %s: %s", path,
                              strerror(errno));
        bool ok = tp_auth_tokens_append(a->config_tokens, text, path, err, errlen);
        OPENSSL_cleanse(text, strlen(text));
        free(text);
        if (!ok)
            return false;
    }
    a->token_table = c->auth.token_table;
    if (tp_auth_tokens_count(a->config_tokens) == 0 && !a->token_table)
        return build_fail(err, errlen, c, "mode",
                          "token mode with no tokens: set auth.tokens, auth.tokens_file or "
                          "auth.token_table = true");
    return true;
}

static bool build_jwt(tp_auth_t *a, const tp_config_t *c, char *err, size_t errlen)
{
    a->jwt_keys = tp_jwt_keys_new();
    char kerr[400];
    const char *secret = c->auth.jwt_secret ? c->auth.jwt_secret : "";
    if (*secret != '\0' &&
        !tp_jwt_keys_set_hmac(a->jwt_keys, secret, strlen(secret), kerr, sizeof kerr))
        return build_fail(err, errlen, c, "jwt_secret", "%s", kerr);
    static const char *const file_keys[] = {"jwt_jwks_file", "jwt_public_key_file"};
    const char *paths[] = {c->auth.jwt_jwks_file, c->auth.jwt_public_key_file};
    for (int i = 0; i < 2; i++) {
        if (paths[i] == NULL || *paths[i] == '\0')
            continue;
        char *text = tp_read_file(paths[i], NULL);
        if (text == NULL)
            return build_fail(err, errlen, c, file_keys[i], "cannot read %s: %s", paths[i],
                              strerror(errno));
        bool ok = i == 0 ? tp_jwt_keys_add_jwks(a->jwt_keys, text, kerr, sizeof kerr)
                         : tp_jwt_keys_add_pem(a->jwt_keys, text, kerr, sizeof kerr);
        free(text);
        if (!ok)
            return build_fail(err, errlen, c, file_keys[i], "%s: %s", paths[i], kerr);
    }
    if (!tp_jwt_keys_has_hmac(a->jwt_keys) && tp_jwt_keys_rsa_count(a->jwt_keys) == 0)
        return build_fail(err, errlen, c, "mode",
                          "jwt mode needs auth.jwt_secret, auth.jwt_jwks_file or "
                          "auth.jwt_public_key_file");
    /* tp_config_load refuses this already; a config built any other way must not
     * give a verifier that skips aud or iss (tp_jwt_verify skips empty ones) */
    if (c->auth.jwt_audience == NULL || *c->auth.jwt_audience == '\0')
        return build_fail(err, errlen, c, "jwt_audience", "jwt mode needs an audience");
    if (c->auth.jwt_issuer == NULL || *c->auth.jwt_issuer == '\0')
        return build_fail(err, errlen, c, "jwt_issuer", "jwt mode needs an issuer");
    a->jwt_audience = tp_xstrdup(c->auth.jwt_audience);
    a->jwt_issuer = tp_xstrdup(c->auth.jwt_issuer);
    a->jwt_roles_claim = tp_xstrdup(c->auth.jwt_roles_claim ? c->auth.jwt_roles_claim : "");
    a->jwt_groups_claim = tp_xstrdup(c->auth.jwt_groups_claim ? c->auth.jwt_groups_claim : "");
    a->jwt_skew_s = c->auth.jwt_clock_skew_ms / 1000;
    return true;
}

/* auth.sync_roles: an empty list would let any caller run every sync job, so
 * it is refused rather than read as "anyone". */
static bool build_sync_roles(tp_auth_t *a, const tp_config_t *c, char *err, size_t errlen)
{
    char rerr[160];
    if (!tp_auth_roles_parse(c->auth.sync_roles ? c->auth.sync_roles : "admin", &a->sync_roles,
                             rerr, sizeof rerr))
        return build_fail(err, errlen, c, "sync_roles", "%s", rerr);
    if (a->sync_roles[0] == NULL)
        return build_fail(err, errlen, c, "sync_roles",
                          "name at least one role that may run sync jobs (default: admin)");
    return true;
}

tp_auth_t *tp_auth_new(const tp_config_t *c, char *err, size_t errlen)
{
    tp_auth_t *a = tp_xcalloc(1, sizeof *a);
    a->magic = AUTH_MAGIC;
    atomic_init(&a->refs, 1);
    pthread_mutex_init(&a->mu, NULL);
    const char *mode = c->auth.mode ? c->auth.mode : "none";
    bool ok = build_proxies(a, c, err, errlen) && build_rules(a, c, err, errlen) &&
              build_sync_roles(a, c, err, errlen);
    if (ok && strcmp(mode, "none") == 0) {
        a->mode = TP_AUTH_MODE_NONE;
        char rerr[160];
        ok = tp_auth_roles_parse(c->auth.anonymous_roles, &a->anonymous_roles, rerr, sizeof rerr) ||
             build_fail(err, errlen, c, "anonymous_roles", "%s", rerr);
    } else if (ok && strcmp(mode, "token") == 0) {
        a->mode = TP_AUTH_MODE_TOKEN;
        ok = build_tokens(a, c, err, errlen);
    } else if (ok && strcmp(mode, "databricks-apps") == 0) {
        a->mode = TP_AUTH_MODE_DATABRICKS_APPS;
        if (a->nproxies == 0)
            ok = build_fail(err, errlen, c, "trusted_proxies",
                            "databricks-apps mode needs at least one trusted proxy address");
    } else if (ok && strcmp(mode, "jwt") == 0) {
        a->mode = TP_AUTH_MODE_JWT;
        ok = build_jwt(a, c, err, errlen);
    } else if (ok) {
        ok = build_fail(err, errlen, c, "mode", "unknown mode \"%.40s\"", mode);
    }
    if (!ok) {
        tp_auth_free(a);
        return NULL;
    }
    return a;
}

tp_auth_t *tp_auth_ref(tp_auth_t *a)
{
    if (a != NULL)
        atomic_fetch_add(&a->refs, 1);
    return a;
}

void tp_auth_free(tp_auth_t *a)
{
    if (a == NULL || atomic_fetch_sub(&a->refs, 1) != 1)
        return;
    free(a->proxies);
    for (size_t i = 0; i < a->nrules; i++) {
        free(a->rules[i].subject);
        tp_auth_strv_free(a->rules[i].roles);
    }
    free(a->rules);
    tp_auth_strv_free(a->anonymous_roles);
    tp_auth_strv_free(a->sync_roles);
    tp_auth_tokens_release(a->config_tokens);
    tp_auth_tokens_release(a->db_tokens);
    tp_jwt_keys_free(a->jwt_keys);
    free(a->jwt_audience);
    free(a->jwt_issuer);
    free(a->jwt_roles_claim);
    free(a->jwt_groups_claim);
    pthread_mutex_destroy(&a->mu);
    a->magic = 0;
    free(a);
}

tp_auth_mode_t tp_auth_mode(const tp_auth_t *a)
{
    return a->mode;
}

const char *const *tp_auth_sync_roles(const tp_auth_t *a)
{
    return (const char *const *)a->sync_roles;
}

bool tp_auth_wants_token_table(const tp_auth_t *a)
{
    return a->mode == TP_AUTH_MODE_TOKEN && a->token_table;
}

void tp_auth_set_tokens(tp_auth_t *a, tp_auth_tokens_t *snapshot)
{
    pthread_mutex_lock(&a->mu);
    tp_auth_tokens_t *old = a->db_tokens;
    a->db_tokens = snapshot;
    pthread_mutex_unlock(&a->mu);
    tp_auth_tokens_release(old);
}

tp_auth_tokens_t *tp_auth_get_tokens(tp_auth_t *a)
{
    pthread_mutex_lock(&a->mu);
    tp_auth_tokens_t *t = tp_auth_tokens_ref(a->db_tokens);
    pthread_mutex_unlock(&a->mu);
    return t;
}

/* ---- roles ---- */

static bool role_implies(const char *have, const char *want)
{
    return strcmp(have, want) == 0 || strcmp(have, "admin") == 0 ||
           (strcmp(have, "writer") == 0 && strcmp(want, "reader") == 0);
}

bool tp_auth_allowed(const tp_principal_t *p, const char *const *required)
{
    if (p == NULL)
        return false;
    if (required == NULL || required[0] == NULL)
        return true;
    for (size_t i = 0; required[i]; i++)
        for (size_t j = 0; p->roles && p->roles[j]; j++)
            if (role_implies(p->roles[j], required[i]))
                return true;
    return false;
}

bool tp_auth_authorize(const tp_principal_t *p, const char *const *required,
                       tp_auth_result_t *refusal)
{
    if (tp_auth_allowed(p, required))
        return true;
    tp_buf_t b = {0};
    for (size_t i = 0; required && required[i]; i++)
        tp_buf_printf(&b, "%s%s", i ? "," : "", required[i]);
    refuse(refusal, 403, TP_AUTH_CODE_FORBIDDEN, "%.80s lacks any of roles %.120s",
           p ? p->id : "(nobody)", b.data ? b.data : "");
    tp_buf_free(&b);
    return false;
}

/* Adds the roles of every mapping rule that matches p. */
static void apply_rules(const tp_auth_t *a, tp_principal_t *p, const char *const *names)
{
    for (size_t i = 0; i < a->nrules; i++) {
        const role_rule_t *r = &a->rules[i];
        bool match = r->kind == RULE_ANY;
        for (size_t j = 0; !match && r->kind == RULE_USER && names[j]; j++)
            match = strcasecmp(names[j], r->subject) == 0;
        if (!match && r->kind == RULE_GROUP)
            match = strv_has(p->groups, r->subject);
        for (size_t k = 0; match && r->roles[k]; k++)
            strv_add(&p->roles, r->roles[k]);
    }
}

/* ---- modes ---- */

static bool check_none(const tp_auth_t *a, tp_auth_result_t *out)
{
    tp_principal_t *p = principal_new(TP_AUTH_MODE_NONE, "anonymous");
    for (size_t i = 0; a->anonymous_roles[i]; i++)
        strv_add(&p->roles, a->anonymous_roles[i]);
    return grant(out, p);
}

/* The credential of "Authorization: Bearer X" into tok and len, or a refusal. */
static bool bearer(const tp_auth_request_t *r, const char **tok, size_t *len,
                   tp_auth_result_t *out)
{
    const char *h = r->hdr[TP_AUTH_HDR_AUTHORIZATION].value;
    if (h == NULL) {
        refuse(out, 401, TP_AUTH_CODE_MISSING, "no Authorization header");
        out->www_authenticate = WWW_BEARER;
        return false;
    }
    const char *why = NULL;
    if (strncasecmp(h, "Bearer ", 7) != 0)
        why = "Authorization scheme is not Bearer";
    const char *t = h + 7;
    while (why == NULL && *t == ' ')
        t++;
    size_t n = why ? 0 : strnlen(t, MAX_BEARER_LEN + 1);
    while (why == NULL && n > 0 && t[n - 1] == ' ')
        n--;
    if (why == NULL && n > MAX_BEARER_LEN)
        why = "bearer token longer than 8 KiB";
    else if (why == NULL && n == 0)
        why = "empty bearer token";
    for (size_t i = 0; why == NULL && i < n; i++) /* RFC 6750 b64token */
        if (!isalnum((unsigned char)t[i]) && !strchr("-._~+/=", t[i]))
            why = "bearer token has characters outside RFC 6750 token68";
    if (why != NULL) {
        refuse(out, 401, TP_AUTH_CODE_INVALID, "%s", why);
        out->www_authenticate = WWW_BEARER_INVALID;
        return false;
    }
    *tok = t;
    *len = n;
    return true;
}

static bool check_token(tp_auth_t *a, const tp_auth_request_t *r, tp_auth_result_t *out)
{
    const char *tok;
    size_t len;
    if (!bearer(r, &tok, &len, out))
        return false;
    unsigned char digest[32];
    SHA256((const unsigned char *)tok, len, digest);
    char cid[17];
    for (int i = 0; i < 8; i++)
        snprintf(cid + 2 * i, 3, "%02x", digest[i]);
    tp_auth_tokens_t *db = a->token_table ? tp_auth_get_tokens(a) : NULL;
    const tp_auth_token_entry_t *e = tp_auth_tokens_find(a->config_tokens, digest);
    const tp_auth_token_entry_t *e_db = tp_auth_tokens_find(db, digest);
    if (e == NULL)
        e = e_db;
    bool ok = false;
    if (e == NULL)
        refuse(out, 401, TP_AUTH_CODE_INVALID, "token: unknown token (credential id %s)%s", cid,
               a->token_table && db == NULL ? "; token table not loaded" : "");
    else if (e->revoked)
        refuse(out, 401, TP_AUTH_CODE_INVALID, "token: \"%.64s\" (id %lld) is revoked", e->name,
               (long long)e->id);
    else if (e->expires_at != 0 && e->expires_at <= r->now_s)
        refuse(out, 401, TP_AUTH_CODE_INVALID, "token: \"%.64s\" (id %lld) expired at %lld",
               e->name, (long long)e->id, (long long)e->expires_at);
    else
        ok = true;
    if (!ok) {
        out->www_authenticate = WWW_BEARER_INVALID;
    } else {
        char *id = tp_xasprintf("token:%s", e->name);
        tp_principal_t *p = principal_new(TP_AUTH_MODE_TOKEN, id);
        free(id);
        p->name = tp_xstrdup(e->name);
        for (size_t i = 0; e->roles[i]; i++)
            strv_add(&p->roles, e->roles[i]);
        memcpy(p->credential_id, cid, sizeof cid);
        grant(out, p);
    }
    tp_auth_tokens_release(db);
    OPENSSL_cleanse(digest, sizeof digest);
    return ok;
}

/* Splits a comma-separated groups value into p->groups. */
static void add_groups_csv(tp_principal_t *p, const char *csv)
{
    while (csv && *csv) {
        size_t n = strcspn(csv, ",");
        char *g = tp_xstrndup(csv, n);
        char *t = tp_strtrim(g);
        if (*t)
            strv_add(&p->groups, t);
        free(g);
        csv += n;
        if (*csv)
            csv++;
    }
}

static bool check_apps(const tp_auth_t *a, const tp_auth_request_t *r, tp_auth_result_t *out)
{
    const char *email = r->hdr[TP_AUTH_HDR_FWD_EMAIL].value;
    const char *user = r->hdr[TP_AUTH_HDR_FWD_USER].value;
    const char *pref = r->hdr[TP_AUTH_HDR_FWD_PREFERRED_USERNAME].value;
    const char *atok = r->hdr[TP_AUTH_HDR_FWD_ACCESS_TOKEN].value;
    const char *groups = r->hdr[TP_AUTH_HDR_FWD_GROUPS].value;
    bool any = email || user || pref || atok || groups;
    if (!peer_trusted(a, r->peer))
        return refuse(out, 401, any ? TP_AUTH_CODE_INVALID : TP_AUTH_CODE_MISSING,
                      "databricks-apps: peer %.64s is not a trusted proxy%s",
                      r->peer ? r->peer : "(unknown)",
                      any ? "; its forwarded identity headers were ignored" : "");
    if (email == NULL && user == NULL && pref == NULL)
        return refuse(out, 401, TP_AUTH_CODE_MISSING,
                      "databricks-apps: no X-Forwarded-Email/User/Preferred-Username");
    const char *vals[] = {email, user, pref};
    for (int i = 0; i < 3; i++)
        if (vals[i] != NULL && (!clean_value(vals[i], MAX_IDENTITY_LEN) || *vals[i] == '\0'))
            return refuse(out, 401, TP_AUTH_CODE_INVALID,
                          "databricks-apps: %s is empty, too long or has control characters",
                          tp_auth_header_names[TP_AUTH_HDR_FWD_EMAIL + i]);
    if (atok != NULL && (!clean_value(atok, MAX_ACCESS_TOKEN_LEN) || *atok == '\0'))
        return refuse(out, 401, TP_AUTH_CODE_INVALID,
                      "databricks-apps: X-Forwarded-Access-Token is empty, too long or has "
                      "control characters");
    if (groups != NULL && !clean_value(groups, MAX_GROUPS_LEN))
        return refuse(out, 401, TP_AUTH_CODE_INVALID,
                      "databricks-apps: X-Forwarded-Groups is too long or has control "
                      "characters");
    tp_principal_t *p = principal_new(TP_AUTH_MODE_DATABRICKS_APPS,
                                      email ? email : user ? user : pref);
    p->email = email ? tp_xstrdup(email) : NULL;
    p->name = tp_xstrdup(pref ? pref : email ? email : user);
    p->access_token = atok ? tp_xstrdup(atok) : NULL;
    add_groups_csv(p, groups);
    const char *names[] = {email ? email : "", user ? user : "", pref ? pref : "", NULL};
    apply_rules(a, p, names);
    return grant(out, p);
}

/* Adds the string or array-of-strings claim at path to *v (role names are
 * validated; invalid ones are skipped). */
static void claim_strings(json_t *claims, const char *path, char ***v, bool roles)
{
    if (path == NULL || *path == '\0')
        return;
    json_t *c = tp_jwt_claim(claims, path);
    size_t i;
    json_t *x;
    if (json_is_string(c)) {
        const char *s = json_string_value(c);
        if (!roles || valid_role(s, strlen(s)))
            strv_add(v, s);
        return;
    }
    if (!json_is_array(c))
        return;
    json_array_foreach(c, i, x) {
        const char *s = json_string_value(x);
        if (s != NULL && strlen(s) <= MAX_IDENTITY_LEN && (!roles || valid_role(s, strlen(s))))
            strv_add(v, s);
    }
}

static bool check_jwt(const tp_auth_t *a, const tp_auth_request_t *r, tp_auth_result_t *out)
{
    const char *tok;
    size_t len;
    if (!bearer(r, &tok, &len, out))
        return false;
    char cid[17];
    tp_auth_credential_id(tok, len, cid);
    char *t = tp_xstrndup(tok, len);
    tp_jwt_opts_t o = {.audience = a->jwt_audience, .issuer = a->jwt_issuer,
                       .skew_s = a->jwt_skew_s, .now_s = r->now_s};
    json_t *claims = NULL;
    char why[200];
    tp_jwt_err_t e = tp_jwt_verify(a->jwt_keys, t, &o, &claims, why, sizeof why);
    free(t);
    const char *sub = NULL;
    if (e == TP_JWT_OK) {
        sub = json_string_value(json_object_get(claims, "sub"));
        if (sub == NULL || *sub == '\0' || !clean_value(sub, MAX_IDENTITY_LEN)) {
            e = TP_JWT_MALFORMED;
            snprintf(why, sizeof why, "no usable sub claim");
        }
    }
    if (e != TP_JWT_OK) {
        json_decref(claims);
        refuse(out, 401, TP_AUTH_CODE_INVALID, "jwt: %s: %s (credential id %s)",
               tp_jwt_err_name(e), why, cid);
        out->www_authenticate = WWW_BEARER_INVALID;
        return false;
    }
    tp_principal_t *p = principal_new(TP_AUTH_MODE_JWT, sub);
    const char *email = json_string_value(json_object_get(claims, "email"));
    const char *name = json_string_value(json_object_get(claims, "preferred_username"));
    if (name == NULL)
        name = json_string_value(json_object_get(claims, "name"));
    if (email != NULL && clean_value(email, MAX_IDENTITY_LEN))
        p->email = tp_xstrdup(email);
    if (name != NULL && clean_value(name, MAX_IDENTITY_LEN))
        p->name = tp_xstrdup(name);
    memcpy(p->credential_id, cid, sizeof cid);
    claim_strings(claims, a->jwt_roles_claim, &p->roles, true);
    claim_strings(claims, a->jwt_groups_claim, &p->groups, false);
    const char *names[] = {sub, p->email ? p->email : "", p->name ? p->name : "", NULL};
    apply_rules(a, p, names);
    json_decref(claims);
    return grant(out, p);
}

/* Modes none, token and jwt: the granted principal takes the on-behalf-of
 * X-Forwarded-Access-Token only from a trusted proxy, as databricks-apps mode
 * does. From anyone else it is ignored: a client must not get warehouse
 * queries run with a user token its own credential does not vouch for. A
 * malformed one from a trusted proxy is refused (the principal is freed). */
static bool take_access_token(const tp_auth_t *a, const tp_auth_request_t *r,
                              tp_auth_result_t *out)
{
    const char *atok = r->hdr[TP_AUTH_HDR_FWD_ACCESS_TOKEN].value;
    if (atok == NULL || !peer_trusted(a, r->peer))
        return true;
    if (!clean_value(atok, MAX_ACCESS_TOKEN_LEN) || *atok == '\0') {
        tp_auth_result_clear(out);
        return refuse(out, 401, TP_AUTH_CODE_INVALID,
                      "X-Forwarded-Access-Token is empty, too long or has control characters");
    }
    out->principal->access_token = tp_xstrdup(atok);
    return true;
}

/* The headers a mode reads (and so refuses when repeated). X-Real-Ip is not
 * one: a repeated one only makes tp_auth_client_address fall back to the peer. */
static bool header_used(tp_auth_mode_t mode, tp_auth_hdr_t h)
{
    switch (mode) {
    case TP_AUTH_MODE_NONE:
        return h == TP_AUTH_HDR_FWD_ACCESS_TOKEN;
    case TP_AUTH_MODE_TOKEN:
    case TP_AUTH_MODE_JWT:
        return h == TP_AUTH_HDR_AUTHORIZATION || h == TP_AUTH_HDR_FWD_ACCESS_TOKEN;
    case TP_AUTH_MODE_DATABRICKS_APPS:
        return h != TP_AUTH_HDR_AUTHORIZATION && h != TP_AUTH_HDR_REAL_IP;
    }
    return true;
}

bool tp_auth_check(tp_auth_t *a, const tp_auth_request_t *r, tp_auth_result_t *out)
{
    memset(out, 0, sizeof *out);
    if (a == NULL || a->magic != AUTH_MAGIC)
        return refuse(out, 401, TP_AUTH_CODE_INVALID, "auth verifier missing or corrupt");
    for (int i = 0; i < TP_AUTH_HDR_COUNT; i++)
        if (r->hdr[i].count > 1 && header_used(a->mode, (tp_auth_hdr_t)i))
            return refuse(out, 401, TP_AUTH_CODE_INVALID, "header %s appears %u times",
                          tp_auth_header_names[i], r->hdr[i].count);
    switch (a->mode) {
    case TP_AUTH_MODE_NONE:
        return check_none(a, out) && take_access_token(a, r, out);
    case TP_AUTH_MODE_TOKEN:
        return check_token(a, r, out) && take_access_token(a, r, out);
    case TP_AUTH_MODE_DATABRICKS_APPS:
        return check_apps(a, r, out);
    case TP_AUTH_MODE_JWT:
        return check_jwt(a, r, out) && take_access_token(a, r, out);
    }
    return refuse(out, 401, TP_AUTH_CODE_INVALID, "unknown mode");
}

void tp_auth_log_refusal(const tp_auth_result_t *r, const char *client, const char *request_id)
{
    char status[8];
    snprintf(status, sizeof status, "%d", r->status);
    const char *kv[] = {"status", status, "code", r->code, "reason", r->reason,
                        "client", client, "request_id", request_id, NULL};
    tp_logkv(TP_LOG_WARN, kv, "%s",
             r->status == 403 ? "authorization refused" : "authentication refused");
}
