/* tidepool-sync: pulls warehouse aggregates into PostgreSQL on a schedule.
 * This file only parses options and loads the configuration; the daemon
 * lives in syncd.c (scheduler) and syncjob.c (one run of a job). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "syncd.h"
#include "tidepool/config.h"
#include "tidepool/log.h"
#include "tidepool/ping.h"

static void usage(FILE *f)
{
    fprintf(f, "Usage: tidepool-sync [OPTIONS]\n"
               "tidepool-sync pulls warehouse aggregates into PostgreSQL on a schedule.\n\n"
               "  -c, --config FILE  configuration file (default " TP_CONFIG_DEFAULT_PATH
               " if it exists)\n"
               "      --once [JOB]   run every job (or JOB) once and exit: 0 ok, 1 a run failed\n"
               "      --check        validate the configuration and the job definitions, then exit\n"
               "      --migrate      apply pending database migrations, then exit\n"
               "      --ping         check Postgres and the warehouse (credentials, warehouse id,\n"
               "                     SELECT 1), print what works and what does not; 0 = all ok\n"
               "  -h, --help         show this help\n"
               "  -V, --version      show the version\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"once", optional_argument, NULL, 'o'},
        {"check", no_argument, NULL, 'k'},
        {"migrate", no_argument, NULL, 'm'},
        {"ping", no_argument, NULL, 'p'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    tp_syncd_opts_t o = {.migrate = true};
    const char *config_path = NULL;
    bool check = false, migrate_only = false, ping = false;
    int c;
    while ((c = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'o':
            o.once = true;
            o.once_job = optarg;
            break;
        case 'k': check = true; break;
        case 'm': migrate_only = true; break;
        case 'p': ping = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("tidepool-sync %s\n", TP_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o.once && o.once_job == NULL && optind < argc)
        o.once_job = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "tidepool-sync: unexpected argument %s\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (config_path == NULL && access(TP_CONFIG_DEFAULT_PATH, R_OK) == 0)
        config_path = TP_CONFIG_DEFAULT_PATH;
    tp_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    char err[1024];
    if (!tp_config_load(&cfg, config_path, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    tp_log_level_t level;
    if (cfg.log.level && tp_log_parse_level(cfg.log.level, &level))
        tp_log_set_level(level);
    tp_log_set_global("program", "tidepool-sync");
    int status;
    if (ping) {
        status = tp_ping_run(&cfg, stdout);
    } else if (migrate_only) {
        status = tp_syncd_migrate(&cfg) ? 0 : 1;
    } else if (check) {
        tp_config_print(&cfg, stdout);
        status = tp_syncd_check(cfg.sync.definitions, stdout, stderr) ? 0 : 2;
    } else {
        o.progress = o.once && isatty(STDERR_FILENO);
        status = tp_syncd_run(&cfg, &o);
    }
    tp_config_free(&cfg);
    return status;
}
