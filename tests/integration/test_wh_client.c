/* Integration tests for the warehouse client (lib/wh.c) against the real
 * emulator, bin/tidepool-warehouse, over HTTP, on the harness Postgres: every
 * disposition x format, each state path, parameter types, chunk chains counted
 * row for row, external links, OAuth M2M (cache, refresh, one refresh in
 * flight, a token expiring between chunks of one result), auth failures,
 * every emulator fault (an unknown state too), CLOSED by another driver,
 * back-pressure, and a big result streamed with flat memory (peak RSS
 * printed as a "# " line; the figure is in docs/warehouse-client.md). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "../tp_test.h"
#include "tidepool/log.h"
#include "tidepool/util.h"
#include "tidepool/wh.h"

#define PAT "tok-good-0123"
#define CLIENT_ID "sp-test"
#define CLIENT_SECRET "sp-secret-456"

typedef struct emu {
    pid_t pid;
    int port;
    char url[64];
    char log[512];
} emu_t;

static emu_t E;     /* main emulator: PAT + client, small chunks */
static emu_t E_TTL; /* short token and link lifetimes */
static emu_t E_BIG; /* default (large) chunks */
static bool sanitize;

static bool emu_start(emu_t *e, const char *name, const char *const *extra)
{
    const char *dsn = tp_test_dsn();
    if (dsn == NULL)
        return false;
    if (e->port == 0)
        e->port = tp_test_free_port(); /* else restart on the same port */
    snprintf(e->url, sizeof(e->url), "http://127.0.0.1:%d", e->port);
    snprintf(e->log, sizeof(e->log), "%s/%s.log", tp_test_tmpdir(), name);
    char listen[64];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", e->port);
    const char *argv[32] = {tp_test_bin("tidepool-warehouse"), "--listen", listen, "--dsn", dsn,
                            "--token", PAT, "--client", CLIENT_ID ":" CLIENT_SECRET, "--chunk-rows", "1000"};
    int n = 11;
    for (int i = 0; extra && extra[i]; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    e->pid = tp_test_spawn((char *const *)argv, e->log);
    return e->pid > 0 && tp_test_wait_port(e->port, 10000);
}

/* ---- admin: set or clear emulator faults (test plumbing, blocking curl) ---- */

static size_t discard(char *p, size_t s, size_t n, void *u)
{
    (void)p;
    (void)u;
    return s * n;
}

static bool faults(const emu_t *e, const char *spec)
{
    CURL *c = curl_easy_init();
    char url[128];
    snprintf(url, sizeof(url), "%s/admin/faults", e->url);
    char body[512];
    snprintf(body, sizeof(body), "{\"spec\":\"%s\"}", spec ? spec : "");
    curl_easy_setopt(c, CURLOPT_URL, url);
    if (spec == NULL)
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "DELETE");
    else
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    struct curl_slist *h = curl_slist_append(NULL, "Authorization: Bearer " PAT);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    CHECK_MSG(rc == CURLE_OK && code == 200, "setting faults \"%s\": curl %d HTTP %ld", spec ? spec : "",
              (int)rc, code);
    return rc == CURLE_OK && code == 200;
}

/* The undocumented close, DELETE /api/2.0/sql/statements/{id}, sent by the
 * test beside the client (as another driver would). */
static bool close_statement(const emu_t *e, const char *id)
{
    CURL *c = curl_easy_init();
    char url[256];
    snprintf(url, sizeof(url), "%s/api/2.0/sql/statements/%s", e->url, id);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "DELETE");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    struct curl_slist *h = curl_slist_append(NULL, "Authorization: Bearer " PAT);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    curl_slist_free_all(h);
    CHECK_MSG(rc == CURLE_OK && code == 200, "DELETE statement %s: curl %d HTTP %ld", id, (int)rc, code);
    return rc == CURLE_OK && code == 200;
}

/* Counts log lines of the emulator that contain all of the given strings. */
static int log_count(const emu_t *e, const char *a, const char *b)
{
    char *text = tp_read_file(e->log, NULL);
    int n = 0;
    for (char *line = text ? strtok(text, "\n") : NULL; line; line = strtok(NULL, "\n"))
        if (strstr(line, a) && (b == NULL || strstr(line, b)))
            n++;
    free(text);
    return n;
}

/* ---- a consumer that checks everything it receives ---- */

typedef struct sink {
    struct event_base *base;
    tp_wh_stmt_t *st;
    /* manifest */
    int manifests;
    size_t ncols;
    char names[8][32], types[8][32], texts[8][40];
    int prec[8], scale[8];
    /* rows */
    int64_t rows, batches;
    bool check_seq;  /* column 0 holds 1, 2, 3... */
    int64_t next_seq;
    int64_t seq_errors, offset_errors;
    char first[8][64];
    bool first_null[8];
    /* csv */
    tp_buf_t csv;
    int64_t csv_bytes;
    int csv_header_pieces;
    bool discard_csv;
    char line[256];
    size_t line_len;
    int64_t csv_lines; /* complete lines seen, header included */
    /* control */
    bool pause_each;
    int pauses;
    int64_t cancel_after_rows;
    int64_t reject_after_rows;
    const emu_t *close_on_rows; /* DELETE the statement at the first rows */
    struct event *resume_ev;
    /* end */
    bool done;
    tp_wh_result_t res;
    int64_t t0, t_done;
} sink_t;

static bool on_manifest(tp_wh_stmt_t *st, const tp_wh_manifest_t *m, void *arg)
{
    (void)st;
    sink_t *s = arg;
    s->manifests++;
    s->ncols = m->n_columns;
    for (size_t i = 0; i < m->n_columns && i < 8; i++) {
        snprintf(s->names[i], sizeof(s->names[i]), "%s", m->columns[i].name);
        snprintf(s->types[i], sizeof(s->types[i]), "%s", m->columns[i].type_name);
        snprintf(s->texts[i], sizeof(s->texts[i]), "%s", m->columns[i].type_text);
        s->prec[i] = m->columns[i].precision;
        s->scale[i] = m->columns[i].scale;
    }
    return true;
}

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    sink_t *s = arg;
    if (s->st != NULL && !s->done)
        tp_wh_resume(s->st);
}

static void maybe_pause(sink_t *s, tp_wh_stmt_t *st)
{
    if (!s->pause_each)
        return;
    s->pauses++;
    tp_wh_pause(st);
    if (s->resume_ev == NULL)
        s->resume_ev = evtimer_new(s->base, on_resume, s);
    struct timeval tv = {0, 1000};
    evtimer_add(s->resume_ev, &tv);
}

static bool on_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *r, void *arg)
{
    sink_t *s = arg;
    if (r->row_offset != s->rows)
        s->offset_errors++;
    for (size_t i = 0; i < r->n_rows; i++) {
        const char *const *row = r->cells + i * r->n_cols;
        if (s->rows == 0)
            for (size_t c = 0; c < r->n_cols && c < 8; c++) {
                s->first_null[c] = row[c] == NULL;
                snprintf(s->first[c], sizeof(s->first[c]), "%s", row[c] ? row[c] : "");
            }
        if (s->check_seq) {
            s->next_seq++;
            if (row[0] == NULL || strtoll(row[0], NULL, 10) != s->next_seq)
                s->seq_errors++;
        }
        s->rows++;
    }
    s->batches++;
    if (s->close_on_rows != NULL && tp_wh_stmt_id(st) != NULL) {
        close_statement(s->close_on_rows, tp_wh_stmt_id(st));
        s->close_on_rows = NULL;
    }
    if (s->cancel_after_rows > 0 && s->rows >= s->cancel_after_rows)
        tp_wh_cancel(st);
    if (s->reject_after_rows > 0 && s->rows >= s->reject_after_rows)
        return false;
    maybe_pause(s, st);
    return true;
}

