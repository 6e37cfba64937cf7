/* Unit tests for lib/config.c: INI parsing, ${VAR} expansion, environment
 * fallbacks and precedence, every error message, secret masking in --check
 * output, errors and DSNs, and the generated reference (also against docs). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../tp_test.h"
#include "tidepool/config.h"
#include "tidepool/util.h"

#define SECRET "s3cr3tVALUE"

static char *g_path; /* the file the last load_text wrote */

/* Unsets every variable the settings table reads, plus the test's own. */
static void clear_env(void)
{
    for (size_t i = 0; i < tp_settings_count; i++)
        if (tp_settings[i].env)
            unsetenv(tp_settings[i].env);
    unsetenv("TP_CFG_A");
    unsetenv("TP_CFG_EMPTY");
}

static bool load_text(tp_config_t *c, const char *text, char *err, size_t errlen)
{
    free(g_path);
    g_path = tp_test_write_tmp("tidepool.conf", text);
    return tp_config_load(c, g_path, err, errlen);
}

/* Loads text, expects failure with exactly "PATH:LINE: msg" (line 0: "PATH: msg"). */
static void expect_err_at(const char *file, int at, const char *text, int line, const char *msg)
{
    tp_config_t c = {0};
    char err[1024] = "";
    if (load_text(&c, text, err, sizeof err)) {
        tp_test_fail(file, at, "loaded although expected \"%s\"", msg);
        tp_config_free(&c);
        return;
    }
    char want[1024];
    if (line > 0)
        snprintf(want, sizeof want, "%s:%d: %s", g_path, line, msg);
    else
        snprintf(want, sizeof want, "%s: %s", g_path, msg);
    if (strcmp(err, want) != 0)
        tp_test_fail(file, at, "error \"%s\" != \"%s\"", err, want);
    if (c.path != NULL || c.origin != NULL || c.warehouse.host != NULL)
        tp_test_fail(file, at, "config not freed after failure");
}
#define EXPECT_ERR(text, line, msg) expect_err_at(__FILE__, __LINE__, text, line, msg)

/* Loads without a file and expects failure with exactly msg. */
static void expect_env_err_at(const char *file, int at, const char *msg)
{
    tp_config_t c = {0};
    char err[1024] = "";
    if (tp_config_load(&c, NULL, err, sizeof err)) {
        tp_test_fail(file, at, "loaded although expected \"%s\"", msg);
        tp_config_free(&c);
    } else if (strcmp(err, msg) != 0) {
        tp_test_fail(file, at, "error \"%s\" != \"%s\"", err, msg);
    }
}
#define EXPECT_ENV_ERR(msg) expect_env_err_at(__FILE__, __LINE__, msg)

static int idx(const char *section, const char *key)
{
    for (size_t i = 0; i < tp_settings_count; i++)
        if (strcmp(tp_settings[i].section, section) == 0 && strcmp(tp_settings[i].key, key) == 0)
            return (int)i;
    return -1;
}

static char *print_config(const tp_config_t *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    tp_config_print(c, f);
    fclose(f);
    return text;
}

static void defaults_without_file(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[256] = "";
    CHECK(tp_config_load(&c, NULL, err, sizeof err));
    CHECK_STR_EQ(err, "");
    CHECK(c.path == NULL);
    CHECK_STR_EQ(c.postgres.dsn, "");
    CHECK_STR_EQ(c.postgres.read_dsn, "");
    CHECK_INT_EQ(c.postgres.pool_size, 4);
    CHECK_INT_EQ(c.postgres.connect_timeout_ms, 10000);
    CHECK_STR_EQ(c.warehouse.host, "");
    CHECK_STR_EQ(c.warehouse.token, "");
    CHECK_STR_EQ(c.warehouse.catalog, "");
    CHECK_STR_EQ(c.warehouse.schema, "");
    CHECK_INT_EQ(c.warehouse.timeout_ms, 60000);
    CHECK_STR_EQ(c.sync.definitions, "sql/sync");
    CHECK_INT_EQ(c.sync.max_concurrent_jobs, 4);
    CHECK_STR_EQ(c.server.listen, "127.0.0.1:8080");
    CHECK_INT_EQ(c.server.threads, 0);
    CHECK_STR_EQ(c.server.definitions, "sql/queries");
    CHECK_INT_EQ(c.server.max_body_bytes, 1 << 20);
    CHECK_INT_EQ(c.server.max_header_bytes, 16 << 10);
    CHECK_INT_EQ(c.server.max_connections, 10000);
    CHECK_INT_EQ(c.server.timeout_ms, 30000);
    CHECK_STR_EQ(c.auth.mode, "none");
    CHECK_STR_EQ(c.log.level, "info");
    for (size_t i = 0; i < tp_settings_count; i++)
        CHECK_INT_EQ(c.origin[i].source, TP_CFG_SRC_DEFAULT);
    CHECK_INT_EQ(tp_config_warehouse_auth(&c), TP_WH_AUTH_NONE);
    tp_config_free(&c);
    CHECK(c.origin == NULL && c.log.level == NULL);
    tp_config_free(&c); /* twice is harmless */
    tp_config_free(NULL);
}

static void file_format_parses(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[256] = "";
    bool ok = load_text(&c,
                        "\xEF\xBB\xBF# comment\n"
                        "; another comment\n"
                        "\n"
                        "[postgres]\n"
                        "dsn = host=/tmp dbname=tp\n"
                        "pool_size=12   \n"
                        "connect_timeout = 250ms\r\n"
                        "  [ warehouse ]  \n"
                        "host = \"https://example.cloud.databricks.com\"\n"
                        "catalog = \"a \\\"quoted\\\" \\\\ name\"\n"
                        "schema = has # and ; inside\n"
                        "warehouse_id = \"\"\n"
                        "timeout = 5m\n"
                        "[server]\n"
                        "listen = [::1]:9090\n"
                        "threads = 3\n"
                        "max_body_bytes = 64k\n"
                        "max_header_bytes = 2k\n"
                        "max_connections = 7\n"
                        "timeout = 2\n"
                        "[sync]\n"
                        "definitions = /srv/sync\n"
                        "max_concurrent_jobs = 1\n"
                        "[log]\n"
                        "level = debug\n"
                        "[postgres]\n"
                        "read_dsn = postgresql://replica/tp\n",
                        err, sizeof err);
    CHECK_MSG(ok, "load failed: %s", err);
    if (!ok)
        return;
    CHECK_STR_EQ(c.path, g_path);
    CHECK_STR_EQ(c.postgres.dsn, "host=/tmp dbname=tp");
    CHECK_STR_EQ(c.postgres.read_dsn, "postgresql://replica/tp");
    CHECK_INT_EQ(c.postgres.pool_size, 12);
    CHECK_INT_EQ(c.postgres.connect_timeout_ms, 250);
    CHECK_STR_EQ(c.warehouse.host, "https://example.cloud.databricks.com");
    CHECK_STR_EQ(c.warehouse.catalog, "a \"quoted\" \\ name");
    CHECK_STR_EQ(c.warehouse.schema, "has # and ; inside");
    CHECK_STR_EQ(c.warehouse.warehouse_id, "");
    CHECK_INT_EQ(c.warehouse.timeout_ms, 300000);
    CHECK_STR_EQ(c.server.listen, "[::1]:9090");
    CHECK_INT_EQ(c.server.threads, 3);
    CHECK_INT_EQ(c.server.max_body_bytes, 65536);
    CHECK_INT_EQ(c.server.max_header_bytes, 2048);
    CHECK_INT_EQ(c.server.max_connections, 7);
    CHECK_INT_EQ(c.server.timeout_ms, 2000);
    CHECK_STR_EQ(c.sync.definitions, "/srv/sync");
    CHECK_INT_EQ(c.sync.max_concurrent_jobs, 1);
    CHECK_STR_EQ(c.log.level, "debug");
    CHECK_INT_EQ(c.origin[idx("postgres", "pool_size")].source, TP_CFG_SRC_FILE);
    CHECK_INT_EQ(c.origin[idx("postgres", "pool_size")].line, 6);
    CHECK_INT_EQ(c.origin[idx("auth", "mode")].source, TP_CFG_SRC_DEFAULT);
    tp_config_free(&c);
}

