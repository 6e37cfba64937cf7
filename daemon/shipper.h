/* tidepool-sync's write-back outbox shipper: one dedicated thread (blocking libpq
 * and tp_wh_run, never on the daemon's event loop). Program-private. */
#ifndef TIDEPOOL_DAEMON_SHIPPER_H
#define TIDEPOOL_DAEMON_SHIPPER_H

#include <stdbool.h>

#include "tidepool/config.h"
#include "tidepool/util.h"

typedef struct tp_shipper tp_shipper_t;

/* Starts the shipper thread with cfg (borrowed until tp_shipper_stop returns).
 * Returns NULL (logged) if the thread cannot be created. */
tp_shipper_t *tp_shipper_start(const tp_config_t *cfg) TP_WUR;
/* Asks the thread to stop after the batch in flight (at most ~5 s); returns at once. */
void tp_shipper_request_stop(tp_shipper_t *sh);
/* Requests the stop, joins the thread and frees sh. NULL is a no-op. */
void tp_shipper_stop(tp_shipper_t *sh);

#endif
