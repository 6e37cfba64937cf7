/* API bearer tokens for auth mode "token": immutable, reference-counted sets
 * of (name, SHA-256, roles, expiry, revoked) built from the config
 * (`name:role+role:sha256hex` entries) or from the tidepool.api_tokens table,
 * constant-time lookup by digest, and the blocking command-line operations
 * (create with print-once secret, revoke, list) behind
 * `tidepool-server token ...`. Secrets are never stored: only their SHA-256. */
#ifndef TIDEPOOL_AUTH_TOKENS_H
#define TIDEPOOL_AUTH_TOKENS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <libpq-fe.h>

#include "tidepool/auth.h"
#include "tidepool/util.h"

/* Generated secrets look like "tpk_" + 43 base64url characters (32 random bytes). */
#define TP_AUTH_TOKEN_PREFIX "tpk_"
/* create and revoke send NOTIFY on this channel (payload "tokens") so servers
 * reload their snapshot at once. */
#define TP_AUTH_NOTIFY_CHANNEL "tidepool_auth"
/* The query a snapshot is built from (for a server that runs it itself,
 * asynchronously, and hands the result to tp_auth_tokens_from_result). */
#define TP_AUTH_TOKENS_SQL                                                                     \
    "SELECT id, name, encode(token_sha256, 'hex'), array_to_json(roles)::text, "              \
    "floor(extract(epoch FROM expires_at))::bigint, revoked_at IS NOT NULL "                   \
    "FROM tidepool.api_tokens ORDER BY id"

typedef struct tp_auth_token_entry {
    int64_t id; /* table id; 0 for config entries */
    char *name;
    unsigned char sha256[32];
    char **roles;       /* NULL-terminated */
    int64_t expires_at; /* Unix seconds; 0 = never */
    bool revoked;
} tp_auth_token_entry_t;

/* Parses config entries "name:role+role:sha256hex" separated by commas or
 * newlines ('#' starts a comment to the end of the line). where prefixes
 * errors ("tidepool.conf:12: auth.tokens"; text of several lines, like a
 * tokens file, gets ":LINE" appended); an error names the entry by its number
 * and name, never quoting the hash. Returns a set with one reference,
 * or NULL. An empty text gives an empty set. */
tp_auth_tokens_t *tp_auth_tokens_parse(const char *text, const char *where, char *err,
                                       size_t errlen) TP_WUR;
/* Adds the entries of text (same format) to t, which the caller must own
 * alone (not yet shared); names and hashes must stay unique across the set.
 * On failure t may hold the entries before the bad one: release it. */
bool tp_auth_tokens_append(tp_auth_tokens_t *t, const char *text, const char *where, char *err,
                           size_t errlen) TP_WUR;
/* Builds a set from the rows of TP_AUTH_TOKENS_SQL. NULL with err on a result
 * of the wrong shape. */
tp_auth_tokens_t *tp_auth_tokens_from_result(const PGresult *res, char *err,
                                             size_t errlen) TP_WUR;
/* Runs TP_AUTH_TOKENS_SQL on conn (BLOCKING: start-up, a worker thread, or a
 * command) and builds the set. */
tp_auth_tokens_t *tp_auth_tokens_load(PGconn *conn, char *err, size_t errlen) TP_WUR;

tp_auth_tokens_t *tp_auth_tokens_ref(tp_auth_tokens_t *t);
/* Drops one reference; the last frees the set. NULL is a no-op. */
void tp_auth_tokens_release(tp_auth_tokens_t *t);
size_t tp_auth_tokens_count(const tp_auth_tokens_t *t);

/* The entry whose digest equals digest, or NULL: binary search over the
 * digests (O(log n)), final comparison with CRYPTO_memcmp. Timing depends only
 * on digests, never on token bytes (see auth_tokens.c). Borrowed from t; do
 * not change an entry's digest. */
const tp_auth_token_entry_t *tp_auth_tokens_find(const tp_auth_tokens_t *t,
                                                 const unsigned char digest[32]);

/* Creates a token: 32 bytes from RAND_bytes, base64url, prefixed
 * TP_AUTH_TOKEN_PREFIX; stores only its SHA-256 with name (1-128 chars, unique
 * among active tokens), roles (NULL-terminated, validated like
 * tp_auth_roles_parse), expiry now + ttl_s (0 = never) and created_by (may be
 * NULL). BLOCKING. On success *secret_out is the secret (caller frees; show it
 * once, never log it) and *id_out (may be NULL) the row id. */
bool tp_auth_token_create(PGconn *conn, const char *name, const char *const *roles, int64_t ttl_s,
                          const char *created_by, char **secret_out, int64_t *id_out, char *err,
                          size_t errlen) TP_WUR;
/* Revokes the active token called name_or_id, or with that numeric id.
 * *count_out: tokens revoked (0 means none matched; not an error). */
bool tp_auth_token_revoke(PGconn *conn, const char *name_or_id, int *count_out, char *err,
                          size_t errlen) TP_WUR;

/* `token create NAME --roles r1,r2 [--ttl 90d] [--created-by WHO]`,
 * `token revoke NAME|ID`, `token list`: argv[0] is the subcommand. Writes
 * results to out (the secret once, followed by a warning that it will not be
 * shown again), errors and usage to errf. Returns the exit status: 0 ok,
 * 1 failure, 2 usage error. */
int tp_auth_token_command(PGconn *conn, int argc, char **argv, FILE *out, FILE *errf);

#endif
