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

typedef struct tp_config {
    char *path; /* file it came from, or NULL when built from defaults and env only */
    struct {
        char *dsn;       /* libpq conninfo; "" = libpq's PG* environment */
        char *read_dsn;  /* optional read replica; "" = none */
        int64_t pool_size;
        int64_t connect_timeout_ms;
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
    } warehouse;
    struct {
        char *definitions;
        int64_t max_concurrent_jobs;
    } sync;
    struct {
        char *listen; /* ADDR:PORT */
        int64_t threads; /* 0 = one per core */
        char *definitions;
        int64_t max_body_bytes;
        int64_t max_header_bytes;
        int64_t max_connections;
        int64_t timeout_ms;
    } server;
    struct {
        char *mode; /* none | token | databricks-apps | jwt */
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
} tp_cfg_type_t;

typedef struct tp_setting {
    const char *section;
    const char *key;
    tp_cfg_type_t type;
    const char *default_value; /* textual, parsed like a file value; NULL = empty */
    const char *env;           /* environment variable used when the file leaves it unset */
    bool reloadable;           /* takes effect on SIGHUP without restart */
    bool secret;               /* masked wherever printed */
    size_t offset;             /* of the field in tp_config_t */
    int64_t min, max;          /* for INT, DURATION, SIZE */
    const char *const *choices; /* for ENUM, NULL-terminated */
    const char *help;          /* one line for --check and the README reference */
} tp_setting_t;

extern const tp_setting_t tp_settings[];
extern const size_t tp_settings_count;

/* Loads path (NULL: defaults and environment only) into *out, which the caller
 * zero-initialises. On failure writes "file:line: message" (no secrets) into
 * err and returns false; *out is left freed. */
bool tp_config_load(tp_config_t *out, const char *path, char *err, size_t errlen) TP_WUR;
void tp_config_free(tp_config_t *c);
/* Prints every setting as "section.key = value  (source)" with secrets masked. */
void tp_config_print(const tp_config_t *c, FILE *f);
/* Prints the settings table as a Markdown reference (for README). */
void tp_config_print_reference(FILE *f);

#endif
