/* Table reads: GET /api/v1/tables/{schema.table}.
 *
 * Exposure: a table (or view) is readable when its Postgres COMMENT contains
 * "@expose", optionally followed by KEY=VALUE options (no spaces in a value):
 * max_limit=N, roles=R[,R] (the read roles: any one of them; none = any
 * authenticated caller) and owner=COLUMN (row-level scoping: only rows whose
 * text COLUMN equals the caller's identity, as an extra bound WHERE term).
 * An option that does not parse keeps the table unexposed (logged), so a typo
 * never widens access. The status thread reflects such tables and their
 * columns from pg_catalog with a blocking connection (never on a loop) at
 * start and after SIGHUP. Requests use the PostgREST-like grammar of DESIGN
 * §8: col=op.value (eq neq gt gte lt lte in like is), select=,
 * order=col[.asc|.desc], limit (default and maximum: max_limit, else
 * server.table_max_limit, default 1000), offset. Every column and operator
 * is checked against the reflected schema, values are checked against the
 * column's type and bound as $n; identifiers are quoted; nothing a client
 * sends reaches SQL text. */
#include "server.h"

#include <stdio.h>
#include <string.h>

#include "tidepool/log.h"
#include "tidepool/pg.h"

static const tcol_t *col_find(const ttable_t *t, const char *name, size_t n);
static void table_free(ttable_t *x);

/* Parses the options after "@expose" in comment into t (whose columns are
 * all reflected). False with why (for the log) on anything it does not know. */
static bool expose_options(ttable_t *t, const char *comment, char *why, size_t whylen)
{
    const char *p = strstr(comment, "@expose");
    p += strlen("@expose");
    t->max_limit = atomic_load(&g_srv.table_max_limit);
    while (true) {
        p += strspn(p, " \t\r\n");
        size_t n = strcspn(p, " \t\r\n");
        const char *eq = memchr(p, '=', n);
        if (n == 0 || !eq)
            return true; /* the options end at the first word without '=' */
        size_t klen = (size_t)(eq - p);
        char *val = tp_xstrndup(eq + 1, n - klen - 1);
        bool ok = true;
        int64_t v;
        if (klen == 9 && strncmp(p, "max_limit", 9) == 0) {
            ok = tp_parse_int64(val, 1, 1000000, &v);
            if (ok)
                t->max_limit = v;
            else
                snprintf(why, whylen, "max_limit=%.40s is not an integer from 1 to 1000000", val);
        } else if (klen == 5 && strncmp(p, "roles", 5) == 0) {
            char rerr[160];
            tp_auth_strv_free(t->roles);
            t->roles = NULL;
            ok = tp_auth_roles_parse(val, &t->roles, rerr, sizeof rerr);
            if (!ok)
                snprintf(why, whylen, "roles=: %s", rerr);
        } else if (klen == 5 && strncmp(p, "owner", 5) == 0) {
            t->owner = col_find(t, val, strlen(val));
            static const char *const text_types[] = {"text", "character varying", "character",
                                                     "citext", "name"};
            bool texty = false;
            for (size_t i = 0; t->owner && i < TP_ARRAY_LEN(text_types); i++)
                texty |= strncmp(t->owner->type, text_types[i], strlen(text_types[i])) == 0;
            ok = t->owner && texty;
            if (!ok)
                snprintf(why, whylen, "owner=%.64s is not a text column of the table", val);
        } else {
            ok = false;
            snprintf(why, whylen, "unknown option %.*s (max_limit, roles, owner)",
                     (int)(klen > 40 ? 40 : klen), p);
        }
        free(val);
        if (!ok)
            return false;
        p += n;
    }
}

