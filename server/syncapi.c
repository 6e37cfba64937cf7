/* The sync API of tidepool-server (DESIGN §8, issue 8 item 2):
 *   GET  /api/v1/sync            every job of tidepool.sync_state (generation, rows,
 *                                last attempt, success, error) and the write-back
 *                                outbox backlog per table (mirrored writable tables
 *                                are listed with 0 when nothing waits)
 *   POST /api/v1/sync/{job}/run  a role of auth.sync_roles (default admin):
 *                                NOTIFY tidepool_trigger with the job name, which
 *                                tidepool-sync answers by running it now
 * Both are one statement on the worker's async pool (never a blocking call on the
 * loop); any authenticated caller may read the status. */
#include "server.h"

#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "tidepool/log.h"

#define SCTX_MAGIC 0x53435458u /* "SCTX" */

static const char STATUS_SQL[] =
    "SELECT json_build_object("
    "'jobs', COALESCE((SELECT json_agg(json_build_object('job', job, 'mode', mode, "
    "'generation', generation, 'rows', rows, 'last_attempt_at', last_attempt_at, "
    "'last_success_at', last_success_at, 'last_error', last_error, 'last_error_at', "
    "last_error_at) ORDER BY job) FROM tidepool.sync_state), '[]'::json), "
    "'outbox', COALESCE((SELECT json_agg(json_build_object('table', t, 'backlog', "
    "COALESCE(n, 0), 'failing', COALESCE(failing, 0), 'oldest_at', oldest) ORDER BY t) FROM ("
    "SELECT COALESCE(o.table_name, m.t) AS t, o.n, o.failing, o.oldest FROM "
    "(SELECT table_name, count(*) AS n, count(*) FILTER (WHERE attempts > 0) AS failing, "
    "min(created_at) AS oldest FROM tidepool.writeback_outbox WHERE shipped_at IS NULL "
    "GROUP BY 1) o FULL JOIN unnest($1::text[]) AS m(t) ON m.t = o.table_name) x), "
    "'[]'::json), "
    "'backlog', (SELECT count(*) FROM tidepool.writeback_outbox WHERE shipped_at IS NULL))";

/* Notifies only for a job the server or the daemon knows ($2: in the server's
 * registry of @requires jobs); no row means unknown. */
static const char TRIGGER_SQL[] =
    "SELECT pg_notify('tidepool_trigger', $1) WHERE $2::boolean OR EXISTS "
    "(SELECT 1 FROM tidepool.sync_state WHERE job = $1)";

typedef struct sctx {
    uint32_t magic;
    rq_t *r;
    char *job;
} sctx_t;

static void sctx_free(sctx_t *x)
{
    free(x->job);
    x->magic = 0;
    free(x);
}

static void on_status(PGresult *res, const char *err, void *arg)
{
    sctx_t *x = arg;
    if (x->magic != SCTX_MAGIC)
        abort();
    if (err || !res || PQntuples(res) != 1) {
        rq_pg_error(x->r, res, err);
    } else {
        rq_header(x->r, "Cache-Control", "no-store");
        rq_reply(x->r, 200, "application/json", PQgetvalue(res, 0, 0),
                 (size_t)PQgetlength(res, 0, 0));
    }
    sctx_free(x);
}

static void on_trigger(PGresult *res, const char *err, void *arg)
{
    sctx_t *x = arg;
    if (x->magic != SCTX_MAGIC)
        abort();
    if (err || !res) {
        rq_pg_error(x->r, res, err);
    } else if (PQntuples(res) == 0) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "no sync job named %s", x->job);
        rq_problem(x->r, 404, "unknown-job", d.data, "job", "is not a known sync job", 0);
        tp_buf_free(&d);
    } else {
        tp_buf_t b = {0};
        tp_buf_puts(&b, "{\"job\":");
        tp_buf_json_str(&b, x->job);
        tp_buf_puts(&b, ",\"triggered\":true}");
        const char *kv[] = {"request_id", x->r->id, "job", x->job, "actor",
                            x->r->auth.principal->id, NULL};
        tp_logkv(TP_LOG_INFO, kv, "sync run requested");
        rq_header(x->r, "Cache-Control", "no-store");
        rq_reply(x->r, 202, "application/json", b.data, b.len);
        tp_buf_free(&b);
    }
    sctx_free(x);
}

