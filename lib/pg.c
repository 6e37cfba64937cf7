/* Blocking libpq helpers for command-line and start-up paths: connecting with
 * a timeout and a default application_name, an optional per-connection
 * password override (for expiring Lakebase OAuth tokens), running a statement
 * and checking its status, and quoting identifiers.
 * It owns the rule that a connection error names host and port and never
 * carries a secret: passwords we know of (override, conninfo, PGPASSWORD) are
 * masked wherever they appear, and when the conninfo itself cannot be parsed
 * the quoted fragments libpq echoes from it are masked too, because they may
 * be pieces of a password. It deliberately has no pool, no async state
 * machine and no retry: the server and the daemon build those on their loop. */
#include "tidepool/pg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/log.h"

#define MAX_SECRETS 4

typedef struct secrets {
    const char *v[MAX_SECRETS];
    int n;
} secrets_t;

static void secrets_add(secrets_t *s, const char *v)
{
    if (v != NULL && v[0] != '\0' && s->n < MAX_SECRETS)
        s->v[s->n++] = v;
}

/* Copies msg into b as one line (newlines and tabs folded) with every secret masked. */
static void append_masked(tp_buf_t *b, const char *msg, const secrets_t *s)
{
    const char *p = msg;
    bool space = false;
    while (*p) {
        size_t hit = 0;
        for (int i = 0; i < s->n; i++) {
            size_t l = strlen(s->v[i]);
            if (strncmp(p, s->v[i], l) == 0 && l > hit)
                hit = l;
        }
        if (hit) {
            if (space)
                tp_buf_putc(b, ' ');
            space = false;
            tp_buf_puts(b, "***");
            p += hit;
            continue;
        }
        if (*p == '\n' || *p == '\t' || *p == '\r' || *p == ' ') {
            space = b->len > 0;
        } else {
            if (space)
                tp_buf_putc(b, ' ');
            space = false;
            tp_buf_putc(b, *p);
        }
        p++;
    }
}

static bool is_conninfo_keyword(const char *tok, size_t len)
{
    PQconninfoOption *opts = PQconndefaults();
    bool found = false;
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strlen(o->keyword) == len && strncmp(o->keyword, tok, len) == 0)
            found = true;
    PQconninfoFree(opts);
    return found;
}

/* libpq's conninfo parse errors quote fragments of the string (a URI, a
 * percent-encoded token, a word with no "="), which may be parts of a password
 * and may themselves contain quotes. Outside the quotes its messages are fixed
 * text, so when the string may hold a password (it mentions "password" or has
 * a URI "@"), everything from the first to the last double quote is masked,
 * unless it is one quoted conninfo keyword or punctuation character. */
static char *mask_quoted_fragments(const char *msg, bool may_hold_secret)
{
    const char *first = strchr(msg, '"'), *last = strrchr(msg, '"');
    if (!may_hold_secret || first == NULL || first == last)
        return tp_xstrdup(msg);
    size_t len = (size_t)(last - first - 1);
    bool one = memchr(first + 1, '"', len) == NULL;
    bool punct = len == 1 && !((first[1] >= 'a' && first[1] <= 'z') ||
                               (first[1] >= 'A' && first[1] <= 'Z') ||
                               (first[1] >= '0' && first[1] <= '9'));
    if (one && (punct || is_conninfo_keyword(first + 1, len)))
        return tp_xstrdup(msg);
    return tp_xasprintf("%.*s\"***\"%s", (int)(first - msg), msg, last + 1);
}

static void put_err(char *err, size_t errlen, tp_buf_t *b)
{
    if (errlen > 0)
        snprintf(err, errlen, "%s", b->data ? b->data : "");
    tp_buf_free(b);
}

/* "HOST:PORT" of host and port, each falling back to PGHOST/PGPORT and then
 * libpq's defaults (localhost, 5432). */
static const char *where_of(const char *host, const char *port, char *buf, size_t len)
{
    if (host == NULL || host[0] == '\0')
        host = getenv("PGHOST");
    if (host == NULL || host[0] == '\0')
        host = "localhost";
    if (port == NULL || port[0] == '\0')
        port = getenv("PGPORT");
    if (port == NULL || port[0] == '\0')
        port = "5432";
    if (strchr(host, ':') != NULL && host[0] != '/')
        snprintf(buf, len, "[%s]:%s", host, port);
    else
        snprintf(buf, len, "%s:%s", host, port);
    return buf;
}

