/* Configuration: owns the settings table (tp_settings), the INI parser, the
 * environment fallbacks, validation, `--check` printing and DSN masking.
 *
 * Loading is one pass over the file that only collects raw values per setting
 * (unquoted and ${VAR}-expanded), then one pass over the table that picks
 * file > environment > default for each setting, converts it into the typed
 * field at its offset, and finally a few cross-setting checks. Every failure
 * produces exactly one "where: message" line and frees all it built, so a
 * reload can parse into a fresh struct and swap it in only when it is whole.
 *
 * Secrets (secret settings and any DSN) are never echoed in errors; printing
 * masks them. This module does not normalise hosts, open connections or read
 * definition directories: it only says what the user asked for. */
#include "tidepool/config.h"
#include "tidepool/log.h"
#include "tidepool/pg.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <libpq-fe.h>

#define MS_S 1000LL
#define MS_M (60 * MS_S)
#define MS_H (60 * MS_M)
#define MS_D (24 * MS_H)
#define KIB 1024LL
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)
#define MASK "********"

static const char *const auth_modes[] = {"none", "token", "databricks-apps", "jwt", NULL};
static const char *const password_sources[] = {"auto", "none", "lakebase", NULL};
static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};

#define OFF(field) offsetof(tp_config_t, field)

const tp_setting_t tp_settings[] = {
    {.section = "postgres", .key = "dsn", .type = TP_CFG_DSN, .default_value = "",
     .offset = OFF(postgres.dsn),
     .help = "libpq conninfo or URI; empty uses libpq's `PG*` environment variables"},
    {.section = "postgres", .key = "read_dsn", .type = TP_CFG_DSN, .default_value = "",
     .offset = OFF(postgres.read_dsn),
     .help = "optional read replica for queries; empty sends reads to dsn"},
    {.section = "postgres", .key = "pool_size", .type = TP_CFG_INT, .default_value = "4",
     .offset = OFF(postgres.pool_size), .min = 1, .max = 1000,
     .help = "connections per pool"},
    {.section = "postgres", .key = "connect_timeout", .type = TP_CFG_DURATION,
     .default_value = "10s", .offset = OFF(postgres.connect_timeout_ms), .min = 100,
     .max = 10 * MS_M, .help = "give up on a Postgres connection attempt after this long"},
    {.section = "postgres", .key = "password_source", .type = TP_CFG_ENUM,
     .default_value = "auto", .env = "TIDEPOOL_PG_PASSWORD_SOURCE",
     .offset = OFF(postgres.password_source), .choices = password_sources,
     .help = "`lakebase`: every new connection's password is a Lakebase OAuth credential minted "
             "with the [warehouse] workspace credentials; `none`: the dsn's or libpq's; `auto`: "
             "`lakebase` when lakebase_instance or lakebase_endpoint is set and no password is "
             "given (dsn, `PGPASSWORD`, `TIDEPOOL_PGPASSWORD_FILE`), else `none`"},
    {.section = "postgres", .key = "lakebase_instance", .type = TP_CFG_STRING, .default_value = "",
     .env = "LAKEBASE_INSTANCE", .offset = OFF(postgres.lakebase_instance),
     .help = "Lakebase Provisioned database instance name (credentials from "
             "/api/2.0/database/credentials)"},
    {.section = "postgres", .key = "lakebase_endpoint", .type = TP_CFG_STRING, .default_value = "",
     .env = "LAKEBASE_ENDPOINT", .offset = OFF(postgres.lakebase_endpoint),
     .help = "Lakebase Autoscaling endpoint `projects/P/branches/B/endpoints/E` (credentials from "
             "/api/2.0/postgres/credentials)"},
    {.section = "postgres", .key = "lakebase_refresh_before", .type = TP_CFG_DURATION,
     .default_value = "2m", .offset = OFF(postgres.lakebase_refresh_before_ms), .min = MS_S,
     .max = 30 * MS_M,
     .help = "mint a new Lakebase credential this long before the cached one expires "
             "(at most half its lifetime)"},

    {.section = "warehouse", .key = "host", .type = TP_CFG_STRING, .default_value = "",
     .env = "DATABRICKS_HOST", .offset = OFF(warehouse.host),
     .help = "workspace host name or URL"},
    {.section = "warehouse", .key = "warehouse_id", .type = TP_CFG_STRING,
     .default_value = "", .env = "DATABRICKS_WAREHOUSE_ID", .offset = OFF(warehouse.warehouse_id),
     .help = "SQL warehouse id"},
    {.section = "warehouse", .key = "token", .type = TP_CFG_STRING, .default_value = "",
     .env = "DATABRICKS_TOKEN", .secret = true,
     .offset = OFF(warehouse.token),
     .help = "personal access token; wins over client_id/client_secret"},
    {.section = "warehouse", .key = "client_id", .type = TP_CFG_STRING, .default_value = "",
     .env = "DATABRICKS_CLIENT_ID", .offset = OFF(warehouse.client_id),
     .help = "OAuth machine-to-machine client id (needs client_secret)"},
    {.section = "warehouse", .key = "client_secret", .type = TP_CFG_STRING,
     .default_value = "", .env = "DATABRICKS_CLIENT_SECRET", .secret = true,
     .offset = OFF(warehouse.client_secret),
     .help = "OAuth machine-to-machine client secret (needs client_id)"},
    {.section = "warehouse", .key = "catalog", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(warehouse.catalog),
     .help = "default catalog for statements; empty uses the warehouse's"},
    {.section = "warehouse", .key = "schema", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(warehouse.schema),
     .help = "default schema for statements; empty uses the warehouse's"},
    {.section = "warehouse", .key = "timeout", .type = TP_CFG_DURATION,
     .default_value = "60s", .reloadable = true, .offset = OFF(warehouse.timeout_ms),
     .min = MS_S, .max = MS_D, .help = "give up on a warehouse statement after this long"},
    {.section = "warehouse", .key = "max_in_flight", .type = TP_CFG_INT,
     .default_value = "64", .reloadable = true, .offset = OFF(warehouse.max_in_flight),
     .min = 1, .max = 100000,
     .help = "fallback statements running at once (all threads); beyond it reads answer 429"},
    {.section = "warehouse", .key = "wait", .type = TP_CFG_DURATION, .default_value = "10s",
     .reloadable = true, .offset = OFF(warehouse.wait_ms), .min = 0, .max = 10 * MS_M,
     .help = "how long a fallback read waits for its result before answering 202"},
    {.section = "warehouse", .key = "max_wait", .type = TP_CFG_DURATION,
     .default_value = "30s", .reloadable = true, .offset = OFF(warehouse.max_wait_ms), .min = 0,
     .max = 10 * MS_M, .help = "cap of the client's `Prefer: wait=N`"},
    {.section = "warehouse", .key = "result_cache_bytes", .type = TP_CFG_SIZE,
     .default_value = "64M", .reloadable = true, .offset = OFF(warehouse.result_cache_bytes),
     .min = 0, .max = 64 * GIB,
     .help = "fallback results cached in memory at most (least recently used dropped first)"},
    {.section = "warehouse", .key = "max_result_bytes", .type = TP_CFG_SIZE,
     .default_value = "16M", .reloadable = true, .offset = OFF(warehouse.max_result_bytes),
     .min = KIB, .max = 16 * GIB,
     .help = "largest fallback result held in memory; bigger ones fail with 413"},
    {.section = "warehouse", .key = "result_ttl", .type = TP_CFG_DURATION,
     .default_value = "5m", .reloadable = true, .offset = OFF(warehouse.result_ttl_ms),
     .min = 0, .max = MS_D,
     .help = "cached fallback results and finished statement handles are kept this long"},
    {.section = "warehouse", .key = "abandon_after", .type = TP_CFG_DURATION,
     .default_value = "60s", .reloadable = true, .offset = OFF(warehouse.abandon_ms),
     .min = 100, .max = MS_D,
     .help = "a fallback statement nobody waits for and nobody polled this long is cancelled"},

    {.section = "sync", .key = "definitions", .type = TP_CFG_STRING,
     .default_value = "sql/sync", .reloadable = true, .offset = OFF(sync.definitions),
     .help = "directory of sync job definitions"},
    {.section = "sync", .key = "max_concurrent_jobs", .type = TP_CFG_INT,
     .default_value = "4", .reloadable = true, .offset = OFF(sync.max_concurrent_jobs),
     .min = 1, .max = 256, .help = "sync jobs running at once"},
    {.section = "sync", .key = "outbox_poll", .type = TP_CFG_DURATION, .default_value = "5s",
     .offset = OFF(sync.outbox_poll_ms), .min = 100, .max = MS_H,
     .help = "the write-back shipper wakes on NOTIFY tidepool_outbox; it also looks for "
             "unshipped outbox rows this often (missed notifies)"},

    {.section = "server", .key = "listen", .type = TP_CFG_LISTEN,
     .default_value = "127.0.0.1:8080", .env = "DATABRICKS_APP_PORT",
     .env_value = "0.0.0.0:%s", .offset = OFF(server.listen),
     .help = "HTTP listen address ADDR:PORT"},
    {.section = "server", .key = "threads", .type = TP_CFG_INT, .default_value = "0",
     .offset = OFF(server.threads), .min = 0, .max = 1024,
     .help = "event-loop threads; 0 means one per core"},
    {.section = "server", .key = "definitions", .type = TP_CFG_STRING,
     .default_value = "sql/queries", .reloadable = true, .offset = OFF(server.definitions),
     .help = "directory of dataset definitions"},
    {.section = "server", .key = "max_body_bytes", .type = TP_CFG_SIZE,
     .default_value = "1M", .offset = OFF(server.max_body_bytes), .min = KIB, .max = GIB,
     .help = "largest request body accepted"},
    {.section = "server", .key = "max_header_bytes", .type = TP_CFG_SIZE,
     .default_value = "16k", .offset = OFF(server.max_header_bytes), .min = KIB,
     .max = MIB, .help = "largest request header block accepted"},
    {.section = "server", .key = "max_connections", .type = TP_CFG_INT,
     .default_value = "10000", .offset = OFF(server.max_connections), .min = 1,
     .max = 1000000, .help = "open client connections at most"},
    {.section = "server", .key = "timeout", .type = TP_CFG_DURATION, .default_value = "30s",
     .offset = OFF(server.timeout_ms), .min = 100, .max = MS_H,
     .help = "request read/write timeout"},
    {.section = "server", .key = "cache_bytes", .type = TP_CFG_SIZE, .default_value = "64M",
     .offset = OFF(server.cache_bytes), .min = 0, .max = (int64_t)64 * GIB,
     .help = "response cache size, shared out evenly between the threads; 0 turns it off"},
    {.section = "server", .key = "pool_queue", .type = TP_CFG_INT, .default_value = "256",
     .offset = OFF(server.pool_queue), .min = 0, .max = 1000000,
     .help = "requests per thread waiting for a Postgres connection before 503"},
    {.section = "server", .key = "table_max_limit", .type = TP_CFG_INT,
     .default_value = "1000", .reloadable = true, .offset = OFF(server.table_max_limit),
     .min = 1, .max = 1000000,
     .help = "table reads: default and largest `limit` unless the table's @expose sets max_limit"},
    {.section = "server", .key = "drain_timeout", .type = TP_CFG_DURATION,
     .default_value = "10s", .reloadable = true, .offset = OFF(server.drain_timeout_ms),
     .min = 0, .max = 10 * MS_M,
     .help = "on SIGTERM, wait this long for in-flight requests before exiting"},
    {.section = "server", .key = "idempotency_ttl", .type = TP_CFG_DURATION,
     .default_value = "24h", .reloadable = true, .offset = OFF(server.idempotency_ttl_ms),
     .min = MS_S, .max = 30 * MS_D,
     .help = "write-back: how long an `Idempotency-Key` and its first answer are kept (a "
             "retry after that writes again)"},
    {.section = "server", .key = "max_event_streams", .type = TP_CFG_INT,
     .default_value = "1000", .offset = OFF(server.max_event_streams), .min = 1,
     .max = 1000000, .help = "open `/api/v1/events` streams at most (503 beyond)"},
    {.section = "server", .key = "tls_listen", .type = TP_CFG_LISTEN, .default_value = "",
     .offset = OFF(server.tls_listen),
     .help = "optional HTTPS listen address ADDR:PORT (TLS 1.2+); empty = no HTTPS listener"},
    {.section = "server", .key = "tls_cert", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(server.tls_cert),
     .help = "PEM certificate chain for tls_listen (re-read on SIGHUP)"},
    {.section = "server", .key = "tls_key", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(server.tls_key),
     .help = "PEM private key for tls_cert (re-read on SIGHUP)"},
    {.section = "server", .key = "web_root", .type = TP_CFG_STRING, .default_value = "",
     .offset = OFF(server.web_root),
     .help = "directory of the demo page served at `/` and `/web/`; empty: `web` in the "
             "working directory if it has index.html, else the installed share/tidepool/web"},
    {.section = "server", .key = "web_vendor", .type = TP_CFG_STRING, .default_value = "",
     .offset = OFF(server.web_vendor),
     .help = "directory served at `/web/vendor/` (plotly.min.js, fetched by "
             "scripts/fetch-web-vendor.sh); empty: the vendor folder of web_root"},

    {.section = "auth", .key = "mode", .type = TP_CFG_ENUM, .default_value = "none",
     .env = "DATABRICKS_APP_PORT", .env_value = "databricks-apps",
     .offset = OFF(auth.mode), .choices = auth_modes,
     .help = "none (loopback listener only), token, databricks-apps or jwt"},
    {.section = "auth", .key = "anonymous_roles", .type = TP_CFG_STRING,
     .default_value = "reader, writer, admin", .reloadable = true,
     .offset = OFF(auth.anonymous_roles),
     .help = "mode none: roles of the anonymous principal (comma-separated)"},
    {.section = "auth", .key = "tokens", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .secret = true, .offset = OFF(auth.tokens),
     .help = "mode token: `name:role+role:sha256hex` entries, comma-separated (docs/auth.md)"},
    {.section = "auth", .key = "tokens_file", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(auth.tokens_file),
     .help = "mode token: file of `name:role+role:sha256hex` lines (# comments)"},
    {.section = "auth", .key = "token_table", .type = TP_CFG_BOOL, .default_value = "true",
     .reloadable = true, .offset = OFF(auth.token_table),
     .help = "mode token: also accept tokens from the tidepool.api_tokens table"},
    {.section = "auth", .key = "trusted_proxies", .type = TP_CFG_STRING,
     .default_value = "127.0.0.1/32, ::1/128", .env = "DATABRICKS_APP_NAME",
     .env_value = "0.0.0.0/0, ::/0", .reloadable = true, .offset = OFF(auth.trusted_proxies),
     .help = "addresses or CIDRs whose X-Forwarded-* and X-Real-Ip headers are believed; "
             "inside Databricks Apps every peer (only the Apps proxy can reach the app)"},
    {.section = "auth", .key = "roles", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(auth.roles),
     .help = "modes databricks-apps and jwt: `user:role+role`, `group:NAME:role`, `*:role` "
             "entries, comma-separated"},
    {.section = "auth", .key = "sync_roles", .type = TP_CFG_STRING, .default_value = "admin",
     .reloadable = true, .offset = OFF(auth.sync_roles),
     .help = "roles that may run a sync job now (`POST /api/v1/sync/{job}/run`), any one of "
             "them, comma-separated; `admin` implies every role"},
    {.section = "auth", .key = "jwt_secret", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .secret = true, .offset = OFF(auth.jwt_secret),
     .help = "mode jwt: HS256 shared secret (at least 32 bytes)"},
    {.section = "auth", .key = "jwt_jwks_file", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(auth.jwt_jwks_file),
     .help = "mode jwt: JWKS file with the RS256 public keys (selected by kid)"},
    {.section = "auth", .key = "jwt_public_key_file", .type = TP_CFG_STRING,
     .default_value = "", .reloadable = true, .offset = OFF(auth.jwt_public_key_file),
     .help = "mode jwt: PEM RSA public key for RS256 (any kid)"},
    {.section = "auth", .key = "jwt_audience", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(auth.jwt_audience),
     .help = "mode jwt: the `aud` every token must carry (string or array); required in mode jwt"},
    {.section = "auth", .key = "jwt_issuer", .type = TP_CFG_STRING, .default_value = "",
     .reloadable = true, .offset = OFF(auth.jwt_issuer),
     .help = "mode jwt: the `iss` every token must carry; required in mode jwt"},
    {.section = "auth", .key = "jwt_clock_skew", .type = TP_CFG_DURATION,
     .default_value = "60s", .reloadable = true, .offset = OFF(auth.jwt_clock_skew_ms),
     .min = 0, .max = 10 * MS_M, .help = "mode jwt: leeway for `exp` and `nbf`"},
    {.section = "auth", .key = "jwt_roles_claim", .type = TP_CFG_STRING,
     .default_value = "roles", .reloadable = true, .offset = OFF(auth.jwt_roles_claim),
     .help = "mode jwt: claim (dotted path, string or array) holding role names"},
    {.section = "auth", .key = "jwt_groups_claim", .type = TP_CFG_STRING,
     .default_value = "groups", .reloadable = true, .offset = OFF(auth.jwt_groups_claim),
     .help = "mode jwt: claim (dotted path, string or array) matched by `group:` roles entries"},
    {.section = "auth", .key = "rate_per_identity", .type = TP_CFG_INT, .default_value = "20",
     .reloadable = true, .offset = OFF(auth.rate_per_identity), .min = 0, .max = 1000000,
     .help = "requests per second per authenticated identity; 0 turns the limit off"},
    {.section = "auth", .key = "burst_per_identity", .type = TP_CFG_INT,
     .default_value = "100", .reloadable = true, .offset = OFF(auth.burst_per_identity),
     .min = 1, .max = 1000000, .help = "requests an identity may send at once"},
    {.section = "auth", .key = "rate_per_address", .type = TP_CFG_INT, .default_value = "50",
     .reloadable = true, .offset = OFF(auth.rate_per_address), .min = 0, .max = 1000000,
     .help = "requests per second per client address (X-Real-Ip from a trusted proxy); 0 = off"},
    {.section = "auth", .key = "burst_per_address", .type = TP_CFG_INT,
     .default_value = "200", .reloadable = true, .offset = OFF(auth.burst_per_address),
     .min = 1, .max = 1000000, .help = "requests a client address may send at once"},
    {.section = "auth", .key = "rate_limit_keys", .type = TP_CFG_INT,
     .default_value = "50000", .reloadable = true, .offset = OFF(auth.rate_limit_keys),
     .min = 1, .max = 10000000,
     .help = "identities and addresses remembered per limiter; the least recent is forgotten"},

    {.section = "log", .key = "level", .type = TP_CFG_ENUM, .default_value = "info",
     .env = "TIDEPOOL_LOG_LEVEL", .reloadable = true, .offset = OFF(log.level),
     .choices = log_levels, .help = "least severe level written"},
};
const size_t tp_settings_count = TP_ARRAY_LEN(tp_settings);

