/* The sync daemon's scheduler on one libevent loop. Owns the job table (one
 * slot per defined job: its timer, its run in flight, whether it waits for a
 * free slot), the warehouse client, the LISTEN tidepool_trigger connection,
 * the signal events and the --once pass. Each job runs on its @every with
 * +-10% jitter, never overlapping itself, at most sync.max_concurrent_jobs at
 * once; a failed run is retried sooner (5 s doubling, capped by @every).
 * SIGHUP re-reads the config file (log.level, sync.definitions and
 * sync.max_concurrent_jobs apply at once; other changed settings are logged
 * as needing a restart) and reloads the definitions: a broken set is logged
 * and the old one keeps running; runs in flight finish with the definition
 * they started with (sets are reference-counted). SIGTERM/SIGINT cancel runs in flight and
 * leave the loop within the shutdown deadline. Does not touch Postgres itself
 * except for LISTEN: each run owns its own session (syncjob.c). */
#include "syncd.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "tidepool/pgconn.h"
#include "syncjob.h"
#include "tidepool/defs.h"
#include "tidepool/lakebase.h"
#include "tidepool/log.h"
#include "tidepool/migrate.h"
#include "shipper.h"
#include "tidepool/notify.h"
#include "tidepool/pg.h"
#include "tidepool/wh.h"
#include "tidepool/wh_settings.h"

#define SLOT_MAGIC 0x736c6f74u
#define SHUTDOWN_DEADLINE_MS 8000
#define ONCE_ATTEMPTS 3 /* --once: a transient failure is retried this many times in all */

typedef struct defset {
    tp_defs_set_t *set;
    int refs;
} defset_t;

typedef struct slot {
    unsigned magic;
    struct syncd *d;
    char *name;
    const tp_defs_job_t *def; /* in d->cur */
    struct event *timer;
    tp_syncjob_t *run;
    defset_t *run_set; /* set the running definition belongs to */
    bool waiting;      /* due, waiting for a free slot */
    bool rerun;        /* triggered while running: run again right after */
    bool removed;      /* gone from the definitions; drop once idle */
    char *trigger;
    int failures;
    int attempts; /* --once: runs started */
    struct slot *next_wait;
} slot_t;

#define SYNCD_MAGIC 0x73796e64u

typedef struct syncd {
    unsigned magic;
    const tp_config_t *cfg;
    const tp_syncd_opts_t *opts;
    struct event_base *base;
    tp_wh_t *wh;
    tp_syncenv_t env;
    defset_t *cur;
    slot_t **slots;
    size_t n_slots;
    slot_t *wait_head, *wait_tail;
    int running;
    int max_running;
    char *defs_dir; /* sync.definitions, as of the last good config (re)load */
    /* --once */
    int once_pending;
    int once_failed;
    /* shutdown */
    bool stopping;
    tp_shipper_t *shipper; /* outbox shipper thread (daemon mode only) */
    struct event *ev_term, *ev_int, *ev_hup, *ev_progress, *ev_listen_check, *ev_deadline;
    tp_pgconn_t *listen;
    tp_lakebase_t *lb; /* postgres.password_source = lakebase, else NULL */
    bool lb_refused;   /* a login was refused since the last token handed out */
    tp_pg_password_provider_t pw; /* env.pw points here when passwords are ours */
    tp_notify_wd_t *wd;
    bool progress_shown;
    char daemon_id[300];
} syncd_t;

static void start_run(slot_t *s);

/* The daemon behind a libevent/libpq callback argument. */
static syncd_t *daemon_of(void *arg)
{
    syncd_t *d = arg;
    if (d == NULL || d->magic != SYNCD_MAGIC)
        abort();
    return d;
}

/* ---- definition sets ---- */

static defset_t *defset_load(const char *dir, tp_defs_diag_t *diag)
{
    tp_defs_set_t *set = tp_defs_set_new();
    if (!tp_defs_load_jobs(set, dir, diag)) {
        tp_defs_set_free(set);
        return NULL;
    }
    defset_t *d = tp_xcalloc(1, sizeof(*d));
    d->set = set;
    d->refs = 1;
    return d;
}

