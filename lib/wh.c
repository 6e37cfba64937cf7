/* Databricks SQL warehouse client (see wh.h). Owns the client (normalised host,
 * auth, one curl multi through curlev), the OAuth token cache, every HTTP call
 * ("call": one logical request with its retries) and the statement state
 * machine: SUBMIT (POST /statements) -> POLL (GET status with capped backoff)
 * -> STREAM (chunk 0 from the status answer, then GET result/chunks/N or the
 * external link of each chunk) -> DONE (on_done from a deferred event, then
 * free). Rows are parsed by whjson as bytes arrive and handed to the consumer
 * in batches; CSV bytes are passed through while a record counter checks the
 * row count. A consumer pause pauses the curl transfer. Errors end the
 * statement through finish(), which stops its call and timers and defers the
 * callback. Secrets (tokens, client secret, link URLs and their headers) are
 * only ever put in curl options, never in logs or messages. It does not
 * prefetch chunks, speak ARROW_STREAM, or close statements (undocumented DELETE). */
#include "tidepool/wh.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <jansson.h>

#include "tidepool/curlev.h"
#include "tidepool/log.h"
#include "tidepool/whjson.h"

#define WH_MAGIC 0x57484354u   /* "WHCT" */
#define STMT_MAGIC 0x5748534du /* "WHSM" */
#define CALL_MAGIC 0x5748434cu /* "WHCL" */

#define STATEMENTS_PATH "/api/2.0/sql/statements"
#define TOKEN_PATH "/oidc/v1/token"
#define ERROR_BODY_MAX 65536
#define MAX_LINK_REFRESH 3
#define MSG_MAX 600

typedef enum { K_EXEC, K_STATUS, K_CHUNK, K_LINK, K_CANCEL, K_TOKEN, K_API } call_kind_t;
typedef enum { P_SUBMIT, P_POLL, P_STREAM, P_DONE } phase_t;
typedef enum { SINK_RAW, SINK_JSON, SINK_CSV } sink_t;

typedef struct call call_t;

typedef struct token_cache {
    char *header; /* "Authorization: Bearer ..." */
    int64_t stale_ms, hard_ms;
    uint64_t gen;
    call_t *inflight;
    call_t *waiters; /* calls parked until a token arrives */
    int64_t next_try_ms;
} token_cache_t;

struct tp_wh {
    uint32_t magic;
    struct event_base *base;
    tp_curlev_t *cv;
    char *host;
    char *warehouse_id;
    char *pat_header;
    char *client_id, *client_secret, *scope;
    char *workspace_hdr;
    char *ca_file;
    char *user_agent;
    tp_wh_config_t cfg; /* numbers only; strings above */
    token_cache_t tok;
    tp_wh_stmt_t *stmts;
    call_t *calls;
    size_t inflight;
};

typedef struct csvcount {
    int q; /* 0 outside quotes, 1 inside, 2 quote seen inside */
    bool mid;
    int64_t records;
} csvcount_t;

struct call {
    uint32_t magic;
    tp_wh_t *wh;
    tp_wh_stmt_t *st; /* NULL: token call or detached cancel */
    call_kind_t kind;
    bool post;
    bool use_auth;
    bool streaming; /* rows/bytes go to the consumer while downloading */
    char *url;      /* secret for K_LINK */
    char *what;     /* loggable description ("GET chunk 3") */
    char *body;
    struct curl_slist *xhdrs; /* K_LINK http_headers (secret) */
    char *auth_override;      /* per-statement bearer header (secret) */
    int64_t chunk;
    CURL *easy;
    struct curl_slist *hdrs;
    char errbuf[CURL_ERROR_SIZE];
    bool parked;
    call_t *park_next;
    uint64_t tok_gen;
    bool auth_retried;
    int attempts;
    int64_t started_ms;
    struct event *retry_timer;
    struct event *stall_timer;
    int64_t last_byte_ms;
    /* per attempt */
    long http;
    int64_t retry_after_ms;
    sink_t sink;
    bool sink_chosen;
    tp_buf_t raw;
    int64_t body_bytes;
    tp_whjson_t *json;
    csvcount_t csv;
    int64_t skip_bytes; /* CSV bytes already delivered from this chunk */
    bool curl_paused;
    bool local_abort; /* the write callback stopped the transfer */
    char local_msg[MSG_MAX];
    tp_wh_errkind_t local_kind;
    tp_wh_api_cb api_cb; /* K_API only */
    void *api_arg;
    call_t *prev, *next;
};

typedef struct link {
    char *url;
    struct curl_slist *headers;
    int64_t expires_ms; /* wall clock; 0 unknown */
    int64_t row_count;  /* -1 unknown */
    int64_t row_offset;
    int64_t next_index;
    char *next_link;
    int refreshes;
} link_t;

struct tp_wh_stmt {
    uint32_t magic;
    tp_wh_t *wh;
    tp_wh_request_t req; /* callbacks, numbers; string fields not used */
    char *label;
    char *bearer_header;
    char *body;
    char *id;
    phase_t phase;
    call_t *call;
    struct event *timer;    /* poll delay */
    struct event *deadline;
    struct event *defer;
    int64_t poll_delay_ms;
    bool cancel_requested, cancel_handled, cancel_sent;
    bool server_terminal;
    bool consumer_failed;
    bool paused;
    int64_t unknown_since_ms;
    char *unknown_state;
    /* manifest */
    json_t *manifest_json;
    tp_wh_column_t *cols;
    tp_wh_manifest_t man;
    bool manifest_seen;
    /* streaming */
    int64_t chunk;           /* chunk being read */
    int64_t chunk_base;      /* row offset of its first row */
    int64_t chunk_rows_done; /* its rows (or CSV bytes' rows) delivered */
    int64_t chunk_bytes_done;
    tp_whjson_t *held;         /* parser whose batch still has rows to deliver */
    size_t batch_pos;
    bool held_complete; /* the chunk's download is over; after flushing, move on */
    int64_t next_index;
    char *next_link;
    link_t link;
    bool refreshing;
    tp_wh_result_t res;
    tp_wh_stmt_t *prev, *next;
};

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static int64_t now_ms(void)
{
    return tp_now_ms();
}

const char *tp_wh_status_name(tp_wh_status_t s)
{
    switch (s) {
    case TP_WH_SUCCEEDED: return "SUCCEEDED";
    case TP_WH_FAILED: return "FAILED";
    case TP_WH_CANCELED: return "CANCELED";
    case TP_WH_CLOSED: return "CLOSED";
    case TP_WH_ERROR: return "ERROR";
    }
    return "?";
}

static char *dup_or_null(const char *s)
{
    return s ? tp_xstrdup(s) : NULL;
}

void tp_wh_result_copy(tp_wh_result_t *dst, const tp_wh_result_t *src)
{
    *dst = *src;
    dst->statement_id = dup_or_null(src->statement_id);
    dst->error_code = dup_or_null(src->error_code);
    dst->message = dup_or_null(src->message);
    dst->sql_state = dup_or_null(src->sql_state);
}

void tp_wh_result_clear(tp_wh_result_t *r)
{
    free(r->statement_id);
    free(r->error_code);
    free(r->message);
    free(r->sql_state);
    memset(r, 0, sizeof(*r));
    r->chunk_index = -1;
}

/* Copies text into a one-line, bounded, printable message. */
static void clean_line(char *out, size_t outlen, const char *in, size_t inlen)
{
    size_t o = 0;
    bool space = false;
    for (size_t i = 0; i < inlen && o + 1 < outlen; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c < 0x20 || c == 0x7f) {
            space = o > 0;
            continue;
        }
        if (space && o + 2 < outlen)
            out[o++] = ' ';
        space = false;
        out[o++] = (char)c;
    }
    out[o] = '\0';
}

static void st_log(const tp_wh_stmt_t *st, tp_log_level_t lvl, int64_t chunk, const char *fmt, ...)
    TP_PRINTF(4, 5);
static void st_log(const tp_wh_stmt_t *st, tp_log_level_t lvl, int64_t chunk, const char *fmt, ...)
{
    if (!tp_log_enabled(lvl))
        return;
    char msg[1024], cbuf[24];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    const char *kv[7];
    int n = 0;
    kv[n++] = "statement_id";
    kv[n++] = st && st->id ? st->id : NULL;
    if (st && st->label) {
        kv[n++] = "label";
        kv[n++] = st->label;
    }
    if (chunk >= 0) {
        snprintf(cbuf, sizeof(cbuf), "%lld", (long long)chunk);
        kv[n++] = "chunk";
        kv[n++] = cbuf;
    }
    kv[n] = NULL;
    tp_log_emit(lvl, kv, "%s", msg);
}

/* ------------------------------------------------------------------ */
/* configuration                                                        */

void tp_wh_config_init(tp_wh_config_t *c)
{
    memset(c, 0, sizeof(*c));
    c->connect_timeout_ms = 10000;
    c->request_timeout_ms = 60000;
    c->stall_timeout_ms = 60000;
    c->poll_initial_ms = 100;
    c->poll_max_ms = 5000;
    c->retry_budget_ms = 120000;
    c->retry_max_ms = 10000;
    c->unknown_state_ms = 60000;
    c->statement_timeout_ms = 0;
    c->max_response_bytes = 64 << 20;
    c->rows_per_batch = 1024;
    c->max_connections = 64;
}