/* Warehouse credentials are taken from one place: when the file sets any of
 * these, the environment fills none of them (no mixing of file and env auth). */
static const char *const cred_keys[] = {"token", "client_id", "client_secret"};

/* ---- errors ---- */

/* Where a value came from, for error messages: "file:line", "env VAR", "file". */
typedef struct where {
    char text[512];
} where_t;

static void where_set(where_t *w, const char *path, int line, const char *env)
{
    if (env != NULL)
        snprintf(w->text, sizeof w->text, "env %s", env);
    else if (line > 0)
        snprintf(w->text, sizeof w->text, "%s:%d", path ? path : "config", line);
    else
        snprintf(w->text, sizeof w->text, "%s", path ? path : "config");
}

static bool fail(char *err, size_t errlen, const where_t *w, const char *fmt, ...)
    TP_PRINTF(4, 5);
static bool fail(char *err, size_t errlen, const where_t *w, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return false;
    int n = snprintf(err, errlen, "%s: ", w->text);
    if (n >= 0 && (size_t)n < errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    for (char *p = err; *p != '\0'; p++) /* one line, whatever an echoed value held */
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return false;
}

/* ---- table helpers ---- */

static bool is_text_type(tp_cfg_type_t t)
{
    return t == TP_CFG_STRING || t == TP_CFG_ENUM || t == TP_CFG_DSN || t == TP_CFG_LISTEN;
}

/* Values that must never be echoed: secrets, and DSNs (they may hold a password). */
static bool sensitive(const tp_setting_t *s)
{
    return s->secret || s->type == TP_CFG_DSN;
}

static void *field(const tp_config_t *c, const tp_setting_t *s)
{
    return (char *)c + s->offset;
}

static int find_setting(const char *section, const char *key)
{
    for (size_t i = 0; i < tp_settings_count; i++)
        if (strcmp(tp_settings[i].section, section) == 0 &&
            (key == NULL || strcmp(tp_settings[i].key, key) == 0))
            return (int)i;
    return -1;
}

static bool is_cred(const tp_setting_t *s)
{
    if (strcmp(s->section, "warehouse") != 0)
        return false;
    for (size_t i = 0; i < TP_ARRAY_LEN(cred_keys); i++)
        if (strcmp(s->key, cred_keys[i]) == 0)
            return true;
    return false;
}

/* ---- formatting of typed values ---- */

static void put_scaled(tp_buf_t *b, int64_t v, const int64_t *fac, const char *const *unit,
                       size_t n, const char *base_unit)
{
    for (size_t i = 0; i < n && v != 0; i++) {
        if (v % fac[i] == 0) {
            tp_buf_printf(b, "%lld%s", (long long)(v / fac[i]), unit[i]);
            return;
        }
    }
    tp_buf_printf(b, "%lld%s", (long long)v, v == 0 ? "" : base_unit);
}

static void put_duration(tp_buf_t *b, int64_t ms)
{
    static const int64_t fac[] = {MS_D, MS_H, MS_M, MS_S};
    static const char *const unit[] = {"d", "h", "m", "s"};
    put_scaled(b, ms, fac, unit, TP_ARRAY_LEN(fac), "ms");
}

static void put_size(tp_buf_t *b, int64_t bytes)
{
    static const int64_t fac[] = {GIB, MIB, KIB};
    static const char *const unit[] = {"G", "M", "k"};
    put_scaled(b, bytes, fac, unit, TP_ARRAY_LEN(fac), "");
}

static void put_choices(tp_buf_t *b, const char *const *choices)
{
    for (size_t i = 0; choices[i] != NULL; i++)
        tp_buf_printf(b, "%s%s", i ? ", " : "", choices[i]);
}

/* "MIN to MAX" in the setting's own units (INT, DURATION, SIZE). */
static void put_bounds(tp_buf_t *b, const tp_setting_t *s)
{
    if (s->type == TP_CFG_INT) {
        tp_buf_printf(b, "%lld to %lld", (long long)s->min, (long long)s->max);
        return;
    }
    void (*put)(tp_buf_t *, int64_t) = s->type == TP_CFG_DURATION ? put_duration : put_size;
    put(b, s->min);
    tp_buf_puts(b, " to ");
    put(b, s->max);
}

/* What a valid value looks like, for "expected ..." in errors. */
static void put_expected(tp_buf_t *b, const tp_setting_t *s)
{
    switch (s->type) {
    case TP_CFG_INT:
        tp_buf_puts(b, "an integer from ");
        put_bounds(b, s);
        break;
    case TP_CFG_DURATION:
        tp_buf_puts(b, "a duration from ");
        put_bounds(b, s);
        tp_buf_puts(b, " (like 30s, 5m, 250ms)");
        break;
    case TP_CFG_SIZE:
        tp_buf_puts(b, "a size from ");
        put_bounds(b, s);
        tp_buf_puts(b, " (like 64k, 16M)");
        break;
    case TP_CFG_BOOL:
        tp_buf_puts(b, "true or false");
        break;
    case TP_CFG_ENUM:
        tp_buf_puts(b, "one of ");
        put_choices(b, s->choices);
        break;
    case TP_CFG_DSN:
        tp_buf_puts(b, "a libpq connection string or postgresql:// URI");
        break;
    case TP_CFG_LISTEN:
        tp_buf_puts(b, "ADDR:PORT with a port from 1 to 65535");
        break;
    case TP_CFG_STRING:
        tp_buf_puts(b, "text");
        break;
    }
}

/* ---- conversion of one textual value into its field ---- */

static bool valid_listen(const char *v)
{
    const char *colon = strrchr(v, ':');
    if (colon == NULL || colon == v)
        return false;
    if (v[0] == '[' && colon[-1] != ']')
        return false;
    if (v[0] != '[' && memchr(v, ':', (size_t)(colon - v)) != NULL)
        return false; /* bare IPv6 needs brackets */
    int64_t port;
    return tp_parse_int64(colon + 1, 1, 65535, &port);
}

static bool valid_dsn(const char *v)
{
    if (*v == '\0')
        return true;
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(v, &errmsg);
    PQfreemem(errmsg);
    if (opts == NULL)
        return false;
    PQconninfoFree(opts);
    return true;
}

static bool convert(tp_config_t *c, const tp_setting_t *s, const char *v)
{
    void *f = field(c, s);
    int64_t n = 0;
    switch (s->type) {
    case TP_CFG_STRING:
        break;
    case TP_CFG_ENUM: {
        size_t i = 0;
        while (s->choices[i] != NULL && strcmp(s->choices[i], v) != 0)
            i++;
        if (s->choices[i] == NULL)
            return false;
        break;
    }
    case TP_CFG_DSN:
        if (!valid_dsn(v))
            return false;
        break;
    case TP_CFG_LISTEN:
        /* a listener whose default is empty is optional: "" turns it off */
        if (!(*v == '\0' && (s->default_value == NULL || *s->default_value == '\0')) &&
            !valid_listen(v))
            return false;
        break;
    case TP_CFG_BOOL:
        return tp_parse_bool(v, (bool *)f);
    case TP_CFG_INT:
        return tp_parse_int64(v, s->min, s->max, (int64_t *)f);
    case TP_CFG_DURATION:
        if (!tp_parse_duration_ms(v, &n) || n < s->min || n > s->max)
            return false;
        *(int64_t *)f = n;
        return true;
    case TP_CFG_SIZE:
        if (!tp_parse_size(v, &n) || n < s->min || n > s->max)
            return false;
        *(int64_t *)f = n;
        return true;
    }
    *(char **)f = tp_xstrdup(v);
    return true;
}

/* ---- file values: quoting and ${VAR} expansion ---- */

/* One raw value from the file, already unquoted and expanded. */
typedef struct file_value {
    char *text; /* NULL: the file does not set it */
    int line;
} file_value_t;

/* Removes the double quotes around v (in place, handling \" and \\). */
static bool unquote(char *v, const char **why)
{
    if (*v != '"')
        return true;
    char *w = v;
    const char *r = v + 1;
    for (; *r != '\0' && *r != '"'; r++) {
        if (*r == '\\') {
            if (r[1] != '"' && r[1] != '\\') {
                *why = r[1] == '\0' ? "unterminated quoted value"
                                    : "unknown escape in quoted value (only \\\" and \\\\ are allowed)";
                return false;
            }
            r++;
        }
        *w++ = *r;
    }
    if (*r != '"') {
        *why = "unterminated quoted value";
        return false;
    }
    if (r[1] != '\0') {
        *why = "text after the closing quote";
        return false;
    }
    *w = '\0';
    return true;
}

/* Expands ${VAR}, ${VAR:-default} and $$ in v. On failure returns NULL and
 * writes the reason (which may name a variable, never a value) into why. */
static char *expand(const char *v, char *why, size_t whylen)
{
    tp_buf_t b = {0};
    for (const char *p = v; *p != '\0'; p++) {
        if (p[0] != '$' || (p[1] != '$' && p[1] != '{')) {
            tp_buf_putc(&b, *p);
            continue;
        }
        if (p[1] == '$') {
            tp_buf_putc(&b, '$');
            p++;
            continue;
        }
        const char *name = p + 2;
        const char *close = strchr(name, '}');
        if (close == NULL) {
            snprintf(why, whylen, "unclosed \"${\"");
            goto fail;
        }
        size_t len = 0;
        while (isalnum((unsigned char)name[len]) || name[len] == '_')
            len++;
        const char *rest = name + len; /* "}" or ":-default}" */
        bool has_default = strncmp(rest, ":-", 2) == 0;
        if (len == 0 || isdigit((unsigned char)name[0]) || (!has_default && rest != close)) {
            snprintf(why, whylen, "bad variable reference after \"${\" (expected ${NAME} or "
                                  "${NAME:-default})");
            goto fail;
        }
        char *var = tp_xstrndup(name, len);
        const char *val = getenv(var);
        if (has_default && (val == NULL || *val == '\0')) {
            tp_buf_append(&b, rest + 2, (size_t)(close - rest - 2));
        } else if (val == NULL) {
            snprintf(why, whylen, "environment variable %s is not set (write ${%s:-} to allow that)",
                     var, var);
            free(var);
            goto fail;
        } else {
            tp_buf_puts(&b, val);
        }
        free(var);
        p = close;
    }
    return tp_buf_steal(&b);
fail:
    tp_buf_free(&b);
    return NULL;
}

/* Handles one "key = value" line inside [section]. */
static bool parse_assignment(char *line, const char *section, file_value_t *vals,
                             const where_t *w, char *err, size_t errlen, int lineno)
{
    char *eq = strchr(line, '=');
    *eq = '\0';
    char *key = tp_strtrim(line);
    char *value = tp_strtrim(eq + 1);
    if (*key == '\0')
        return fail(err, errlen, w, "missing key before \"=\"");
    if (section == NULL)
        return fail(err, errlen, w, "key \"%s\" is outside any [section]", key);
    int i = find_setting(section, key);
    if (i < 0)
        return fail(err, errlen, w, "unknown key \"%s\" in [%s]", key, section);
    const tp_setting_t *s = &tp_settings[i];
    if (vals[i].text != NULL)
        return fail(err, errlen, w, "duplicate key %s.%s (first set on line %d)", s->section,
                    s->key, vals[i].line);
    const char *why = NULL;
    if (!unquote(value, &why))
        return fail(err, errlen, w, "%s.%s: %s", s->section, s->key, why);
    char reason[256];
    vals[i].text = expand(value, reason, sizeof reason);
    if (vals[i].text == NULL)
        return fail(err, errlen, w, "%s.%s: %s", s->section, s->key, reason);
    vals[i].line = lineno;
    return true;
}

/* Handles a "[section]" line; returns the section name (pointing into line). */
static const char *parse_section(char *line, const where_t *w, char *err, size_t errlen)
{
    char *close = strchr(line, ']');
    if (close == NULL || close[1] != '\0') {
        fail(err, errlen, w, "a section header is \"[name]\" alone on its line");
        return NULL;
    }
    *close = '\0';
    char *name = tp_strtrim(line + 1);
    if (find_setting(name, NULL) < 0) {
        fail(err, errlen, w, "unknown section [%s]", name);
        return NULL;
    }
    return name;
}

static bool parse_file(const char *path, file_value_t *vals, char *err, size_t errlen)
{
    where_t w;
    where_set(&w, path, 0, NULL);
    struct stat st;
    size_t len = 0;
    char *text = NULL;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        errno = EISDIR;
    else
        text = tp_read_file(path, &len);
    if (text == NULL)
        return fail(err, errlen, &w, "cannot read: %s", strerror(errno));

    bool ok = true;
    const char *section = NULL;
    char *p = text;
    if (len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
        p += 3; /* UTF-8 byte order mark */
    for (int lineno = 1; ok && p < text + len; lineno++) {
        char *nl = memchr(p, '\n', (size_t)(text + len - p));
        char *end = nl ? nl : text + len;
        *end = '\0';
        char *next = end + 1;
        where_set(&w, path, lineno, NULL);
        if (strlen(p) != (size_t)(end - p)) {
            ok = fail(err, errlen, &w, "NUL byte in line");
            break;
        }
        char *line = tp_strtrim(p);
        p = next;
        if (*line == '\0' || *line == '#' || *line == ';')
            continue;
        if (*line == '[')
            ok = (section = parse_section(line, &w, err, errlen)) != NULL;
        else if (strchr(line, '=') != NULL)
            ok = parse_assignment(line, section, vals, &w, err, errlen, lineno);
        else
            ok = fail(err, errlen, &w, "expected \"[section]\" or \"key = value\"");
    }
    free(text);
    return ok;
}

/* ---- resolving file > env > default ---- */

/* The environment's value for s (after env_value), or NULL; caller frees. */
static char *env_for(const tp_setting_t *s)
{
    const char *v = s->env ? getenv(s->env) : NULL;
    if (v == NULL || *v == '\0')
        return NULL;
    if (s->env_value == NULL)
        return tp_xstrdup(v);
    tp_buf_t b = {0};
    const char *pct = strstr(s->env_value, "%s");
    if (pct == NULL) {
        tp_buf_puts(&b, s->env_value);
    } else {
        tp_buf_append(&b, s->env_value, (size_t)(pct - s->env_value));
        tp_buf_puts(&b, v);
        tp_buf_puts(&b, pct + 2);
    }
    return tp_buf_steal(&b);
}

static bool resolve(tp_config_t *c, const file_value_t *vals, char *err, size_t errlen)
{
    bool file_has_creds = false;
    for (size_t i = 0; i < tp_settings_count; i++)
        if (vals[i].text != NULL && is_cred(&tp_settings[i]))
            file_has_creds = true;

    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        tp_cfg_origin_t *o = &c->origin[i];
        char *env = NULL;
        const char *v;
        where_t w;
        if (vals[i].text != NULL) {
            *o = (tp_cfg_origin_t){TP_CFG_SRC_FILE, vals[i].line};
            v = vals[i].text;
            where_set(&w, c->path, vals[i].line, NULL);
        } else if (!(file_has_creds && is_cred(s)) && (env = env_for(s)) != NULL) {
            *o = (tp_cfg_origin_t){TP_CFG_SRC_ENV, 0};
            v = env;
            where_set(&w, c->path, 0, s->env);
        } else {
            *o = (tp_cfg_origin_t){TP_CFG_SRC_DEFAULT, 0};
            v = s->default_value ? s->default_value : "";
            where_set(&w, c->path, 0, NULL);
        }
        bool ok = convert(c, s, v);
        if (!ok) {
            tp_buf_t b = {0};
            put_expected(&b, s);
            if (sensitive(s))
                fail(err, errlen, &w, "invalid value for %s.%s: expected %s", s->section,
                     s->key, b.data);
            else
                fail(err, errlen, &w, "invalid value \"%s\" for %s.%s: expected %s", v,
                     s->section, s->key, b.data);
            tp_buf_free(&b);
        }
        free(env);
        if (!ok)
            return false;
    }
    return true;
}

/* ---- derived settings ---- */

/* True when a Postgres password is given outright: in the dsn, PGPASSWORD (libpq
 * reads it when the dsn has none) or TIDEPOOL_PGPASSWORD_FILE (the daemon's). */
static bool password_given(const char *dsn)
{
    const char *env[] = {"PGPASSWORD", "TIDEPOOL_PGPASSWORD_FILE"};
    for (size_t i = 0; i < TP_ARRAY_LEN(env); i++) {
        const char *v = getenv(env[i]);
        if (v != NULL && *v != '\0')
            return true;
    }
    return tp_pg_conninfo_has(dsn, "password");
}

/* password_source = auto (the default) becomes lakebase or none here, so that
 * every user of the config sees one of those two: naming a Lakebase instance or
 * endpoint has no other use than minting, so it asks for lakebase, unless a
 * password is given outright. */
static void resolve_password_source(tp_config_t *c)
{
    c->postgres.password_source_why = NULL;
    if (strcmp(c->postgres.password_source, "auto") != 0)
        return;
    bool named = *c->postgres.lakebase_instance != '\0' || *c->postgres.lakebase_endpoint != '\0';
    bool given = named && password_given(c->postgres.dsn);
    c->postgres.password_source_why =
        !named  ? "auto: no Lakebase instance or endpoint is set"
        : given ? "auto: a Lakebase instance or endpoint is set, but so is a password"
                : "auto: a Lakebase instance or endpoint is set";
    free(c->postgres.password_source);
    c->postgres.password_source = tp_xstrdup(named && !given ? "lakebase" : "none");
}

/* ---- cross-setting checks ---- */

static void where_of(const tp_config_t *c, const char *section, const char *key, where_t *w)
{
    int i = find_setting(section, key);
    const tp_cfg_origin_t *o = &c->origin[i];
    where_set(w, c->path, o->source == TP_CFG_SRC_FILE ? o->line : 0,
              o->source == TP_CFG_SRC_ENV ? tp_settings[i].env : NULL);
}

/* listen is a valid ADDR:PORT; loopback means localhost, 127.0.0.0/8 or ::1. */
static bool is_loopback(const char *listen)
{
    const char *colon = strrchr(listen, ':');
    char host[256];
    size_t n = (size_t)(colon - listen);
    if (listen[0] == '[' && n >= 2) { /* "[::1]" */
        listen++;
        n -= 2;
    }
    if (n >= sizeof host)
        return false;
    memcpy(host, listen, n);
    host[n] = '\0';
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return strcmp(host, "localhost") == 0;
}

static bool check_consistency(const tp_config_t *c, char *err, size_t errlen)
{
    where_t w;
    bool id = *c->warehouse.client_id != '\0', secret = *c->warehouse.client_secret != '\0';
    if (id && !secret) {
        where_of(c, "warehouse", "client_id", &w);
        return fail(err, errlen, &w,
                    "warehouse.client_id is set but warehouse.client_secret is not; "
                    "OAuth needs both");
    }
    if (secret && !id) {
        where_of(c, "warehouse", "client_secret", &w);
        return fail(err, errlen, &w,
                    "warehouse.client_secret is set but warehouse.client_id is not; "
                    "OAuth needs both");
    }
    if (c->warehouse.wait_ms > c->warehouse.max_wait_ms) {
        where_of(c, "warehouse", "wait", &w);
        return fail(err, errlen, &w,
                    "warehouse.wait (%lld ms) is longer than warehouse.max_wait (%lld ms)",
                    (long long)c->warehouse.wait_ms, (long long)c->warehouse.max_wait_ms);
    }
    if (*c->postgres.lakebase_endpoint != '\0' &&
        strncmp(c->postgres.lakebase_endpoint, "projects/", 9) != 0) {
        where_of(c, "postgres", "lakebase_endpoint", &w);
        return fail(err, errlen, &w,
                    "postgres.lakebase_endpoint must look like "
                    "projects/<project>/branches/<branch>/endpoints/<endpoint>");
    }
    if (strcmp(c->postgres.password_source, "lakebase") == 0) {
        bool inst = *c->postgres.lakebase_instance != '\0';
        bool ep = *c->postgres.lakebase_endpoint != '\0';
        if (c->postgres.password_source_why != NULL &&
            (*c->warehouse.host == '\0' || tp_config_warehouse_auth(c) == TP_WH_AUTH_NONE)) {
            where_of(c, "postgres", inst ? "lakebase_instance" : "lakebase_endpoint", &w);
            return fail(err, errlen, &w,
                        "postgres.%s is set, so Postgres passwords are minted by Lakebase "
                        "(password_source = auto), which needs warehouse.host and workspace "
                        "credentials (warehouse.token, or client_id and client_secret); set "
                        "password_source = none (env TIDEPOOL_PG_PASSWORD_SOURCE) to log in "
                        "with libpq's password instead",
                        inst ? "lakebase_instance" : "lakebase_endpoint");
        }
        if (inst == ep) {
            where_of(c, "postgres", inst ? "lakebase_endpoint" : "password_source", &w);
            return fail(err, errlen, &w,
                        inst ? "postgres.lakebase_instance and postgres.lakebase_endpoint are both "
                               "set; set one (Provisioned instance or Autoscaling endpoint)"
                             : "postgres.password_source = lakebase needs postgres.lakebase_instance "
                               "(Provisioned) or postgres.lakebase_endpoint (Autoscaling, "
                               "env LAKEBASE_ENDPOINT)");
        }
        if (*c->warehouse.host == '\0' || tp_config_warehouse_auth(c) == TP_WH_AUTH_NONE) {
            where_of(c, "postgres", "password_source", &w);
            return fail(err, errlen, &w,
                        "postgres.password_source = lakebase needs warehouse.host and workspace "
                        "credentials (warehouse.token, or client_id and client_secret)");
        }
    }
    if (strcmp(c->auth.mode, "none") == 0 && !is_loopback(c->server.listen)) {
        bool listen_from_file = c->origin[find_setting("server", "listen")].source ==
                                TP_CFG_SRC_FILE;
        where_of(c, listen_from_file ? "server" : "auth", listen_from_file ? "listen" : "mode",
                 &w);
        return fail(err, errlen, &w,
                    "auth.mode = none is only allowed on a loopback server.listen (not %s); "
                    "set auth.mode to token, databricks-apps or jwt",
                    c->server.listen);
    }
    if (strcmp(c->auth.mode, "jwt") == 0 &&
        (*c->auth.jwt_audience == '\0' || *c->auth.jwt_issuer == '\0')) {
        /* a token minted for another service of the same IdP must not pass */
        where_of(c, "auth", "mode", &w);
        return fail(err, errlen, &w,
                    "auth.mode = jwt needs auth.%s: every token's aud and iss are checked "
                    "against auth.jwt_audience and auth.jwt_issuer",
                    *c->auth.jwt_audience == '\0' ? "jwt_audience" : "jwt_issuer");
    }
    if (*c->server.tls_listen != '\0') {
        const char *missing = *c->server.tls_cert == '\0' ? "tls_cert"
                              : *c->server.tls_key == '\0' ? "tls_key"
                                                            : NULL;
        where_of(c, "server", "tls_listen", &w);
        if (missing != NULL)
            return fail(err, errlen, &w, "server.tls_listen is set but server.%s is not; "
                        "HTTPS needs a certificate and its key", missing);
        if (strcmp(c->auth.mode, "none") == 0 && !is_loopback(c->server.tls_listen))
            return fail(err, errlen, &w,
                        "auth.mode = none is only allowed on a loopback server.tls_listen "
                        "(not %s); set auth.mode to token, databricks-apps or jwt",
                        c->server.tls_listen);
    }
    return true;
}

/* ---- public API ---- */

bool tp_config_load(tp_config_t *out, const char *path, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    file_value_t *vals = tp_xcalloc(tp_settings_count, sizeof *vals);
    bool ok = path == NULL || parse_file(path, vals, err, errlen);
    if (ok) {
        out->path = path ? tp_xstrdup(path) : NULL;
        out->origin = tp_xcalloc(tp_settings_count, sizeof *out->origin);
        ok = resolve(out, vals, err, errlen);
        if (ok)
            resolve_password_source(out);
        ok = ok && check_consistency(out, err, errlen);
    }
    for (size_t i = 0; i < tp_settings_count; i++)
        free(vals[i].text);
    free(vals);
    if (!ok)
        tp_config_free(out);
    return ok;
}

void tp_config_free(tp_config_t *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < tp_settings_count; i++)
        if (is_text_type(tp_settings[i].type))
            free(*(char **)field(c, &tp_settings[i]));
    free(c->path);
    free(c->origin);
    memset(c, 0, sizeof *c);
}

