/* Configuration: one INI file plus environment fallbacks (DESIGN §4).
 * A single table (tp_settings) lists every setting with its type, default,
 * environment variable, reloadability and secrecy; it drives parsing,
 * validation, `--check` output and the README reference. Loading parses into
 * a fresh struct that the caller swaps in only when it is whole. */
#ifndef TIDEPOOL_CONFIG_H
#define TIDEPOOL_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tidepool/util.h"

#define TP_CONFIG_DEFAULT_PATH "/etc/tidepool/tidepool.conf"

/* Where a setting's value came from (tp_config_t.origin, one per tp_settings entry). */
typedef enum tp_cfg_source {
    TP_CFG_SRC_DEFAULT,
    TP_CFG_SRC_FILE,
    TP_CFG_SRC_ENV,
} tp_cfg_source_t;

typedef struct tp_cfg_origin {
    tp_cfg_source_t source;
    int line; /* for TP_CFG_SRC_FILE */
} tp_cfg_origin_t;

typedef struct tp_config {
    char *path; /* file it came from, or NULL when built from defaults and env only */
    tp_cfg_origin_t *origin; /* owned; indexed like tp_settings[] */
    struct {
        char *dsn;       /* libpq conninfo; "" = libpq's PG* environment */
        char *read_dsn;  /* optional read replica; "" = none */
        int64_t pool_size;
        int64_t connect_timeout_ms;
        char *password_source;    /* none | lakebase ("auto" is resolved into one of them) */
        const char *password_source_why; /* static text when it was "auto": why, else NULL */
        char *lakebase_instance;  /* Provisioned instance name */
        char *lakebase_endpoint;  /* Autoscaling projects/../branches/../endpoints/.. */
        int64_t lakebase_refresh_before_ms;
    } postgres;
    struct {
        char *host; /* normalised by the warehouse client, not here */
        char *warehouse_id;
        char *token;
        char *client_id;
        char *client_secret;
        char *catalog;
        char *schema;
        int64_t timeout_ms;
        /* fallback reads (DESIGN §9, docs/fallback.md) */
        int64_t max_in_flight;      /* fallback statements running at once, all threads */
        int64_t wait_ms;            /* default wait budget before answering 202 */
        int64_t max_wait_ms;        /* cap of Prefer: wait=N */
        int64_t result_cache_bytes; /* result cache bound (bytes, whole process) */
        int64_t max_result_bytes;   /* one result held in memory at most */
        int64_t result_ttl_ms;      /* cached results and finished handles live this long */
        int64_t abandon_ms;         /* unpolled statement nobody waits for: cancelled */
    } warehouse;
    struct {
        char *definitions;
        int64_t max_concurrent_jobs;
        int64_t outbox_poll_ms;
    } sync;
    struct {
        char *listen; /* ADDR:PORT */
        int64_t threads; /* 0 = one per core */
        char *definitions;
        int64_t max_body_bytes;
        int64_t max_header_bytes;
        int64_t max_connections;
        int64_t timeout_ms;
        int64_t cache_bytes;      /* all threads together */
        int64_t pool_queue;       /* per thread */
        int64_t table_max_limit;
        int64_t drain_timeout_ms;
        int64_t idempotency_ttl_ms;
        int64_t max_event_streams; /* GET /api/v1/events streams, whole process */
        char *tls_listen;         /* "" = no HTTPS listener */
        char *tls_cert, *tls_key; /* PEM files; both needed with tls_listen */
        char *web_root;   /* demo page directory; "" = ./web or TP_DATADIR/web */
        char *web_vendor; /* served at /web/vendor/; "" = web_root/vendor */
    } server;
    struct {
        char *mode; /* none | token | databricks-apps | jwt */
        char *anonymous_roles;  /* mode none: roles of the anonymous principal */
        char *tokens;           /* "name:role+role:sha256hex, ..." (lib/auth.c parses) */
        char *tokens_file;      /* same entries, one a line */
        bool token_table;       /* also accept tokens from tidepool.api_tokens */
        char *trusted_proxies;  /* addresses/CIDRs allowed to send X-Forwarded-* */
        char *roles;            /* "user:role+role, group:NAME:role, *:role" */
        char *sync_roles;       /* who may run sync jobs: "role, role" (any one) */
        char *jwt_secret;       /* HS256 shared secret */
        char *jwt_jwks_file;    /* RS256 keys (JWKS JSON) */
        char *jwt_public_key_file; /* RS256 key (PEM) */
        char *jwt_audience;
        char *jwt_issuer;
        int64_t jwt_clock_skew_ms;
        char *jwt_roles_claim;  /* dotted path */
        char *jwt_groups_claim; /* dotted path */
        int64_t rate_per_identity; /* requests per second; 0 = off */
        int64_t burst_per_identity;
        int64_t rate_per_address;
        int64_t burst_per_address;
        int64_t rate_limit_keys;
    } auth;
    struct {
        char *level;
    } log;
} tp_config_t;

