/* libcurl's multi-socket interface driven by a libevent event_base: one
 * tp_curlev_t (one CURLM) per loop. Transfers are plain CURL easy handles owned
 * by the caller; this module only adds them, drives them and reports each one
 * finished, after removing it from the multi handle. */
#ifndef TIDEPOOL_CURLEV_H
#define TIDEPOOL_CURLEV_H

#include <stdbool.h>

#include <curl/curl.h>

#include "tidepool/util.h"

struct event_base;

typedef struct tp_curlev tp_curlev_t;

/* Called once per added transfer when curl finishes it (rc is its CURLcode).
 * The easy handle has already been removed from the multi handle: the callee
 * may clean it up, re-add it or add others. */
typedef void (*tp_curlev_done_fn)(CURL *easy, CURLcode rc, void *arg);

/* Creates the multi handle for base (which must outlive the result). Calls
 * curl_global_init once per process. Aborts on out of memory; never NULL. */
tp_curlev_t *tp_curlev_new(struct event_base *base);
/* Caps connections per host (CURLMOPT_MAX_HOST_CONNECTIONS); 0 = unlimited. */
void tp_curlev_set_max_host_connections(tp_curlev_t *cv, long n);
/* Removes any transfer still attached (without calling its done callback; the
 * caller still owns and cleans up those easy handles), frees socket events,
 * then cleans up the multi handle. Call while base still exists. NULL: no-op. */
void tp_curlev_free(tp_curlev_t *cv);
/* Starts a transfer. Uses CURLOPT_PRIVATE of easy. False (logged) if curl
 * refused the handle; done is then never called. */
bool tp_curlev_add(tp_curlev_t *cv, CURL *easy, tp_curlev_done_fn done, void *arg) TP_WUR;
/* Stops a transfer that has not finished yet, without calling done. Must not
 * be called from inside one of easy's own curl callbacks (write, header). */
void tp_curlev_remove(tp_curlev_t *cv, CURL *easy);
/* Number of transfers attached. */
int tp_curlev_running(const tp_curlev_t *cv);
/* True when libcurl resolves names without blocking (CURL_VERSION_ASYNCHDNS). */
bool tp_curlev_async_dns(void);

#endif
