/* The optional HTTPS listener's TLS state (server.tls_listen, tls_cert,
 * tls_key): one OpenSSL server context for the whole process, TLS 1.2 as the
 * lowest version, built from the PEM certificate chain and private key files.
 * tls_load builds a fresh context and swaps it in only when the files load
 * and the key matches the certificate, so a SIGHUP with a broken file keeps
 * serving the previous pair (the caller logs why). Each accepted connection
 * gets its own SSL from the context current at accept time (SSL_new holds a
 * reference, so a swap never pulls a context from under a live connection),
 * wrapped in a libevent OpenSSL bufferevent for evhttp (evhttp_set_bevcb). */
#include "server.h"

#include <stdio.h>
#include <string.h>

#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

static pthread_mutex_t tls_mu = PTHREAD_MUTEX_INITIALIZER;
static SSL_CTX *tls_ctx; /* guarded by tls_mu */

/* The first OpenSSL error of this thread as text ("" when none); clears the queue. */
static void ssl_why(char *out, size_t n)
{
    unsigned long e = ERR_get_error();
    if (e)
        ERR_error_string_n(e, out, n);
    else
        snprintf(out, n, "unknown error");
    ERR_clear_error();
}

bool tls_load(const char *cert, const char *key, char *err, size_t errlen)
{
    char why[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        ssl_why(why, sizeof why);
        snprintf(err, errlen, "TLS context: %s", why);
        return false;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    const char *bad = NULL;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        bad = "server.tls_cert";
    else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        bad = "server.tls_key";
    else if (SSL_CTX_check_private_key(ctx) != 1)
        bad = "server.tls_key (does not match server.tls_cert)";
    if (bad) {
        ssl_why(why, sizeof why);
        /* file names only: never key material */
        snprintf(err, errlen, "%s: cannot use %s: %s", bad,
                 strncmp(bad, "server.tls_cert", 15) == 0 ? cert : key, why);
        SSL_CTX_free(ctx);
        return false;
    }
    pthread_mutex_lock(&tls_mu);
    SSL_CTX *old = tls_ctx;
    tls_ctx = ctx;
    pthread_mutex_unlock(&tls_mu);
    SSL_CTX_free(old);
    return true;
}

void tls_free(void)
{
    pthread_mutex_lock(&tls_mu);
    SSL_CTX *old = tls_ctx;
    tls_ctx = NULL;
    pthread_mutex_unlock(&tls_mu);
    SSL_CTX_free(old);
}

struct bufferevent *tls_bevcb(struct event_base *base, void *arg)
{
    worker_t *w = arg;
    if (w->magic != WORKER_MAGIC)
        abort();
    pthread_mutex_lock(&tls_mu);
    SSL *ssl = tls_ctx ? SSL_new(tls_ctx) : NULL;
    pthread_mutex_unlock(&tls_mu);
    if (!ssl)
        return NULL; /* evhttp drops the connection */
    struct bufferevent *bev = bufferevent_openssl_socket_new(
        base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
    if (bev)
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    else
        SSL_free(ssl);
    return bev;
}