tables_t *tables_reflect(const char *dsn, char *err, size_t errlen)
{
    PGconn *c = srv_pg_connect(dsn, 3000, err, errlen);
    if (!c)
        return NULL;
    static const char *q =
        "SELECT n.nspname, c.relname, obj_description(c.oid, 'pg_class'), a.attname, "
        "format_type(a.atttypid, a.atttypmod), a.atttypid "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relkind IN ('r','v','m','p','f') "
        "AND obj_description(c.oid, 'pg_class') LIKE '%@expose%' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "ORDER BY n.nspname, c.relname, a.attnum";
    PGresult *res = tp_pg_query(c, q, 0, NULL, err, errlen);
    PQfinish(c);
    if (!res)
        return NULL;
    tables_t *t = tp_xcalloc(1, sizeof *t);
    atomic_init(&t->refs, 1);
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        const char *sch = PQgetvalue(res, i, 0), *rel = PQgetvalue(res, i, 1);
        ttable_t *cur = t->n ? &t->t[t->n - 1] : NULL;
        if (!cur || strcmp(cur->schema, sch) != 0 || strcmp(cur->table, rel) != 0) {
            t->t = tp_xrealloc(t->t, (t->n + 1) * sizeof *t->t);
            cur = &t->t[t->n++];
            memset(cur, 0, sizeof *cur);
            cur->schema = tp_xstrdup(sch);
            cur->table = tp_xstrdup(rel);
            cur->name = tp_xasprintf("%s.%s", sch, rel);
        }
        cur->cols = tp_xrealloc(cur->cols, (cur->ncols + 1) * sizeof *cur->cols);
        tcol_t *col = &cur->cols[cur->ncols++];
        col->name = tp_xstrdup(PQgetvalue(res, i, 3));
        col->type = tp_xstrdup(PQgetvalue(res, i, 4));
        col->oid = (unsigned)strtoul(PQgetvalue(res, i, 5), NULL, 10);
        bool last = i + 1 == n || strcmp(PQgetvalue(res, i + 1, 0), sch) != 0 ||
                    strcmp(PQgetvalue(res, i + 1, 1), rel) != 0;
        char why[200] = "";
        if (last && !expose_options(cur, PQgetvalue(res, i, 2), why, sizeof why)) {
            const char *kv[] = {"table", cur->name, "problem", why, NULL};
            tp_logkv(TP_LOG_ERROR, kv, "@expose comment rejected: the table stays unexposed");
            table_free(cur);
            t->n--;
        }
    }
    PQclear(res);
    return t;
}

static void table_free(ttable_t *x)
{
    for (size_t j = 0; j < x->ncols; j++) {
        free(x->cols[j].name);
        free(x->cols[j].type);
    }
    free(x->cols);
    free(x->name);
    free(x->schema);
    free(x->table);
    tp_auth_strv_free(x->roles);
}

void tables_release(tables_t *t)
{
    if (!t || atomic_fetch_sub(&t->refs, 1) != 1)
        return;
    for (size_t i = 0; i < t->n; i++)
        table_free(&t->t[i]);
    free(t->t);
    free(t);
}

const ttable_t *tables_find(const tables_t *t, const char *name)
{
    const ttable_t *bare = NULL;
    int nbare = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (strcmp(t->t[i].name, name) == 0)
            return &t->t[i];
        if (strcmp(t->t[i].table, name) == 0) {
            bare = &t->t[i];
            nbare++;
        }
    }
    return nbare == 1 ? bare : NULL;
}

static const tcol_t *col_find(const ttable_t *t, const char *name, size_t n)
{
    for (size_t i = 0; i < t->ncols; i++)
        if (strlen(t->cols[i].name) == n && strncmp(t->cols[i].name, name, n) == 0)
            return &t->cols[i];
    return NULL;
}

/* The defs value type that validates a column's values (STRING: no check). */
static tp_defs_type_t col_vtype(const tcol_t *c)
{
    switch (c->oid) {
    case 21: case 23: return TP_DEFS_INT;
    case 20: return TP_DEFS_BIGINT;
    case 700: case 701: return TP_DEFS_DOUBLE;
    case 1700: return TP_DEFS_DECIMAL;
    case 16: return TP_DEFS_BOOLEAN;
    case 1082: return TP_DEFS_DATE;
    case 1114: case 1184: return TP_DEFS_TIMESTAMP;
    default: return TP_DEFS_STRING;
    }
}

