/* tidepool-warehouse private declarations shared by the emulator's modules:
 * the global state (options, statement table, tokens, faults), statements and
 * their materialised results, and the functions each module offers the others.
 * Nothing here is used outside emulator/. */
#ifndef TIDEPOOL_EMU_H
#define TIDEPOOL_EMU_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/http.h>

#include "tidepool/util.h"

#define EMU_STMT_MAGIC 0x57484d54u   /* "WHMT" */
#define EMU_DEFER_MAGIC 0x57484446u  /* "WHDF" */
#define EMU_MAX_STATEMENT (16u << 20) /* 16 MiB of SQL text */
#define EMU_INLINE_LIMIT (25u << 20)  /* INLINE results above this fail */
#define EMU_MAX_WORKERS 128
#define EMU_LINK_PREFIX "/_tp_blob/"
#define EMU_LINK_HEADER "x-tp-link-key"

typedef enum emu_state {
    EMU_PENDING,
    EMU_RUNNING,
    EMU_SUCCEEDED,
    EMU_FAILED,
    EMU_CANCELED,
    EMU_CLOSED,
} emu_state_t;

typedef enum emu_format { EMU_FMT_JSON, EMU_FMT_CSV, EMU_FMT_ARROW } emu_format_t;
typedef enum emu_disp { EMU_INLINE, EMU_LINKS } emu_disp_t;

/* How a column's text cells are rewritten into Databricks' form. */
typedef enum emu_cell {
    EMU_CELL_PLAIN,
    EMU_CELL_BOOL,
    EMU_CELL_TSTZ,  /* "2021-01-01 10:00:00+00" -> "2021-01-01T10:00:00.000Z" */
    EMU_CELL_TS,    /* same without the offset */
    EMU_CELL_BYTEA, /* "\x0102" -> "0102" */
    EMU_CELL_ARRAY, /* Postgres array literal -> JSON text */
} emu_cell_t;

typedef struct emu_column {
    char *name;
    char *type_text;
    const char *type_name;
    int precision, scale;      /* DECIMAL only (precision > 0) */
    const char *interval_type; /* INTERVAL only */
    emu_cell_t cell;
} emu_column_t;

typedef struct emu_chunk {
    int64_t row_offset;
    int64_t row_count;
    size_t len;
    char *data; /* JSON array of arrays, or CSV text */
} emu_chunk_t;

typedef struct emu_link {
    char token[33];
    char key[33];
    int chunk;
    int64_t expires_wall_ms;
    struct emu_link *next;
} emu_link_t;

struct emu_defer;

typedef struct emu_stmt {
    uint32_t magic;
    char id[40];
    /* request (immutable after creation) */
    char *sql; /* bridged to Postgres */
    int nparams;
    char **param_values; /* NULL entries are SQL NULL */
    char *schema;
    char *unbound_param; /* a :name in the text with no parameter given */
    emu_format_t format;
    emu_disp_t disp;
    int64_t row_limit; /* -1 = none */
    int64_t byte_limit;
    /* guarded by g.mu */
    emu_state_t state;
    bool thread_done;
    /* result: written by the worker before it publishes a terminal state */
    bool has_manifest;
    int ncols;
    emu_column_t *cols;
    int nchunks;
    emu_chunk_t *chunks;
    int64_t total_rows;
    int64_t total_bytes;
    bool truncated;
    char *err_code, *err_msg, *sql_state;
    /* control */
    atomic_bool cancel;
    pthread_t thread;
    bool thread_started, joined;
    int64_t created_ms, finished_ms; /* monotonic */
    /* loop thread only */
    struct emu_defer *waiters;
    emu_link_t *links;
    struct emu_stmt *next;
} emu_stmt_t;

/* A request held open: waiting for a statement (wait_timeout) or for injected latency. */
typedef struct emu_defer {
    uint32_t magic;
    struct evhttp_request *req;
    struct evhttp_connection *evcon;
    struct event *timer;
    emu_stmt_t *stmt; /* for statement waits */
    bool cancel_on_timeout;
    int64_t t0_us;
    struct emu_defer *next; /* in stmt->waiters */
} emu_defer_t;

typedef struct emu_fault_status {
    int code;
    int remaining;
    char cls[16]; /* "" = any */
} emu_fault_status_t;