static void defset_unref(defset_t *d)
{
    if (d && --d->refs == 0) {
        tp_defs_set_free(d->set);
        free(d);
    }
}

bool tp_syncd_check(const char *dir, FILE *out, FILE *err)
{
    tp_defs_diag_t diag = {0};
    defset_t *d = defset_load(dir, &diag);
    for (size_t i = 0; i < diag.n; i++)
        fprintf(err, "%s\n", diag.msgs[i]);
    tp_defs_diag_free(&diag);
    if (d == NULL)
        return false;
    for (size_t i = 0; i < d->set->n_jobs; i++) {
        const tp_defs_job_t *j = &d->set->jobs[i];
        fprintf(out, "job %s: %s -> %s every %llds%s%s\n", j->name,
                j->mode == TP_DEFS_SNAPSHOT ? "snapshot" : "incremental", j->target,
                (long long)(j->every_ms / 1000), j->n_key ? " key " : "", j->n_key ? j->key[0] : "");
    }
    if (d->set->n_jobs == 0)
        fprintf(out, "no sync jobs in %s\n", dir);
    defset_unref(d);
    return true;
}

/* ---- scheduling ---- */

static slot_t *slot_find(syncd_t *d, const char *name)
{
    for (size_t i = 0; i < d->n_slots; i++)
        if (strcmp(d->slots[i]->name, name) == 0)
            return d->slots[i];
    return NULL;
}

static void arm(slot_t *s, int64_t ms)
{
    if (s->d->opts->once || s->d->stopping || s->removed)
        return;
    if (ms < 0)
        ms = 0;
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    evtimer_del(s->timer);
    evtimer_add(s->timer, &tv);
}

static void enqueue(slot_t *s, const char *trigger)
{
    syncd_t *d = s->d;
    if (d->stopping || s->removed)
        return;
    if (s->run) {
        s->rerun = true;
        return;
    }
    if (s->waiting)
        return;
    free(s->trigger);
    s->trigger = tp_xstrdup(trigger);
    evtimer_del(s->timer);
    if (d->running < d->max_running) {
        start_run(s);
        return;
    }
    s->waiting = true;
    s->next_wait = NULL;
    if (d->wait_tail)
        d->wait_tail->next_wait = s;
    else
        d->wait_head = s;
    d->wait_tail = s;
}

static void start_waiting(syncd_t *d)
{
    while (d->wait_head && d->running < d->max_running && !d->stopping) {
        slot_t *s = d->wait_head;
        d->wait_head = s->next_wait;
        if (d->wait_head == NULL)
            d->wait_tail = NULL;
        s->waiting = false;
        s->next_wait = NULL;
        if (!s->removed)
            start_run(s);
    }
}

static void slot_free(slot_t *s)
{
    if (s->timer)
        event_free(s->timer);
    free(s->name);
    free(s->trigger);
    s->magic = 0;
    free(s);
}

static void drop_removed(syncd_t *d)
{
    size_t k = 0;
    for (size_t i = 0; i < d->n_slots; i++) {
        slot_t *s = d->slots[i];
        if (s->removed && s->run == NULL && !s->waiting)
            slot_free(s);
        else
            d->slots[k++] = s;
    }
    d->n_slots = k;
}

static void maybe_exit(syncd_t *d)
{
    if ((d->opts->once && d->once_pending == 0) || (d->stopping && d->running == 0))
        event_base_loopexit(d->base, NULL);
}

/* Jobs defined, and how many of them failed their last run. */
static void job_counts(const syncd_t *d, size_t *jobs, size_t *failing)
{
    *jobs = *failing = 0;
    for (size_t i = 0; i < d->n_slots; i++) {
        if (d->slots[i]->removed)
            continue;
        (*jobs)++;
        if (d->slots[i]->failures > 0)
            (*failing)++;
    }
}

/* STATUS= after a run of s ended (daemon mode; one datagram per run, never per
 * row): "daily_metrics ok 90000 rows in 1.2s; 3 jobs", or the failure (its
 * message cut short; the log has it whole) and how many jobs are failing. */