static const char *env_nonempty(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

void tp_wh_config_from_env(tp_wh_config_t *c)
{
    if (c->host == NULL)
        c->host = env_nonempty("DATABRICKS_HOST");
    if (c->warehouse_id == NULL)
        c->warehouse_id = env_nonempty("DATABRICKS_WAREHOUSE_ID");
    if (c->token == NULL)
        c->token = env_nonempty("DATABRICKS_TOKEN");
    if (c->client_id == NULL)
        c->client_id = env_nonempty("DATABRICKS_CLIENT_ID");
    if (c->client_secret == NULL)
        c->client_secret = env_nonempty("DATABRICKS_CLIENT_SECRET");
    if (c->workspace_id == NULL)
        c->workspace_id = env_nonempty("DATABRICKS_WORKSPACE_ID");
}

char *tp_wh_normalize_host(const char *host, char **err)
{
    *err = NULL;
    if (host == NULL) {
        *err = tp_xstrdup("warehouse host is not set (DATABRICKS_HOST)");
        return NULL;
    }
    while (isspace((unsigned char)*host))
        host++;
    size_t len = strlen(host);
    while (len > 0 && isspace((unsigned char)host[len - 1]))
        len--;
    char *h = tp_xstrndup(host, len);
    const char *scheme = "https";
    const char *rest = h;
    const char *sep = strstr(h, "://");
    if (sep != NULL) {
        size_t sl = (size_t)(sep - h);
        if (sl == 5 && strncasecmp(h, "https", 5) == 0)
            scheme = "https";
        else if (sl == 4 && strncasecmp(h, "http", 4) == 0)
            scheme = "http";
        else {
            *err = tp_xasprintf("warehouse host has unsupported scheme \"%.*s\" (use https://)",
                                (int)(sl > 20 ? 20 : sl), h);
            free(h);
            return NULL;
        }
        rest = sep + 3;
    }
    /* keep the authority only, as the Databricks SDKs do: path, query and trailing slashes go */
    size_t alen = strcspn(rest, "/?#");
    if (alen == 0) {
        *err = tp_xstrdup("warehouse host is empty (DATABRICKS_HOST)");
        free(h);
        return NULL;
    }
    for (size_t i = 0; i < alen; i++) {
        unsigned char c = (unsigned char)rest[i];
        if (c <= 0x20 || c == '@' || c == '\\' || c >= 0x7f) {
            *err = tp_xstrdup("warehouse host contains a character not allowed in a host name");
            free(h);
            return NULL;
        }
    }
    if (strcmp(scheme, "https") == 0 && alen > 4 && strncmp(rest + alen - 4, ":443", 4) == 0)
        alen -= 4;
    char *out = tp_xasprintf("%s://%.*s", scheme, (int)alen, rest);
    free(h);
    return out;
}

/* ------------------------------------------------------------------ */
/* error bodies (§1.11)                                                 */

void tp_wh_error_body(const char *body, size_t len, char **code, char **msg)
{
    *code = NULL;
    *msg = NULL;
    char line[MSG_MAX];
    size_t i = 0;
    while (i < len && isspace((unsigned char)body[i]))
        i++;
    if (i == len) {
        *msg = tp_xstrdup("empty body");
        return;
    }
    if (body[i] == '{') {
        json_error_t je;
        json_t *j = json_loadb(body, len, JSON_DECODE_ANY, &je);
        if (json_is_object(j)) {
            json_t *ec = json_object_get(j, "error_code");
            if (ec == NULL)
                ec = json_object_get(j, "errorCode");
            if (ec == NULL)
                ec = json_object_get(j, "scimType");
            json_t *m = json_object_get(j, "message");
            if (!json_is_string(m))
                m = json_object_get(j, "error_description");
            if (!json_is_string(m))
                m = json_object_get(j, "errorSummary");
            if (!json_is_string(m))
                m = json_object_get(j, "detail");
            json_t *legacy = json_object_get(j, "error");
            if (json_is_string(ec))
                *code = tp_xstrdup(json_string_value(ec));
            else if (json_is_integer(ec))
                *code = tp_xasprintf("%lld", (long long)json_integer_value(ec));
            if (json_is_string(m)) {
                const char *s = json_string_value(m);
                clean_line(line, sizeof(line), s, strlen(s));
                *msg = tp_xstrdup(line);
            }
            if (json_is_string(legacy)) {
                const char *s = json_string_value(legacy);
                clean_line(line, sizeof(line), s, strlen(s));
                if (*msg == NULL)
                    *msg = tp_xstrdup(line);
                else if (*code == NULL)
                    *code = tp_xstrdup(line); /* OAuth: {"error": code, "error_description": msg} */
            }
            if (*msg == NULL) {
                clean_line(line, sizeof(line), body + i, len - i);
                *msg = tp_xasprintf("JSON error body without a message: %s", line);
            }
            json_decref(j);
            return;
        }
        json_decref(j);
    }
    if (body[i] == '<') {
        /* object-store XML error (external links): <Code> and <Message> */
        const char *tags[2][2] = {{"<Code>", "</Code>"}, {"<Message>", "</Message>"}};
        char *parts[2] = {NULL, NULL};
        for (int k = 0; k < 2; k++) {
            const char *a = memmem(body + i, len - i, tags[k][0], strlen(tags[k][0]));
            if (a == NULL)
                continue;
            a += strlen(tags[k][0]);
            const char *e = memmem(a, (size_t)(body + len - a), tags[k][1], strlen(tags[k][1]));
            if (e == NULL)
                continue;
            clean_line(line, sizeof(line), a, (size_t)(e - a));
            parts[k] = tp_xstrdup(line);
        }
        if (parts[1] != NULL) {
            *code = parts[0];
            *msg = parts[1];
            return;
        }
        free(parts[0]);
        /* an HTML page from a gateway or proxy: its <title> says the most */
        const char *t = NULL;
        for (size_t k = i; k + 7 <= len; k++)
            if (strncasecmp(body + k, "<title>", 7) == 0) {
                t = body + k + 7;
                break;
            }
        if (t != NULL) {
            const char *e = t;
            while (e < body + len && *e != '<')
                e++;
            clean_line(line, sizeof(line), t, (size_t)(e - t));
            *msg = tp_xasprintf("non-JSON HTML page: %s", line);
        } else {
            *msg = tp_xstrdup("non-JSON HTML page without a title");
        }
        return;
    }
    clean_line(line, sizeof(line), body + i, len - i > 400 ? 400 : len - i);
    /* plain text, often "CODE: message" */
    size_t cl = 0;
    while (line[cl] && (isupper((unsigned char)line[cl]) || line[cl] == '_' || isdigit((unsigned char)line[cl])))
        cl++;
    if (cl > 1 && line[cl] == ':' && line[cl + 1] == ' ') {
        *code = tp_xstrndup(line, cl);
        *msg = tp_xstrdup(line + cl + 2);
    } else {
        *msg = tp_xasprintf("non-JSON body: %s", line);
    }
}

/* ------------------------------------------------------------------ */
/* forward declarations                                                 */

static void call_start(call_t *c);
static void call_free(call_t *c);
static void call_fail_parked(call_t *c, tp_wh_errkind_t kind, const char *msg);
static void on_call_done(CURL *easy, CURLcode rc, void *arg);
static void stmt_call_result(call_t *c, CURLcode rc);
static void token_call_result(call_t *c, CURLcode rc);
static void api_call_result(call_t *c, CURLcode rc);
static void finish(tp_wh_stmt_t *st, tp_wh_status_t status, tp_wh_errkind_t kind, int http,
                   int64_t chunk, const char *code, const char *fmt, ...) TP_PRINTF(7, 8);
static void schedule_defer(tp_wh_stmt_t *st);
static void send_cancel(tp_wh_t *wh, const char *id, const char *bearer);
static bool flush_held(tp_wh_stmt_t *st);
static void after_chunk(tp_wh_stmt_t *st);

/* ------------------------------------------------------------------ */
/* calls                                                                */

static call_t *call_new(tp_wh_t *wh, tp_wh_stmt_t *st, call_kind_t kind, bool post, char *url,
                        char *what)
{
    call_t *c = tp_xcalloc(1, sizeof(*c));
    c->magic = CALL_MAGIC;
    c->wh = wh;
    c->st = st;
    c->kind = kind;
    c->post = post;
    c->url = url;
    c->what = what;
    c->chunk = -1;
    c->use_auth = kind != K_LINK && kind != K_TOKEN;
    if (st != NULL && st->bearer_header != NULL)
        c->auth_override = tp_xstrdup(st->bearer_header);
    c->started_ms = now_ms();
    c->next = wh->calls;
    if (wh->calls)
        wh->calls->prev = c;
    wh->calls = c;
    return c;
}

static void call_reset_attempt(call_t *c)
{
    if (c->easy != NULL) {
        tp_curlev_remove(c->wh->cv, c->easy);
        curl_easy_cleanup(c->easy);
        c->easy = NULL;
    }
    curl_slist_free_all(c->hdrs);
    c->hdrs = NULL;
    tp_buf_free(&c->raw);
    tp_whjson_free(c->json);
    c->json = NULL;
    memset(&c->csv, 0, sizeof(c->csv));
    c->http = 0;
    c->retry_after_ms = -1;
    c->sink_chosen = false;
    c->body_bytes = 0;
    c->curl_paused = false;
    c->local_abort = false;
    c->local_msg[0] = '\0';
    if (c->stall_timer)
        evtimer_del(c->stall_timer);
}

static void unpark(call_t *c)
{
    if (!c->parked)
        return;
    call_t **pp = &c->wh->tok.waiters;
    while (*pp && *pp != c)
        pp = &(*pp)->park_next;
    if (*pp)
        *pp = c->park_next;
    c->parked = false;
    c->park_next = NULL;
}

static void call_free(call_t *c)
{
    if (c == NULL)
        return;
    if (c->magic != CALL_MAGIC)
        abort();
    call_reset_attempt(c);
    unpark(c);
    if (c->wh->tok.inflight == c)
        c->wh->tok.inflight = NULL;
    if (c->retry_timer)
        event_free(c->retry_timer);
    if (c->stall_timer)
        event_free(c->stall_timer);
    if (c->prev)
        c->prev->next = c->next;
    else
        c->wh->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    curl_slist_free_all(c->xhdrs);
    free(c->auth_override);
    free(c->url);
    free(c->what);
    free(c->body);
    c->magic = 0;
    free(c);
}

static size_t on_header(char *buf, size_t size, size_t n, void *arg)
{
    call_t *c = arg;
    if (c->magic != CALL_MAGIC)
        return 0;
    size_t len = size * n;
    if (len > 5 && strncmp(buf, "HTTP/", 5) == 0) {
        c->retry_after_ms = -1; /* a new response (after 100 Continue, say) */
        return len;
    }
    if (len > 12 && strncasecmp(buf, "Retry-After:", 12) == 0) {
        char v[32];
        size_t vl = len - 12 < sizeof(v) - 1 ? len - 12 : sizeof(v) - 1;
        memcpy(v, buf + 12, vl);
        v[vl] = '\0';
        char *t = tp_strtrim(v);
        int64_t secs;
        if (tp_parse_int64(t, 0, 86400, &secs))
            c->retry_after_ms = secs * 1000;
        else
            c->retry_after_ms = 1000; /* unparseable (an HTTP date, say): 1 s */
    }
    return len;
}

static void local_abort(call_t *c, tp_wh_errkind_t kind, const char *fmt, ...) TP_PRINTF(3, 4);
static void local_abort(call_t *c, tp_wh_errkind_t kind, const char *fmt, ...)
{
    if (c->local_abort)
        return;
    c->local_abort = true;
    c->local_kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->local_msg, sizeof(c->local_msg), fmt, ap);
    va_end(ap);
}

static bool stmt_stopping(const tp_wh_stmt_t *st)
{
    return st->phase == P_DONE || st->cancel_requested || st->consumer_failed;
}

/* Delivers up to one batch of rows from the held parser. */
static bool deliver_rows(tp_wh_stmt_t *st, tp_whjson_t *j, bool all)
{
    for (;;) {
        const char *const *cells;
        const size_t *lens;
        size_t ncols;
        size_t n = tp_whjson_batch(j, &cells, &lens, &ncols);
        if (n > 0 && ncols != st->man.n_columns) {
            finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, 0, st->chunk, NULL,
                   "chunk %lld of statement %s: rows have %zu cells but the manifest has %zu columns",
                   (long long)st->chunk, st->id, ncols, st->man.n_columns);
            return false;
        }
        size_t per = (size_t)st->wh->cfg.rows_per_batch;
        while (st->batch_pos < n && (all || n - st->batch_pos >= per)) {
            if (stmt_stopping(st) || st->paused)
                return false;
            size_t k = n - st->batch_pos < per ? n - st->batch_pos : per;
            tp_wh_rows_t r = {
                .n_rows = k,
                .n_cols = ncols,
                .cells = cells + st->batch_pos * ncols,
                .lens = lens + st->batch_pos * ncols,
                .chunk_index = st->chunk,
                .row_offset = st->chunk_base + st->chunk_rows_done,
            };
            bool ok = st->req.on_rows(st, &r, st->req.arg);
            st->batch_pos += k;
            st->chunk_rows_done += (int64_t)k;
            st->res.rows += (int64_t)k;
            if (!ok) {
                st->consumer_failed = true;
                return false;
            }
            /* the consumer may have cleared nothing, but cells stay valid: no feed in between */
        }
        if (st->batch_pos == n) {
            tp_whjson_batch_clear(j);
            st->batch_pos = 0;
            return true;
        }
        return !all;
    }
}

static bool on_json_row(void *arg)
{
    call_t *c = arg;
    tp_wh_stmt_t *st = c->st;
    if (!c->streaming || st == NULL)
        return true;
    if (st->paused || stmt_stopping(st))
        return !st->consumer_failed;
    deliver_rows(st, c->json, false);
    return !st->consumer_failed && st->phase != P_DONE;
}

static void csv_count(csvcount_t *cc, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (cc->q == 1) {
            if (ch == '"')
                cc->q = 2;
            continue;
        }
        if (cc->q == 2) {
            if (ch == '"') {
                cc->q = 1;
                continue;
            }
            cc->q = 0;
        }
        if (ch == '"') {
            cc->q = 1;
            cc->mid = true;
        } else if (ch == '\n') {
            cc->records++;
            cc->mid = false;
        } else if (ch != '\r') {
            cc->mid = true;
        }
    }
}

