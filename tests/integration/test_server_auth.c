/* tidepool-server with auth mode token: 401 without or with a wrong
 * credential (problem+json, WWW-Authenticate), dataset @roles enforced (403),
 * the dataset list filtered by role, the cache keyed by role, tokens from the
 * config and from tidepool.api_tokens (`tidepool-server token create`, picked
 * up through NOTIFY tidepool_auth without a restart). */
#include "server_harness.h"

#include <openssl/sha.h>

static srv_h_t S;
static const char *DSN;
static const char *VIEWER = "tpk_viewer-secret-for-tests";
static const char *ADMIN = "tpk_admin-secret-for-tests";

static void sha_hex(const char *s, char out[65])
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)s, strlen(s), d);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static resp_t get_as(const char *token, const char *path)
{
    char h[256];
    snprintf(h, sizeof h, "Authorization: Bearer %s", token);
    const char *hs[] = {h, NULL};
    return http(&S, "GET", path, token ? hs : NULL, NULL, 0);
}

static void test_missing_and_wrong_credentials(void)
{
    resp_t r = get(&S, "/api/v1/datasets/users");
    CHECK_PROBLEM(r, 401, NULL);
    CHECK(hdr(&r, "WWW-Authenticate") != NULL);
    resp_free(&r);
    r = get_as("tpk_not-a-real-token", "/api/v1/datasets/users");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    r = get_as("tpk_not-a-real-token", "/api/v1/tables/iot.users");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    /* operations stay open */
    r = get(&S, "/healthz");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    char *log = tp_read_file(S.log, NULL);
    CHECK(log && !strstr(log, "tpk_not-a-real-token")); /* never a credential in the log */
    free(log);
}

static void test_roles(void)
{
    resp_t r = get_as(VIEWER, "/api/v1/datasets/users");
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 40);
    resp_free(&r);
    r = get_as(VIEWER, "/api/v1/datasets/admin_only");
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    r = get_as(ADMIN, "/api/v1/datasets/admin_only");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
    /* the list shows only what the caller may read */
    r = get_as(VIEWER, "/api/v1/datasets");
    CHECK_INT_EQ(r.status, 200);
    CHECK(strstr(r.body, "\"admin_only\"") == NULL);
    CHECK_CONTAINS(r.body, "\"users\"");
    resp_free(&r);
    r = get_as(ADMIN, "/api/v1/datasets");
    CHECK_CONTAINS(r.body, "\"admin_only\"");
    resp_free(&r);
    r = get_as(VIEWER, "/api/v1/tables/iot.users?user_id=eq.1");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

static void test_cache_keyed_by_role(void)
{
    resp_t a = get_as(VIEWER, "/api/v1/datasets/users?prefix=user%207");
    resp_free(&a);
    a = get_as(VIEWER, "/api/v1/datasets/users?prefix=user%207");
    CHECK_STR_EQ(hdr(&a, "X-Tidepool-Source"), "cache");
    resp_free(&a);
    a = get_as(ADMIN, "/api/v1/datasets/users?prefix=user%207");
    CHECK_STR_EQ(hdr(&a, "X-Tidepool-Source"), "postgres");
    resp_free(&a);
}

static void test_table_token(void)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --config %s token create robot --roles reader 2>&1",
             tp_test_bin("tidepool-server"), S.conf);
    char *out = NULL;
    int st = tp_test_cmd(cmd, &out);
    CHECK_INT_EQ(st, 0);
    const char *tok = out ? strstr(out, "tpk_") : NULL;
    CHECK(tok != NULL);
    if (!tok) {
        free(out);
        return;
    }
    char token[128];
    size_t n = strcspn(tok, " \r\n\t");
    snprintf(token, sizeof token, "%.*s", (int)n, tok);
    long status = 0;
    for (int i = 0; i < 50 && status != 200; i++) { /* NOTIFY tidepool_auth reloads */
        resp_t r = get_as(token, "/api/v1/datasets/users");
        status = r.status;
        resp_free(&r);
        if (status != 200)
            usleep(100000);
    }
    CHECK_INT_EQ(status, 200);
    snprintf(cmd, sizeof cmd, "%s --config %s token revoke robot 2>&1", tp_test_bin("tidepool-server"), S.conf);
    free(out);
    out = NULL;
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    free(out);
    for (int i = 0; i < 50 && status == 200; i++) {
        resp_t r = get_as(token, "/api/v1/datasets/users");
        status = r.status;
        resp_free(&r);
        if (status == 200)
            usleep(100000);
    }
    CHECK_INT_EQ(status, 401);
}

int main(void)
{
    char vh[65], ah[65], conf[512];
    sha_hex(VIEWER, vh);
    sha_hex(ADMIN, ah);
    snprintf(conf, sizeof conf, "[auth]\nmode = token\ntokens = viewer:reader:%s, boss:admin:%s\n", vh, ah);
    S.extra_conf = conf;
    snprintf(S.qdir, sizeof S.qdir, "%s/queries", tp_test_tmpdir());
    mkdir(S.qdir, 0755);
    harness_def(&S, "admin_only.sql", "-- @roles admin\nSELECT 42 AS answer\n");
    if (!harness_setup(&S, "test_server_auth", &DSN, 1))
        return tp_test_done();
    TP_RUN(test_missing_and_wrong_credentials);
    TP_RUN(test_roles);
    TP_RUN(test_cache_keyed_by_role);
    TP_RUN(test_table_token);
    harness_finish(&S);
    return tp_test_done();
}
