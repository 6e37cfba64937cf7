/* Fallback reads: dataset reads answered by the warehouse twin (DESIGN §9,
 * docs/fallback.md). Two parts:
 *
 * 1. tp_fb_route: the pure routing decision (Postgres or warehouse, and why)
 *    from a dataset, its request values and the sync_state facts the caller
 *    already holds.
 * 2. A statement registry on top of the warehouse client: one tp_fb_t per
 *    process (thread-safe; one mutex) and one tp_fb_loop_t per event loop
 *    (the loop's tp_wh_t runs the statements it starts). Identical concurrent
 *    requests share one statement (single flight); finished results are
 *    cached by dataset, parameters and, for @obo datasets, the caller; a limit
 *    of statements in flight answers TP_FB_BUSY beyond it; each requester gets
 *    a handle (128-bit random hex id) owned by its principal; waiters have a
 *    wait budget; a statement nobody waits for and nobody polled within
 *    abandon_ms is cancelled, and so is one whose last waiter left.
 *
 * Results are held in memory as text cells (at most max_result_bytes each)
 * and encoded on demand as JSON rows, JSON columns or CSV, typed from the
 * warehouse's type_name. Tokens are never logged nor copied anywhere but into
 * the warehouse request. */
#ifndef TIDEPOOL_FALLBACK_H
#define TIDEPOOL_FALLBACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tidepool/defs.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

struct event_base;

/* ---- routing ---- */

typedef enum tp_fb_source {
    TP_FB_SRC_POSTGRES = 0,
    TP_FB_SRC_WAREHOUSE,
    TP_FB_SRC_NONE, /* cannot be answered: asked for the warehouse, no twin */
} tp_fb_source_t;

typedef enum tp_fb_reason {
    TP_FB_REASON_FRESH = 0,       /* Postgres: nothing asks for the warehouse */
    TP_FB_REASON_ASKED_POSTGRES,  /* Postgres: ?source=postgres */
    TP_FB_REASON_NO_TWIN,         /* Postgres although a rule matched: no warehouse twin */
    TP_FB_REASON_WAREHOUSE_ONLY,  /* only NAME.warehouse.sql exists */
    TP_FB_REASON_REQUESTED,       /* ?source=warehouse */
    TP_FB_REASON_POSTGRES_DOWN,   /* Postgres unavailable */
    TP_FB_REASON_NEVER_SYNCED,    /* a @requires job never succeeded */
    TP_FB_REASON_STALE,           /* a @requires job is older than @max_staleness */
    TP_FB_REASON_COVERS,          /* a parameter reaches past @covers */
} tp_fb_reason_t;

/* What the caller knows of one @requires job (from tidepool.sync_state). */
typedef struct tp_fb_job_fact {
    bool known;              /* a sync_state row exists */
    int64_t last_success_ms; /* wall clock; 0 = never succeeded */
} tp_fb_job_fact_t;

typedef struct tp_fb_route_in {
    const tp_defs_dataset_t *ds;
    const tp_defs_value_t *values; /* per ds->params (defaults applied); NULL skips @covers */
    const tp_fb_job_fact_t *jobs;  /* per ds->requires; NULL = facts unknown (not stale) */
    bool postgres_down;
    const char *source;            /* the ?source= value, NULL when absent */
    int64_t now_ms;                /* wall clock */
} tp_fb_route_in_t;

typedef struct tp_fb_route {
    tp_fb_source_t source;
    tp_fb_reason_t reason;
    char detail[200]; /* one line for X-Tidepool-Route-Reason's log/problem detail */
} tp_fb_route_t;

/* Decides where a dataset read goes (DESIGN §9). Rules, first match wins:
 * ?source=postgres -> Postgres (NONE when there is no Postgres body); no
 * Postgres body -> warehouse; ?source=warehouse -> warehouse (NONE without a
 * twin); Postgres down; a required job never succeeded; older than
 * @max_staleness; a parameter past @covers. Rules after "no Postgres body"
 * answer Postgres with TP_FB_REASON_NO_TWIN when the dataset has no twin.
 * Pure; cannot fail. */
tp_fb_route_t tp_fb_route(const tp_fb_route_in_t *in);
/* Stable lower-case name for X-Tidepool-Route-Reason ("stale", "covers", ...). */
const char *tp_fb_reason_name(tp_fb_reason_t r);

