/* API bearer token sets and their command-line management.
 *
 * A tp_auth_tokens_t is an immutable array of entries with an atomic
 * reference count, so the server can swap a fresh snapshot into tp_auth_t
 * while requests still hold the old one. Sets come from config text or from
 * the tidepool.api_tokens table (sql/migrations/0001). Lookup hashes nothing
 * itself: the caller passes SHA-256(presented token); entries are sorted by
 * digest and found by binary search, the final equality with CRYPTO_memcmp.
 * The search's timing can only reveal how the presented token's digest
 * orders against stored digests, which gives no way to a preimage: no
 * secret leaks, and a 10 000-token table costs a few microseconds.
 *
 * The create/revoke/list functions are blocking libpq calls for the
 * `tidepool-server token` command (never on an event loop). create draws the
 * secret from RAND_bytes, stores only the digest, and hands the secret back
 * exactly once. Nothing here logs; nothing here prints a hash in an error. */
#include "tidepool/auth_tokens.h"

#include <ctype.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "tidepool/jwt.h"
#include "tidepool/pg.h"

struct tp_auth_tokens {
    atomic_int refs;
    tp_auth_token_entry_t *e;
    size_t n;
};

static tp_auth_tokens_t *set_new(void)
{
    tp_auth_tokens_t *t = tp_xcalloc(1, sizeof *t);
    atomic_init(&t->refs, 1);
    return t;
}

static tp_auth_token_entry_t *set_add(tp_auth_tokens_t *t)
{
    t->e = tp_xrealloc(t->e, (t->n + 1) * sizeof *t->e);
    tp_auth_token_entry_t *e = &t->e[t->n++];
    memset(e, 0, sizeof *e);
    return e;
}

static void set_free(tp_auth_tokens_t *t)
{
    for (size_t i = 0; i < t->n; i++) {
        free(t->e[i].name);
        tp_auth_strv_free(t->e[i].roles);
    }
    free(t->e);
    free(t);
}

tp_auth_tokens_t *tp_auth_tokens_ref(tp_auth_tokens_t *t)
{
    if (t != NULL)
        atomic_fetch_add(&t->refs, 1);
    return t;
}

void tp_auth_tokens_release(tp_auth_tokens_t *t)
{
    if (t != NULL && atomic_fetch_sub(&t->refs, 1) == 1)
        set_free(t);
}

size_t tp_auth_tokens_count(const tp_auth_tokens_t *t)
{
    return t ? t->n : 0;
}

static int entry_cmp(const void *a, const void *b)
{
    return memcmp(((const tp_auth_token_entry_t *)a)->sha256,
                  ((const tp_auth_token_entry_t *)b)->sha256, 32);
}

/* Entries are kept sorted by digest so lookup is a binary search. */
static void set_sort(tp_auth_tokens_t *t)
{
    if (t->n > 1)
        qsort(t->e, t->n, sizeof *t->e, entry_cmp);
}

const tp_auth_token_entry_t *tp_auth_tokens_find(const tp_auth_tokens_t *t,
                                                 const unsigned char digest[32])
{
    if (t == NULL)
        return NULL;
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (memcmp(t->e[mid].sha256, digest, 32) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < t->n && CRYPTO_memcmp(t->e[lo].sha256, digest, 32) == 0)
        return &t->e[lo];
    return NULL;
}

static bool hex_to_digest(const char *hex, size_t len, unsigned char out[32])
{
    if (len != 64)
        return false;
    for (size_t i = 0; i < 32; i++) {
        unsigned v = 0;
        for (int j = 0; j < 2; j++) {
            int c = tolower((unsigned char)hex[2 * i + j]);
            if (c >= '0' && c <= '9')
                v = v << 4 | (unsigned)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v = v << 4 | (unsigned)(c - 'a' + 10);
            else
                return false;
        }
        out[i] = (unsigned char)v;
    }
    return true;
}