/* Appends the printable form of s's value in c (masked where needed). */
static void put_value(tp_buf_t *b, const tp_config_t *c, const tp_setting_t *s)
{
    const void *f = field(c, s);
    const char *str = is_text_type(s->type) ? *(char *const *)f : NULL;
    switch (s->type) {
    case TP_CFG_INT:
        tp_buf_printf(b, "%lld", (long long)*(const int64_t *)f);
        return;
    case TP_CFG_DURATION:
        put_duration(b, *(const int64_t *)f);
        return;
    case TP_CFG_SIZE:
        put_size(b, *(const int64_t *)f);
        return;
    case TP_CFG_BOOL:
        tp_buf_puts(b, *(const bool *)f ? "true" : "false");
        return;
    default:
        break;
    }
    if (str == NULL || *str == '\0') {
        tp_buf_puts(b, s->secret ? "(unset)" : "\"\"");
    } else if (s->secret) {
        tp_buf_puts(b, MASK);
    } else if (s->type == TP_CFG_DSN) {
        char *m = tp_config_mask_dsn(str);
        tp_buf_puts(b, m);
        free(m);
    } else {
        tp_buf_puts(b, str);
    }
}

void tp_config_print(const tp_config_t *c, FILE *f)
{
    tp_buf_t b = {0};
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        tp_buf_reset(&b);
        tp_buf_printf(&b, "%s.%s = ", s->section, s->key);
        put_value(&b, c, s);
        tp_cfg_source_t src = c->origin ? c->origin[i].source : TP_CFG_SRC_DEFAULT;
        const char *why = field(c, s) == (void *)&c->postgres.password_source
                              ? c->postgres.password_source_why
                              : NULL;
        if (src == TP_CFG_SRC_FILE)
            tp_buf_puts(&b, "  (file");
        else if (src == TP_CFG_SRC_ENV)
            tp_buf_printf(&b, "  (env %s", s->env);
        else
            tp_buf_puts(&b, "  (default");
        tp_buf_printf(&b, "%s%s)\n", why ? "; " : "", why ? why : "");
        fputs(b.data, f);
    }
    tp_buf_free(&b);
}

