/* Asynchronous Databricks SQL warehouse client (Statement Execution API 2.0,
 * /work/shared/databricks-protocol.md sections 1 and 2) on libevent through
 * libcurl's multi-socket interface: one tp_wh_t per event_base (per thread).
 *
 * A statement is submitted with tp_wh_submit(); the client posts it, polls to
 * a terminal state (capped backoff with jitter), then streams the result to
 * the consumer chunk by chunk: on_manifest once, then on_rows (JSON_ARRAY) or
 * on_csv (CSV) for every piece, then on_done exactly once. Only one chunk is
 * held at a time; a consumer that cannot keep up calls tp_wh_pause() and later
 * tp_wh_resume(). Auth: personal access token, OAuth M2M (client credentials,
 * token cached and refreshed ahead of expiry, one refresh in flight), or a
 * per-statement bearer token (on-behalf-of). Tokens, secrets and external link
 * URLs are never logged nor put in error messages.
 *
 * Threading: a tp_wh_t and its statements belong to the thread running its
 * event_base; nothing here is thread-safe. Callbacks are never called from
 * inside tp_wh_submit / tp_wh_cancel / tp_wh_pause / tp_wh_resume (always
 * from the event loop), so a callback may call any of them. */
#ifndef TIDEPOOL_WH_H
#define TIDEPOOL_WH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tidepool/util.h"

struct event_base;

typedef struct tp_wh tp_wh_t;
typedef struct tp_wh_stmt tp_wh_stmt_t;

/* ---- client configuration ---- */

typedef struct tp_wh_config {
    /* Workspace URL (DATABRICKS_HOST). Normalised: "https://" added when there is
     * no scheme, path, trailing "/" and ":443" dropped; "http://" is kept as
     * given (the local emulator speaks plain HTTP). Required. */
    const char *host;
    const char *warehouse_id; /* required */
    /* Auth: token (PAT, "Authorization: Bearer <token>") wins when set; else
     * client_id + client_secret select OAuth M2M against <host>/oidc/v1/token.
     * Neither: every statement must carry its own bearer_token. */
    const char *token;
    const char *client_id;
    const char *client_secret;
    const char *oauth_scope;  /* NULL = "all-apis" */
    const char *workspace_id; /* sent as X-Databricks-Workspace-Id when set */
    const char *ca_file;      /* extra CA bundle for TLS verification; NULL = system */
    /* Timeouts and pacing (milliseconds; tp_wh_config_init sets the defaults). */
    int64_t connect_timeout_ms; /* TCP+TLS connect, default 10 s */
    int64_t request_timeout_ms; /* whole HTTP exchange for API calls, default 60 s */
    int64_t stall_timeout_ms;   /* result download with no byte received (not counting
                                   time paused by the consumer), default 60 s */
    int64_t poll_initial_ms;    /* first status poll delay, default 100 ms */
    int64_t poll_max_ms;        /* poll backoff cap, default 5 s (x1.5 per poll, +-20% jitter) */
    int64_t retry_budget_ms;    /* total time spent retrying one call, default 120 s */
    int64_t retry_max_ms;       /* cap of one retry delay (besides Retry-After), default 10 s */
    int64_t unknown_state_ms;   /* an unknown status.state is tolerated this long, default 60 s */
    int64_t statement_timeout_ms; /* default overall limit per statement; 0 = none */
    int64_t max_response_bytes; /* cap for one buffered API response body, default 64 MiB */
    int64_t rows_per_batch;     /* rows per on_rows call at most, default 1024 */
    int64_t max_connections;    /* connections to one host at a time (more transfers queue;
                                   HTTP/2 multiplexes over them), default 64 */
} tp_wh_config_t;

/* Fills c with defaults and NULL strings. Cannot fail. */
void tp_wh_config_init(tp_wh_config_t *c);
/* Fills the string fields of c that are still NULL from DATABRICKS_HOST,
 * DATABRICKS_WAREHOUSE_ID, DATABRICKS_TOKEN, DATABRICKS_CLIENT_ID,
 * DATABRICKS_CLIENT_SECRET, DATABRICKS_WORKSPACE_ID (pointers borrow the
 * environment; empty variables count as unset). Cannot fail. */
void tp_wh_config_from_env(tp_wh_config_t *c);

/* Normalises a workspace host as described for tp_wh_config.host (surrounding
 * blanks, any path, query and trailing slashes are dropped, as the Databricks
 * SDKs do). Returns a heap string the caller frees, or NULL with *err set to a
 * heap message (caller frees) for an empty host, a scheme other than http or
 * https, or a host with user info or blanks. */
char *tp_wh_normalize_host(const char *host, char **err) TP_WUR;

