/* tidepool-warehouse: a local Databricks SQL warehouse emulator (DESIGN §13).
 * This file owns start-up and shutdown: the command line and its environment
 * fallbacks (secrets may come from TIDEPOOL_WAREHOUSE_TOKENS,
 * TIDEPOOL_WAREHOUSE_CLIENTS and TIDEPOOL_WAREHOUSE_DSN so they stay out of
 * `ps`), the event base (threaded, so workers can wake it), the once-a-second
 * janitor, and SIGTERM/SIGINT: stop listening, cancel and join every worker,
 * free everything. The protocol lives in http.c, statements in stmt.c. */
#include "emu.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/thread.h>

#include "tidepool/config.h"
#include "tidepool/log.h"
#include "tidepool/pg.h"

emu_global_t g;

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: tidepool-warehouse [OPTIONS]\n"
            "A local Databricks SQL warehouse: the Statement Execution API 2.0 and OAuth M2M,\n"
            "running statements on a PostgreSQL database.\n\n"
            "  --listen ADDR:PORT       listen address (default 127.0.0.1:8180)\n"
            "  --dsn CONNINFO           the Postgres database holding the lakehouse\n"
            "                           (default: libpq's PG* environment; env TIDEPOOL_WAREHOUSE_DSN)\n"
            "  --token TOKEN            an accepted personal access token (repeatable;\n"
            "                           env TIDEPOOL_WAREHOUSE_TOKENS, comma-separated)\n"
            "  --client ID:SECRET       an OAuth service principal (repeatable;\n"
            "                           env TIDEPOOL_WAREHOUSE_CLIENTS, comma-separated)\n"
            "  --warehouse-id ID        an accepted warehouse id (repeatable; default tidepool-local)\n"
            "  --faults SPEC            inject faults (see docs/emulator.md)\n"
            "  --token-ttl SECONDS      OAuth token lifetime (default 3600)\n"
            "  --link-ttl SECONDS       external link lifetime (default 900)\n"
            "  --result-ttl SECONDS     results stay fetchable this long (default 3600)\n"
            "  --forget-ttl SECONDS     terminal statements are forgotten after this (default 43200)\n"
            "  --chunk-rows N           rows per result chunk (default 122880)\n"
            "  --chunk-bytes N          bytes per result chunk, e.g. 16M (default 16M)\n"
            "  --lakebase-role ROLE     serve Lakebase credential endpoints: each call sets\n"
            "                           ROLE's password on --dsn to a fresh token\n"
            "  --lakebase-ttl SECONDS   Lakebase token lifetime (default 3600)\n"
            "  --log-level LEVEL        debug, info, warn, error (default info)\n"
            "  --config FILE            also accept the [warehouse] token, client_id:client_secret\n"
            "                           and warehouse_id of a Tidepool config file, so one file\n"
            "                           drives the daemon, the server and this emulator\n"
            "  --check                  validate the options, print what was found, and exit\n"
            "  -h, --help               show this help\n"
            "  -V, --version            show the version\n");
}

static void add_str(char ***arr, int *n, const char *s)
{
    *arr = tp_xrealloc(*arr, (size_t)(*n + 1) * sizeof **arr);
    (*arr)[(*n)++] = tp_xstrdup(s);
}

static bool add_client(const char *spec)
{
    const char *colon = strchr(spec, ':');
    if (colon == NULL || colon == spec || colon[1] == '\0')
        return false;
    g.client_ids = tp_xrealloc(g.client_ids, (size_t)(g.nclients + 1) * sizeof *g.client_ids);
    g.client_secrets =
        tp_xrealloc(g.client_secrets, (size_t)(g.nclients + 1) * sizeof *g.client_secrets);
    g.client_ids[g.nclients] = tp_xstrndup(spec, (size_t)(colon - spec));
    g.client_secrets[g.nclients] = tp_xstrdup(colon + 1);
    g.nclients++;
    return true;
}

/* Adds each comma-separated item of env var name; false on a bad client spec. */
static bool from_env(const char *name, bool clients)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return true;
    char *copy = tp_xstrdup(v);
    char *save = NULL;
    bool ok = true;
    for (char *it = strtok_r(copy, ",", &save); it; it = strtok_r(NULL, ",", &save)) {
        it = tp_strtrim(it);
        if (*it == '\0')
            continue;
        if (clients)
            ok = ok && add_client(it);
        else
            add_str(&g.pats, &g.npats, it);
    }
    free(copy);
    return ok;
}

