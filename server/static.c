/* Static files of the demo dashboard page: GET / is web_root/index.html and
 * GET /web/FILE is web_root/FILE; /web/vendor/FILE comes from web_vendor when
 * that is set (third-party browser code fetched at run time, never committed).
 *
 * Everything is read into memory once, before the workers start, so a request
 * never touches the file system (no blocking call on an event loop) and a
 * request path can only name a file that was found at load time: traversal is
 * impossible by construction. At load, each entry is resolved with realpath
 * and kept only when it lies under its root's real path (a symlink that
 * escapes is skipped and logged), dotfiles are skipped, and sizes and counts
 * are bounded. Replies carry a content hash ETag (304 on If-None-Match), a
 * Cache-Control (no-cache for the page, a day for vendor files), nosniff and,
 * for HTML, a Content-Security-Policy. Files changed on disk need a restart. */
#include "static.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tidepool/log.h"

#ifndef TP_DATADIR
#define TP_DATADIR "/usr/local/share/tidepool"
#endif

#define MAX_FILES 1000
#define MAX_FILE_BYTES (32 << 20)
#define MAX_DEPTH 6

typedef struct sfile {
    char *url; /* "/web/app.js" */
    char *body;
    size_t len;
    const char *ctype;
    bool vendor;
    char etag[24];
} sfile_t;

static struct {
    sfile_t *f;
    size_t n, cap;
    char *root;      /* as configured or chosen; NULL when not found */
    char *why;       /* why nothing is served, for the 404 detail */
} g_static;

static const char *ctype_of(const char *name)
{
    static const char *const map[][2] = {
        {".html", "text/html; charset=utf-8"},   {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"}, {".css", "text/css; charset=utf-8"},
        {".json", "application/json"},           {".map", "application/json"},
        {".svg", "image/svg+xml"},               {".png", "image/png"},
        {".ico", "image/x-icon"},                {".txt", "text/plain; charset=utf-8"},
        {".woff2", "font/woff2"},
    };
    const char *dot = strrchr(name, '.');
    for (size_t i = 0; dot && i < TP_ARRAY_LEN(map); i++)
        if (strcmp(dot, map[i][0]) == 0)
            return map[i][1];
    return "application/octet-stream";
}

static bool under(const char *real, const char *root_real)
{
    size_t n = strlen(root_real);
    if (n == 1) /* the root is "/" */
        return true;
    return strncmp(real, root_real, n) == 0 && (real[n] == '/' || real[n] == '\0');
}

static void add_file(const char *url, const char *real, size_t size, bool vendor)
{
    if (g_static.n == MAX_FILES) {
        tp_warn("web: more than %d files; %s and later ones are not served", MAX_FILES, url);
        return;
    }
    if (size > MAX_FILE_BYTES) {
        tp_warn("web: %s is larger than %d bytes; not served", url, MAX_FILE_BYTES);
        return;
    }
    size_t len = 0;
    errno = 0;
    char *body = tp_read_file(real, &len);
    if (!body && errno) {
        tp_warn("web: cannot read %s: %s", url, strerror(errno));
        return;
    }
    if (!body)
        body = tp_xstrdup(""); /* an empty file */
    if (g_static.n == g_static.cap) {
        g_static.cap = g_static.cap ? g_static.cap * 2 : 16;
        g_static.f = tp_xrealloc(g_static.f, g_static.cap * sizeof *g_static.f);
    }
    sfile_t *f = &g_static.f[g_static.n++];
    f->url = tp_xstrdup(url);
    f->body = body;
    f->len = len;
    f->ctype = ctype_of(url);
    f->vendor = vendor;
    snprintf(f->etag, sizeof f->etag, "\"%016llx\"", (unsigned long long)hash64(body, len));
}

/* Adds the files under dir (URL prefix url) whose real paths lie in root_real.
 * skip: a top-level entry name not to descend into (NULL = none). */
static void walk(const char *dir, const char *url, const char *root_real, const char *skip,
                 bool vendor, int depth)
{
    DIR *d = opendir(dir);
    if (!d) {
        tp_warn("web: cannot open %s: %s", dir, strerror(errno));
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || (skip && strcmp(e->d_name, skip) == 0))
            continue;
        char *path = tp_xasprintf("%s/%s", dir, e->d_name);
        char *sub = tp_xasprintf("%s/%s", url, e->d_name);
        char real[PATH_MAX];
        struct stat st;
        if (!realpath(path, real) || stat(real, &st) != 0) {
            tp_warn("web: skipping %s: %s", sub, strerror(errno));
        } else if (!under(real, root_real)) {
            tp_warn("web: skipping %s: it resolves outside %s", sub, root_real);
        } else if (S_ISDIR(st.st_mode) && depth < MAX_DEPTH) {
            walk(path, sub, root_real, NULL, vendor, depth + 1);
        } else if (S_ISREG(st.st_mode)) {
            add_file(sub, real, (size_t)st.st_size, vendor);
        }
        free(path);
        free(sub);
    }
    closedir(d);
}