/* Reads a non-2xx answer body in any of the forms Databricks and the proxies in
 * front of it use (§1.11): {"error_code": string|number, "message"}, legacy
 * {"error": ...}, OAuth {"error", "error_description"}, SCIM {"detail"},
 * "CODE: message" text, object-store XML, or an HTML page (its <title>). Sets
 * *code (NULL if none) and *msg (never NULL; one line, bounded); the caller
 * frees both. */
void tp_wh_error_body(const char *body, size_t len, char **code, char **msg);

/* Creates a client on base (which must outlive it). Copies everything it needs
 * from cfg. Returns NULL with *err set (heap string, caller frees) when the
 * configuration is invalid (missing host or warehouse id, half of an OAuth pair,
 * bad host). Logs a warning when libcurl lacks asynchronous DNS. */
tp_wh_t *tp_wh_new(struct event_base *base, const tp_wh_config_t *cfg, char **err) TP_WUR;
/* Frees the client: transfers are removed from curl before the multi handle is
 * cleaned up, which happens here (while the event_base still exists). Statements
 * still in flight are abandoned: not cancelled at the server, their on_done is
 * NOT called and their handles become invalid. Call it from outside any
 * callback of this client. NULL is a no-op. */
void tp_wh_free(tp_wh_t *wh);
/* The normalised host ("https://example.cloud.databricks.com"); owned by wh. */
const char *tp_wh_host(const tp_wh_t *wh);
/* Number of statements submitted and not yet done. */
size_t tp_wh_inflight(const tp_wh_t *wh);

/* ---- statements ---- */

typedef enum tp_wh_disposition {
    TP_WH_INLINE = 0,
    TP_WH_EXTERNAL_LINKS,
} tp_wh_disposition_t;

typedef enum tp_wh_format {
    TP_WH_JSON_ARRAY = 0,
    TP_WH_CSV,
} tp_wh_format_t;

typedef enum tp_wh_on_wait {
    TP_WH_ON_WAIT_CONTINUE = 0,
    TP_WH_ON_WAIT_CANCEL,
} tp_wh_on_wait_t;

/* wait_timeout_s value meaning "do not send wait_timeout" (server default 10s). */
#define TP_WH_WAIT_OMIT (-1)

/* A named parameter (":name" in the SQL). value NULL = SQL NULL (sent as JSON
 * null); type NULL = not sent (the server treats the value as STRING); type is
 * a SQL type string such as "INT", "DATE", "DECIMAL(10,2)". */
typedef struct tp_wh_param {
    const char *name;
    const char *value;
    const char *type;
} tp_wh_param_t;

typedef struct tp_wh_column {
    const char *name;
    const char *type_name; /* open set: unknown names are passed through as given */
    const char *type_text; /* e.g. "DECIMAL(18,2)", "ARRAY<INT>"; "" when absent */
    const char *interval_type; /* "DAY TO SECOND" for INTERVAL, else NULL */
    int position;  /* 0-based */
    int precision; /* type_precision, -1 when absent */
    int scale;     /* type_scale, -1 when absent */
} tp_wh_column_t;

typedef struct tp_wh_manifest {
    const tp_wh_column_t *columns;
    size_t n_columns;
    tp_wh_format_t format;
    int64_t total_chunk_count;
    int64_t total_row_count;
    int64_t total_byte_count; /* -1 when absent (INLINE) */
    bool truncated;           /* row_limit/byte_limit cut the result */
} tp_wh_manifest_t;

/* A batch of JSON_ARRAY rows, all from one chunk. cells holds n_rows * n_cols
 * pointers, row-major; a cell is NUL-terminated text (lens[i] bytes, may hold
 * NUL from \u0000) or NULL for SQL NULL. Valid only during the callback. */
typedef struct tp_wh_rows {
    size_t n_rows;
    size_t n_cols;
    const char *const *cells;
    const size_t *lens;
    int64_t chunk_index;
    int64_t row_offset; /* result row number of the first row in this batch */
} tp_wh_rows_t;

/* A piece of CSV (RFC 4180, NULL written as the bare text null) exactly as the
 * warehouse sent it. Concatenating every piece in order gives the whole result;
 * only chunk 0 starts with a header row (header_chunk is true for its pieces).
 * Valid only during the callback. */
typedef struct tp_wh_csv {
    const char *data;
    size_t len;
    int64_t chunk_index;
    bool header_chunk;
    bool chunk_start; /* first piece of this chunk */
} tp_wh_csv_t;