/* [server] web_root / web_vendor: empty by default (the server picks ./web or
 * the installed copy), paths as written otherwise, ${VAR} expanded. */
static void web_settings(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[256] = "";
    CHECK(tp_config_load(&c, NULL, err, sizeof err));
    CHECK_STR_EQ(c.server.web_root, "");
    CHECK_STR_EQ(c.server.web_vendor, "");
    tp_config_free(&c);
    setenv("TP_TEST_RUN_DIR", "/srv/run", 1);
    bool ok = load_text(&c,
                        "[server]\nweb_root = /opt/page\nweb_vendor = ${TP_TEST_RUN_DIR}/web/vendor\n",
                        err, sizeof err);
    unsetenv("TP_TEST_RUN_DIR");
    CHECK_MSG(ok, "load failed: %s", err);
    if (!ok)
        return;
    CHECK_STR_EQ(c.server.web_root, "/opt/page");
    CHECK_STR_EQ(c.server.web_vendor, "/srv/run/web/vendor");
    CHECK_INT_EQ(c.origin[idx("server", "web_root")].source, TP_CFG_SRC_FILE);
    CHECK_INT_EQ(c.origin[idx("server", "web_vendor")].line, 3);
    tp_config_free(&c);
}

static void file_errors_are_one_precise_line(void)
{
    clear_env();
    EXPECT_ERR("[postgres]\npool_size = 4\n[nope]\n", 3, "unknown section [nope]");
    EXPECT_ERR("[warehouse]\nhost = h\nhots = h\n", 3, "unknown key \"hots\" in [warehouse]");
    EXPECT_ERR("[warehouse]\nhost = a\n\n[warehouse]\nhost = b\n", 5,
               "duplicate key warehouse.host (first set on line 2)");
    EXPECT_ERR("pool_size = 4\n", 1, "key \"pool_size\" is outside any [section]");
    EXPECT_ERR("[log]\n= debug\n", 2, "missing key before \"=\"");
    EXPECT_ERR("[log]\nlevel debug\n", 2, "expected \"[section]\" or \"key = value\"");
    EXPECT_ERR("[log\nlevel = debug\n", 1, "a section header is \"[name]\" alone on its line");
    EXPECT_ERR("[log] x\n", 1, "a section header is \"[name]\" alone on its line");
    EXPECT_ERR("[postgres]\npool_size = four\n", 2,
               "invalid value \"four\" for postgres.pool_size: expected an integer from 1 to "
               "1000");
    EXPECT_ERR("[postgres]\npool_size = 0\n", 2,
               "invalid value \"0\" for postgres.pool_size: expected an integer from 1 to 1000");
    EXPECT_ERR("[postgres]\npool_size =\n", 2,
               "invalid value \"\" for postgres.pool_size: expected an integer from 1 to 1000");
    EXPECT_ERR("[server]\ntimeout = 2 hours\n", 2,
               "invalid value \"2 hours\" for server.timeout: expected a duration from 100ms "
               "to 1h (like 30s, 5m, 250ms)");
    EXPECT_ERR("[server]\ntimeout = 2h\n", 2,
               "invalid value \"2h\" for server.timeout: expected a duration from 100ms to 1h "
               "(like 30s, 5m, 250ms)");
    EXPECT_ERR("[server]\nmax_body_bytes = 2T\n", 2,
               "invalid value \"2T\" for server.max_body_bytes: expected a size from 1k to 1G "
               "(like 64k, 16M)");
    EXPECT_ERR("[log]\nlevel = loud\n", 2,
               "invalid value \"loud\" for log.level: expected one of debug, info, warn, error");
    EXPECT_ERR("[auth]\nmode = oauth\n", 2,
               "invalid value \"oauth\" for auth.mode: expected one of none, token, "
               "databricks-apps, jwt");
    EXPECT_ERR("[server]\nlisten = 8080\n", 2,
               "invalid value \"8080\" for server.listen: expected ADDR:PORT with a port from "
               "1 to 65535");
    EXPECT_ERR("[server]\nlisten = ::1:8080\n", 2,
               "invalid value \"::1:8080\" for server.listen: expected ADDR:PORT with a port "
               "from 1 to 65535");
    EXPECT_ERR("[server]\nlisten = 127.0.0.1:70000\n", 2,
               "invalid value \"127.0.0.1:70000\" for server.listen: expected ADDR:PORT with a "
               "port from 1 to 65535");
    EXPECT_ERR("[postgres]\ndsn = host=h port\n", 2,
               "invalid value for postgres.dsn: expected a libpq connection string or "
               "postgresql:// URI");
    EXPECT_ERR("[log]\nlevel = \"debug\n", 2, "log.level: unterminated quoted value");
    EXPECT_ERR("[log]\nlevel = \"debug\" info\n", 2, "log.level: text after the closing quote");
    EXPECT_ERR("[log]\nlevel = \"de\\bug\"\n", 2,
               "log.level: unknown escape in quoted value (only \\\" and \\\\ are allowed)");
    EXPECT_ERR("[log]\nlevel = ${TP_CFG_A\n", 2, "log.level: unclosed \"${\"");
    EXPECT_ERR("[log]\nlevel = ${TP_CFG_A}\n", 2,
               "log.level: environment variable TP_CFG_A is not set (write ${TP_CFG_A:-} to "
               "allow that)");
    EXPECT_ERR("[log]\nlevel = ${TP CFG}\n", 2,
               "log.level: bad variable reference after \"${\" (expected ${NAME} or "
               "${NAME:-default})");
    EXPECT_ERR("[log]\nlevel = ${}\n", 2,
               "log.level: bad variable reference after \"${\" (expected ${NAME} or "
               "${NAME:-default})");

    /* a NUL byte cannot be written through a C string: write the file by hand */
    char *path = tp_test_write_tmp("nul.conf", "");
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fwrite("[log]\nlevel = de\0bug\n", 1, 21, f);
        fclose(f);
        tp_config_t c = {0};
        char err[512], want[512];
        CHECK(!tp_config_load(&c, path, err, sizeof err));
        snprintf(want, sizeof want, "%s:2: NUL byte in line", path);
        CHECK_STR_EQ(err, want);
    }
    free(path);
}

