/* Fuzz target: conninfo validation and its secret masking (lib/pg.c). The
 * input is wrapped around a known password ("<data> password=<marker> <data>"
 * and the URI form "postgresql://u:<marker>@<data>"), and whatever libpq makes
 * of it, an error message must never contain the marker. Nothing connects. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/pg.h"
#include "tidepool/util.h"

#define MARKER "Zq9Marker"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(const char *conninfo)
{
    char err[1024];
    if (!tp_pg_conninfo_check(conninfo, err, sizeof err) && strstr(err, MARKER) != NULL) {
        fprintf(stderr, "secret leaked for conninfo [%s]: %s\n", conninfo, err);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = tp_xstrndup((const char *)data, size); /* stops at a NUL, as libpq would */
    if (strstr(s, MARKER) != NULL) { /* the marker is only a secret where we put it */
        free(s);
        return 0;
    }
    check(s);
    char *kv = tp_xasprintf("%s password=" MARKER " %s", s, s);
    char *quoted = tp_xasprintf("%s password='" MARKER "%s'", s, s);
    char *uri = tp_xasprintf("postgresql://u:" MARKER "%s@%s", s, s);
    check(kv);
    check(quoted);
    check(uri);
    free(uri);
    free(quoted);
    free(kv);
    free(s);
    return 0;
}
