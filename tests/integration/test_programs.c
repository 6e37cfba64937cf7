/* The command-line contract of all three programs (DESIGN §3, issue 2):
 * --help/--version exit 0, usage errors exit 2, a bad config file gives one
 * "file:line: message" and exit 2, an unreachable Postgres names host and
 * port and exits 1, and no secret reaches the output. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"
#include "tidepool/util.h"

static const char *const programs[] = {"tidepool-sync", "tidepool-server", "tidepool-warehouse"};

static int run(const char *args, char **out)
{
    char *cmd = tp_xasprintf("%s", args);
    int rc = tp_test_cmd(cmd, out);
    free(cmd);
    return rc;
}

static void help_and_version_exit_zero(void)
{
    for (size_t i = 0; i < TP_ARRAY_LEN(programs); i++) {
        char *out;
        char *cmd = tp_xasprintf("%s --help", tp_test_bin(programs[i]));
        CHECK_INT_EQ(run(cmd, &out), 0);
        CHECK_CONTAINS(out, "Usage:");
        CHECK_CONTAINS(out, "--config");
        CHECK_CONTAINS(out, "--check");
        free(out);
        free(cmd);
        cmd = tp_xasprintf("%s --version", tp_test_bin(programs[i]));
        CHECK_INT_EQ(run(cmd, &out), 0);
        CHECK_CONTAINS(out, programs[i]);
        free(out);
        free(cmd);
        cmd = tp_xasprintf("%s --no-such-flag", tp_test_bin(programs[i]));
        CHECK_INT_EQ(run(cmd, &out), 2);
        free(out);
        free(cmd);
    }
}

static void bad_config_is_file_line_and_exit_2(void)
{
    char *path = tp_test_write_tmp("bad.conf", "[warehouse]\ntoken = s3cr3t-token\n\n[server]\nthreads = many\n");
    for (size_t i = 0; i < TP_ARRAY_LEN(programs); i++) {
        char *out;
        char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin(programs[i]), path);
        CHECK_INT_EQ(run(cmd, &out), 2);
        char *want = tp_xasprintf("%s:5:", path);
        CHECK_CONTAINS(out, want);
        CHECK_CONTAINS(out, "threads");
        CHECK(strstr(out, "s3cr3t-token") == NULL);
        free(want);
        free(out);
        free(cmd);
    }
    free(path);
    /* every kind of bad file: one line, "file:line: message" (or "file: message"
     * when no line applies), exit 2, from every program alike */
    char *unknown = tp_test_write_tmp("unknown.conf", "[server]\nlisten = 127.0.0.1:1\nbogus_key = 1\n");
    char *unclosed = tp_test_write_tmp("unclosed.conf", "[warehouse]\nhost = ${UNCLOSED\n");
    char *dir = tp_xasprintf("%s", tp_test_tmpdir());
    struct {
        const char *path, *where, *what;
    } bad[] = {
        {unknown, ":3: ", "unknown key \"bogus_key\" in [server]"},
        {unclosed, ":2: ", "warehouse.host: unclosed \"${\""},
        {"/nonexistent/tidepool.conf", ": ", "cannot read: No such file or directory"},
        {dir, ": ", "cannot read: Is a directory"},
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(programs); i++) {
        for (size_t k = 0; k < TP_ARRAY_LEN(bad); k++) {
            char *out;
            char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin(programs[i]), bad[k].path);
            CHECK_INT_EQ(run(cmd, &out), 2);
            char *want = tp_xasprintf("%s%s%s\n", bad[k].path, bad[k].where, bad[k].what);
            CHECK_STR_EQ(out, want);
            free(want);
            free(out);
            free(cmd);
        }
    }
    free(unknown);
    free(unclosed);
    free(dir);
}

static void check_prints_settings_with_secrets_masked(void)
{
    char *path = tp_test_write_tmp("good.conf",
                                   "[postgres]\ndsn = host=127.0.0.1 password=pg-pass-123\n"
                                   "[warehouse]\nhost = http://127.0.0.1:1\nwarehouse_id = w\n"
                                   "token = s3cr3t-token\n[sync]\ndefinitions = sql/sync\n"
                                   "[server]\ndefinitions = sql/queries\n");
    const char *progs[] = {"tidepool-sync", "tidepool-server"};
    for (size_t i = 0; i < TP_ARRAY_LEN(progs); i++) {
        char *out;
        char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin(progs[i]), path);
        CHECK_INT_EQ(run(cmd, &out), 0);
        CHECK_CONTAINS(out, "warehouse.token = ********");
        CHECK_CONTAINS(out, "password=********");
        CHECK(strstr(out, "s3cr3t-token") == NULL);
        CHECK(strstr(out, "pg-pass-123") == NULL);
        free(out);
        free(cmd);
    }
    char *out;
    char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin("tidepool-warehouse"), path);
    CHECK_INT_EQ(run(cmd, &out), 0);
    CHECK_CONTAINS(out, "personal access tokens = 1");
    CHECK_CONTAINS(out, "warehouse ids = w");
    CHECK(strstr(out, "s3cr3t-token") == NULL);
    free(out);
    free(cmd);
    free(path);
}