static void status_run_done(const syncd_t *d, const slot_t *s, tp_syncjob_t *r,
                            tp_syncjob_outcome_t outcome)
{
    if (d->opts->once || d->stopping)
        return;
    size_t jobs, failing;
    job_counts(d, &jobs, &failing);
    double secs = (double)(tp_now_ms() - tp_syncjob_started_ms(r)) / 1000.0;
    char tail[64];
    snprintf(tail, sizeof tail, "%zu job%s", jobs, jobs == 1 ? "" : "s");
    if (failing > 0)
        snprintf(tail + strlen(tail), sizeof tail - strlen(tail), ", %zu failing", failing);
    switch (outcome) {
    case TP_SYNCJOB_SUCCEEDED:
        tp_notify_status("%s ok %lld rows in %.1fs; %s", s->name, (long long)tp_syncjob_rows(r),
                         secs, tail);
        break;
    case TP_SYNCJOB_FAILED:
        tp_notify_status("%s failed after %.1fs: %.400s; %s", s->name, secs,
                         tp_syncjob_error_detail(r), tail);
        break;
    case TP_SYNCJOB_SKIPPED:
        tp_notify_status("%s skipped: another tidepool-sync runs it; %s", s->name, tail);
        break;
    case TP_SYNCJOB_CANCELED:
        break;
    }
}

static void on_run_done(tp_syncjob_t *r, tp_syncjob_outcome_t outcome, void *arg)
{
    slot_t *s = arg;
    if (s->magic != SLOT_MAGIC)
        abort();
    syncd_t *d = s->d;
    int64_t every = s->def ? s->def->every_ms : 60000;
    bool retry_once = d->opts->once && outcome == TP_SYNCJOB_FAILED && tp_syncjob_retryable(r) &&
                      s->attempts < ONCE_ATTEMPTS && !d->stopping;
    if (retry_once) {
        tp_syncjob_free(r);
        defset_unref(s->run_set);
        s->run_set = NULL;
        s->run = NULL;
        d->running--;
        int64_t back = tp_jitter_ms(1000LL << (s->attempts - 1), 0.2);
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", s->name, NULL}),
                 "transient failure; retrying in %lld ms (attempt %d of %d)", (long long)back,
                 s->attempts + 1, ONCE_ATTEMPTS);
        struct timeval tv = {(time_t)(back / 1000), (suseconds_t)((back % 1000) * 1000)};
        evtimer_add(s->timer, &tv);
        start_waiting(d);
        return;
    }
    if (outcome == TP_SYNCJOB_FAILED) {
        s->failures++;
        if (d->opts->once)
            d->once_failed++;
    } else if (outcome == TP_SYNCJOB_SUCCEEDED) {
        s->failures = 0;
    } else if (outcome == TP_SYNCJOB_SKIPPED && d->opts->once) {
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", s->name, NULL}),
                 "job not run: another tidepool-sync holds it");
    } else if (outcome == TP_SYNCJOB_CANCELED && d->opts->once) {
        d->once_failed++;
    }
    status_run_done(d, s, r, outcome);
    tp_syncjob_free(r);
    defset_unref(s->run_set);
    s->run_set = NULL;
    s->run = NULL;
    d->running--;
    if (d->opts->once)
        d->once_pending--;
    if (s->removed) {
        drop_removed(d);
    } else if (s->rerun && !d->opts->once) {
        s->rerun = false;
        enqueue(s, "notify");
    } else {
        int64_t next = every;
        if (s->failures > 0) {
            int sh = s->failures > 10 ? 10 : s->failures - 1;
            int64_t back = 5000LL << sh;
            if (back < next)
                next = back;
        }
        arm(s, tp_jitter_ms(next, 0.1));
    }
    start_waiting(d);
    maybe_exit(d);
}

static void start_run(slot_t *s)
{
    syncd_t *d = s->d;
    d->running++;
    s->attempts++;
    s->run_set = d->cur;
    d->cur->refs++;
    s->run = tp_syncjob_start(&d->env, s->def, s->trigger ? s->trigger : "schedule", on_run_done, s);
}

