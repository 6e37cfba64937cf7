/* Integration tests for the connectivity check (lib/ping.c) against the
 * harness Postgres and a real tidepool-warehouse emulator. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"
#include "tidepool/config.h"
#include "tidepool/migrate.h"
#include "tidepool/pg.h"
#include "tidepool/ping.h"

static int wh_port;
static char *dsn;

/* Runs tp_ping_run on a config file built from body; returns its status and output. */
static int ping(const char *body, char **out)
{
    char *path = tp_test_write_tmp("ping.conf", body);
    tp_config_t cfg = {0};
    char err[512];
    if (!tp_config_load(&cfg, path, err, sizeof err)) {
        tp_test_fail(__FILE__, __LINE__, "config: %s", err);
        free(path);
        *out = strdup("");
        return -1;
    }
    size_t len = 0;
    FILE *f = open_memstream(out, &len);
    int rc = tp_ping_run(&cfg, f);
    fclose(f);
    tp_config_free(&cfg);
    free(path);
    return rc;
}

static char *conf(const char *pg_dsn, const char *warehouse_extra)
{
    return tp_xasprintf("[postgres]\ndsn = %s\n[warehouse]\nhost = http://127.0.0.1:%d/\n%s", pg_dsn,
                        wh_port, warehouse_extra);
}

static void everything_works_with_a_token(void)
{
    char *c = conf(dsn, "warehouse_id = tidepool-local\ntoken = ping-secret-token\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 0);
    CHECK_CONTAINS(out, "postgres   ok ");
    CHECK_CONTAINS(out, "PostgreSQL 15");
    CHECK_CONTAINS(out, "schema     ok       current (migration");
    CHECK_CONTAINS(out, "warehouse  ok       http://127.0.0.1:");
    CHECK_CONTAINS(out, "auth: personal access token, SELECT 1 answered in");
    CHECK(strstr(out, "ping-secret-token") == NULL);
    free(out);
    free(c);
}

static void oauth_machine_to_machine_works(void)
{
    char *c = conf(dsn, "warehouse_id = tidepool-local\nclient_id = ping-sp\nclient_secret = sp-secret-value\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 0);
    CHECK_CONTAINS(out, "auth: OAuth machine-to-machine, SELECT 1 answered");
    CHECK(strstr(out, "sp-secret-value") == NULL);
    free(out);
    free(c);
}

static void wrong_token_names_authentication(void)
{
    char *c = conf(dsn, "warehouse_id = tidepool-local\ntoken = not-the-right-one\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 1);
    CHECK_CONTAINS(out, "postgres   ok ");
    CHECK_CONTAINS(out, "warehouse  FAILED   authentication (");
    CHECK_CONTAINS(out, "HTTP 403");
    CHECK(strstr(out, "not-the-right-one") == NULL);
    free(out);
    free(c);
}

static void unknown_warehouse_id_is_named(void)
{
    char *c = conf(dsn, "warehouse_id = nosuchwarehouse\ntoken = ping-secret-token\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 1);
    CHECK_CONTAINS(out, "warehouse  FAILED   warehouse id (");
    CHECK_CONTAINS(out, "nosuchwarehouse");
    free(out);
    free(c);
}

static void missing_settings_are_named(void)
{
    char *c = conf(dsn, "warehouse_id = tidepool-local\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 1);
    CHECK_CONTAINS(out, "no credentials: set [warehouse] token (DATABRICKS_TOKEN)");
    free(out);
    free(c);
}

static void unreachable_postgres_names_host_and_port(void)
{
    int port = tp_test_free_port();
    char *bad = tp_xasprintf("host=127.0.0.1 port=%d dbname=x password=pg-secret-pw connect_timeout=2", port);
    char *c = conf(bad, "warehouse_id = tidepool-local\ntoken = ping-secret-token\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 1);
    char *where = tp_xasprintf("postgres   FAILED   cannot connect to Postgres at 127.0.0.1:%d", port);
    CHECK_CONTAINS(out, where);
    CHECK(strstr(out, "pg-secret-pw") == NULL);
    CHECK_CONTAINS(out, "warehouse  ok ");
    free(where);
    free(out);
    free(c);
    free(bad);
}

static void pending_migrations_are_reported(void)
{
    char *fresh = tp_test_new_db("t_ping_fresh");
    char *c = conf(fresh, "warehouse_id = tidepool-local\ntoken = ping-secret-token\n");
    char *out;
    CHECK_INT_EQ(ping(c, &out), 1);
    CHECK_CONTAINS(out, "schema     FAILED");
    CHECK_CONTAINS(out, "pending");
    free(out);
    free(c);
    free(fresh);
}

static void the_sync_program_pings(void)
{
    char *c = conf(dsn, "warehouse_id = tidepool-local\ntoken = ping-secret-token\n");
    char *path = tp_test_write_tmp("cli.conf", c);
    char *cmd = tp_xasprintf("%s --config %s --ping", tp_test_bin("tidepool-sync"), path);
    char *out = NULL;
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 0);
    CHECK_CONTAINS(out, "warehouse  ok ");
    free(out);
    free(cmd);
    free(path);
    free(c);
    c = conf(dsn, "warehouse_id = tidepool-local\ntoken = wrong-cli-token\n");
    path = tp_test_write_tmp("cli.conf", c);
    cmd = tp_xasprintf("%s --config %s --ping", tp_test_bin("tidepool-sync"), path);
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 1);
    CHECK_CONTAINS(out, "warehouse  FAILED   authentication");
    CHECK(strstr(out, "wrong-cli-token") == NULL);
    free(out);
    free(cmd);
    free(path);
    free(c);
}

int main(void)
{
    unsetenv("DATABRICKS_HOST");
    unsetenv("DATABRICKS_TOKEN");
    unsetenv("DATABRICKS_CLIENT_ID");
    unsetenv("DATABRICKS_CLIENT_SECRET");
    unsetenv("DATABRICKS_WAREHOUSE_ID");
    setenv("TIDEPOOL_MIGRATIONS_DIR", "sql/migrations", 1);
    dsn = (char *)tp_test_dsn();
    char err[512];
    PGconn *conn = tp_pg_connect(dsn, 5000, err, sizeof err);
    int applied = 0;
    if (conn == NULL || !tp_migrate_apply(conn, "sql/migrations", &applied, err, sizeof err)) {
        printf("not ok - setup: %s\n", err);
        return 1;
    }
    PQfinish(conn);
    wh_port = tp_test_free_port();
    char listen[64], log[512];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", wh_port);
    snprintf(log, sizeof log, "%s/warehouse.log", tp_test_tmpdir());
    char *argv[] = {(char *)tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", dsn,
                    "--token", "ping-secret-token", "--client", "ping-sp:sp-secret-value", NULL};
    pid_t pid = tp_test_spawn(argv, log);
    if (!tp_test_wait_port(wh_port, 10000)) {
        printf("not ok - setup: emulator did not start (see %s)\n", log);
        return 1;
    }
    TP_RUN(everything_works_with_a_token);
    TP_RUN(oauth_machine_to_machine_works);
    TP_RUN(wrong_token_names_authentication);
    TP_RUN(unknown_warehouse_id_is_named);
    TP_RUN(missing_settings_are_named);
    TP_RUN(unreachable_postgres_names_host_and_port);
    TP_RUN(pending_migrations_are_reported);
    TP_RUN(the_sync_program_pings);
    tp_test_stop(pid, 5000);
    return tp_test_done();
}