static void choose_sink(call_t *c)
{
    c->sink_chosen = true;
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &c->http);
    tp_wh_stmt_t *st = c->st;
    if (c->http != 200 || st == NULL || c->kind == K_CANCEL || c->kind == K_TOKEN) {
        c->sink = SINK_RAW;
        return;
    }
    if (c->kind == K_LINK && st->man.format == TP_WH_CSV) {
        c->sink = SINK_CSV;
        return;
    }
    static const char *const stmt_path[] = {"result", "data_array"};
    static const char *const chunk_path[] = {"data_array"};
    c->sink = SINK_JSON;
    st->batch_pos = 0; /* a new parser: its batch starts empty */
    if (c->kind == K_LINK)
        c->json = tp_whjson_new(NULL, 0);
    else if (c->kind == K_CHUNK)
        c->json = tp_whjson_new(chunk_path, 1);
    else
        c->json = tp_whjson_new(stmt_path, 2);
    tp_whjson_set_row_cb(c->json, on_json_row, c);
    if (st->manifest_seen && (c->kind == K_CHUNK || c->kind == K_LINK)) {
        tp_whjson_set_ncols(c->json, st->man.n_columns);
        tp_whjson_set_skip(c->json, st->chunk_rows_done);
    }
}

static size_t on_write(char *data, size_t size, size_t n, void *arg)
{
    call_t *c = arg;
    if (c->magic != CALL_MAGIC)
        return 0;
    size_t len = size * n;
    c->last_byte_ms = now_ms();
    if (!c->sink_chosen)
        choose_sink(c);
    tp_wh_stmt_t *st = c->st;
    if (c->sink == SINK_RAW) {
        if (c->raw.len < ERROR_BODY_MAX)
            tp_buf_append(&c->raw, data, len < ERROR_BODY_MAX - c->raw.len ? len : ERROR_BODY_MAX - c->raw.len);
        return len;
    }
    if (c->streaming && stmt_stopping(st)) {
        local_abort(c, TP_WH_ERR_CONSUMER, "stopped by the consumer");
        return 0;
    }
    if (c->streaming && st != NULL && st->paused) {
        c->curl_paused = true;
        return CURL_WRITEFUNC_PAUSE;
    }
    c->body_bytes += (int64_t)len;
    if (!c->streaming && c->body_bytes > c->wh->cfg.max_response_bytes) {
        local_abort(c, TP_WH_ERR_PROTOCOL, "%s: response larger than %lld bytes", c->what,
                    (long long)c->wh->cfg.max_response_bytes);
        return 0;
    }
    if (c->sink == SINK_CSV) {
        csv_count(&c->csv, data, len);
        size_t off = 0;
        if (c->skip_bytes > 0) {
            off = (int64_t)len <= c->skip_bytes ? len : (size_t)c->skip_bytes;
            c->skip_bytes -= (int64_t)off;
        }
        if (off < len) {
            tp_wh_csv_t piece = {
                .data = data + off,
                .len = len - off,
                .chunk_index = st->chunk,
                .header_chunk = st->chunk == 0,
                .chunk_start = st->chunk_bytes_done == 0,
            };
            bool ok = st->req.on_csv(st, &piece, st->req.arg);
            st->chunk_bytes_done += (int64_t)(len - off);
            if (!ok) {
                st->consumer_failed = true;
                local_abort(c, TP_WH_ERR_CONSUMER, "stopped by the consumer");
                return 0;
            }
        }
        return len;
    }
    if (!tp_whjson_feed(c->json, data, len)) {
        if (st->consumer_failed || st->phase == P_DONE) {
            local_abort(c, TP_WH_ERR_CONSUMER, "stopped by the consumer");
        } else if (c->kind == K_LINK || c->kind == K_CHUNK) {
            local_abort(c, TP_WH_ERR_PROTOCOL, "chunk %lld of statement %s: malformed JSON %s: %s",
                        (long long)c->chunk, st->id, c->kind == K_LINK ? "in external link file" : "in chunk response",
                        tp_whjson_error(c->json));
        } else {
            local_abort(c, TP_WH_ERR_PROTOCOL, "%s: malformed JSON: %s", c->what,
                        tp_whjson_error(c->json));
        }
        return 0;
    }
    return len;
}

static void on_stall_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    call_t *c = arg;
    if (c->magic != CALL_MAGIC)
        abort();
    int64_t limit = c->wh->cfg.stall_timeout_ms;
    int64_t idle = now_ms() - c->last_byte_ms;
    bool paused = c->st != NULL && c->st->paused;
    if (paused)
        c->last_byte_ms = now_ms();
    if (paused || idle < limit) {
        int64_t wait = paused ? limit : limit - idle;
        struct timeval tv = {.tv_sec = wait / 1000, .tv_usec = (wait % 1000) * 1000};
        evtimer_add(c->stall_timer, &tv);
        return;
    }
    /* no byte for stall_timeout_ms: end the attempt as a timeout (retried for GETs) */
    tp_curlev_remove(c->wh->cv, c->easy);
    local_abort(c, TP_WH_ERR_TIMEOUT, "%s: no data received for %lld ms", c->what, (long long)limit);
    on_call_done(c->easy, CURLE_OPERATION_TIMEDOUT, c);
}

static void token_request_start(tp_wh_t *wh)
{
    if (wh->tok.inflight != NULL)
        return;
    call_t *tc = call_new(wh, NULL, K_TOKEN, true, tp_xasprintf("%s%s", wh->host, TOKEN_PATH),
                          tp_xstrdup("POST " TOKEN_PATH));
    CURL *e = curl_easy_init();
    char *scope = curl_easy_escape(e, wh->scope, 0);
    tc->body = tp_xasprintf("grant_type=client_credentials&scope=%s", scope);
    curl_free(scope);
    curl_easy_cleanup(e);
    wh->tok.inflight = tc;
    call_start(tc);
}

static const char *auth_header_for(call_t *c, bool *must_wait)
{
    tp_wh_t *wh = c->wh;
    *must_wait = false;
    if (c->auth_override != NULL)
        return c->auth_override;
    if (wh->pat_header != NULL)
        return wh->pat_header;
    if (wh->client_id == NULL)
        return NULL;
    int64_t now = now_ms();
    token_cache_t *t = &wh->tok;
    if (t->header != NULL && now < t->hard_ms) {
        if (now >= t->stale_ms && t->inflight == NULL && now >= t->next_try_ms) {
            tp_debug("oauth token due for refresh; refreshing in the background");
            token_request_start(wh);
        }
        c->tok_gen = t->gen;
        return t->header;
    }
    *must_wait = true;
    return NULL;
}

static void call_start(call_t *c)
{
    tp_wh_t *wh = c->wh;
    call_reset_attempt(c);
    const char *auth = NULL;
    if (c->use_auth) {
        bool wait;
        auth = auth_header_for(c, &wait);
        if (wait) {
            c->parked = true;
            c->park_next = wh->tok.waiters;
            wh->tok.waiters = c;
            token_request_start(wh);
            return;
        }
    }
    c->attempts++;
    CURL *e = curl_easy_init();
    if (e == NULL)
        abort();
    c->easy = e;
    curl_easy_setopt(e, CURLOPT_URL, c->url);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, c->errbuf);
    c->errbuf[0] = '\0';
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (wh->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, wh->ca_file);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)wh->cfg.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 131072L);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, c);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(e, CURLOPT_USERAGENT, wh->user_agent);
    bool stream = c->kind == K_CHUNK || c->kind == K_LINK;
    if (!stream) {
        /* the submit may legitimately wait wait_timeout seconds at the server */
        long limit = (long)wh->cfg.request_timeout_ms;
        if (c->kind == K_EXEC && c->st != NULL && c->st->req.wait_timeout_s > 0 &&
            limit < c->st->req.wait_timeout_s * 1000L + 10000L)
            limit = c->st->req.wait_timeout_s * 1000L + 10000L;
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, limit);
    }
    struct curl_slist *h = NULL;
    if (c->kind == K_LINK) {
        for (struct curl_slist *x = c->xhdrs; x; x = x->next)
            h = curl_slist_append(h, x->data);
    } else {
        h = curl_slist_append(h, "Accept: application/json");
        if (auth != NULL)
            h = curl_slist_append(h, auth);
        if (wh->workspace_hdr && c->kind != K_TOKEN)
            h = curl_slist_append(h, wh->workspace_hdr);
    }
    if (c->post) {
        h = curl_slist_append(h, "Expect:");
        if (c->kind == K_TOKEN) {
            h = curl_slist_append(h, "Content-Type: application/x-www-form-urlencoded");
            curl_easy_setopt(e, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
            curl_easy_setopt(e, CURLOPT_USERNAME, wh->client_id);
            curl_easy_setopt(e, CURLOPT_PASSWORD, wh->client_secret);
        } else {
            h = curl_slist_append(h, "Content-Type: application/json");
        }
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->body ? c->body : "{}");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(c->body ? c->body : "{}"));
    } else {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    }
    c->hdrs = h;
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
    if (c->kind == K_CHUNK || c->kind == K_LINK) {
        c->streaming = c->st != NULL && c->st->manifest_seen && !c->st->refreshing;
        if (c->st != NULL && c->st->man.format == TP_WH_CSV)
            c->skip_bytes = c->st->chunk_bytes_done;
        c->last_byte_ms = now_ms();
        if (c->stall_timer == NULL)
            c->stall_timer = evtimer_new(wh->base, on_stall_timer, c);
        int64_t lim = wh->cfg.stall_timeout_ms;
        struct timeval tv = {.tv_sec = lim / 1000, .tv_usec = (lim % 1000) * 1000};
        evtimer_add(c->stall_timer, &tv);
    }
    if (!tp_curlev_add(wh->cv, e, on_call_done, c)) {
        local_abort(c, TP_WH_ERR_TRANSPORT, "%s: curl refused the transfer", c->what);
        /* report from the loop, never from inside the caller */
        on_call_done(e, CURLE_FAILED_INIT, c);
    }
}

static void on_retry_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    call_t *c = arg;
    if (c->magic != CALL_MAGIC)
        abort();
    call_start(c);
}

/* May this failed attempt be tried again? Sets *delay. */
static bool retryable(call_t *c, CURLcode rc, int64_t *delay)
{
    long http = c->http;
    bool idempotent = !c->post || c->kind == K_CANCEL || c->kind == K_TOKEN || c->kind == K_API;
    bool ok = false;
    *delay = -1;
    if (c->local_abort && c->local_kind != TP_WH_ERR_TIMEOUT)
        return false;
    if (rc != CURLE_OK) {
        switch (rc) {
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
        case CURLE_COULDNT_CONNECT:
            ok = true; /* nothing was sent */
            break;
        case CURLE_FAILED_INIT:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
            ok = false;
            break;
        default:
            ok = idempotent; /* the request may have been received */
            break;
        }
    } else if (http == 429 || http == 503) {
        ok = true; /* not accepted: safe even for POST /statements */
        *delay = c->retry_after_ms >= 0 ? c->retry_after_ms : 1000;
    } else if (http == 500 || http == 502 || http == 504) {
        ok = idempotent;
    }
    if (!ok)
        return false;
    if (*delay < 0) {
        int64_t base = 250;
        for (int i = 1; i < c->attempts && base < c->wh->cfg.retry_max_ms; i++)
            base *= 2;
        if (base > c->wh->cfg.retry_max_ms)
            base = c->wh->cfg.retry_max_ms;
        *delay = tp_jitter_ms(base, 0.2);
    }
    return now_ms() + *delay - c->started_ms <= c->wh->cfg.retry_budget_ms;
}

static void describe_failure(call_t *c, CURLcode rc, char *out, size_t outlen, char **code)
{
    *code = NULL;
    if (c->local_abort) {
        snprintf(out, outlen, "%s", c->local_msg);
        return;
    }
    if (rc != CURLE_OK) {
        /* never curl's error buffer for links: it may name the signed URL */
        if (c->kind != K_LINK && c->errbuf[0])
            snprintf(out, outlen, "%s: %s (curl error %d)", c->what, c->errbuf, (int)rc);
        else
            snprintf(out, outlen, "%s: %s (curl error %d)", c->what, curl_easy_strerror(rc), (int)rc);
        return;
    }
    char *msg = NULL;
    tp_wh_error_body(c->raw.data ? c->raw.data : "", c->raw.len, code, &msg);
    if (*code)
        snprintf(out, outlen, "%s: HTTP %ld: %s: %s", c->what, c->http, *code, msg);
    else
        snprintf(out, outlen, "%s: HTTP %ld: %s", c->what, c->http, msg);
    free(msg);
}

