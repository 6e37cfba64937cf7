/* Fuzz target: the emulator's parsers on arbitrary bytes (they are
 * program-private, so their sources are compiled in). The first byte picks
 * one: the SQL dialect bridge (with a few declared parameters), the fault
 * SPEC parser, a parameter type, or the cell converters and chunk builder
 * (Postgres array literals, timestamps) in JSON and CSV. Any result is fine;
 * crashes, leaks and sanitizer reports are not. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../emulator/bridge.c"
#include "../../emulator/faults.c"
#include "../../emulator/result.c"

emu_global_t g;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_cells(const char *s, emu_format_t fmt)
{
    static const unsigned oids[] = {1007, 1009, 1000, 1184, 1114, 17, 16, 1231};
    emu_stmt_t st;
    memset(&st, 0, sizeof st);
    st.format = fmt;
    st.row_limit = -1;
    st.byte_limit = 4096;
    st.ncols = (int)TP_ARRAY_LEN(oids);
    emu_column_t cols[TP_ARRAY_LEN(oids)];
    memset(cols, 0, sizeof cols);
    for (int j = 0; j < st.ncols; j++) {
        cols[j].name = tp_xstrdup(s);
        emu_column_map(&cols[j], oids[j], -1);
    }
    st.cols = cols;
    char *row[TP_ARRAY_LEN(oids)];
    for (int j = 0; j < st.ncols; j++)
        row[j] = (char *)s;
    emu_builder_t b;
    emu_builder_init(&b, &st);
    emu_builder_row(&b, row);
    emu_builder_row(&b, row);
    emu_builder_finish(&b);
    emu_builder_free(&b);
    for (int i = 0; i < st.nchunks; i++)
        free(st.chunks[i].data);
    free(st.chunks);
    for (int j = 0; j < st.ncols; j++)
        emu_column_free(&cols[j]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    char *s = tp_xstrndup((const char *)data + 1, size - 1); /* stops at an embedded NUL */
    g.chunk_rows = 1;
    g.chunk_bytes = 64;
    switch (data[0] % 4) {
    case 0: {
        emu_param_t p[] = {{"a", "1", "INT"}, {"b", NULL, NULL}, {"x_1", "2020-01-01", "DATE"}};
        int order[8], norder = 0;
        char *unbound = NULL;
        char *out = emu_bridge_sql(s, p, 3, order, &norder, &unbound);
        if (norder > 3)
            abort();
        free(out);
        free(unbound);
        break;
    }
    case 1: {
        emu_faults_t f;
        char err[256];
        if (emu_faults_parse(s, &f, err, sizeof err)) {
            tp_buf_t b;
            tp_buf_init(&b);
            emu_faults_describe(&f, &b);
            tp_buf_free(&b);
        }
        break;
    }
    case 2: {
        char out[64];
        if (emu_param_pgtype(s, out, sizeof out) && strlen(out) >= sizeof out)
            abort();
        fuzz_cells(s, EMU_FMT_CSV);
        break;
    }
    default: fuzz_cells(s, EMU_FMT_JSON); break;
    }
    free(s);
    return 0;
}