typedef enum tp_cfg_type {
    TP_CFG_STRING,
    TP_CFG_INT,      /* int64_t, bounded by min/max */
    TP_CFG_BOOL,     /* bool */
    TP_CFG_DURATION, /* int64_t milliseconds: "30s", "5m", bare number = seconds */
    TP_CFG_SIZE,     /* int64_t bytes: "64k", "16M" */
    TP_CFG_ENUM,     /* char *, one of choices */
    TP_CFG_DSN,      /* char *, libpq conninfo or URI; printed with passwords masked */
    TP_CFG_LISTEN,   /* char *, "ADDR:PORT" ("[::1]:8080" for IPv6), port 1-65535 */
} tp_cfg_type_t;

typedef struct tp_setting {
    const char *section;
    const char *key;
    tp_cfg_type_t type;
    const char *default_value; /* textual, converted like a file value; NULL = empty */
    const char *env;           /* environment variable used when the file leaves it unset
                                  (an empty variable counts as unset) */
    const char *env_value;     /* NULL: the variable's value as is; else this text with
                                  "%s" replaced by it ("0.0.0.0:%s") */
    bool reloadable;           /* takes effect on SIGHUP without restart */
    bool secret;               /* masked wherever printed */
    size_t offset;             /* of the field in tp_config_t */
    int64_t min, max;          /* for INT, DURATION, SIZE */
    const char *const *choices; /* for ENUM, NULL-terminated */
    const char *help;          /* one line for the reference (docs, README) */
} tp_setting_t;

extern const tp_setting_t tp_settings[];
extern const size_t tp_settings_count;

/* Loads path (NULL: defaults and environment only) into *out, which the caller
 * zero-initialises (it is overwritten, not freed). Precedence per key: file,
 * then environment, then default. On failure writes one line
 * "file:line: message" ("env VAR: message" when the bad value came from the
 * environment; "file: cannot read: reason" for an unreadable file) into err,
 * never including a secret's value, and returns false with *out freed.
 * Reload: load into a fresh struct and swap it in only when this returns true. */
bool tp_config_load(tp_config_t *out, const char *path, char *err, size_t errlen) TP_WUR;
/* Frees everything tp_config_load allocated and zeroes *c; NULL and a zeroed struct are fine. */
void tp_config_free(tp_config_t *c);
/* Prints every setting as "section.key = value  (file|env VAR|default)", one a
 * line: secrets as "********" (or "(unset)" when empty), DSNs via tp_config_mask_dsn. */
void tp_config_print(const tp_config_t *c, FILE *f);
/* Prints the settings table as a Markdown reference (for README and docs). */
void tp_config_print_reference(FILE *f);

/* Returns a copy of a libpq conninfo ("host=h password=x") or URI
 * ("postgresql://u:x@h/db?password=x") with every password (and sslpassword)
 * replaced by "********". Malformed input is masked from the point where it
 * stops parsing, so nothing secret slips through. Caller frees; NULL gives "". */
char *tp_config_mask_dsn(const char *dsn);

/* How the warehouse client authenticates: a token, when set, wins over an
 * OAuth client id/secret pair (tp_config_load refuses half a pair). */
typedef enum tp_config_wh_auth {
    TP_WH_AUTH_NONE,  /* no credentials: only a warehouse that needs none works */
    TP_WH_AUTH_TOKEN, /* warehouse.token as a bearer token */
    TP_WH_AUTH_OAUTH, /* warehouse.client_id + client_secret, machine-to-machine */
} tp_config_wh_auth_t;
tp_config_wh_auth_t tp_config_warehouse_auth(const tp_config_t *c);

/* For a reload: the first setting that is not reloadable and differs between
 * old and fresh (the caller logs "restart needed for section.key" and keeps
 * the old value or refuses the reload); NULL when everything may be swapped. */
const tp_setting_t *tp_config_restart_needed(const tp_config_t *old, const tp_config_t *fresh);

/* What a program applies on SIGHUP: live lists the "section.key" settings it
 * applies at run time (NULL: every setting the table marks reloadable);
 * settings of the ignored sections are not the program's and are never
 * warned about (both lists NULL-terminated, or NULL). */
typedef struct tp_config_reload_scope {
    const char *const *live;
    const char *const *ignored_sections;
} tp_config_reload_scope_t;

/* SIGHUP's first step, for both programs: loads running->path again into a
 * new config (returned; the caller keeps it alive while *eff points into it,
 * then frees it with tp_config_free + free). *eff is that config with every
 * setting the program cannot apply live put back at its running value, each
 * such change logged as a warning naming section.key. NULL (logged,
 * file:line) when the file does not load; the running settings then stay. */
tp_config_t *tp_config_reload(const tp_config_t *running, const tp_config_reload_scope_t *scope,
                              tp_config_t *eff) TP_WUR;

#endif