static void on_call_done(CURL *easy, CURLcode rc, void *arg)
{
    (void)easy;
    call_t *c = arg;
    if (c->magic != CALL_MAGIC)
        abort();
    if (c->stall_timer)
        evtimer_del(c->stall_timer);
    if (c->easy != NULL && !c->sink_chosen)
        curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &c->http);
    tp_wh_stmt_t *st = c->st;
    bool stopping = st != NULL && stmt_stopping(st);
    int64_t delay;
    bool ok_http = rc == CURLE_OK && c->http >= 200 && c->http < 300 && !c->local_abort;
    /* OAuth: a 401, or the 403 "Invalid access token." the service answers, may
     * mean our cached token died early (revoked, clock skew): refresh once, retry */
    if (!ok_http && !stopping && rc == CURLE_OK && (c->http == 401 || c->http == 403) && c->use_auth &&
        c->wh->client_id != NULL && c->wh->pat_header == NULL && c->auth_override == NULL &&
        !c->auth_retried) {
        c->auth_retried = true;
        if (c->wh->tok.gen == c->tok_gen) {
            c->wh->tok.hard_ms = 0;
            c->wh->tok.stale_ms = 0;
        }
        st_log(st, TP_LOG_WARN, c->chunk, "%s: HTTP %ld with a cached OAuth token; refreshing it", c->what, c->http);
        call_start(c);
        return;
    }
    if (!ok_http && !stopping && retryable(c, rc, &delay)) {
        char msg[MSG_MAX];
        char *code;
        describe_failure(c, rc, msg, sizeof(msg), &code);
        free(code);
        st_log(st, TP_LOG_WARN, c->chunk, "retrying in %lld ms (attempt %d): %s", (long long)delay,
               c->attempts + 1, msg);
        /* rows already handed over stay counted in chunk_rows_done and are skipped
         * on the next attempt; rows parsed but not delivered are parsed again */
        call_reset_attempt(c);
        if (c->retry_timer == NULL)
            c->retry_timer = evtimer_new(c->wh->base, on_retry_timer, c);
        struct timeval tv = {.tv_sec = delay / 1000, .tv_usec = (delay % 1000) * 1000};
        evtimer_add(c->retry_timer, &tv);
        return;
    }
    if (c->kind == K_TOKEN)
        token_call_result(c, rc);
    else if (c->kind == K_API)
        api_call_result(c, rc);
    else if (st == NULL) {
        /* detached cancel */
        if (!ok_http) {
            char msg[MSG_MAX];
            char *code;
            describe_failure(c, rc, msg, sizeof(msg), &code);
            free(code);
            tp_warn("cancel failed: %s", msg);
        }
        call_free(c);
    } else {
        stmt_call_result(c, rc);
    }
}

/* A parked call whose token will not come: fail it as if it had been tried. */
static void call_fail_parked(call_t *c, tp_wh_errkind_t kind, const char *msg)
{
    c->parked = false;
    c->park_next = NULL;
    local_abort(c, kind, "%s", msg);
    c->http = 0;
    if (c->kind == K_API) {
        api_call_result(c, CURLE_OK);
        return;
    }
    if (c->st == NULL) {
        tp_warn("%s", msg);
        call_free(c);
        return;
    }
    stmt_call_result(c, CURLE_OK);
}

/* ------------------------------------------------------------------ */
/* OAuth M2M token                                                      */

static void token_call_result(call_t *c, CURLcode rc)
{
    tp_wh_t *wh = c->wh;
    token_cache_t *t = &wh->tok;
    char err[MSG_MAX + 128] = "";
    bool ok = rc == CURLE_OK && c->http == 200 && !c->local_abort;
    if (ok) {
        json_error_t je;
        json_t *j = json_loadb(c->raw.data ? c->raw.data : "", c->raw.len, 0, &je);
        json_t *at = json_object_get(j, "access_token");
        json_t *tt = json_object_get(j, "token_type");
        json_t *ei = json_object_get(j, "expires_in");
        if (!json_is_object(j))
            snprintf(err, sizeof(err), "OAuth token endpoint: answer is not a JSON object (%s)", je.text);
        else if (!json_is_string(at) || json_string_length(at) == 0)
            snprintf(err, sizeof(err), "OAuth token endpoint: answer has no access_token");
        else if (ei != NULL && !json_is_number(ei))
            snprintf(err, sizeof(err), "OAuth token endpoint: expires_in is not a number");
        else {
            int64_t ttl = ei ? (int64_t)(json_number_value(ei) * 1000) : 3600000;
            if (ttl <= 0)
                ttl = 1000;
            int64_t lead = ttl / 2 < 1200000 ? ttl / 2 : 1200000;
            int64_t margin = ttl / 10 < 40000 ? ttl / 10 : 40000;
            int64_t now = now_ms();
            free(t->header);
            t->header = tp_xasprintf("Authorization: %s %s",
                                     json_is_string(tt) && json_string_length(tt) ? json_string_value(tt) : "Bearer",
                                     json_string_value(at));
            t->stale_ms = now + ttl - lead;
            t->hard_ms = now + ttl - margin;
            t->gen++;
            t->next_try_ms = 0;
            tp_info("oauth token obtained, expires_in=%lld s, refresh in %lld s", (long long)(ttl / 1000),
                    (long long)((ttl - lead) / 1000));
        }
        json_decref(j);
        ok = err[0] == '\0';
    } else {
        char *code = NULL;
        char m[MSG_MAX];
        describe_failure(c, rc, m, sizeof(m), &code);
        free(code);
        snprintf(err, sizeof(err), "OAuth M2M token request failed: %s", m);
    }
    t->inflight = NULL;
    call_free(c);
    if (!ok) {
        tp_error("%s", err);
        int64_t now = now_ms();
        t->next_try_ms = now + 5000;
    }
    /* wake (or fail) every parked call; a call may re-park if the token is unusable */
    call_t *w = t->waiters;
    t->waiters = NULL;
    while (w != NULL) {
        call_t *nx = w->park_next;
        w->parked = false;
        w->park_next = NULL;
        bool usable = t->header != NULL && now_ms() < t->hard_ms;
        if (usable)
            call_start(w);
        else
            call_fail_parked(w, TP_WH_ERR_AUTH, ok ? "OAuth token expired on arrival" : err);
        w = nx;
    }
}

/* ------------------------------------------------------------------ */
/* other workspace API calls (tp_wh_api_post)                           */

static void api_call_result(call_t *c, CURLcode rc)
{
    bool ok = rc == CURLE_OK && c->http >= 200 && c->http < 300 && !c->local_abort;
    char msg[MSG_MAX] = "";
    tp_wh_errkind_t kind = TP_WH_ERR_NONE;
    if (!ok) {
        char *code = NULL;
        describe_failure(c, rc, msg, sizeof(msg), &code);
        free(code);
        kind = c->local_abort               ? c->local_kind
               : rc != CURLE_OK             ? TP_WH_ERR_TRANSPORT
               : c->http == 401 || c->http == 403 ? TP_WH_ERR_AUTH
                                            : TP_WH_ERR_HTTP;
    }
    tp_wh_api_cb cb = c->api_cb;
    void *arg = c->api_arg;
    tp_buf_t body = c->raw; /* handed to the callback, then freed here */
    c->raw = (tp_buf_t){0};
    int http = (int)c->http;
    call_free(c);
    cb(http, ok ? body.data : NULL, ok ? body.len : 0, ok ? NULL : msg, kind, arg);
    tp_buf_free(&body);
}

tp_wh_api_t *tp_wh_api_post(tp_wh_t *wh, const char *path, const char *json_body, tp_wh_api_cb cb,
                            void *arg)
{
    if (wh == NULL || wh->magic != WH_MAGIC)
        abort();
    call_t *c = call_new(wh, NULL, K_API, true, tp_xasprintf("%s%s", wh->host, path),
                         tp_xasprintf("POST %s", path));
    c->body = tp_xstrdup(json_body ? json_body : "{}");
    c->api_cb = cb;
    c->api_arg = arg;
    /* start from the loop: the callback is never called from inside this function */
    c->retry_timer = evtimer_new(wh->base, on_retry_timer, c);
    struct timeval tv = {0, 0};
    evtimer_add(c->retry_timer, &tv);
    return (tp_wh_api_t *)c;
}

void tp_wh_api_cancel(tp_wh_api_t *call)
{
    call_t *c = (call_t *)call;
    if (c == NULL)
        return;
    if (c->magic != CALL_MAGIC || c->kind != K_API)
        abort();
    call_free(c);
}

bool tp_wh_has_auth(const tp_wh_t *wh)
{
    return wh->pat_header != NULL || wh->client_id != NULL;
}

/* ------------------------------------------------------------------ */
/* client                                                               */

tp_wh_t *tp_wh_new(struct event_base *base, const tp_wh_config_t *cfg, char **err)
{
    *err = NULL;
    char *host = tp_wh_normalize_host(cfg->host, err);
    if (host == NULL)
        return NULL;
    if (cfg->warehouse_id == NULL || cfg->warehouse_id[0] == '\0') {
        free(host);
        *err = tp_xstrdup("warehouse id is not set (DATABRICKS_WAREHOUSE_ID)");
        return NULL;
    }
    bool has_token = cfg->token && cfg->token[0];
    bool has_id = cfg->client_id && cfg->client_id[0];
    bool has_secret = cfg->client_secret && cfg->client_secret[0];
    if (!has_token && has_id != has_secret) {
        free(host);
        *err = tp_xstrdup(has_id ? "OAuth client id given without a client secret (DATABRICKS_CLIENT_SECRET)"
                                 : "OAuth client secret given without a client id (DATABRICKS_CLIENT_ID)");
        return NULL;
    }
    if ((has_token && strpbrk(cfg->token, "\r\n")) || (has_id && strpbrk(cfg->client_id, "\r\n:"))) {
        free(host);
        *err = tp_xstrdup("token or client id contains a forbidden character");
        return NULL;
    }
    if (!tp_curlev_async_dns())
        tp_warn("libcurl was built without asynchronous DNS (CURL_VERSION_ASYNCHDNS): "
                "name lookups may block the event loop");
    tp_wh_t *wh = tp_xcalloc(1, sizeof(*wh));
    wh->magic = WH_MAGIC;
    wh->base = base;
    wh->cfg = *cfg;
    tp_wh_config_t d;
    tp_wh_config_init(&d);
#define DEF(f)                                                                                     \
    if (wh->cfg.f <= 0)                                                                            \
    wh->cfg.f = d.f
    DEF(connect_timeout_ms);
    DEF(request_timeout_ms);
    DEF(stall_timeout_ms);
    DEF(poll_initial_ms);
    DEF(poll_max_ms);
    DEF(retry_max_ms);
    DEF(unknown_state_ms);
    DEF(max_response_bytes);
    DEF(rows_per_batch);
    DEF(max_connections);
#undef DEF
    if (wh->cfg.retry_budget_ms < 0)
        wh->cfg.retry_budget_ms = 0;
    wh->cfg.host = wh->cfg.warehouse_id = wh->cfg.token = NULL;
    wh->cfg.client_id = wh->cfg.client_secret = wh->cfg.oauth_scope = NULL;
    wh->cfg.workspace_id = wh->cfg.ca_file = NULL;
    wh->host = host;
    wh->warehouse_id = tp_xstrdup(cfg->warehouse_id);
    if (has_token)
        wh->pat_header = tp_xasprintf("Authorization: Bearer %s", cfg->token);
    else if (has_id) {
        wh->client_id = tp_xstrdup(cfg->client_id);
        wh->client_secret = tp_xstrdup(cfg->client_secret);
    }
    wh->scope = tp_xstrdup(cfg->oauth_scope && cfg->oauth_scope[0] ? cfg->oauth_scope : "all-apis");
    if (cfg->workspace_id && cfg->workspace_id[0])
        wh->workspace_hdr = tp_xasprintf("X-Databricks-Workspace-Id: %s", cfg->workspace_id);
    wh->ca_file = dup_or_null(cfg->ca_file);
    wh->user_agent = tp_xstrdup("tidepool/" TP_VERSION);
    wh->cv = tp_curlev_new(base);
    tp_curlev_set_max_host_connections(wh->cv, (long)wh->cfg.max_connections);
    return wh;
}

