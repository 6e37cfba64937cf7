/* Write-back tables: the "@writable" comment grammar, reflection of the declared
 * tables from pg_catalog into an immutable, reference-counted snapshot, and the
 * per-table SQL plans (one statement per operation, compiled once at reflection).
 *
 * Grammar (docs/writeback.md): "@writable" followed by whitespace-separated
 * key=value tokens up to the end of the comment or the next "@word"; keys roles,
 * read, if_match, owner, version, touch, readonly, mirror; each at most once.
 * Anything else is an error naming the table and the token.
 *
 * The plans splice only reflected identifiers (quoted) and reflected defaults;
 * every value is a parameter. Validation and answers live in writeback_req.c;
 * this file does not know about HTTP or any event loop. */
#include "tidepool/writeback.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tp_wb_schema {
    uint32_t magic;
    atomic_int refs;
    tp_wb_table_t **tables;
    int ntables;
};
#define SCHEMA_MAGIC 0x57425343u /* "WBSC" */

const char TP_WB_PURGE_SQL[] =
    "DELETE FROM tidepool.idempotency_keys WHERE ctid = ANY (ARRAY("
    "SELECT ctid FROM tidepool.idempotency_keys WHERE expires_at <= now() "
    "LIMIT $1::integer))";

/* ---- comment grammar ---- */

static void strv_free(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

void tp_wb_decl_free(tp_wb_decl_t *d)
{
    if (!d)
        return;
    strv_free(d->write_roles);
    strv_free(d->read_roles);
    strv_free(d->readonly);
    free(d->mirror);
    free(d->owner);
    free(d->version);
    free(d->touch);
    memset(d, 0, sizeof *d);
}

static bool is_ident(const char *s, size_t n, bool dash)
{
    if (n == 0 || n > 63)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '_' || (dash && c == '-')))
            return false;
    }
    return !isdigit((unsigned char)s[0]);
}

/* "a,b,c" -> NULL-terminated vector of identifiers; NULL on an empty or bad item. */
static char **split_list(const char *v, bool dash)
{
    size_t n = 1;
    for (const char *p = v; *p; p++)
        n += *p == ',';
    char **out = tp_xcalloc(n + 1, sizeof *out);
    size_t i = 0;
    const char *p = v;
    for (;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (!is_ident(p, len, dash)) {
            strv_free(out);
            return NULL;
        }
        out[i++] = tp_xstrndup(p, len);
        if (!e)
            break;
        p = e + 1;
    }
    return out;
}

static int decl_error(char *err, size_t errlen, const char *table, const char *fmt, ...)
    TP_PRINTF(4, 5);
static int decl_error(char *err, size_t errlen, const char *table, const char *fmt, ...)
{
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(err, errlen, "%s: @writable comment: %s", table, msg);
    return -1;
}

/* Finds "@writable" as a whole word; returns the text after it or NULL. */
static const char *find_directive(const char *c)
{
    for (const char *p = c; (p = strstr(p, "@writable")) != NULL; p += 9) {
        bool start = p == c || isspace((unsigned char)p[-1]);
        char after = p[9];
        if (start && (after == '\0' || isspace((unsigned char)after)))
            return p + 9;
    }
    return NULL;
}

