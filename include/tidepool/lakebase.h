/* Lakebase database credentials (databricks-protocol.md §4.3-4.5): the
 * Postgres password of a Lakebase role is a short-lived OAuth token minted by
 * the workspace API with the warehouse client's own credentials (PAT or OAuth
 * M2M, lib/wh.c):
 *   Provisioned  POST /api/2.0/database/credentials
 *                {"instance_names": [I], "request_id": uuid} -> {"token", "expiration_time"}
 *   Autoscaling  POST /api/2.0/postgres/credentials
 *                {"endpoint": "projects/P/branches/B/endpoints/E"} -> {"token", "expire_time"}
 * The token is checked only at login: open sessions outlive it, new
 * connections need a fresh one. A provider caches {token, expiry}, mints anew
 * when now > expiry - refresh_before (capped at half the token's life), keeps
 * one mint in flight with waiters, and drops the cache when Postgres refuses
 * the cached token (28P01). The token is never logged nor put in an error.
 *
 * Threading: an asynchronous provider belongs to one event_base thread; a
 * blocking one (tp_lakebase_new_blocking) runs its own private loop under a
 * mutex, so tp_lakebase_token / tp_lakebase_connect may be called from any
 * thread (one mint at a time). */
#ifndef TIDEPOOL_LAKEBASE_H
#define TIDEPOOL_LAKEBASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "tidepool/config.h"
#include "tidepool/pgconn.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

struct event_base;

typedef struct tp_lakebase tp_lakebase_t;
typedef struct tp_lakebase_wait tp_lakebase_wait_t;

typedef struct tp_lakebase_config {
    const char *instance; /* Provisioned instance name, or NULL */
    const char *endpoint; /* Autoscaling "projects/../branches/../endpoints/..", or NULL */
    int64_t refresh_before_ms; /* mint anew this long before expiry; default 2 min
                                  (never more than half the token's lifetime) */
} tp_lakebase_config_t;

/* Fills c with defaults (no instance, no endpoint, 2 min). Cannot fail. */
void tp_lakebase_config_init(tp_lakebase_config_t *c);

/* Creates an asynchronous provider minting through wh (borrowed: it must
 * outlive the provider, and both belong to base's thread). Exactly one of
 * instance and endpoint must be set and wh must have its own credentials;
 * otherwise NULL with *err (heap, caller frees). */
tp_lakebase_t *tp_lakebase_new(struct event_base *base, tp_wh_t *wh, const tp_lakebase_config_t *cfg,
                               char **err) TP_WUR;
/* Same, with a warehouse client of its own on base, built from whcfg (its
 * warehouse_id may be empty): one call per event loop for a server thread. */
tp_lakebase_t *tp_lakebase_new_on(struct event_base *base, const tp_wh_config_t *whcfg,
                                  const tp_lakebase_config_t *cfg, char **err) TP_WUR;
/* Creates a blocking provider with its own event_base and warehouse client
 * built from whcfg (its warehouse_id may be empty: only workspace API calls are
 * made). For start-up, command-line tools and threads without a loop. */
tp_lakebase_t *tp_lakebase_new_blocking(const tp_wh_config_t *whcfg, const tp_lakebase_config_t *cfg,
                                        char **err) TP_WUR;
/* Frees the provider; pending waiters are dropped without their callback, so
 * free every pool and LISTEN connection using it first. Never from inside one
 * of its callbacks. NULL is a no-op. */
void tp_lakebase_free(tp_lakebase_t *lb);

/* Reads a loaded configuration: false when postgres.password_source is not
 * "lakebase"; else fills *lc (instance, endpoint, refresh_before) and *wc (a
 * tp_wh_config_init'd client config with [warehouse] host, token, client id and
 * secret, as tp_wh_config_from_settings); strings are borrowed from c. */
bool tp_lakebase_from_config(const tp_config_t *c, tp_lakebase_config_t *lc, tp_wh_config_t *wc);

/* Blocking connect for start-up and command-line paths (migrations, --ping):
 * tp_pg_connect(dsn) unless cfg says password_source = lakebase, then through a
 * blocking provider made for this one call (one mint) with tp_lakebase_connect's
 * retry rules. NULL with err set on failure. */
PGconn *tp_lakebase_connect_settings(const tp_config_t *cfg, const char *dsn, int64_t timeout_ms,
                                     char *err, size_t errlen) TP_WUR;

/* Answer to tp_lakebase_get: token borrowed for the call, NULL with err on failure. */
typedef void (*tp_lakebase_cb)(const char *token, const char *err, void *arg);

/* Asks for a currently valid token (asynchronous providers only). refused:
 * the token Postgres just refused at login, or NULL; when it is the cached
 * one the cache is dropped and a new token minted. cb runs exactly once,
 * later, from the loop (never inside this call) unless tp_lakebase_cancel
 * is called first. Never NULL. */
tp_lakebase_wait_t *tp_lakebase_get(tp_lakebase_t *lb, const char *refused, tp_lakebase_cb cb,
                                    void *arg);
/* Drops a pending request: its callback will not run. */
void tp_lakebase_cancel(tp_lakebase_wait_t *w);

/* Blocking: a currently valid token (heap, caller frees; zero it after use),
 * with the same refused semantics, or NULL with *err (heap, caller frees).
 * Only on a provider from tp_lakebase_new_blocking. */
char *tp_lakebase_token(tp_lakebase_t *lb, const char *refused, char **err) TP_WUR;

/* Blocking connect (start-up, CLI, the sync daemon's threads): opens conninfo
 * with the provider's current token as password (tp_pg_connect_password). A
 * refused password (28P01) drops the cache, mints anew and retries once; a
 * transient failure (57P01, 57P03, 08xxx) is retried once. NULL with err set
 * (never holding the token) on failure. */
PGconn *tp_lakebase_connect(tp_lakebase_t *lb, const char *conninfo, int64_t timeout_ms, char *err,
                            size_t errlen) TP_WUR;

/* Fills *out so that tp_pgpool_opts.password / tp_pglisten_new_pw take each
 * new connection's password from lb (asynchronous providers only). */
void tp_lakebase_pg_provider(tp_lakebase_t *lb, tp_pg_password_provider_t *out);

/* Counters for tests and /metrics. */
typedef struct tp_lakebase_stats {
    uint64_t mints, mint_failures, refused_drops;
    int64_t expires_wall_ms; /* of the cached token, 0 if none */
} tp_lakebase_stats_t;
void tp_lakebase_stats(const tp_lakebase_t *lb, tp_lakebase_stats_t *out);

#endif