static const char *type_name(tp_cfg_type_t t)
{
    switch (t) {
    case TP_CFG_STRING: return "string";
    case TP_CFG_INT: return "integer";
    case TP_CFG_BOOL: return "boolean";
    case TP_CFG_DURATION: return "duration";
    case TP_CFG_SIZE: return "size";
    case TP_CFG_ENUM: return "enum";
    case TP_CFG_DSN: return "conninfo";
    case TP_CFG_LISTEN: return "ADDR:PORT";
    }
    return "?";
}

void tp_config_print_reference(FILE *f)
{
    tp_buf_t b = {0};
    tp_buf_puts(&b, "| setting | type | default | env | reloadable | secret | help |\n"
                    "| --- | --- | --- | --- | --- | --- | --- |\n");
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        tp_buf_printf(&b, "| `%s.%s` | %s", s->section, s->key, type_name(s->type));
        if (s->type == TP_CFG_INT || s->type == TP_CFG_DURATION || s->type == TP_CFG_SIZE) {
            tp_buf_puts(&b, " (");
            put_bounds(&b, s);
            tp_buf_puts(&b, ")");
        } else if (s->type == TP_CFG_ENUM) {
            tp_buf_puts(&b, ": ");
            put_choices(&b, s->choices);
        }
        const char *def = s->default_value ? s->default_value : "";
        if (*def != '\0')
            tp_buf_printf(&b, " | `%s` | ", def);
        else
            tp_buf_puts(&b, " | (empty) | ");
        if (s->env && s->env_value && strstr(s->env_value, "%s"))
            tp_buf_printf(&b, "`%s` (as `%s`)", s->env, s->env_value);
        else if (s->env && s->env_value)
            tp_buf_printf(&b, "`%s` (when set: `%s`)", s->env, s->env_value);
        else if (s->env)
            tp_buf_printf(&b, "`%s`", s->env);
        tp_buf_printf(&b, " | %s | %s | %s |\n", s->reloadable ? "yes" : "no",
                      s->secret ? "yes" : s->type == TP_CFG_DSN ? "password masked" : "no",
                      s->help);
    }
    fputs(b.data, f);
    tp_buf_free(&b);
}