int tp_wb_parse_comment(const char *table, const char *comment, tp_wb_decl_t *out, char *err,
                        size_t errlen)
{
    memset(out, 0, sizeof *out);
    const char *p = comment ? find_directive(comment) : NULL;
    if (!p)
        return 0;
    bool seen_if_match = false;
    for (;;) {
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '\0' || *p == '@')
            break;
        size_t n = 0;
        while (p[n] && !isspace((unsigned char)p[n]))
            n++;
        char tok[256];
        if (n >= sizeof tok) {
            tp_wb_decl_free(out);
            return decl_error(err, errlen, table, "token '%.40s...' is too long", p);
        }
        memcpy(tok, p, n);
        tok[n] = '\0';
        p += n;
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok || eq[1] == '\0') {
            tp_wb_decl_free(out);
            return decl_error(err, errlen, table, "token '%s' is not key=value", tok);
        }
        *eq = '\0';
        const char *key = tok, *val = eq + 1;
        char **slot_s = NULL;
        char ***slot_v = NULL;
        bool dash = false;
        if (strcmp(key, "roles") == 0) {
            slot_v = &out->write_roles;
            dash = true;
        } else if (strcmp(key, "read") == 0) {
            slot_v = &out->read_roles;
            dash = true;
        } else if (strcmp(key, "readonly") == 0) {
            slot_v = &out->readonly;
        } else if (strcmp(key, "owner") == 0) {
            slot_s = &out->owner;
        } else if (strcmp(key, "version") == 0) {
            slot_s = &out->version;
        } else if (strcmp(key, "touch") == 0) {
            slot_s = &out->touch;
        } else if (strcmp(key, "mirror") == 0) {
            slot_s = &out->mirror;
        } else if (strcmp(key, "if_match") == 0) {
            if (seen_if_match) {
                tp_wb_decl_free(out);
                return decl_error(err, errlen, table, "key '%s' given twice", key);
            }
            seen_if_match = true;
            if (strcmp(val, "required") == 0)
                out->if_match_required = true;
            else if (strcmp(val, "optional") != 0) {
                tp_wb_decl_free(out);
                return decl_error(err, errlen, table,
                                  "token '%s=%s': if_match is 'required' or 'optional'", key, val);
            }
            continue;
        } else {
            tp_wb_decl_free(out);
            return decl_error(err, errlen, table,
                              "unknown key '%s' in token '%s=%s' (keys: roles read if_match owner "
                              "version touch readonly mirror)",
                              key, key, val);
        }
        if ((slot_s && *slot_s) || (slot_v && *slot_v)) {
            tp_wb_decl_free(out);
            return decl_error(err, errlen, table, "key '%s' given twice", key);
        }
        if (slot_v) {
            *slot_v = split_list(val, dash);
            if (!*slot_v) {
                tp_wb_decl_free(out);
                return decl_error(err, errlen, table,
                                  "token '%s=%s': expected a comma-separated list of names", key,
                                  val);
            }
        } else if (slot_s == &out->mirror) {
            /* catalog.schema.table: three identifiers */
            int parts = 0;
            const char *q = val;
            for (;;) {
                const char *e = strchr(q, '.');
                size_t len = e ? (size_t)(e - q) : strlen(q);
                if (!is_ident(q, len, false))
                    break;
                parts++;
                if (!e) {
                    q = NULL;
                    break;
                }
                q = e + 1;
            }
            if (q != NULL || parts != 3) {
                tp_wb_decl_free(out);
                return decl_error(err, errlen, table,
                                  "token '%s=%s': mirror is catalog.schema.table", key, val);
            }
            *slot_s = tp_xstrdup(val);
        } else {
            if (!is_ident(val, strlen(val), false)) {
                tp_wb_decl_free(out);
                return decl_error(err, errlen, table, "token '%s=%s': '%s' is not a column name",
                                  key, val, val);
            }
            *slot_s = tp_xstrdup(val);
        }
    }
    if (!out->write_roles) {
        tp_wb_decl_free(out);
        return decl_error(err, errlen, table, "roles=ROLE[,ROLE...] is required");
    }
    return 1;
}

/* ---- snapshot ---- */

static void table_free(tp_wb_table_t *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->ncols; i++) {
        free(t->cols[i].name);
        free(t->cols[i].type_sql);
        free(t->cols[i].default_sql);
    }
    free(t->cols);
    for (int i = 0; i < t->ncons; i++) {
        free(t->cons[i].name);
        free(t->cons[i].columns);
    }
    free(t->cons);
    for (int i = 0; i < TP_WB_NOPS; i++)
        free(t->sql[i]);
    free(t->pk);
    strv_free(t->write_roles);
    strv_free(t->read_roles);
    free(t->mirror);
    free(t->schema);
    free(t->name);
    free(t->qualified);
    free(t);
}

tp_wb_schema_t *tp_wb_schema_ref(tp_wb_schema_t *s)
{
    if (s)
        atomic_fetch_add(&s->refs, 1);
    return s;
}

