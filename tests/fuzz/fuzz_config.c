/* Fuzz target: the INI configuration parser (lib/config.c) on arbitrary bytes.
 * The parser reads files, so the input goes through a memfd. Any result is
 * fine; crashes, leaks and sanitizer reports are not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tidepool/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz_config", 0);
        if (fd < 0)
            abort();
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        setenv("TP_FUZZ_VAR", "value", 1);
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
        abort();
    tp_config_t cfg = {0};
    char err[512];
    if (tp_config_load(&cfg, path, err, sizeof err)) {
        FILE *devnull = fopen("/dev/null", "w");
        tp_config_print(&cfg, devnull);
        fclose(devnull);
        tp_config_free(&cfg);
    }
    return 0;
}