tp_config_wh_auth_t tp_config_warehouse_auth(const tp_config_t *c)
{
    if (c->warehouse.token && *c->warehouse.token)
        return TP_WH_AUTH_TOKEN;
    if (c->warehouse.client_id && *c->warehouse.client_id && c->warehouse.client_secret &&
        *c->warehouse.client_secret)
        return TP_WH_AUTH_OAUTH;
    return TP_WH_AUTH_NONE;
}

static size_t setting_size(const tp_setting_t *st)
{
    switch (st->type) {
    case TP_CFG_BOOL: return sizeof(bool);
    case TP_CFG_INT:
    case TP_CFG_DURATION:
    case TP_CFG_SIZE: return sizeof(int64_t);
    default: return sizeof(char *);
    }
}

static bool in_list(const char *const *list, const char *s)
{
    for (size_t i = 0; list && list[i]; i++)
        if (strcmp(list[i], s) == 0)
            return true;
    return false;
}

static bool same_value(const tp_setting_t *s, const tp_config_t *a, const tp_config_t *b)
{
    const void *x = field(a, s), *y = field(b, s);
    if (is_text_type(s->type))
        return strcmp(*(char *const *)x, *(char *const *)y) == 0;
    return memcmp(x, y, setting_size(s)) == 0;
}