static void on_slot_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    slot_t *s = arg;
    if (s->magic != SLOT_MAGIC)
        abort();
    enqueue(s, s->d->opts->once ? "once" : "schedule");
}

static slot_t *slot_new(syncd_t *d, const tp_defs_job_t *j)
{
    slot_t *s = tp_xcalloc(1, sizeof(*s));
    s->magic = SLOT_MAGIC;
    s->d = d;
    s->name = tp_xstrdup(j->name);
    s->def = j;
    s->timer = evtimer_new(d->base, on_slot_timer, s);
    return s;
}

/* Installs set as the current definitions: keeps slots of surviving jobs,
 * adds new ones (first run after a short jitter), marks vanished ones. */
static void install(syncd_t *d, defset_t *set, bool startup)
{
    defset_t *old = d->cur;
    d->cur = set;
    for (size_t i = 0; i < d->n_slots; i++) {
        slot_t *s = d->slots[i];
        const tp_defs_job_t *j = tp_defs_job_find(set->set, s->name);
        if (j == NULL) {
            s->removed = true;
            s->def = NULL;
            evtimer_del(s->timer);
            tp_logkv(TP_LOG_INFO, ((const char *[]){"job", s->name, NULL}), "job removed");
        } else {
            s->def = j;
        }
    }
    for (size_t i = 0; i < set->set->n_jobs; i++) {
        const tp_defs_job_t *j = &set->set->jobs[i];
        if (slot_find(d, j->name))
            continue;
        d->slots = tp_xrealloc(d->slots, (d->n_slots + 1) * sizeof(*d->slots));
        slot_t *s = slot_new(d, j);
        d->slots[d->n_slots++] = s;
        if (!startup)
            tp_logkv(TP_LOG_INFO, ((const char *[]){"job", s->name, NULL}), "job added");
        /* Spread first runs over a second or two so start-up is not a burst. */
        arm(s, (int64_t)(tp_random_u64() % 2000));
    }
    drop_removed(d);
    defset_unref(old);
}

static bool reload(syncd_t *d)
{
    tp_defs_diag_t diag = {0};
    defset_t *set = defset_load(d->defs_dir, &diag);
    if (set == NULL) {
        for (size_t i = 0; i < diag.n; i++)
            tp_logkv(TP_LOG_ERROR, ((const char *[]){"problem", diag.msgs[i], NULL}),
                     "reload refused: %s", diag.msgs[i]);
        tp_error("reload refused: %zu problem(s) in %s; the previous definitions keep running", diag.n,
                 d->defs_dir);
        tp_defs_diag_free(&diag);
        return false;
    }
    tp_defs_diag_free(&diag);
    install(d, set, false);
    tp_info("definitions reloaded: %zu job(s)", set->set->n_jobs);
    return true;
}

/* ---- triggers (LISTEN tidepool_trigger) ---- */

static void on_trigger(tp_pgconn_t *c, const char *channel, const char *payload, void *arg)
{
    (void)c;
    (void)channel;
    syncd_t *d = daemon_of(arg);
    slot_t *s = slot_find(d, payload ? payload : "");
    if (s == NULL || s->removed) {
        tp_logkv(TP_LOG_WARN, ((const char *[]){"job", payload, NULL}), "trigger for an unknown job ignored");
        return;
    }
    tp_logkv(TP_LOG_INFO, ((const char *[]){"job", s->name, NULL}), "run triggered by NOTIFY");
    enqueue(s, "notify");
}

static void on_listening(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)res;
    syncd_t *d = daemon_of(arg);
    if (err) {
        tp_warn("LISTEN tidepool_trigger failed: %s", err);
        return;
    }
    tp_pgconn_on_notify(c, on_trigger, d);
}

static void on_listen_connected(tp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)res;
    syncd_t *d = daemon_of(arg);
    if (err) {
        tp_warn("trigger listener: %s (retrying)", err);
        return;
    }
    if (!tp_pgconn_query(c, "LISTEN tidepool_trigger", 0, NULL, NULL, on_listening, d))
        tp_warn("LISTEN tidepool_trigger: %s", tp_pgconn_error(c));
}