typedef enum tp_wh_status {
    TP_WH_SUCCEEDED = 0, /* every row was delivered and checked against the manifest */
    TP_WH_FAILED,        /* the warehouse says FAILED: error_code, message, sql_state */
    TP_WH_CANCELED,      /* cancelled (tp_wh_cancel, on_wait_timeout=CANCEL, or by others) */
    TP_WH_CLOSED,        /* the warehouse says CLOSED: results no longer fetchable */
    TP_WH_ERROR,         /* client-side failure, see tp_wh_errkind_t */
} tp_wh_status_t;

typedef enum tp_wh_errkind {
    TP_WH_ERR_NONE = 0,
    TP_WH_ERR_HTTP,      /* non-2xx answer (error_code/message parsed from its body) */
    TP_WH_ERR_AUTH,      /* 401/403, token endpoint refused or failed */
    TP_WH_ERR_TRANSPORT, /* connection failed, reset, TLS error, retry budget spent */
    TP_WH_ERR_TIMEOUT,   /* a call or the statement deadline timed out */
    TP_WH_ERR_PROTOCOL,  /* malformed JSON, missing field, row count mismatch, truncated chunk */
    TP_WH_ERR_CONSUMER,  /* a consumer callback returned false */
    TP_WH_ERR_REQUEST,   /* the request was invalid before anything was sent */
} tp_wh_errkind_t;

/* How a statement ended. In on_done the strings are owned by the client and
 * valid during the callback; tp_wh_result_copy makes an owned copy. */
typedef struct tp_wh_result {
    tp_wh_status_t status;
    tp_wh_errkind_t kind;  /* TP_WH_ERR_NONE unless status == TP_WH_ERROR */
    char *statement_id;    /* NULL if the warehouse never accepted the statement */
    char *error_code;      /* status.error.error_code or the HTTP body's (numbers as text); NULL if none */
    char *message;         /* precise, one line, secret-free; NULL on success */
    char *sql_state;       /* status.sql_state, NULL if absent */
    int http_status;       /* status of the failing HTTP exchange, 0 if none */
    int64_t chunk_index;   /* chunk the failure concerns, -1 if none */
    int64_t rows;          /* rows delivered to the consumer (CSV: data records, header excluded) */
    int64_t chunks;        /* chunks fully delivered */
    bool truncated;        /* manifest.truncated */
} tp_wh_result_t;

/* Deep-copies src into dst (dst's previous content is not freed). */
void tp_wh_result_copy(tp_wh_result_t *dst, const tp_wh_result_t *src);
/* Frees the strings of a result filled by tp_wh_result_copy or tp_wh_run and zeroes it. */
void tp_wh_result_clear(tp_wh_result_t *r);
/* "SUCCEEDED", "FAILED", "CANCELED", "CLOSED", "ERROR". */
const char *tp_wh_status_name(tp_wh_status_t s);

/* Consumer callbacks. A callback returning false stops the statement: the
 * client cancels it at the warehouse (best effort) and on_done reports
 * TP_WH_ERROR / TP_WH_ERR_CONSUMER. on_manifest is called once, before any
 * rows, only when the statement SUCCEEDED. */
typedef bool (*tp_wh_manifest_fn)(tp_wh_stmt_t *st, const tp_wh_manifest_t *m, void *arg);
typedef bool (*tp_wh_rows_fn)(tp_wh_stmt_t *st, const tp_wh_rows_t *rows, void *arg);
typedef bool (*tp_wh_csv_fn)(tp_wh_stmt_t *st, const tp_wh_csv_t *csv, void *arg);
/* Called exactly once per submitted statement; the handle is freed right after
 * it returns (do not keep st). */
typedef void (*tp_wh_done_fn)(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg);

typedef struct tp_wh_request {
    const char *sql; /* required */
    const tp_wh_param_t *params;
    size_t n_params;
    const char *catalog; /* NULL = not sent */
    const char *schema;  /* NULL = not sent */
    int64_t row_limit;   /* 0 = not sent */
    int64_t byte_limit;  /* 0 = not sent */
    tp_wh_disposition_t disposition;
    tp_wh_format_t format;
    int wait_timeout_s;  /* 0 (async) or 5..50; TP_WH_WAIT_OMIT = not sent. Default 10 */
    tp_wh_on_wait_t on_wait_timeout; /* sent only when wait_timeout_s > 0 */
    /* On-behalf-of: when set, this bearer token replaces the client's auth for
     * every API call of this statement (never for external links). Copied;
     * never logged. A 401/403 ends the statement with TP_WH_ERR_AUTH. */
    const char *bearer_token;
    int64_t timeout_ms; /* overall deadline; 0 = config statement_timeout_ms. On expiry
                           the statement is cancelled and ends with TP_WH_ERR_TIMEOUT. */
    const char *label;  /* for logs (e.g. the sync job name); copied; may be NULL */
    tp_wh_manifest_fn on_manifest; /* optional */
    tp_wh_rows_fn on_rows;         /* required for JSON_ARRAY */
    tp_wh_csv_fn on_csv;           /* required for CSV */
    tp_wh_done_fn on_done;         /* required */
    void *arg;
} tp_wh_request_t;

