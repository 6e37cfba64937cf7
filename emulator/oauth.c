/* Authentication: personal access tokens given on the command line, and the
 * OAuth machine-to-machine token endpoint (POST /oidc/v1/token, grant
 * client_credentials, client credentials in HTTP Basic or in the form fields
 * client_id/client_secret) with its discovery document. Issued tokens are
 * random, kept in a list with their expiry (--token-ttl) and really refused
 * after it. Errors use OAuth's form {"error","error_description"}. Secrets
 * and tokens are compared in constant time and never logged. */
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <openssl/evp.h>

#include "tidepool/log.h"

static bool streq_ct(const char *a, const char *b)
{
    return tp_consttime_eq(a, strlen(a), b, strlen(b));
}

bool emu_auth_valid(const char *token)
{
    bool ok = false;
    for (int i = 0; i < g.npats; i++)
        ok |= streq_ct(token, g.pats[i]);
    if (ok)
        return true;
    int64_t now = tp_now_ms();
    for (emu_token_t *t = g.tokens; t; t = t->next)
        if (streq_ct(token, t->token) && now < t->expires_ms)
            return true;
    return false;
}

static void oauth_error(tp_buf_t *out, int *code, int status, const char *err, const char *desc)
{
    *code = status;
    tp_buf_printf(out, "{\"error\":\"%s\",\"error_description\":", err);
    tp_buf_json_str(out, desc);
    tp_buf_putc(out, '}');
}

/* Decodes "Basic base64(id:secret)"; returns false if the header is not Basic. */
static bool basic_credentials(const char *hdr, char **id, char **secret)
{
    if (hdr == NULL || strncasecmp(hdr, "Basic ", 6) != 0)
        return false;
    const char *b64 = hdr + 6;
    while (*b64 == ' ')
        b64++;
    size_t n = strlen(b64);
    if (n == 0 || n % 4 != 0 || n > 4096)
        return false;
    unsigned char *dec = tp_xmalloc(n);
    int len = EVP_DecodeBlock(dec, (const unsigned char *)b64, (int)n);
    if (len < 0) {
        free(dec);
        return false;
    }
    if (n >= 1 && b64[n - 1] == '=')
        len--;
    if (n >= 2 && b64[n - 2] == '=')
        len--;
    char *s = tp_xstrndup((const char *)dec, (size_t)len);
    free(dec);
    char *colon = strchr(s, ':');
    if (colon == NULL || strlen(s) != (size_t)len) {
        free(s);
        return false;
    }
    *id = tp_xstrndup(s, (size_t)(colon - s));
    *secret = tp_xstrdup(colon + 1);
    free(s);
    return true;
}

void emu_oauth_token(struct evhttp_request *req, tp_buf_t *out, int *code)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t blen = evbuffer_get_length(in);
    char *body = tp_xmalloc(blen + 1);
    evbuffer_copyout(in, body, blen);
    body[blen] = '\0';
    struct evkeyvalq form;
    TAILQ_INIT(&form);
    char *id = NULL, *secret = NULL;
    if (evhttp_parse_query_str(body, &form) != 0) {
        oauth_error(out, code, 400, "invalid_request", "malformed form body");
        goto out;
    }
    const char *grant = evhttp_find_header(&form, "grant_type");
    const char *auth = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!basic_credentials(auth, &id, &secret)) {
        const char *fid = evhttp_find_header(&form, "client_id");
        const char *fsec = evhttp_find_header(&form, "client_secret");
        if (fid && fsec) {
            id = tp_xstrdup(fid);
            secret = tp_xstrdup(fsec);
        }
    }
    if (id == NULL) {
        oauth_error(out, code, 401, "invalid_client", "Client authentication failed: no "
                                                      "client credentials were sent");
        goto out;
    }
    bool ok = false;
    for (int i = 0; i < g.nclients; i++)
        ok |= streq_ct(id, g.client_ids[i]) && streq_ct(secret, g.client_secrets[i]);
    if (!ok) {
        oauth_error(out, code, 401, "invalid_client", "Client authentication failed");
        goto out;
    }
    if (grant == NULL) {
        oauth_error(out, code, 400, "invalid_request", "Missing grant_type");
        goto out;
    }
    if (strcmp(grant, "client_credentials") != 0) {
        oauth_error(out, code, 400, "unsupported_grant_type",
                    "Only grant_type=client_credentials is supported");
        goto out;
    }
    const char *scope = evhttp_find_header(&form, "scope");
    if (scope == NULL || *scope == '\0')
        scope = "all-apis";
    if (strlen(scope) > 256) {
        oauth_error(out, code, 400, "invalid_scope", "scope too long");
        goto out;
    }
    emu_token_t *t = tp_xcalloc(1, sizeof *t);
    uint64_t r[4];
    for (int i = 0; i < 4; i++)
        r[i] = tp_random_u64();
    snprintf(t->token, sizeof t->token, "tpo%016llx%016llx%016llx%016llx",
             (unsigned long long)r[0], (unsigned long long)r[1], (unsigned long long)r[2],
             (unsigned long long)r[3]);
    t->expires_ms = tp_now_ms() + g.token_ttl_s * 1000;
    t->scope = tp_xstrdup(scope);
    t->next = g.tokens;
    g.tokens = t;
    *code = 200;
    tp_buf_printf(out, "{\"access_token\":\"%s\",\"token_type\":\"Bearer\",\"expires_in\":%lld,"
                       "\"scope\":",
                  t->token, (long long)g.token_ttl_s);
    tp_buf_json_str(out, scope);
    tp_buf_putc(out, '}');
out:
    evhttp_clear_headers(&form);
    free(body);
    free(id);
    free(secret);
}

void emu_oauth_discovery(struct evhttp_request *req, const char *host, tp_buf_t *out)
{
    (void)req;
    tp_buf_printf(out,
                  "{\"issuer\":\"http://%s/oidc\","
                  "\"authorization_endpoint\":\"http://%s/oidc/v1/authorize\","
                  "\"token_endpoint\":\"http://%s/oidc/v1/token\","
                  "\"jwks_uri\":\"http://%s/oidc/jwks.json\","
                  "\"scopes_supported\":[\"all-apis\",\"email\",\"offline_access\",\"openid\","
                  "\"profile\",\"sql\"],"
                  "\"response_types_supported\":[\"code\",\"id_token\"],"
                  "\"grant_types_supported\":[\"client_credentials\",\"authorization_code\","
                  "\"refresh_token\"],"
                  "\"token_endpoint_auth_methods_supported\":[\"client_secret_basic\","
                  "\"client_secret_post\",\"none\"],"
                  "\"code_challenge_methods_supported\":[\"S256\"]}",
                  host, host, host, host);
}

static void free_token(emu_token_t *t)
{
    free(t->scope);
    free(t);
}

void emu_oauth_prune(void)
{
    int64_t now = tp_now_ms();
    emu_token_t **pp = &g.tokens;
    while (*pp) {
        if ((*pp)->expires_ms <= now) {
            emu_token_t *t = *pp;
            *pp = t->next;
            free_token(t);
        } else {
            pp = &(*pp)->next;
        }
    }
}

void emu_oauth_free(void)
{
    while (g.tokens) {
        emu_token_t *t = g.tokens;
        g.tokens = t->next;
        free_token(t);
    }
}
