/* Response cache, one per worker thread (no lock on the hot path; the price
 * is that each thread warms its own copy, so a key misses at most once per
 * thread). Keyed by dataset, canonical parameters, role and output format;
 * bounded in bytes with LRU eviction; each entry expires after the dataset's
 * @cache TTL and is ignored as soon as any job it @requires was invalidated
 * after the entry's query started (epochs in g_srv, bumped by the LISTEN
 * connection on tidepool_sync). Stale entries are dropped lazily on lookup or
 * by eviction. Single flight lives in datasets.c, not here. */
#include "server.h"

#include <string.h>

typedef struct node {
    struct node *hnext;           /* hash chain */
    struct node *prev, *next;     /* LRU: head = most recent */
    uint64_t h;
    char *key;
    centry_t e;
    uint64_t fill_epoch;
    int64_t expires_ms;
    int *jobs;
    size_t njobs;
    size_t cost;
} node_t;

struct cache {
    node_t **tab;
    size_t nbuckets;
    node_t *head, *tail;
    int64_t max_bytes, bytes;
    size_t count;
    metrics_t *m;
};

cache_t *cache_new(int64_t max_bytes, metrics_t *m)
{
    cache_t *c = tp_xcalloc(1, sizeof *c);
    c->nbuckets = 4096;
    c->tab = tp_xcalloc(c->nbuckets, sizeof *c->tab);
    c->max_bytes = max_bytes;
    c->m = m;
    return c;
}

static void publish(cache_t *c)
{
    atomic_store_explicit(&c->m->cache_bytes, (uint64_t)c->bytes, memory_order_relaxed);
    atomic_store_explicit(&c->m->cache_entries, (uint64_t)c->count, memory_order_relaxed);
}

static void unlink_node(cache_t *c, node_t *n)
{
    node_t **pp = &c->tab[n->h % c->nbuckets];
    while (*pp && *pp != n)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = n->hnext;
    if (n->prev)
        n->prev->next = n->next;
    else
        c->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        c->tail = n->prev;
    c->bytes -= (int64_t)n->cost;
    c->count--;
    free(n->key);
    free(n->e.body);
    free(n->jobs);
    free(n);
}

void cache_free(cache_t *c)
{
    if (!c)
        return;
    while (c->head)
        unlink_node(c, c->head);
    free(c->tab);
    free(c);
}

static void to_front(cache_t *c, node_t *n)
{
    if (c->head == n)
        return;
    n->prev->next = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        c->tail = n->prev;
    n->prev = NULL;
    n->next = c->head;
    c->head->prev = n;
    c->head = n;
}

const centry_t *cache_get(cache_t *c, const char *key)
{
    uint64_t h = hash64(key, strlen(key));
    for (node_t *n = c->tab[h % c->nbuckets]; n; n = n->hnext) {
        if (n->h != h || strcmp(n->key, key) != 0)
            continue;
        if (tp_now_ms() >= n->expires_ms || !jobs_unchanged(n->jobs, n->njobs, n->fill_epoch)) {
            unlink_node(c, n);
            publish(c);
            break;
        }
        to_front(c, n);
        atomic_fetch_add_explicit(&c->m->cache_hits, 1, memory_order_relaxed);
        return &n->e;
    }
    atomic_fetch_add_explicit(&c->m->cache_misses, 1, memory_order_relaxed);
    return NULL;
}

void cache_put(cache_t *c, const char *key, char *body, size_t len, const centry_t *meta,
               uint64_t fill_epoch, int64_t ttl_ms, const int *jobs, size_t njobs)
{
    size_t cost = len + strlen(key) + sizeof(node_t) + njobs * sizeof(int);
    if (ttl_ms <= 0 || (int64_t)cost > c->max_bytes / 4 || !jobs_unchanged(jobs, njobs, fill_epoch)) {
        free(body);
        return;
    }
    uint64_t h = hash64(key, strlen(key));
    for (node_t *n = c->tab[h % c->nbuckets]; n; n = n->hnext)
        if (n->h == h && strcmp(n->key, key) == 0) {
            unlink_node(c, n);
            break;
        }
    while (c->tail && c->bytes + (int64_t)cost > c->max_bytes) {
        unlink_node(c, c->tail);
        atomic_fetch_add_explicit(&c->m->cache_evictions, 1, memory_order_relaxed);
    }
    node_t *n = tp_xcalloc(1, sizeof *n);
    n->h = h;
    n->key = tp_xstrdup(key);
    n->e = *meta;
    n->e.body = body;
    n->e.len = len;
    n->fill_epoch = fill_epoch;
    n->expires_ms = tp_now_ms() + ttl_ms;
    n->njobs = njobs;
    n->jobs = tp_xcalloc(njobs ? njobs : 1, sizeof(int));
    if (njobs)
        memcpy(n->jobs, jobs, njobs * sizeof(int));
    n->cost = cost;
    n->hnext = c->tab[h % c->nbuckets];
    c->tab[h % c->nbuckets] = n;
    n->next = c->head;
    if (c->head)
        c->head->prev = n;
    c->head = n;
    if (!c->tail)
        c->tail = n;
    c->bytes += (int64_t)cost;
    c->count++;
    publish(c);
}