const char *tp_pg_where(const PGconn *conn, char *buf, size_t len)
{
    return where_of(conn ? PQhost(conn) : NULL, conn ? PQport(conn) : NULL, buf, len);
}

/* Returns the parsed options of conninfo (NULL conninfo or "" parses as empty),
 * or NULL with err set when libpq cannot parse it. */
static PQconninfoOption *parse_conninfo(const char *conninfo, const secrets_t *known, char *err,
                                        size_t errlen)
{
    /* libpq expands only a URI or a string with "=" (else it is a bare dbname). */
    bool expanded = conninfo != NULL && (strchr(conninfo, '=') != NULL ||
                                         strncmp(conninfo, "postgresql://", 13) == 0 ||
                                         strncmp(conninfo, "postgres://", 11) == 0);
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(expanded ? conninfo : "", &perr);
    if (opts != NULL)
        return opts;
    bool may_hold_secret = strcasestr(conninfo, "password") != NULL || strchr(conninfo, '@') != NULL;
    char *masked = mask_quoted_fragments(perr ? perr : "out of memory", may_hold_secret);
    tp_buf_t b = {0};
    tp_buf_puts(&b, "invalid Postgres connection string: ");
    append_masked(&b, masked, known);
    put_err(err, errlen, &b);
    free(masked);
    PQfreemem(perr);
    return NULL;
}

/* conninfo parsed as libpq reads it, errors not wanted (NULL when it does not parse). */
static PQconninfoOption *parse_quiet(const char *conninfo)
{
    char err[8];
    secrets_t none = {0};
    return parse_conninfo(conninfo ? conninfo : "", &none, err, sizeof err);
}

/* The non-empty value of keyword among opts, or NULL. */
static const char *opt_value(const PQconninfoOption *opts, const char *keyword)
{
    for (const PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
        if (strcmp(o->keyword, keyword) == 0)
            return o->val != NULL && o->val[0] != '\0' ? o->val : NULL;
    return NULL;
}

const char *tp_pg_where_conninfo(const char *conninfo, char *buf, size_t len)
{
    PQconninfoOption *opts = parse_quiet(conninfo);
    const char *host = opt_value(opts, "host");
    where_of(host ? host : opt_value(opts, "hostaddr"), opt_value(opts, "port"), buf, len);
    PQconninfoFree(opts);
    return buf;
}

bool tp_pg_conninfo_has(const char *conninfo, const char *keyword)
{
    PQconninfoOption *opts = parse_quiet(conninfo);
    bool has = opt_value(opts, keyword) != NULL;
    PQconninfoFree(opts);
    return has;
}

bool tp_pg_password_refused(const char *msg)
{
    return msg != NULL && (strstr(msg, "password authentication failed") != NULL ||
                           strstr(msg, "28P01") != NULL);
}

bool tp_pg_error_transient(const char *msg)
{
    static const char *const pats[] = {
        "terminating connection due to administrator command", /* 57P01 */
        "the database system is starting up",                   /* 57P03 */
        "the database system is shutting down",
        "the database system is in recovery mode",
        "server closed the connection unexpectedly",
        "Connection refused",
        "Connection reset",
        "timeout expired",
        "timed out",
        "could not receive data from server",
        "could not send data to server",
        "57P01",
        "57P03",
        "SSL SYSCALL error",
    };
    if (msg == NULL)
        return false;
    for (size_t i = 0; i < sizeof pats / sizeof pats[0]; i++)
        if (strstr(msg, pats[i]) != NULL)
            return true;
    return false;
}

bool tp_pg_conninfo_check(const char *conninfo, char *err, size_t errlen)
{
    secrets_t known = {0};
    secrets_add(&known, getenv("PGPASSWORD"));
    PQconninfoOption *opts = parse_conninfo(conninfo, &known, err, errlen);
    PQconninfoFree(opts);
    return opts != NULL;
}

/* Server notices (NOTICE, WARNING) become log lines instead of libpq's bare
 * stderr output: warnings at warn, the rest ("... already exists, skipping") at debug. */
static void on_notice(void *arg, const PGresult *res)
{
    (void)arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    tp_log_level_t level = sev && strcmp(sev, "WARNING") == 0 ? TP_LOG_WARN : TP_LOG_DEBUG;
    const char *kv[] = {"severity", sev ? sev : "NOTICE", "sqlstate", state, NULL};
    tp_logkv(level, kv, "postgres: %s", msg ? msg : "(no message)");
}

static PGconn *connect_impl(const char *conninfo, const char *password, int64_t timeout_ms,
                            char *err, size_t errlen)
{
    secrets_t known = {0};
    secrets_add(&known, password);
    secrets_add(&known, getenv("PGPASSWORD"));
    PQconninfoOption *opts = parse_conninfo(conninfo, &known, err, errlen);
    if (opts == NULL)
        return NULL;

    const char *keys[6], *vals[6];
    int n = 0;
    char tbuf[32];
    keys[n] = "fallback_application_name";
    vals[n++] = program_invocation_short_name;
    keys[n] = "dbname"; /* expanded: the conninfo's own settings land here */
    vals[n++] = conninfo ? conninfo : "";
    if (timeout_ms > 0) {
        int64_t secs = (timeout_ms + 999) / 1000;
        snprintf(tbuf, sizeof tbuf, "%lld", (long long)(secs < 2 ? 2 : secs));
        keys[n] = "connect_timeout";
        vals[n++] = tbuf;
    }
    if (password != NULL && password[0] != '\0') {
        keys[n] = "password";
        vals[n++] = password;
    }
    keys[n] = NULL;
    vals[n] = NULL;

    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (conn != NULL && PQstatus(conn) == CONNECTION_OK) {
        PQsetNoticeReceiver(conn, on_notice, NULL);
        PQconninfoFree(opts);
        return conn;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "password") == 0 || strcmp(o->keyword, "sslpassword") == 0)
            secrets_add(&known, o->val);
    char where[300];
    tp_buf_t b = {0};
    tp_buf_printf(&b, "cannot connect to Postgres at %s: ", tp_pg_where(conn, where, sizeof where));
    append_masked(&b, conn ? PQerrorMessage(conn) : "out of memory", &known);
    put_err(err, errlen, &b);
    PQconninfoFree(opts);
    PQfinish(conn);
    return NULL;
}