static void unreadable_files_are_named(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512], want[512];
    char *missing = tp_xasprintf("%s/no-such.conf", tp_test_tmpdir());
    CHECK(!tp_config_load(&c, missing, err, sizeof err));
    snprintf(want, sizeof want, "%s: cannot read: No such file or directory", missing);
    CHECK_STR_EQ(err, want);
    free(missing);

    CHECK(!tp_config_load(&c, tp_test_tmpdir(), err, sizeof err));
    snprintf(want, sizeof want, "%s: cannot read: Is a directory", tp_test_tmpdir());
    CHECK_STR_EQ(err, want);

    if (geteuid() != 0) { /* root reads mode-000 files anyway */
        char *path = tp_test_write_tmp("locked.conf", "[log]\nlevel = info\n");
        CHECK(chmod(path, 0) == 0);
        CHECK(!tp_config_load(&c, path, err, sizeof err));
        snprintf(want, sizeof want, "%s: cannot read: Permission denied", path);
        CHECK_STR_EQ(err, want);
        free(path);
    }
    CHECK(c.path == NULL && c.origin == NULL);
    /* a tiny err buffer is truncated, never overrun; NULL err is allowed */
    char small[8];
    CHECK(!tp_config_load(&c, "/nonexistent/x.conf", small, sizeof small));
    CHECK_STR_EQ(small, "/nonexi");
    CHECK(!tp_config_load(&c, "/nonexistent/x.conf", NULL, 0));
}

static void env_fills_what_the_file_leaves_unset(void)
{
    clear_env();
    setenv("DATABRICKS_HOST", "adb-1.azuredatabricks.net", 1);
    setenv("DATABRICKS_WAREHOUSE_ID", "wh123", 1);
    setenv("DATABRICKS_CLIENT_ID", "app-id", 1);
    setenv("DATABRICKS_CLIENT_SECRET", SECRET, 1);
    setenv("TIDEPOOL_LOG_LEVEL", "warn", 1);
    setenv("DATABRICKS_APP_PORT", "8000", 1);
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.warehouse.host, "adb-1.azuredatabricks.net");
    CHECK_STR_EQ(c.warehouse.warehouse_id, "wh123");
    CHECK_STR_EQ(c.warehouse.client_id, "app-id");
    CHECK_STR_EQ(c.warehouse.client_secret, SECRET);
    CHECK_STR_EQ(c.warehouse.token, "");
    CHECK_STR_EQ(c.log.level, "warn");
    CHECK_STR_EQ(c.server.listen, "0.0.0.0:8000");
    CHECK_STR_EQ(c.auth.mode, "databricks-apps"); /* Databricks Apps' proxy authenticates */
    CHECK_INT_EQ(c.origin[idx("warehouse", "host")].source, TP_CFG_SRC_ENV);
    CHECK_INT_EQ(c.origin[idx("server", "listen")].source, TP_CFG_SRC_ENV);
    CHECK_INT_EQ(tp_config_warehouse_auth(&c), TP_WH_AUTH_OAUTH);
    tp_config_free(&c);

    /* a token as well: loads, and the token wins */
    setenv("DATABRICKS_TOKEN", "dapi" SECRET, 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_INT_EQ(tp_config_warehouse_auth(&c), TP_WH_AUTH_TOKEN);
    tp_config_free(&c);

    /* an empty variable counts as unset */
    setenv("DATABRICKS_APP_PORT", "", 1);
    setenv("TIDEPOOL_LOG_LEVEL", "", 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.server.listen, "127.0.0.1:8080");
    CHECK_STR_EQ(c.log.level, "info");
    CHECK_STR_EQ(c.auth.mode, "none");
    tp_config_free(&c);

    /* bad environment values are reported by variable, secrets not echoed */
    clear_env();
    setenv("TIDEPOOL_LOG_LEVEL", "loud", 1);
    EXPECT_ENV_ERR("env TIDEPOOL_LOG_LEVEL: invalid value \"loud\" for log.level: expected one "
                   "of debug, info, warn, error");
    clear_env();
    setenv("DATABRICKS_APP_PORT", "http", 1);
    EXPECT_ENV_ERR("env DATABRICKS_APP_PORT: invalid value \"0.0.0.0:http\" for server.listen: "
                   "expected ADDR:PORT with a port from 1 to 65535");
    clear_env();
    setenv("DATABRICKS_CLIENT_ID", "app-id", 1);
    EXPECT_ENV_ERR("env DATABRICKS_CLIENT_ID: warehouse.client_id is set but "
                   "warehouse.client_secret is not; OAuth needs both");
    clear_env();
    setenv("DATABRICKS_CLIENT_SECRET", SECRET, 1);
    EXPECT_ENV_ERR("env DATABRICKS_CLIENT_SECRET: warehouse.client_secret is set but "
                   "warehouse.client_id is not; OAuth needs both");
    clear_env();
}

static void file_beats_env_beats_default(void)
{
    clear_env();
    setenv("DATABRICKS_HOST", "env-host", 1);
    setenv("DATABRICKS_WAREHOUSE_ID", "env-wh", 1);
    setenv("TIDEPOOL_LOG_LEVEL", "error", 1);
    setenv("DATABRICKS_APP_PORT", "8000", 1);
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&c,
                        "[warehouse]\nhost = file-host\n[log]\nlevel = debug\n"
                        "[server]\nlisten = 127.0.0.1:9000\n[auth]\nmode = token\n",
                        err, sizeof err),
              "%s", err);
    CHECK_STR_EQ(c.warehouse.host, "file-host");
    CHECK_STR_EQ(c.warehouse.warehouse_id, "env-wh");
    CHECK_STR_EQ(c.log.level, "debug");
    CHECK_STR_EQ(c.server.listen, "127.0.0.1:9000");
    CHECK_STR_EQ(c.auth.mode, "token");
    CHECK_INT_EQ(c.origin[idx("warehouse", "host")].source, TP_CFG_SRC_FILE);
    CHECK_INT_EQ(c.origin[idx("warehouse", "warehouse_id")].source, TP_CFG_SRC_ENV);
    CHECK_INT_EQ(c.origin[idx("warehouse", "catalog")].source, TP_CFG_SRC_DEFAULT);
    tp_config_free(&c);

    /* an explicitly empty file value also beats the environment */
    CHECK_MSG(load_text(&c, "[warehouse]\nhost =\n", err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.warehouse.host, "");
    tp_config_free(&c);
    clear_env();
}

