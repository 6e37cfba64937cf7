/* Write-back core (DESIGN §10, docs/writeback.md): writable tables declared by a
 * "@writable ..." table comment and reflected from pg_catalog into an immutable,
 * reference-counted snapshot; validation of a request against the reflected
 * columns; one precompiled SQL statement per table and operation that does the
 * idempotency check, version check, write, audit_log and writeback_outbox rows
 * and builds the response in a single round trip; and the mapping of its result
 * (or error) to the HTTP answer. No libevent, no HTTP: the server feeds requests
 * in and sends the statement through its own pool (tp_pgpool_query). */
#ifndef TIDEPOOL_WRITEBACK_H
#define TIDEPOOL_WRITEBACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "tidepool/util.h"

/* How a column's JSON value is checked before it reaches Postgres. */
typedef enum tp_wb_kind {
    TP_WB_INT2,
    TP_WB_INT4,
    TP_WB_INT8,
    TP_WB_NUMERIC,
    TP_WB_FLOAT,
    TP_WB_BOOL,
    TP_WB_TEXT, /* text, varchar(n), char(n): max_chars when limited */
    TP_WB_DATE,
    TP_WB_TIMESTAMPTZ, /* RFC 3339 with an offset */
    TP_WB_TIMESTAMP,   /* without an offset */
    TP_WB_UUID,
    TP_WB_JSON, /* json or jsonb: any JSON value; JSON null is SQL NULL */
    TP_WB_OTHER /* anything else: a string in Postgres's text form */
} tp_wb_kind_t;

typedef struct tp_wb_col {
    char *name;
    char *type_sql; /* format_type(), used in casts: "character varying(200)" */
    tp_wb_kind_t kind;
    int max_chars; /* varchar(n) / char(n); -1 = unlimited */
    bool not_null;
    bool has_default;     /* a default, identity or generated value exists */
    char *default_sql;    /* pg_get_expr of the default, or NULL */
    const char *readonly; /* why clients may not write it ("identity", "version", ...) or NULL */
    int pk_pos;           /* position in the primary key, -1 if not part of it */
} tp_wb_col_t;

/* A unique, primary key, foreign key, check or exclusion constraint, kept so that a
 * Postgres error can name the columns it concerns. */
typedef struct tp_wb_cons {
    char *name;
    char type;     /* 'p' 'u' 'f' 'c' 'x' */
    char *columns; /* "a, b" ("" when the constraint names none) */
} tp_wb_cons_t;

typedef enum tp_wb_op {
    TP_WB_INSERT = 0, /* POST /tables/{t}: one object or an array of them */
    TP_WB_UPDATE,     /* PATCH /tables/{t}/{pk}, or bulk PATCH /tables/{t} with an array */
    TP_WB_DELETE,     /* DELETE /tables/{t}/{pk} */
    TP_WB_NOPS
} tp_wb_op_t;

#define TP_WB_TABLE_MAGIC 0x57425442u /* "WBTB" */

/* One writable table of a snapshot; read-only once reflected. */
typedef struct tp_wb_table {
    uint32_t magic;
    char *schema, *name;
    char *qualified; /* "app.user_notes", the name used in URLs, audit and outbox rows */
    tp_wb_col_t *cols;
    int ncols;
    int *pk; /* column indexes in key order */
    int npk;
    int version_col, owner_col, touch_col; /* column index, -1 if none */
    char **write_roles, **read_roles;      /* NULL-terminated */
    bool if_match_required;
    char *mirror; /* warehouse table catalog.schema.table, or NULL */
    tp_wb_cons_t *cons;
    int ncons;
    char *sql[TP_WB_NOPS]; /* the plans: TP_WB_NPARAMS parameters each, see tp_wb_prepare */
} tp_wb_table_t;

typedef struct tp_wb_schema tp_wb_schema_t;

/* Parses the "@writable key=value ..." directive of a table comment into t's option
 * fields (roles, if_match, mirror) and, for the column-naming keys, into the
 * NUL-separated lists *names_out (owner, version, touch, readonly: caller frees).
 * Returns 0 if the comment has no @writable, 1 if parsed, -1 on a bad token with
 * "TABLE: ..." in err naming it. Exposed for tests and --check. */
typedef struct tp_wb_decl {
    char **write_roles, **read_roles; /* NULL-terminated, owned */
    bool if_match_required;
    char *mirror, *owner, *version, *touch; /* owned or NULL */
    char **readonly;                        /* NULL-terminated, owned */
} tp_wb_decl_t;
int tp_wb_parse_comment(const char *table, const char *comment, tp_wb_decl_t *out, char *err,
                        size_t errlen) TP_WUR;