static int by_url(const void *a, const void *b)
{
    return strcmp(((const sfile_t *)a)->url, ((const sfile_t *)b)->url);
}

/* Walks one tree; false (why set) when its root is not a directory. */
static bool load_tree(const char *dir, const char *url, const char *skip, bool vendor,
                      const char *setting)
{
    char real[PATH_MAX];
    struct stat st;
    if (!realpath(dir, real) || stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
        free(g_static.why);
        g_static.why = tp_xasprintf("[server] %s %s is not a directory", setting, dir);
        return false;
    }
    walk(dir, url, real, skip, vendor, 0);
    return true;
}

void static_load(const tp_config_t *cfg, FILE *out)
{
    const char *root = cfg->server.web_root;
    struct stat st;
    if (!root || !*root)
        root = stat("web/index.html", &st) == 0 ? "web" : TP_DATADIR "/web";
    const char *vendor = cfg->server.web_vendor;
    bool sep_vendor = vendor && *vendor;
    g_static.root = tp_xstrdup(root);
    bool ok = load_tree(root, "/web", sep_vendor ? "vendor" : NULL, false, "web_root");
    bool vok = !sep_vendor || load_tree(vendor, "/web/vendor", NULL, true, "web_vendor");
    if (!sep_vendor) /* vendor files live in web_root/vendor: cache them like vendor files */
        for (size_t i = 0; i < g_static.n; i++)
            g_static.f[i].vendor = strncmp(g_static.f[i].url, "/web/vendor/", 12) == 0;
    if (g_static.n > 0) /* qsort(NULL, 0, ...) is undefined */
        qsort(g_static.f, g_static.n, sizeof *g_static.f, by_url);
    size_t bytes = 0;
    for (size_t i = 0; i < g_static.n; i++)
        bytes += g_static.f[i].len;
    char nf[24], nb[24];
    snprintf(nf, sizeof nf, "%zu", g_static.n);
    snprintf(nb, sizeof nb, "%zu", bytes);
    if (out) {
        fprintf(out, "web: %s (%zu files, %zu bytes)%s%s\n", root, g_static.n, bytes,
                ok && vok ? "" : ": ", ok && vok ? "" : g_static.why);
        return;
    }
    const char *kv[] = {"web_root", root, "files", nf, "bytes", nb, NULL};
    if (ok && vok)
        tp_logkv(TP_LOG_INFO, kv, "demo page loaded");
    else
        tp_logkv(TP_LOG_WARN, kv, "demo page not served: %s", g_static.why);
}

void static_free(void)
{
    for (size_t i = 0; i < g_static.n; i++) {
        free(g_static.f[i].url);
        free(g_static.f[i].body);
    }
    free(g_static.f);
    free(g_static.root);
    free(g_static.why);
    memset(&g_static, 0, sizeof g_static);
}

static const sfile_t *find(const char *url)
{
    sfile_t key = {.url = (char *)url};
    if (g_static.n == 0)
        return NULL;
    return bsearch(&key, g_static.f, g_static.n, sizeof *g_static.f, by_url);
}

bool static_serve(rq_t *r, const char *path)
{
    const char *url = path;
    if (strcmp(path, "/") == 0 || strcmp(path, "/web") == 0)
        url = "/web/index.html";
    else if (strncmp(path, "/web/", 5) != 0)
        return false;
    if (!(evhttp_request_get_command(r->req) & (EVHTTP_REQ_GET | EVHTTP_REQ_HEAD))) {
        rq_header(r, "Allow", "GET, HEAD");
        rq_problem(r, 405, "method-not-allowed", "static files accept GET and HEAD only", NULL,
                   NULL, 0);
        return true;
    }
    const sfile_t *f = find(url);
    if (!f) {
        char *d = g_static.why && g_static.n == 0
                      ? tp_xasprintf("the demo page is not installed: %s", g_static.why)
                      : tp_xasprintf("no file %s under the web root", url);
        rq_problem(r, 404, "not-found", d, "path", "names no file", 0);
        free(d);
        return true;
    }
    rq_header(r, "ETag", f->etag);
    rq_header(r, "Cache-Control", f->vendor ? "public, max-age=86400" : "no-cache");
    rq_header(r, "X-Content-Type-Options", "nosniff");
    if (strncmp(f->ctype, "text/html", 9) == 0) {
        /* Plotly sets inline styles and draws with data: images. */
        rq_header(r, "Content-Security-Policy",
                  "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                  "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'");
        rq_header(r, "Referrer-Policy", "no-referrer");
    }
    const char *inm = rq_in_header(r, "If-None-Match");
    if (inm && (strcmp(inm, "*") == 0 || strstr(inm, f->etag))) {
        rq_reply(r, 304, NULL, NULL, 0);
        return true;
    }
    rq_reply(r, 200, f->ctype, f->body, f->len);
    return true;
}