bool sync_job_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 1024)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '.' || *s == '-'))
            return false;
    return true;
}

static bool job_registered(const char *job)
{
    bool found = false;
    pthread_mutex_lock(&g_srv.lock);
    for (int i = 0; i < g_srv.njobs && !found; i++)
        found = strcmp(g_srv.job_names[i], job) == 0;
    pthread_mutex_unlock(&g_srv.lock);
    return found;
}

static void submit(sctx_t *x, const char *sql, int n, const char *const *vals, tp_pg_done_cb cb)
{
    tp_pg_submit_t st = tp_pgpool_query(writes_pool(x->r->w), sql, n, NULL, vals, cb, x, NULL);
    if (st != TP_PG_QUEUED) {
        rq_pool_refused(x->r, st);
        sctx_free(x);
    }
}

bool sync_route(rq_t *r, const char *path)
{
    static const char base[] = "/api/v1/sync";
    if (strncmp(path, base, sizeof base - 1) != 0 ||
        (path[sizeof base - 1] != '\0' && path[sizeof base - 1] != '/'))
        return false;
    enum evhttp_cmd_type m = evhttp_request_get_command(r->req);
    r->route = RT_SYNC;
    r->route_name = "/api/v1/sync";
    const char *rest = path + sizeof base - 1;
    size_t rl = strlen(rest);
    static const char run[] = "/run";
    bool is_run = rl > sizeof run && strcmp(rest + rl - (sizeof run - 1), run) == 0 &&
                  memchr(rest + 1, '/', rl - sizeof run) == NULL;
    if (*rest && !is_run) {
        rq_problem(r, 404, "unknown-route", "no route matches this path", NULL, NULL, 0);
        return true;
    }
    if (!is_run && m != EVHTTP_REQ_GET && m != EVHTTP_REQ_HEAD) {
        rq_header(r, "Allow", "GET, HEAD");
        rq_problem(r, 405, "method-not-allowed", "this route does not accept that method", NULL,
                   NULL, 0);
        return true;
    }
    if (is_run && m != EVHTTP_REQ_POST) {
        rq_header(r, "Allow", "POST");
        rq_problem(r, 405, "method-not-allowed", "this route does not accept that method", NULL,
                   NULL, 0);
        return true;
    }
    if (!rq_authenticate(r))
        return true;
    sctx_t *x = tp_xcalloc(1, sizeof *x);
    x->magic = SCTX_MAGIC;
    x->r = r;
    if (!is_run) {
        char *mirrored = writes_mirrored_array();
        const char *vals[] = {mirrored};
        submit(x, STATUS_SQL, 1, vals, on_status);
        free(mirrored);
        return true;
    }
    x->job = tp_xstrndup(rest + 1, rl - sizeof run);
    tp_auth_t *a = auth_acquire(); /* auth.sync_roles, as in force now */
    bool allowed = rq_require(r, tp_auth_sync_roles(a));
    tp_auth_free(a);
    if (!allowed) {
        sctx_free(x);
    } else if (!sync_job_name_ok(x->job)) {
        rq_problem(r, 422, "invalid-value", "a job name is 1..1024 of [A-Za-z0-9_.-]", "job",
                   "is not a valid job name", 0);
        sctx_free(x);
    } else {
        const char *vals[] = {x->job, job_registered(x->job) ? "true" : "false"};
        submit(x, TRIGGER_SQL, 2, vals, on_trigger);
    }
    return true;
}

void sync_openapi(void *paths_v)
{
    json_t *paths = paths_v;
    json_object_set_new(
        paths, "/api/v1/sync",
        json_pack("{s:{s:s,s:{s:{s:s}}}}", "get", "summary",
                  "sync jobs (tidepool.sync_state) and the write-back outbox backlog per table",
                  "responses", "200", "description", "OK"));
    json_object_set_new(
        paths, "/api/v1/sync/{job}/run",
        json_pack("{s:{s:s,s:[{s:s,s:s,s:b,s:{s:s}}],s:{s:{s:s},s:{s:s},s:{s:s}}}}", "post",
                  "summary", "run a sync job now (a role of auth.sync_roles, admin by default; "
                  "NOTIFY tidepool_trigger)",
                  "parameters", "name", "job", "in", "path", "required", 1, "schema", "type",
                  "string", "responses", "202", "description", "triggered", "403", "description",
                  "no role of auth.sync_roles", "404", "description", "unknown job"));
}
