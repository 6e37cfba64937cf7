/* Checks systemd/tidepool.conf, the example config that `make install` puts in
 * /etc/tidepool, against the settings table in lib/config.c: it parses with
 * the real loader, names every setting in its own section (and nothing else),
 * shows each default exactly (uncommenting every "# key = value" line changes
 * no value), and says for each key whether SIGHUP reloads it, which
 * environment variable fills it and whether it is a secret. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tp_test.h"
#include "tidepool/config.h"
#include "tidepool/util.h"

static char *g_text; /* the example file */
static char g_path[4096];

/* The settings' environment variables would mask what the file says. */
static void clear_setting_env(void)
{
    for (size_t i = 0; i < tp_settings_count; i++)
        if (tp_settings[i].env != NULL)
            unsetenv(tp_settings[i].env);
}

/* One "key =" line of the example: where it is and the comment block above it. */
typedef struct shown {
    char section[32];
    char key[64];
    char value[256];
    bool commented;
    char block[2048]; /* comment lines since the last "#" separator or header */
} shown_t;

static size_t parse_example(shown_t *out, size_t cap)
{
    size_t n = 0;
    char section[32] = "";
    tp_buf_t block = {0};
    char *copy = tp_xstrdup(g_text);
    for (char *line = strtok(copy, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        if (line[0] == '[') {
            snprintf(section, sizeof(section), "%.*s", (int)strcspn(line + 1, "]"), line + 1);
            tp_buf_reset(&block);
            continue;
        }
        if (strcmp(line, "#") == 0) {
            tp_buf_reset(&block);
            continue;
        }
        bool commented = strncmp(line, "# ", 2) == 0;
        const char *p = commented ? line + 2 : line;
        size_t klen = 0;
        while (islower((unsigned char)p[klen]) || p[klen] == '_')
            klen++;
        if (klen > 0 && strncmp(p + klen, " =", 2) == 0 && n < cap) {
            shown_t *s = &out[n++];
            memset(s, 0, sizeof(*s));
            snprintf(s->section, sizeof(s->section), "%s", section);
            snprintf(s->key, sizeof(s->key), "%.*s", (int)klen, p);
            const char *v = p + klen + 2;
            snprintf(s->value, sizeof(s->value), "%s", *v == ' ' ? v + 1 : v);
            s->commented = commented;
            snprintf(s->block, sizeof(s->block), "%s", block.data ? block.data : "");
            continue;
        }
        tp_buf_puts(&block, line);
        tp_buf_putc(&block, '\n');
    }
    tp_buf_free(&block);
    free(copy);
    return n;
}

static shown_t g_all[128]; /* the example's key lines, parsed once in main */
static size_t g_n;

static const shown_t *find_shown(const tp_setting_t *s)
{
    for (size_t i = 0; i < g_n; i++)
        if (strcmp(g_all[i].section, s->section) == 0 && strcmp(g_all[i].key, s->key) == 0)
            return &g_all[i];
    return NULL;
}

static void example_loads_with_the_real_parser(void)
{
    tp_config_t c = {0};
    char err[512] = "";
    CHECK_MSG(tp_config_load(&c, g_path, err, sizeof(err)), "example does not load: %s", err);
    tp_config_free(&c);
}

static void example_names_every_setting_once_in_its_section(void)
{
    const shown_t *all = g_all;
    size_t n = g_n;
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        CHECK_MSG(find_shown(s) != NULL, "example lacks [%s] %s", s->section, s->key);
    }
    for (size_t i = 0; i < n; i++) {
        bool known = false;
        for (size_t j = 0; j < tp_settings_count; j++)
            known |= strcmp(all[i].section, tp_settings[j].section) == 0 &&
                     strcmp(all[i].key, tp_settings[j].key) == 0;
        CHECK_MSG(known, "example names unknown setting [%s] %s", all[i].section, all[i].key);
        for (size_t j = i + 1; j < n; j++)
            CHECK_MSG(strcmp(all[i].section, all[j].section) != 0 || strcmp(all[i].key, all[j].key) != 0,
                      "example names [%s] %s twice", all[i].section, all[i].key);
    }
}

