/* Fault injection: parses the --faults SPEC (also accepted by POST /admin/faults)
 * and hands out faults to the request handlers. SPEC is a comma list:
 *   latency=MS[@CLASS]          added delay before answering
 *   status=CODE[xK][@CLASS]     answer CODE (429, 500, 502, 503, 504) to the next K requests
 *   retry_after=N               Retry-After seconds sent with 429/503 (429 defaults to 1)
 *   drop_chunk=K                the next K chunk bodies are cut mid-way and the connection closed
 *   truncate_chunk=K            the next K chunk bodies are cut, with an honest Content-Length
 *   expire_links[=K]            links are issued already expired (all, or the next K)
 *   token_fail=K[:CODE]         the next K token requests fail (default 500)
 *   proxy_page=K[@CLASS]        the next K answers are a proxy's HTML 502 page
 *   bad_json=K[@CLASS]          the next K answers are HTTP 200 with JSON cut off mid-way
 *   bad_state=K[@CLASS]         the next K statement answers (execute, get) are well-formed
 *                               but in state EXPLODING, which the protocol does not define
 * CLASS: execute, get, chunk, cancel, close, link, token, any. Without one,
 * latency applies everywhere but /admin, and status everywhere but /admin and
 * the token endpoint (which has token_fail and @token). Counters live in
 * g.faults and are only used on the loop thread. */
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const classes[] = {"execute", "get",   "chunk",    "cancel", "close",
                                      "link",    "token", "lakebase", "any"};

static bool valid_class(const char *c)
{
    for (size_t i = 0; i < TP_ARRAY_LEN(classes); i++)
        if (strcmp(c, classes[i]) == 0)
            return true;
    return false;
}

static bool parse_int(const char *s, int64_t min, int64_t max, int *out)
{
    int64_t v;
    if (!tp_parse_int64(s, min, max, &v))
        return false;
    *out = (int)v;
    return true;
}

/* Splits "VALUE@CLASS" in place; cls gets "" or the class. */
static bool split_class(char *val, char *cls, size_t clslen)
{
    char *at = strchr(val, '@');
    cls[0] = '\0';
    if (at == NULL)
        return true;
    *at = '\0';
    if (!valid_class(at + 1))
        return false;
    snprintf(cls, clslen, "%s", strcmp(at + 1, "any") == 0 ? "" : at + 1);
    return true;
}

static bool parse_item(char *item, emu_faults_t *f, char *err, size_t errlen)
{
    char *val = strchr(item, '=');
    if (val)
        *val++ = '\0';
    char cls[16];
    if (strcmp(item, "expire_links") == 0) {
        if (val == NULL) {
            f->expire_links = -1;
            return true;
        }
        if (parse_int(val, 1, 1000000, &f->expire_links))
            return true;
    } else if (val == NULL) {
        /* falls through to the error */
    } else if (strcmp(item, "latency") == 0) {
        if (split_class(val, cls, sizeof cls) && parse_int(val, 0, 600000, &f->latency_ms)) {
            snprintf(f->latency_cls, sizeof f->latency_cls, "%s", cls);
            return true;
        }
    } else if (strcmp(item, "status") == 0) {
        if (!split_class(val, cls, sizeof cls) || f->nstatus >= (int)TP_ARRAY_LEN(f->status))
            goto bad;
        emu_fault_status_t *s = &f->status[f->nstatus];
        char *x = strchr(val, 'x');
        s->remaining = 1;
        if (x) {
            *x = '\0';
            if (!parse_int(x + 1, 1, 1000000, &s->remaining))
                goto bad;
        }
        if (!parse_int(val, 400, 599, &s->code))
            goto bad;
        snprintf(s->cls, sizeof s->cls, "%s", cls);
        f->nstatus++;
        return true;
    } else if (strcmp(item, "retry_after") == 0) {
        if (parse_int(val, 0, 3600, &f->retry_after))
            return true;
    } else if (strcmp(item, "drop_chunk") == 0) {
        if (parse_int(val, 0, 1000000, &f->drop_chunk))
            return true;
    } else if (strcmp(item, "truncate_chunk") == 0) {
        if (parse_int(val, 0, 1000000, &f->truncate_chunk))
            return true;
    } else if (strcmp(item, "proxy_page") == 0 || strcmp(item, "bad_json") == 0 ||
               strcmp(item, "bad_state") == 0) {
        emu_fault_count_t *c = item[0] == 'p'             ? &f->proxy_page
                               : strcmp(item, "bad_json") == 0 ? &f->bad_json
                                                               : &f->bad_state;
        if (split_class(val, cls, sizeof cls) && parse_int(val, 0, 1000000, &c->remaining)) {
            snprintf(c->cls, sizeof c->cls, "%s", cls);
            return true;
        }
    } else if (strcmp(item, "token_fail") == 0) {
        char *colon = strchr(val, ':');
        f->token_fail_code = 500;
        if (colon) {
            *colon = '\0';
            if (!parse_int(colon + 1, 400, 599, &f->token_fail_code))
                goto bad;
        }
        if (parse_int(val, 0, 1000000, &f->token_fail))
            return true;
    } else {
        snprintf(err, errlen, "unknown fault '%s' (known: latency, status, retry_after, "
                              "drop_chunk, truncate_chunk, expire_links, token_fail, proxy_page, "
                              "bad_json, bad_state)", item);
        return false;
    }
bad:
    snprintf(err, errlen, "bad value for fault '%s'", item);
    return false;
}