/* Defaults: INLINE, JSON_ARRAY, wait_timeout 10 s, CONTINUE, no limits. */
void tp_wh_request_init(tp_wh_request_t *r);

/* Submits a statement. Everything in req is copied. Returns the handle, or NULL
 * with *err (heap string, caller frees) when the request is invalid (no SQL, no
 * on_done, missing row/CSV callback, parameter without a name, wait_timeout out
 * of range, no auth at all). On success on_done will be called exactly once,
 * later, from the event loop. POST /statements is retried only when it cannot
 * have run: the connection failed before the request was sent, or the answer
 * was 429/503 (or 401 with OAuth, after one forced token refresh). */
tp_wh_stmt_t *tp_wh_submit(tp_wh_t *wh, const tp_wh_request_t *req, char **err) TP_WUR;

/* Asks to stop the statement. Once the warehouse has its id, POST .../cancel is
 * sent and polling continues until a terminal state; on_done then reports
 * TP_WH_CANCELED (also when the statement won the race and SUCCEEDED: no rows
 * are delivered then, and the message says so), or TP_WH_FAILED if it failed
 * first. Not yet sent (waiting for a token or a retry): ends CANCELED without
 * sending. Already streaming: the download stops and on_done reports
 * TP_WH_CANCELED. After this call no on_manifest/on_rows/on_csv is made.
 * Idempotent; a no-op once on_done has been scheduled. */
void tp_wh_cancel(tp_wh_stmt_t *st);

/* Back-pressure: after tp_wh_pause no further on_rows/on_csv call is made (the
 * download is paused; at most one network read already in hand stays buffered)
 * until tp_wh_resume. Polling, cancel and deadlines keep running while paused;
 * the stall timeout does not count paused time. Both are idempotent. */
void tp_wh_pause(tp_wh_stmt_t *st);
void tp_wh_resume(tp_wh_stmt_t *st);

/* The statement id once the warehouse returned one, else NULL. Owned by st. */
const char *tp_wh_stmt_id(const tp_wh_stmt_t *st);

/* ---- other workspace REST calls (e.g. Lakebase credentials, lib/lakebase.c) ---- */

typedef struct tp_wh_api tp_wh_api_t;
/* Called once per tp_wh_api_post, from the event loop: http is the final
 * status (0 if none); on 2xx body/len is the answer (borrowed for the call) and
 * err NULL; otherwise body is NULL and err a one-line, secret-free message
 * ("POST /api/...: HTTP 404: NOT_FOUND: ...") with kind saying why. The handle
 * is freed before the callback runs. */
typedef void (*tp_wh_api_cb)(int http, const char *body, size_t len, const char *err,
                             tp_wh_errkind_t kind, void *arg);

/* POSTs json_body (NULL = "{}") to host + path (e.g. "/api/2.0/database/credentials")
 * with the client's own credentials (PAT or OAuth M2M: the token cache, its
 * refresh-on-401 and the retry policy of idempotent calls apply; the call is
 * treated as idempotent, so only use it for requests that are safe to repeat).
 * Never calls cb from inside this function. Returns a handle for
 * tp_wh_api_cancel; never NULL. Answers above 64 KiB are cut. */
tp_wh_api_t *tp_wh_api_post(tp_wh_t *wh, const char *path, const char *json_body, tp_wh_api_cb cb,
                            void *arg);
/* Drops a call not yet completed: cb will not run. Must not be called after cb ran. */
void tp_wh_api_cancel(tp_wh_api_t *call);
/* True when the client has its own credentials (a PAT or an OAuth client). */
bool tp_wh_has_auth(const tp_wh_t *wh);

/* ---- blocking wrapper (command-line tools and tests; never on a server loop) ---- */

/* Runs one statement to completion on a private event_base and client built
 * from cfg; req's callbacks are called from inside this function. Fills *out
 * (owned; free with tp_wh_result_clear) and returns true iff the status is
 * TP_WH_SUCCEEDED. A configuration or request error is reported in *out as
 * TP_WH_ERROR / TP_WH_ERR_REQUEST. */
bool tp_wh_run(const tp_wh_config_t *cfg, const tp_wh_request_t *req, tp_wh_result_t *out) TP_WUR;

#endif