const tp_setting_t *tp_config_restart_needed(const tp_config_t *old, const tp_config_t *fresh)
{
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        if (!s->reloadable && !same_value(s, old, fresh))
            return s;
    }
    return NULL;
}

tp_config_t *tp_config_reload(const tp_config_t *running, const tp_config_reload_scope_t *scope,
                              tp_config_t *eff)
{
    if (!running->path) {
        tp_info("SIGHUP: no config file; settings unchanged");
        return NULL;
    }
    tp_config_t *fresh = tp_xcalloc(1, sizeof *fresh);
    char err[512];
    if (!tp_config_load(fresh, running->path, err, sizeof err)) {
        const char *kv[] = {"error", err, NULL};
        tp_logkv(TP_LOG_ERROR, kv, "config reload failed: keeping the previous settings");
        free(fresh);
        return NULL;
    }
    *eff = *fresh;
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *st = &tp_settings[i];
        char name[96];
        snprintf(name, sizeof name, "%s.%s", st->section, st->key);
        bool live = scope && scope->live ? in_list(scope->live, name) : st->reloadable;
        if (live || same_value(st, running, eff))
            continue;
        memcpy((char *)eff + st->offset, (const char *)running + st->offset, setting_size(st));
        if (scope && in_list(scope->ignored_sections, st->section))
            continue;
        const char *kv[] = {"setting", name, NULL};
        tp_logkv(TP_LOG_WARN, kv, "config reload: this setting changed but needs a restart; "
                                  "the running value stays");
    }
    return fresh;
}

