/* Replay driver for the fuzz targets in tests/fuzz/fuzz_*.c, so that every
 * `make check` exercises them: each file of tests/fuzz/corpus/<target>/, then
 * a fixed number of deterministic mutations of those inputs (byte flips,
 * truncations, insertions, splices). `make fuzz` links the same targets with
 * libFuzzer instead for open-ended, coverage-guided runs. A crash or sanitizer
 * report fails the program; otherwise it prints one "ok" line per phase. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct input {
    uint8_t *data;
    size_t len;
} input_t;

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t load_corpus(const char *dir, input_t **out)
{
    DIR *d = opendir(dir);
    size_t n = 0, cap = 16;
    input_t *v = malloc(cap * sizeof *v);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char *path = NULL;
        if (asprintf(&path, "%s/%s", dir, e->d_name) < 0)
            abort();
        FILE *f = fopen(path, "rb");
        free(path);
        if (f == NULL)
            continue;
        uint8_t *buf = malloc(1 << 20);
        size_t len = fread(buf, 1, 1 << 20, f);
        fclose(f);
        if (n == cap)
            v = realloc(v, (cap *= 2) * sizeof *v);
        v[n].data = buf;
        v[n++].len = len;
    }
    if (d)
        closedir(d);
    *out = v;
    return n;
}

static void mutate_and_run(const input_t *a, const input_t *b)
{
    size_t cap = a->len + b->len + 64;
    uint8_t *buf = malloc(cap);
    size_t len = a->len;
    memcpy(buf, a->data, len);
    int edits = 1 + (int)(next_rand() % 4);
    for (int i = 0; i < edits; i++) {
        switch (next_rand() % 5) {
        case 0: /* flip a byte */
            if (len)
                buf[next_rand() % len] ^= (uint8_t)(1u << (next_rand() % 8));
            break;
        case 1: /* truncate */
            if (len)
                len = next_rand() % len;
            break;
        case 2: { /* insert an interesting byte */
            static const uint8_t bytes[] = {0, '\n', '=', '[', ']', '$', '{', '}', '"', '\\', ':', '@', ';', '-', 0xff};
            if (len + 1 < cap) {
                size_t at = len ? next_rand() % len : 0;
                memmove(buf + at + 1, buf + at, len - at);
                buf[at] = bytes[next_rand() % sizeof bytes];
                len++;
            }
            break;
        }
        case 3: { /* splice the tail of b */
            size_t at = len ? next_rand() % len : 0;
            size_t from = b->len ? next_rand() % b->len : 0;
            size_t take = b->len - from;
            if (at + take <= cap) {
                memcpy(buf + at, b->data + from, take);
                len = at + take;
            }
            break;
        }
        default: /* duplicate a range */
            if (len && len * 2 <= cap) {
                size_t from = next_rand() % len;
                size_t take = (len - from) / 2;
                memcpy(buf + len, buf + from, take);
                len += take;
            }
        }
    }
    LLVMFuzzerTestOneInput(buf, len);
    free(buf);
}

int main(int argc, char **argv)
{
    const char *name = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    const char *target = strncmp(name, "fuzz_", 5) == 0 ? name + 5 : name;
    char dir[4096];
    const char *root = getenv("TP_ROOT");
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/%s", root ? root : ".", target);
    input_t *corpus;
    size_t n = load_corpus(dir, &corpus);
    if (n == 0) {
        printf("not ok - %s: empty corpus %s\n", name, dir);
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        LLVMFuzzerTestOneInput(corpus[i].data, corpus[i].len);
    printf("ok - %s replays %zu corpus inputs\n", name, n);
    long rounds = argc > 1 ? atol(argv[1]) : (getenv("TP_FUZZ_ROUNDS") ? atol(getenv("TP_FUZZ_ROUNDS")) : 3000);
    for (long r = 0; r < rounds; r++)
        mutate_and_run(&corpus[next_rand() % n], &corpus[next_rand() % n]);
    printf("ok - %s survives %ld mutated inputs\n", name, rounds);
    for (size_t i = 0; i < n; i++)
        free(corpus[i].data);
    free(corpus);
    return 0;
}