PGconn *tp_pg_connect(const char *conninfo, int64_t timeout_ms, char *err, size_t errlen)
{
    return connect_impl(conninfo, NULL, timeout_ms, err, errlen);
}

PGconn *tp_pg_connect_password(const char *conninfo, const char *password, int64_t timeout_ms,
                               char *err, size_t errlen)
{
    return connect_impl(conninfo, password, timeout_ms, err, errlen);
}

const char *tp_pg_result_error(const PGconn *conn, const PGresult *res, char *err, size_t errlen)
{
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    tp_buf_t b = {0};
    secrets_t none = {0};
    if (primary != NULL) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
        append_masked(&b, primary, &none);
        if (state)
            tp_buf_printf(&b, " (SQLSTATE %s)", state);
        if (detail) {
            tp_buf_puts(&b, ": ");
            append_masked(&b, detail, &none);
        }
    } else {
        const char *m = conn ? PQerrorMessage(conn) : "";
        append_masked(&b, m && m[0] ? m : "unknown error (no result)", &none);
    }
    put_err(err, errlen, &b);
    return err;
}

PGresult *tp_pg_query(PGconn *conn, const char *sql, int nparams, const char *const *params,
                      char *err, size_t errlen)
{
    PGresult *res = nparams == 0 ? PQexec(conn, sql)
                                 : PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (res != NULL && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY))
        return res;
    tp_pg_result_error(conn, res, err, errlen);
    PQclear(res);
    return NULL;
}

bool tp_pg_exec(PGconn *conn, const char *sql, int nparams, const char *const *params, char *err,
                size_t errlen)
{
    PGresult *res = tp_pg_query(conn, sql, nparams, params, err, errlen);
    PQclear(res);
    return res != NULL;
}

char *tp_pg_quote_ident(PGconn *conn, const char *ident, char *err, size_t errlen)
{
    char *q = PQescapeIdentifier(conn, ident, strlen(ident));
    if (q == NULL) {
        tp_buf_t b = {0};
        secrets_t none = {0};
        tp_buf_puts(&b, "cannot quote identifier: ");
        append_masked(&b, PQerrorMessage(conn), &none);
        put_err(err, errlen, &b);
        return NULL;
    }
    char *out = tp_xstrdup(q);
    PQfreemem(q);
    return out;
}