void tp_wb_decl_free(tp_wb_decl_t *d);

/* Reflects every table whose comment declares @writable, over a blocking connection
 * (run it off any event loop). Returns a snapshot holding one reference, or NULL with
 * err set ("app.notes: ..."): any bad declaration fails the whole reflection, so a
 * reload can keep the previous snapshot. */
tp_wb_schema_t *tp_wb_reflect(PGconn *conn, char *err, size_t errlen) TP_WUR;
/* Reference counting (thread-safe): a request holds a reference while its statement
 * runs; the last unref frees the snapshot. unref(NULL) is a no-op. */
tp_wb_schema_t *tp_wb_schema_ref(tp_wb_schema_t *s);
void tp_wb_schema_unref(tp_wb_schema_t *s);
/* Table by "schema.table" or, when unambiguous, bare "table"; NULL if not writable. */
const tp_wb_table_t *tp_wb_find(const tp_wb_schema_t *s, const char *name);
/* Number of writable tables, and the i-th (0-based; NULL out of range), e.g. for
 * the OpenAPI description. */
int tp_wb_count(const tp_wb_schema_t *s);
const tp_wb_table_t *tp_wb_table_at(const tp_wb_schema_t *s, int i);
/* True if role is one of the table's write roles (or, when !write, a read role or a
 * write role). NULL role: false. */
bool tp_wb_role_allowed(const tp_wb_table_t *t, const char *role, bool write);

/* Appends a JSON Schema (OpenAPI 3.1) object describing a row of t: each column's
 * type and limits, readOnly for server-filled columns, required for NOT NULL columns
 * without a default, additionalProperties false. For GET /openapi.json. */
void tp_wb_json_schema(const tp_wb_table_t *t, tp_buf_t *out);

/* ---- requests ---- */

typedef struct tp_wb_request {
    tp_wb_op_t op;
    const char *method; /* "POST", "PATCH", "DELETE" */
    const char *path;   /* the request path as received */
    const char *pk;     /* PATCH/DELETE: the raw (percent-encoded) URL segment; NULL = bulk PATCH */
    const char *body;   /* request body (may be NULL for DELETE) */
    size_t body_len;
    const char *if_match;   /* If-Match header or NULL */
    const char *idem_key;   /* Idempotency-Key header or NULL; the request hash it guards is
                               SHA-256 of method, path, If-Match and body */
    const char *actor;      /* authenticated principal, non-empty */
    const char *request_id; /* for audit_log; may be NULL */
    int64_t key_ttl_s;      /* how long an idempotency key is kept (>= 1) */
} tp_wb_request_t;

/* The HTTP answer: status, body (owned), content type, ETag (owned, may be NULL). */
typedef struct tp_wb_answer {
    int status;
    char *body;
    const char *content_type; /* "application/json" or "application/problem+json" */
    char *etag;
    int retry_after_s; /* > 0: send Retry-After */
    bool replayed;     /* answered from a stored idempotent response */
} tp_wb_answer_t;
void tp_wb_answer_free(tp_wb_answer_t *a);

#define TP_WB_CALL_MAGIC 0x57424341u /* "WBCA" */
#define TP_WB_NPARAMS 9              /* every plan takes the same nine parameters */

/* One statement to send: sql with nparams text values (NULL = SQL NULL; types are
 * given by casts in the SQL, so pass types = NULL). Owned by the caller. */
typedef struct tp_wb_call {
    uint32_t magic;
    const tp_wb_table_t *table; /* borrowed: hold a snapshot reference while the call lives */
    tp_wb_op_t op;
    const char *sql; /* borrowed from the table */
    int nparams;
    char *values[TP_WB_NPARAMS];
    const char *const *params; /* = values, typed for tp_pgpool_query */
    bool has_key;
    int attempts; /* sends so far; tp_wb_finish counts them */
} tp_wb_call_t;

/* Validates req against t (JSON body, columns, types, NOT NULL, lengths, read-only
 * columns, primary key in the URL, If-Match, Idempotency-Key) and, if it is valid,
 * returns true with *out = the statement to send. Otherwise returns false with *ans
 * the 4xx answer (400 malformed, 422 invalid values with errors[], 428 If-Match
 * required) and *out NULL; nothing must be sent then. */
bool tp_wb_prepare(const tp_wb_table_t *t, const tp_wb_request_t *req, tp_wb_call_t **out,
                   tp_wb_answer_t *ans) TP_WUR;

typedef enum tp_wb_next {
    TP_WB_ANSWER = 0, /* *ans is the reply to send */
    TP_WB_RESEND = 1  /* send call->sql again (a race on the idempotency key, or a
                         serialization failure: the first attempt wrote nothing) */
} tp_wb_next_t;