static void credentials_come_from_one_place(void)
{
    clear_env();
    setenv("DATABRICKS_CLIENT_ID", "env-app", 1);
    setenv("DATABRICKS_CLIENT_SECRET", "env-secret", 1);
    tp_config_t c = {0};
    char err[512] = "";
    /* the file chose a token: the environment's OAuth pair is not mixed in */
    CHECK_MSG(load_text(&c, "[warehouse]\ntoken = dapi123\n", err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.warehouse.token, "dapi123");
    CHECK_STR_EQ(c.warehouse.client_id, "");
    CHECK_STR_EQ(c.warehouse.client_secret, "");
    CHECK_INT_EQ(tp_config_warehouse_auth(&c), TP_WH_AUTH_TOKEN);
    tp_config_free(&c);

    /* half a pair in the file is refused even though the environment has the other half */
    EXPECT_ERR("[warehouse]\nhost = h\nclient_id = app\n", 3,
               "warehouse.client_id is set but warehouse.client_secret is not; OAuth needs "
               "both");
    EXPECT_ERR("[warehouse]\nclient_secret = " SECRET "\n", 2,
               "warehouse.client_secret is set but warehouse.client_id is not; OAuth needs "
               "both");
    CHECK_MSG(load_text(&c, "[warehouse]\nclient_id = a\nclient_secret = b\ntoken = t\n", err,
                        sizeof err),
              "%s", err);
    CHECK_INT_EQ(tp_config_warehouse_auth(&c), TP_WH_AUTH_TOKEN);
    tp_config_free(&c);
    clear_env();
}

static void auth_none_needs_loopback(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    static const char *const ok_listen[] = {"127.0.0.1:1", "localhost:80", "[::1]:8080",
                                            "127.1.2.3:9"};
    for (size_t i = 0; i < TP_ARRAY_LEN(ok_listen); i++) {
        char *text = tp_xasprintf("[server]\nlisten = %s\n", ok_listen[i]);
        CHECK_MSG(load_text(&c, text, err, sizeof err), "%s: %s", ok_listen[i], err);
        tp_config_free(&c);
        free(text);
    }
    EXPECT_ERR("[server]\nlisten = 127.0.0.1.nip.io:80\n", 2,
               "auth.mode = none is only allowed on a loopback server.listen (not "
               "127.0.0.1.nip.io:80); set auth.mode to token, databricks-apps or jwt");
    EXPECT_ERR("[server]\nlisten = [::]:80\n", 2,
               "auth.mode = none is only allowed on a loopback server.listen (not "
               "[::]:80); set auth.mode to token, databricks-apps or jwt");
    EXPECT_ERR("[auth]\nmode = none\n[server]\nlisten = 0.0.0.0:8080\n", 4,
               "auth.mode = none is only allowed on a loopback server.listen (not "
               "0.0.0.0:8080); set auth.mode to token, databricks-apps or jwt");
    CHECK_MSG(load_text(&c,
                        "[auth]\nmode = jwt\njwt_audience = api\njwt_issuer = https://idp/\n"
                        "[server]\nlisten = 0.0.0.0:8080\n",
                        err, sizeof err),
              "%s", err);
    tp_config_free(&c);
    /* listen from the environment, auth.mode = none from the file: points at the file line */
    setenv("DATABRICKS_APP_PORT", "8000", 1);
    EXPECT_ERR("[auth]\nmode = none\n", 2,
               "auth.mode = none is only allowed on a loopback server.listen (not "
               "0.0.0.0:8000); set auth.mode to token, databricks-apps or jwt");
    clear_env();
}

static void variables_expand(void)
{
    clear_env();
    setenv("TP_CFG_A", "alpha", 1);
    setenv("TP_CFG_EMPTY", "", 1);
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&c,
                        "[warehouse]\n"
                        "host = https://${TP_CFG_A}.example.com\n"
                        "catalog = ${TP_CFG_UNSET:-main}_${TP_CFG_A:-x}\n"
                        "schema = \"${TP_CFG_EMPTY:-fallback} $$HOME $${TP_CFG_A} a$b $\"\n"
                        "warehouse_id = pre${TP_CFG_EMPTY}post${TP_CFG_UNSET:-}\n"
                        "token = \"${TP_CFG_A}\"\n",
                        err, sizeof err),
              "%s", err);
    CHECK_STR_EQ(c.warehouse.host, "https://alpha.example.com");
    CHECK_STR_EQ(c.warehouse.catalog, "main_alpha");
    CHECK_STR_EQ(c.warehouse.schema, "fallback $HOME ${TP_CFG_A} a$b $");
    CHECK_STR_EQ(c.warehouse.warehouse_id, "prepost");
    CHECK_STR_EQ(c.warehouse.token, "alpha");
    tp_config_free(&c);
    /* an expanded value is validated like a literal one, and not expanded again */
    setenv("TP_CFG_A", "${TP_CFG_EMPTY}", 1);
    CHECK_MSG(load_text(&c, "[warehouse]\nhost = ${TP_CFG_A}\n", err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.warehouse.host, "${TP_CFG_EMPTY}");
    tp_config_free(&c);
    setenv("TP_CFG_A", "12x", 1);
    EXPECT_ERR("[postgres]\npool_size = ${TP_CFG_A}\n", 2,
               "invalid value \"12x\" for postgres.pool_size: expected an integer from 1 to "
               "1000");
    clear_env();
}

static void print_masks_secrets(void)
{
    clear_env();
    setenv("DATABRICKS_HOST", "env-host", 1);
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&c,
                        "[postgres]\n"
                        "dsn = host=db user=tp password=" SECRET " dbname=tp\n"
                        "read_dsn = postgresql://tp:" SECRET "@replica:5432/tp?sslmode=require\n"
                        "[warehouse]\n"
                        "token = dapi" SECRET "\n",
                        err, sizeof err),
              "%s", err);
    char *out = print_config(&c);
    CHECK(out != NULL && strstr(out, SECRET) == NULL);
    CHECK_CONTAINS(out, "postgres.dsn = host=db user=tp password=******** dbname=tp  (file)\n");
    CHECK_CONTAINS(out, "postgres.read_dsn = postgresql://tp:********@replica:5432/"
                        "tp?sslmode=require  (file)\n");
    CHECK_CONTAINS(out, "warehouse.token = ********  (file)\n");
    CHECK_CONTAINS(out, "warehouse.client_secret = (unset)  (default)\n");
    CHECK_CONTAINS(out, "warehouse.host = env-host  (env DATABRICKS_HOST)\n");
    CHECK_CONTAINS(out, "warehouse.catalog = \"\"  (default)\n");
    CHECK_CONTAINS(out, "postgres.pool_size = 4  (default)\n");
    CHECK_CONTAINS(out, "server.max_body_bytes = 1M  (default)\n");
    CHECK_CONTAINS(out, "server.max_header_bytes = 16k  (default)\n");
    CHECK_CONTAINS(out, "server.timeout = 30s  (default)\n");
    CHECK_CONTAINS(out, "warehouse.timeout = 1m  (default)\n");
    CHECK_CONTAINS(out, "postgres.connect_timeout = 10s  (default)\n");
    CHECK_CONTAINS(out, "server.listen = 127.0.0.1:8080  (default)\n");
    size_t lines = 0;
    for (const char *p = out; p && *p; p++)
        lines += *p == '\n';
    CHECK_INT_EQ(lines, tp_settings_count);
    free(out);
    tp_config_free(&c);

    /* a secret from the environment is masked too */
    setenv("DATABRICKS_CLIENT_ID", "app", 1);
    setenv("DATABRICKS_CLIENT_SECRET", SECRET, 1);
    CHECK(tp_config_load(&c, NULL, err, sizeof err));
    out = print_config(&c);
    CHECK(out != NULL && strstr(out, SECRET) == NULL);
    CHECK_CONTAINS(out, "warehouse.client_secret = ********  (env DATABRICKS_CLIENT_SECRET)\n");
    CHECK_CONTAINS(out, "warehouse.client_id = app  (env DATABRICKS_CLIENT_ID)\n");
    free(out);
    tp_config_free(&c);
    clear_env();
}

static void mask_one(const char *file, int line, const char *in, const char *want)
{
    char *got = tp_config_mask_dsn(in);
    if (strcmp(got, want) != 0)
        tp_test_fail(file, line, "mask(\"%s\") = \"%s\", want \"%s\"", in ? in : "NULL", got,
                     want);
    free(got);
}
#define MASK_EQ(in, want) mask_one(__FILE__, __LINE__, in, want)