static bool on_csv(tp_wh_stmt_t *st, const tp_wh_csv_t *c, void *arg)
{
    sink_t *s = arg;
    if (!s->discard_csv)
        tp_buf_append(&s->csv, c->data, c->len);
    /* independent line check: header, then 1, 2, 3... in column 0 */
    for (size_t i = 0; i < c->len; i++) {
        if (c->data[i] != '\n') {
            if (s->line_len < sizeof(s->line) - 1)
                s->line[s->line_len++] = c->data[i];
            continue;
        }
        s->line[s->line_len] = '\0';
        if (s->csv_lines > 0 && strtoll(s->line, NULL, 10) != s->csv_lines)
            s->seq_errors++;
        s->csv_lines++;
        s->line_len = 0;
    }
    s->csv_bytes += (int64_t)c->len;
    if (c->header_chunk)
        s->csv_header_pieces++;
    maybe_pause(s, st);
    return true;
}

static void on_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    (void)st;
    sink_t *s = arg;
    tp_wh_result_copy(&s->res, res);
    s->done = true;
    s->st = NULL;
    s->t_done = tp_now_ms();
}

static void sink_init(sink_t *s, struct event_base *base)
{
    memset(s, 0, sizeof(*s));
    s->base = base;
    tp_buf_init(&s->csv);
}

static void sink_free(sink_t *s)
{
    tp_buf_free(&s->csv);
    tp_wh_result_clear(&s->res);
    if (s->resume_ev)
        event_free(s->resume_ev);
}

static void cfg_init(tp_wh_config_t *c, const emu_t *e, bool pat)
{
    tp_wh_config_init(c);
    c->host = e->url;
    c->warehouse_id = "tidepool-local";
    if (pat)
        c->token = PAT;
    else {
        c->client_id = CLIENT_ID;
        c->client_secret = CLIENT_SECRET;
    }
    c->poll_initial_ms = 50;
    c->poll_max_ms = 500;
    c->retry_budget_ms = 20000;
    c->retry_max_ms = 500;
    c->stall_timeout_ms = 10000;
}

static void req_init(tp_wh_request_t *r, sink_t *s, const char *sql)
{
    tp_wh_request_init(r);
    r->sql = sql;
    r->on_manifest = on_manifest;
    r->on_rows = on_rows;
    r->on_csv = on_csv;
    r->on_done = on_done;
    r->arg = s;
}

/* Submits on a fresh loop and runs it until on_done; false if submit refused. */
static bool run_on(tp_wh_t *wh, struct event_base *base, const tp_wh_request_t *r, sink_t *s)
{
    char *err = NULL;
    s->t0 = tp_now_ms();
    s->st = tp_wh_submit(wh, r, &err);
    if (s->st == NULL) {
        tp_test_fail(__FILE__, __LINE__, "submit refused: %s", err);
        free(err);
        return false;
    }
    int64_t limit = tp_now_ms() + 90000;
    while (!s->done && tp_now_ms() < limit)
        event_base_loop(base, EVLOOP_ONCE);
    CHECK_MSG(s->done, "statement did not end within 90 s");
    return s->done;
}

/* One statement with its own client and loop. */
static void run1(const tp_wh_config_t *cfg, const tp_wh_request_t *r, sink_t *s)
{
    struct event_base *base = event_base_new();
    char *err = NULL;
    tp_wh_t *wh = tp_wh_new(base, cfg, &err);
    CHECK_MSG(wh != NULL, "tp_wh_new: %s", err ? err : "");
    free(err);
    if (wh != NULL) {
        s->base = base;
        tp_wh_request_t rr = *r;
        run_on(wh, base, &rr, s);
        tp_wh_free(wh);
    }
    if (s->resume_ev) {
        event_free(s->resume_ev);
        s->resume_ev = NULL;
    }
    event_base_free(base);
}

#define CHECK_OK(s)                                                                               \
    CHECK_MSG((s).res.status == TP_WH_SUCCEEDED, "status %s kind %d: %s",                         \
              tp_wh_status_name((s).res.status), (int)(s).res.kind,                               \
              (s).res.message ? (s).res.message : "")

static const char *SEQ_SQL = "SELECT g AS n, md5(g::text) AS h, CASE WHEN g % 7 = 0 THEN NULL ELSE g * 2 END AS d "
                             "FROM generate_series(1, 2500) g ORDER BY g";

enum { M_LINKS = 1, M_CSV = 2, M_ASYNC = 4, M_OAUTH = 8, M_SEQ = 16 };
/* inline JSON, links JSON, links CSV */
static const int MODES[3] = {0, M_LINKS, M_LINKS | M_CSV};

/* Runs sql with the default config for e (PAT, or OAuth with M_OAUTH) unless
 * cfg is given; the sink is initialised here (M_SEQ checks column 0 = 1, 2...). */
static void go(sink_t *s, const emu_t *e, const tp_wh_config_t *cfg, const char *sql, int mode)
{
    tp_wh_config_t c;
    if (cfg == NULL) {
        cfg_init(&c, e, !(mode & M_OAUTH));
        cfg = &c;
    }
    sink_init(s, NULL);
    s->check_seq = (mode & M_SEQ) && !(mode & M_CSV);
    tp_wh_request_t r;
    req_init(&r, s, sql);
    if (mode & M_LINKS)
        r.disposition = TP_WH_EXTERNAL_LINKS;
    if (mode & M_CSV)
        r.format = TP_WH_CSV;
    if (mode & M_ASYNC)
        r.wait_timeout_s = 0;
    run1(cfg, &r, s);
}

/* The 2500-row SEQ_SQL result arrived whole, in order, once. */
#define CHECK_SEQ_OK(s)                                                                           \
    do {                                                                                          \
        CHECK_OK(s);                                                                              \
        CHECK_INT_EQ((s).res.rows, 2500);                                                         \
        CHECK_INT_EQ((s).res.chunks, 3);                                                          \
        CHECK_INT_EQ((s).seq_errors, 0);                                                          \
        CHECK_INT_EQ((s).offset_errors, 0);                                                       \
    } while (0)

/* An error of the given kind. */
#define CHECK_ERR(s, k)                                                                           \
    do {                                                                                          \
        CHECK_INT_EQ((s).res.status, TP_WH_ERROR);                                                \
        CHECK_MSG((s).res.kind == (k), "kind %d, wanted %d: %s", (int)(s).res.kind, (int)(k),     \
                  (s).res.message ? (s).res.message : "");                                        \
    } while (0)

/* ---- dispositions x formats ---- */

static void inline_json_multi_chunk(void)
{
    sink_t s;
    go(&s, &E, NULL, SEQ_SQL, M_SEQ);
    CHECK_SEQ_OK(s);
    CHECK_INT_EQ(s.rows, 2500);
    CHECK_INT_EQ(s.manifests, 1);
    CHECK_INT_EQ(s.ncols, 3);
    CHECK_STR_EQ(s.names[0], "n");
    CHECK_STR_EQ(s.types[0], "INT");
    CHECK_STR_EQ(s.types[1], "STRING");
    CHECK_STR_EQ(s.first[1], "c4ca4238a0b923820dcc509a6f75849b");
    CHECK(s.res.statement_id != NULL);
    CHECK(s.res.message == NULL);
    sink_free(&s);
}

static void links_json_multi_chunk(void)
{
    sink_t s;
    go(&s, &E, NULL, SEQ_SQL, M_SEQ | M_LINKS);
    CHECK_SEQ_OK(s);
    /* the emulator answers 400 to a link download carrying Authorization and 403
     * without its x-tp-link-key header: success proves both */
    char idq[80];
    snprintf(idq, sizeof(idq), "\"statement_id\":\"%s\"", s.res.statement_id ? s.res.statement_id : "?");
    CHECK_INT_EQ(log_count(&E, "\"path\":\"/_tp_blob/", idq), 3);
    sink_free(&s);
}