/* ---- results ---- */

typedef struct tp_fb_result tp_fb_result_t;

typedef enum tp_fb_shape { TP_FB_ROWS = 0, TP_FB_COLUMNS, TP_FB_CSV } tp_fb_shape_t;

/* Appends the result as JSON rows ([{...}]), JSON columns ({"col":[...]}) or
 * CSV (header line, CRLF, RFC 4180 quoting, NULL as an empty field). JSON
 * values: INT/LONG/SHORT/BYTE/FLOAT/DOUBLE/DECIMAL as numbers (NaN and
 * Infinity as strings), BOOLEAN as true/false, TIMESTAMP / TIMESTAMP_NTZ in the
 * canonical ISO 8601 form of tidepool/isots.h (UTC, "+00:00"; also in CSV), so
 * the body equals the Postgres answer's, NULL as null, others strings. */
void tp_fb_result_encode(const tp_fb_result_t *r, tp_fb_shape_t shape, tp_buf_t *out);
size_t tp_fb_result_rows(const tp_fb_result_t *r);
size_t tp_fb_result_bytes(const tp_fb_result_t *r);
/* Results are shared and immutable; references are atomic (any thread). */
tp_fb_result_t *tp_fb_result_ref(tp_fb_result_t *r);
void tp_fb_result_release(tp_fb_result_t *r); /* NULL is a no-op */

/* ---- registry ---- */

typedef struct tp_fb tp_fb_t;
typedef struct tp_fb_loop tp_fb_loop_t;
typedef struct tp_fb_waiter tp_fb_waiter_t;

typedef struct tp_fb_config {
    int64_t max_in_flight;      /* statements running at once, all loops */
    int64_t result_cache_bytes; /* 0 = no result cache */
    int64_t max_result_bytes;   /* one result in memory at most */
    int64_t result_ttl_ms;      /* cache entries and finished handles */
    int64_t abandon_ms;
    int64_t timeout_ms;         /* per statement; 0 = the client's default */
    /* 0, or 5..50: a request that waits at least this long submits with
     * wait_timeout=N s (CONTINUE), so the warehouse answers the submission as
     * soon as the statement ends (no polling delay); a cancel asked for
     * meanwhile is sent when the submission returns (within N s). Shorter
     * waits and 0 submit asynchronously and poll (2 ms, then backing off). */
    int submit_wait_s;
    const char *catalog, *schema; /* NULL or "" = not sent; copied */
} tp_fb_config_t;

/* Creates the process-wide registry (copies cfg). Never NULL. */
tp_fb_t *tp_fb_new(const tp_fb_config_t *cfg);
/* Frees it; every loop must have been freed first. NULL is a no-op. */
void tp_fb_free(tp_fb_t *fb);
/* Replaces the limits (a reload); running statements keep theirs. Thread-safe. */
void tp_fb_configure(tp_fb_t *fb, const tp_fb_config_t *cfg);

/* Attaches an event loop: statements started through it run on wh (both
 * borrowed; they must outlive the loop object). Starts the loop's sweep timer
 * (abandon, expiry). Never NULL. */
tp_fb_loop_t *tp_fb_loop_new(tp_fb_t *fb, struct event_base *base, tp_wh_t *wh);
/* Cancels the loop's running statements (their handles fail with 503), drops
 * its waiters without calling them, and frees it. Call from its thread, while
 * base and wh still exist. NULL is a no-op. */
void tp_fb_loop_free(tp_fb_loop_t *lp);

typedef enum tp_fb_state {
    TP_FB_READY = 0,  /* result holds the rows */
    TP_FB_FAILED,     /* problem says why (statement failed, too large, cancelled) */
    TP_FB_PENDING,    /* still running; id is the handle to poll */
    TP_FB_WAITING,    /* still running; the callback will be called */
    TP_FB_BUSY,       /* too many statements in flight: problem (429), retry_after_s */
    TP_FB_NOT_FOUND,  /* no such handle for this owner */
} tp_fb_state_t;