static void dsn_masking(void)
{
    MASK_EQ(NULL, "");
    MASK_EQ("", "");
    MASK_EQ("host=/tmp dbname=tp", "host=/tmp dbname=tp");
    MASK_EQ("host=h password=" SECRET " dbname=d", "host=h password=******** dbname=d");
    MASK_EQ("password = " SECRET, "password = ********");
    MASK_EQ("host=h password='" SECRET " with \\' quote' user=u",
            "host=h password=******** user=u");
    MASK_EQ("PASSWORD=" SECRET, "PASSWORD=********");
    MASK_EQ("sslpassword=" SECRET " sslmode=verify-full", "sslpassword=******** sslmode=verify-full");
    MASK_EQ("user='a b' password=" SECRET, "user='a b' password=********");
    MASK_EQ("host=h password='" SECRET, "host=h password=********"); /* unterminated */
    MASK_EQ("host=h password", "host=h ********");                   /* malformed */
    MASK_EQ("host=h " SECRET, "host=h ********");
    MASK_EQ("dbname=postgresql://u:" SECRET "@h/db", "dbname=********");
    MASK_EQ("dbname='host=h password=" SECRET "'", "dbname=********");

    MASK_EQ("postgresql://tp:" SECRET "@db.example.com:5432/tp",
            "postgresql://tp:********@db.example.com:5432/tp");
    MASK_EQ("postgres://tp:" SECRET "@db/tp?sslmode=require",
            "postgres://tp:********@db/tp?sslmode=require");
    MASK_EQ("postgresql://tp@db/tp", "postgresql://tp@db/tp");
    MASK_EQ("postgresql://db:5432/tp", "postgresql://db:5432/tp");
    MASK_EQ("postgresql:///tp?host=/tmp&password=" SECRET "&sslmode=disable",
            "postgresql:///tp?host=/tmp&password=********&sslmode=disable");
    MASK_EQ("postgresql://u:p?" SECRET "@db/tp", "postgresql://u:********@db/tp");
    MASK_EQ("postgresql://u:" SECRET "@db/tp?password=" SECRET,
            "postgresql://u:********@db/tp?password=********");
    MASK_EQ("postgresql://u:@db", "postgresql://u:********@db");
}

/* Every way a secret's value could reach an error message: none does. */
static void errors_never_show_secrets(void)
{
    clear_env();
    static const char *const bad[] = {
        "[warehouse]\ntoken = \"" SECRET "\n",
        "[warehouse]\ntoken = \"" SECRET "\" x\n",
        "[warehouse]\ntoken = \"" SECRET "\\n\"\n",
        "[warehouse]\ntoken = " SECRET "${\n",
        "[warehouse]\ntoken = ${" SECRET " x}\n",
        "[warehouse]\ntoken = ${" SECRET "}\n", /* names the variable, which is not the value */
        "[warehouse]\ntoken = a\ntoken = " SECRET "\n",
        "[warehouse]\n" SECRET "\n",
        "[warehouse]\ntoken: " SECRET "\n",
        "[warehouse]\nclient_secret = " SECRET "\n",
        "[postgres]\ndsn = host=h password=" SECRET " port\n",
        "[postgres]\ndsn = postgresql://u:" SECRET "@h/db?bogus=1\n",
        "[postgres]\nread_dsn = password='" SECRET "\n",
        "[postgres]\ndsn = bogus=1 password=" SECRET "\n",
    };
    for (size_t i = 0; i < TP_ARRAY_LEN(bad); i++) {
        tp_config_t c = {0};
        char err[1024] = "";
        bool ok = load_text(&c, bad[i], err, sizeof err);
        CHECK_MSG(!ok, "case %zu loaded", i);
        CHECK_MSG(err[0] != '\0', "case %zu: no message", i);
        if (i != 5)
            CHECK_MSG(strstr(err, SECRET) == NULL, "case %zu leaks: %s", i, err);
        else
            CHECK_CONTAINS(err, "environment variable " SECRET " is not set");
        if (ok)
            tp_config_free(&c);
    }
    setenv("DATABRICKS_CLIENT_SECRET", SECRET, 1);
    tp_config_t c = {0};
    char err[1024] = "";
    CHECK(!tp_config_load(&c, NULL, err, sizeof err));
    CHECK(err[0] != '\0' && strstr(err, SECRET) == NULL);
    clear_env();
}

/* The [auth] settings lib/auth.c reads: defaults, parsing, bounds, and the
 * two secrets (tokens, jwt_secret) masked in --check output and errors. */
static void auth_settings(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    CHECK(tp_config_load(&c, NULL, err, sizeof err));
    CHECK_STR_EQ(c.auth.anonymous_roles, "reader, writer, admin");
    CHECK_STR_EQ(c.auth.tokens, "");
    CHECK_STR_EQ(c.auth.tokens_file, "");
    CHECK(c.auth.token_table);
    CHECK_STR_EQ(c.auth.trusted_proxies, "127.0.0.1/32, ::1/128");
    CHECK_STR_EQ(c.auth.roles, "");
    CHECK_STR_EQ(c.auth.jwt_secret, "");
    CHECK_STR_EQ(c.auth.jwt_roles_claim, "roles");
    CHECK_STR_EQ(c.auth.jwt_groups_claim, "groups");
    CHECK_INT_EQ(c.auth.jwt_clock_skew_ms, 60000);
    CHECK_INT_EQ(c.auth.rate_per_identity, 20);
    CHECK_INT_EQ(c.auth.burst_per_identity, 100);
    CHECK_INT_EQ(c.auth.rate_per_address, 50);
    CHECK_INT_EQ(c.auth.burst_per_address, 200);
    CHECK_INT_EQ(c.auth.rate_limit_keys, 50000);
    tp_config_free(&c);

    CHECK_MSG(load_text(&c,
                        "[auth]\n"
                        "mode = jwt\n"
                        "tokens = ci:reader:" SECRET "\n"
                        "token_table = off\n"
                        "trusted_proxies = 10.0.0.0/8\n"
                        "roles = *:reader\n"
                        "jwt_secret = " SECRET SECRET SECRET "\n"
                        "jwt_jwks_file = /etc/tidepool/jwks.json\n"
                        "jwt_audience = api\n"
                        "jwt_issuer = https://idp/\n"
                        "jwt_clock_skew = 0\n"
                        "jwt_roles_claim = realm_access.roles\n"
                        "rate_per_identity = 0\n"
                        "burst_per_address = 1\n",
                        err, sizeof err),
              "%s", err);
    CHECK(!c.auth.token_table);
    CHECK_INT_EQ(c.auth.jwt_clock_skew_ms, 0);
    CHECK_INT_EQ(c.auth.rate_per_identity, 0);
    CHECK_INT_EQ(c.auth.burst_per_address, 1);
    CHECK_STR_EQ(c.auth.jwt_roles_claim, "realm_access.roles");
    char *out = print_config(&c);
    CHECK(out != NULL && strstr(out, SECRET) == NULL);
    CHECK_CONTAINS(out, "auth.tokens = ********  (file)\n");
    CHECK_CONTAINS(out, "auth.jwt_secret = ********  (file)\n");
    CHECK_CONTAINS(out, "auth.jwt_audience = api  (file)\n");
    CHECK_CONTAINS(out, "auth.jwt_clock_skew = 0  (file)\n");
    free(out);
    /* auth settings take effect on reload */
    tp_config_t d = {0};
    CHECK(load_text(&d,
                    "[auth]\nmode = jwt\njwt_audience = other\njwt_issuer = https://idp/\n"
                    "rate_per_address = 5\n",
                    err, sizeof err));
    CHECK(tp_config_restart_needed(&c, &d) == NULL);
    tp_config_free(&d);
    tp_config_free(&c);

    /* jwt mode always checks aud and iss: both must be configured */
    EXPECT_ERR("[auth]\nmode = jwt\njwt_issuer = https://idp/\n", 2,
               "auth.mode = jwt needs auth.jwt_audience: every token's aud and iss are checked "
               "against auth.jwt_audience and auth.jwt_issuer");
    EXPECT_ERR("[auth]\njwt_audience = api\nmode = jwt\n", 3,
               "auth.mode = jwt needs auth.jwt_issuer: every token's aud and iss are checked "
               "against auth.jwt_audience and auth.jwt_issuer");
    EXPECT_ERR("[auth]\njwt_clock_skew = 11m\n", 2,
               "invalid value \"11m\" for auth.jwt_clock_skew: expected a duration from 0 to "
               "10m (like 30s, 5m, 250ms)");
    EXPECT_ERR("[auth]\nburst_per_identity = 0\n", 2,
               "invalid value \"0\" for auth.burst_per_identity: expected an integer from 1 to "
               "1000000");
    EXPECT_ERR("[auth]\nrate_per_address = -1\n", 2,
               "invalid value \"-1\" for auth.rate_per_address: expected an integer from 0 to "
               "1000000");
    EXPECT_ERR("[auth]\ntoken_table = maybe\n", 2,
               "invalid value \"maybe\" for auth.token_table: expected true or false");
    EXPECT_ERR("[auth]\nrate_limit_keys = 0\n", 2,
               "invalid value \"0\" for auth.rate_limit_keys: expected an integer from 1 to "
               "10000000");
}