static void listen_start(syncd_t *d)
{
    tp_pgconn_free(d->listen);
    d->listen = tp_pgconn_new(d->base, d->cfg->postgres.dsn, "tidepool-sync-listen", d->env.pw);
    if (!tp_pgconn_connect(d->listen, (int)d->env.connect_timeout_ms, on_listen_connected, d))
        tp_warn("trigger listener: %s (retrying)", tp_pgconn_error(d->listen));
}

static void on_listen_check(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    syncd_t *d = daemon_of(arg);
    if (d->stopping)
        return;
    PGconn *pc = d->listen ? tp_pgconn_pg(d->listen) : NULL;
    if (pc == NULL || PQstatus(pc) == CONNECTION_BAD)
        listen_start(d);
}

/* ---- signals, progress ---- */

static void begin_shutdown(syncd_t *d, const char *why)
{
    if (d->stopping)
        return;
    d->stopping = true;
    tp_notify_stopping();
    tp_shipper_request_stop(d->shipper);
    tp_info("shutting down (%s): cancelling %d run(s) in flight", why, d->running);
    for (size_t i = 0; i < d->n_slots; i++) {
        evtimer_del(d->slots[i]->timer);
        if (d->slots[i]->run)
            tp_syncjob_cancel(d->slots[i]->run, why);
    }
    d->wait_head = d->wait_tail = NULL;
    for (size_t i = 0; i < d->n_slots; i++)
        d->slots[i]->waiting = false;
    struct timeval tv = {SHUTDOWN_DEADLINE_MS / 1000, 0};
    evtimer_add(d->ev_deadline, &tv);
    maybe_exit(d);
}

static int max_running_of(const tp_config_t *c)
{
    return c->sync.max_concurrent_jobs > 0 ? (int)c->sync.max_concurrent_jobs : 4;
}

/* SIGHUP, part one: the settings the daemon applies without a restart. The
 * rest of the file (connections, warehouse client, shipper) stays as it
 * started; tp_config_reload says which changed settings wait for a restart. */
static bool config_reload(syncd_t *d)
{
    static const char *const live[] = {"log.level", "sync.definitions",
                                       "sync.max_concurrent_jobs", NULL};
    static const char *const not_ours[] = {"server", "auth", NULL};
    const tp_config_reload_scope_t scope = {.live = live, .ignored_sections = not_ours};
    tp_config_t eff;
    tp_config_t *fresh = tp_config_reload(d->cfg, &scope, &eff);
    if (!fresh)
        return false;
    tp_log_level_t lvl;
    if (eff.log.level && tp_log_parse_level(eff.log.level, &lvl))
        tp_log_set_level(lvl);
    free(d->defs_dir);
    d->defs_dir = tp_xstrdup(eff.sync.definitions);
    d->max_running = max_running_of(&eff);
    tp_config_free(fresh);
    free(fresh);
    start_waiting(d); /* a higher limit starts due jobs now */
    tp_info("configuration reloaded: at most %d job(s) at once, definitions from %s",
            d->max_running, d->defs_dir);
    return true;
}