static void links_csv_multi_chunk(void)
{
    sink_t s;
    go(&s, &E, NULL, SEQ_SQL, M_LINKS | M_CSV);
    CHECK_SEQ_OK(s);
    /* concatenated pieces: one header then rows 1..2500 in order */
    CHECK_INT_EQ(s.csv_lines, 2501);
    char *text = tp_xstrndup(s.csv.data ? s.csv.data : "", s.csv.len);
    const char *head = "n,h,d\n1,c4ca4238a0b923820dcc509a6f75849b,2\n";
    CHECK(strncmp(text, head, strlen(head)) == 0);
    CHECK_CONTAINS(text, "\n7,8f14e45fceea167a5a36dedd4bea2543,null\n");
    free(text);
    CHECK(s.csv_header_pieces >= 1);
    sink_free(&s);
}

static void inline_csv_rejected_precisely(void)
{
    sink_t s;
    go(&s, &E, NULL, "SELECT 1", M_CSV);
    CHECK_ERR(s, TP_WH_ERR_HTTP);
    CHECK_INT_EQ(s.res.http_status, 400);
    CHECK_STR_EQ(s.res.error_code, "INVALID_PARAMETER_VALUE");
    CHECK_CONTAINS(s.res.message, "CSV format is not supported with the INLINE disposition");
    CHECK(s.res.statement_id == NULL);
    sink_free(&s);
}

static void ddl_and_empty_results(void)
{
    const char *sqls[] = {"CREATE TABLE IF NOT EXISTS wh_t (a int)", "SELECT a FROM wh_t WHERE false"};
    for (int i = 0; i < 2; i++)
        for (int m = 0; m < 3; m++) {
            sink_t s;
            go(&s, &E, NULL, sqls[i], MODES[m]);
            CHECK_OK(s);
            CHECK_INT_EQ(s.rows, 0);
            CHECK_INT_EQ(s.res.rows, 0);
            sink_free(&s);
        }
}

/* ---- state paths ---- */

static void failed_statement_reports_sql_state(void)
{
    sink_t s;
    go(&s, &E, NULL, "SELECT * FROM no_such_table_here", 0);
    CHECK_INT_EQ(s.res.status, TP_WH_FAILED);
    CHECK_STR_EQ(s.res.sql_state, "42P01");
    CHECK_STR_EQ(s.res.error_code, "BAD_REQUEST");
    CHECK_CONTAINS(s.res.message, "no_such_table_here");
    CHECK(s.res.statement_id != NULL);
    CHECK_INT_EQ(s.manifests, 0);
    sink_free(&s);
    /* a syntax error while polling (async) */
    go(&s, &E, NULL, "SELEC 1", M_ASYNC);
    CHECK_INT_EQ(s.res.status, TP_WH_FAILED);
    CHECK_STR_EQ(s.res.sql_state, "42601");
    sink_free(&s);
}

/* A client and loop of its own, for tests that drive the API by hand. */
typedef struct rig {
    struct event_base *base;
    tp_wh_t *wh;
} rig_t;

static void rig_open(rig_t *g, const emu_t *e, bool pat)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, e, pat);
    g->base = event_base_new();
    char *err = NULL;
    g->wh = tp_wh_new(g->base, &cfg, &err);
    CHECK_MSG(g->wh != NULL, "tp_wh_new: %s", err ? err : "");
    free(err);
}

static void rig_close(rig_t *g)
{
    tp_wh_free(g->wh);
    event_base_free(g->base);
}

static tp_wh_stmt_t *rig_submit(rig_t *g, sink_t *s, const char *sql, int wait_s)
{
    sink_init(s, g->base);
    tp_wh_request_t r;
    req_init(&r, s, sql);
    r.wait_timeout_s = wait_s;
    char *err = NULL;
    s->t0 = tp_now_ms();
    s->st = tp_wh_submit(g->wh, &r, &err);
    CHECK_MSG(s->st != NULL, "submit: %s", err ? err : "");
    free(err);
    return s->st;
}

static void rig_wait(rig_t *g, sink_t *s)
{
    while (!s->done && tp_now_ms() - s->t0 < 30000)
        event_base_loop(g->base, EVLOOP_ONCE);
    CHECK_MSG(s->done, "no on_done within 30 s");
}

static void cancel_running_statement(void)
{
    rig_t g;
    rig_open(&g, &E, true);
    sink_t s;
    rig_submit(&g, &s, "SELECT pg_sleep(30)", 0);
    while (s.st && tp_wh_stmt_id(s.st) == NULL && !s.done)
        event_base_loop(g.base, EVLOOP_ONCE);
    CHECK(!s.done);
    tp_wh_cancel(s.st);
    tp_wh_cancel(s.st); /* idempotent */
    rig_wait(&g, &s);
    CHECK_INT_EQ(s.res.status, TP_WH_CANCELED);
    CHECK(s.res.statement_id != NULL);
    CHECK_MSG(s.t_done - s.t0 < 10000, "cancel took %lld ms", (long long)(s.t_done - s.t0));
    CHECK_CONTAINS(s.res.message, "by the client");
    rig_close(&g);
    sink_free(&s);
}

static void cancel_before_send(void)
{
    rig_t g;
    rig_open(&g, &E, true);
    sink_t s;
    rig_submit(&g, &s, "SELECT 1", 10);
    tp_wh_cancel(s.st); /* nothing has gone out yet */
    CHECK(!s.done);     /* callbacks never run inside the API */
    rig_wait(&g, &s);
    CHECK_INT_EQ(s.res.status, TP_WH_CANCELED);
    CHECK(s.res.statement_id == NULL);
    rig_close(&g);
    sink_free(&s);
}

/* Another driver closes the statement (DELETE) while we poll it: the client
 * ends with CLOSED, naming the statement. */
static void closed_while_polling(void)
{
    rig_t g;
    rig_open(&g, &E, true);
    sink_t s;
    rig_submit(&g, &s, "SELECT pg_sleep(3), 1", 0);
    while (s.st && tp_wh_stmt_id(s.st) == NULL && !s.done)
        event_base_loop(g.base, EVLOOP_ONCE);
    CHECK(!s.done);
    char id[80] = "?";
    if (s.st && tp_wh_stmt_id(s.st))
        snprintf(id, sizeof(id), "%s", tp_wh_stmt_id(s.st));
    close_statement(&E, id);
    rig_wait(&g, &s);
    CHECK_INT_EQ(s.res.status, TP_WH_CLOSED);
    CHECK_STR_EQ(s.res.statement_id, id);
    CHECK_CONTAINS(s.res.message, id);
    CHECK_CONTAINS(s.res.message, "is CLOSED: results are no longer available");
    CHECK_INT_EQ(s.manifests, 0);
    CHECK_INT_EQ(s.rows, 0);
    CHECK_MSG(s.t_done - s.t0 < 2500, "CLOSED seen after %lld ms", (long long)(s.t_done - s.t0));
    rig_close(&g);
    sink_free(&s);
}

/* Closed after SUCCEEDED, between chunks of its result: the next chunk is
 * refused, and the result is never reported complete. */
static void closed_between_chunks(void)
{
    sink_t s;
    sink_init(&s, NULL);
    s.check_seq = true;
    s.close_on_rows = &E;
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    tp_wh_request_t r;
    req_init(&r, &s, SEQ_SQL);
    run1(&cfg, &r, &s);
    CHECK_INT_EQ(s.res.status, TP_WH_ERROR);
    CHECK_INT_EQ(s.res.http_status, 400);
    CHECK_STR_EQ(s.res.error_code, "INVALID_STATE");
    CHECK_CONTAINS(s.res.message, "CLOSED");
    CHECK_INT_EQ(s.res.chunk_index, 1);
    CHECK_INT_EQ(s.rows, 1000); /* chunk 0 only */
    CHECK_INT_EQ(s.seq_errors, 0);
    sink_free(&s);
}

