/* The demo page's static files (static.c): loaded once at start, served from
 * memory. Program-private to tidepool-server. */
#ifndef TIDEPOOL_SERVER_STATIC_H
#define TIDEPOOL_SERVER_STATIC_H

#include <stdbool.h>
#include <stdio.h>

#include "server.h"

/* Loads every regular file under [server] web_root (and web_vendor) into
 * memory, before the workers start. Never fatal: a missing directory is
 * logged and the page answers 404 problems that say why. With out non-NULL
 * (--check) prints what it found there instead of logging. */
void static_load(const tp_config_t *cfg, FILE *out);
/* Frees what static_load built (workers stopped). */
void static_free(void);
/* Serves "/" or "/web/..." (path already percent-decoded and free of . and ..
 * segments by the router); false when path is not ours (nothing sent). */
bool static_serve(rq_t *r, const char *path);

#endif
