/* Service manager notifications (the sd_notify protocol) and the systemd
 * watchdog keep-alive. Every function is a silent no-op when NOTIFY_SOCKET is
 * unset, so the same binary runs under systemd, Databricks Apps and a shell. */
#ifndef TIDEPOOL_NOTIFY_H
#define TIDEPOOL_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>

#include "tidepool/util.h"

struct event_base;

/* Sends one datagram holding state (newline-separated KEY=VALUE assignments,
 * e.g. "READY=1") to $NOTIFY_SOCKET. Returns true when it was sent or when
 * NOTIFY_SOCKET is unset or empty (nothing to notify). Returns false, after
 * logging a warning naming the reason, when the variable is malformed, the
 * socket cannot be reached, or the receiver's queue is full (never blocks). */
bool tp_notify_send(const char *state) TP_WUR;

/* Convenience wrappers around tp_notify_send. A failure is logged there and
 * otherwise ignored: the service manager notices a missing READY or keep-alive
 * by its own timeouts, which is the right place to act on it. */
void tp_notify_ready(void);              /* "READY=1": start-up (or a reload) finished */
void tp_notify_stopping(void);           /* "STOPPING=1": shutdown has begun */
void tp_notify_watchdog(void);           /* "WATCHDOG=1": one keep-alive */
/* "RELOADING=1\nMONOTONIC_USEC=<CLOCK_MONOTONIC in µs>", as systemd 253+ asks;
 * send tp_notify_ready() when the reload is done (whether it succeeded or not). */
void tp_notify_reloading(void);
/* "STATUS=<text>": one line shown by `systemctl status`. Newlines in the
 * formatted text are replaced by spaces; the text is cut at 1000 bytes. */
void tp_notify_status(const char *fmt, ...) TP_PRINTF(1, 2);

/* The watchdog interval the service manager asked this process for, in
 * microseconds: WATCHDOG_USEC when it is a positive integer and WATCHDOG_PID is
 * unset or equals getpid(); 0 when the watchdog is off (a malformed value is
 * logged and treated as off). */
uint64_t tp_notify_watchdog_usec(void);

typedef struct tp_notify_wd tp_notify_wd_t;

/* Arms a persistent timer on base that sends "WATCHDOG=1" every half watchdog
 * interval. Because the keep-alive is sent from the loop itself, a loop that is
 * stuck stops sending and the service manager restarts the service. Sets *out
 * to a new owned handle, or to NULL when the watchdog is off (nothing armed).
 * Returns false (with *out NULL) only if libevent refuses the timer. The handle
 * must be freed with tp_notify_wd_free before base is freed. */
bool tp_notify_wd_start(struct event_base *base, tp_notify_wd_t **out) TP_WUR;
/* Makes each keep-alive depend on healthy(arg, why, whylen) too: while it
 * returns false (why says what is stuck) no keep-alive is sent, so the service
 * manager restarts a process one of whose other threads no longer turns, not
 * only one whose main loop is stuck. The first withheld keep-alive is logged.
 * Call from the thread of wd's loop; NULL healthy removes the check. */
void tp_notify_wd_set_check(tp_notify_wd_t *wd, bool (*healthy)(void *arg, char *why, size_t whylen),
                            void *arg);
/* Disarms and frees the timer; NULL is a no-op. */
void tp_notify_wd_free(tp_notify_wd_t *wd);
/* Keep-alives sent so far by this handle (for tests and /metrics). */
uint64_t tp_notify_wd_sent(const tp_notify_wd_t *wd);

#endif