static bool valid_token_name(const char *s, size_t n)
{
    if (n == 0 || n > 128)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || s[i] == 0x7f || s[i] == ':' || s[i] == ',')
            return false;
    return true;
}

/* One "name:roles:hex" entry (already trimmed) into t. */
static bool parse_entry(tp_auth_tokens_t *t, char *entry, int no, const char *where, char *err,
                        size_t errlen)
{
    char *c1 = strchr(entry, ':');
    char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (c1 == NULL || c2 == NULL || strchr(c2 + 1, ':') != NULL) {
        snprintf(err, errlen, "%s: entry %d: expected name:role+role:sha256hex", where, no);
        return false;
    }
    *c1 = *c2 = '\0';
    char *name = tp_strtrim(entry), *roles = tp_strtrim(c1 + 1), *hex = tp_strtrim(c2 + 1);
    if (!valid_token_name(name, strlen(name))) {
        snprintf(err, errlen, "%s: entry %d: name must be 1-128 characters without spaces, "
                 "':' or ','", where, no);
        return false;
    }
    unsigned char digest[32];
    if (!hex_to_digest(hex, strlen(hex), digest)) {
        snprintf(err, errlen, "%s: entry %d (%s): the hash must be 64 hex digits "
                 "(sha256sum of the token)", where, no, name);
        return false;
    }
    char **rv = NULL;
    char rerr[160];
    if (!tp_auth_roles_parse(roles, &rv, rerr, sizeof rerr)) {
        snprintf(err, errlen, "%s: entry %d (%s): %s", where, no, name, rerr);
        return false;
    }
    for (size_t i = 0; i < t->n; i++) {
        const char *what = strcmp(t->e[i].name, name) == 0 ? "name"
                           : memcmp(t->e[i].sha256, digest, 32) == 0 ? "hash" : NULL;
        if (what != NULL) {
            snprintf(err, errlen, "%s: entry %d (%s): same %s as token \"%s\"", where, no,
                     name, what, t->e[i].name);
            tp_auth_strv_free(rv);
            return false;
        }
    }
    tp_auth_token_entry_t *e = set_add(t);
    e->name = tp_xstrdup(name);
    memcpy(e->sha256, digest, 32);
    e->roles = rv;
    return true;
}

bool tp_auth_tokens_append(tp_auth_tokens_t *t, const char *text, const char *where, char *err,
                           size_t errlen)
{
    char *copy = tp_xstrdup(text ? text : "");
    int no = 0, lineno = 0;
    bool ok = true;
    bool multiline = strchr(copy, '\n') != NULL;
    char lwhere[600];
    for (char *line = copy, *next; ok && line != NULL; line = next) {
        lineno++;
        if (multiline) /* a file: say which line */
            snprintf(lwhere, sizeof lwhere, "%s:%d", where, lineno);
        else
            snprintf(lwhere, sizeof lwhere, "%s", where);
        next = strchr(line, '\n');
        if (next != NULL)
            *next++ = '\0';
        char *hash = strchr(line, '#');
        if (hash != NULL)
            *hash = '\0';
        for (char *ent = line, *nent; ok && ent != NULL; ent = nent) {
            nent = strchr(ent, ',');
            if (nent != NULL)
                *nent++ = '\0';
            ent = tp_strtrim(ent);
            if (*ent != '\0')
                ok = parse_entry(t, ent, ++no, lwhere, err, errlen);
        }
    }
    OPENSSL_cleanse(copy, strlen(copy));
    free(copy);
    set_sort(t);
    return ok;
}

tp_auth_tokens_t *tp_auth_tokens_parse(const char *text, const char *where, char *err,
                                       size_t errlen)
{
    tp_auth_tokens_t *t = set_new();
    if (!tp_auth_tokens_append(t, text, where, err, errlen)) {
        tp_auth_tokens_release(t);
        return NULL;
    }
    return t;
}

