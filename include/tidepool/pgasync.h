/* Asynchronous PostgreSQL for one libevent loop: a pool of non-blocking libpq
 * connections (each a tidepool/pgconn.h connection) with lazily prepared
 * statements, a bounded wait queue and
 * reconnection with backoff, plus a dedicated LISTEN connection that
 * reconnects by itself. Nothing here ever blocks the loop (DNS aside: pass a
 * host address or a socket directory in the conninfo). One pool belongs to one
 * event_base and must only be used from that loop's thread. */
#ifndef TIDEPOOL_PGASYNC_H
#define TIDEPOOL_PGASYNC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "tidepool/pgconn.h"
#include "tidepool/util.h"

struct event_base;

typedef struct tp_pgpool tp_pgpool_t;
typedef struct tp_pgreq tp_pgreq_t;

typedef enum tp_pg_submit {
    TP_PG_QUEUED = 0, /* accepted: the callback will run exactly once (unless cancelled) */
    TP_PG_BUSY = -1,  /* every connection busy and the wait queue full */
    TP_PG_DOWN = -2,  /* no connection to Postgres right now */
} tp_pg_submit_t;

/* Completion: res is the statement's last result (borrowed: the pool clears it
 * after the callback returns) or NULL with err set ("connection lost", the
 * server's message, ...). err is NULL on success; on a server-side error res
 * is the error result (PQresultStatus PGRES_FATAL_ERROR) and err its message. */
typedef void (*tp_pg_done_cb)(PGresult *res, const char *err, void *arg);

/* Passwords that expire (tp_pg_password_provider_t, such as Lakebase
 * credentials) are described in tidepool/pgconn.h. */

typedef struct tp_pgpool_opts {
    const char *dsn;          /* libpq conninfo; "" = libpq's environment */
    int size;                 /* connections (>= 1) */
    int max_queue;            /* requests waiting for a free connection */
    int connect_timeout_ms;   /* our own timer around PQconnectPoll */
    int max_statements;       /* distinct SQL texts prepared per connection */
    const char *name;         /* for logs ("read", "write") */
    const tp_pg_password_provider_t *password; /* NULL = the dsn's own password; copied,
                                                  its self must outlive the pool */
} tp_pgpool_opts_t;

typedef struct tp_pgpool_stats {
    int size, connected, in_use, queued;
    uint64_t submitted, rejected_busy, rejected_down, reconnects;
} tp_pgpool_stats_t;

/* Creates a pool on base and starts connecting in the background. Owned by the
 * caller; free with tp_pgpool_free (fails outstanding requests silently). */
tp_pgpool_t *tp_pgpool_new(struct event_base *base, const tp_pgpool_opts_t *opts);
void tp_pgpool_free(tp_pgpool_t *pool);

/* Sends sql (prepared once per connection, then executed with PQsendQueryPrepared)
 * with nparams text values (NULL entries are SQL NULL; copied, the caller may
 * free them on return). types: nparams parameter type OIDs for the prepare
 * (0 = let Postgres infer), or NULL for all inferred; the statement is keyed by
 * sql and types. On TP_PG_QUEUED, *handle (if non-NULL) lets the caller cancel
 * before completion. */
tp_pg_submit_t tp_pgpool_query(tp_pgpool_t *pool, const char *sql, int nparams,
                               const unsigned *types, const char *const *values, tp_pg_done_cb cb,
                               void *arg, tp_pgreq_t **handle) TP_WUR;
/* The caller no longer wants the answer (client went away): the callback will
 * not run; a statement already sent finishes on its connection and is dropped. */
void tp_pgpool_cancel(tp_pgreq_t *req);
/* The answer is no longer needed but the callback must still run (the caller
 * owns state it frees there): a queued request completes at once (res NULL,
 * err "canceled"), a statement already sent is cancelled on the server
 * without blocking the loop (tp_pgconn_cancel) and completes when Postgres
 * answers, usually with SQLSTATE 57014. */
void tp_pgpool_abort(tp_pgreq_t *req);
/* True when at least one connection is up. */
bool tp_pgpool_up(const tp_pgpool_t *pool);
/* Milliseconds until the next reconnect attempt (for Retry-After); 0 if up. */
int64_t tp_pgpool_retry_ms(const tp_pgpool_t *pool);
void tp_pgpool_stats(const tp_pgpool_t *pool, tp_pgpool_stats_t *out);

typedef struct tp_pglisten tp_pglisten_t;
/* Notification: channel and payload, or channel NULL after a (re)connect, which
 * means "notifications may have been missed: treat everything as changed". */
typedef void (*tp_pg_notify_cb)(const char *channel, const char *payload, void *arg);

/* Keeps one connection LISTENing on channel (an identifier: [a-z0-9_]),
 * reconnecting with backoff whenever it drops. */
tp_pglisten_t *tp_pglisten_new(struct event_base *base, const char *dsn, const char *channel,
                               int connect_timeout_ms, tp_pg_notify_cb cb, void *arg);
/* Same, taking each new connection's password from pw (NULL = as above; see
 * tp_pgpool_opts.password). */
tp_pglisten_t *tp_pglisten_new_pw(struct event_base *base, const char *dsn, const char *channel,
                                  int connect_timeout_ms, const tp_pg_password_provider_t *pw,
                                  tp_pg_notify_cb cb, void *arg);
void tp_pglisten_free(tp_pglisten_t *l);
bool tp_pglisten_up(const tp_pglisten_t *l);

#endif