static void stmt_free(tp_wh_stmt_t *st);

void tp_wh_free(tp_wh_t *wh)
{
    if (wh == NULL)
        return;
    if (wh->magic != WH_MAGIC)
        abort();
    while (wh->stmts != NULL)
        stmt_free(wh->stmts);
    while (wh->calls != NULL)
        call_free(wh->calls);
    tp_curlev_free(wh->cv);
    free(wh->tok.header);
    free(wh->host);
    free(wh->warehouse_id);
    free(wh->pat_header);
    free(wh->client_id);
    free(wh->client_secret);
    free(wh->scope);
    free(wh->workspace_hdr);
    free(wh->ca_file);
    free(wh->user_agent);
    wh->magic = 0;
    free(wh);
}

const char *tp_wh_host(const tp_wh_t *wh)
{
    return wh->host;
}

size_t tp_wh_inflight(const tp_wh_t *wh)
{
    return wh->inflight;
}

/* ------------------------------------------------------------------ */
/* statements                                                           */

void tp_wh_request_init(tp_wh_request_t *r)
{
    memset(r, 0, sizeof(*r));
    r->disposition = TP_WH_INLINE;
    r->format = TP_WH_JSON_ARRAY;
    r->wait_timeout_s = 10;
    r->on_wait_timeout = TP_WH_ON_WAIT_CONTINUE;
}

const char *tp_wh_stmt_id(const tp_wh_stmt_t *st)
{
    return st->id;
}

static void link_clear(link_t *l)
{
    free(l->url);
    curl_slist_free_all(l->headers);
    free(l->next_link);
    memset(l, 0, sizeof(*l));
}

static void stmt_free(tp_wh_stmt_t *st)
{
    if (st->magic != STMT_MAGIC)
        abort();
    tp_wh_t *wh = st->wh;
    call_free(st->call);
    st->call = NULL;
    /* detached calls of this statement (none besides st->call) */
    for (call_t *c = wh->calls; c; c = c->next)
        if (c->st == st)
            c->st = NULL;
    if (st->timer)
        event_free(st->timer);
    if (st->deadline)
        event_free(st->deadline);
    if (st->defer)
        event_free(st->defer);
    tp_whjson_free(st->held);
    json_decref(st->manifest_json);
    free(st->cols);
    free(st->label);
    free(st->bearer_header);
    free(st->body);
    free(st->id);
    free(st->unknown_state);
    free(st->next_link);
    link_clear(&st->link);
    tp_wh_result_clear(&st->res);
    if (st->prev)
        st->prev->next = st->next;
    else
        wh->stmts = st->next;
    if (st->next)
        st->next->prev = st->prev;
    wh->inflight--;
    st->magic = 0;
    free(st);
}

static void finish(tp_wh_stmt_t *st, tp_wh_status_t status, tp_wh_errkind_t kind, int http,
                   int64_t chunk, const char *code, const char *fmt, ...)
{
    if (st->phase == P_DONE)
        return;
    bool need_cancel = st->id != NULL && !st->server_terminal;
    st->phase = P_DONE;
    st->res.status = status;
    st->res.kind = status == TP_WH_ERROR ? kind : TP_WH_ERR_NONE;
    st->res.http_status = http;
    st->res.chunk_index = chunk;
    free(st->res.statement_id);
    st->res.statement_id = dup_or_null(st->id);
    if (code != NULL && st->res.error_code == NULL)
        st->res.error_code = tp_xstrdup(code);
    if (fmt != NULL) {
        char msg[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        free(st->res.message);
        st->res.message = tp_xstrdup(msg);
    }
    call_free(st->call);
    st->call = NULL;
    if (st->timer)
        evtimer_del(st->timer);
    if (st->deadline)
        evtimer_del(st->deadline);
    if (need_cancel && status == TP_WH_ERROR)
        send_cancel(st->wh, st->id, st->bearer_header);
    st_log(st, status == TP_WH_SUCCEEDED ? TP_LOG_DEBUG : status == TP_WH_ERROR ? TP_LOG_ERROR : TP_LOG_INFO,
           chunk, "statement %s%s%s (rows=%lld chunks=%lld)", tp_wh_status_name(status),
           st->res.message ? ": " : "", st->res.message ? st->res.message : "", (long long)st->res.rows,
           (long long)st->res.chunks);
    schedule_defer(st);
}

/* Fire-and-forget POST .../cancel, owned by the client (outlives the statement). */
static void send_cancel(tp_wh_t *wh, const char *id, const char *bearer)
{
    call_t *c = call_new(wh, NULL, K_CANCEL, true,
                         tp_xasprintf("%s" STATEMENTS_PATH "/%s/cancel", wh->host, id),
                         tp_xasprintf("POST cancel %s", id));
    c->body = tp_xstrdup("{}");
    if (bearer != NULL)
        c->auth_override = tp_xstrdup(bearer);
    call_start(c);
}

static void on_defer(evutil_socket_t fd, short what, void *arg);

static void schedule_defer(tp_wh_stmt_t *st)
{
    event_active(st->defer, EV_TIMEOUT, 0);
}

static call_t *new_stmt_call(tp_wh_stmt_t *st, call_kind_t kind, bool post, char *url, char *what)
{
    call_free(st->call);
    st->call = call_new(st->wh, st, kind, post, url, what);
    return st->call;
}

static void start_status_poll(tp_wh_stmt_t *st)
{
    call_start(new_stmt_call(st, K_STATUS, false,
                             tp_xasprintf("%s" STATEMENTS_PATH "/%s", st->wh->host, st->id),
                             tp_xasprintf("GET status %s", st->id)));
}

static void on_poll_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_wh_stmt_t *st = arg;
    if (st->magic != STMT_MAGIC)
        abort();
    if (st->phase == P_POLL)
        start_status_poll(st);
}

static void schedule_poll(tp_wh_stmt_t *st)
{
    int64_t d = st->poll_delay_ms;
    if (st->cancel_sent && d > st->wh->cfg.poll_initial_ms * 4)
        d = st->wh->cfg.poll_initial_ms * 4;
    d = tp_jitter_ms(d, 0.2);
    struct timeval tv = {.tv_sec = d / 1000, .tv_usec = (d % 1000) * 1000};
    evtimer_add(st->timer, &tv);
    int64_t next = st->poll_delay_ms * 3 / 2;
    st->poll_delay_ms = next > st->wh->cfg.poll_max_ms ? st->wh->cfg.poll_max_ms : next;
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_wh_stmt_t *st = arg;
    if (st->magic != STMT_MAGIC)
        abort();
    finish(st, TP_WH_ERROR, TP_WH_ERR_TIMEOUT, 0, st->phase == P_STREAM ? st->chunk : -1, NULL,
           "statement %s did not finish within %lld ms%s", st->id ? st->id : "(not yet accepted)",
           (long long)st->req.timeout_ms,
           st->id && !st->server_terminal ? "; cancel sent" : "");
}

tp_wh_stmt_t *tp_wh_submit(tp_wh_t *wh, const tp_wh_request_t *req, char **err)
{
    *err = NULL;
    if (req->sql == NULL || req->sql[0] == '\0')
        *err = tp_xstrdup("statement has no SQL text");
    else if (req->on_done == NULL)
        *err = tp_xstrdup("statement has no on_done callback");
    else if (req->format == TP_WH_JSON_ARRAY && req->on_rows == NULL)
        *err = tp_xstrdup("JSON_ARRAY statement has no on_rows callback");
    else if (req->format == TP_WH_CSV && req->on_csv == NULL)
        *err = tp_xstrdup("CSV statement has no on_csv callback");
    else if (req->format != TP_WH_JSON_ARRAY && req->format != TP_WH_CSV)
        *err = tp_xstrdup("unsupported format (JSON_ARRAY or CSV)");
    else if (req->disposition != TP_WH_INLINE && req->disposition != TP_WH_EXTERNAL_LINKS)
        *err = tp_xstrdup("unsupported disposition (INLINE or EXTERNAL_LINKS)");
    else if (req->wait_timeout_s != TP_WH_WAIT_OMIT &&
             (req->wait_timeout_s < 0 || (req->wait_timeout_s > 0 && req->wait_timeout_s < 5) ||
              req->wait_timeout_s > 50))
        *err = tp_xasprintf("wait_timeout must be 0 or 5..50 seconds, not %d", req->wait_timeout_s);
    else if (req->bearer_token == NULL && wh->pat_header == NULL && wh->client_id == NULL)
        *err = tp_xstrdup("no warehouse credentials: set DATABRICKS_TOKEN, or DATABRICKS_CLIENT_ID and "
                          "DATABRICKS_CLIENT_SECRET, or pass a bearer token");
    else if (req->bearer_token != NULL && (req->bearer_token[0] == '\0' || strpbrk(req->bearer_token, "\r\n")))
        *err = tp_xstrdup("bearer token is empty or contains a line break");
    for (size_t i = 0; *err == NULL && i < req->n_params; i++)
        if (req->params[i].name == NULL || req->params[i].name[0] == '\0')
            *err = tp_xasprintf("parameter %zu has no name", i + 1);
    if (*err != NULL)
        return NULL;

    tp_buf_t b;
    tp_buf_init(&b);
    tp_buf_puts(&b, "{\"warehouse_id\":");
    tp_buf_json_str(&b, wh->warehouse_id);
    tp_buf_puts(&b, ",\"statement\":");
    tp_buf_json_str(&b, req->sql);
    if (req->n_params > 0) {
        tp_buf_puts(&b, ",\"parameters\":[");
        for (size_t i = 0; i < req->n_params; i++) {
            const tp_wh_param_t *p = &req->params[i];
            tp_buf_puts(&b, i ? ",{\"name\":" : "{\"name\":");
            tp_buf_json_str(&b, p->name);
            tp_buf_puts(&b, ",\"value\":");
            if (p->value)
                tp_buf_json_str(&b, p->value);
            else
                tp_buf_puts(&b, "null");
            if (p->type) {
                tp_buf_puts(&b, ",\"type\":");
                tp_buf_json_str(&b, p->type);
            }
            tp_buf_putc(&b, '}');
        }
        tp_buf_putc(&b, ']');
    }
    if (req->catalog) {
        tp_buf_puts(&b, ",\"catalog\":");
        tp_buf_json_str(&b, req->catalog);
    }
    if (req->schema) {
        tp_buf_puts(&b, ",\"schema\":");
        tp_buf_json_str(&b, req->schema);
    }
    if (req->row_limit > 0)
        tp_buf_printf(&b, ",\"row_limit\":%lld", (long long)req->row_limit);
    if (req->byte_limit > 0)
        tp_buf_printf(&b, ",\"byte_limit\":%lld", (long long)req->byte_limit);
    tp_buf_printf(&b, ",\"disposition\":\"%s\",\"format\":\"%s\"",
                  req->disposition == TP_WH_INLINE ? "INLINE" : "EXTERNAL_LINKS",
                  req->format == TP_WH_JSON_ARRAY ? "JSON_ARRAY" : "CSV");
    if (req->wait_timeout_s != TP_WH_WAIT_OMIT) {
        tp_buf_printf(&b, ",\"wait_timeout\":\"%ds\"", req->wait_timeout_s);
        if (req->wait_timeout_s > 0)
            tp_buf_printf(&b, ",\"on_wait_timeout\":\"%s\"",
                          req->on_wait_timeout == TP_WH_ON_WAIT_CANCEL ? "CANCEL" : "CONTINUE");
    }
    tp_buf_putc(&b, '}');

    tp_wh_stmt_t *st = tp_xcalloc(1, sizeof(*st));
    st->magic = STMT_MAGIC;
    st->wh = wh;
    st->req = *req;
    st->req.sql = NULL;
    st->req.params = NULL;
    st->req.catalog = st->req.schema = st->req.bearer_token = st->req.label = NULL;
    if (st->req.timeout_ms <= 0)
        st->req.timeout_ms = wh->cfg.statement_timeout_ms;
    st->label = dup_or_null(req->label);
    if (req->bearer_token)
        st->bearer_header = tp_xasprintf("Authorization: Bearer %s", req->bearer_token);
    st->body = tp_buf_steal(&b);
    st->phase = P_SUBMIT;
    st->poll_delay_ms = wh->cfg.poll_initial_ms;
    st->res.chunk_index = -1;
    st->timer = evtimer_new(wh->base, on_poll_timer, st);
    st->deadline = evtimer_new(wh->base, on_deadline, st);
    st->defer = event_new(wh->base, -1, 0, on_defer, st);
    st->next = wh->stmts;
    if (wh->stmts)
        wh->stmts->prev = st;
    wh->stmts = st;
    wh->inflight++;
    if (st->req.timeout_ms > 0) {
        int64_t t = st->req.timeout_ms;
        struct timeval tv = {.tv_sec = t / 1000, .tv_usec = (t % 1000) * 1000};
        evtimer_add(st->deadline, &tv);
    }
    st_log(st, TP_LOG_DEBUG, -1, "submitting statement (%zu parameters, %s, %s)", req->n_params,
           req->disposition == TP_WH_INLINE ? "INLINE" : "EXTERNAL_LINKS",
           req->format == TP_WH_JSON_ARRAY ? "JSON_ARRAY" : "CSV");
    call_t *c = call_new(wh, st, K_EXEC, true, tp_xasprintf("%s" STATEMENTS_PATH, wh->host),
                         tp_xstrdup("POST " STATEMENTS_PATH));
    c->body = tp_xstrdup(st->body);
    st->call = c;
    /* start from the loop so that no callback can run inside tp_wh_submit */
    schedule_defer(st);
    return st;
}

