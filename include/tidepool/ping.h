/* Connectivity check for users (`tidepool-sync --ping`): the "Connection
 * Details" step of wiring an app, done by the program itself. */
#ifndef TIDEPOOL_PING_H
#define TIDEPOOL_PING_H

#include <stdio.h>

#include "tidepool/config.h"

/* Checks Postgres (connect, server version, migration state) and the
 * warehouse (configuration, authentication, warehouse id, a SELECT 1) and
 * prints one line per check to out: what works and, for what does not, why.
 * Never prints a secret. Returns 0 when everything works, 1 otherwise. */
int tp_ping_run(const tp_config_t *cfg, FILE *out);

#endif