static char *reference_text(void)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    tp_config_print_reference(f);
    fclose(f);
    return text;
}

static void fallback_settings(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    CHECK(tp_config_load(&c, NULL, err, sizeof err));
    CHECK_INT_EQ(c.warehouse.max_in_flight, 64);
    CHECK_INT_EQ(c.warehouse.wait_ms, 10000);
    CHECK_INT_EQ(c.warehouse.max_wait_ms, 30000);
    CHECK_INT_EQ(c.warehouse.result_cache_bytes, 64LL << 20);
    CHECK_INT_EQ(c.warehouse.max_result_bytes, 16LL << 20);
    CHECK_INT_EQ(c.warehouse.result_ttl_ms, 300000);
    CHECK_INT_EQ(c.warehouse.abandon_ms, 60000);
    tp_config_free(&c);
    CHECK_MSG(load_text(&c,
                        "[warehouse]\nmax_in_flight = 3\nwait = 0\nmax_wait = 2m\n"
                        "result_cache_bytes = 0\nmax_result_bytes = 1M\nresult_ttl = 0\n"
                        "abandon_after = 250ms\n",
                        err, sizeof err),
              "%s", err);
    CHECK_INT_EQ(c.warehouse.max_in_flight, 3);
    CHECK_INT_EQ(c.warehouse.wait_ms, 0);
    CHECK_INT_EQ(c.warehouse.max_wait_ms, 120000);
    CHECK_INT_EQ(c.warehouse.result_cache_bytes, 0);
    CHECK_INT_EQ(c.warehouse.max_result_bytes, 1LL << 20);
    CHECK_INT_EQ(c.warehouse.abandon_ms, 250);
    tp_config_free(&c);
    EXPECT_ERR("[warehouse]\nmax_in_flight = 0\n", 2,
               "invalid value \"0\" for warehouse.max_in_flight: expected an integer from 1 to "
               "100000");
    EXPECT_ERR("[warehouse]\nmax_wait = 5s\nwait = 20s\n", 3,
               "warehouse.wait (20000 ms) is longer than warehouse.max_wait (5000 ms)");
    EXPECT_ERR("[warehouse]\nmax_result_bytes = 10\n", 2,
               "invalid value \"10\" for warehouse.max_result_bytes: expected a size from 1k to "
               "16G (like 64k, 16M)");
}