typedef struct tp_fb_problem {
    int status;        /* HTTP status: 413, 422, 429, 502, 503, 504 */
    const char *code;  /* static, stable: "warehouse-failed", "result-too-large", ... */
    char *detail;      /* owned; one line, with the warehouse's message; no secrets */
    char *warehouse_statement_id; /* owned; NULL if the warehouse gave none */
    int retry_after_s; /* > 0: send Retry-After */
} tp_fb_problem_t;

typedef struct tp_fb_outcome {
    tp_fb_state_t state;
    tp_fb_result_t *result;  /* READY: one reference, the receiver's */
    tp_fb_problem_t problem; /* FAILED, BUSY */
    char id[33];             /* handle id ("" for a cache hit or BUSY) */
    bool from_cache;         /* READY from the result cache */
    bool shared;             /* joined a statement another request started */
    int64_t elapsed_ms;      /* statement run time so far (or total when finished) */
} tp_fb_outcome_t;

/* Frees what o owns (result reference, problem strings) and zeroes it. */
void tp_fb_outcome_clear(tp_fb_outcome_t *o);

/* The outcome of a wait: state READY, FAILED or PENDING (budget spent; the
 * handle is then pollable). o is the receiver's (clear it). Called from the
 * waiter's own event loop, never from inside tp_fb_start / tp_fb_poll. */
typedef void (*tp_fb_wait_fn)(tp_fb_outcome_t *o, void *arg);

typedef struct tp_fb_request {
    const tp_defs_dataset_t *ds;  /* must have a warehouse body */
    const char *const *values;    /* bind text per ds->params (defaults applied); NULL = SQL NULL */
    const char *owner;            /* principal id owning the handle (required) */
    const char *bearer_token;     /* @obo: the caller's token (required when ds->obo) */
    bool bypass_cache;            /* skip the cache lookup (a running statement is still shared) */
    int64_t wait_ms;              /* wait budget; 0 = answer PENDING at once */
    tp_fb_wait_fn on_wait;        /* required when wait_ms > 0 */
    void *arg;
} tp_fb_request_t;

/* Runs a dataset's warehouse twin, or answers from the cache. Returns the
 * outcome's state: READY (cache hit), FAILED (the request is invalid: no
 * twin, a missing @obo token; or submission failed), BUSY, PENDING
 * (wait_ms == 0), or WAITING (*waiter set; on_wait will be called once unless
 * the waiter is detached). Thread: lp's. */
tp_fb_state_t tp_fb_start(tp_fb_loop_t *lp, const tp_fb_request_t *req, tp_fb_outcome_t *out,
                          tp_fb_waiter_t **waiter);

/* Looks up handle id for owner (another owner's handle is NOT_FOUND) and
 * answers READY/FAILED when finished, PENDING when wait_ms is 0, else WAITING
 * with *waiter set (on_wait called later). Marks the handle as polled.
 * Any loop may poll any handle. */
tp_fb_state_t tp_fb_poll(tp_fb_loop_t *lp, const char *id, const char *owner, int64_t wait_ms,
                         tp_fb_wait_fn on_wait, void *arg, tp_fb_outcome_t *out,
                         tp_fb_waiter_t **waiter);

/* Forgets owner's handle id (false when not found). When nobody else waits
 * for or holds its statement, the statement is cancelled at the warehouse
 * (at once on the statement's loop, else within a sweep interval). */
bool tp_fb_delete(tp_fb_loop_t *lp, const char *id, const char *owner) TP_WUR;

/* The waiter's client went away: on_wait will not be called. When nobody
 * else waits for or polls the statement it is cancelled as for tp_fb_delete.
 * Call from the waiter's loop; NULL is a no-op. */
void tp_fb_waiter_detach(tp_fb_waiter_t *w);

/* Counters for /metrics and tests (relaxed reads). */
typedef struct tp_fb_stats {
    uint64_t submitted;   /* statements sent to the warehouse */
    uint64_t joined;      /* requests that shared a running statement */
    uint64_t cache_hits;
    uint64_t busy;        /* refused by the in-flight limit */
    uint64_t cancelled;   /* cancelled by us (abandoned, detached, deleted) */
    uint64_t succeeded, failed;
    int64_t in_flight;
    int64_t cache_bytes, cache_entries;
    int64_t handles;
} tp_fb_stats_t;
void tp_fb_stats(tp_fb_t *fb, tp_fb_stats_t *out);

#endif
