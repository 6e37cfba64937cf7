/* Fuzz target: the definitions parser (lib/defs.c) on arbitrary bytes. The
 * input is split at the first "\n====\n" into a dataset's NAME.sql and its
 * twin NAME.warehouse.sql, written into a private directory and loaded as
 * datasets and as sync jobs; the whole input is also scanned as a body in both
 * dialects and parsed as a value of every parameter type. Any result is fine;
 * crashes, leaks, sanitizer reports and a failed load without a message are not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tidepool/defs.h"
#include "tidepool/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void write_file(const char *path, const uint8_t *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        abort();
    if (len > 0 && fwrite(data, 1, len, f) != len)
        abort();
    fclose(f);
}

static char dir[64], main_path[96], twin_path[96];

static void remove_dir(void)
{
    unlink(main_path);
    unlink(twin_path);
    rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (dir[0] == '\0') {
        snprintf(dir, sizeof dir, "/tmp/fuzz_defs.XXXXXX");
        if (mkdtemp(dir) == NULL)
            abort();
        atexit(remove_dir);
        snprintf(main_path, sizeof main_path, "%s/d.sql", dir);
        snprintf(twin_path, sizeof twin_path, "%s/d.warehouse.sql", dir);
    }
    const uint8_t *sep = memmem(data, size, "\n====\n", 6);
    size_t main_len = sep ? (size_t)(sep - data) : size;
    write_file(main_path, data, main_len);
    if (sep != NULL)
        write_file(twin_path, sep + 6, size - main_len - 6);
    else
        unlink(twin_path);

    tp_defs_set_t *s = tp_defs_set_new();
    tp_defs_diag_t diag = {0};
    if (!tp_defs_load_datasets(s, dir, &diag) && diag.n == 0)
        abort();
    if (!tp_defs_load_jobs(s, dir, &diag) && diag.n == 0)
        abort();
    if (!tp_defs_check_requires(s, s, &diag) && diag.n == 0)
        abort();
    const tp_defs_dataset_t *d = tp_defs_dataset_find(s, "d");
    if (d != NULL) {
        tp_defs_value_t vals[8] = {0};
        for (size_t i = 0; i < d->n_params && i < 8; i++)
            vals[i] = d->params[i].dflt;
        if (d->n_params <= 8)
            (void)tp_defs_covers_exceeded(d, vals, 1735787045000);
    }
    tp_defs_diag_free(&diag);
    tp_defs_set_free(s);

    char *text = tp_xstrndup((const char *)data, size);
    for (int pg = 0; pg < 2; pg++) {
        tp_defs_body_t b = {0};
        char err[128];
        int line = 0;
        if (tp_defs_scan_body(text, pg, pg, &b, &line, err, sizeof err))
            tp_defs_body_free(&b);
    }
    for (int t = TP_DEFS_STRING; t <= TP_DEFS_TIMESTAMP; t++) {
        tp_defs_value_t v;
        const char *why = NULL;
        if (!tp_defs_value_parse((tp_defs_type_t)t, text, &v, &why) && why == NULL)
            abort();
    }
    free(text);
    return 0;
}
