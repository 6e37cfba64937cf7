/* curl multi-socket on libevent. Owns one CURLM per event_base, one event per
 * socket curl asks us to watch (created in the socket callback, freed on
 * CURL_POLL_REMOVE), and the single timer curl asks for. After every
 * curl_multi_socket_action it drains curl_multi_info_read, removes finished
 * easy handles from the multi and only then reports them, so a done callback
 * may free or re-add them. Timer updates only arm the libevent timer (curl
 * forbids calling socket_action from its own callbacks). It does not own the
 * easy handles, set any option on them besides CURLOPT_PRIVATE, or retry. */
#include "tidepool/curlev.h"

#include <pthread.h>
#include <stdlib.h>

#include <event2/event.h>

#include "tidepool/log.h"

#define CURLEV_MAGIC 0x43564556u /* "CVEV" */
#define SOCK_MAGIC 0x43565343u   /* "CVSC" */
#define XFER_MAGIC 0x43565846u   /* "CVXF" */

struct tp_curlev {
    uint32_t magic;
    struct event_base *base;
    CURLM *multi;
    struct event *timer;
    int running;
    int attached;
    struct xfer *xfers; /* attached transfers, to detach on free */
};

typedef struct sockctx {
    uint32_t magic;
    tp_curlev_t *cv;
    curl_socket_t fd;
    struct event *ev;
} sockctx_t;

typedef struct xfer {
    uint32_t magic;
    CURL *easy;
    tp_curlev_done_fn done;
    void *arg;
    struct xfer *prev, *next;
} xfer_t;

static pthread_once_t global_once = PTHREAD_ONCE_INIT;

static void global_init(void)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        tp_error("curl_global_init failed");
        abort();
    }
}

bool tp_curlev_async_dns(void)
{
    pthread_once(&global_once, global_init);
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    return v != NULL && (v->features & CURL_VERSION_ASYNCHDNS) != 0;
}

static void check_done(tp_curlev_t *cv)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(cv->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        xfer_t *x = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
        if (x == NULL || x->magic != XFER_MAGIC) {
            tp_error("curlev: finished transfer without its record");
            curl_multi_remove_handle(cv->multi, easy);
            continue;
        }
        tp_curlev_done_fn done = x->done;
        void *arg = x->arg;
        tp_curlev_remove(cv, easy);
        done(easy, rc, arg);
    }
}

static void on_socket_event(evutil_socket_t fd, short what, void *arg)
{
    sockctx_t *sc = arg;
    if (sc->magic != SOCK_MAGIC)
        abort();
    tp_curlev_t *cv = sc->cv;
    int action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    /* sc may be freed by curl's socket callback during this call */
    CURLMcode mc = curl_multi_socket_action(cv->multi, fd, action, &cv->running);
    if (mc != CURLM_OK)
        tp_error("curl_multi_socket_action: %s", curl_multi_strerror(mc));
    check_done(cv);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_curlev_t *cv = arg;
    if (cv->magic != CURLEV_MAGIC)
        abort();
    CURLMcode mc = curl_multi_socket_action(cv->multi, CURL_SOCKET_TIMEOUT, 0, &cv->running);
    if (mc != CURLM_OK)
        tp_error("curl_multi_socket_action(timeout): %s", curl_multi_strerror(mc));
    check_done(cv);
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    (void)easy;
    tp_curlev_t *cv = userp;
    sockctx_t *sc = socketp;
    if (cv->magic != CURLEV_MAGIC)
        abort();
    if (what == CURL_POLL_REMOVE) {
        if (sc != NULL) {
            if (sc->magic != SOCK_MAGIC)
                abort();
            event_free(sc->ev);
            sc->magic = 0;
            free(sc);
            curl_multi_assign(cv->multi, s, NULL);
        }
        return 0;
    }
    short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (sc == NULL) {
        sc = tp_xcalloc(1, sizeof(*sc));
        sc->magic = SOCK_MAGIC;
        sc->cv = cv;
        sc->fd = s;
        sc->ev = event_new(cv->base, s, kind, on_socket_event, sc);
        if (sc->ev == NULL)
            abort();
        curl_multi_assign(cv->multi, s, sc);
    } else {
        if (sc->magic != SOCK_MAGIC)
            abort();
        event_del(sc->ev); /* never event_assign a pending event */
        event_assign(sc->ev, cv->base, s, kind, on_socket_event, sc);
    }
    event_add(sc->ev, NULL);
    return 0;
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    tp_curlev_t *cv = userp;
    if (cv->magic != CURLEV_MAGIC)
        abort();
    if (timeout_ms < 0) {
        evtimer_del(cv->timer);
        return 0;
    }
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    evtimer_add(cv->timer, &tv);
    return 0;
}

tp_curlev_t *tp_curlev_new(struct event_base *base)
{
    pthread_once(&global_once, global_init);
    tp_curlev_t *cv = tp_xcalloc(1, sizeof(*cv));
    cv->magic = CURLEV_MAGIC;
    cv->base = base;
    cv->multi = curl_multi_init();
    cv->timer = evtimer_new(base, on_timer, cv);
    if (cv->multi == NULL || cv->timer == NULL)
        abort();
    curl_multi_setopt(cv->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(cv->multi, CURLMOPT_SOCKETDATA, cv);
    curl_multi_setopt(cv->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(cv->multi, CURLMOPT_TIMERDATA, cv);
    curl_multi_setopt(cv->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 64L);
    return cv;
}

void tp_curlev_set_max_host_connections(tp_curlev_t *cv, long n)
{
    curl_multi_setopt(cv->multi, CURLMOPT_MAX_HOST_CONNECTIONS, n);
}

void tp_curlev_free(tp_curlev_t *cv)
{
    if (cv == NULL)
        return;
    if (cv->magic != CURLEV_MAGIC)
        abort();
    while (cv->xfers != NULL)
        tp_curlev_remove(cv, cv->xfers->easy);
    /* Cleaning up the multi closes cached connections; the socket callback
     * frees their events, so the base must still exist here. */
    curl_multi_cleanup(cv->multi);
    event_free(cv->timer);
    cv->magic = 0;
    free(cv);
}

bool tp_curlev_add(tp_curlev_t *cv, CURL *easy, tp_curlev_done_fn done, void *arg)
{
    xfer_t *x = tp_xcalloc(1, sizeof(*x));
    x->magic = XFER_MAGIC;
    x->easy = easy;
    x->done = done;
    x->arg = arg;
    curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *)x);
    CURLMcode mc = curl_multi_add_handle(cv->multi, easy);
    if (mc != CURLM_OK) {
        tp_error("curl_multi_add_handle: %s", curl_multi_strerror(mc));
        curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
        x->magic = 0;
        free(x);
        return false;
    }
    x->next = cv->xfers;
    if (cv->xfers != NULL)
        cv->xfers->prev = x;
    cv->xfers = x;
    cv->attached++;
    return true;
}

void tp_curlev_remove(tp_curlev_t *cv, CURL *easy)
{
    xfer_t *x = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
    if (x == NULL)
        return;
    if (x->magic != XFER_MAGIC)
        abort();
    curl_multi_remove_handle(cv->multi, easy);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    if (x->prev != NULL)
        x->prev->next = x->next;
    else
        cv->xfers = x->next;
    if (x->next != NULL)
        x->next->prev = x->prev;
    cv->attached--;
    x->magic = 0;
    free(x);
}

int tp_curlev_running(const tp_curlev_t *cv)
{
    return cv->attached;
}