/* A well-formed answer in a state the protocol does not define: tolerated for
 * unknown_state_ms (the service may add states), then a protocol error that
 * names the statement and the state; never taken for a terminal state. */
static void unknown_state(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    cfg.unknown_state_ms = 600;
    /* a passing oddity, on the submit's answer and on a poll: the result comes */
    if (!faults(&E, "bad_state=1@execute,bad_state=1@get"))
        return;
    sink_t s;
    go(&s, &E, &cfg, SEQ_SQL, M_SEQ);
    CHECK_SEQ_OK(s);
    sink_free(&s);
    /* a state that stays: a precise error after unknown_state_ms */
    if (!faults(&E, "bad_state=100000@get"))
        return;
    go(&s, &E, &cfg, "SELECT 1 AS one", M_ASYNC);
    CHECK_ERR(s, TP_WH_ERR_PROTOCOL);
    CHECK(s.res.statement_id != NULL);
    CHECK_CONTAINS(s.res.message, s.res.statement_id ? s.res.statement_id : "?");
    CHECK_CONTAINS(s.res.message, "unknown state \"EXPLODING\"");
    CHECK_INT_EQ(s.manifests, 0);
    CHECK_INT_EQ(s.rows, 0);
    int64_t took = s.t_done - s.t0;
    CHECK_MSG(took >= 600 && took < 5000, "gave up after %lld ms", (long long)took);
    CHECK(log_count(&E, "\"method\":\"GET\"", s.res.statement_id ? s.res.statement_id : "?") >= 2);
    faults(&E, NULL);
    sink_free(&s);
}

static void continue_timeout_then_poll(void)
{
    sink_t s;
    go(&s, &E, NULL, "SELECT pg_sleep(1.2) AS slept, 42 AS answer", M_ASYNC);
    CHECK_OK(s);
    CHECK_INT_EQ(s.rows, 1);
    CHECK_STR_EQ(s.first[1], "42");
    int polls = log_count(&E, "\"method\":\"GET\"", s.res.statement_id ? s.res.statement_id : "?");
    CHECK_MSG(polls >= 3 && polls <= 20, "%d status polls for a 1.2 s statement", polls);
    sink_free(&s);
}

static void on_wait_timeout_cancel(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    sink_t s;
    sink_init(&s, NULL);
    tp_wh_request_t r;
    req_init(&r, &s, "SELECT pg_sleep(8)");
    r.wait_timeout_s = 5;
    r.on_wait_timeout = TP_WH_ON_WAIT_CANCEL;
    run1(&cfg, &r, &s);
    CHECK_INT_EQ(s.res.status, TP_WH_CANCELED);
    CHECK(s.res.statement_id != NULL);
    CHECK_MSG(s.t_done - s.t0 < 7500, "took %lld ms", (long long)(s.t_done - s.t0));
    sink_free(&s);

    /* the deadline of the client: cancels and says so */
    sink_init(&s, NULL);
    req_init(&r, &s, "SELECT pg_sleep(20)");
    r.wait_timeout_s = 0;
    r.timeout_ms = 700;
    run1(&cfg, &r, &s);
    CHECK_ERR(s, TP_WH_ERR_TIMEOUT);
    CHECK_CONTAINS(s.res.message, "did not finish within 700 ms; cancel sent");
    sink_free(&s);
}

static void request_fields(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    cfg.request_timeout_ms = 1000; /* shorter than the wait: the submit still gets its 5 s */
    sink_t s;
    go(&s, &E, &cfg, "CREATE SCHEMA IF NOT EXISTS wh_s", 0);
    CHECK_OK(s);
    sink_free(&s);
    go(&s, &E, &cfg, "CREATE TABLE IF NOT EXISTS main.wh_s.t AS SELECT 41 AS v", 0);
    CHECK_OK(s);
    sink_free(&s);
    /* catalog and schema make the bare name resolve */
    sink_init(&s, NULL);
    tp_wh_request_t r;
    req_init(&r, &s, "SELECT v + 1 AS w, pg_sleep(1.5) AS z FROM t");
    r.catalog = "main";
    r.schema = "wh_s";
    r.wait_timeout_s = 5;
    run1(&cfg, &r, &s);
    CHECK_OK(s);
    CHECK_STR_EQ(s.first[0], "42");
    sink_free(&s);
    /* row_limit cuts the result and says so */
    sink_init(&s, NULL);
    req_init(&r, &s, SEQ_SQL);
    r.row_limit = 10;
    s.check_seq = true;
    run1(&cfg, &r, &s);
    CHECK_OK(s);
    CHECK_INT_EQ(s.rows, 10);
    CHECK_INT_EQ(s.seq_errors, 0);
    CHECK(s.res.truncated);
    sink_free(&s);
    /* byte_limit too */
    sink_init(&s, NULL);
    req_init(&r, &s, SEQ_SQL);
    r.byte_limit = 2000;
    s.check_seq = true;
    run1(&cfg, &r, &s);
    CHECK_OK(s);
    CHECK(s.rows > 0 && s.rows < 2500);
    CHECK(s.res.truncated);
    sink_free(&s);
}

/* ---- parameters ---- */

