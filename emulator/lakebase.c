/* tidepool-warehouse: the two Lakebase credential endpoints
 * (databricks-protocol.md §4.3), so tests exercise real expiring passwords:
 *   POST /api/2.0/database/credentials {"instance_names": [..], "request_id"}
 *        -> {"token", "expiration_time"}                      (Provisioned)
 *   POST /api/2.0/postgres/credentials {"endpoint": "projects/../endpoints/.."}
 *        -> {"token", "expire_time"}                          (Autoscaling)
 * Each call mints a random token and makes it the password of the role named
 * by --lakebase-role on the --dsn database, valid until now + --lakebase-ttl:
 *   ALTER ROLE <role> PASSWORD '<token>' VALID UNTIL '<time>'
 * Postgres checks VALID UNTIL only at login, so open sessions outlive the
 * token and new logins fail with 28P01 afterwards, as on Lakebase. (The role
 * must log in with a password: the test harness makes members of
 * tp_password_login use scram-sha-256 over TCP.) The ALTER runs on a short
 * blocking connection on the loop thread: acceptable for a local emulator
 * (a few milliseconds), and it keeps the answer ordered after the change.
 * The token is never logged. */
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "tidepool/log.h"

static void error_json(tp_buf_t *out, int *code, int http, const char *ec, const char *msg)
{
    *code = http;
    tp_buf_printf(out, "{\"error_code\":\"%s\",\"message\":", ec);
    tp_buf_json_str(out, msg);
    tp_buf_putc(out, '}');
}

/* Checks the request body; false with the 400 answer written when it is wrong. */
static bool check_request(json_t *j, bool autoscaling, tp_buf_t *out, int *code)
{
    if (!json_is_object(j)) {
        error_json(out, code, 400, "MALFORMED_REQUEST", "the request body is not a JSON object");
        return false;
    }
    if (autoscaling) {
        const char *ep = json_string_value(json_object_get(j, "endpoint"));
        int parts = 0;
        if (ep != NULL)
            for (const char *p = ep; *p; p++)
                parts += *p == '/';
        if (ep == NULL || strncmp(ep, "projects/", 9) != 0 || strstr(ep, "/branches/") == NULL ||
            strstr(ep, "/endpoints/") == NULL || parts != 5) {
            error_json(out, code, 400, "INVALID_PARAMETER_VALUE",
                       "endpoint must be projects/<project>/branches/<branch>/endpoints/<endpoint>");
            return false;
        }
        return true;
    }
    json_t *names = json_object_get(j, "instance_names");
    if (!json_is_array(names) || json_array_size(names) == 0) {
        error_json(out, code, 400, "INVALID_PARAMETER_VALUE",
                   "instance_names must be a non-empty array of instance names");
        return false;
    }
    size_t i;
    json_t *v;
    json_array_foreach(names, i, v) {
        if (!json_is_string(v) || json_string_length(v) == 0) {
            error_json(out, code, 400, "INVALID_PARAMETER_VALUE",
                       "instance_names must hold non-empty strings");
            return false;
        }
    }
    json_t *rid = json_object_get(j, "request_id");
    if (rid != NULL && !json_is_string(rid)) {
        error_json(out, code, 400, "INVALID_PARAMETER_VALUE", "request_id must be a string");
        return false;
    }
    return true;
}

/* Sets the role's password; false with msg set (never holding the token). */
static bool set_password(const char *token, const char *until, char *msg, size_t msglen)
{
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {g.dsn ? g.dsn : "", "5", "tidepool-warehouse-lakebase", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    bool ok = false;
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(msg, msglen, "cannot connect to the emulator database: %s", PQerrorMessage(c));
    } else {
        char *role = PQescapeIdentifier(c, g.lakebase_role, strlen(g.lakebase_role));
        char *sql = tp_xasprintf("ALTER ROLE %s PASSWORD '%s' VALID UNTIL '%s'", role ? role : "\"\"",
                                 token, until);
        PGresult *r = PQexec(c, sql);
        explicit_bzero(sql, strlen(sql));
        free(sql);
        ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) /* the server's message names the role, never the statement text */
            snprintf(msg, msglen, "cannot set the password of role %s: %s", g.lakebase_role,
                     PQresultErrorMessage(r));
        PQclear(r);
        PQfreemem(role);
    }
    PQfinish(c);
    for (char *p = msg; *p; p++)
        if (*p == '\n')
            *p = ' ';
    return ok;
}

void emu_lakebase_credentials(const char *body, size_t len, bool autoscaling, tp_buf_t *out,
                              int *code)
{
    if (g.lakebase_role == NULL) {
        error_json(out, code, 501, "NOT_IMPLEMENTED",
                   "Lakebase credentials are off: start tidepool-warehouse with --lakebase-role");
        return;
    }
    json_error_t je;
    json_t *j = json_loadb(body, len, 0, &je);
    if (!check_request(j, autoscaling, out, code)) {
        json_decref(j);
        return;
    }
    json_decref(j);
    unsigned char rnd[24];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        error_json(out, code, 500, "INTERNAL_ERROR", "no randomness for a token");
        return;
    }
    char token[64] = "lbt-";
    for (size_t i = 0; i < sizeof rnd; i++)
        snprintf(token + 4 + 2 * i, 3, "%02x", rnd[i]);
    char until[32];
    tp_rfc3339_format(tp_wall_ms() + g.lakebase_ttl_s * 1000, until);
    char msg[512];
    if (!set_password(token, until, msg, sizeof msg)) {
        tp_error("lakebase credential: %s", msg);
        error_json(out, code, 500, "INTERNAL_ERROR", msg);
        return;
    }
    const char *kv[] = {"role", g.lakebase_role, "valid_until", until, NULL};
    tp_logkv(TP_LOG_INFO, kv, "lakebase credential minted");
    *code = 200;
    tp_buf_puts(out, "{\"token\":");
    tp_buf_json_str(out, token);
    tp_buf_printf(out, ",\"%s\":\"%s\"}", autoscaling ? "expire_time" : "expiration_time", until);
    explicit_bzero(token, sizeof token);
}
