/* Connectivity check for users (`tidepool-sync --ping`): the "Connection
 * Details" step of wiring an app, done by the program itself. Also the one
 * place that turns the [warehouse] settings into a warehouse client config. */
#ifndef TIDEPOOL_PING_H
#define TIDEPOOL_PING_H

#include <stdio.h>

#include "tidepool/config.h"
#include "tidepool/wh.h"

/* Fills wc (after tp_wh_config_init) from cfg's [warehouse] section, then
 * from the DATABRICKS_* environment for what the file leaves empty. The
 * strings borrow from cfg and the environment. Cannot fail. */
void tp_ping_wh_config(tp_wh_config_t *wc, const tp_config_t *cfg);

/* Checks Postgres (connect, server version, migration state) and the
 * warehouse (configuration, authentication, warehouse id, a SELECT 1) and
 * prints one line per check to out: what works and, for what does not, why.
 * Never prints a secret. Returns 0 when everything works, 1 otherwise. */
int tp_ping_run(const tp_config_t *cfg, FILE *out);

#endif