/* Turns the statement's outcome into the answer: res is its result (PGRES_TUPLES_OK
 * or an error result), or NULL with conn_err when the connection failed. On
 * TP_WB_RESEND *ans is untouched and the caller sends the same call again. */
tp_wb_next_t tp_wb_finish(tp_wb_call_t *call, const PGresult *res, const char *conn_err,
                          tp_wb_answer_t *ans);
void tp_wb_call_free(tp_wb_call_t *call);

/* Deletes up to $1 (text integer) expired idempotency keys; run it periodically
 * (daemon or server) until PQcmdTuples says fewer than $1 rows went. */
extern const char TP_WB_PURGE_SQL[];

/* ---- outbox shipper (tidepool-sync) ----
 * The daemon ships tidepool.writeback_outbox to the warehouse: tp_wb_ship_next reads
 * the next batch and builds one MERGE INTO statement for it; the daemon runs that on
 * the warehouse (tp_wh_submit: name/value/type map one to one onto tp_wh_param_t);
 * tp_wb_ship_done records the outcome. Order per key: a batch holds at most the
 * earliest unshipped change of each key, so a key's next change ships only after
 * the previous one is marked shipped. Idempotent: the MERGE applies full row images
 * (insert-or-update, delete-if-present), so shipping a change again after a crash
 * between the MERGE and tp_wb_ship_done leaves the warehouse table the same.
 * Only one shipper may run at a time: hold the advisory lock TP_WB_SHIP_LOCK
 * (pg_try_advisory_lock) on the connection used here. Both calls block: run them
 * on the daemon's own thread or connection, never on an event loop. */
#define TP_WB_SHIP_LOCK 0x7470776275LL /* pg_try_advisory_lock key */
/* Sent (empty payload, at commit) by every INSERT into tidepool.writeback_outbox
 * (migration 0004's trigger): a shipper LISTENs on it instead of polling. */
#define TP_WB_NOTIFY_CHANNEL "tidepool_outbox"
/* Milliseconds until the earliest unshipped row is due (negative: due now),
 * NULL when nothing is unshipped; one row, one column, no parameters. */
extern const char TP_WB_DUE_IN_SQL[];

typedef struct tp_wb_param {
    char *name;  /* without the ':' */
    char *value; /* NULL = SQL NULL */
    char *type;  /* Databricks type: INT, BIGINT, DECIMAL(30,10), STRING, TIMESTAMP, ... */
} tp_wb_param_t;

#define TP_WB_BATCH_MAGIC 0x57424241u /* "WBBA" */

typedef struct tp_wb_batch {
    uint32_t magic;
    char *table;           /* local table (schema.table) */
    char *warehouse_table; /* catalog.schema.table */
    char *sql;             /* MERGE INTO ... with :named parameters */
    tp_wb_param_t *params;
    size_t nparams;
    int64_t *ids; /* outbox ids this statement ships, ascending */
    size_t nids;
} tp_wb_batch_t;

/* Reads up to max_rows of the oldest unshipped outbox rows of one table and builds
 * the batch from the earliest due change of each key. Returns 1 with *out (owned),
 * 0 when nothing is due, -1 with err (e.g. the table is no longer @writable in s). */
int tp_wb_ship_next(PGconn *conn, const tp_wb_schema_t *s, int max_rows, tp_wb_batch_t **out,
                    char *err, size_t errlen) TP_WUR;
/* Records the outcome in one statement: ok marks the batch shipped (with the
 * warehouse statement id, may be NULL); !ok counts an attempt, keeps error (never a
 * secret: pass the warehouse's message) and schedules the retry with exponential
 * backoff and jitter (1 s doubling up to 5 min). */
bool tp_wb_ship_done(PGconn *conn, const tp_wb_batch_t *b, bool ok, const char *statement_id,
                     const char *error, char *err, size_t errlen) TP_WUR;
void tp_wb_batch_free(tp_wb_batch_t *b);
/* Count of unshipped outbox rows (the backlog for /api/v1/sync and /metrics): run
 * it with no parameters; one row, one column. */
extern const char TP_WB_BACKLOG_SQL[];

/* ---- pieces exposed for tests ---- */

/* Checks a value in text form for a column kind (URL primary keys, bulk keys);
 * NULL if fine, else a static message ("must be an integer between ..."). */
const char *tp_wb_check_text(tp_wb_kind_t kind, int max_chars, const char *s);
/* Splits a percent-encoded primary key segment ("a,b") into npk decoded values
 * (caller frees each and the array). False on a bad escape or the wrong count. */
bool tp_wb_split_pk(const char *seg, int npk, char ***out) TP_WUR;

#endif
