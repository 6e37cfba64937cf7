/* One non-blocking libpq connection driven by a libevent loop: connect with a
 * timer (taking the password from a provider when one is given), one
 * statement at a time (simple, parameterised, prepare, execute prepared), COPY
 * FROM STDIN with back-pressure, LISTEN notifications, cancel without
 * blocking the loop. The building block of the server's pool and listener
 * (tidepool/pgasync.h) and of the daemon's sessions. One connection belongs to
 * one event_base and is used only from that loop's thread. It never retries or
 * reconnects by itself: its owner decides, and may call connect again. */
#ifndef TIDEPOOL_PGCONN_H
#define TIDEPOOL_PGCONN_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

#include "tidepool/util.h"

struct event_base;

typedef struct tp_pgconn tp_pgconn_t;

/* Where a new connection's password comes from when it expires, such as a
 * Lakebase OAuth credential (lib/lakebase.c, tp_lakebase_pg_provider). Before
 * every connect the connection calls get(self, refused, cb, cb_arg); refused
 * is NULL, or the password the server refused at this connection's previous
 * login (SQLSTATE 28P01, so the provider drops it if it is still the cached
 * one and mints anew). get returns a handle and calls cb exactly once, later,
 * from the loop (password borrowed for the call; "" for the dsn's own; NULL
 * with err on failure), unless cancel(handle) is called first. refused_fn (optional, may be NULL) is
 * told whenever the server refused a password this provider handed out, for
 * owners that use a new connection object per login. The password overrides
 * any in the dsn and is never logged. */
typedef void (*tp_pg_password_cb)(const char *password, const char *err, void *arg);
typedef struct tp_pg_password_provider {
    void *(*get)(void *self, const char *refused, tp_pg_password_cb cb, void *cb_arg);
    void (*cancel)(void *handle);
    void *self;
    void (*refused_fn)(void *self);
} tp_pg_password_provider_t;

/* Completion of connect, a statement, COPY start or COPY end; runs exactly
 * once. On success err is NULL and res the statement's last result (NULL for
 * connect). On a server error err is one line naming the message, detail,
 * context and SQLSTATE (tp_pgconn_result_error) and res the first error
 * result. On a broken connection or a timeout res is NULL and err says what
 * failed. res is borrowed: it is cleared after the callback returns. */
typedef void (*tp_pgconn_done_fn)(tp_pgconn_t *c, PGresult *res, const char *err, void *arg);
/* A NOTIFY arrived (channel, payload borrowed). */
typedef void (*tp_pgconn_notify_fn)(tp_pgconn_t *c, const char *channel, const char *payload,
                                    void *arg);
/* The connection broke while no operation was in flight (err as above). */
typedef void (*tp_pgconn_lost_fn)(tp_pgconn_t *c, const char *err, void *arg);

/* New, unconnected connection (never NULL). dsn is a libpq conninfo ("" =
 * libpq's environment); appname becomes fallback_application_name (NULL =
 * none); pw (NULL = the dsn's own password) is copied, its self must outlive
 * the connection. */
tp_pgconn_t *tp_pgconn_new(struct event_base *base, const char *dsn, const char *appname,
                           const tp_pg_password_provider_t *pw);
/* Starts connecting (from new, or again after a failure or tp_pgconn_close);
 * cb runs once, on success or failure (refused, timed out after timeout_ms,
 * which bounds the wait for the password too). false (message in
 * tp_pgconn_error, cb not called) if it cannot even start. */
bool tp_pgconn_connect(tp_pgconn_t *c, int timeout_ms, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Sends sql with nparams text values (NULL entries are SQL NULL; libpq copies
 * them before this returns); types: parameter type OIDs or NULL for all
 * inferred. values NULL (nparams 0) uses the simple protocol, where several
 * statements are allowed and the first error wins. false (message in
 * tp_pgconn_error) unless the connection is ready. */
bool tp_pgconn_query(tp_pgconn_t *c, const char *sql, int nparams, const Oid *types,
                     const char *const *values, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Prepares sql as the named statement (ntypes/types as PQprepare). */
bool tp_pgconn_prepare(tp_pgconn_t *c, const char *name, const char *sql, int ntypes,
                       const Oid *types, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Executes a statement prepared on this connection (values as tp_pgconn_query). */
bool tp_pgconn_query_prepared(tp_pgconn_t *c, const char *name, int nparams,
                              const char *const *values, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Sends a COPY ... FROM STDIN statement; cb runs when the server is ready for data. */
bool tp_pgconn_copy_begin(tp_pgconn_t *c, const char *sql, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Queues data into the COPY. Returns 1 when the connection can take more now,
 * 0 when the caller must stop producing until the drain callback runs, -1 on a
 * broken connection (message in tp_pgconn_error). The data is always taken. */
int tp_pgconn_copy_put(tp_pgconn_t *c, const void *data, size_t len);
/* Callback run once the socket buffer drained after copy_put returned 0. */
void tp_pgconn_on_drain(tp_pgconn_t *c, void (*fn)(void *arg), void *arg);
/* Ends the COPY (errmsg non-NULL aborts it); cb gets the COPY's outcome. */
bool tp_pgconn_copy_end(tp_pgconn_t *c, const char *errmsg, tp_pgconn_done_fn cb, void *arg) TP_WUR;
/* Delivers NOTIFY messages to fn from now on (send LISTEN yourself); without
 * one they are dropped. */
void tp_pgconn_on_notify(tp_pgconn_t *c, tp_pgconn_notify_fn fn, void *arg);
/* Calls fn when the connection breaks while idle (NULL = nobody). */
void tp_pgconn_on_lost(tp_pgconn_t *c, tp_pgconn_lost_fn fn, void *arg);
/* Asks the server to cancel the statement in flight. Never blocks: the cancel
 * key is taken here and the request is sent by a background thread (libpq's
 * PQcancel blocks), unless the statement ended meanwhile. Its callback still
 * runs, usually with SQLSTATE 57014. No-op when no statement is in flight
 * (a COPY taking data is ended with copy_end instead). */
void tp_pgconn_cancel(tp_pgconn_t *c);
/* Closes the socket without calling any callback; connect may follow. */
void tp_pgconn_close(tp_pgconn_t *c);
/* True while connected and not broken. */
bool tp_pgconn_ok(const tp_pgconn_t *c);
/* True while connecting or while an operation (statement, COPY) is in flight. */
bool tp_pgconn_busy(const tp_pgconn_t *c);
/* True between COPY start and copy_end (data may be sent). */
bool tp_pgconn_in_copy(const tp_pgconn_t *c);
/* Last error text ("" if none). */
const char *tp_pgconn_error(const tp_pgconn_t *c);
/* The libpq connection (NULL before connect), for PQstatus and the like. */
PGconn *tp_pgconn_pg(tp_pgconn_t *c);
/* Closes the connection and frees; pending callbacks are not called. May be
 * called from inside this connection's callbacks (the free is deferred until
 * they return). NULL ok. */
void tp_pgconn_free(tp_pgconn_t *c);

/* Formats a PGresult error (message, detail, first context line, SQLSTATE)
 * into one line (owned). */
char *tp_pgconn_result_error(const PGresult *res);

#endif
