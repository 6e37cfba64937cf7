/* `--ping`: checks, in order, that Postgres accepts a connection (and which
 * server and schema version it has) and that the warehouse accepts our
 * credentials, knows our warehouse id and runs SELECT 1. Each check prints
 * one line "NAME  ok|FAILED|skipped  detail". The checks are blocking and
 * meant for the command line only. It does not try to fix anything: a failed
 * check names the setting or the answer that explains it. */
#include "tidepool/ping.h"

#include <stdlib.h>
#include <string.h>

#include "tidepool/lakebase.h"
#include "tidepool/migrate.h"
#include "tidepool/pg.h"
#include "tidepool/util.h"
#include "tidepool/wh_settings.h"

static void line(FILE *out, const char *what, const char *verdict, const char *detail)
{
    fprintf(out, "%-10s %-8s %s\n", what, verdict, detail);
}

static bool ping_postgres(const tp_config_t *cfg, FILE *out)
{
    char err[512];
    PGconn *conn = tp_lakebase_connect_settings(cfg, cfg->postgres.dsn, cfg->postgres.connect_timeout_ms,
                                                err, sizeof err);
    if (conn == NULL) {
        line(out, "postgres", "FAILED", err);
        return false;
    }
    char where[256];
    tp_pg_where(conn, where, sizeof where);
    int v = PQserverVersion(conn);
    char *detail = tp_xasprintf("%s, database %s as %s (PostgreSQL %d.%d)", where, PQdb(conn),
                                PQuser(conn), v / 10000, v % 10000);
    line(out, "postgres", "ok", detail);
    free(detail);

    bool ok = true;
    tp_migrate_status_t st;
    char why[512];
    if (!tp_migrate_status(conn, tp_migrate_default_dir(), &st, err, sizeof err)) {
        line(out, "schema", "FAILED", err);
        ok = false;
    } else if (!tp_migrate_status_current(&st, why, sizeof why)) {
        line(out, "schema", "FAILED", why);
        ok = false;
    } else {
        char cur[64];
        snprintf(cur, sizeof cur, "current (migration %04d)", st.current);
        line(out, "schema", "ok", cur);
    }
    PQfinish(conn);
    return ok;
}

static const char *auth_name(const tp_wh_config_t *wc)
{
    if (wc->token)
        return "personal access token";
    if (wc->client_id && wc->client_secret)
        return "OAuth machine-to-machine";
    return NULL;
}

static bool ping_warehouse(const tp_config_t *cfg, FILE *out)
{
    tp_wh_config_t wc;
    tp_wh_config_init(&wc);
    tp_wh_config_from_settings(&wc, cfg);
    if (wc.host == NULL) {
        line(out, "warehouse", "FAILED", "no host: set [warehouse] host or DATABRICKS_HOST");
        return false;
    }
    if (wc.warehouse_id == NULL) {
        line(out, "warehouse", "FAILED",
             "no warehouse id: set [warehouse] warehouse_id or DATABRICKS_WAREHOUSE_ID");
        return false;
    }
    if (auth_name(&wc) == NULL) {
        line(out, "warehouse", "FAILED",
             "no credentials: set [warehouse] token (DATABRICKS_TOKEN) or client_id and "
             "client_secret (DATABRICKS_CLIENT_ID, DATABRICKS_CLIENT_SECRET)");
        return false;
    }
    char *herr = NULL;
    char *host = tp_wh_normalize_host(wc.host, &herr);
    if (host == NULL) {
        char *d = tp_xasprintf("[warehouse] host: %s", herr);
        line(out, "warehouse", "FAILED", d);
        free(d);
        free(herr);
        return false;
    }

    tp_wh_request_t req;
    tp_wh_request_init(&req);
    req.sql = "SELECT 1 AS ok";
    req.wait_timeout_s = 30;
    req.timeout_ms = 60000;
    req.label = "ping";
    int64_t started = tp_now_ms();
    tp_wh_result_t res;
    memset(&res, 0, sizeof res);
    bool ok = tp_wh_run(&wc, &req, &res);
    int64_t ms = tp_now_ms() - started;
    char *detail;
    if (ok) {
        detail = tp_xasprintf("%s warehouse %s, auth: %s, SELECT 1 answered in %lld ms (statement %s)",
                              host, wc.warehouse_id, auth_name(&wc), (long long)ms,
                              res.statement_id ? res.statement_id : "?");
    } else {
        const char *step = "SELECT 1";
        if (res.kind == TP_WH_ERR_AUTH)
            step = "authentication";
        else if (res.http_status == 404)
            step = "warehouse id";
        else if (res.kind == TP_WH_ERR_TRANSPORT || res.kind == TP_WH_ERR_TIMEOUT)
            step = "connection";
        char status[32] = "";
        if (res.http_status)
            snprintf(status, sizeof status, "HTTP %d: ", res.http_status);
        bool no_scheme = strstr(wc.host, "://") == NULL;
        detail = tp_xasprintf("%s (%s, warehouse %s, auth: %s): %s%s%s", step, host, wc.warehouse_id,
                              auth_name(&wc), status,
                              res.message ? res.message : tp_wh_status_name(res.status),
                              no_scheme && res.kind == TP_WH_ERR_TRANSPORT
                                  ? " (the host has no scheme, so https:// was assumed; write "
                                    "http:// for a plain-HTTP endpoint such as the local emulator)"
                                  : "");
    }
    line(out, "warehouse", ok ? "ok" : "FAILED", detail);
    free(detail);
    free(host);
    tp_wh_result_clear(&res);
    return ok;
}

int tp_ping_run(const tp_config_t *cfg, FILE *out)
{
    bool pg = ping_postgres(cfg, out);
    bool wh = ping_warehouse(cfg, out);
    fflush(out);
    return pg && wh ? 0 : 1;
}