void tp_wh_cancel(tp_wh_stmt_t *st)
{
    if (st == NULL || st->magic != STMT_MAGIC || st->phase == P_DONE || st->cancel_requested)
        return;
    st->cancel_requested = true;
    schedule_defer(st);
}

void tp_wh_pause(tp_wh_stmt_t *st)
{
    if (st == NULL || st->magic != STMT_MAGIC)
        return;
    st->paused = true;
}

void tp_wh_resume(tp_wh_stmt_t *st)
{
    if (st == NULL || st->magic != STMT_MAGIC || !st->paused)
        return;
    st->paused = false;
    if (st->phase != P_DONE)
        schedule_defer(st);
}

static void handle_cancel_request(tp_wh_stmt_t *st)
{
    st->cancel_handled = true;
    if (st->phase == P_STREAM) {
        finish(st, TP_WH_CANCELED, TP_WH_ERR_NONE, 0, st->chunk, NULL,
               "statement %s cancelled by the client while streaming chunk %lld", st->id,
               (long long)st->chunk);
        return;
    }
    if (st->id == NULL) {
        bool in_flight = st->call != NULL && st->call->easy != NULL;
        if (!in_flight) {
            finish(st, TP_WH_CANCELED, TP_WH_ERR_NONE, 0, -1, NULL,
                   "statement cancelled by the client before it was sent");
            return;
        }
        return; /* the POST is out: cancel once it answers with an id */
    }
    if (!st->cancel_sent && !st->server_terminal) {
        st->cancel_sent = true;
        st_log(st, TP_LOG_INFO, -1, "sending cancel");
        send_cancel(st->wh, st->id, st->bearer_header);
        /* poll again soon to learn the outcome */
        if (st->phase == P_POLL && st->call == NULL) {
            evtimer_del(st->timer);
            st->poll_delay_ms = st->wh->cfg.poll_initial_ms;
            schedule_poll(st);
        }
    }
}

static void on_defer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    tp_wh_stmt_t *st = arg;
    if (st->magic != STMT_MAGIC)
        abort();
    if (st->phase == P_DONE) {
        tp_wh_result_t res = st->res;
        st->req.on_done(st, &res, st->req.arg);
        stmt_free(st);
        return;
    }
    if (st->phase == P_SUBMIT && st->call != NULL && st->call->easy == NULL && !st->call->parked &&
        st->call->attempts == 0 && !st->cancel_requested) {
        call_start(st->call);
        return;
    }
    if (st->cancel_requested && !st->cancel_handled) {
        handle_cancel_request(st);
        if (st->phase == P_DONE)
            return;
    }
    if (st->consumer_failed && st->phase != P_DONE) {
        finish(st, TP_WH_ERROR, TP_WH_ERR_CONSUMER, 0, st->chunk, NULL,
               "statement %s: the consumer stopped the stream at chunk %lld", st->id, (long long)st->chunk);
        return;
    }
    if (st->paused || st->phase != P_STREAM)
        return;
    /* resume: deliver what was parsed while paused, then let curl go on */
    call_t *c = st->call;
    if (st->held != NULL) {
        if (!flush_held(st))
            return;
        return;
    }
    if (c != NULL && c->json != NULL && c->streaming) {
        deliver_rows(st, c->json, false);
        if (st->consumer_failed) {
            schedule_defer(st);
            return;
        }
    }
    if (c != NULL && c->curl_paused && !st->paused) {
        c->curl_paused = false;
        curl_easy_pause(c->easy, CURLPAUSE_CONT);
    }
}

/* ------------------------------------------------------------------ */
/* statement responses                                                  */

static const char *jstr(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static bool jint(json_t *o, const char *k, int64_t *out)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v))
        return false;
    *out = (int64_t)json_integer_value(v);
    return true;
}

static bool parse_format(const char *s, tp_wh_format_t *f)
{
    if (s && strcmp(s, "JSON_ARRAY") == 0)
        *f = TP_WH_JSON_ARRAY;
    else if (s && strcmp(s, "CSV") == 0)
        *f = TP_WH_CSV;
    else
        return false;
    return true;
}

/* Reads manifest into st; false with *why on a missing or wrong field. */
static bool take_manifest(tp_wh_stmt_t *st, json_t *m, char *why, size_t whylen)
{
    if (!json_is_object(m)) {
        snprintf(why, whylen, "SUCCEEDED answer has no manifest object");
        return false;
    }
    tp_wh_format_t f;
    const char *fs = jstr(m, "format");
    if (fs == NULL)
        f = st->req.format;
    else if (!parse_format(fs, &f)) {
        snprintf(why, whylen, "manifest.format \"%.40s\" is not JSON_ARRAY or CSV", fs);
        return false;
    }
    if (f != st->req.format) {
        snprintf(why, whylen, "manifest.format %s differs from the requested format", fs);
        return false;
    }
    json_t *schema = json_object_get(m, "schema");
    if (!json_is_object(schema)) {
        snprintf(why, whylen, "manifest has no schema object");
        return false;
    }
    int64_t ncount = -1;
    json_t *cc = json_object_get(schema, "column_count");
    if (cc != NULL && !jint(schema, "column_count", &ncount)) {
        snprintf(why, whylen, "manifest.schema.column_count is not an integer");
        return false;
    }
    json_t *cols = json_object_get(schema, "columns");
    size_t n = 0;
    if (cols != NULL && !json_is_array(cols)) {
        snprintf(why, whylen, "manifest.schema.columns is not an array");
        return false;
    }
    n = cols ? json_array_size(cols) : 0;
    if (ncount >= 0 && (size_t)ncount != n) {
        snprintf(why, whylen, "manifest.schema.column_count is %lld but %zu columns are listed",
                 (long long)ncount, n);
        return false;
    }
    st->cols = tp_xcalloc(n ? n : 1, sizeof(tp_wh_column_t));
    for (size_t i = 0; i < n; i++) {
        json_t *c = json_array_get(cols, i);
        tp_wh_column_t *col = &st->cols[i];
        const char *name = jstr(c, "name");
        const char *tn = jstr(c, "type_name");
        if (!json_is_object(c) || name == NULL || tn == NULL) {
            snprintf(why, whylen, "manifest column %zu lacks %s", i,
                     !json_is_object(c) ? "an object" : name == NULL ? "a name" : "a type_name");
            return false;
        }
        col->name = name;
        col->type_name = tn;
        col->type_text = jstr(c, "type_text") ? jstr(c, "type_text") : "";
        col->interval_type = jstr(c, "type_interval_type");
        int64_t v;
        col->position = jint(c, "position", &v) ? (int)v : (int)i;
        col->precision = jint(c, "type_precision", &v) ? (int)v : -1;
        col->scale = jint(c, "type_scale", &v) ? (int)v : -1;
    }
    st->man.columns = st->cols;
    st->man.n_columns = n;
    st->man.format = f;
    int64_t v;
    st->man.total_chunk_count = jint(m, "total_chunk_count", &v) ? v : -1;
    st->man.total_row_count = jint(m, "total_row_count", &v) ? v : -1;
    st->man.total_byte_count = jint(m, "total_byte_count", &v) ? v : -1;
    json_t *tr = json_object_get(m, "truncated");
    st->man.truncated = json_is_true(tr);
    st->res.truncated = st->man.truncated;
    json_incref(m);
    st->manifest_json = m;
    st->manifest_seen = true;
    return true;
}

/* Row count the manifest lists for chunk idx, -1 if none. */
static int64_t manifest_chunk_rows(tp_wh_stmt_t *st, int64_t idx)
{
    json_t *chunks = json_object_get(st->manifest_json, "chunks");
    size_t i;
    json_t *c;
    json_array_foreach(chunks, i, c)
    {
        int64_t ci, rc;
        if (jint(c, "chunk_index", &ci) && ci == idx && jint(c, "row_count", &rc))
            return rc;
    }
    return -1;
}

static void protocol_error(tp_wh_stmt_t *st, int64_t chunk, const char *what)
{
    if (chunk >= 0)
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, 200, chunk, NULL, "chunk %lld of statement %s: %s",
               (long long)chunk, st->id ? st->id : "?", what);
    else
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, 200, -1, NULL, "statement %s: %s",
               st->id ? st->id : "?", what);
}

static void set_next(tp_wh_stmt_t *st, json_t *from)
{
    int64_t ni;
    free(st->next_link);
    st->next_link = NULL;
    st->next_index = -1;
    if (jint(from, "next_chunk_index", &ni))
        st->next_index = ni;
    const char *nl = jstr(from, "next_chunk_internal_link");
    if (nl != NULL)
        st->next_link = tp_xstrdup(nl);
}

static void start_link_download(tp_wh_stmt_t *st);

/* Takes a ResultData object (the first chunk in a statement answer, or a
 * chunk answer) whose rows (if INLINE) are in parser j (ownership taken). */
