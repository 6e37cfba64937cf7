/* Unit tests for lib/auth_ratelimit.c: bursts, refill over time, Retry-After
 * values, independent keys, the bound on remembered keys with least-recent
 * eviction, a disabled limiter, a clock that steps back, and concurrent use
 * from several threads (the mutex; run under ASan/TSan-free builds too). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"
#include "tidepool/auth_ratelimit.h"

static void burst_then_refill(void)
{
    tp_ratelimit_t *rl = tp_ratelimit_new(2.0, 5.0, 100);
    int64_t t = 1000000;
    for (int i = 0; i < 5; i++)
        CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t), 1); /* empty: 1 token in 0.5 s -> 1 s */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t + 499), 1);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t + 500), 0); /* 2/s: one token per 500 ms */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t + 500), 1);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "bob", t + 500), 0); /* keys are independent */
    /* a long pause refills only up to the burst */
    t += 60000;
    for (int i = 0; i < 5; i++)
        CHECK_INT_EQ(tp_ratelimit_take(rl, "alice", t), 0);
    CHECK(tp_ratelimit_take(rl, "alice", t) > 0);
    CHECK_INT_EQ(tp_ratelimit_size(rl), 2);
    tp_ratelimit_free(rl);
}

static void retry_after_reflects_rate(void)
{
    tp_ratelimit_t *rl = tp_ratelimit_new(0.1, 1.0, 10); /* one request per 10 s */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 0), 10);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 2500), 8); /* 7.5 s left, rounded up */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 10000), 0);
    /* refused takes do not consume: the wait does not grow with retries */
    for (int i = 0; i < 50; i++)
        CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 10000), 10);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 20000), 0);
    /* a clock that goes back is treated as standing still */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 5000), 10);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 30000), 0);
    tp_ratelimit_free(rl);
    rl = tp_ratelimit_new(1000.0, 1.0, 10); /* fast rate: Retry-After is at least 1 */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 0), 1);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 1), 0);
    tp_ratelimit_free(rl);
}

static void memory_is_bounded(void)
{
    tp_ratelimit_t *rl = tp_ratelimit_new(1.0, 1.0, 3);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "a", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "b", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "c", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "a", 0), 1); /* a is now the most recent */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "d", 0), 0); /* evicts b, the least recent */
    CHECK_INT_EQ(tp_ratelimit_size(rl), 3);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "a", 0), 1); /* a was remembered */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "b", 0), 0); /* b was forgotten: full bucket; evicts c */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "d", 0), 1);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "c", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_size(rl), 3);
    /* many keys stay within the cap */
    char key[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "10.0.%d.%d", i / 256, i % 256);
        CHECK_INT_EQ(tp_ratelimit_take(rl, key, i), 0);
    }
    CHECK_INT_EQ(tp_ratelimit_size(rl), 3);
    tp_ratelimit_free(rl);
    rl = tp_ratelimit_new(1.0, 1.0, 0); /* 0 is raised to 1 */
    CHECK_INT_EQ(tp_ratelimit_take(rl, "x", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_take(rl, "y", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_size(rl), 1);
    tp_ratelimit_free(rl);
    tp_ratelimit_free(NULL);
}

static void disabled_limiter_allows_all(void)
{
    tp_ratelimit_t *rl = tp_ratelimit_new(0, 10, 10);
    for (int i = 0; i < 1000; i++)
        CHECK_INT_EQ(tp_ratelimit_take(rl, "k", 0), 0);
    CHECK_INT_EQ(tp_ratelimit_size(rl), 0);
    tp_ratelimit_free(rl);
}

typedef struct worker {
    tp_ratelimit_t *rl;
    int allowed;
} worker_t;

static void *hammer(void *arg)
{
    worker_t *w = arg;
    char key[16];
    for (int i = 0; i < 20000; i++) {
        snprintf(key, sizeof key, "k%d", i % 50);
        if (tp_ratelimit_take(w->rl, key, 0) == 0)
            w->allowed++;
    }
    return NULL;
}

/* Four threads on one limiter at a frozen clock: exactly burst per key pass. */
static void threads_share_one_limiter(void)
{
    tp_ratelimit_t *rl = tp_ratelimit_new(1.0, 10.0, 1000);
    pthread_t th[4];
    worker_t w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker_t){rl, 0};
        pthread_create(&th[i], NULL, hammer, &w[i]);
    }
    int total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        total += w[i].allowed;
    }
    CHECK_INT_EQ(total, 50 * 10);
    CHECK_INT_EQ(tp_ratelimit_size(rl), 50);
    tp_ratelimit_free(rl);
}

int main(void)
{
    TP_RUN(burst_then_refill);
    TP_RUN(retry_after_reflects_rate);
    TP_RUN(memory_is_bounded);
    TP_RUN(disabled_limiter_allows_all);
    TP_RUN(threads_share_one_limiter);
    return tp_test_done();
}
