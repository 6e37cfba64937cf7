/* Fuzz target: the warehouse client's parsers on arbitrary bytes: the push
 * JSON parser (lib/whjson.c) in its three placements of the row array, fed
 * whole and in pieces of a size the input chooses (the two runs must agree on
 * success, row count and batch contents: an oracle, not just "no crash"), and
 * the error-body reader tp_wh_error_body (lib/wh.c). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/wh.h"
#include "tidepool/whjson.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const STMT[] = {"result", "data_array"};
static const char *const CHUNK[] = {"data_array"};

static tp_whjson_t *make(int mode)
{
    return mode == 0 ? tp_whjson_new(STMT, 2) : mode == 1 ? tp_whjson_new(CHUNK, 1) : tp_whjson_new(NULL, 0);
}

/* FNV-1a over the batch (cells, lengths, NULLs). */
static uint64_t digest(tp_whjson_t *p, size_t *nrows)
{
    const char *const *cells;
    const size_t *lens;
    size_t ncols;
    *nrows = tp_whjson_batch(p, &cells, &lens, &ncols);
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < *nrows * ncols; i++) {
        if (cells[i] == NULL) {
            h = (h ^ 0xff) * 1099511628211ULL;
            continue;
        }
        for (size_t k = 0; k < lens[i]; k++)
            h = (h ^ (uint8_t)cells[i][k]) * 1099511628211ULL;
        h = (h ^ 0xfe) * 1099511628211ULL;
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    int mode = data[0] % 3;
    size_t piece = (size_t)data[1] % 64 + 1;
    const char *doc = (const char *)data + 2;
    size_t len = size - 2;

    tp_whjson_t *a = make(mode);
    bool ok_a = tp_whjson_feed(a, doc, len) && tp_whjson_finish(a);
    tp_whjson_t *b = make(mode);
    bool ok_b = true;
    for (size_t off = 0; off < len && ok_b; off += piece)
        ok_b = tp_whjson_feed(b, doc + off, len - off < piece ? len - off : piece);
    ok_b = ok_b && tp_whjson_finish(b);
    if (ok_a != ok_b)
        abort();
    if (ok_a) {
        size_t na, nb;
        if (digest(a, &na) != digest(b, &nb) || na != nb ||
            tp_whjson_rows_total(a) != tp_whjson_rows_total(b))
            abort();
    } else if (strcmp(tp_whjson_error(a), tp_whjson_error(b)) != 0) {
        abort(); /* the same first error, wherever the input was cut */
    }
    tp_whjson_free(a);
    tp_whjson_free(b);

    char *code = NULL, *msg = NULL;
    tp_wh_error_body((const char *)data, size, &code, &msg);
    if (msg == NULL)
        abort();
    free(code);
    free(msg);
    return 0;
}