static bool parse_listen(const char *s)
{
    const char *colon = strrchr(s, ':');
    int64_t port;
    if (colon == NULL || colon == s || !tp_parse_int64(colon + 1, 0, 65535, &port))
        return false;
    free(g.listen_addr);
    if (s[0] == '[' && colon[-1] == ']') /* [::1]:8180 */
        g.listen_addr = tp_xstrndup(s + 1, (size_t)(colon - s) - 2);
    else
        g.listen_addr = tp_xstrndup(s, (size_t)(colon - s));
    g.listen_port = (int)port;
    return true;
}

static void free_options(void)
{
    for (int i = 0; i < g.npats; i++)
        free(g.pats[i]);
    free(g.pats);
    for (int i = 0; i < g.nclients; i++) {
        free(g.client_ids[i]);
        free(g.client_secrets[i]);
    }
    free(g.client_ids);
    free(g.client_secrets);
    for (int i = 0; i < g.nwarehouses; i++)
        free(g.warehouses[i]);
    free(g.warehouses);
    free(g.listen_addr);
    free(g.dsn);
    free(g.lakebase_role);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    (void)arg;
    tp_info("signal %d: shutting down", (int)sig);
    g.stopping = true;
    event_base_loopbreak(g.base);
}

static void on_done(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    emu_stmt_reap();
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    emu_stmt_reap();
    emu_stmt_janitor();
    emu_oauth_prune();
}

enum {
    OPT_LISTEN = 256, OPT_DSN, OPT_TOKEN, OPT_CLIENT, OPT_WAREHOUSE, OPT_FAULTS, OPT_TOKEN_TTL,
    OPT_LINK_TTL, OPT_RESULT_TTL, OPT_FORGET_TTL, OPT_CHUNK_ROWS, OPT_CHUNK_BYTES, OPT_LOG_LEVEL,
    OPT_CONFIG, OPT_CHECK, OPT_LB_ROLE, OPT_LB_TTL,
};

static bool g_check;

/* --config: accept the credentials and warehouse id the Tidepool programs are
 * configured with (after env fallbacks), so a local system needs one file. */
