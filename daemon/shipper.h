/* tidepool-sync's write-back outbox shipper: one dedicated thread (blocking libpq
 * and tp_wh_run, never on the daemon's event loop). Program-private. */
#ifndef TIDEPOOL_DAEMON_SHIPPER_H
#define TIDEPOOL_DAEMON_SHIPPER_H

#include <stdbool.h>

#include "tidepool/config.h"
#include "tidepool/lakebase.h"
#include "tidepool/util.h"

typedef struct tp_shipper tp_shipper_t;

/* Starts the shipper thread with cfg and, for postgres.password_source = lakebase,
 * lb: a blocking provider (tp_lakebase_new_blocking, safe to share with other
 * threads) giving each new connection's password; NULL uses
 * $TIDEPOOL_PGPASSWORD_FILE or the conninfo. Both are borrowed until
 * tp_shipper_stop returns. Returns NULL (logged) if the thread cannot be created. */
tp_shipper_t *tp_shipper_start(const tp_config_t *cfg, tp_lakebase_t *lb) TP_WUR;
/* Asks the thread to stop after the batch in flight (at most ~5 s); returns at once. */
void tp_shipper_request_stop(tp_shipper_t *sh);
/* Requests the stop, joins the thread and frees sh. NULL is a no-op. */
void tp_shipper_stop(tp_shipper_t *sh);

#endif