static void parameter_types(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    sink_t s;
    sink_init(&s, NULL);
    tp_wh_param_t p[] = {
        {"i", "42", "INT"},
        {"b", "9000000000", "BIGINT"},
        {"s", "it's \"quoted\" \xc3\xa9", "STRING"},
        {"d", "2024-02-29", "DATE"},
        {"dec", "12.34", "DECIMAL(10,2)"},
        {"t", "true", "BOOLEAN"},
        {"nul", NULL, "INT"},
        {"untyped", "plain", NULL},
    };
    tp_wh_request_t r;
    req_init(&r, &s,
             "SELECT :i AS i, :b AS b, :s AS s, :d AS d, :dec AS dec, :t AS t, :nul AS nul, :untyped AS u");
    r.params = p;
    r.n_params = TP_ARRAY_LEN(p);
    run1(&cfg, &r, &s);
    CHECK_OK(s);
    CHECK_INT_EQ(s.rows, 1);
    const char *want[][2] = {{"42", "INT"},        {"9000000000", "LONG"}, {"it's \"quoted\" \xc3\xa9", "STRING"},
                             {"2024-02-29", "DATE"}, {"12.34", "DECIMAL"},  {"true", "BOOLEAN"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(want); i++) {
        CHECK_STR_EQ(s.first[i], want[i][0]);
        CHECK_STR_EQ(s.types[i], want[i][1]);
    }
    CHECK_INT_EQ(s.prec[4], 10);
    CHECK_INT_EQ(s.scale[4], 2);
    CHECK(s.first_null[6]);
    CHECK_STR_EQ(s.first[7], "plain");
    sink_free(&s);

    /* the other types, each value read back as the warehouse renders it */
    sink_init(&s, NULL);
    tp_wh_param_t p2[] = {
        {"db", "-2.5e-3", "DOUBLE"},
        {"fl", "1.25", "FLOAT"},
        {"ts", "2024-02-29T23:59:58.123-02:00", "TIMESTAMP"},
        {"ntz", "2024-02-29 12:34:56.5", "TIMESTAMP_NTZ"},
        {"sm", "-32768", "SMALLINT"},
        {"ti", "-128", "TINYINT"},
        {"bin", "hello", "BINARY"},
    };
    req_init(&r, &s, "SELECT :db AS db, :fl AS fl, :ts AS ts, :ntz AS ntz, :sm AS sm, :ti AS ti, :bin AS bin");
    r.params = p2;
    r.n_params = TP_ARRAY_LEN(p2);
    run1(&cfg, &r, &s);
    CHECK_OK(s);
    CHECK_INT_EQ(s.rows, 1);
    const char *want2[][2] = {{"-0.0025", "DOUBLE"},
                              {"1.25", "FLOAT"},
                              {"2024-03-01T01:59:58.123Z", "TIMESTAMP"},
                              {"2024-02-29T12:34:56.500", "TIMESTAMP_NTZ"},
                              {"-32768", "SHORT"},
                              {"-128", "SHORT"},
                              {"68656c6c6f", "BINARY"}};
    for (size_t i = 0; i < TP_ARRAY_LEN(want2); i++) {
        CHECK_STR_EQ(s.first[i], want2[i][0]);
        CHECK_STR_EQ(s.types[i], want2[i][1]);
    }
    sink_free(&s);

    /* a value that does not cast is the server's error, reported precisely */
    sink_init(&s, NULL);
    tp_wh_param_t bad[] = {{"i", "not-a-number", "INT"}};
    req_init(&r, &s, "SELECT :i AS i");
    r.params = bad;
    r.n_params = 1;
    run1(&cfg, &r, &s);
    CHECK(s.res.status == TP_WH_FAILED || s.res.status == TP_WH_ERROR);
    CHECK_CONTAINS(s.res.message, "not-a-number");
    sink_free(&s);
}

/* ---- auth ---- */

static void wrong_pat_is_precise(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    cfg.token = "dapi-wrong";
    sink_t s;
    go(&s, &E, &cfg, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_AUTH);
    CHECK_INT_EQ(s.res.http_status, 403);
    CHECK_STR_EQ(s.res.error_code, "403");
    CHECK_CONTAINS(s.res.message, "Invalid access token.");
    CHECK(strstr(s.res.message, "dapi-wrong") == NULL);
    sink_free(&s);
}

static void bearer_override(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, false);
    cfg.client_id = cfg.client_secret = NULL; /* no client auth at all */
    const char *tokens[] = {PAT, "user-token-expired"};
    for (int i = 0; i < 2; i++) {
        sink_t s;
        sink_init(&s, NULL);
        tp_wh_request_t r;
        req_init(&r, &s, "SELECT 7 AS x");
        r.bearer_token = tokens[i];
        run1(&cfg, &r, &s);
        if (i == 0) {
            CHECK_OK(s);
            CHECK_STR_EQ(s.first[0], "7");
        } else {
            CHECK_ERR(s, TP_WH_ERR_AUTH);
            CHECK(strstr(s.res.message, tokens[i]) == NULL);
        }
        sink_free(&s);
    }
    /* no credentials anywhere: refused before anything is sent */
    struct event_base *base = event_base_new();
    char *err = NULL;
    tp_wh_t *wh = tp_wh_new(base, &cfg, &err);
    sink_t s;
    tp_wh_request_t r;
    req_init(&r, &s, "SELECT 1");
    CHECK(tp_wh_submit(wh, &r, &err) == NULL);
    CHECK_CONTAINS(err, "no warehouse credentials");
    free(err);
    tp_wh_free(wh);
    event_base_free(base);
}

static void oauth_token_cached_and_single_flight(void)
{
    int before = log_count(&E, "/oidc/v1/token", "\"status\":\"200\"");
    rig_t g;
    rig_open(&g, &E, false);
    enum { N = 6 };
    sink_t s[N];
    for (int i = 0; i < N; i++) {
        rig_submit(&g, &s[i], SEQ_SQL, 10);
        s[i].check_seq = true;
    }
    CHECK_INT_EQ(tp_wh_inflight(g.wh), N);
    for (int i = 0; i < N; i++) {
        rig_wait(&g, &s[i]);
        CHECK_SEQ_OK(s[i]);
        sink_free(&s[i]);
    }
    CHECK_INT_EQ(tp_wh_inflight(g.wh), 0);
    /* a second round reuses the cached token */
    sink_t s2;
    rig_submit(&g, &s2, "SELECT 1 AS one", 10);
    rig_wait(&g, &s2);
    CHECK_OK(s2);
    sink_free(&s2);
    CHECK_INT_EQ(log_count(&E, "/oidc/v1/token", "\"status\":\"200\"") - before, 1);
    rig_close(&g);
}

static void oauth_token_refreshed_after_ttl(void)
{
    rig_t g;
    rig_open(&g, &E_TTL, false);
    int before = log_count(&E_TTL, "/oidc/v1/token", "\"status\":\"200\"");
    /* three rounds over ~4 s with a 2 s token lifetime */
    for (int round = 0; round < 3; round++) {
        sink_t s;
        rig_submit(&g, &s, SEQ_SQL, 10);
        s.check_seq = true;
        rig_wait(&g, &s);
        CHECK_OK(s);
        CHECK_INT_EQ(s.rows, 2500);
        CHECK_INT_EQ(s.seq_errors, 0);
        sink_free(&s);
        struct timeval tv = {1, 300000};
        event_base_loopexit(g.base, &tv);
        event_base_dispatch(g.base);
    }
    int fetched = log_count(&E_TTL, "/oidc/v1/token", "\"status\":\"200\"") - before;
    CHECK_MSG(fetched >= 2 && fetched <= 5, "%d tokens fetched over ~4 s with a 2 s lifetime", fetched);
    /* no request was ever refused for an expired token */
    CHECK_INT_EQ(log_count(&E_TTL, "\"status\":\"403\"", "/api/2.0/sql"), 0);
    rig_close(&g);
}

/* A token that expires while one result streams: every chunk request waits
 * 1.5 s in the emulator before its token is checked, and the token lives 4 s,
 * so requests sent with a token due for refresh (age 2..3.6 s) arrive after it
 * expired. The 403 makes the client retry that chunk once with the token its
 * background refresh fetched meanwhile; the result arrives whole, in order. */
static void oauth_token_expires_mid_stream(void)
{
    emu_t x = {0};
    const char *ttl[] = {"--token-ttl", "4", NULL};
    if (!emu_start(&x, "emulator-midstream", ttl)) {
        tp_test_fail(__FILE__, __LINE__, "emulator did not start (see %s)", x.log);
        return;
    }
    if (faults(&x, "latency=1500@chunk")) {
        rig_t g;
        rig_open(&g, &x, false);
        sink_t s;
        rig_submit(&g, &s, "SELECT g AS n FROM generate_series(1, 5000) g ORDER BY g", 10);
        s.check_seq = true;
        while (!s.done && tp_now_ms() - s.t0 < 60000)
            event_base_loop(g.base, EVLOOP_ONCE);
        CHECK(s.done);
        CHECK_OK(s);
        CHECK_INT_EQ(s.res.rows, 5000);
        CHECK_INT_EQ(s.res.chunks, 5);
        CHECK_INT_EQ(s.seq_errors, 0);
        CHECK_INT_EQ(s.offset_errors, 0);
        int64_t took = s.t_done - s.t0;
        int tokens = log_count(&x, "/oidc/v1/token", "\"status\":\"200\"");
        int refused = log_count(&x, "\"status\":\"403\"", "/result/chunks/");
        printf("# result streamed over %lld ms with 4 s tokens: %d tokens, %d chunk requests refused"
               " for an expired token\n", (long long)took, tokens, refused);
        CHECK_MSG(took > 4000, "the result took only %lld ms: it did not outlive a token", (long long)took);
        CHECK_MSG(tokens >= 2, "%d token(s) for a %lld ms result with 4 s tokens", tokens, (long long)took);
        CHECK_MSG(refused >= 1, "no chunk request arrived with an expired token (%d tokens)", tokens);
        /* each refused chunk was asked for once more, not more */
        CHECK(log_count(&x, "\"status\":\"200\"", "/result/chunks/") == 4);
        rig_close(&g);
        sink_free(&s);
    }
    tp_test_stop(x.pid, 5000);
}

