/* Non-blocking libpq connection driven by a libevent loop: connect with a
 * timer, one query at a time, COPY FROM STDIN with back-pressure, LISTEN
 * notifications, cancel. Program-private to tidepool-sync. */
#ifndef TIDEPOOL_DAEMON_PGASYNC_H
#define TIDEPOOL_DAEMON_PGASYNC_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/event.h>
#include <libpq-fe.h>

#include "tidepool/util.h"

typedef struct tp_pgasync tp_pgasync_t;

/* Completion of connect, query, COPY start or COPY end. On success err is NULL
 * and res is the last result (borrowed: cleared after the callback returns;
 * NULL for connect). On failure err is a one-line message that names the
 * server, the SQLSTATE, detail and context where libpq has them. */
typedef void (*tp_pgasync_done_fn)(tp_pgasync_t *c, PGresult *res, const char *err, void *arg);
/* A NOTIFY arrived on a LISTENing connection (channel, payload borrowed). */
typedef void (*tp_pgasync_notify_fn)(tp_pgasync_t *c, const char *channel, const char *payload,
                                     void *arg);
/* Hook that yields the password for each new connection (e.g. a fresh Lakebase
 * OAuth token, databricks-protocol.md 4.5); returns a heap string or NULL to let
 * libpq use the conninfo / PGPASSWORD / .pgpass. */
typedef char *(*tp_pgasync_password_fn)(void *arg);

/* New, unconnected connection object (never NULL). dsn is a libpq conninfo. */
tp_pgasync_t *tp_pgasync_new(struct event_base *base, const char *dsn, const char *appname);
/* Registers the process-wide password hook used by every later connect. */
void tp_pgasync_set_password_hook(tp_pgasync_password_fn fn, void *arg);
/* Registers a process-wide hook called when a connect fails because the server
 * refused the password (28P01; e.g. a Lakebase token revoked or rotated), so
 * that the password hook hands out a new one next time. */
void tp_pgasync_set_refused_hook(void (*fn)(void *arg), void *arg);
/* Starts connecting; cb runs once (success or failure, including timeout). */
bool tp_pgasync_connect(tp_pgasync_t *c, int timeout_ms, tp_pgasync_done_fn cb, void *arg) TP_WUR;
/* Sends sql (params may be NULL; values are text, NULL = SQL NULL). Multiple
 * statements are allowed when nparams is 0; the first error wins. */
bool tp_pgasync_query(tp_pgasync_t *c, const char *sql, int nparams, const char *const *params,
                      tp_pgasync_done_fn cb, void *arg) TP_WUR;
/* Sends a COPY ... FROM STDIN statement; cb runs when the server is ready for data. */
bool tp_pgasync_copy_begin(tp_pgasync_t *c, const char *sql, tp_pgasync_done_fn cb, void *arg) TP_WUR;
/* Queues data into the COPY. Returns 1 when the connection can take more now,
 * 0 when the caller must stop producing until the drain callback runs, -1 on a
 * broken connection (message in tp_pgasync_error). The data is always taken. */
int tp_pgasync_copy_put(tp_pgasync_t *c, const void *data, size_t len);
/* Callback run once the socket buffer drained after copy_put returned 0. */
void tp_pgasync_on_drain(tp_pgasync_t *c, void (*fn)(void *arg), void *arg);
/* Ends the COPY (errmsg non-NULL aborts it); cb gets the COPY's outcome. */
bool tp_pgasync_copy_end(tp_pgasync_t *c, const char *errmsg, tp_pgasync_done_fn cb, void *arg) TP_WUR;
/* Delivers NOTIFY messages to fn from now on (send LISTEN yourself). */
void tp_pgasync_on_notify(tp_pgasync_t *c, tp_pgasync_notify_fn fn, void *arg);
/* Asks the server to cancel the statement in flight (short blocking call). */
void tp_pgasync_cancel(tp_pgasync_t *c);
/* True while connected and not broken. */
bool tp_pgasync_ok(const tp_pgasync_t *c);
/* True while an operation (query, COPY) is in flight. */
bool tp_pgasync_busy(const tp_pgasync_t *c);
/* True between COPY start and copy_end (data may be sent). */
bool tp_pgasync_in_copy(const tp_pgasync_t *c);
/* Last error text ("" if none). */
const char *tp_pgasync_error(const tp_pgasync_t *c);
PGconn *tp_pgasync_conn(tp_pgasync_t *c);
/* Closes the connection and frees. Pending callbacks are not called. NULL ok. */
void tp_pgasync_free(tp_pgasync_t *c);

/* Formats a PGresult error (SQLSTATE, message, detail, context) into one line. */
char *tp_pgasync_result_error(const PGresult *res);

#endif