static void unreachable_postgres_exits_1_naming_host_and_port(void)
{
    int port = tp_test_free_port();
    char *conf = tp_xasprintf("[postgres]\ndsn = host=127.0.0.1 port=%d dbname=x password=pg-pass-123\n"
                              "connect_timeout = 2s\n", port);
    char *path = tp_test_write_tmp("down.conf", conf);
    const char *modes[] = {"--migrate", "--once"};
    for (size_t i = 0; i < TP_ARRAY_LEN(modes); i++) {
        char *out;
        char *cmd = tp_xasprintf("%s --config %s %s", tp_test_bin("tidepool-sync"), path, modes[i]);
        CHECK_INT_EQ(run(cmd, &out), 1);
        char *want = tp_xasprintf("127.0.0.1:%d", port);
        CHECK_CONTAINS(out, want);
        CHECK(strstr(out, "pg-pass-123") == NULL);
        free(want);
        free(out);
        free(cmd);
    }
    free(path);
    free(conf);
}

static void emulator_accepts_the_configured_credentials(void)
{
    int port = tp_test_free_port();
    char *path = tp_test_write_tmp("emu.conf", "[warehouse]\nwarehouse_id = wh-from-config\n"
                                               "token = token-from-config\n");
    char listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    char *argv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn",
                    (char *)tp_test_dsn(), "--config", path, NULL};
    pid_t pid = tp_test_spawn(argv, NULL);
    CHECK(tp_test_wait_port(port, 10000));
    char *out;
    char *cmd = tp_xasprintf(
        "curl -s -H 'Authorization: Bearer token-from-config' -d '{\"warehouse_id\":\"wh-from-config\","
        "\"statement\":\"SELECT 1\",\"wait_timeout\":\"10s\"}' http://%s/api/2.0/sql/statements",
        listen);
    CHECK_INT_EQ(run(cmd, &out), 0);
    CHECK_CONTAINS(out, "\"state\":\"SUCCEEDED\"");
    free(out);
    free(cmd);
    cmd = tp_xasprintf("curl -s -H 'Authorization: Bearer other' -d '{}' http://%s/api/2.0/sql/statements",
                       listen);
    CHECK_INT_EQ(run(cmd, &out), 0);
    CHECK_CONTAINS(out, "Invalid access token.");
    free(out);
    free(cmd);
    CHECK_INT_EQ(tp_test_stop(pid, 10000), 0);
    free(path);
}

static void server_migrates_at_start_and_refuses_a_newer_schema(void)
{
    char *dsn = tp_test_new_db("t_programs_srvmig");
    int port = tp_test_free_port();
    char *conf = tp_xasprintf("[postgres]\ndsn = %s\n[server]\nlisten = 127.0.0.1:%d\n"
                              "definitions = sql/queries\n", dsn, port);
    char *path = tp_test_write_tmp("srvmig.conf", conf);
    char *argv[] = {(char *)tp_test_bin("tidepool-server"), "--config", path, NULL};
    pid_t pid = tp_test_spawn(argv, NULL);
    CHECK(tp_test_wait_port(port, 15000));
    char *n = tp_test_sql(dsn, "SELECT count(*) FROM tidepool.schema_migrations");
    CHECK(n != NULL && atoi(n) >= 3);
    free(n);
    CHECK_INT_EQ(tp_test_stop(pid, 15000), 0);
    /* a database migrated by a newer build: this one refuses to start */
    free(tp_test_sql(dsn, "INSERT INTO tidepool.schema_migrations (version, name, checksum) "
                          "VALUES (9999, '9999_future.sql', repeat('0', 64))"));
    char *out;
    char *cmd = tp_xasprintf("timeout 60 %s --config %s", tp_test_bin("tidepool-server"), path);
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 1);
    CHECK_CONTAINS(out, "9999");
    free(out);
    free(cmd);
    free(path);
    free(conf);
    free(dsn);
}

int main(void)
{
    unsetenv("DATABRICKS_APP_PORT");
    TP_RUN(help_and_version_exit_zero);
    TP_RUN(bad_config_is_file_line_and_exit_2);
    TP_RUN(check_prints_settings_with_secrets_masked);
    TP_RUN(unreachable_postgres_exits_1_naming_host_and_port);
    TP_RUN(emulator_accepts_the_configured_credentials);
    TP_RUN(server_migrates_at_start_and_refuses_a_newer_schema);
    return tp_test_done();
}