/* ---- DSN masking ---- */

static bool is_password_key(const char *k, size_t n)
{
    return (n == 8 && strncasecmp(k, "password", 8) == 0) ||
           (n == 11 && strncasecmp(k, "sslpassword", 11) == 0);
}

/* key=value pairs separated by '&' (URI query): masks password values. */
static void mask_query(tp_buf_t *b, const char *q)
{
    while (*q != '\0') {
        size_t n = strcspn(q, "&");
        const char *eq = memchr(q, '=', n);
        if (eq != NULL && is_password_key(q, (size_t)(eq - q))) {
            tp_buf_append(b, q, (size_t)(eq - q) + 1);
            tp_buf_puts(b, MASK);
        } else {
            tp_buf_append(b, q, n);
        }
        q += n;
        if (*q == '&')
            tp_buf_putc(b, *q++);
    }
}

static void mask_uri(tp_buf_t *b, const char *dsn)
{
    const char *auth = strstr(dsn, "://") + 3;
    const char *q = strchr(auth, '?');
    /* userinfo ends at the last '@' before the query; if none there, a password
     * holding '?' may push it further, so take the last '@' of all. */
    const char *at = NULL;
    for (const char *p = auth; *p && (q == NULL || p < q); p++)
        if (*p == '@')
            at = p;
    if (at == NULL)
        at = strrchr(auth, '@');
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    const char *p = auth;
    if (colon != NULL) {
        tp_buf_append(b, dsn, (size_t)(colon + 1 - dsn));
        tp_buf_puts(b, MASK);
        p = at;
    } else {
        tp_buf_append(b, dsn, (size_t)(auth - dsn));
    }
    q = strchr(p, '?');
    if (q != NULL) {
        tp_buf_append(b, p, (size_t)(q + 1 - p));
        mask_query(b, q + 1);
    } else {
        tp_buf_puts(b, p);
    }
}