/* The warehouse forgets our token (revoked; here: the emulator restarts and
 * loses its tokens): the 403 makes the client fetch a new one and retry once. */
static void oauth_token_revoked_is_refetched(void)
{
    emu_t r = {0};
    if (!emu_start(&r, "emulator-restart", NULL))
        return;
    rig_t g;
    rig_open(&g, &r, false);
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            tp_test_stop(r.pid, 5000);
            if (!emu_start(&r, "emulator-restart2", NULL))
                break;
        }
        sink_t s;
        rig_submit(&g, &s, SEQ_SQL, 10);
        s.check_seq = true;
        rig_wait(&g, &s);
        CHECK_SEQ_OK(s);
        sink_free(&s);
    }
    /* after the restart: one refused call, one new token, then success */
    CHECK_INT_EQ(log_count(&r, "/oidc/v1/token", "\"status\":\"200\""), 1);
    CHECK_INT_EQ(log_count(&r, "\"status\":\"403\"", "/api/2.0/sql/statements"), 1);
    rig_close(&g);
    tp_test_stop(r.pid, 5000);
}

static void oauth_wrong_secret_is_precise(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, false);
    cfg.client_secret = "not-the-secret";
    sink_t s;
    go(&s, &E, &cfg, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_AUTH);
    CHECK_CONTAINS(s.res.message, "OAuth M2M token request failed");
    CHECK_CONTAINS(s.res.message, "invalid_client");
    CHECK(strstr(s.res.message, "not-the-secret") == NULL);
    sink_free(&s);
}

/* ---- faults ---- */

static void fault_latency(void)
{
    if (!faults(&E, "latency=300@get"))
        return;
    sink_t s;
    go(&s, &E, NULL, "SELECT pg_sleep(0.3), 1", M_ASYNC);
    CHECK_OK(s);
    CHECK(s.t_done - s.t0 >= 300);
    faults(&E, NULL);
    sink_free(&s);
}

static void fault_429_retry_after(void)
{
    if (!faults(&E, "status=429x2@execute,retry_after=1"))
        return;
    sink_t s;
    go(&s, &E, NULL, "SELECT 5 AS five", 0);
    CHECK_OK(s);
    CHECK_STR_EQ(s.first[0], "5");
    int64_t took = s.t_done - s.t0;
    CHECK_MSG(took >= 1900, "two Retry-After: 1 waits took only %lld ms", (long long)took);
    faults(&E, NULL);
    sink_free(&s);
}

static void fault_503_on_get_and_chunk(void)
{
    for (int m = 0; m < 3; m++) {
        if (!faults(&E, "status=503x2@get,status=503x2@chunk,status=503@link,retry_after=0"))
            return;
        sink_t s;
        go(&s, &E, NULL, SEQ_SQL, M_ASYNC | M_SEQ | MODES[m]);
        CHECK_SEQ_OK(s);
        faults(&E, NULL);
        sink_free(&s);
    }
}

static void fault_500_on_submit_not_retried(void)
{
    if (!faults(&E, "status=500@execute"))
        return;
    int posts = log_count(&E, "\"method\":\"POST\"", "/api/2.0/sql/statements\"");
    sink_t s;
    go(&s, &E, NULL, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_HTTP);
    CHECK_INT_EQ(s.res.http_status, 500);
    /* a POST that may have run is never sent twice */
    CHECK_INT_EQ(log_count(&E, "\"method\":\"POST\"", "/api/2.0/sql/statements\"") - posts, 1);
    faults(&E, NULL);
    sink_free(&s);
}

/* What a proxy or a broken answer looks like: a precise error naming the
 * statement (once it has an id), never a result handed over as complete. */
static void fault_proxy_page_and_bad_json(void)
{
    /* a load balancer's HTML page instead of the submit's answer */
    if (!faults(&E, "proxy_page=1@execute"))
        return;
    sink_t s;
    go(&s, &E, NULL, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_HTTP);
    CHECK_INT_EQ(s.res.http_status, 502);
    CHECK_CONTAINS(s.res.message, "502");
    CHECK(s.res.rows == 0);
    sink_free(&s);
    /* cut-off JSON while polling: a protocol error naming the statement */
    if (!faults(&E, "bad_json=1@get"))
        return;
    go(&s, &E, NULL, "SELECT pg_sleep(0.2), 1", M_ASYNC);
    CHECK_ERR(s, TP_WH_ERR_PROTOCOL);
    CHECK(s.res.statement_id != NULL);
    CHECK_CONTAINS(s.res.message, s.res.statement_id ? s.res.statement_id : "?");
    CHECK(s.res.rows == 0);
    sink_free(&s);
    /* cut-off JSON as a chunk's answer: the chunk is named, rows short */
    if (!faults(&E, "bad_json=1@chunk"))
        return;
    go(&s, &E, NULL, SEQ_SQL, M_SEQ);
    CHECK_ERR(s, TP_WH_ERR_PROTOCOL);
    CHECK(s.res.chunk_index > 0);
    CHECK_CONTAINS(s.res.message, "chunk ");
    CHECK_MSG(s.res.rows < 2500, "a broken chunk delivered all %lld rows", (long long)s.res.rows);
    faults(&E, NULL);
    sink_free(&s);
}

static void fault_dropped_connection_mid_chunk(void)
{
    for (int m = 0; m < 3; m++) {
        if (!faults(&E, "drop_chunk=2"))
            return;
        sink_t s;
        go(&s, &E, NULL, SEQ_SQL, M_SEQ | MODES[m]);
        /* resumed where it broke: nothing delivered twice, nothing skipped */
        CHECK_SEQ_OK(s);
        if (MODES[m] & M_CSV)
            CHECK_INT_EQ(s.csv_lines, 2501);
        faults(&E, NULL);
        sink_free(&s);
    }
}

static void fault_truncated_chunk(void)
{
    for (int m = 0; m < 3; m++) {
        if (!faults(&E, "truncate_chunk=1"))
            return;
        sink_t s;
        go(&s, &E, NULL, SEQ_SQL, MODES[m]);
        CHECK_ERR(s, TP_WH_ERR_PROTOCOL);
        CHECK(s.res.chunk_index >= 0);
        CHECK_CONTAINS(s.res.message, "chunk ");
        CHECK_CONTAINS(s.res.message, s.res.statement_id ? s.res.statement_id : "?");
        CHECK_MSG(s.res.rows < 2500, "a truncated result delivered all %lld rows", (long long)s.res.rows);
        faults(&E, NULL);
        sink_free(&s);
    }
}

static void fault_expired_links_rerequested(void)
{
    for (int m = 1; m < 3; m++) {
        if (!faults(&E, "expire_links=2"))
            return;
        sink_t s;
        go(&s, &E, NULL, SEQ_SQL, M_SEQ | MODES[m]);
        CHECK_SEQ_OK(s);
        faults(&E, NULL);
        sink_free(&s);
    }
    /* links that never come back fresh: a precise error, not a loop */
    if (!faults(&E, "expire_links"))
        return;
    sink_t s;
    go(&s, &E, NULL, SEQ_SQL, M_LINKS);
    CHECK_ERR(s, TP_WH_ERR_PROTOCOL);
    CHECK_INT_EQ(s.res.chunk_index, 0);
    CHECK_CONTAINS(s.res.message, "expired");
    faults(&E, NULL);
    sink_free(&s);
}