static void lakebase_settings(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&c, "", err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    CHECK_INT_EQ(c.postgres.lakebase_refresh_before_ms, 120000);
    tp_config_free(&c);
    static const char wh[] = "[warehouse]\nhost = https://x.cloud.databricks.com\ntoken = " SECRET "\n";
    char *text = tp_xasprintf("%s[postgres]\npassword_source = lakebase\nlakebase_instance = inst1\n"
                              "lakebase_refresh_before = 30s\n", wh);
    CHECK_MSG(load_text(&c, text, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.lakebase_instance, "inst1");
    CHECK_STR_EQ(c.postgres.lakebase_endpoint, "");
    CHECK_INT_EQ(c.postgres.lakebase_refresh_before_ms, 30000);
    tp_config_free(&c);
    free(text);
    /* Databricks Apps: the endpoint path comes from the environment (valueFrom: postgres) */
    setenv("LAKEBASE_ENDPOINT", "projects/p/branches/b/endpoints/e", 1);
    text = tp_xasprintf("%s[postgres]\npassword_source = lakebase\n", wh);
    CHECK_MSG(load_text(&c, text, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.lakebase_endpoint, "projects/p/branches/b/endpoints/e");
    CHECK(c.origin[idx("postgres", "lakebase_endpoint")].source == TP_CFG_SRC_ENV);
    tp_config_free(&c);
    free(text);
    setenv("LAKEBASE_ENDPOINT", "ep-123", 1);
    EXPECT_ENV_ERR("env LAKEBASE_ENDPOINT: postgres.lakebase_endpoint must look like "
                   "projects/<project>/branches/<branch>/endpoints/<endpoint>");
    clear_env();
    EXPECT_ERR("[warehouse]\nhost = h\ntoken = t\n[postgres]\npassword_source = lakebase\n", 5,
               "postgres.password_source = lakebase needs postgres.lakebase_instance (Provisioned) "
               "or postgres.lakebase_endpoint (Autoscaling, env LAKEBASE_ENDPOINT)");
    EXPECT_ERR("[warehouse]\nhost = h\ntoken = t\n[postgres]\npassword_source = lakebase\n"
               "lakebase_instance = i\nlakebase_endpoint = projects/p/branches/b/endpoints/e\n",
               7,
               "postgres.lakebase_instance and postgres.lakebase_endpoint are both set; set one "
               "(Provisioned instance or Autoscaling endpoint)");
    EXPECT_ERR("[postgres]\npassword_source = lakebase\nlakebase_instance = i\n", 2,
               "postgres.password_source = lakebase needs warehouse.host and workspace credentials "
               "(warehouse.token, or client_id and client_secret)");
    EXPECT_ERR("[postgres]\npassword_source = vault\n", 2,
               "invalid value \"vault\" for postgres.password_source: expected one of auto, none, "
               "lakebase");
    EXPECT_ERR("[postgres]\nlakebase_refresh_before = 0s\n", 2,
               "invalid value \"0s\" for postgres.lakebase_refresh_before: expected a duration "
               "from 1s to 30m (like 30s, 5m, 250ms)");
    /* with password_source = none the instance is just unused */
    CHECK_MSG(load_text(&c, "[postgres]\npassword_source = none\nlakebase_instance = i\n", err,
                        sizeof err),
              "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    tp_config_free(&c);
}

/* password_source = auto (the default): a Lakebase instance or endpoint asks
 * for minted passwords unless a password is given or the setting says none;
 * TIDEPOOL_PG_PASSWORD_SOURCE sets it from the environment (Databricks Apps). */
static void lakebase_auto(void)
{
    clear_env();
    unsetenv("PGPASSWORD");
    unsetenv("TIDEPOOL_PGPASSWORD_FILE");
    tp_config_t c = {0};
    char err[1024] = "";
    /* Databricks Apps with an Autoscaling database: no file, only the injected
     * variables and app.yaml's LAKEBASE_ENDPOINT (valueFrom: postgres) */
    setenv("DATABRICKS_HOST", "https://x.cloud.databricks.com", 1);
    setenv("DATABRICKS_CLIENT_ID", "app-sp", 1);
    setenv("DATABRICKS_CLIENT_SECRET", SECRET, 1);
    setenv("LAKEBASE_ENDPOINT", "projects/p/branches/b/endpoints/e", 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "lakebase");
    char *out = print_config(&c);
    CHECK_CONTAINS(out, "postgres.password_source = lakebase  (default; auto: a Lakebase instance "
                        "or endpoint is set)\n");
    free(out);
    tp_config_free(&c);
    /* a password given outright wins over auto */
    setenv("PGPASSWORD", SECRET, 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    tp_config_free(&c);
    unsetenv("PGPASSWORD");
    CHECK_MSG(load_text(&c, "[postgres]\ndsn = host=h password=" SECRET "\n", err, sizeof err),
              "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    tp_config_free(&c);
    /* so does the environment's explicit choice */
    setenv("TIDEPOOL_PG_PASSWORD_SOURCE", "none", 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    CHECK(c.origin[idx("postgres", "password_source")].source == TP_CFG_SRC_ENV);
    tp_config_free(&c);
    /* and lakebase from the environment, with a Provisioned instance */
    setenv("TIDEPOOL_PG_PASSWORD_SOURCE", "lakebase", 1);
    unsetenv("LAKEBASE_ENDPOINT");
    setenv("LAKEBASE_INSTANCE", "inst1", 1);
    setenv("PGPASSWORD", SECRET, 1); /* explicit: minted all the same */
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "lakebase");
    tp_config_free(&c);
    unsetenv("PGPASSWORD");
    setenv("TIDEPOOL_PG_PASSWORD_SOURCE", "sometimes", 1);
    EXPECT_ENV_ERR("env TIDEPOOL_PG_PASSWORD_SOURCE: invalid value \"sometimes\" for "
                   "postgres.password_source: expected one of auto, none, lakebase");
    unsetenv("TIDEPOOL_PG_PASSWORD_SOURCE");
    /* nothing named: none, and the reason is printed */
    clear_env();
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.postgres.password_source, "none");
    out = print_config(&c);
    CHECK_CONTAINS(out, "postgres.password_source = none  (default; auto: no Lakebase instance or "
                        "endpoint is set)\n");
    free(out);
    tp_config_free(&c);
    /* auto picked lakebase but cannot mint: the error says why and how to opt out */
    EXPECT_ERR("[postgres]\nlakebase_instance = i\n", 2,
               "postgres.lakebase_instance is set, so Postgres passwords are minted by Lakebase "
               "(password_source = auto), which needs warehouse.host and workspace credentials "
               "(warehouse.token, or client_id and client_secret); set password_source = none "
               "(env TIDEPOOL_PG_PASSWORD_SOURCE) to log in with libpq's password instead");
    setenv("LAKEBASE_ENDPOINT", "projects/p/branches/b/endpoints/e", 1);
    EXPECT_ENV_ERR("env LAKEBASE_ENDPOINT: postgres.lakebase_endpoint is set, so Postgres "
                   "passwords are minted by Lakebase (password_source = auto), which needs "
                   "warehouse.host and workspace credentials (warehouse.token, or client_id and "
                   "client_secret); set password_source = none (env TIDEPOOL_PG_PASSWORD_SOURCE) "
                   "to log in with libpq's password instead");
    clear_env();
}

static void reference_lists_every_setting(void)
{
    char *ref = reference_text();
    CHECK(ref != NULL);
    CHECK_CONTAINS(ref, "| setting | type | default | env | reloadable | secret | help |\n");
    for (size_t i = 0; i < tp_settings_count; i++) {
        char row[128];
        snprintf(row, sizeof row, "| `%s.%s` | ", tp_settings[i].section, tp_settings[i].key);
        CHECK_CONTAINS(ref, row);
        CHECK_MSG(tp_settings[i].help && *tp_settings[i].help, "%s has no help", row);
    }
    CHECK_CONTAINS(ref, "| `warehouse.token` | string | (empty) | `DATABRICKS_TOKEN` | no | yes |");
    CHECK_CONTAINS(ref, "`DATABRICKS_APP_PORT` (as `0.0.0.0:%s`)");
    /* README.md and docs/configuration.md carry the same table: `make docs` regenerates it */
    const char *root = getenv("TP_ROOT");
    static const char *const docs[] = {"docs/configuration.md", "README.md"};
    for (size_t i = 0; i < TP_ARRAY_LEN(docs); i++) {
        char *path = tp_xasprintf("%s/%s", root ? root : ".", docs[i]);
        char *doc = tp_read_file(path, NULL);
        CHECK_MSG(doc != NULL, "cannot read %s", path);
        if (doc && ref)
            CHECK_MSG(strstr(doc, ref) != NULL, "%s is out of date: run make docs", path);
        free(doc);
        free(path);
    }
    free(ref);
}

static void reload_reports_restart_needed(void)
{
    clear_env();
    tp_config_t a = {0}, b = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&a, "[log]\nlevel = info\n[sync]\nmax_concurrent_jobs = 2\n", err,
                        sizeof err),
              "%s", err);
    CHECK_MSG(load_text(&b, "[log]\nlevel = debug\n[sync]\nmax_concurrent_jobs = 8\n", err,
                        sizeof err),
              "%s", err);
    CHECK(tp_config_restart_needed(&a, &b) == NULL);
    tp_config_free(&b);
    CHECK_MSG(load_text(&b, "[server]\nlisten = 127.0.0.1:9999\n", err, sizeof err), "%s", err);
    const tp_setting_t *s = tp_config_restart_needed(&a, &b);
    CHECK(s != NULL && strcmp(s->key, "listen") == 0);
    tp_config_free(&b);
    CHECK_MSG(load_text(&b, "[server]\nmax_body_bytes = 2M\n", err, sizeof err), "%s", err);
    s = tp_config_restart_needed(&a, &b);
    CHECK(s != NULL && strcmp(s->key, "max_body_bytes") == 0);
    tp_config_free(&b);
    /* a failed reload leaves the running config untouched */
    CHECK(!load_text(&b, "[log]\nlevel = nope\n", err, sizeof err));
    CHECK_STR_EQ(a.log.level, "info");
    tp_config_free(&a);
}

/* Mutated files never crash the parser (ASan build) and always fail with one
 * "PATH:" line; the seed is fixed so a failure reproduces. */
static void mutated_files_fail_cleanly(void)
{
    clear_env();
    setenv("TP_CFG_A", "warn", 1);
    static const char base[] = "[postgres]\ndsn = host=h password='x y'\npool_size = 4\n"
                               "[warehouse]\nhost = \"${TP_CFG_A:-h}\"\ntoken = $$t\n"
                               "[server]\nlisten = [::1]:80\ntimeout = 30s\n"
                               "[log]\nlevel = ${TP_CFG_A}\n";
    static const char alphabet[] = "[]=\"\\${}:-#; \n\rax1\x01\xff";
    srand(12345);
    char text[sizeof base], err0[512];
    int loaded = 0;
    tp_config_t c0 = {0};
    for (int i = 0; i < 1500; i++) {
        memcpy(text, base, sizeof base);
        for (int m = 1 + rand() % 4; m > 0; m--)
            text[rand() % (int)(sizeof base - 1)] = alphabet[rand() % (int)(sizeof alphabet - 1)];
        tp_config_t c = {0};
        char err[512] = "";
        if (load_text(&c, text, err, sizeof err)) {
            loaded++;
            tp_config_free(&c);
            continue;
        }
        CHECK_MSG(strncmp(err, g_path, strlen(g_path)) == 0 && err[strlen(g_path)] == ':',
                  "case %d: \"%s\"", i, err);
        CHECK_MSG(strchr(err, '\n') == NULL && strchr(err, '\r') == NULL, "case %d: \"%s\"", i,
                  err);
    }
    CHECK(loaded > 0 && loaded < 1500); /* both paths were exercised */
    CHECK(load_text(&c0, base, err0, sizeof err0));
    tp_config_free(&c0);
    /* an echoed value with a newline stays on one line */
    setenv("TIDEPOOL_LOG_LEVEL", "de\nbug", 1);
    EXPECT_ENV_ERR("env TIDEPOOL_LOG_LEVEL: invalid value \"de?bug\" for log.level: expected one "
                   "of debug, info, warn, error");
    clear_env();
}

/* The table itself: every default parses (no setting can fail on defaults),
 * names are unique, and the types carry what they need. */
static void table_is_consistent(void)
{
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        for (size_t j = 0; j < i; j++)
            CHECK_MSG(strcmp(s->section, tp_settings[j].section) != 0 ||
                          strcmp(s->key, tp_settings[j].key) != 0,
                      "duplicate %s.%s", s->section, s->key);
        if (s->type == TP_CFG_ENUM)
            CHECK_MSG(s->choices != NULL, "%s.%s has no choices", s->section, s->key);
        if (s->type == TP_CFG_INT || s->type == TP_CFG_DURATION || s->type == TP_CFG_SIZE)
            CHECK_MSG(s->min <= s->max, "%s.%s range", s->section, s->key);
    }
}

static void server_tuning_and_tls(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(load_text(&c, "[server]\nlisten = 127.0.0.1:1\n", err, sizeof err), "%s", err);
    CHECK_INT_EQ(c.server.cache_bytes, 64 << 20);
    CHECK_INT_EQ(c.server.pool_queue, 256);
    CHECK_INT_EQ(c.server.table_max_limit, 1000);
    CHECK_INT_EQ(c.server.drain_timeout_ms, 10000);
    CHECK_STR_EQ(c.server.tls_listen, "");
    tp_config_free(&c);
    CHECK_MSG(load_text(&c,
                        "[server]\ncache_bytes = 0\npool_queue = 8\ntable_max_limit = 5\n"
                        "drain_timeout = 1500ms\ntls_listen = 127.0.0.1:8443\n"
                        "tls_cert = /x.crt\ntls_key = /x.key\n",
                        err, sizeof err),
              "%s", err);
    CHECK_INT_EQ(c.server.cache_bytes, 0);
    CHECK_INT_EQ(c.server.pool_queue, 8);
    CHECK_INT_EQ(c.server.table_max_limit, 5);
    CHECK_INT_EQ(c.server.drain_timeout_ms, 1500);
    CHECK_STR_EQ(c.server.tls_listen, "127.0.0.1:8443");
    tp_config_free(&c);
    EXPECT_ERR("[server]\ntls_listen = 8443\n", 2,
               "invalid value \"8443\" for server.tls_listen: expected ADDR:PORT with a port from "
               "1 to 65535");
    EXPECT_ERR("[server]\ntls_listen = 127.0.0.1:8443\ntls_cert = /x.crt\n", 2,
               "server.tls_listen is set but server.tls_key is not; HTTPS needs a certificate "
               "and its key");
    EXPECT_ERR("[server]\ntls_listen = 127.0.0.1:8443\n", 2,
               "server.tls_listen is set but server.tls_cert is not; HTTPS needs a certificate "
               "and its key");
    EXPECT_ERR("[server]\n\ntls_listen = 0.0.0.0:8443\ntls_cert = a\ntls_key = b\n", 3,
               "auth.mode = none is only allowed on a loopback server.tls_listen (not "
               "0.0.0.0:8443); set auth.mode to token, databricks-apps or jwt");
    EXPECT_ERR("[server]\ntable_max_limit = 0\n", 2,
               "invalid value \"0\" for server.table_max_limit: expected an integer from 1 to "
               "1000000");
    EXPECT_ERR("[server]\ndrain_timeout = soon\n", 2,
               "invalid value \"soon\" for server.drain_timeout: expected a duration from 0 to "
               "10m (like 30s, 5m, 250ms)");
}

/* Inside Databricks Apps (DATABRICKS_APP_NAME injected) every peer is a
 * trusted proxy unless the file says otherwise; outside, loopback only. */
static void apps_trust_the_proxy(void)
{
    clear_env();
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.auth.trusted_proxies, "127.0.0.1/32, ::1/128");
    tp_config_free(&c);
    setenv("DATABRICKS_APP_NAME", "tidepool", 1);
    setenv("DATABRICKS_APP_PORT", "8000", 1);
    CHECK_MSG(tp_config_load(&c, NULL, err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.auth.trusted_proxies, "0.0.0.0/0, ::/0");
    CHECK_STR_EQ(c.auth.mode, "databricks-apps");
    CHECK_STR_EQ(c.server.listen, "0.0.0.0:8000");
    tp_config_free(&c);
    CHECK_MSG(load_text(&c, "[auth]\ntrusted_proxies = 10.0.0.0/8\n", err, sizeof err), "%s", err);
    CHECK_STR_EQ(c.auth.trusted_proxies, "10.0.0.0/8");
    tp_config_free(&c);
    clear_env();
}

int main(void)
{
    TP_RUN(defaults_without_file);
    TP_RUN(file_format_parses);
    TP_RUN(file_errors_are_one_precise_line);
    TP_RUN(web_settings);
    TP_RUN(unreadable_files_are_named);
    TP_RUN(env_fills_what_the_file_leaves_unset);
    TP_RUN(file_beats_env_beats_default);
    TP_RUN(credentials_come_from_one_place);
    TP_RUN(auth_none_needs_loopback);
    TP_RUN(variables_expand);
    TP_RUN(print_masks_secrets);
    TP_RUN(dsn_masking);
    TP_RUN(errors_never_show_secrets);
    TP_RUN(auth_settings);
    TP_RUN(fallback_settings);
    TP_RUN(lakebase_settings);
    TP_RUN(lakebase_auto);
    TP_RUN(reference_lists_every_setting);
    TP_RUN(reload_reports_restart_needed);
    TP_RUN(mutated_files_fail_cleanly);
    TP_RUN(table_is_consistent);
    TP_RUN(server_tuning_and_tls);
    TP_RUN(apps_trust_the_proxy);
    free(g_path);
    return tp_test_done();
}