void tp_wb_schema_unref(tp_wb_schema_t *s)
{
    if (!s)
        return;
    if (s->magic != SCHEMA_MAGIC)
        abort();
    if (atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    for (int i = 0; i < s->ntables; i++)
        table_free(s->tables[i]);
    free(s->tables);
    s->magic = 0;
    free(s);
}

const tp_wb_table_t *tp_wb_find(const tp_wb_schema_t *s, const char *name)
{
    if (!s || !name)
        return NULL;
    const tp_wb_table_t *found = NULL;
    bool dotted = strchr(name, '.') != NULL;
    for (int i = 0; i < s->ntables; i++) {
        const tp_wb_table_t *t = s->tables[i];
        if (dotted ? strcmp(t->qualified, name) == 0 : strcmp(t->name, name) == 0) {
            if (found)
                return NULL; /* bare name in two schemas: ambiguous */
            found = t;
        }
    }
    return found;
}

int tp_wb_count(const tp_wb_schema_t *s)
{
    return s ? s->ntables : 0;
}

const tp_wb_table_t *tp_wb_table_at(const tp_wb_schema_t *s, int i)
{
    return s && i >= 0 && i < s->ntables ? s->tables[i] : NULL;
}

bool tp_wb_role_allowed(const tp_wb_table_t *t, const char *role, bool write)
{
    if (!t || !role)
        return false;
    char **v = write ? t->write_roles : t->read_roles;
    for (; v && *v; v++)
        if (strcmp(*v, role) == 0)
            return true;
    /* writers may read what they write */
    return !write && tp_wb_role_allowed(t, role, true);
}

void tp_wb_json_schema(const tp_wb_table_t *t, tp_buf_t *out)
{
    tp_buf_puts(out, "{\"type\":\"object\",\"title\":");
    tp_buf_json_str(out, t->qualified);
    tp_buf_puts(out, ",\"additionalProperties\":false,\"properties\":{");
    for (int i = 0; i < t->ncols; i++) {
        const tp_wb_col_t *c = &t->cols[i];
        if (i)
            tp_buf_putc(out, ',');
        tp_buf_json_str(out, c->name);
        tp_buf_putc(out, ':');
        /* per kind: JSON type (NULL: any value) and extra keywords */
        static const struct {
            const char *type, *extra;
        } js[] = {
            [TP_WB_INT2] = {"integer", ",\"minimum\":-32768,\"maximum\":32767"},
            [TP_WB_INT4] = {"integer", ",\"minimum\":-2147483648,\"maximum\":2147483647"},
            [TP_WB_INT8] = {"integer", ",\"format\":\"int64\""},
            [TP_WB_NUMERIC] = {"number", ""},
            [TP_WB_FLOAT] = {"number", ""},
            [TP_WB_BOOL] = {"boolean", ""},
            [TP_WB_TEXT] = {"string", ""},
            [TP_WB_DATE] = {"string", ",\"format\":\"date\""},
            [TP_WB_TIMESTAMPTZ] = {"string", ",\"format\":\"date-time\""},
            [TP_WB_TIMESTAMP] = {"string", ""},
            [TP_WB_UUID] = {"string", ",\"format\":\"uuid\""},
            [TP_WB_JSON] = {NULL, ""},
            [TP_WB_OTHER] = {"string", ""},
        };
        tp_buf_putc(out, '{');
        if (js[c->kind].type)
            tp_buf_printf(out, "\"type\":[\"%s\"%s]%s,", js[c->kind].type,
                          c->not_null ? "" : ",\"null\"", js[c->kind].extra);
        if (c->kind == TP_WB_TEXT && c->max_chars >= 0)
            tp_buf_printf(out, "\"maxLength\":%d,", c->max_chars);
        tp_buf_puts(out, "\"x-postgres-type\":");
        tp_buf_json_str(out, c->type_sql);
        if (c->readonly)
            tp_buf_puts(out, ",\"readOnly\":true");
        tp_buf_putc(out, '}');
    }
    tp_buf_puts(out, "},\"required\":[");
    int n = 0;
    for (int i = 0; i < t->ncols; i++) {
        const tp_wb_col_t *c = &t->cols[i];
        if (c->not_null && !c->has_default && !c->readonly) {
            if (n++)
                tp_buf_putc(out, ',');
            tp_buf_json_str(out, c->name);
        }
    }
    tp_buf_puts(out, "]}");
}

/* ---- SQL text helpers ---- */

static void put_literal(tp_buf_t *b, const char *s)
{
    tp_buf_putc(b, '\'');
    for (; *s; s++) {
        if (*s == '\'')
            tp_buf_putc(b, '\'');
        tp_buf_putc(b, *s);
    }
    tp_buf_putc(b, '\'');
}

static void put_table(tp_buf_t *b, const tp_wb_table_t *t)
{
    tp_buf_sql_ident(b, t->schema);
    tp_buf_putc(b, '.');
    tp_buf_sql_ident(b, t->name);
}

/* The value of column c taken from the jsonb expression src (cast to its type). */
static void put_json_value(tp_buf_t *b, const tp_wb_col_t *c, const char *src)
{
    if (c->kind == TP_WB_JSON) {
        tp_buf_printf(b, "NULLIF(%s->", src);
        put_literal(b, c->name);
        tp_buf_puts(b, ", 'null'::jsonb)::");
    } else {
        tp_buf_printf(b, "(%s->>", src);
        put_literal(b, c->name);
        tp_buf_puts(b, ")::");
    }
    tp_buf_puts(b, c->type_sql);
}

/* jsonb_build_object('k1', alias."k1", ...) for the primary key. */
static void put_pk_object(tp_buf_t *b, const tp_wb_table_t *t, const char *alias)
{
    tp_buf_puts(b, "jsonb_build_object(");
    for (int i = 0; i < t->npk; i++) {
        const tp_wb_col_t *c = &t->cols[t->pk[i]];
        if (i)
            tp_buf_puts(b, ", ");
        put_literal(b, c->name);
        tp_buf_printf(b, ", %s.", alias);
        tp_buf_sql_ident(b, c->name);
    }
    tp_buf_putc(b, ')');
}

/* An RFC 9457 problem as a json_build_object expression; extra is appended inside. */
static void put_problem(tp_buf_t *b, int status, const char *code, const char *title,
                        const char *detail_expr, const char *extra)
{
    tp_buf_printf(b,
                  "json_build_object('type', 'https://tidepool.dev/problems/%s', 'title', '%s', "
                  "'status', %d, 'detail', %s, 'code', '%s'%s%s)::text",
                  code, title, status, detail_expr, code, extra ? ", " : "", extra ? extra : "");
}

/* Parameters shared by every plan:
 *   $1 actor  $2 request_id  $3 idempotency key (NULL: none)  $4 request hash
 *   $5 key ttl seconds  $6 method  $7 path  $8 items (jsonb array)  $9 single (bool)
 * The statement returns one row: status, body, etag, replayed. */
static void put_head(tp_buf_t *b)
{
    tp_buf_puts(
        b, "WITH prev AS (SELECT k.status, k.response, k.response_headers->>'ETag' AS etag, "
           "k.request_hash = $4::text AS same FROM tidepool.idempotency_keys k "
           "WHERE $3::text IS NOT NULL AND k.actor = $1::text AND k.key = $3::text "
           "AND k.expires_at > now()),\n"
           "gone AS (DELETE FROM tidepool.idempotency_keys k WHERE $3::text IS NOT NULL "
           "AND k.actor = $1::text AND k.key = $3::text AND k.expires_at <= now() RETURNING 1),\n");
}

/* src: the items with their ordinal; for UPDATE/DELETE also the typed key columns
 * k1..kn, the changes (c) and the expected version (im). */
static void put_src(tp_buf_t *b, const tp_wb_table_t *t, bool keyed)
{
    tp_buf_puts(b, "src AS (SELECT e.r, e.ord");
    if (keyed) {
        tp_buf_puts(b, ", e.r->'changes' AS c, (e.r->>'if_match')::bigint AS im");
        for (int i = 0; i < t->npk; i++) {
            tp_buf_puts(b, ", ");
            put_json_value(b, &t->cols[t->pk[i]], "e.r");
            tp_buf_printf(b, " AS k%d", i + 1);
        }
    }
    tp_buf_puts(b, " FROM jsonb_array_elements($8::jsonb) WITH ORDINALITY AS e(r, ord) "
                   "WHERE NOT EXISTS (SELECT 1 FROM prev)),\n");
}

static void put_owner_check(tp_buf_t *b, const tp_wb_table_t *t, const char *alias)
{
    if (t->owner_col < 0)
        return;
    tp_buf_printf(b, " AND %s.", alias);
    tp_buf_sql_ident(b, t->cols[t->owner_col].name);
    tp_buf_puts(b, " = $1::text");
}

/* cur: the target rows, locked in key order (no deadlocks between bulk writes),
 * with their before image and current version; bad: items that match no row or
 * whose expected version is stale. */
static void put_cur(tp_buf_t *b, const tp_wb_table_t *t)
{
    tp_buf_puts(b, "cur AS (SELECT s.ord, s.c, s.im, to_jsonb(t) AS before, t.");
    tp_buf_sql_ident(b, t->cols[t->version_col].name);
    tp_buf_puts(b, " AS ver");
    for (int i = 0; i < t->npk; i++)
        tp_buf_printf(b, ", s.k%d", i + 1);
    tp_buf_puts(b, " FROM ");
    put_table(b, t);
    tp_buf_puts(b, " t JOIN src s ON ");
    for (int i = 0; i < t->npk; i++) {
        if (i)
            tp_buf_puts(b, " AND ");
        tp_buf_puts(b, "t.");
        tp_buf_sql_ident(b, t->cols[t->pk[i]].name);
        tp_buf_printf(b, " = s.k%d", i + 1);
    }
    tp_buf_puts(b, " WHERE true");
    put_owner_check(b, t, "t");
    tp_buf_puts(b, " ORDER BY ");
    for (int i = 0; i < t->npk; i++) {
        if (i)
            tp_buf_puts(b, ", ");
        tp_buf_puts(b, "t.");
        tp_buf_sql_ident(b, t->cols[t->pk[i]].name);
    }
    tp_buf_puts(b, " FOR UPDATE OF t),\n"
                   "bad AS (SELECT s.ord, c.before, c.ver, c.ord IS NULL AS missing FROM src s "
                   "LEFT JOIN cur c ON c.ord = s.ord WHERE c.ord IS NULL "
                   "OR (s.im IS NOT NULL AND s.im <> c.ver)),\n");
}

static void put_join_cur(tp_buf_t *b, const tp_wb_table_t *t)
{
    for (int i = 0; i < t->npk; i++) {
        tp_buf_puts(b, " AND t.");
        tp_buf_sql_ident(b, t->cols[t->pk[i]].name);
        tp_buf_printf(b, " = c.k%d", i + 1);
    }
}

static void put_returning(tp_buf_t *b, const tp_wb_table_t *t, bool keyed, bool after)
{
    tp_buf_puts(b, " RETURNING ");
    tp_buf_puts(b, keyed ? "c.ord, c.before, " : "NULL::bigint AS ord, NULL::jsonb AS before, ");
    tp_buf_puts(b, after ? "to_jsonb(t) AS after, " : "NULL::jsonb AS after, ");
    tp_buf_puts(b, "t.");
    tp_buf_sql_ident(b, t->cols[t->version_col].name);
    tp_buf_puts(b, " AS ver, ");
    put_pk_object(b, t, "t");
    tp_buf_puts(b, " AS pk),\n");
}

/* audit_log and (for mirrored tables) writeback_outbox rows, from w. */
static void put_trail(tp_buf_t *b, const tp_wb_table_t *t, const char *action)
{
    tp_buf_printf(b,
                  "a AS (INSERT INTO tidepool.audit_log (actor, action, table_name, pk, before, "
                  "after, request_id) SELECT $1::text, '%s', ",
                  action);
    put_literal(b, t->qualified);
    tp_buf_puts(b, ", w.pk, w.before, w.after, $2::text FROM w ORDER BY w.ord "
                   "RETURNING id, pk, after)");
    if (t->mirror) {
        tp_buf_puts(b, ",\no AS (INSERT INTO tidepool.writeback_outbox (table_name, "
                       "warehouse_table, pk, op, row, audit_id) SELECT ");
        put_literal(b, t->qualified);
        tp_buf_puts(b, ", ");
        put_literal(b, t->mirror);
        tp_buf_printf(b, ", a.pk, '%s', a.after, a.id FROM a ORDER BY a.id)", action);
    }
    tp_buf_puts(b, ",\n");
}

/* k stores a 2xx response under the key; the final SELECT returns res or the replay.
 * k reads gone so that the expired key is deleted before k inserts it anew (an
 * unreferenced data-modifying CTE would only run after the main query). A concurrent
 * request with the same new key makes k fail with 23505 on idempotency_keys_pkey,
 * rolling back its write; tp_wb_finish then asks for a resend, which replays. */
static void put_tail(tp_buf_t *b)
{
    tp_buf_puts(
        b, "k AS (INSERT INTO tidepool.idempotency_keys (actor, key, method, path, request_hash, "
           "status, response, response_headers, expires_at) SELECT $1::text, $3::text, $6::text, "
           "$7::text, $4::text, res.status, res.body, CASE WHEN res.etag IS NULL THEN '{}'::jsonb "
           "ELSE jsonb_build_object('ETag', res.etag) END, now() + make_interval(secs => "
           "$5::integer) FROM res WHERE $3::text IS NOT NULL AND res.status < 300 "
           "AND (SELECT count(*) FROM gone) >= 0)\n"
           "SELECT status, body, etag, false AS replayed FROM res UNION ALL "
           "SELECT CASE WHEN p.same THEN p.status ELSE 409 END, CASE WHEN p.same THEN p.response "
           "ELSE ");
    put_problem(b, 409, "idempotency-key-reused", "Conflict",
                "'this Idempotency-Key was already used with a different request (method, "
                "path or body); use a new key for a new request'",
                "'errors', json_build_array(json_build_object('field', 'Idempotency-Key', "
                "'message', 'was used for a different request'))");
    tp_buf_puts(b, " END, CASE WHEN p.same THEN p.etag END, p.same FROM prev p");
}

static char *build_insert(const tp_wb_table_t *t)
{
    tp_buf_t b = {0};
    put_head(&b);
    put_src(&b, t, false);
    tp_buf_puts(&b, "w AS (INSERT INTO ");
    put_table(&b, t);
    tp_buf_puts(&b, " AS t (");
    tp_buf_t vals = {0};
    int n = 0;
    for (int i = 0; i < t->ncols; i++) {
        const tp_wb_col_t *c = &t->cols[i];
        bool pass = false;
        if (i == t->owner_col) {
            tp_buf_puts(&vals, n ? ", " : "");
            tp_buf_puts(&vals, "$1::text");
            pass = true;
        } else if (i == t->version_col) {
            tp_buf_puts(&vals, n ? ", 1" : "1");
            pass = true;
        } else if (i == t->touch_col && !c->has_default) {
            tp_buf_puts(&vals, n ? ", now()" : "now()");
            pass = true;
        } else if (!c->readonly) {
            tp_buf_puts(&vals, n ? ", CASE WHEN src.r ? " : "CASE WHEN src.r ? ");
            put_literal(&vals, c->name);
            tp_buf_puts(&vals, " THEN ");
            put_json_value(&vals, c, "src.r");
            tp_buf_puts(&vals, " ELSE ");
            tp_buf_puts(&vals, c->default_sql ? c->default_sql : "NULL");
            tp_buf_puts(&vals, " END");
            pass = true;
        }
        if (pass) {
            if (n++)
                tp_buf_puts(&b, ", ");
            tp_buf_sql_ident(&b, c->name);
        }
    }
    tp_buf_puts(&b, ") SELECT ");
    tp_buf_puts(&b, vals.data ? vals.data : "");
    tp_buf_free(&vals);
    tp_buf_puts(&b, " FROM src ORDER BY src.ord");
    put_returning(&b, t, false, true);
    put_trail(&b, t, "insert");
    tp_buf_puts(&b, "res AS (SELECT 201 AS status, CASE WHEN $9::boolean THEN (SELECT "
                    "w.after::text FROM w LIMIT 1) ELSE (SELECT jsonb_agg(w.after)::text FROM w) "
                    "END AS body, CASE WHEN $9::boolean THEN (SELECT '\"' || w.ver || '\"' FROM "
                    "w LIMIT 1) END AS etag WHERE NOT EXISTS (SELECT 1 FROM prev)),\n");
    put_tail(&b);
    return tp_buf_steal(&b);
}

/* res for UPDATE/DELETE: 200 with the rows, else 404 for missing rows, else 412 with
 * the current rows (the first problem wins; nothing was written). */
static void put_keyed_res(tp_buf_t *b)
{
    tp_buf_puts(b, "res AS (SELECT 200 AS status, CASE WHEN $9::boolean THEN (SELECT "
                   "COALESCE(w.after, w.before)::text FROM w LIMIT 1) ELSE (SELECT "
                   "jsonb_agg(COALESCE(w.after, w.before) ORDER BY w.ord)::text FROM w) END AS "
                   "body, CASE WHEN $9::boolean AND EXISTS (SELECT 1 FROM w WHERE w.after IS NOT "
                   "NULL) THEN (SELECT '\"' || w.ver || '\"' FROM w LIMIT 1) END AS etag "
                   "WHERE NOT EXISTS (SELECT 1 FROM prev) AND NOT EXISTS (SELECT 1 FROM bad)\n"
                   "UNION ALL SELECT 404, ");
    put_problem(b, 404, "row-not-found", "Not Found",
                "CASE WHEN $9::boolean THEN 'no row with this primary key' ELSE "
                "'some items match no row; nothing was written' END",
                "'errors', (SELECT json_agg(json_build_object('field', CASE WHEN $9::boolean "
                "THEN 'pk' ELSE '[' || (x.ord - 1) || ']' END, 'message', 'no such row') "
                "ORDER BY x.ord) FROM bad x WHERE x.missing)");
    tp_buf_puts(b, ", NULL WHERE EXISTS (SELECT 1 FROM bad WHERE bad.missing)\n"
                   "UNION ALL SELECT 412, ");
    put_problem(b, 412, "stale-version", "Precondition Failed",
                "CASE WHEN $9::boolean THEN 'the row changed since the version in If-Match; "
                "current holds it as it is now' ELSE 'some rows changed since their if_match "
                "version; nothing was written; current holds them as they are now' END",
                "'errors', (SELECT json_agg(json_build_object('field', CASE WHEN $9::boolean "
                "THEN 'If-Match' ELSE '[' || (x.ord - 1) || '].if_match' END, 'message', "
                "'stale: the current version is ' || x.ver) ORDER BY x.ord) FROM bad x), "
                "'current', CASE WHEN $9::boolean THEN (SELECT x.before FROM bad x LIMIT 1) "
                "ELSE (SELECT jsonb_agg(x.before ORDER BY x.ord) FROM bad x) END");
    tp_buf_puts(b, ", CASE WHEN $9::boolean THEN (SELECT '\"' || x.ver || '\"' FROM bad x "
                   "LIMIT 1) END WHERE EXISTS (SELECT 1 FROM bad) AND NOT EXISTS (SELECT 1 "
                   "FROM bad WHERE bad.missing)),\n");
}

static char *build_update(const tp_wb_table_t *t)
{
    tp_buf_t b = {0};
    put_head(&b);
    put_src(&b, t, true);
    put_cur(&b, t);
    tp_buf_puts(&b, "w AS (UPDATE ");
    put_table(&b, t);
    tp_buf_puts(&b, " AS t SET ");
    int n = 0;
    for (int i = 0; i < t->ncols; i++) {
        const tp_wb_col_t *c = &t->cols[i];
        bool changeable = !c->readonly && c->pk_pos < 0;
        if (i != t->version_col && i != t->touch_col && !changeable)
            continue;
        if (n++)
            tp_buf_puts(&b, ", ");
        tp_buf_sql_ident(&b, c->name);
        if (i == t->version_col) {
            tp_buf_puts(&b, " = t.");
            tp_buf_sql_ident(&b, c->name);
            tp_buf_puts(&b, " + 1");
        } else if (i == t->touch_col) {
            tp_buf_puts(&b, " = now()");
        } else {
            tp_buf_puts(&b, " = CASE WHEN c.c ? ");
            put_literal(&b, c->name);
            tp_buf_puts(&b, " THEN ");
            put_json_value(&b, c, "c.c");
            tp_buf_puts(&b, " ELSE t.");
            tp_buf_sql_ident(&b, c->name);
            tp_buf_puts(&b, " END");
        }
    }
    tp_buf_puts(&b, " FROM cur c WHERE NOT EXISTS (SELECT 1 FROM bad)");
    put_join_cur(&b, t);
    put_returning(&b, t, true, true);
    put_trail(&b, t, "update");
    put_keyed_res(&b);
    put_tail(&b);
    return tp_buf_steal(&b);
}

static char *build_delete(const tp_wb_table_t *t)
{
    tp_buf_t b = {0};
    put_head(&b);
    put_src(&b, t, true);
    put_cur(&b, t);
    tp_buf_puts(&b, "w AS (DELETE FROM ");
    put_table(&b, t);
    tp_buf_puts(&b, " AS t USING cur c WHERE NOT EXISTS (SELECT 1 FROM bad)");
    put_join_cur(&b, t);
    put_returning(&b, t, true, false);
    put_trail(&b, t, "delete");
    put_keyed_res(&b);
    put_tail(&b);
    return tp_buf_steal(&b);
}

/* ---- reflection ---- */

static bool fail_res(PGresult *r, char *err, size_t errlen, const char *what)
{
    snprintf(err, errlen, "reflecting writable tables (%s): %s", what,
             r ? PQresultErrorMessage(r) : "no result");
    PQclear(r);
    return false;
}

static tp_wb_kind_t kind_of(unsigned oid)
{
    switch (oid) {
    case 21:
        return TP_WB_INT2;
    case 23:
        return TP_WB_INT4;
    case 20:
        return TP_WB_INT8;
    case 1700:
        return TP_WB_NUMERIC;
    case 700:
    case 701:
        return TP_WB_FLOAT;
    case 16:
        return TP_WB_BOOL;
    case 25:
    case 1043:
    case 1042:
        return TP_WB_TEXT;
    case 1082:
        return TP_WB_DATE;
    case 1184:
        return TP_WB_TIMESTAMPTZ;
    case 1114:
        return TP_WB_TIMESTAMP;
    case 2950:
        return TP_WB_UUID;
    case 114:
    case 3802:
        return TP_WB_JSON;
    default:
        return TP_WB_OTHER;
    }
}

static int col_index(const tp_wb_table_t *t, const char *name)
{
    for (int i = 0; i < t->ncols; i++)
        if (strcmp(t->cols[i].name, name) == 0)
            return i;
    return -1;
}

static bool load_columns(PGconn *conn, tp_wb_table_t *t, const char *oid, char *err, size_t errlen)
{
    const char *q =
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
        "COALESCE(NULLIF(ty.typbasetype, 0), a.atttypid)::oid::text, a.atttypmod, "
        "a.attnotnull, a.atthasdef, pg_get_expr(d.adbin, d.adrelid), a.attidentity, "
        "a.attgenerated, COALESCE(array_position(pk.conkey, a.attnum), 0) "
        "FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "LEFT JOIN pg_constraint pk ON pk.conrelid = a.attrelid AND pk.contype = 'p' "
        "WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
    const char *pv[1] = {oid};
    PGresult *r = PQexecParams(conn, q, 1, NULL, pv, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        return fail_res(r, err, errlen, t->qualified);
    t->ncols = PQntuples(r);
    t->cols = tp_xcalloc((size_t)t->ncols + 1, sizeof *t->cols);
    t->pk = tp_xcalloc((size_t)t->ncols + 1, sizeof *t->pk);
    for (int i = 0; i < t->ncols; i++) {
        tp_wb_col_t *c = &t->cols[i];
        c->name = tp_xstrdup(PQgetvalue(r, i, 0));
        c->type_sql = tp_xstrdup(PQgetvalue(r, i, 1));
        unsigned oidv = (unsigned)strtoul(PQgetvalue(r, i, 2), NULL, 10);
        c->kind = kind_of(oidv);
        int typmod = atoi(PQgetvalue(r, i, 3));
        c->max_chars = (oidv == 1043 || oidv == 1042) && typmod > 4 ? typmod - 4 : -1;
        c->not_null = PQgetvalue(r, i, 4)[0] == 't';
        c->has_default = PQgetvalue(r, i, 5)[0] == 't';
        if (!PQgetisnull(r, i, 6))
            c->default_sql = tp_xstrdup(PQgetvalue(r, i, 6));
        char ident = PQgetvalue(r, i, 7)[0], gen = PQgetvalue(r, i, 8)[0];
        if (ident) {
            c->readonly = "identity";
            c->has_default = true;
        } else if (gen) {
            c->readonly = "generated";
            c->has_default = true;
            free(c->default_sql); /* a generated expression is no default */
            c->default_sql = NULL;
        }
        int pos = atoi(PQgetvalue(r, i, 9));
        c->pk_pos = pos - 1;
        if (pos > 0) {
            t->pk[pos - 1] = i;
            if (pos > t->npk)
                t->npk = pos;
        }
    }
    PQclear(r);
    if (t->npk == 0) {
        snprintf(err, errlen, "%s: a @writable table needs a primary key", t->qualified);
        return false;
    }
    return true;
}

static bool load_constraints(PGconn *conn, tp_wb_table_t *t, const char *oid, char *err,
                             size_t errlen)
{
    const char *q = "SELECT c.conname, c.contype, COALESCE((SELECT string_agg(a.attname, ', ' "
                    "ORDER BY k.n) FROM unnest(c.conkey) WITH ORDINALITY k(att, n) JOIN "
                    "pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att), '') "
                    "FROM pg_constraint c WHERE c.conrelid = $1::oid AND c.contype IN "
                    "('p','u','f','c','x') ORDER BY c.conname";
    const char *pv[1] = {oid};
    PGresult *r = PQexecParams(conn, q, 1, NULL, pv, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        return fail_res(r, err, errlen, t->qualified);
    t->ncons = PQntuples(r);
    t->cons = tp_xcalloc((size_t)t->ncons + 1, sizeof *t->cons);
    for (int i = 0; i < t->ncons; i++) {
        t->cons[i].name = tp_xstrdup(PQgetvalue(r, i, 0));
        t->cons[i].type = PQgetvalue(r, i, 1)[0];
        t->cons[i].columns = tp_xstrdup(PQgetvalue(r, i, 2));
    }
    PQclear(r);
    return true;
}

/* Applies the declaration's column names to the reflected columns. */
static bool apply_decl(tp_wb_table_t *t, tp_wb_decl_t *d, char *err, size_t errlen)
{
    const char *vname = d->version ? d->version : "version";
    t->version_col = col_index(t, vname);
    if (t->version_col < 0) {
        snprintf(err, errlen,
                 "%s: no version column '%s' (add \"version bigint NOT NULL DEFAULT 1\" or "
                 "name one with version=COLUMN)",
                 t->qualified, vname);
        return false;
    }
    tp_wb_col_t *v = &t->cols[t->version_col];
    if (v->kind != TP_WB_INT4 && v->kind != TP_WB_INT8) {
        snprintf(err, errlen, "%s: version column '%s' must be integer or bigint, not %s",
                 t->qualified, vname, v->type_sql);
        return false;
    }
    if (v->pk_pos >= 0 || v->readonly) {
        snprintf(err, errlen, "%s: version column '%s' cannot be a key, identity or generated",
                 t->qualified, vname);
        return false;
    }
    v->readonly = "version";
    t->owner_col = t->touch_col = -1;
    if (d->owner) {
        t->owner_col = col_index(t, d->owner);
        if (t->owner_col < 0 || t->cols[t->owner_col].kind != TP_WB_TEXT ||
            t->cols[t->owner_col].readonly || t->cols[t->owner_col].pk_pos >= 0) {
            snprintf(err, errlen, "%s: owner=%s must name a text column outside the key",
                     t->qualified, d->owner);
            return false;
        }
        t->cols[t->owner_col].readonly = "owner";
    }
    if (d->touch) {
        t->touch_col = col_index(t, d->touch);
        if (t->touch_col < 0 ||
            (t->cols[t->touch_col].kind != TP_WB_TIMESTAMPTZ &&
             t->cols[t->touch_col].kind != TP_WB_TIMESTAMP) ||
            t->cols[t->touch_col].readonly || t->cols[t->touch_col].pk_pos >= 0) {
            snprintf(err, errlen, "%s: touch=%s must name a timestamp column outside the key",
                     t->qualified, d->touch);
            return false;
        }
        t->cols[t->touch_col].readonly = "touch";
    }
    for (char **p = d->readonly; p && *p; p++) {
        int i = col_index(t, *p);
        if (i < 0) {
            snprintf(err, errlen, "%s: readonly=%s: no such column", t->qualified, *p);
            return false;
        }
        if (!t->cols[i].readonly)
            t->cols[i].readonly = "readonly";
    }
    for (int i = 0; i < t->npk; i++) {
        const char *n = t->cols[t->pk[i]].name;
        if (strcmp(n, "changes") == 0 || strcmp(n, "if_match") == 0) {
            snprintf(err, errlen, "%s: key column '%s' clashes with the bulk PATCH item fields",
                     t->qualified, n);
            return false;
        }
    }
    t->write_roles = d->write_roles;
    t->read_roles = d->read_roles ? d->read_roles : tp_xcalloc(1, sizeof(char *));
    t->mirror = d->mirror;
    t->if_match_required = d->if_match_required;
    d->write_roles = d->read_roles = NULL;
    d->mirror = NULL;
    return true;
}

tp_wb_schema_t *tp_wb_reflect(PGconn *conn, char *err, size_t errlen)
{
    tp_wb_schema_t *s = tp_xcalloc(1, sizeof *s);
    s->magic = SCHEMA_MAGIC;
    atomic_init(&s->refs, 1);
    PGresult *r = PQexec(conn, "SELECT c.oid::text, n.nspname, c.relname, "
                               "obj_description(c.oid, 'pg_class') FROM pg_class c JOIN "
                               "pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN "
                               "('r','p') AND obj_description(c.oid, 'pg_class') LIKE "
                               "'%@writable%' ORDER BY n.nspname, c.relname");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fail_res(r, err, errlen, "tables");
        tp_wb_schema_unref(s);
        return NULL;
    }
    int n = PQntuples(r);
    s->tables = tp_xcalloc((size_t)n + 1, sizeof *s->tables);
    for (int i = 0; i < n; i++) {
        char *qualified = tp_xasprintf("%s.%s", PQgetvalue(r, i, 1), PQgetvalue(r, i, 2));
        tp_wb_decl_t d;
        int rc = tp_wb_parse_comment(qualified, PQgetvalue(r, i, 3), &d, err, errlen);
        if (rc == 0) { /* "@writable" only inside a word: not a declaration */
            free(qualified);
            continue;
        }
        if (rc < 0) {
            free(qualified);
            goto fail;
        }
        tp_wb_table_t *t = tp_xcalloc(1, sizeof *t);
        t->magic = TP_WB_TABLE_MAGIC;
        t->schema = tp_xstrdup(PQgetvalue(r, i, 1));
        t->name = tp_xstrdup(PQgetvalue(r, i, 2));
        t->qualified = qualified;
        s->tables[s->ntables++] = t;
        bool ok = load_columns(conn, t, PQgetvalue(r, i, 0), err, errlen) &&
                  load_constraints(conn, t, PQgetvalue(r, i, 0), err, errlen) &&
                  apply_decl(t, &d, err, errlen);
        tp_wb_decl_free(&d);
        if (!ok)
            goto fail;
        t->sql[TP_WB_INSERT] = build_insert(t);
        t->sql[TP_WB_UPDATE] = build_update(t);
        t->sql[TP_WB_DELETE] = build_delete(t);
    }
    PQclear(r);
    return s;
fail:
    PQclear(r);
    tp_wb_schema_unref(s);
    return NULL;
}
