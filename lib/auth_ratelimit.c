/* Token-bucket rate limiter for abuse limits (issue 8 item 5).
 *
 * Owns a hash table of buckets (open hashing, FNV-1a over the key, table
 * size a power of two at least twice max_keys so chains stay short) and an
 * LRU list through the same entries: every take moves its key to the front;
 * inserting into a full limiter evicts the tail. A bucket holds its tokens as
 * a double and the time it was last refilled, so refill is computed lazily on
 * the next take; no timers, no background work.
 *
 * A mutex makes every call atomic. Deliberately not here: sharing across
 * processes, and any idea of what a key means (auth decides identity or
 * address). */
#include "tidepool/auth_ratelimit.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/util.h"

typedef struct bucket {
    char *key;
    uint64_t hash;
    double tokens;
    int64_t at_ms;
    struct bucket *chain;            /* next in hash slot */
    struct bucket *newer, *older;    /* LRU list */
} bucket_t;

struct tp_ratelimit {
    pthread_mutex_t mu;
    double rate, burst;
    size_t max_keys, count;
    bucket_t **slots;
    size_t nslots; /* power of two */
    bucket_t *newest, *oldest;
};

tp_ratelimit_t *tp_ratelimit_new(double rate_per_s, double burst, size_t max_keys)
{
    tp_ratelimit_t *rl = tp_xcalloc(1, sizeof *rl);
    pthread_mutex_init(&rl->mu, NULL);
    rl->rate = rate_per_s;
    rl->burst = burst < 1 ? 1 : burst;
    rl->max_keys = max_keys < 1 ? 1 : max_keys;
    rl->nslots = 16;
    while (rl->nslots < 2 * rl->max_keys && rl->nslots < ((size_t)1 << 24))
        rl->nslots <<= 1;
    if (rate_per_s > 0)
        rl->slots = tp_xcalloc(rl->nslots, sizeof *rl->slots);
    return rl;
}

void tp_ratelimit_free(tp_ratelimit_t *rl)
{
    if (rl == NULL)
        return;
    for (bucket_t *b = rl->newest, *next; b != NULL; b = next) {
        next = b->older;
        free(b->key);
        free(b);
    }
    free(rl->slots);
    pthread_mutex_destroy(&rl->mu);
    free(rl);
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static void lru_unlink(tp_ratelimit_t *rl, bucket_t *b)
{
    if (b->newer)
        b->newer->older = b->older;
    else
        rl->newest = b->older;
    if (b->older)
        b->older->newer = b->newer;
    else
        rl->oldest = b->newer;
    b->newer = b->older = NULL;
}

static void lru_push_front(tp_ratelimit_t *rl, bucket_t *b)
{
    b->older = rl->newest;
    b->newer = NULL;
    if (rl->newest)
        rl->newest->newer = b;
    rl->newest = b;
    if (rl->oldest == NULL)
        rl->oldest = b;
}

static void evict_oldest(tp_ratelimit_t *rl)
{
    bucket_t *victim = rl->oldest;
    lru_unlink(rl, victim);
    bucket_t **pp = &rl->slots[victim->hash & (rl->nslots - 1)];
    while (*pp != victim)
        pp = &(*pp)->chain;
    *pp = victim->chain;
    free(victim->key);
    free(victim);
    rl->count--;
}

static bucket_t *lookup_or_add(tp_ratelimit_t *rl, const char *key, int64_t now_ms)
{
    uint64_t h = fnv1a(key);
    bucket_t **slot = &rl->slots[h & (rl->nslots - 1)];
    for (bucket_t *b = *slot; b != NULL; b = b->chain) {
        if (b->hash == h && strcmp(b->key, key) == 0) {
            lru_unlink(rl, b);
            lru_push_front(rl, b);
            return b;
        }
    }
    if (rl->count >= rl->max_keys)
        evict_oldest(rl);
    bucket_t *b = tp_xcalloc(1, sizeof *b);
    b->key = tp_xstrdup(key);
    b->hash = h;
    b->tokens = rl->burst;
    b->at_ms = now_ms;
    b->chain = *slot;
    *slot = b;
    lru_push_front(rl, b);
    rl->count++;
    return b;
}

int64_t tp_ratelimit_take(tp_ratelimit_t *rl, const char *key, int64_t now_ms)
{
    if (rl->rate <= 0)
        return 0;
    pthread_mutex_lock(&rl->mu);
    bucket_t *b = lookup_or_add(rl, key ? key : "", now_ms);
    if (now_ms > b->at_ms) {
        b->tokens = fmin(rl->burst, b->tokens + (double)(now_ms - b->at_ms) * rl->rate / 1000.0);
        b->at_ms = now_ms;
    }
    int64_t retry = 0;
    if (b->tokens >= 1.0 - 1e-9) { /* tolerate rounding in the refill sum */
        b->tokens = fmax(0.0, b->tokens - 1.0);
    } else {
        double wait_s = (1.0 - b->tokens) / rl->rate;
        retry = (int64_t)ceil(wait_s);
        if (retry < 1)
            retry = 1;
    }
    pthread_mutex_unlock(&rl->mu);
    return retry;
}

size_t tp_ratelimit_size(tp_ratelimit_t *rl)
{
    pthread_mutex_lock(&rl->mu);
    size_t n = rl->count;
    pthread_mutex_unlock(&rl->mu);
    return n;
}