static int load_config(const char *path)
{
    tp_config_t cfg = {0};
    char err[512];
    if (!tp_config_load(&cfg, path, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (tp_config_warehouse_auth(&cfg) == TP_WH_AUTH_TOKEN)
        add_str(&g.pats, &g.npats, cfg.warehouse.token);
    if (cfg.warehouse.client_id && *cfg.warehouse.client_id && cfg.warehouse.client_secret &&
        *cfg.warehouse.client_secret) {
        char *spec = tp_xasprintf("%s:%s", cfg.warehouse.client_id, cfg.warehouse.client_secret);
        (void)add_client(spec);
        free(spec);
    }
    if (cfg.warehouse.warehouse_id && *cfg.warehouse.warehouse_id)
        add_str(&g.warehouses, &g.nwarehouses, cfg.warehouse.warehouse_id);
    tp_log_level_t lvl;
    if (cfg.log.level && tp_log_parse_level(cfg.log.level, &lvl))
        tp_log_set_level(lvl);
    tp_config_free(&cfg);
    return -1;
}

/* --check: everything parsed; say what this emulator would serve. Secrets are
 * counted, never printed; the DSN is masked. */
static int check_options(void)
{
    char err[512];
    if (*g.dsn && !tp_pg_conninfo_check(g.dsn, err, sizeof err)) {
        fprintf(stderr, "tidepool-warehouse: --dsn: %s\n", err);
        return 2;
    }
    char *dsn = tp_config_mask_dsn(g.dsn);
    printf("listen = %s:%d\n", g.listen_addr, g.listen_port);
    printf("dsn = %s\n", *dsn ? dsn : "(libpq environment)");
    printf("personal access tokens = %d\n", g.npats);
    printf("oauth clients = %d", g.nclients);
    for (int i = 0; i < g.nclients; i++)
        printf("%s%s", i ? ", " : " (", g.client_ids[i]);
    printf("%s\n", g.nclients ? ")" : "");
    printf("warehouse ids =");
    for (int i = 0; i < g.nwarehouses; i++)
        printf(" %s", g.warehouses[i]);
    printf("\nchunks = %lld rows, %lld bytes; links live %llds; results %llds\n",
           (long long)g.chunk_rows, (long long)g.chunk_bytes, (long long)g.link_ttl_s,
           (long long)g.result_ttl_s);
    if (g.lakebase_role)
        printf("lakebase credentials: role %s, tokens live %llds\n", g.lakebase_role,
               (long long)g.lakebase_ttl_s);
    else
        printf("lakebase credentials: off (no --lakebase-role)\n");
    if (g.npats == 0 && g.nclients == 0)
        printf("warning: no --token or --client: every API request will be refused\n");
    free(dsn);
    return 0;
}

/* Parses argv into g; returns -1 to go on, else the exit status. */
static int parse_args(int argc, char **argv)
{
    static const struct option opts[] = {
        {"listen", required_argument, NULL, OPT_LISTEN},
        {"dsn", required_argument, NULL, OPT_DSN},
        {"token", required_argument, NULL, OPT_TOKEN},
        {"client", required_argument, NULL, OPT_CLIENT},
        {"warehouse-id", required_argument, NULL, OPT_WAREHOUSE},
        {"faults", required_argument, NULL, OPT_FAULTS},
        {"token-ttl", required_argument, NULL, OPT_TOKEN_TTL},
        {"link-ttl", required_argument, NULL, OPT_LINK_TTL},
        {"result-ttl", required_argument, NULL, OPT_RESULT_TTL},
        {"forget-ttl", required_argument, NULL, OPT_FORGET_TTL},
        {"chunk-rows", required_argument, NULL, OPT_CHUNK_ROWS},
        {"chunk-bytes", required_argument, NULL, OPT_CHUNK_BYTES},
        {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
        {"config", required_argument, NULL, OPT_CONFIG},
        {"check", no_argument, NULL, OPT_CHECK},
        {"lakebase-role", required_argument, NULL, OPT_LB_ROLE},
        {"lakebase-ttl", required_argument, NULL, OPT_LB_TTL},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c;
    char err[256];
    tp_log_level_t lvl;
    while ((c = getopt_long(argc, argv, "hV", opts, NULL)) != -1) {
        bool ok = true;
        switch (c) {
        case 'h': usage(stdout); return 0;
        case 'V': printf("tidepool-warehouse %s\n", TP_VERSION); return 0;
        case OPT_LISTEN: ok = parse_listen(optarg); break;
        case OPT_DSN:
            free(g.dsn);
            g.dsn = tp_xstrdup(optarg);
            break;
        case OPT_TOKEN: add_str(&g.pats, &g.npats, optarg); break;
        case OPT_CLIENT: ok = add_client(optarg); break;
        case OPT_WAREHOUSE: add_str(&g.warehouses, &g.nwarehouses, optarg); break;
        case OPT_FAULTS:
            if (!emu_faults_parse(optarg, &g.faults, err, sizeof err)) {
                fprintf(stderr, "tidepool-warehouse: --faults: %s\n", err);
                return 2;
            }
            break;
        case OPT_TOKEN_TTL: ok = tp_parse_int64(optarg, 1, 86400 * 365, &g.token_ttl_s); break;
        case OPT_LINK_TTL: ok = tp_parse_int64(optarg, 1, 86400 * 7, &g.link_ttl_s); break;
        case OPT_RESULT_TTL: ok = tp_parse_int64(optarg, 1, 86400 * 7, &g.result_ttl_s); break;
        case OPT_FORGET_TTL: ok = tp_parse_int64(optarg, 1, 86400 * 30, &g.forget_ttl_s); break;
        case OPT_CHUNK_ROWS: ok = tp_parse_int64(optarg, 1, INT32_MAX, &g.chunk_rows); break;
        case OPT_CHUNK_BYTES:
            ok = tp_parse_size(optarg, &g.chunk_bytes) && g.chunk_bytes >= 64 &&
                 g.chunk_bytes <= (int64_t)1 << 30;
            break;
        case OPT_CONFIG: {
            int rc = load_config(optarg);
            if (rc >= 0)
                return rc;
            break;
        }
        case OPT_CHECK: g_check = true; break;
        case OPT_LOG_LEVEL:
            ok = tp_log_parse_level(optarg, &lvl);
            if (ok)
                tp_log_set_level(lvl);
            break;
        case OPT_LB_ROLE:
            free(g.lakebase_role);
            g.lakebase_role = tp_xstrdup(optarg);
            ok = optarg[0] != '\0';
            break;
        case OPT_LB_TTL: ok = tp_parse_int64(optarg, 1, 86400, &g.lakebase_ttl_s); break;
        default: usage(stderr); return 2;
        }
        if (!ok) {
            /* never echo --token/--client values: they are secrets */
            bool secret = c == OPT_TOKEN || c == OPT_CLIENT;
            fprintf(stderr, "tidepool-warehouse: bad value for --%s%s%s\n",
                    opts[c - OPT_LISTEN].name, secret ? "" : ": ", secret ? "" : optarg);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tidepool-warehouse: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    return -1;
}

int main(int argc, char **argv)
{
    g.listen_addr = tp_xstrdup("127.0.0.1");
    g.listen_port = 8180;
    g.token_ttl_s = 3600;
    g.lakebase_ttl_s = 3600;
    g.link_ttl_s = 900;
    g.result_ttl_s = 3600;
    g.forget_ttl_s = 43200;
    g.chunk_rows = 122880;
    g.chunk_bytes = 16 << 20;
    char err[64];
    if (!emu_faults_parse(NULL, &g.faults, err, sizeof err))
        return 1;
    tp_log_set_global("program", "tidepool-warehouse");
    int rc = parse_args(argc, argv);
    if (rc < 0 && (!from_env("TIDEPOOL_WAREHOUSE_TOKENS", false) ||
                   !from_env("TIDEPOOL_WAREHOUSE_CLIENTS", true))) {
        fprintf(stderr, "tidepool-warehouse: TIDEPOOL_WAREHOUSE_CLIENTS holds a bad ID:SECRET\n");
        rc = 2;
    }
    if (rc >= 0) {
        free_options();
        return rc;
    }
    if (g.dsn == NULL)
        g.dsn = tp_xstrdup(getenv("TIDEPOOL_WAREHOUSE_DSN") ? getenv("TIDEPOOL_WAREHOUSE_DSN")
                                                            : "");
    if (g.nwarehouses == 0)
        add_str(&g.warehouses, &g.nwarehouses, "tidepool-local");
    if (g_check) {
        rc = check_options();
        free_options();
        return rc;
    }
    if (g.npats == 0 && g.nclients == 0)
        tp_warn("no --token or --client given: every API request will be refused");

    signal(SIGPIPE, SIG_IGN);
    pthread_mutex_init(&g.mu, NULL);
    evthread_use_pthreads();
    g.base = event_base_new();
    if (g.base == NULL) {
        tp_error("cannot create the event base");
        free_options();
        return 1;
    }
    g.done_ev = event_new(g.base, -1, 0, on_done, NULL);
    struct event *tick = event_new(g.base, -1, EV_PERSIST, on_tick, NULL);
    struct timeval one = {1, 0};
    event_add(tick, &one);
    struct event *sigterm = evsignal_new(g.base, SIGTERM, on_signal, NULL);
    struct event *sigint = evsignal_new(g.base, SIGINT, on_signal, NULL);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    rc = 0;
    if (!emu_http_start()) {
        rc = 1;
    } else {
        char port[16];
        snprintf(port, sizeof port, "%d", g.listen_port);
        const char *kv[] = {"addr", g.listen_addr, "port", port, NULL};
        tp_logkv(TP_LOG_INFO, kv, "tidepool-warehouse listening");
        event_base_dispatch(g.base);
    }
    g.stopping = true;
    emu_http_stop(); /* closes connections; held requests are dropped */
    emu_stmt_shutdown();
    emu_oauth_free();
    event_free(g.done_ev);
    event_free(tick);
    event_free(sigterm);
    event_free(sigint);
    event_base_free(g.base);
    libevent_global_shutdown();
    pthread_mutex_destroy(&g.mu);
    free_options();
    tp_info("stopped");
    return rc;
}