static void bind_value(rq_t *r, tp_buf_t *sql, const char *v)
{
    r->vals = tp_xrealloc(r->vals, (size_t)(r->nvals + 1) * sizeof *r->vals);
    r->vals[r->nvals++] = tp_xstrdup(v);
    tp_buf_printf(sql, "$%d", r->nvals);
}

/* Checks v against the column type; sends 422 naming field on failure. */
static bool check_value(rq_t *r, const tcol_t *c, const char *field, const char *v,
                        const char **canon_out, tp_defs_value_t *tmp)
{
    tp_defs_type_t t = col_vtype(c);
    const char *why = NULL;
    if (!tp_defs_value_parse(t, v, tmp, &why)) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "%s: value for column %s %s", field, c->name, why);
        rq_problem(r, 422, "invalid-value", d.data, field, why, 0);
        tp_buf_free(&d);
        return false;
    }
    *canon_out = tp_defs_value_text(tmp, v);
    return true;
}

/* in.(a,b,"c,d") -> Postgres array literal {"a","b","c,d"}; false if malformed. */
static bool in_list(rq_t *r, const tcol_t *c, const char *field, const char *v, tp_buf_t *arr)
{
    size_t n = strlen(v);
    if (n < 2 || v[0] != '(' || v[n - 1] != ')') {
        rq_problem(r, 400, "invalid-filter", "in takes a list: in.(a,b,c)", field,
                   "must be in.(value,...)", 0);
        return false;
    }
    tp_buf_putc(arr, '{');
    const char *p = v + 1, *end = v + n - 1;
    int count = 0;
    while (p <= end) {
        tp_buf_t item = {0};
        if (p < end && *p == '"') {
            p++;
            while (p < end && *p != '"') {
                if (*p == '\\' && p + 1 < end)
                    p++;
                tp_buf_putc(&item, *p++);
            }
            p++; /* closing quote */
        } else {
            while (p < end && *p != ',')
                tp_buf_putc(&item, *p++);
        }
        const char *canon;
        tp_defs_value_t tmp;
        bool ok = check_value(r, c, field, item.data ? item.data : "", &canon, &tmp);
        if (ok) {
            if (count++)
                tp_buf_putc(arr, ',');
            tp_buf_putc(arr, '"');
            for (const char *s = canon; *s; s++) {
                if (*s == '"' || *s == '\\')
                    tp_buf_putc(arr, '\\');
                tp_buf_putc(arr, *s);
            }
            tp_buf_putc(arr, '"');
        }
        tp_buf_free(&item);
        if (!ok)
            return false;
        if (p < end && *p != ',') {
            rq_problem(r, 400, "invalid-filter", "in list items are separated by commas", field,
                       "must be in.(value,...)", 0);
            return false;
        }
        p++;
    }
    tp_buf_putc(arr, '}');
    return true;
}

static const struct {
    const char *name, *sql;
} ops[] = {{"eq", "="}, {"neq", "<>"}, {"gt", ">"}, {"gte", ">="}, {"lt", "<"}, {"lte", "<="}};

