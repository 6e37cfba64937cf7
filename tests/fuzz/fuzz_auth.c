/* Fuzz target: the auth settings parsers and the request decision
 * (lib/auth.c, lib/auth_tokens.c). The input is split at the first two NUL
 * bytes into a settings text (used as auth.tokens, auth.roles and
 * auth.trusted_proxies of a token and a databricks-apps verifier), a header
 * value (Authorization, X-Forwarded-*) and a peer address. Any result is
 * fine; crashes, leaks and sanitizer reports are not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/auth.h"
#include "tidepool/auth_tokens.h"
#include "tidepool/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void decide(tp_auth_t *a, const char *hdr, const char *peer)
{
    tp_auth_request_t r = {.peer = peer, .now_s = 1700000000};
    for (int i = 0; i < TP_AUTH_HDR_COUNT; i++)
        tp_auth_request_header(&r, tp_auth_header_names[i], hdr);
    r.hdr[TP_AUTH_HDR_FWD_GROUPS].count = 1;
    tp_auth_result_t res;
    if (tp_auth_check(a, &r, &res)) {
        tp_buf_t b = {0};
        tp_principal_describe(res.principal, &b);
        tp_buf_free(&b);
        (void)tp_auth_allowed(res.principal, NULL);
    }
    (void)tp_auth_client_address(a, &r);
    tp_auth_result_clear(&res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 3);
    memcpy(text, data, size);
    text[size] = text[size + 1] = text[size + 2] = '\0';
    char *hdr = text + strlen(text) + 1;
    char *peer = hdr + strlen(hdr) + 1;
    if (peer > text + size)
        peer = text + size;

    char err[512];
    tp_auth_tokens_t *t = tp_auth_tokens_parse(text, "fuzz", err, sizeof err);
    tp_auth_tokens_release(t);
    char **roles = NULL;
    if (tp_auth_roles_parse(text, &roles, err, sizeof err))
        tp_auth_strv_free(roles);

    static char mode_token[] = "token", mode_apps[] = "databricks-apps", empty[] = "",
                loopback[] = "127.0.0.1/32, ::1/128";
    tp_config_t c = {0};
    c.auth.mode = mode_token;
    c.auth.tokens = text;
    c.auth.token_table = true;
    c.auth.trusted_proxies = loopback;
    c.auth.roles = empty;
    tp_auth_t *a = tp_auth_new(&c, err, sizeof err);
    if (a != NULL) {
        decide(a, hdr, peer);
        tp_auth_free(a);
    }
    c.auth.mode = mode_apps;
    c.auth.tokens = empty;
    c.auth.roles = text;
    a = tp_auth_new(&c, err, sizeof err);
    if (a != NULL) {
        decide(a, hdr, peer);
        tp_auth_free(a);
    }
    c.auth.roles = empty;
    c.auth.trusted_proxies = text;
    a = tp_auth_new(&c, err, sizeof err);
    if (a != NULL) {
        decide(a, hdr, peer);
        tp_auth_free(a);
    }
    free(text);
    return 0;
}