/* Roles as a JSON array text ("[\"reader\"]") into a strv. */
static bool roles_from_json(const char *text, char ***out)
{
    json_t *a = json_loads(text, 0, NULL);
    if (!json_is_array(a)) {
        json_decref(a);
        return false;
    }
    tp_buf_t b = {0};
    size_t i;
    json_t *v;
    bool ok = true;
    json_array_foreach(a, i, v) {
        if (!json_is_string(v)) {
            ok = false;
            break;
        }
        tp_buf_printf(&b, "%s%s", i ? "," : "", json_string_value(v));
    }
    json_decref(a);
    char err[64];
    ok = ok && tp_auth_roles_parse(b.data ? b.data : "", out, err, sizeof err);
    tp_buf_free(&b);
    return ok;
}

tp_auth_tokens_t *tp_auth_tokens_from_result(const PGresult *res, char *err, size_t errlen)
{
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != 6) {
        snprintf(err, errlen, "api_tokens: unexpected result shape");
        return NULL;
    }
    tp_auth_tokens_t *t = set_new();
    for (int r = 0; r < PQntuples(res); r++) {
        tp_auth_token_entry_t *e = set_add(t);
        const char *hex = PQgetvalue(res, r, 2);
        bool ok = tp_parse_int64(PQgetvalue(res, r, 0), 1, INT64_MAX, &e->id) &&
                  hex_to_digest(hex, strlen(hex), e->sha256) &&
                  roles_from_json(PQgetvalue(res, r, 3), &e->roles) &&
                  (PQgetisnull(res, r, 4) ||
                   tp_parse_int64(PQgetvalue(res, r, 4), 1, INT64_MAX, &e->expires_at));
        e->name = tp_xstrdup(PQgetvalue(res, r, 1));
        e->revoked = strcmp(PQgetvalue(res, r, 5), "t") == 0;
        if (!ok) {
            snprintf(err, errlen, "api_tokens: row id %s has an invalid hash, roles or expiry",
                     PQgetvalue(res, r, 0));
            tp_auth_tokens_release(t);
            return NULL;
        }
    }
    set_sort(t);
    return t;
}

tp_auth_tokens_t *tp_auth_tokens_load(PGconn *conn, char *err, size_t errlen)
{
    PGresult *res = tp_pg_query(conn, TP_AUTH_TOKENS_SQL, 0, NULL, err, errlen);
    if (res == NULL)
        return NULL;
    tp_auth_tokens_t *t = tp_auth_tokens_from_result(res, err, errlen);
    PQclear(res);
    return t;
}

/* ---- command-line operations (blocking) ---- */

/* {"a","b"} -> Postgres array literal {"a","b"}; names are validated, so no escaping needed. */
static char *pg_array(const char *const *v)
{
    tp_buf_t b = {0};
    tp_buf_putc(&b, '{');
    for (size_t i = 0; v && v[i]; i++)
        tp_buf_printf(&b, "%s\"%s\"", i ? "," : "", v[i]);
    tp_buf_putc(&b, '}');
    return tp_buf_steal(&b);
}