/* Length of a conninfo value at v: 'quoted' (with \ escapes) or up to whitespace.
 * Returns false when a quote is unterminated. */
static bool conninfo_value_len(const char *v, size_t *len)
{
    const char *p = v;
    if (*p == '\'') {
        for (p++; *p != '\'' && *p != '\0'; p++)
            if (*p == '\\' && p[1] != '\0')
                p++;
        if (*p != '\'')
            return false;
        p++;
    } else {
        for (; *p != '\0' && !isspace((unsigned char)*p); p++)
            if (*p == '\\' && p[1] != '\0')
                p++;
    }
    *len = (size_t)(p - v);
    return true;
}

static void mask_conninfo(tp_buf_t *b, const char *p)
{
    while (*p != '\0') {
        size_t ws = strspn(p, " \t\r\n\f\v");
        tp_buf_append(b, p, ws);
        p += ws;
        if (*p == '\0')
            break;
        const char *key = p;
        size_t klen = strcspn(p, "= \t\r\n\f\v");
        const char *eq = p + klen + strspn(p + klen, " \t\r\n\f\v");
        if (*eq != '=') {
            tp_buf_puts(b, MASK); /* malformed: hide the rest */
            return;
        }
        const char *v = eq + 1 + strspn(eq + 1, " \t\r\n\f\v");
        size_t vlen;
        if (!conninfo_value_len(v, &vlen)) {
            tp_buf_append(b, key, (size_t)(v - key));
            tp_buf_puts(b, MASK);
            return;
        }
        tp_buf_append(b, key, (size_t)(v - key));
        bool hide = is_password_key(key, klen) ||
                    /* dbname may itself be a full connection string */
                    (klen == 6 && strncmp(key, "dbname", 6) == 0 &&
                     (memchr(v, '=', vlen) != NULL || memchr(v, '@', vlen) != NULL));
        if (hide)
            tp_buf_puts(b, MASK);
        else
            tp_buf_append(b, v, vlen);
        p = v + vlen;
    }
}

char *tp_config_mask_dsn(const char *dsn)
{
    tp_buf_t b = {0};
    if (dsn == NULL)
        return tp_buf_steal(&b);
    if (strncmp(dsn, "postgresql://", 13) == 0 || strncmp(dsn, "postgres://", 11) == 0)
        mask_uri(&b, dsn);
    else
        mask_conninfo(&b, dsn);
    return tp_buf_steal(&b);
}