static void fault_token_endpoint(void)
{
    /* fails twice then works: retried */
    if (!faults(&E, "token_fail=2:503"))
        return;
    sink_t s;
    go(&s, &E, NULL, "SELECT 3 AS three", M_OAUTH);
    CHECK_OK(s);
    sink_free(&s);
    /* keeps failing: a precise error once the retry budget is spent */
    if (!faults(&E, "token_fail=1000:500"))
        return;
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, false);
    cfg.retry_budget_ms = 1500;
    go(&s, &E, &cfg, "SELECT 3 AS three", 0);
    CHECK_ERR(s, TP_WH_ERR_AUTH);
    CHECK_CONTAINS(s.res.message, "OAuth M2M token request failed");
    CHECK_CONTAINS(s.res.message, "HTTP 500");
    faults(&E, NULL);
    sink_free(&s);
}

static void connection_refused_is_retried_then_reported(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/", tp_test_free_port());
    cfg.host = url;
    cfg.retry_budget_ms = 800;
    sink_t s;
    go(&s, &E, &cfg, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_TRANSPORT);
    CHECK_CONTAINS(s.res.message, "Couldn't connect");
    CHECK_CONTAINS(s.res.message, "attempts");
    sink_free(&s);
}

static void slow_answers_time_out(void)
{
    /* a status GET slower than request_timeout_ms: retried, then a timeout error */
    if (!faults(&E, "latency=1500@get"))
        return;
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    cfg.request_timeout_ms = 300;
    cfg.retry_budget_ms = 1000;
    sink_t s;
    go(&s, &E, &cfg, "SELECT 1", M_ASYNC);
    CHECK_ERR(s, TP_WH_ERR_TIMEOUT);
    CHECK_CONTAINS(s.res.message, "GET status");
    CHECK_MSG(s.t_done - s.t0 < 5000, "took %lld ms", (long long)(s.t_done - s.t0));
    sink_free(&s);
    /* a chunk download that stalls: the stall timer ends it, naming the chunk */
    if (!faults(&E, "latency=1500@chunk"))
        return;
    cfg.request_timeout_ms = 5000;
    cfg.stall_timeout_ms = 300;
    go(&s, &E, &cfg, SEQ_SQL, 0);
    CHECK_ERR(s, TP_WH_ERR_TIMEOUT);
    CHECK_INT_EQ(s.res.chunk_index, 1);
    CHECK_CONTAINS(s.res.message, "no data received for 300 ms");
    CHECK_INT_EQ(s.rows, 1000); /* chunk 0 came with the answer, nothing more */
    faults(&E, NULL);
    sink_free(&s);
}

static void free_with_statements_in_flight(void)
{
    rig_t g;
    rig_open(&g, &E, false);
    sink_t s[3];
    rig_submit(&g, &s[0], "SELECT pg_sleep(5)", 0);
    rig_submit(&g, &s[1], SEQ_SQL, 0);
    rig_submit(&g, &s[2], SEQ_SQL, 10);
    for (int k = 0; k < 20; k++)
        event_base_loop(g.base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    CHECK(tp_wh_inflight(g.wh) > 0);
    rig_close(&g); /* abandons them: no callback, no leak (ASan checks) */
    for (int i = 0; i < 3; i++) {
        CHECK(!s[i].done);
        sink_free(&s[i]);
    }
}

/* ---- consumer control ---- */

static void pause_resume_backpressure(void)
{
    for (int m = 0; m < 3; m++) {
        tp_wh_config_t cfg;
        cfg_init(&cfg, &E, true);
        cfg.rows_per_batch = 100;
        sink_t s;
        sink_init(&s, NULL);
        tp_wh_request_t r;
        req_init(&r, &s, SEQ_SQL);
        r.disposition = MODES[m] & M_LINKS ? TP_WH_EXTERNAL_LINKS : TP_WH_INLINE;
        r.format = MODES[m] & M_CSV ? TP_WH_CSV : TP_WH_JSON_ARRAY;
        s.check_seq = !(MODES[m] & M_CSV);
        s.pause_each = true;
        run1(&cfg, &r, &s);
        CHECK_SEQ_OK(s);
        CHECK(s.pauses >= (MODES[m] & M_CSV ? 3 : 25));
        if (!(MODES[m] & M_CSV))
            CHECK_MSG(s.batches >= 25, "batches %lld", (long long)s.batches);
        sink_free(&s);
    }
}

/* Large chunks arrive in many network reads: pauses land mid-chunk, and resumes
 * deliver part of what was parsed meanwhile before the download goes on. */
static void pause_resume_large_chunks(void)
{
    const char *sql = "SELECT g AS n, 'v' || g AS v FROM generate_series(1, 300000) g ORDER BY g";
    for (int m = 0; m < 3; m++) {
        tp_wh_config_t cfg;
        cfg_init(&cfg, &E_BIG, true);
        cfg.rows_per_batch = 777;
        sink_t s;
        sink_init(&s, NULL);
        s.discard_csv = true;
        tp_wh_request_t r;
        req_init(&r, &s, sql);
        r.disposition = MODES[m] & M_LINKS ? TP_WH_EXTERNAL_LINKS : TP_WH_INLINE;
        r.format = MODES[m] & M_CSV ? TP_WH_CSV : TP_WH_JSON_ARRAY;
        s.check_seq = !(MODES[m] & M_CSV);
        s.pause_each = true;
        run1(&cfg, &r, &s);
        CHECK_OK(s);
        CHECK_INT_EQ(s.res.rows, 300000);
        CHECK_INT_EQ(s.seq_errors, 0);
        CHECK_INT_EQ(s.offset_errors, 0);
        if (MODES[m] & M_CSV)
            CHECK_INT_EQ(s.csv_lines, 300001);
        else
            CHECK_INT_EQ(s.rows, 300000);
        sink_free(&s);
    }
}

static void consumer_stop_and_cancel_mid_stream(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    cfg.rows_per_batch = 100;
    for (int i = 0; i < 2; i++) {
        sink_t s;
        sink_init(&s, NULL);
        tp_wh_request_t r;
        req_init(&r, &s, SEQ_SQL);
        r.disposition = TP_WH_EXTERNAL_LINKS;
        if (i == 0)
            s.reject_after_rows = 1200;
        else
            s.cancel_after_rows = 1500;
        run1(&cfg, &r, &s);
        if (i == 0) {
            CHECK_ERR(s, TP_WH_ERR_CONSUMER);
            CHECK_INT_EQ(s.rows, 1200);
        } else {
            CHECK_INT_EQ(s.res.status, TP_WH_CANCELED);
            CHECK_INT_EQ(s.rows, 1500); /* nothing after the cancel */
        }
        sink_free(&s);
    }
}

static void blocking_wrapper_and_host_forms(void)
{
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, true);
    char url[80];
    snprintf(url, sizeof(url), "  %s///  ", E.url);
    cfg.host = url;
    tp_wh_request_t r;
    tp_wh_request_init(&r);
    r.sql = "SELECT 1";
    tp_wh_result_t res;
    bool ok = tp_wh_run(&cfg, &r, &res);
    CHECK_MSG(ok, "%s", res.message ? res.message : "");
    CHECK(res.statement_id != NULL);
    CHECK_INT_EQ(res.rows, 1);
    tp_wh_result_clear(&res);
    cfg.warehouse_id = "no-such-warehouse";
    CHECK(!tp_wh_run(&cfg, &r, &res));
    CHECK_INT_EQ(res.status, TP_WH_ERROR);
    CHECK(res.message != NULL && strstr(res.message, "no-such-warehouse") != NULL);
    tp_wh_result_clear(&res);
    cfg.warehouse_id = NULL;
    CHECK(!tp_wh_run(&cfg, &r, &res));
    CHECK_INT_EQ(res.kind, TP_WH_ERR_REQUEST);
    CHECK_CONTAINS(res.message, "warehouse id");
    tp_wh_result_clear(&res);
}