static void commented_values_are_the_defaults(void)
{
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        const shown_t *sh = find_shown(s);
        if (sh == NULL || !sh->commented)
            continue;
        const char *def = s->default_value ? s->default_value : "";
        CHECK_MSG(strcmp(sh->value, def) == 0, "[%s] %s shows \"%s\", default is \"%s\"", s->section,
                  s->key, sh->value, def);
    }
    /* And the loader agrees: uncommenting every key changes no value. */
    tp_buf_t all_set = {0};
    char *copy = tp_xstrdup(g_text);
    for (char *line = strtok(copy, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        const char *p = line;
        if (strncmp(line, "# ", 2) == 0 && islower((unsigned char)line[2])) {
            size_t k = strspn(line + 2, "abcdefghijklmnopqrstuvwxyz_");
            if (strncmp(line + 2 + k, " =", 2) == 0)
                p = line + 2;
        }
        tp_buf_puts(&all_set, p);
        tp_buf_putc(&all_set, '\n');
    }
    free(copy);
    char *path = tp_test_write_tmp("all-set.conf", all_set.data);
    tp_config_t a = {0}, b = {0};
    char err[512] = "";
    CHECK_MSG(tp_config_load(&a, g_path, err, sizeof(err)), "%s", err);
    CHECK_MSG(tp_config_load(&b, path, err, sizeof(err)), "uncommented example does not load: %s", err);
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        const char *fa = (const char *)&a + s->offset, *fb = (const char *)&b + s->offset;
        switch (s->type) {
        case TP_CFG_INT:
        case TP_CFG_DURATION:
        case TP_CFG_SIZE:
            CHECK_MSG(*(const int64_t *)fa == *(const int64_t *)fb, "[%s] %s: %lld vs %lld",
                      s->section, s->key, (long long)*(const int64_t *)fa, (long long)*(const int64_t *)fb);
            break;
        case TP_CFG_BOOL:
            CHECK_MSG(*(const bool *)fa == *(const bool *)fb, "[%s] %s differs", s->section, s->key);
            break;
        default: {
            const char *sa = *(char *const *)fa, *sb = *(char *const *)fb;
            CHECK_MSG(strcmp(sa ? sa : "", sb ? sb : "") == 0, "[%s] %s: \"%s\" vs \"%s\"", s->section,
                      s->key, sa ? sa : "", sb ? sb : "");
        }
        }
    }
    tp_config_free(&a);
    tp_config_free(&b);
    tp_buf_free(&all_set);
    free(path);
}

static void comments_state_reload_env_and_secrecy(void)
{
    for (size_t i = 0; i < tp_settings_count; i++) {
        const tp_setting_t *s = &tp_settings[i];
        const shown_t *sh = find_shown(s);
        if (sh == NULL)
            continue; /* reported by the naming test */
        CHECK_MSG(strlen(sh->block) > 0, "[%s] %s has no comment", s->section, s->key);
        bool says_reload = strstr(sh->block, "eloadable") != NULL;
        CHECK_MSG(says_reload == s->reloadable, "[%s] %s: comment %s \"Reloadable\" but the setting %s",
                  s->section, s->key, says_reload ? "says" : "lacks",
                  s->reloadable ? "is reloadable" : "needs a restart");
        if (s->env != NULL)
            CHECK_MSG(strstr(sh->block, s->env) != NULL, "[%s] %s: comment does not name %s",
                      s->section, s->key, s->env);
        if (s->secret)
            CHECK_MSG(strstr(sh->block, "Secret") != NULL, "[%s] %s: comment does not say Secret",
                      s->section, s->key);
    }
}

int main(void)
{
    const char *root = getenv("TP_ROOT");
    snprintf(g_path, sizeof(g_path), "%s/systemd/tidepool.conf", root ? root : ".");
    g_text = tp_read_file(g_path, NULL);
    if (g_text == NULL) {
        tp_test_skip("test_conf_example", "systemd/tidepool.conf not found (run from the repository root)");
        return tp_test_done();
    }
    clear_setting_env();
    g_n = parse_example(g_all, TP_ARRAY_LEN(g_all));
    TP_RUN(example_loads_with_the_real_parser);
    TP_RUN(example_names_every_setting_once_in_its_section);
    TP_RUN(commented_values_are_the_defaults);
    TP_RUN(comments_state_reload_env_and_secrecy);
    free(g_text);
    return tp_test_done();
}