static void take_result_data(tp_wh_stmt_t *st, json_t *rd, tp_whjson_t *j)
{
    char why[MSG_MAX];
    int64_t idx = st->chunk;
    if (rd != NULL && !json_is_object(rd)) {
        tp_whjson_free(j);
        protocol_error(st, idx, "result is not an object");
        return;
    }
    json_t *links = json_object_get(rd, "external_links");
    bool has_rows = j != NULL && tp_whjson_saw_rows(j);
    int64_t ci;
    if (jint(rd, "chunk_index", &ci) && ci != idx) {
        tp_whjson_free(j);
        snprintf(why, sizeof(why), "answer is for chunk_index %lld", (long long)ci);
        protocol_error(st, idx, why);
        return;
    }
    if (links != NULL) {
        tp_whjson_free(j);
        if (!json_is_array(links) || json_array_size(links) == 0) {
            protocol_error(st, idx, "external_links is not a non-empty array");
            return;
        }
        if (json_array_size(links) > 1) {
            protocol_error(st, idx, "more than one external link in one answer is not supported");
            return;
        }
        json_t *l = json_array_get(links, 0);
        const char *url = jstr(l, "external_link");
        if (!json_is_object(l) || url == NULL || url[0] == '\0') {
            protocol_error(st, idx, "external link has no external_link URL");
            return;
        }
        if (jint(l, "chunk_index", &ci) && ci != idx) {
            snprintf(why, sizeof(why), "external link is for chunk_index %lld", (long long)ci);
            protocol_error(st, idx, why);
            return;
        }
        int refreshes = st->link.refreshes;
        link_clear(&st->link);
        st->link.refreshes = refreshes;
        st->link.url = tp_xstrdup(url);
        const char *exp = jstr(l, "expiration");
        int64_t exp_ms = exp ? tp_rfc3339_parse(exp) : 0;
        st->link.expires_ms = exp_ms > 0 ? exp_ms : 0;
        if (exp && exp_ms <= 0) {
            protocol_error(st, idx, "external link expiration is not an RFC 3339 time");
            return;
        }
        int64_t v;
        st->link.row_count = jint(l, "row_count", &v) ? v : -1;
        st->link.row_offset = jint(l, "row_offset", &v) ? v : -1;
        json_t *hh = json_object_get(l, "http_headers");
        if (hh != NULL && !json_is_object(hh)) {
            protocol_error(st, idx, "external link http_headers is not an object");
            return;
        }
        const char *hk;
        json_t *hv;
        json_object_foreach(hh, hk, hv)
        {
            if (!json_is_string(hv) || strpbrk(hk, "\r\n:") || strpbrk(json_string_value(hv), "\r\n")) {
                protocol_error(st, idx, "external link http_headers holds a value that is not a plain string");
                return;
            }
            char *line = tp_xasprintf("%s: %s", hk, json_string_value(hv));
            st->link.headers = curl_slist_append(st->link.headers, line);
            free(line);
        }
        /* the link carries the chain; the result object may too */
        bool on_link = json_object_get(l, "next_chunk_index") || json_object_get(l, "next_chunk_internal_link");
        set_next(st, on_link ? l : rd);
        st->refreshing = false;
        start_link_download(st);
        return;
    }
    /* INLINE (or no rows at all) */
    int64_t rc = -1, ro = -1;
    jint(rd, "row_count", &rc);
    jint(rd, "row_offset", &ro);
    int64_t got = j ? tp_whjson_rows_total(j) : 0;
    if (!has_rows && rc > 0) {
        tp_whjson_free(j);
        snprintf(why, sizeof(why), "row_count is %lld but the answer has no data_array", (long long)rc);
        protocol_error(st, idx, why);
        return;
    }
    if (rc >= 0 && got != rc) {
        tp_whjson_free(j);
        snprintf(why, sizeof(why), "data_array holds %lld rows but row_count says %lld", (long long)got,
                 (long long)rc);
        protocol_error(st, idx, why);
        return;
    }
    int64_t mrc = manifest_chunk_rows(st, idx);
    if (has_rows && mrc >= 0 && got != mrc) {
        tp_whjson_free(j);
        snprintf(why, sizeof(why), "data_array holds %lld rows but the manifest lists %lld for this chunk",
                 (long long)got, (long long)mrc);
        protocol_error(st, idx, why);
        return;
    }
    if (ro >= 0 && ro != st->chunk_base) {
        tp_whjson_free(j);
        snprintf(why, sizeof(why), "row_offset is %lld, expected %lld", (long long)ro, (long long)st->chunk_base);
        protocol_error(st, idx, why);
        return;
    }
    set_next(st, rd);
    st->held = j; /* batch_pos stays: rows of a streamed batch may be out already */
    st->held_complete = true;
    flush_held(st);
}

/* Delivers the held rows; when all are out and the chunk is complete, moves on. */
static bool flush_held(tp_wh_stmt_t *st)
{
    if (st->held != NULL) {
        if (!deliver_rows(st, st->held, true)) {
            if (st->consumer_failed)
                schedule_defer(st);
            return false;
        }
        tp_whjson_free(st->held);
        st->held = NULL;
    }
    if (st->phase == P_DONE)
        return false;
    if (st->held_complete) {
        st->held_complete = false;
        after_chunk(st);
    }
    return true;
}

static void start_chunk_get(tp_wh_stmt_t *st, int64_t idx, const char *internal)
{
    char *url = internal ? tp_xasprintf("%s%s", st->wh->host, internal)
                         : tp_xasprintf("%s" STATEMENTS_PATH "/%s/result/chunks/%lld", st->wh->host, st->id,
                                        (long long)idx);
    call_t *c = new_stmt_call(st, K_CHUNK, false, url,
                              tp_xasprintf("GET chunk %lld of %s%s", (long long)idx, st->id,
                                           st->refreshing ? " (fresh link)" : ""));
    c->chunk = idx;
    call_start(c);
}

/* The current chunk is fully delivered: check it, then fetch the next or end. */
static void after_chunk(tp_wh_stmt_t *st)
{
    char why[MSG_MAX];
    int64_t rows_in_chunk = st->chunk_rows_done;
    bool real_chunk = st->man.total_chunk_count != 0;
    if (real_chunk) {
        st->res.chunks++;
        st->chunk_base += rows_in_chunk;
    }
    st->chunk_rows_done = 0;
    st->chunk_bytes_done = 0;
    link_clear(&st->link);
    if (st->next_link != NULL || st->next_index >= 0) {
        int64_t next = st->chunk + 1;
        if (st->next_index >= 0 && st->next_index != next) {
            snprintf(why, sizeof(why), "next_chunk_index is %lld, expected %lld", (long long)st->next_index,
                     (long long)next);
            protocol_error(st, st->chunk, why);
            return;
        }
        if (st->next_link != NULL && st->next_link[0] != '/') {
            protocol_error(st, st->chunk, "next_chunk_internal_link is not an absolute path");
            return;
        }
        if (st->man.total_chunk_count >= 0 && next >= st->man.total_chunk_count) {
            snprintf(why, sizeof(why), "points to chunk %lld but the manifest has %lld chunks", (long long)next,
                     (long long)st->man.total_chunk_count);
            protocol_error(st, st->chunk, why);
            return;
        }
        st->chunk = next;
        char *link = st->next_link;
        st->next_link = NULL;
        start_chunk_get(st, next, link);
        free(link);
        return;
    }
    /* last chunk: totals must agree with the manifest */
    if (st->man.total_chunk_count >= 0 && st->res.chunks != st->man.total_chunk_count) {
        snprintf(why, sizeof(why), "chunk chain ended after %lld chunks but the manifest has %lld",
                 (long long)st->res.chunks, (long long)st->man.total_chunk_count);
        protocol_error(st, st->chunk, why);
        return;
    }
    if (st->man.total_row_count >= 0 && st->chunk_base != st->man.total_row_count && real_chunk) {
        snprintf(why, sizeof(why), "received %lld rows but the manifest says total_row_count %lld",
                 (long long)st->chunk_base, (long long)st->man.total_row_count);
        protocol_error(st, st->chunk, why);
        return;
    }
    if (!real_chunk && st->res.rows != 0) {
        protocol_error(st, -1, "rows received although the manifest has no chunks");
        return;
    }
    finish(st, TP_WH_SUCCEEDED, TP_WH_ERR_NONE, 200, -1, NULL, NULL);
}

static void start_link_download(tp_wh_stmt_t *st)
{
    int64_t now = tp_wall_ms();
    if (st->link.expires_ms > 0 && now + 1000 >= st->link.expires_ms) {
        if (st->link.refreshes >= MAX_LINK_REFRESH) {
            protocol_error(st, st->chunk, "external link was already expired after 3 fresh requests");
            return;
        }
        st->link.refreshes++;
        st->refreshing = true;
        st_log(st, TP_LOG_INFO, st->chunk, "external link expired; requesting a fresh one");
        start_chunk_get(st, st->chunk, NULL);
        return;
    }
    call_t *c = new_stmt_call(st, K_LINK, false, tp_xstrdup(st->link.url),
                              tp_xasprintf("GET external link for chunk %lld of %s", (long long)st->chunk, st->id));
    c->chunk = st->chunk;
    /* the call keeps its own copy of the headers (secret values) */
    for (struct curl_slist *x = st->link.headers; x; x = x->next)
        c->xhdrs = curl_slist_append(c->xhdrs, x->data);
    call_start(c);
}

static void on_link_result(tp_wh_stmt_t *st, call_t *c)
{
    char why[MSG_MAX];
    int64_t idx = st->chunk;
    int64_t rows;
    if (c->sink == SINK_CSV) {
        if (c->csv.q != 0) {
            protocol_error(st, idx, "CSV file ends inside a quoted field (truncated)");
            return;
        }
        if (c->csv.mid) {
            protocol_error(st, idx, "CSV file ends inside a record without a line break (truncated)");
            return;
        }
        rows = c->csv.records - (idx == 0 && c->csv.records > 0 ? 1 : 0);
        st->res.rows += rows - st->chunk_rows_done;
        st->chunk_rows_done = rows;
        if (st->link.row_count >= 0 && rows != st->link.row_count) {
            snprintf(why, sizeof(why), "CSV file holds %lld records but the link's row_count says %lld",
                     (long long)rows, (long long)st->link.row_count);
            protocol_error(st, idx, why);
            return;
        }
        call_free(st->call);
        st->call = NULL;
        after_chunk(st);
        return;
    }
    tp_whjson_t *j = c->json;
    if (!tp_whjson_finish(j)) {
        snprintf(why, sizeof(why), "external link file is malformed or truncated: %s", tp_whjson_error(j));
        protocol_error(st, idx, why);
        return;
    }
    rows = tp_whjson_rows_total(j);
    if (st->link.row_count >= 0 && rows != st->link.row_count) {
        snprintf(why, sizeof(why), "external link file holds %lld rows but row_count says %lld", (long long)rows,
                 (long long)st->link.row_count);
        protocol_error(st, idx, why);
        return;
    }
    int64_t mrc = manifest_chunk_rows(st, idx);
    if (mrc >= 0 && rows != mrc) {
        snprintf(why, sizeof(why), "external link file holds %lld rows but the manifest lists %lld", (long long)rows,
                 (long long)mrc);
        protocol_error(st, idx, why);
        return;
    }
    c->json = NULL;
    call_free(st->call);
    st->call = NULL;
    st->held = j; /* batch_pos stays: rows of a streamed batch may be out already */
    st->held_complete = true;
    flush_held(st);
}