/* A fault that answers the next `remaining` requests of class cls ("" = any
 * but the token endpoint) its own way. */
typedef struct emu_fault_count {
    int remaining;
    char cls[16];
} emu_fault_count_t;

typedef struct emu_faults {
    int latency_ms;
    char latency_cls[16];
    emu_fault_status_t status[8];
    int nstatus;
    int retry_after; /* seconds; 0 = header omitted (429 defaults to 1) */
    int drop_chunk;
    int truncate_chunk;
    int expire_links; /* -1 = every link, >0 = the next N */
    int token_fail;
    int token_fail_code;
    emu_fault_count_t proxy_page; /* a proxy's HTML 502 page */
    emu_fault_count_t bad_json;   /* HTTP 200 with cut-off JSON */
    emu_fault_count_t bad_state;  /* statement answers in state EXPLODING */
} emu_faults_t;

typedef struct emu_token {
    char token[72];
    int64_t expires_ms; /* monotonic */
    char *scope;
    struct emu_token *next;
} emu_token_t;

typedef struct emu_global {
    /* options */
    char *listen_addr;
    int listen_port;
    char *dsn;
    char **pats;
    int npats;
    char **client_ids, **client_secrets;
    int nclients;
    char **warehouses;
    int nwarehouses;
    int64_t token_ttl_s, link_ttl_s, result_ttl_s, forget_ttl_s;
    int64_t chunk_rows, chunk_bytes;
    char *lakebase_role;    /* --lakebase-role; NULL = credential endpoints off */
    int64_t lakebase_ttl_s; /* --lakebase-ttl */
    /* runtime */
    struct event_base *base;
    struct evhttp *http;
    struct event *done_ev;
    pthread_mutex_t mu;
    emu_stmt_t *stmts;
    int live_workers;
    emu_token_t *tokens;
    emu_faults_t faults;
    bool stopping;
} emu_global_t;

extern emu_global_t g;

/* ---- bridge.c: SQL dialect and parameters ---- */
typedef struct emu_param {
    const char *name;
    const char *value; /* NULL = SQL NULL */
    const char *type;  /* NULL = STRING */
} emu_param_t;

/* Maps a Databricks parameter type ("INT", "DECIMAL(10,2)") to a Postgres cast
 * target written into out; false if the type is not supported. */
bool emu_param_pgtype(const char *type, char *out, size_t outlen) TP_WUR;
/* Rewrites Databricks SQL into Postgres SQL: drops the catalog of three-part
 * names, turns backticks into double quotes and :name markers into $n::type
 * (one $n per distinct name, in first-use order, written to *order as indexes
 * into params). String literals and comments are untouched. Returns the new
 * text (caller frees); *unbound gets the first marker without a parameter
 * (caller frees) or NULL. */
char *emu_bridge_sql(const char *sql, const emu_param_t *params, int nparams, int *order,
                     int *norder, char **unbound);

/* ---- result.c: type mapping, cell formats, chunk building ---- */
/* Fills type fields of col from a Postgres type oid and typmod. */
void emu_column_map(emu_column_t *col, unsigned int oid, int typmod);
/* Frees the strings of col (not col itself). */
void emu_column_free(emu_column_t *col);

typedef struct emu_builder {
    emu_stmt_t *st;
    tp_buf_t cur;
    tp_buf_t row;
    int64_t cur_rows;
    int64_t cur_offset;
    size_t cap_chunks;
    bool stop; /* a limit was hit */
} emu_builder_t;

/* Starts building st's chunks (st->format, ->cols, ->row_limit, ->byte_limit set). */
void emu_builder_init(emu_builder_t *b, emu_stmt_t *st);
/* Adds one row of text cells (NULL = SQL NULL). */
void emu_builder_row(emu_builder_t *b, char *const *cells);
/* Closes the last chunk. */
void emu_builder_finish(emu_builder_t *b);
/* Frees the builder's buffers (the chunks belong to the statement). */
void emu_builder_free(emu_builder_t *b);

/* ---- stmt.c: statements, workers, JSON answers ---- */
/* Creates a statement from a validated request, links it into g.stmts and
 * starts its worker. Takes ownership of sql, values (nvalues strings or NULLs)
 * and unbound; copies schema. Never NULL: a thread that cannot start gives a
 * FAILED statement. Loop thread only. */
