/* Token-bucket rate limiter keyed by a string (an identity or a client
 * address), with a hard cap on the number of keys: when full, the key used
 * least recently is forgotten (it starts again with a full bucket).
 * Thread-safe: every call takes the limiter's own mutex, so one limiter may
 * be shared by all event-loop threads (the critical section is a hash lookup). */
#ifndef TIDEPOOL_AUTH_RATELIMIT_H
#define TIDEPOOL_AUTH_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tp_ratelimit tp_ratelimit_t;

/* rate_per_s tokens are added per second up to burst (a key's first request
 * finds a full bucket). rate_per_s <= 0 disables limiting: every take is
 * allowed and nothing is stored. max_keys >= 1 bounds memory. Owned. */
tp_ratelimit_t *tp_ratelimit_new(double rate_per_s, double burst, size_t max_keys);
/* Frees rl and every remembered key; NULL is a no-op. */
void tp_ratelimit_free(tp_ratelimit_t *rl);

/* Takes one token for key at now_ms (any monotonic millisecond clock, e.g.
 * tp_now_ms; a clock that goes back is treated as standing still). Returns 0
 * when allowed, else the whole seconds (>= 1) after which one token will be
 * available: the value for a Retry-After header. */
int64_t tp_ratelimit_take(tp_ratelimit_t *rl, const char *key, int64_t now_ms);

/* Keys currently remembered (tests, /metrics). */
size_t tp_ratelimit_size(tp_ratelimit_t *rl);

#endif