/* STATUS= of the daemon at rest: at start and after each SIGHUP. */
static void status_jobs(const syncd_t *d, const char *what)
{
    size_t jobs, failing;
    job_counts(d, &jobs, &failing);
    tp_notify_status("%s %zu job%s, at most %d at once%s", what, jobs, jobs == 1 ? "" : "s",
                     d->max_running, failing > 0 ? "; some failing (see log)" : "");
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    syncd_t *d = daemon_of(arg);
    if (sig == SIGHUP) {
        tp_info("SIGHUP: reloading configuration and definitions");
        tp_notify_reloading();
        bool cfg_ok = config_reload(d);
        bool defs_ok = reload(d);
        tp_notify_ready();
        status_jobs(d, cfg_ok && defs_ok ? "reloaded: running"
                                         : "reload failed (see log), still running");
        return;
    }
    begin_shutdown(d, sig == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    syncd_t *d = daemon_of(arg);
    tp_warn("shutdown deadline reached with %d run(s) still unwinding; exiting", d->running);
    event_base_loopbreak(d->base);
}

static void on_progress(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    syncd_t *d = daemon_of(arg);
    int64_t rows = 0, bytes = 0, first = 0;
    int n = 0;
    for (size_t i = 0; i < d->n_slots; i++) {
        tp_syncjob_t *r = d->slots[i]->run;
        if (!r)
            continue;
        rows += tp_syncjob_rows(r);
        bytes += tp_syncjob_bytes(r);
        if (n == 0 || tp_syncjob_started_ms(r) < first)
            first = tp_syncjob_started_ms(r);
        n++;
    }
    if (n == 0)
        return;
    double secs = (double)(tp_now_ms() - first) / 1000.0;
    fprintf(stderr, "\r%d job(s) running: %lld rows, %.1f MB, %.0f rows/s   ", n, (long long)rows,
            (double)bytes / 1e6, secs > 0 ? (double)rows / secs : 0.0);
    fflush(stderr);
    d->progress_shown = true;
}

/* ---- passwords ---- */

/* Reads a fresh password (e.g. a Lakebase OAuth token refreshed by a sidecar)
 * from $TIDEPOOL_PGPASSWORD_FILE for every new connection. */
static char *password_from_file(void *arg)
{
    (void)arg;
    const char *path = getenv("TIDEPOOL_PGPASSWORD_FILE");
    if (path == NULL || *path == '\0')
        return NULL;
    size_t len = 0;
    char *s = tp_read_file(path, &len);
    if (s == NULL) {
        tp_warn("cannot read TIDEPOOL_PGPASSWORD_FILE %s: %s", path, strerror(errno));
        return NULL;
    }
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r' || s[len - 1] == ' '))
        s[--len] = '\0';
    return s;
}

char *tp_syncd_password(void)
{
    return password_from_file(NULL);
}

/* Lakebase: each new connection's password is the provider's current token;
 * after a refused login (refused_fn, or refused from a reused connection) the
 * cached token is dropped and a new one minted. Blocking, on the loop: only
 * when a mint is due (about once an hour). */
static char *password_from_lakebase(syncd_t *d, const char *refused, char **err)
{
    char *tok = tp_lakebase_token(d->lb, refused, err);
    if (tok != NULL && d->lb_refused) { /* drop the cached token (if it is the one), mint anew */
        d->lb_refused = false;
        char *fresh = tp_lakebase_token(d->lb, tok, err);
        explicit_bzero(tok, strlen(tok));
        free(tok);
        tok = fresh;
    }
    return tok;
}

static void lakebase_on_refused(void *self)
{
    daemon_of(self)->lb_refused = true;
}

#define PW_WAIT_MAGIC 0x70777774u

/* A password computed at once, handed back from the loop's next turn (the
 * provider contract of tidepool/pgconn.h). */
typedef struct pw_wait {
    unsigned magic;
    struct event *ev;
    char *password, *err;
    tp_pg_password_cb cb;
    void *cb_arg;
} pw_wait_t;

static void pw_cancel(void *handle)
{
    pw_wait_t *w = handle;
    if (w == NULL || w->magic != PW_WAIT_MAGIC)
        abort();
    event_free(w->ev);
    if (w->password != NULL)
        explicit_bzero(w->password, strlen(w->password));
    free(w->password);
    free(w->err);
    w->magic = 0;
    free(w);
}

static void on_pw_ready(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_wait_t *w = arg;
    if (w->magic != PW_WAIT_MAGIC)
        abort();
    w->cb(w->password, w->password ? NULL : w->err ? w->err : "no database credential", w->cb_arg);
    pw_cancel(w);
}

static void *pw_get(void *self, const char *refused, tp_pg_password_cb cb, void *cb_arg)
{
    syncd_t *d = daemon_of(self);
    pw_wait_t *w = tp_xcalloc(1, sizeof *w);
    w->magic = PW_WAIT_MAGIC;
    w->cb = cb;
    w->cb_arg = cb_arg;
    if (d->lb != NULL) {
        w->password = password_from_lakebase(d, refused, &w->err);
    } else {
        w->password = password_from_file(NULL);
        if (w->password == NULL) /* unreadable (logged): the dsn's own, as before */
            w->password = tp_xstrdup("");
    }
    w->ev = event_new(d->base, -1, 0, on_pw_ready, w);
    event_active(w->ev, EV_TIMEOUT, 0);
    return w;
}

/* Sets the provider every connection of the daemon logs in with, if any. */
static void password_setup(syncd_t *d)
{
    const char *path = getenv("TIDEPOOL_PGPASSWORD_FILE");
    if (d->lb == NULL && (path == NULL || *path == '\0'))
        return;
    d->pw.get = pw_get;
    d->pw.cancel = pw_cancel;
    d->pw.self = d;
    d->pw.refused_fn = d->lb != NULL ? lakebase_on_refused : NULL;
    d->env.pw = &d->pw;
}

/* ---- entry ---- */

static void quiet_notice(void *arg, const char *msg)
{
    (void)arg;
    tp_debug("postgres: %s", msg);
}

/* Start-up: applies pending migrations (blocking, before the loop runs). */
bool tp_syncd_migrate(const tp_config_t *cfg)
{
    char err[1024];
    PGconn *c = tp_lakebase_connect_settings(cfg, cfg->postgres.dsn, cfg->postgres.connect_timeout_ms,
                                             err, sizeof(err));
    if (c == NULL) {
        tp_error("%s", err);
        return false;
    }
    PQsetNoticeProcessor(c, quiet_notice, NULL);
    int applied = 0;
    bool ok = tp_migrate_apply(c, tp_migrate_default_dir(), &applied, err, sizeof(err));
    PQfinish(c);
    if (!ok) {
        tp_error("migrations: %s", err);
        return false;
    }
    if (applied > 0)
        tp_info("applied %d migration(s)", applied);
    return true;
}

static bool make_wh(syncd_t *d)
{
    tp_wh_config_t wc;
    tp_wh_config_init(&wc);
    tp_wh_config_from_settings(&wc, d->cfg);
    char *err = NULL;
    d->wh = tp_wh_new(d->base, &wc, &err);
    if (d->wh == NULL) {
        tp_error("warehouse client: %s", err ? err : "invalid configuration");
        free(err);
        return false;
    }
    return true;
}

int tp_syncd_run(const tp_config_t *cfg, const tp_syncd_opts_t *opts)
{
    syncd_t d;
    memset(&d, 0, sizeof(d));
    d.magic = SYNCD_MAGIC;
    d.cfg = cfg;
    d.opts = opts;
    signal(SIGPIPE, SIG_IGN);

    const char *dir = cfg->sync.definitions;
    if (dir == NULL || *dir == '\0') {
        tp_error("sync.definitions is not set");
        return 2;
    }
    tp_defs_diag_t diag = {0};
    defset_t *set = defset_load(dir, &diag);
    if (set == NULL) {
        for (size_t i = 0; i < diag.n; i++)
            fprintf(stderr, "%s\n", diag.msgs[i]);
        tp_defs_diag_free(&diag);
        return 2;
    }
    tp_defs_diag_free(&diag);
    if (opts->once && opts->once_job && !tp_defs_job_find(set->set, opts->once_job)) {
        fprintf(stderr, "tidepool-sync: no job named %s in %s\n", opts->once_job, dir);
        defset_unref(set);
        return 2;
    }

    if (opts->migrate && !tp_syncd_migrate(cfg)) {
        defset_unref(set);
        return 1;
    }
    tp_lakebase_config_t lc;
    tp_wh_config_t lwc;
    if (tp_lakebase_from_config(cfg, &lc, &lwc)) {
        char *err = NULL;
        d.lb = tp_lakebase_new_blocking(&lwc, &lc, &err);
        if (d.lb == NULL) {
            tp_error("%s", err ? err : "Lakebase: cannot create the credential provider");
            free(err);
            defset_unref(set);
            return 2;
        }
    }
    d.base = event_base_new();
    if (d.base == NULL || !make_wh(&d)) {
        tp_lakebase_free(d.lb);
        defset_unref(set);
        if (d.base)
            event_base_free(d.base);
        return d.base ? 2 : 1;
    }
    char host[256] = "";
    gethostname(host, sizeof(host) - 1);
    snprintf(d.daemon_id, sizeof(d.daemon_id), "%s:%d", host, (int)getpid());
    d.env.base = d.base;
    d.env.wh = d.wh;
    d.env.dsn = cfg->postgres.dsn ? cfg->postgres.dsn : "";
    d.env.catalog = cfg->warehouse.catalog;
    d.env.schema = cfg->warehouse.schema;
    d.env.daemon_id = d.daemon_id;
    d.env.connect_timeout_ms = cfg->postgres.connect_timeout_ms > 0 ? cfg->postgres.connect_timeout_ms : 10000;
    password_setup(&d);
    d.max_running = max_running_of(cfg);
    d.defs_dir = tp_xstrdup(cfg->sync.definitions);

    d.ev_term = evsignal_new(d.base, SIGTERM, on_signal, &d);
    d.ev_int = evsignal_new(d.base, SIGINT, on_signal, &d);
    d.ev_hup = evsignal_new(d.base, SIGHUP, on_signal, &d);
    d.ev_deadline = evtimer_new(d.base, on_deadline, &d);
    event_add(d.ev_term, NULL);
    event_add(d.ev_int, NULL);
    if (!opts->once)
        event_add(d.ev_hup, NULL);

    if (opts->once) {
        d.cur = set;
        for (size_t i = 0; i < set->set->n_jobs; i++) {
            const tp_defs_job_t *j = &set->set->jobs[i];
            if (opts->once_job && strcmp(opts->once_job, j->name) != 0)
                continue;
            d.slots = tp_xrealloc(d.slots, (d.n_slots + 1) * sizeof(*d.slots));
            d.slots[d.n_slots++] = slot_new(&d, j);
        }
        d.once_pending = (int)d.n_slots;
        for (size_t i = 0; i < d.n_slots; i++)
            enqueue(d.slots[i], "once");
        if (opts->progress) {
            d.ev_progress = event_new(d.base, -1, EV_PERSIST, on_progress, &d);
            struct timeval tv = {0, 500000};
            event_add(d.ev_progress, &tv);
        }
    } else {
        install(&d, set, true);
        d.shipper = tp_shipper_start(cfg, d.lb);
        tp_info("tidepool-sync running %zu job(s), at most %d at once", d.n_slots, d.max_running);
        listen_start(&d);
        d.ev_listen_check = event_new(d.base, -1, EV_PERSIST, on_listen_check, &d);
        struct timeval tv = {5, 0};
        event_add(d.ev_listen_check, &tv);
        if (!tp_notify_wd_start(d.base, &d.wd))
            tp_warn("systemd watchdog timer could not be armed");
        tp_notify_ready();
        status_jobs(&d, "running");
    }
    if (!(opts->once && d.once_pending == 0))
        event_base_dispatch(d.base);

    tp_shipper_stop(d.shipper); /* after at most the batch in flight (~5 s) */
    if (d.progress_shown)
        fprintf(stderr, "\n");
    int status = 0;
    if (opts->once)
        status = d.once_failed > 0 || d.stopping ? 1 : 0;
    /* Teardown: runs still alive only after the deadline; abandon them (the
     * server rolls back when the sessions close at exit). */
    tp_pgconn_free(d.listen);
    tp_notify_wd_free(d.wd);
    tp_wh_free(d.wh);
    if (d.running == 0) /* a run still alive may connect again: keep the hook's provider */
        tp_lakebase_free(d.lb);
    for (size_t i = 0; i < d.n_slots; i++) {
        if (d.slots[i]->run == NULL)
            slot_free(d.slots[i]);
    }
    free(d.slots);
    free(d.defs_dir);
    event_free(d.ev_term);
    event_free(d.ev_int);
    event_free(d.ev_hup);
    event_free(d.ev_deadline);
    if (d.ev_progress)
        event_free(d.ev_progress);
    if (d.ev_listen_check)
        event_free(d.ev_listen_check);
    if (d.running == 0) {
        defset_unref(d.cur);
        event_base_free(d.base);
    }
    return status;
}