bool tp_auth_token_create(PGconn *conn, const char *name, const char *const *roles, int64_t ttl_s,
                          const char *created_by, char **secret_out, int64_t *id_out, char *err,
                          size_t errlen)
{
    *secret_out = NULL;
    if (name == NULL || !valid_token_name(name, strlen(name))) {
        snprintf(err, errlen, "token name must be 1-128 characters without spaces, ':' or ','");
        return false;
    }
    /* re-validate roles through the one parser */
    char *joined = pg_array(roles);
    tp_buf_t plain = {0};
    for (size_t i = 0; roles && roles[i]; i++)
        tp_buf_printf(&plain, "%s%s", i ? "," : "", roles[i]);
    char **rv = NULL;
    bool ok = tp_auth_roles_parse(plain.data ? plain.data : "", &rv, err, errlen);
    tp_auth_strv_free(rv);
    tp_buf_free(&plain);
    if (!ok || ttl_s < 0) {
        if (ok)
            snprintf(err, errlen, "ttl must not be negative");
        free(joined);
        return false;
    }
    unsigned char raw[32], digest[32];
    if (RAND_bytes(raw, sizeof raw) != 1) {
        snprintf(err, errlen, "cannot draw random bytes from OpenSSL");
        free(joined);
        return false;
    }
    char *b64 = tp_b64url_encode(raw, sizeof raw);
    OPENSSL_cleanse(raw, sizeof raw);
    char *secret = tp_xasprintf(TP_AUTH_TOKEN_PREFIX "%s", b64);
    OPENSSL_cleanse(b64, strlen(b64));
    free(b64);
    SHA256((const unsigned char *)secret, strlen(secret), digest);
    char hex[65];
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_s);
    const char *params[] = {name, hex, joined, ttl, created_by};
    PGresult *res = tp_pg_query(
        conn,
        "WITH t AS (INSERT INTO tidepool.api_tokens (name, token_sha256, roles, expires_at, "
        "created_by) VALUES ($1, decode($2, 'hex'), $3::text[], CASE WHEN $4::bigint > 0 THEN "
        "now() + make_interval(secs => $4::bigint) END, $5) RETURNING id) "
        "SELECT id, pg_notify('" TP_AUTH_NOTIFY_CHANNEL "', 'tokens') FROM t",
        5, params, err, errlen);
    free(joined);
    if (res == NULL) {
        if (strstr(err, "23505") != NULL)
            snprintf(err, errlen, "an active token named \"%s\" already exists; revoke it first",
                     name);
        OPENSSL_cleanse(secret, strlen(secret));
        free(secret);
        return false;
    }
    int64_t id = 0;
    ok = tp_parse_int64(PQgetvalue(res, 0, 0), 1, INT64_MAX, &id);
    if (id_out)
        *id_out = id;
    PQclear(res);
    *secret_out = secret;
    return ok;
}

bool tp_auth_token_revoke(PGconn *conn, const char *name_or_id, int *count_out, char *err,
                          size_t errlen)
{
    *count_out = 0;
    int64_t id = 0;
    bool by_id = tp_parse_int64(name_or_id, 1, INT64_MAX, &id);
    const char *params[] = {name_or_id};
    PGresult *res = tp_pg_query(
        conn,
        by_id ? "WITH r AS (UPDATE tidepool.api_tokens SET revoked_at = now() WHERE id = "
                "$1::bigint AND revoked_at IS NULL RETURNING 1) SELECT count(*), "
                "pg_notify('" TP_AUTH_NOTIFY_CHANNEL "', 'tokens') FROM r"
              : "WITH r AS (UPDATE tidepool.api_tokens SET revoked_at = now() WHERE name = $1 "
                "AND revoked_at IS NULL RETURNING 1) SELECT count(*), "
                "pg_notify('" TP_AUTH_NOTIFY_CHANNEL "', 'tokens') FROM r",
        1, params, err, errlen);
    if (res == NULL)
        return false;
    *count_out = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return true;
}

static int usage(FILE *errf)
{
    fputs("usage: token create NAME --roles ROLE[,ROLE...] [--ttl DURATION] [--created-by WHO]\n"
          "       token revoke NAME|ID\n"
          "       token list\n",
          errf);
    return 2;
}

