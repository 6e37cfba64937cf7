/* tidepool-server: answers dashboard reads and write-backs over HTTP.
 * Skeleton entry point: flags are parsed; capabilities arrive with their issues. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "tidepool/log.h"

static void usage(FILE *f)
{
    fprintf(f, "Usage: tidepool-server [OPTIONS]\n"
               "tidepool-server answers dashboard reads and write-backs over HTTP.\n\n"
               "  -h, --help       show this help\n"
               "  -V, --version    show the version\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "hV", opts, NULL)) != -1) {
        switch (c) {
        case 'h': usage(stdout); return 0;
        case 'V': printf("tidepool-server %s\n", TP_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    tp_error("tidepool-server: not implemented yet");
    return 1;
}
