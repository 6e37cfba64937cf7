/* Fuzz target: the timestamp parser and canonical form (lib/isots.c) on
 * arbitrary bytes, as timestamptz and as timestamp, and the session conninfo
 * builder on the same bytes as a DSN. Whatever is accepted must come out
 * NUL-terminated within TP_ISOTS_MAX and be a fixed point (its canonical form
 * read again gives itself), so the encoders' output is stable. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/isots.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    for (int tz = 0; tz < 2; tz++) {
        char out[TP_ISOTS_MAX], again[TP_ISOTS_MAX];
        size_t n = tp_isots_canon(s, size, tz, out);
        if (n == 0)
            continue;
        if (n >= TP_ISOTS_MAX || strlen(out) != n)
            abort();
        size_t m = tp_isots_canon(out, n, tz, again);
        /* a shift to UTC may carry a 9-digit year into a 10th digit, which
         * the parser refuses; anything it reads must give itself */
        if (m != 0 && (m != n || memcmp(out, again, n) != 0))
            abort();
    }
    char *dsn = malloc(size + 1);
    if (dsn == NULL)
        abort();
    memcpy(dsn, data, size);
    dsn[size] = '\0';
    free(tp_isots_dsn(dsn));
    free(dsn);
    return 0;
}
