/* One run of one sync job (DESIGN §7): advisory lock, warehouse statement,
 * COPY into a fresh table (snapshot) or a staging table (incremental), then
 * one transaction that swaps or upserts and records the outcome.
 * Program-private to tidepool-sync. */
#ifndef TIDEPOOL_DAEMON_SYNCJOB_H
#define TIDEPOOL_DAEMON_SYNCJOB_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>

#include "tidepool/defs.h"
#include "tidepool/pgconn.h"
#include "tidepool/wh.h"

/* Advisory lock class (first int4 of the two-key form); the second key is
 * hashtext(job name). */
#define TP_SYNCJOB_LOCK_CLASS 0x7464706c

typedef enum tp_syncjob_outcome {
    TP_SYNCJOB_SUCCEEDED = 0,
    TP_SYNCJOB_FAILED,
    TP_SYNCJOB_SKIPPED, /* another daemon holds the job's advisory lock */
    TP_SYNCJOB_CANCELED,
} tp_syncjob_outcome_t;

typedef struct tp_syncenv {
    struct event_base *base;
    tp_wh_t *wh;
    const char *dsn;
    const char *catalog; /* warehouse defaults, NULL = not sent */
    const char *schema;
    const char *daemon_id; /* host:pid */
    int64_t connect_timeout_ms;
    const tp_pg_password_provider_t *pw; /* each login's password; NULL = the dsn's */
} tp_syncenv_t;

typedef struct tp_syncjob tp_syncjob_t;
typedef void (*tp_syncjob_done_fn)(tp_syncjob_t *r, tp_syncjob_outcome_t outcome, void *arg);

/* Starts a run of job (borrowed: must outlive the run) under env (borrowed).
 * trigger is "schedule", "notify", "once", ... for sync_runs. done runs once,
 * from the event loop, never from inside this call; free the run there or
 * later. Never NULL. */
tp_syncjob_t *tp_syncjob_start(const tp_syncenv_t *env, const tp_defs_job_t *job, const char *trigger,
                               tp_syncjob_done_fn done, void *arg);
/* Cancels the run (statement in flight at the warehouse and in Postgres); it
 * still ends through done, with TP_SYNCJOB_CANCELED. reason is logged/recorded. */
void tp_syncjob_cancel(tp_syncjob_t *r, const char *reason);
/* Live figures for progress lines: rows streamed so far, COPY's count once
 * the load is done. */
int64_t tp_syncjob_rows(const tp_syncjob_t *r);
int64_t tp_syncjob_bytes(const tp_syncjob_t *r);
int64_t tp_syncjob_started_ms(const tp_syncjob_t *r);
/* Error message of a failed run ("" otherwise); borrowed. */
const char *tp_syncjob_error(const tp_syncjob_t *r);
/* The same without its leading "job NAME: " (for lines that name the job). */
const char *tp_syncjob_error_detail(const tp_syncjob_t *r);
/* True when a failed run failed for a transient reason worth an early retry
 * (connection lost, truncated or dropped result chunk, warehouse 5xx). */
bool tp_syncjob_retryable(const tp_syncjob_t *r);
const tp_defs_job_t *tp_syncjob_job(const tp_syncjob_t *r);
/* Frees a finished run (call from done or later). NULL is a no-op. */
void tp_syncjob_free(tp_syncjob_t *r);

#endif