static bool add_filter(rq_t *r, const ttable_t *t, const char *field, const char *val,
                       tp_buf_t *where)
{
    const tcol_t *c = col_find(t, field, strlen(field));
    if (!c) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "%s is neither a column of %s nor a known parameter", field, t->name);
        rq_problem(r, 400, "unknown-column", d.data, field, "unknown column", 0);
        tp_buf_free(&d);
        return false;
    }
    const char *dot = strchr(val, '.');
    size_t oplen = dot ? (size_t)(dot - val) : strlen(val);
    const char *arg = dot ? dot + 1 : "";
    tp_buf_puts(where, where->len ? " AND " : " WHERE ");
    for (size_t i = 0; i < TP_ARRAY_LEN(ops); i++) {
        if (strlen(ops[i].name) != oplen || strncmp(ops[i].name, val, oplen) != 0)
            continue;
        const char *canon;
        tp_defs_value_t tmp;
        if (!check_value(r, c, field, arg, &canon, &tmp))
            return false;
        tp_buf_sql_ident(where, c->name);
        tp_buf_printf(where, " %s ", ops[i].sql);
        bind_value(r, where, canon);
        return true;
    }
    if (oplen == 2 && strncmp(val, "in", 2) == 0) {
        tp_buf_t arr = {0};
        if (!in_list(r, c, field, arg, &arr)) {
            tp_buf_free(&arr);
            return false;
        }
        tp_buf_sql_ident(where, c->name);
        tp_buf_puts(where, " = ANY(");
        bind_value(r, where, arr.data);
        tp_buf_putc(where, ')');
        tp_buf_free(&arr);
        return true;
    }
    if (oplen == 4 && strncmp(val, "like", 4) == 0) {
        char *pat = tp_xstrdup(arg);
        for (char *s = pat; *s; s++)
            if (*s == '*')
                *s = '%';
        tp_buf_sql_ident(where, c->name);
        tp_buf_puts(where, "::text LIKE ");
        bind_value(r, where, pat);
        free(pat);
        return true;
    }
    if (oplen == 2 && strncmp(val, "is", 2) == 0) {
        static const struct {
            const char *v, *sql;
        } iss[] = {{"null", " IS NULL"}, {"not_null", " IS NOT NULL"}, {"true", " IS TRUE"},
                   {"false", " IS FALSE"}, {"unknown", " IS UNKNOWN"}};
        for (size_t i = 0; i < TP_ARRAY_LEN(iss); i++)
            if (strcmp(arg, iss[i].v) == 0) {
                tp_buf_sql_ident(where, c->name);
                tp_buf_puts(where, iss[i].sql);
                return true;
            }
        rq_problem(r, 400, "invalid-filter", "is takes null, not_null, true, false or unknown",
                   field, "must be is.null|not_null|true|false|unknown", 0);
        return false;
    }
    tp_buf_t d = {0};
    tp_buf_printf(&d, "%s: unknown operator; use col=op.value with op one of eq neq gt gte lt lte in like is",
                  field);
    rq_problem(r, 400, "unknown-operator", d.data, field, "unknown operator", 0);
    tp_buf_free(&d);
    return false;
}

/* Comma-separated list of columns from spec into out (quoted); order=true
 * accepts .asc/.desc suffixes. */
static bool col_list(rq_t *r, const ttable_t *t, const char *field, const char *spec, bool order,
                     tp_buf_t *out)
{
    const char *p = spec;
    int n = 0;
    while (true) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        const char *dot = order ? memchr(p, '.', len) : NULL;
        size_t clen = dot ? (size_t)(dot - p) : len;
        const tcol_t *c = col_find(t, p, clen);
        const char *dir = "";
        if (dot) {
            size_t dl = len - clen - 1;
            if (dl == 3 && strncmp(dot + 1, "asc", 3) == 0)
                dir = " ASC";
            else if (dl == 4 && strncmp(dot + 1, "desc", 4) == 0)
                dir = " DESC";
            else
                c = NULL;
        }
        if (!c) {
            tp_buf_t d = {0};
            tp_buf_printf(&d, "%s: \"%.*s\" is not %s of %s", field, (int)(len > 64 ? 64 : len), p,
                          order ? "col.asc or col.desc with a column" : "a column", t->name);
            rq_problem(r, 400, "unknown-column", d.data, field, "unknown column", 0);
            tp_buf_free(&d);
            return false;
        }
        if (n++)
            tp_buf_puts(out, ", ");
        tp_buf_sql_ident(out, c->name);
        tp_buf_puts(out, dir);
        if (!comma)
            return true;
        p = comma + 1;
    }
}

static void table_done(PGresult *res, const char *err, void *arg);
static void table_gone(rq_t *r);