static int cmd_create(PGconn *conn, int argc, char **argv, FILE *out, FILE *errf)
{
    const char *name = NULL, *roles = NULL, *ttl = NULL, *by = NULL;
    for (int i = 1; i < argc; i++) {
        const char **slot = strcmp(argv[i], "--roles") == 0        ? &roles
                            : strcmp(argv[i], "--ttl") == 0        ? &ttl
                            : strcmp(argv[i], "--created-by") == 0 ? &by
                                                                   : NULL;
        if (slot != NULL && i + 1 < argc)
            *slot = argv[++i];
        else if (slot == NULL && argv[i][0] != '-' && name == NULL)
            name = argv[i];
        else
            return usage(errf);
    }
    if (name == NULL || roles == NULL)
        return usage(errf);
    int64_t ttl_ms = 0;
    if (ttl != NULL && (!tp_parse_duration_ms(ttl, &ttl_ms) || ttl_ms < 1000)) {
        fprintf(errf, "token create: --ttl \"%s\" is not a duration of at least 1s (like 90d)\n",
                ttl);
        return 2;
    }
    char err[512];
    char **rv = NULL;
    if (!tp_auth_roles_parse(roles, &rv, err, sizeof err)) {
        fprintf(errf, "token create: --roles: %s\n", err);
        return 2;
    }
    char *secret = NULL;
    int64_t id = 0;
    bool ok = tp_auth_token_create(conn, name, (const char *const *)rv, ttl_ms / 1000, by,
                                   &secret, &id, err, sizeof err);
    tp_auth_strv_free(rv);
    if (!ok) {
        fprintf(errf, "token create: %s\n", err);
        return 1;
    }
    char cid[17];
    tp_auth_credential_id(secret, strlen(secret), cid);
    fprintf(out, "%s\n", secret);
    fprintf(errf, "created token %lld \"%s\" (credential id %s). The secret above is shown "
            "once and will not be shown again: store it now.\n",
            (long long)id, name, cid);
    OPENSSL_cleanse(secret, strlen(secret));
    free(secret);
    return 0;
}

static int cmd_list(PGconn *conn, FILE *out, FILE *errf)
{
    char err[512];
    PGresult *res = tp_pg_query(
        conn,
        "SELECT id, name, array_to_string(roles, ','), to_char(created_at AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), coalesce(to_char(expires_at AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'never'), CASE WHEN revoked_at IS NOT NULL THEN "
        "'revoked' WHEN expires_at <= now() THEN 'expired' ELSE 'active' END, "
        "substr(encode(token_sha256, 'hex'), 1, 16) FROM tidepool.api_tokens ORDER BY id",
        0, NULL, err, sizeof err);
    if (res == NULL) {
        fprintf(errf, "token list: %s\n", err);
        return 1;
    }
    fprintf(out, "%-6s %-24s %-24s %-20s %-20s %-8s %s\n", "ID", "NAME", "ROLES", "CREATED",
            "EXPIRES", "STATE", "CREDENTIAL ID");
    for (int r = 0; r < PQntuples(res); r++)
        fprintf(out, "%-6s %-24s %-24s %-20s %-20s %-8s %s\n", PQgetvalue(res, r, 0),
                PQgetvalue(res, r, 1), PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
                PQgetvalue(res, r, 4), PQgetvalue(res, r, 5), PQgetvalue(res, r, 6));
    PQclear(res);
    return 0;
}

int tp_auth_token_command(PGconn *conn, int argc, char **argv, FILE *out, FILE *errf)
{
    if (argc < 1)
        return usage(errf);
    if (strcmp(argv[0], "create") == 0)
        return cmd_create(conn, argc, argv, out, errf);
    if (strcmp(argv[0], "list") == 0 && argc == 1)
        return cmd_list(conn, out, errf);
    if (strcmp(argv[0], "revoke") == 0 && argc == 2) {
        char err[512];
        int n = 0;
        if (!tp_auth_token_revoke(conn, argv[1], &n, err, sizeof err)) {
            fprintf(errf, "token revoke: %s\n", err);
            return 1;
        }
        if (n == 0) {
            fprintf(errf, "token revoke: no active token named or numbered \"%s\"\n", argv[1]);
            return 1;
        }
        fprintf(out, "revoked %d token%s\n", n, n == 1 ? "" : "s");
        return 0;
    }
    return usage(errf);
}
