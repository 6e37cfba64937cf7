/* Blocking PostgreSQL helpers for command-line paths and start-up (migrations,
 * --check, token commands). NOT for request paths: they block the calling
 * thread for as long as libpq does. Error messages name host and port and
 * never contain a password. */
#ifndef TIDEPOOL_PG_H
#define TIDEPOOL_PG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "tidepool/util.h"

/* Connects with a libpq conninfo string (key=value or postgresql:// URI; NULL or
 * "" = libpq's PG* environment). timeout_ms > 0 sets connect_timeout (rounded up
 * to whole seconds, at least 2, per host tried) over any value in the conninfo;
 * 0 keeps the conninfo's or PGCONNECT_TIMEOUT's. application_name defaults to
 * the program's name unless the conninfo or PGAPPNAME sets one.
 * Returns an owned connection (PQfinish it), or NULL with err set to one line
 * such as "cannot connect to Postgres at 127.0.0.1:5432: Connection refused"
 * with every password masked. */
PGconn *tp_pg_connect(const char *conninfo, int64_t timeout_ms, char *err, size_t errlen) TP_WUR;

/* Same, with password (when non-NULL and non-empty) overriding any password in
 * the conninfo, PGPASSWORD or ~/.pgpass for this one connection: the hook for
 * short-lived credentials such as a freshly minted Lakebase OAuth token
 * (databricks-protocol.md §4.5). The password is never copied into err. */
PGconn *tp_pg_connect_password(const char *conninfo, const char *password, int64_t timeout_ms,
                               char *err, size_t errlen) TP_WUR;

/* Classifies a failed connection attempt's message (libpq gives no SQLSTATE
 * for login failures): true when the server refused the password (28P01,
 * "password authentication failed"; also an expired one). */
bool tp_pg_password_refused(const char *msg);
/* True for failures worth one immediate retry (databricks-protocol.md §4.5):
 * 57P01 admin shutdown, 57P03 cannot connect now (starting up, e.g. a
 * scale-to-zero cold start), 08xxx connection failures (refused, reset,
 * closed unexpectedly, timeout). */
bool tp_pg_error_transient(const char *msg);

/* Checks that libpq can parse conninfo (for --check) without connecting.
 * False with err set ("invalid Postgres connection string: ...", secrets
 * masked as in tp_pg_connect) when it cannot. */
bool tp_pg_conninfo_check(const char *conninfo, char *err, size_t errlen) TP_WUR;

/* Describes where conn points as "HOST:PORT" (a socket directory for a Unix
 * socket) into buf; returns buf. Never includes credentials. */
const char *tp_pg_where(const PGconn *conn, char *buf, size_t len);
/* The same for a conninfo not yet connected (NULL or "" = libpq's environment):
 * its first host (or hostaddr) and port, else PGHOST/PGPORT, else libpq's
 * defaults. A conninfo libpq cannot parse gives the environment's. Returns buf. */
const char *tp_pg_where_conninfo(const char *conninfo, char *buf, size_t len);
/* True when conninfo (as libpq reads it: a bare word is a dbname) sets keyword
 * to a non-empty value; false too when it does not parse. */
bool tp_pg_conninfo_has(const char *conninfo, const char *keyword);

/* Runs sql with nparams text parameters (params may hold NULLs for SQL NULL)
 * and expects PGRES_COMMAND_OK or PGRES_TUPLES_OK. Returns the result (caller
 * PQclears it), or NULL with err set to "Postgres message (SQLSTATE xxxxx)".
 * nparams == 0 uses the simple protocol, so sql may hold several statements. */
PGresult *tp_pg_query(PGconn *conn, const char *sql, int nparams, const char *const *params,
                      char *err, size_t errlen) TP_WUR;

/* tp_pg_query for statements whose rows are not wanted; true on success. */
bool tp_pg_exec(PGconn *conn, const char *sql, int nparams, const char *const *params, char *err,
                size_t errlen) TP_WUR;

/* Formats a failed result as "message (SQLSTATE xxxxx)" plus ": DETAIL" when
 * Postgres gave one; falls back to the connection's message. Returns err. */
const char *tp_pg_result_error(const PGconn *conn, const PGresult *res, char *err, size_t errlen);

/* Quotes an identifier ("my table" -> "\"my table\"") for splicing into SQL.
 * Returns a tp_xmalloc'd string the caller frees, or NULL when libpq refuses
 * it (invalid encoding); then err says why. */
char *tp_pg_quote_ident(PGconn *conn, const char *ident, char *err, size_t errlen) TP_WUR;

#endif