void h_table(rq_t *r, const char *name)
{
    const ttable_t *t = tables_find(r->tables, name);
    if (!t) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "no exposed table is called %s", name);
        rq_problem(r, 404, "unknown-table", d.data, NULL, NULL, 0);
        tp_buf_free(&d);
        return;
    }
    r->tbl = t;
    if (!rq_require(r, (const char *const *)t->roles))
        return;
    tp_buf_t sql = {0}, where = {0}, order = {0}, sel = {0};
    int64_t limit = t->max_limit, offset = 0;
    bool ok = true;
    const char *v;
    if ((v = rq_q(r, "select")) != NULL)
        ok = col_list(r, t, "select", v, false, &sel);
    if (ok && (v = rq_q(r, "order")) != NULL)
        ok = col_list(r, t, "order", v, true, &order);
    if (ok && (v = rq_q(r, "limit")) != NULL && !tp_parse_int64(v, 0, t->max_limit, &limit)) {
        tp_buf_t d = {0};
        tp_buf_printf(&d, "limit must be an integer from 0 to %lld", (long long)t->max_limit);
        rq_problem(r, 400, "invalid-limit", d.data, "limit", d.data, 0);
        tp_buf_free(&d);
        ok = false;
    }
    if (ok && (v = rq_q(r, "offset")) != NULL && !tp_parse_int64(v, 0, INT64_MAX / 2, &offset)) {
        rq_problem(r, 400, "invalid-offset", "offset must be a non-negative integer", "offset",
                   "must be a non-negative integer", 0);
        ok = false;
    }
    for (size_t i = 0; ok && i < r->nq; i++) {
        if (r->q[i].used)
            continue;
        ok = add_filter(r, t, r->q[i].key, r->q[i].val, &where);
    }
    if (ok && t->owner) { /* row-level scoping: in the SQL, bound like any value */
        tp_buf_puts(&where, where.len ? " AND " : " WHERE ");
        tp_buf_sql_ident(&where, t->owner->name);
        tp_buf_puts(&where, " = ");
        bind_value(r, &where, r->auth.principal->id);
    }
    if (ok) {
        tp_buf_puts(&sql, "SELECT ");
        if (sel.len) {
            tp_buf_append(&sql, sel.data, sel.len);
        } else {
            for (size_t i = 0; i < t->ncols; i++) {
                if (i)
                    tp_buf_puts(&sql, ", ");
                tp_buf_sql_ident(&sql, t->cols[i].name);
            }
        }
        tp_buf_puts(&sql, " FROM ");
        tp_buf_sql_ident(&sql, t->schema);
        tp_buf_putc(&sql, '.');
        tp_buf_sql_ident(&sql, t->table);
        if (where.len)
            tp_buf_append(&sql, where.data, where.len);
        if (order.len) {
            tp_buf_puts(&sql, " ORDER BY ");
            tp_buf_append(&sql, order.data, order.len);
        }
        char num[32];
        snprintf(num, sizeof num, "%lld", (long long)limit);
        tp_buf_puts(&sql, " LIMIT ");
        bind_value(r, &sql, num);
        snprintf(num, sizeof num, "%lld", (long long)offset);
        tp_buf_puts(&sql, " OFFSET ");
        bind_value(r, &sql, num);
        r->sql = tp_buf_steal(&sql);
    }
    tp_buf_free(&sql);
    tp_buf_free(&where);
    tp_buf_free(&order);
    tp_buf_free(&sel);
    if (!ok)
        return;
    tp_pg_submit_t s = tp_pgpool_query(r->w->pool, r->sql, r->nvals, NULL, (const char *const *)r->vals,
                                       table_done, r, &r->pgh);
    if (s != TP_PG_QUEUED)
        rq_pool_refused(r, s);
    else
        rq_watch_gone(r, table_gone);
}

/* The client left: cancel its statement; table_done still answers (499). */
static void table_gone(rq_t *r)
{
    tp_pgpool_abort(r->pgh);
}

static void table_done(PGresult *res, const char *err, void *arg)
{
    rq_t *r = arg;
    if (r->magic != RQ_MAGIC)
        abort();
    r->pgh = NULL;
    if (err) {
        rq_pg_error(r, res, err);
        return;
    }
    tp_buf_t b = {0};
    encode_result(res, r->fmt, &b);
    send_body(r, b.data, b.len, fmt_ctype(r->fmt), "postgres");
    tp_buf_free(&b);
}