/* Everything the client logs at debug level over a busy run: no token, no
 * secret, no link URL or link header. */
static void secrets_never_logged(void)
{
    char *path = tp_xasprintf("%s/client-log.jsonl", tp_test_tmpdir());
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f == NULL) {
        free(path);
        return;
    }
    tp_log_set_stream(f);
    tp_log_set_level(TP_LOG_DEBUG);
    sink_t s;
    for (int m = 0; m < 3; m++) {
        go(&s, &E, NULL, SEQ_SQL, MODES[m] | M_OAUTH);
        CHECK_OK(s);
        sink_free(&s);
    }
    if (faults(&E, "expire_links=1,drop_chunk=1,status=503@link")) {
        go(&s, &E, NULL, SEQ_SQL, M_LINKS);
        CHECK_OK(s);
        sink_free(&s);
        faults(&E, NULL);
    }
    tp_wh_config_t cfg;
    cfg_init(&cfg, &E, false);
    cfg.client_secret = "wrong-secret-xyz";
    go(&s, &E, &cfg, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_AUTH);
    sink_free(&s);
    cfg_init(&cfg, &E, true);
    cfg.token = "dapi-wrong-abc";
    go(&s, &E, &cfg, "SELECT 1", 0);
    CHECK_ERR(s, TP_WH_ERR_AUTH);
    sink_free(&s);
    tp_log_set_level(TP_LOG_ERROR);
    tp_log_set_stream(NULL);
    fclose(f);
    char *text = tp_read_file(path, NULL);
    CHECK(text != NULL && strlen(text) > 200);
    const char *never[] = {PAT, CLIENT_SECRET, "wrong-secret-xyz", "dapi-wrong-abc", "Bearer", "Basic",
                           "access_token", "_tp_blob", "x-tp-link-key", "Authorization"};
    for (size_t i = 0; text && i < TP_ARRAY_LEN(never); i++)
        CHECK_MSG(strstr(text, never[i]) == NULL, "the client log contains \"%s\"", never[i]);
    free(text);
    free(path);
}

/* ---- a big result with flat memory ---- */

static long vm_hwm_kb(void)
{
    char *s = tp_read_file("/proc/self/status", NULL);
    char *p = s ? strstr(s, "VmHWM:") : NULL;
    long kb = p ? strtol(p + 6, NULL, 10) : -1;
    free(s);
    return kb;
}

static void reset_hwm(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static void big_result_flat_memory(void)
{
    int64_t n = sanitize ? 200000 : 1000000;
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT g AS n, g * 3 AS triple, 'row-' || g AS label FROM generate_series(1, %lld) g ORDER BY g",
             (long long)n);
    /* INLINE results above 25 MiB fail by design (§1.10): links it is */
    for (int f = 0; f < 2; f++) {
        tp_wh_config_t cfg;
        cfg_init(&cfg, &E_BIG, true);
        sink_t s;
        sink_init(&s, NULL);
        tp_wh_request_t r;
        req_init(&r, &s, sql);
        r.disposition = TP_WH_EXTERNAL_LINKS;
        r.format = f ? TP_WH_CSV : TP_WH_JSON_ARRAY;
        s.check_seq = !f;
        s.discard_csv = true;
        reset_hwm();
        long before = vm_hwm_kb();
        int64_t t0 = tp_now_ms();
        run1(&cfg, &r, &s);
        long after = vm_hwm_kb();
        CHECK_OK(s);
        CHECK_INT_EQ(s.res.rows, n);
        CHECK_INT_EQ(s.seq_errors, 0);
        long grew = after - before;
        printf("# big result EXTERNAL_LINKS %s: %lld rows in %lld chunks, %.1f s, peak RSS %ld kB "
               "(%ld kB above the %ld kB before)%s\n",
               f ? "CSV" : "JSON_ARRAY", (long long)s.res.rows, (long long)s.res.chunks,
               (double)(tp_now_ms() - t0) / 1000.0, after, grew, before,
               sanitize ? " [sanitizer build: fewer rows]" : "");
        /* flat: a few chunks' worth, nowhere near the result (~40 MB as JSON) */
        CHECK_MSG(grew < (sanitize ? 65536 : 24576), "peak RSS grew by %ld kB", grew);
        if (f)
            CHECK_INT_EQ(s.csv_lines, n + 1);
        sink_free(&s);
    }
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    sanitize = getenv("TP_SANITIZE") && strcmp(getenv("TP_SANITIZE"), "1") == 0;
#if defined(__SANITIZE_ADDRESS__)
    sanitize = true; /* make check SANITIZE=1 does not export TP_SANITIZE */
#endif
    if (tp_test_dsn() == NULL) {
        tp_test_skip("test_wh_client", "no harness Postgres");
        return tp_test_done();
    }
    tp_log_set_level(TP_LOG_ERROR);
    const char *small_chunks[] = {"--chunk-rows", "1000", NULL};
    const char *ttl[] = {"--token-ttl", "2", "--link-ttl", "2", NULL};
    const char *big[] = {"--chunk-rows", "122880", NULL};
    (void)small_chunks;
    if (!emu_start(&E, "emulator", NULL) || !emu_start(&E_TTL, "emulator-ttl", ttl) ||
        !emu_start(&E_BIG, "emulator-big", big)) {
        tp_test_fail(__FILE__, __LINE__, "emulator did not start (see its log in %s)", tp_test_tmpdir());
        return tp_test_done();
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    TP_RUN(big_result_flat_memory);
    TP_RUN(inline_json_multi_chunk);
    TP_RUN(links_json_multi_chunk);
    TP_RUN(links_csv_multi_chunk);
    TP_RUN(inline_csv_rejected_precisely);
    TP_RUN(ddl_and_empty_results);
    TP_RUN(failed_statement_reports_sql_state);
    TP_RUN(cancel_running_statement);
    TP_RUN(cancel_before_send);
    TP_RUN(closed_while_polling);
    TP_RUN(closed_between_chunks);
    TP_RUN(unknown_state);
    TP_RUN(continue_timeout_then_poll);
    TP_RUN(on_wait_timeout_cancel);
    TP_RUN(parameter_types);
    TP_RUN(request_fields);
    TP_RUN(wrong_pat_is_precise);
    TP_RUN(bearer_override);
    TP_RUN(oauth_token_cached_and_single_flight);
    TP_RUN(oauth_token_refreshed_after_ttl);
    TP_RUN(oauth_token_expires_mid_stream);
    TP_RUN(oauth_token_revoked_is_refetched);
    TP_RUN(oauth_wrong_secret_is_precise);
    TP_RUN(fault_latency);
    TP_RUN(fault_429_retry_after);
    TP_RUN(fault_503_on_get_and_chunk);
    TP_RUN(fault_500_on_submit_not_retried);
    TP_RUN(fault_proxy_page_and_bad_json);
    TP_RUN(fault_dropped_connection_mid_chunk);
    TP_RUN(fault_truncated_chunk);
    TP_RUN(fault_expired_links_rerequested);
    TP_RUN(fault_token_endpoint);
    TP_RUN(connection_refused_is_retried_then_reported);
    TP_RUN(slow_answers_time_out);
    TP_RUN(free_with_statements_in_flight);
    TP_RUN(pause_resume_backpressure);
    TP_RUN(pause_resume_large_chunks);
    TP_RUN(consumer_stop_and_cancel_mid_stream);
    TP_RUN(blocking_wrapper_and_host_forms);
    TP_RUN(secrets_never_logged);
    tp_test_stop(E.pid, 5000);
    tp_test_stop(E_TTL.pid, 5000);
    tp_test_stop(E_BIG.pid, 5000);
    curl_global_cleanup();
    return tp_test_done();
}
