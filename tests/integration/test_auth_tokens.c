/* Integration test of the tidepool.api_tokens store on the harness Postgres,
 * with the schema from sql/migrations applied by lib/migrate.c: token
 * creation (only the SHA-256 stored, secret shown once), the snapshot the
 * server loads and verification against it (valid, wrong, expired, revoked),
 * revocation by name and id, NOTIFY on change, and the `token` command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>
#include <openssl/sha.h>

#include "../tp_test.h"
#include "tidepool/auth.h"
#include "tidepool/auth_tokens.h"
#include "tidepool/config.h"
#include "tidepool/migrate.h"
#include "tidepool/pg.h"

static const char *g_dsn;
static PGconn *g_conn;
static tp_auth_t *g_auth;

static void setup(void)
{
    char err[512] = "";
    g_conn = tp_pg_connect(g_dsn, 10000, err, sizeof err);
    CHECK_MSG(g_conn != NULL, "%s", err);
    const char *root = getenv("TP_ROOT");
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/sql/migrations", root ? root : ".");
    int applied = 0;
    CHECK_MSG(tp_migrate_apply(g_conn, dir, &applied, err, sizeof err), "%s", err);
    char *path = tp_test_write_tmp("tokens.conf", "[auth]\nmode = token\n");
    tp_config_t c = {0};
    CHECK_MSG(tp_config_load(&c, path, err, sizeof err), "%s", err);
    g_auth = tp_auth_new(&c, err, sizeof err);
    CHECK_MSG(g_auth != NULL, "%s", err);
    CHECK(tp_auth_wants_token_table(g_auth));
    tp_config_free(&c);
    free(path);
}

/* Reloads the snapshot the way the server does. */
static void refresh(void)
{
    char err[512] = "";
    tp_auth_tokens_t *t = tp_auth_tokens_load(g_conn, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    tp_auth_set_tokens(g_auth, t);
}

/* Checks secret at now + offset_s; returns the refusal reason ("" if granted). */
static char *check_token(const char *secret, int64_t offset_s, char **id_out)
{
    char *hdr = tp_xasprintf("Bearer %s", secret);
    tp_auth_request_t r = {.peer = "192.0.2.10", .now_s = (int64_t)time(NULL) + offset_s};
    tp_auth_request_header(&r, "Authorization", hdr);
    tp_auth_result_t res;
    char *out;
    if (tp_auth_check(g_auth, &r, &res)) {
        out = tp_xstrdup("");
        if (id_out)
            *id_out = tp_xstrdup(res.principal->id);
    } else {
        out = tp_xstrdup(res.reason);
        CHECK_MSG(strstr(res.reason, secret) == NULL, "secret in reason");
        CHECK_MSG(strstr(res.message, secret) == NULL, "secret in message");
    }
    tp_auth_result_clear(&res);
    free(hdr);
    return out;
}

static void create_stores_only_the_hash(void)
{
    char err[512] = "";
    static const char *const roles[] = {"reader", "writer", NULL};
    char *secret = NULL;
    int64_t id = 0;
    CHECK_MSG(tp_auth_token_create(g_conn, "ci", roles, 0, "test", &secret, &id, err, sizeof err),
              "%s", err);
    CHECK(secret != NULL && strncmp(secret, TP_AUTH_TOKEN_PREFIX, 4) == 0);
    CHECK_INT_EQ(strlen(secret), 4 + 43);
    CHECK(id > 0);
    unsigned char d[32];
    SHA256((const unsigned char *)secret, strlen(secret), d);
    char hex[65];
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
    char *q = tp_xasprintf("SELECT encode(token_sha256, 'hex') || '|' || name || '|' || "
                           "array_to_string(roles, ',') || '|' || (expires_at IS NULL) || '|' || "
                           "created_by FROM tidepool.api_tokens WHERE id = %lld",
                           (long long)id);
    char *row = tp_test_sql(g_dsn, q);
    char *want = tp_xasprintf("%s|ci|reader,writer|true|test", hex);
    CHECK_STR_EQ(row, want);
    /* the secret itself is nowhere in the table */
    char *dump = tp_test_sql(g_dsn, "SELECT string_agg(t::text, ' ') FROM tidepool.api_tokens t");
    CHECK(dump != NULL && strstr(dump, secret + 4) == NULL);
    /* two secrets are never alike */
    char *secret2 = NULL;
    CHECK_MSG(tp_auth_token_create(g_conn, "ci2", roles, 0, NULL, &secret2, NULL, err, sizeof err),
              "%s", err);
    CHECK(secret2 != NULL && strcmp(secret, secret2) != 0);

    refresh();
    char *pid = NULL;
    char *why = check_token(secret, 0, &pid);
    CHECK_STR_EQ(why, "");
    CHECK_STR_EQ(pid, "token:ci");
    free(why);
    free(pid);
    why = check_token("tpk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 0, NULL);
    CHECK_CONTAINS(why, "unknown token");
    free(why);
    free(q);
    free(row);
    free(want);
    free(dump);
    free(secret);
    free(secret2);
}

static void expired_and_revoked_tokens_are_refused(void)
{
    char err[512] = "";
    static const char *const roles[] = {"admin", NULL};
    char *s_ttl = NULL, *s_old = NULL, *s_rev = NULL;
    int64_t id_old = 0, id_rev = 0;
    CHECK(tp_auth_token_create(g_conn, "short", roles, 3600, NULL, &s_ttl, NULL, err, sizeof err));
    CHECK(tp_auth_token_create(g_conn, "old", roles, 0, NULL, &s_old, &id_old, err, sizeof err));
    CHECK(tp_auth_token_create(g_conn, "gone", roles, 0, NULL, &s_rev, &id_rev, err, sizeof err));
    char *q = tp_xasprintf("UPDATE tidepool.api_tokens SET created_at = now() - interval '2 "
                           "hours', expires_at = now() - interval '1 hour' WHERE id = %lld "
                           "RETURNING 1", (long long)id_old);
    free(tp_test_sql(g_dsn, q));
    free(q);
    refresh();
    char *why = check_token(s_ttl, 0, NULL);
    CHECK_STR_EQ(why, ""); /* valid now ... */
    free(why);
    why = check_token(s_ttl, 3700, NULL); /* ... and past its ttl */
    CHECK_CONTAINS(why, "\"short\"");
    CHECK_CONTAINS(why, "expired at");
    free(why);
    why = check_token(s_old, 0, NULL);
    CHECK_CONTAINS(why, "expired at");
    free(why);

    /* revoke by id: refused after the next refresh, not before */
    char idtxt[32];
    snprintf(idtxt, sizeof idtxt, "%lld", (long long)id_rev);
    int n = -1;
    CHECK_MSG(tp_auth_token_revoke(g_conn, idtxt, &n, err, sizeof err), "%s", err);
    CHECK_INT_EQ(n, 1);
    why = check_token(s_rev, 0, NULL);
    CHECK_STR_EQ(why, "");
    free(why);
    refresh();
    why = check_token(s_rev, 0, NULL);
    char *want = tp_xasprintf("token: \"gone\" (id %lld) is revoked", (long long)id_rev);
    CHECK_STR_EQ(why, want);
    free(want);
    free(why);
    CHECK(tp_auth_token_revoke(g_conn, idtxt, &n, err, sizeof err));
    CHECK_INT_EQ(n, 0); /* already revoked */
    /* the name is free again once revoked; a duplicate active name is not */
    char *s_new = NULL;
    CHECK_MSG(tp_auth_token_create(g_conn, "gone", roles, 0, NULL, &s_new, NULL, err, sizeof err),
              "%s", err);
    char *s_dup = NULL;
    CHECK(!tp_auth_token_create(g_conn, "gone", roles, 0, NULL, &s_dup, NULL, err, sizeof err));
    CHECK_CONTAINS(err, "an active token named \"gone\" already exists");
    CHECK(s_dup == NULL);
    /* revoke by name */
    CHECK(tp_auth_token_revoke(g_conn, "gone", &n, err, sizeof err));
    CHECK_INT_EQ(n, 1);
    refresh();
    why = check_token(s_new, 0, NULL);
    CHECK_CONTAINS(why, "is revoked");
    free(why);
    /* bad input */
    static const char *const bad_roles[] = {"read er", NULL};
    CHECK(!tp_auth_token_create(g_conn, "x", bad_roles, 0, NULL, &s_dup, NULL, err, sizeof err));
    CHECK_CONTAINS(err, "role \"read er\"");
    CHECK(!tp_auth_token_create(g_conn, "has space", roles, 0, NULL, &s_dup, NULL, err,
                                sizeof err));
    CHECK_CONTAINS(err, "token name must be");
    CHECK(!tp_auth_token_create(g_conn, "", roles, 0, NULL, &s_dup, NULL, err, sizeof err));
    free(s_ttl);
    free(s_old);
    free(s_rev);
    free(s_new);
}

static void changes_are_notified(void)
{
    char err[512] = "";
    PGconn *listener = tp_pg_connect(g_dsn, 10000, err, sizeof err);
    CHECK_MSG(listener != NULL, "%s", err);
    CHECK(tp_pg_exec(listener, "LISTEN " TP_AUTH_NOTIFY_CHANNEL, 0, NULL, err, sizeof err));
    static const char *const roles[] = {"reader", NULL};
    char *s = NULL;
    CHECK(tp_auth_token_create(g_conn, "notified", roles, 0, NULL, &s, NULL, err, sizeof err));
    int n = 0;
    CHECK(tp_auth_token_revoke(g_conn, "notified", &n, err, sizeof err) && n == 1);
    int seen = 0;
    for (int tries = 0; tries < 50 && seen < 2; tries++) {
        CHECK(PQconsumeInput(listener) == 1);
        PGnotify *nt;
        while ((nt = PQnotifies(listener)) != NULL) {
            CHECK_STR_EQ(nt->relname, TP_AUTH_NOTIFY_CHANNEL);
            CHECK_STR_EQ(nt->extra, "tokens");
            seen++;
            PQfreemem(nt);
        }
        if (seen < 2)
            free(tp_test_sql(g_dsn, "SELECT pg_sleep(0.02)"));
    }
    CHECK_INT_EQ(seen, 2);
    PQfinish(listener);
    free(s);
}

static int run_command(const char *const *args, char **out, char **errout)
{
    int argc = 0;
    while (args[argc])
        argc++;
    size_t ol = 0, el = 0;
    FILE *fo = open_memstream(out, &ol), *fe = open_memstream(errout, &el);
    int rc = tp_auth_token_command(g_conn, argc, (char **)args, fo, fe);
    fclose(fo);
    fclose(fe);
    return rc;
}

static void token_command(void)
{
    char *out = NULL, *eout = NULL;
    static const char *const create[] = {"create", "dash", "--roles", "reader,analysts",
                                         "--ttl", "90d", "--created-by", "ops@example.com", NULL};
    CHECK_INT_EQ(run_command(create, &out, &eout), 0);
    /* stdout holds exactly the secret and a newline; the warning is on stderr */
    CHECK(out != NULL && strncmp(out, "tpk_", 4) == 0 && strlen(out) == 48 && out[47] == '\n');
    CHECK_CONTAINS(eout, "will not be shown again");
    char secret[64];
    snprintf(secret, sizeof secret, "%.47s", out);
    /* stderr holds no part of the secret: not the whole (stdout's copy ends in
     * a newline, so search for the bare one), not its random part, not a piece */
    char piece[17];
    snprintf(piece, sizeof piece, "%.16s", secret + 4);
    CHECK(strlen(secret) == 47 && strstr(eout, secret) == NULL);
    CHECK(strstr(eout, secret + 4) == NULL);
    CHECK(strlen(piece) == 16 && strstr(eout, piece) == NULL);
    char cid[17];
    tp_auth_credential_id(secret, strlen(secret), cid);
    CHECK_CONTAINS(eout, cid);
    refresh();
    char *pid = NULL;
    char *why = check_token(secret, 0, &pid);
    CHECK_STR_EQ(why, "");
    CHECK_STR_EQ(pid, "token:dash");
    free(why);
    free(pid);
    why = check_token(secret, 91 * 86400, NULL);
    CHECK_CONTAINS(why, "expired at");
    free(why);
    free(out);
    free(eout);

    static const char *const list[] = {"list", NULL};
    CHECK_INT_EQ(run_command(list, &out, &eout), 0);
    CHECK_CONTAINS(out, "CREDENTIAL ID");
    CHECK_CONTAINS(out, "dash");
    CHECK_CONTAINS(out, "reader,analysts");
    CHECK_CONTAINS(out, cid);
    CHECK_CONTAINS(out, "revoked");
    CHECK_CONTAINS(out, "expired");
    CHECK(strstr(out, secret + 4) == NULL);
    free(out);
    free(eout);

    static const char *const revoke[] = {"revoke", "dash", NULL};
    CHECK_INT_EQ(run_command(revoke, &out, &eout), 0);
    CHECK_STR_EQ(out, "revoked 1 token\n");
    free(out);
    free(eout);
    CHECK_INT_EQ(run_command(revoke, &out, &eout), 1);
    CHECK_CONTAINS(eout, "no active token named or numbered \"dash\"");
    free(out);
    free(eout);

    static const char *const usage1[] = {"create", "x", NULL}; /* no --roles */
    static const char *const usage2[] = {"frobnicate", NULL};
    static const char *const usage3[] = {"revoke", NULL};
    static const char *const usage4[] = {"create", "x", "--roles", "r", "--ttl", "soon", NULL};
    static const char *const usage5[] = {"create", "x", "--roles", "b@d", NULL};
    static const char *const *const usages[] = {usage1, usage2, usage3, usage4, usage5};
    for (size_t i = 0; i < TP_ARRAY_LEN(usages); i++) {
        CHECK_MSG(run_command(usages[i], &out, &eout) == 2, "usage case %zu", i);
        CHECK(eout != NULL && eout[0] != '\0');
        CHECK_STR_EQ(out, "");
        free(out);
        free(eout);
    }
    CHECK_INT_EQ(tp_auth_token_command(g_conn, 0, NULL, stdout, stderr), 2);
}

static void snapshot_shape_errors(void)
{
    char err[256] = "";
    PGresult *res = PQexec(g_conn, "SELECT 1");
    tp_auth_tokens_t *t = tp_auth_tokens_from_result(res, err, sizeof err);
    CHECK(t == NULL);
    CHECK_CONTAINS(err, "unexpected result shape");
    PQclear(res);
    /* a table that is not there: a clear error, not a crash */
    char *empty_dsn = tp_test_new_db("auth_empty");
    PGconn *other = empty_dsn ? tp_pg_connect(empty_dsn, 10000, err, sizeof err) : NULL;
    free(empty_dsn);
    if (other != NULL) {
        t = tp_auth_tokens_load(other, err, sizeof err);
        CHECK(t == NULL);
        CHECK_CONTAINS(err, "42P01");
        PQfinish(other);
    }
}

int main(void)
{
    g_dsn = tp_test_dsn();
    if (g_dsn == NULL) {
        tp_test_skip("test_auth_tokens", "no harness Postgres");
        return tp_test_done();
    }
    if (!TP_RUN(setup) || g_conn == NULL || g_auth == NULL)
        return tp_test_done();
    TP_RUN(create_stores_only_the_hash);
    TP_RUN(expired_and_revoked_tokens_are_refused);
    TP_RUN(changes_are_notified);
    TP_RUN(token_command);
    TP_RUN(snapshot_shape_errors);
    tp_auth_free(g_auth);
    PQfinish(g_conn);
    return tp_test_done();
}
