/* tidepool-sync's daemon: scheduler, signals, triggers and --once, on one
 * libevent loop. Program-private; main.c only parses options and calls these. */
#ifndef TIDEPOOL_DAEMON_SYNCD_H
#define TIDEPOOL_DAEMON_SYNCD_H

#include <stdbool.h>
#include <stdio.h>

#include "tidepool/config.h"
#include "tidepool/util.h"

typedef struct tp_syncd_opts {
    bool once;            /* run jobs once and exit */
    const char *once_job; /* with once: only this job (NULL = all) */
    bool progress;        /* print a progress line on stderr (main sets it for a TTY) */
    bool migrate;         /* apply pending migrations at start-up (default true) */
} tp_syncd_opts_t;

/* Loads the job definitions of dir and prints what it found to out ("job NAME:
 * MODE -> TARGET every ..."); on problems prints each "file:line: message" to
 * err and returns false. */
bool tp_syncd_check(const char *dir, FILE *out, FILE *err) TP_WUR;

/* Applies pending migrations (blocking; start-up and --migrate only). Logs
 * the count applied, or the error naming the file; returns success. */
bool tp_syncd_migrate(const tp_config_t *cfg) TP_WUR;

/* Runs the daemon (or the --once pass) with cfg (borrowed for the whole run).
 * Returns the process exit status: 0 ok, 1 a run failed (--once) or a runtime
 * failure, 2 configuration error (bad definitions at start-up, unknown job). */
int tp_syncd_run(const tp_config_t *cfg, const tp_syncd_opts_t *opts);

#endif
