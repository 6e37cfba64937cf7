/* Definitions: annotated SQL files (DESIGN §5, docs/definitions.md).
 * A definition is NAME.sql whose leading "-- @key value" lines are its
 * settings and whose body is one SQL statement. Two kinds: sync jobs (a
 * directory of NAME.sql in the warehouse dialect) and datasets (a directory of
 * NAME.sql in Postgres SQL, with an optional twin NAME.warehouse.sql; a twin
 * alone is a warehouse-only dataset). Loading validates everything it can and
 * reports each problem as "file:line: message". A set owns every string and
 * array reachable from it; nothing here touches the network or Postgres. */
#ifndef TIDEPOOL_DEFS_H
#define TIDEPOOL_DEFS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tidepool/util.h"

/* ---- parameter types and request values ---- */

typedef enum tp_defs_type {
    TP_DEFS_STRING = 0,
    TP_DEFS_INT,       /* 32-bit signed */
    TP_DEFS_BIGINT,    /* 64-bit signed */
    TP_DEFS_DOUBLE,    /* finite binary64 */
    TP_DEFS_DECIMAL,   /* -?digits[.digits], at most 38 digits in all */
    TP_DEFS_BOOLEAN,   /* true/false/yes/no/on/off/1/0, any case */
    TP_DEFS_DATE,      /* YYYY-MM-DD, a real calendar date */
    TP_DEFS_TIMESTAMP, /* ISO-8601: YYYY-MM-DD[(T| )HH:MM[:SS[.f{1,9}]]][Z|±HH[:MM]] */
} tp_defs_type_t;

/* "STRING", "INT", ... as written in @param and sent as a warehouse parameter type. */
const char *tp_defs_type_name(tp_defs_type_t t);
/* Postgres type name ("text", "integer", "bigint", "double precision", "numeric",
 * "boolean", "date", "timestamptz") and its OID, for PQprepare's paramTypes. */
const char *tp_defs_type_pg(tp_defs_type_t t);
unsigned tp_defs_type_oid(tp_defs_type_t t);

/* A request value checked against its parameter type. */
typedef struct tp_defs_value {
    tp_defs_type_t type;
    bool is_null;     /* only from a "= NULL" default */
    int64_t i;        /* INT, BIGINT; BOOLEAN as 0/1 */
    double d;         /* DOUBLE */
    int64_t epoch_us; /* DATE (midnight UTC) and TIMESTAMP (UTC; no offset means UTC) */
    char canon[48];   /* canonical text to bind, for every type but STRING (bind the
                       * input itself); TIMESTAMP is normalised to UTC with a "Z" */
} tp_defs_value_t;

/* Validates text s as a value of type t and fills *out. On failure returns
 * false and sets *why to a static English phrase fit for a 422 "message"
 * (e.g. "must be a date YYYY-MM-DD"); the caller names the parameter. Never
 * allocates. */
bool tp_defs_value_parse(tp_defs_type_t t, const char *s, tp_defs_value_t *out,
                         const char **why) TP_WUR;

/* The text to bind for a value parsed from input (input for STRING, else canon). */
static inline const char *tp_defs_value_text(const tp_defs_value_t *v, const char *input)
{
    return v->type == TP_DEFS_STRING ? input : v->canon;
}

/* ---- bodies ---- */

/* One SQL body after scanning. For a Postgres body, sql has each :name replaced
 * by $n in first-appearance order (a name used twice keeps its number); for a
 * warehouse body, sql is the text as written (named :name markers are native
 * there). In both, a trailing ';', trailing comments and surrounding blank space
 * are removed, so the text can be wrapped ("SELECT * FROM (sql) q"). */
typedef struct tp_defs_body {
    char *path;     /* file it came from */
    int line;       /* line of the file where sql starts (1-based) */
    char *sql;
    char **names;   /* parameter names in order of first appearance ($1 = names[0]) */
    size_t *index;  /* datasets: index[k] is names[k]'s position in params[] */
    size_t n_names;
} tp_defs_body_t;

/* ---- sync jobs ---- */

typedef enum tp_defs_mode { TP_DEFS_SNAPSHOT = 0, TP_DEFS_INCREMENTAL } tp_defs_mode_t;
typedef enum tp_defs_deletes {
    TP_DEFS_DELETES_NONE = 0,
    TP_DEFS_DELETES_FLAG,      /* rows whose deletes_column is true are deleted */
    TP_DEFS_DELETES_RECONCILE, /* every reconcile_ms, keys the warehouse lacks are deleted */
} tp_defs_deletes_t;

typedef struct tp_defs_index {
    char **columns;
    size_t n_columns;
} tp_defs_index_t;

typedef struct tp_defs_job {
    char *name;
    char *path;
    char *target;        /* "schema.table" as written (lower-case identifiers) */
    char *target_schema; /* never "tidepool" */
    char *target_table;
    int target_line;     /* of @target in path, for messages */
    tp_defs_mode_t mode;
    char **key;          /* @key columns in order; required for incremental */
    size_t n_key;
    char *watermark;     /* @watermark column, or NULL (incremental only) */
    int64_t every_ms;    /* @every, at least 1 s */
    int64_t timeout_ms;  /* @timeout, default 10 minutes */
    tp_defs_deletes_t deletes;
    char *deletes_column; /* FLAG: the boolean column */
    int64_t reconcile_ms; /* RECONCILE: how often */
    tp_defs_index_t *indexes; /* extra @index lines, each one index */
    size_t n_indexes;
    char *description;
    bool uses_watermark; /* the body contains :watermark (only possible with @watermark);
                          * bind it as the last value seen, or NULL before the first run */
    tp_defs_body_t body; /* warehouse dialect; names is empty or {"watermark"} */
} tp_defs_job_t;