static void on_statement_answer(tp_wh_stmt_t *st, call_t *c)
{
    char why[MSG_MAX];
    tp_whjson_t *j = c->json;
    if (j == NULL || !tp_whjson_finish(j)) {
        snprintf(why, sizeof(why), "%s: malformed JSON: %s", c->what, j ? tp_whjson_error(j) : "empty body");
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, (int)c->http, -1, NULL, "%s", why);
        return;
    }
    json_t *root = tp_whjson_root(j);
    if (!json_is_object(root)) {
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, (int)c->http, -1, NULL, "%s: answer is not a JSON object",
               c->what);
        return;
    }
    const char *id = jstr(root, "statement_id");
    if (id == NULL || id[0] == '\0') {
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, (int)c->http, -1, NULL, "%s: answer has no statement_id",
               c->what);
        return;
    }
    if (st->id == NULL) {
        st->id = tp_xstrdup(id);
        st_log(st, TP_LOG_DEBUG, -1, "statement accepted");
    } else if (strcmp(st->id, id) != 0) {
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, (int)c->http, -1, NULL,
               "%s: answer is for statement %.64s", c->what, id);
        return;
    }
    json_t *status = json_object_get(root, "status");
    const char *state = jstr(status, "state");
    if (state == NULL) {
        finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, (int)c->http, -1, NULL,
               "statement %s: answer has no status.state", st->id);
        return;
    }
    json_t *error = json_object_get(status, "error");
    const char *ecode = jstr(error, "error_code");
    const char *emsg = jstr(error, "message");
    const char *sqlstate = jstr(status, "sql_state");
    char ecode_num[24];
    if (ecode == NULL && json_is_integer(json_object_get(error, "error_code"))) {
        snprintf(ecode_num, sizeof(ecode_num), "%lld", (long long)json_integer_value(json_object_get(error, "error_code")));
        ecode = ecode_num;
    }
    char emsg_clean[MSG_MAX] = "";
    if (emsg)
        clean_line(emsg_clean, sizeof(emsg_clean), emsg, strlen(emsg));

    if (strcmp(state, "PENDING") == 0 || strcmp(state, "RUNNING") == 0 || strcmp(state, "SUCCEEDED") != 0) {
        bool terminal = strcmp(state, "FAILED") == 0 || strcmp(state, "CANCELED") == 0 ||
                        strcmp(state, "CLOSED") == 0;
        if (terminal) {
            st->server_terminal = true;
            tp_wh_status_t s = strcmp(state, "FAILED") == 0     ? TP_WH_FAILED
                               : strcmp(state, "CANCELED") == 0 ? TP_WH_CANCELED
                                                                : TP_WH_CLOSED;
            if (sqlstate)
                st->res.sql_state = tp_xstrdup(sqlstate);
            if (s == TP_WH_FAILED)
                finish(st, s, TP_WH_ERR_NONE, 200, -1, ecode, "statement %s FAILED: %s%s%s", st->id,
                       ecode ? ecode : "", ecode ? ": " : "", emsg ? emsg_clean : "(no message)");
            else if (s == TP_WH_CANCELED)
                finish(st, s, TP_WH_ERR_NONE, 200, -1, ecode, "statement %s was CANCELED%s%s%s", st->id,
                       st->cancel_requested ? " by the client" : "", emsg ? ": " : "", emsg_clean);
            else
                finish(st, s, TP_WH_ERR_NONE, 200, -1, ecode, "statement %s is CLOSED: results are no longer available",
                       st->id);
            return;
        }
        if (strcmp(state, "PENDING") != 0 && strcmp(state, "RUNNING") != 0) {
            int64_t now = now_ms();
            if (st->unknown_since_ms == 0)
                st->unknown_since_ms = now;
            if (st->unknown_state == NULL || strcmp(st->unknown_state, state) != 0) {
                free(st->unknown_state);
                st->unknown_state = tp_xstrndup(state, strnlen(state, 64));
                st_log(st, TP_LOG_WARN, -1, "unknown statement state \"%s\"; treating it as not finished",
                       st->unknown_state);
            }
            if (now - st->unknown_since_ms >= st->wh->cfg.unknown_state_ms) {
                finish(st, TP_WH_ERROR, TP_WH_ERR_PROTOCOL, 200, -1, NULL,
                       "statement %s stayed in unknown state \"%s\" for %lld ms", st->id, st->unknown_state,
                       (long long)(now - st->unknown_since_ms));
                return;
            }
        } else {
            st->unknown_since_ms = 0;
        }
        call_free(st->call);
        st->call = NULL;
        st->phase = P_POLL;
        if (st->cancel_requested && !st->cancel_handled)
            handle_cancel_request(st);
        else if (st->cancel_requested && !st->cancel_sent) {
            st->cancel_sent = true;
            send_cancel(st->wh, st->id, st->bearer_header);
        }
        schedule_poll(st);
        return;
    }
    /* SUCCEEDED */
    st->server_terminal = true;
    if (st->cancel_requested) {
        finish(st, TP_WH_CANCELED, TP_WH_ERR_NONE, 200, -1, NULL,
               "statement %s cancelled by the client; it had already SUCCEEDED, no rows delivered", st->id);
        return;
    }
    if (!take_manifest(st, json_object_get(root, "manifest"), why, sizeof(why))) {
        protocol_error(st, -1, why);
        return;
    }
    st->phase = P_STREAM;
    st->chunk = 0;
    st->chunk_base = 0;
    if (st->req.on_manifest != NULL && !st->req.on_manifest(st, &st->man, st->req.arg)) {
        st->consumer_failed = true;
        finish(st, TP_WH_ERROR, TP_WH_ERR_CONSUMER, 0, -1, NULL,
               "statement %s: the consumer rejected the manifest", st->id);
        return;
    }
    if (st->phase == P_DONE)
        return;
    json_t *rd = json_object_get(root, "result");
    c->json = NULL; /* root stays alive inside j until we free it */
    call_t *call = st->call;
    st->call = NULL;
    if (rd == NULL && !tp_whjson_saw_rows(j)) {
        call_free(call);
        if (st->man.total_chunk_count > 0) {
            tp_whjson_free(j);
            start_chunk_get(st, 0, NULL);
            return;
        }
        tp_whjson_free(j);
        st->held_complete = true;
        st->next_index = -1;
        flush_held(st);
        return;
    }
    json_incref(rd);
    call_free(call);
    /* j owns the row batch; rd (a separate reference) the rest */
    take_result_data(st, rd, j);
    json_decref(rd);
}

static void stmt_call_result(call_t *c, CURLcode rc)
{
    tp_wh_stmt_t *st = c->st;
    if (st->phase == P_DONE) {
        if (st->call == c)
            st->call = NULL;
        call_free(c);
        return;
    }
    if (c->local_abort && c->local_kind == TP_WH_ERR_CONSUMER) {
        /* stopped by a cancel or a consumer error: on_defer decides how it ends */
        if (st->consumer_failed)
            finish(st, TP_WH_ERROR, TP_WH_ERR_CONSUMER, 0, st->chunk, NULL,
                   "statement %s: the consumer stopped the stream at chunk %lld", st->id, (long long)st->chunk);
        else if (st->cancel_requested)
            handle_cancel_request(st);
        return;
    }
    bool ok = rc == CURLE_OK && !c->local_abort && c->http == 200;
    int64_t chunk = (c->kind == K_CHUNK || c->kind == K_LINK) ? c->chunk : -1;
    if (!ok && st->cancel_requested && st->id == NULL) {
        char msg[MSG_MAX];
        char *code = NULL;
        describe_failure(c, rc, msg, sizeof(msg), &code);
        free(code);
        finish(st, TP_WH_CANCELED, TP_WH_ERR_NONE, (int)c->http, -1, NULL,
               "statement cancelled by the client; its submission failed: %s", msg);
        return;
    }
    if (!ok) {
        /* external link rejected: it may have expired between our check and the download */
        if (c->kind == K_LINK && rc == CURLE_OK && !c->local_abort && (c->http == 403 || c->http == 404 || c->http == 410) &&
            st->link.refreshes < MAX_LINK_REFRESH) {
            bool expired = st->link.expires_ms > 0 && tp_wall_ms() + 30000 >= st->link.expires_ms;
            st_log(st, TP_LOG_WARN, chunk, "external link answered HTTP %ld (%s); requesting a fresh link",
                   c->http, expired ? "expired" : "before its expiry");
            st->link.refreshes++;
            st->refreshing = true;
            start_chunk_get(st, st->chunk, NULL);
            return;
        }
        char msg[MSG_MAX];
        char *code = NULL;
        describe_failure(c, rc, msg, sizeof(msg), &code);
        tp_wh_errkind_t kind = c->local_abort ? c->local_kind
                               : rc == CURLE_OPERATION_TIMEDOUT ? TP_WH_ERR_TIMEOUT
                               : rc != CURLE_OK           ? TP_WH_ERR_TRANSPORT
                               : (c->http == 401 || c->http == 403) ? TP_WH_ERR_AUTH
                                                                  : TP_WH_ERR_HTTP;
        if (rc == CURLE_PARTIAL_FILE && kind == TP_WH_ERR_TRANSPORT)
            kind = TP_WH_ERR_PROTOCOL;
        int http = (int)c->http;
        if (c->attempts > 1 && !c->local_abort)
            finish(st, TP_WH_ERROR, kind, http, chunk, code, "%s (after %d attempts)", msg, c->attempts);
        else
            finish(st, TP_WH_ERROR, kind, http, chunk, code, "%s", msg);
        free(code);
        return;
    }
    switch (c->kind) {
    case K_EXEC:
    case K_STATUS: on_statement_answer(st, c); break;
    case K_CHUNK: {
        tp_whjson_t *j = c->json;
        if (j == NULL || !tp_whjson_finish(j)) {
            char why[MSG_MAX];
            snprintf(why, sizeof(why), "chunk answer is malformed or truncated: %s",
                     j ? tp_whjson_error(j) : "empty body");
            protocol_error(st, c->chunk, why);
            return;
        }
        json_t *rd = json_incref(tp_whjson_root(j));
        c->json = NULL;
        call_free(st->call);
        st->call = NULL;
        take_result_data(st, rd, j);
        json_decref(rd);
        break;
    }
    case K_LINK: on_link_result(st, c); break;
    default: call_free(c); break;
    }
}

/* ------------------------------------------------------------------ */
/* blocking wrapper                                                     */

typedef struct run_ctx {
    bool done;
    tp_wh_result_t *out;
} run_ctx_t;

typedef struct run_wrap {
    tp_wh_request_t inner;
    run_ctx_t *ctx;
} run_wrap_t;

static bool run_manifest(tp_wh_stmt_t *st, const tp_wh_manifest_t *m, void *arg)
{
    run_wrap_t *w = arg;
    return w->inner.on_manifest ? w->inner.on_manifest(st, m, w->inner.arg) : true;
}

static bool run_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *r, void *arg)
{
    run_wrap_t *w = arg;
    return w->inner.on_rows ? w->inner.on_rows(st, r, w->inner.arg) : true;
}

static bool run_csv(tp_wh_stmt_t *st, const tp_wh_csv_t *c, void *arg)
{
    run_wrap_t *w = arg;
    return w->inner.on_csv ? w->inner.on_csv(st, c, w->inner.arg) : true;
}

static void run_done(tp_wh_stmt_t *st, const tp_wh_result_t *res, void *arg)
{
    run_wrap_t *w = arg;
    if (w->inner.on_done)
        w->inner.on_done(st, res, w->inner.arg);
    tp_wh_result_copy(w->ctx->out, res);
    w->ctx->done = true;
}

static bool noop_rows(tp_wh_stmt_t *st, const tp_wh_rows_t *r, void *arg)
{
    (void)st;
    (void)r;
    (void)arg;
    return true;
}

static bool noop_csv(tp_wh_stmt_t *st, const tp_wh_csv_t *c, void *arg)
{
    (void)st;
    (void)c;
    (void)arg;
    return true;
}

bool tp_wh_run(const tp_wh_config_t *cfg, const tp_wh_request_t *req, tp_wh_result_t *out)
{
    memset(out, 0, sizeof(*out));
    out->chunk_index = -1;
    char *err = NULL;
    struct event_base *base = event_base_new();
    if (base == NULL)
        abort();
    tp_wh_t *wh = tp_wh_new(base, cfg, &err);
    if (wh == NULL) {
        out->status = TP_WH_ERROR;
        out->kind = TP_WH_ERR_REQUEST;
        out->message = err;
        event_base_free(base);
        return false;
    }
    run_ctx_t ctx = {.done = false, .out = out};
    run_wrap_t w = {.inner = *req, .ctx = &ctx};
    tp_wh_request_t r = *req;
    r.on_manifest = run_manifest;
    r.on_rows = req->on_rows ? run_rows : noop_rows;
    r.on_csv = req->on_csv ? run_csv : noop_csv;
    r.on_done = run_done;
    r.arg = &w;
    tp_wh_stmt_t *st = tp_wh_submit(wh, &r, &err);
    if (st == NULL) {
        out->status = TP_WH_ERROR;
        out->kind = TP_WH_ERR_REQUEST;
        out->message = err;
    } else {
        while (!ctx.done)
            event_base_loop(base, EVLOOP_ONCE);
    }
    tp_wh_free(wh);
    event_base_free(base);
    return out->status == TP_WH_SUCCEEDED;
}