bool emu_faults_parse(const char *spec, emu_faults_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->token_fail_code = 500;
    if (spec == NULL || *spec == '\0')
        return true;
    if (strlen(spec) > 1024) {
        snprintf(err, errlen, "fault spec longer than 1024 characters");
        return false;
    }
    char *copy = tp_xstrdup(spec);
    bool ok = true;
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        item = tp_strtrim(item);
        if (*item == '\0')
            continue;
        if (!parse_item(item, out, err, errlen)) {
            ok = false;
            break;
        }
    }
    free(copy);
    if (!ok)
        memset(out, 0, sizeof *out);
    return ok;
}

void emu_faults_describe(const emu_faults_t *f, tp_buf_t *out)
{
    tp_buf_printf(out, "{\"latency_ms\":%d,\"latency_class\":\"%s\",\"status\":[", f->latency_ms,
                  f->latency_cls[0] ? f->latency_cls : "any");
    int n = 0;
    for (int i = 0; i < f->nstatus; i++) {
        if (f->status[i].remaining <= 0)
            continue;
        tp_buf_printf(out, "%s{\"code\":%d,\"remaining\":%d,\"class\":\"%s\"}", n++ ? "," : "",
                      f->status[i].code, f->status[i].remaining,
                      f->status[i].cls[0] ? f->status[i].cls : "any");
    }
    tp_buf_printf(out,
                  "],\"retry_after\":%d,\"drop_chunk\":%d,\"truncate_chunk\":%d,"
                  "\"expire_links\":%d,\"token_fail\":%d,\"token_fail_code\":%d,"
                  "\"proxy_page\":%d,\"bad_json\":%d,\"bad_state\":%d}",
                  f->retry_after, f->drop_chunk, f->truncate_chunk, f->expire_links,
                  f->token_fail, f->token_fail_code, f->proxy_page.remaining,
                  f->bad_json.remaining, f->bad_state.remaining);
}

/* A fault limited to class want ("" = any but the token endpoint, which has
 * its own faults) applies to a request of class cls. */
static bool class_applies(const char *want, const char *cls)
{
    return want[0] == '\0' ? strcmp(cls, "token") != 0 : strcmp(want, cls) == 0;
}

int emu_faults_take_status(const char *cls)
{
    for (int i = 0; i < g.faults.nstatus; i++) {
        emu_fault_status_t *s = &g.faults.status[i];
        if (s->remaining <= 0)
            continue;
        if (!class_applies(s->cls, cls))
            continue;
        s->remaining--;
        return s->code;
    }
    return 0;
}

bool emu_faults_take_count(emu_fault_count_t *f, const char *cls)
{
    return class_applies(f->cls, cls) && emu_faults_take(&f->remaining);
}

int emu_faults_latency(const char *cls)
{
    if (g.faults.latency_ms <= 0)
        return 0;
    if (g.faults.latency_cls[0] && strcmp(g.faults.latency_cls, cls) != 0)
        return 0;
    return g.faults.latency_ms;
}

bool emu_faults_take(int *counter)
{
    if (*counter <= 0)
        return false;
    (*counter)--;
    return true;
}