/* ---- datasets ---- */

typedef struct tp_defs_param {
    char *name;
    tp_defs_type_t type;
    int line;              /* of the @param line in the main file */
    bool has_default;
    char *default_text;    /* as written after '=' (quotes removed); NULL without default
                            * or for "= NULL" */
    tp_defs_value_t dflt;  /* parsed default (is_null for "= NULL") */
    char **choices;        /* "IN (a, b)": allowed values as bind text; n_choices 0 = any */
    size_t n_choices;
    char *choices_why;     /* "must be one of: a, b" (NULL without choices) */
} tp_defs_param_t;

/* Validates a request's text for parameter p: its type (tp_defs_value_parse),
 * then its IN list. On failure *why is static or owned by p (the set). */
bool tp_defs_param_parse(const tp_defs_param_t *p, const char *s, tp_defs_value_t *out,
                         const char **why) TP_WUR;

/* "@covers PARAM >= DURATION": Postgres holds rows back to now - max_age_ms; a
 * request whose PARAM (DATE or TIMESTAMP) is earlier goes to the warehouse. */
typedef struct tp_defs_cover {
    size_t param;       /* index into params[] */
    int64_t max_age_ms;
    int line;
} tp_defs_cover_t;

typedef struct tp_defs_dataset {
    char *name;
    tp_defs_param_t *params; /* in declaration order */
    size_t n_params;
    char **requires;         /* sync job names */
    int *requires_line;
    size_t n_requires;
    int64_t max_staleness_ms; /* 0 = none */
    tp_defs_cover_t *covers;
    size_t n_covers;
    int64_t cache_ms;         /* 0 = not cached */
    char **roles;             /* empty = no restriction beyond authentication */
    size_t n_roles;
    bool obo;
    char *description;        /* NULL if none */
    bool has_pg, has_wh;      /* which bodies exist (at least one) */
    tp_defs_body_t pg;        /* Postgres body, $n markers; zeroed when !has_pg */
    tp_defs_body_t wh;        /* warehouse body, :name markers; zeroed when !has_wh */
} tp_defs_dataset_t;

/* Index of the first @covers rule the request reaches past (it must then go to
 * the warehouse), or -1. values[i] is the request's value of params[i] (defaults
 * applied); NULL values never exceed a rule. now_ms is wall-clock time. */
int tp_defs_covers_exceeded(const tp_defs_dataset_t *ds, const tp_defs_value_t *values,
                            int64_t now_ms);
/* Index of the parameter called name, or -1. */
int tp_defs_param_find(const tp_defs_dataset_t *ds, const char *name);

/* ---- sets and loading ---- */

typedef struct tp_defs_set {
    tp_defs_job_t *jobs;         /* sorted by name */
    size_t n_jobs;
    tp_defs_dataset_t *datasets; /* sorted by name */
    size_t n_datasets;
} tp_defs_set_t;

/* Problems found while loading, each "file:line: message", in file order. */
typedef struct tp_defs_diag {
    char **msgs;
    size_t n;
} tp_defs_diag_t;

/* Frees the messages and empties d (d itself is the caller's; NULL is a no-op). */
void tp_defs_diag_free(tp_defs_diag_t *d);

/* Returns a new empty set (owned by the caller; free with tp_defs_set_free). */
tp_defs_set_t *tp_defs_set_new(void);
/* Frees s and everything reachable from it; NULL is a no-op. */
void tp_defs_set_free(tp_defs_set_t *s);

/* Loads every NAME.sql in dir as a sync job into s. Files not ending in .sql,
 * dot files and subdirectories are ignored. Returns false when anything was
 * wrong (one message or more appended to diag); s then holds only the files
 * that were valid, so callers normally discard it. May be called again with
 * another directory: a name or target already in s is an error. */
bool tp_defs_load_jobs(tp_defs_set_t *s, const char *dir, tp_defs_diag_t *diag) TP_WUR;
/* Same for datasets: NAME.sql (Postgres), NAME.warehouse.sql (twin or alone). */
bool tp_defs_load_datasets(tp_defs_set_t *s, const char *dir, tp_defs_diag_t *diag) TP_WUR;

/* Cross-check once both kinds are loaded (they may be the same set): every
 * dataset @requires names a job of jobs. Appends "file:line: ..." per miss. */
bool tp_defs_check_requires(const tp_defs_set_t *datasets, const tp_defs_set_t *jobs,
                            tp_defs_diag_t *diag) TP_WUR;

/* Lookup by name (binary search); NULL if absent. Borrowed from the set. */
const tp_defs_job_t *tp_defs_job_find(const tp_defs_set_t *s, const char *name);
const tp_defs_dataset_t *tp_defs_dataset_find(const tp_defs_set_t *s, const char *name);

/* Scans one SQL body (exposed for tests and tools). dialect_pg selects Postgres
 * lexing (E'' strings, "" identifiers, $tag$ quotes, nested comments) versus
 * the warehouse's ('' and "" strings with backslash escapes, `` identifiers).
 * With rewrite, :name becomes $n. On success fills out->sql and out->names
 * (out->path, line and index untouched). On failure returns false with
 * *err_line (line within text, 1-based) and a message in err. */
bool tp_defs_scan_body(const char *text, bool dialect_pg, bool rewrite, tp_defs_body_t *out,
                       int *err_line, char *err, size_t errlen) TP_WUR;
/* Frees what b owns (path, sql, names, index) and zeroes it; NULL is a no-op. */
void tp_defs_body_free(tp_defs_body_t *b);

#endif
