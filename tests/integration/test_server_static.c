/* tidepool-server's static files (server/static.c) over real HTTP: GET / is the
 * real demo page (web/index.html) with the elements app.js needs, /web/app.js
 * and /web/style.css carry their content types, ETag / If-None-Match gives 304,
 * HEAD has no body, vendor files come from web_vendor with a long cache life,
 * `..` (plain and percent-encoded) is refused, symlinks that leave the root and
 * dotfiles are not served, a missing file is a 404 problem naming the path,
 * other methods are 405, the API routes still answer, and a server whose
 * web_root does not exist says so in its 404 and in --check. */
#include "server_harness.h"

static srv_h_t S;
static const char *DSN;
static char ROOT[600], VENDOR[600], OUTSIDE[600];
static char *g_index, *g_appjs; /* the real files, as on disk */

static void put(const char *dir, const char *name, const char *text)
{
    char p[800];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void link_to(const char *target, const char *dir, const char *name)
{
    char p[800];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    CHECK_MSG(symlink(target, p) == 0, "symlink %s", p);
}

/* A web root holding the real page files, plus traps: symlinks out of the
 * root (file and directory), a dotfile, a vendor folder that web_vendor
 * replaces, and an in-root symlink (allowed). */
static bool make_tree(void)
{
    const char *src = getenv("TP_ROOT") ? getenv("TP_ROOT") : ".";
    char p[700];
    snprintf(ROOT, sizeof ROOT, "%s/webroot", tp_test_tmpdir());
    snprintf(VENDOR, sizeof VENDOR, "%s/vendor-dl", tp_test_tmpdir());
    snprintf(OUTSIDE, sizeof OUTSIDE, "%s/outside", tp_test_tmpdir());
    mkdir(ROOT, 0755);
    mkdir(VENDOR, 0755);
    mkdir(OUTSIDE, 0755);
    const char *files[] = {"index.html", "app.js", "style.css"};
    for (size_t i = 0; i < TP_ARRAY_LEN(files); i++) {
        snprintf(p, sizeof p, "%s/web/%s", src, files[i]);
        char *text = tp_read_file(p, NULL);
        CHECK_MSG(text != NULL, "cannot read %s", p);
        if (!text)
            return false;
        put(ROOT, files[i], text);
        if (i == 0)
            g_index = text;
        else if (i == 1)
            g_appjs = text;
        else
            free(text);
    }
    put(OUTSIDE, "secret.txt", "TOP-SECRET-OUTSIDE\n");
    snprintf(p, sizeof p, "%s/secret.txt", OUTSIDE);
    link_to(p, ROOT, "escape.txt");
    link_to(OUTSIDE, ROOT, "linkdir");
    link_to("../outside/secret.txt", ROOT, "relescape.txt");
    link_to("style.css", ROOT, "alias.css");
    put(ROOT, ".hidden", "dotfile\n");
    snprintf(p, sizeof p, "%s/sub", ROOT);
    mkdir(p, 0755);
    put(p, "inner.txt", "inner\n");
    snprintf(p, sizeof p, "%s/vendor", ROOT);
    mkdir(p, 0755);
    put(p, "shadowed.js", "/* not served: web_vendor replaces this folder */\n");
    put(VENDOR, "plotly.min.js", "window.Plotly = {fake: true};\n");
    return true;
}

static void page_is_served(void)
{
    resp_t r = get(&S, "/");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/html; charset=utf-8");
    CHECK_STR_EQ(hdr(&r, "Cache-Control"), "no-cache");
    CHECK_STR_EQ(hdr(&r, "X-Content-Type-Options"), "nosniff");
    const char *csp = hdr(&r, "Content-Security-Policy");
    CHECK(csp && strstr(csp, "default-src 'self'") && !strstr(csp, "script-src"));
    CHECK(g_index && r.len == strlen(g_index) && memcmp(r.body, g_index, r.len) == 0);
    /* The elements app.js binds to, and its two scripts (local Plotly only). */
    const char *want[] = {"id=\"user\"", "id=\"since\"", "id=\"until\"", "id=\"freshness\"",
                          "id=\"steps-chart\"", "id=\"calories-chart\"",
                          "id=\"risk-weight-chart\"", "id=\"risk-cholesterol-chart\"",
                          "id=\"note-form\"", "id=\"note\"", "id=\"write-result\"",
                          "id=\"notes-list\"", "src=\"/web/vendor/plotly.min.js\"",
                          "src=\"/web/app.js\""};
    for (size_t i = 0; i < TP_ARRAY_LEN(want); i++)
        CHECK_MSG(strstr(r.body, want[i]) != NULL, "page lacks %s", want[i]);
    CHECK(strstr(r.body, "http://") == NULL && strstr(r.body, "https://") == NULL);
    resp_free(&r);
    r = get(&S, "/web/index.html"); /* the same file under /web/ */
    CHECK_INT_EQ(r.status, 200);
    CHECK(g_index && r.len == strlen(g_index));
    resp_free(&r);
}

static void scripts_and_styles_have_types(void)
{
    resp_t r = get(&S, "/web/app.js");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/javascript; charset=utf-8");
    CHECK(g_appjs && r.len == strlen(g_appjs) && memcmp(r.body, g_appjs, r.len) == 0);
    /* The API calls the page makes. */
    CHECK(strstr(r.body, "/api/v1/datasets/daily_metrics?") != NULL);
    CHECK(strstr(r.body, "'Idempotency-Key'") != NULL);
    resp_free(&r);
    r = get(&S, "/web/style.css");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/css; charset=utf-8");
    resp_free(&r);
    r = get(&S, "/web/sub/inner.txt");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/plain; charset=utf-8");
    CHECK_STR_EQ(r.body, "inner\n");
    resp_free(&r);
    r = get(&S, "/web/alias.css"); /* a symlink that stays inside the root */
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/css; charset=utf-8");
    resp_free(&r);
}

static void etag_gives_304(void)
{
    resp_t r = get(&S, "/web/app.js");
    char etag[64];
    snprintf(etag, sizeof etag, "%s", hdr(&r, "ETag") ? hdr(&r, "ETag") : "");
    CHECK(strlen(etag) == 18 && etag[0] == '"');
    resp_free(&r);
    char inm[128];
    snprintf(inm, sizeof inm, "If-None-Match: %s", etag);
    const char *h1[] = {inm, NULL};
    r = http(&S, "GET", "/web/app.js", h1, NULL, 0);
    CHECK_INT_EQ(r.status, 304);
    CHECK_INT_EQ(r.len, 0);
    CHECK_STR_EQ(hdr(&r, "ETag"), etag);
    resp_free(&r);
    const char *h2[] = {"If-None-Match: \"0000000000000000\"", NULL};
    r = http(&S, "GET", "/web/app.js", h2, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK(r.len > 0);
    resp_free(&r);
    r = http(&S, "HEAD", "/", NULL, NULL, 0);
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(r.len, 0);
    CHECK(hdr(&r, "ETag") != NULL);
    resp_free(&r);
    /* Different files, different tags. */
    r = get(&S, "/");
    CHECK(hdr(&r, "ETag") && strcmp(hdr(&r, "ETag"), etag) != 0);
    resp_free(&r);
}

static void vendor_files_come_from_web_vendor(void)
{
    resp_t r = get(&S, "/web/vendor/plotly.min.js");
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(r.body, "window.Plotly = {fake: true};\n");
    CHECK_STR_EQ(hdr(&r, "Content-Type"), "text/javascript; charset=utf-8");
    CHECK_STR_EQ(hdr(&r, "Cache-Control"), "public, max-age=86400");
    resp_free(&r);
    r = get(&S, "/web/vendor/shadowed.js");
    CHECK_PROBLEM(r, 404, "path");
    resp_free(&r);
}

static void traversal_is_refused(void)
{
    const char *paths[] = {"/web/../../outside/secret.txt", "/web/%2e%2e/outside/secret.txt",
                           "/web/%2E%2E%2Foutside%2Fsecret.txt", "/web/sub/../index.html",
                           "/web/./app.js", "/web/..%2f..%2foutside/secret.txt",
                           "/web/%252e%252e/outside/secret.txt"};
    for (size_t i = 0; i < TP_ARRAY_LEN(paths); i++) {
        resp_t r = get(&S, paths[i]);
        /* Dot segments are 400 at the router; a double-encoded one names no file. */
        CHECK_MSG(r.status == (i == TP_ARRAY_LEN(paths) - 1 ? 404 : 400), "%s: %ld", paths[i],
                  r.status);
        CHECK_STR_EQ(hdr(&r, "Content-Type"), "application/problem+json");
        CHECK(strstr(r.body, "TOP-SECRET") == NULL);
        resp_free(&r);
    }
}

static void symlink_escape_and_dotfiles_are_not_served(void)
{
    const char *paths[] = {"/web/escape.txt", "/web/relescape.txt", "/web/linkdir/secret.txt",
                           "/web/.hidden"};
    for (size_t i = 0; i < TP_ARRAY_LEN(paths); i++) {
        resp_t r = get(&S, paths[i]);
        CHECK_MSG(r.status == 404, "%s: %ld", paths[i], r.status);
        CHECK_PROBLEM(r, 404, "path");
        CHECK(strstr(r.body, "TOP-SECRET") == NULL);
        resp_free(&r);
    }
    /* The load said why, once per escaping entry. */
    char *log = tp_read_file(S.log, NULL);
    CHECK(log && strstr(log, "escape.txt: it resolves outside") != NULL);
    CHECK(log && strstr(log, "linkdir: it resolves outside") != NULL);
    free(log);
}

static void missing_file_and_wrong_method(void)
{
    resp_t r = get(&S, "/web/nope.js");
    CHECK_PROBLEM(r, 404, "path");
    CHECK(strstr(json_string_value(json_object_get(r.json, "detail")), "/web/nope.js") != NULL);
    resp_free(&r);
    r = http(&S, "POST", "/", NULL, "x", 1);
    CHECK_PROBLEM(r, 405, NULL);
    CHECK_STR_EQ(hdr(&r, "Allow"), "GET, HEAD");
    resp_free(&r);
    /* Paths outside / and /web/ are still the router's. */
    r = get(&S, "/webx");
    CHECK_PROBLEM(r, 404, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "unknown-route");
    resp_free(&r);
    r = get(&S, "/api/v1/datasets/daily_metrics?user_id=3&shape=columns");
    CHECK_INT_EQ(r.status, 200);
    CHECK(json_is_array(json_object_get(r.json, "day")));
    resp_free(&r);
}

/* A server whose web_root is missing still starts, says why in the 404 and in
 * --check. */
static void missing_root_is_explained(void)
{
    CHECK_INT_EQ(tp_test_stop(S.pid, 15000), 0);
    char extra[900];
    snprintf(extra, sizeof extra, "web_root = %s/no-such-dir\n", tp_test_tmpdir());
    S.extra_conf = extra;
    S.pid = -1;
    CHECK(harness_start(&S, DSN, 1) && harness_ready(&S));
    resp_t r = get(&S, "/");
    CHECK_PROBLEM(r, 404, "path");
    const char *d = json_string_value(json_object_get(r.json, "detail"));
    CHECK(d && strstr(d, "not installed") && strstr(d, "no-such-dir is not a directory"));
    resp_free(&r);
    char *cmd = tp_xasprintf("%s --config %s --check", tp_test_bin("tidepool-server"), S.conf);
    char *out = NULL;
    int st = tp_test_cmd(cmd, &out);
    CHECK_INT_EQ(st, 0);
    CHECK(out && strstr(out, "web: ") && strstr(out, "(0 files, 0 bytes)"));
    free(out);
    free(cmd);
}

int main(void)
{
    if (!make_tree())
        return tp_test_done();
    char extra[1400];
    snprintf(extra, sizeof extra, "web_root = %s\nweb_vendor = %s\n", ROOT, VENDOR);
    S.extra_conf = extra;
    if (harness_setup(&S, "test_server_static", &DSN, 2)) {
        TP_RUN(page_is_served);
        TP_RUN(scripts_and_styles_have_types);
        TP_RUN(etag_gives_304);
        TP_RUN(vendor_files_come_from_web_vendor);
        TP_RUN(traversal_is_refused);
        TP_RUN(symlink_escape_and_dotfiles_are_not_served);
        TP_RUN(missing_file_and_wrong_method);
        TP_RUN(missing_root_is_explained);
    }
    harness_finish(&S);
    free(g_index);
    free(g_appjs);
    return tp_test_done();
}