emu_stmt_t *emu_stmt_start(char *sql, char **values, int nvalues, const char *schema,
                           char *unbound, emu_format_t fmt, emu_disp_t disp, int64_t row_limit,
                           int64_t byte_limit);
/* The live statement with this id, or NULL (unknown or forgotten); borrowed. */
emu_stmt_t *emu_stmt_find(const char *id);
/* The current state, read under g.mu (workers change it). */
emu_state_t emu_stmt_state(emu_stmt_t *st);
/* SUCCEEDED, FAILED, CANCELED and CLOSED are terminal. */
bool emu_state_terminal(emu_state_t s);
/* "PENDING" ... "CLOSED", as the API spells them. */
const char *emu_state_name(emu_state_t s);
/* Cancels (state CANCELED at once when not terminal); close=true marks it CLOSED. */
void emu_stmt_cancel(emu_stmt_t *st, bool close);
/* Writes the StatementResponse JSON; host is used for external links. */
void emu_stmt_response(emu_stmt_t *st, const char *host, tp_buf_t *out);
/* Writes the ResultData for chunk idx (must be valid and the statement SUCCEEDED). */
void emu_stmt_chunk_json(emu_stmt_t *st, int idx, const char *host, tp_buf_t *out);
/* Joins finished workers and answers their waiters; called on the loop when a
 * worker signals g.done_ev. */
void emu_stmt_reap(void);
/* Once a second: closes results older than --result-ttl, forgets terminal
 * statements older than --forget-ttl, drops long-expired links. */
void emu_stmt_janitor(void);
/* At exit: cancels every running statement, joins all workers, frees all. */
void emu_stmt_shutdown(void);

/* ---- http.c ---- */
/* Creates the evhttp server on g.base and binds --listen; false (logged) if it cannot. */
bool emu_http_start(void) TP_WUR;
/* Frees the server; held requests are dropped (their close callbacks free them). */
void emu_http_stop(void);
/* Answers a held statement waiter with the statement's current response and
 * frees it; the caller has already unlinked it from the statement. */
void emu_defer_answer(emu_defer_t *d);
/* Frees a held request's bookkeeping without answering; NULL is a no-op. */
void emu_defer_free(emu_defer_t *d);

/* ---- faults.c ---- */
/* Parses SPEC into *out (zeroed first); on error writes a message into err. */
bool emu_faults_parse(const char *spec, emu_faults_t *out, char *err, size_t errlen) TP_WUR;
/* Appends the faults (remaining counters) as a JSON object. */
void emu_faults_describe(const emu_faults_t *f, tp_buf_t *out);
/* If an injected status applies to class cls, consumes it and returns the code, else 0. */
int emu_faults_take_status(const char *cls);
/* Consumes one answer of f when it applies to request class cls; true if it fired. */
bool emu_faults_take_count(emu_fault_count_t *f, const char *cls);
/* Milliseconds of injected latency for class cls (0 = none). */
int emu_faults_latency(const char *cls);
/* Consumes one unit of a countdown fault; true if it fired. */
bool emu_faults_take(int *counter);

/* ---- lakebase.c ---- */
/* Handles POST /api/2.0/database/credentials (autoscaling false) and
 * /api/2.0/postgres/credentials (true) for an authenticated caller: writes the
 * JSON answer into out and the HTTP status into *code. */
void emu_lakebase_credentials(const char *body, size_t len, bool autoscaling, tp_buf_t *out,
                              int *code);

/* ---- oauth.c ---- */
/* Handles POST /oidc/v1/token: writes the JSON body into out and the HTTP status into *code. */
void emu_oauth_token(struct evhttp_request *req, tp_buf_t *out, int *code);
/* Writes the discovery document, with endpoints on http://host. */
void emu_oauth_discovery(struct evhttp_request *req, const char *host, tp_buf_t *out);
/* True if token is an accepted PAT or a live OAuth token. */
bool emu_auth_valid(const char *token);
/* Drops expired OAuth tokens / all of them at exit. */
void emu_oauth_prune(void);
void emu_oauth_free(void);

#endif
