/* tidepool-server's optional HTTPS listener (server.tls_listen): the test
 * makes its own CA and two server certificates with the OpenSSL API, then
 * checks that libcurl verifying against that CA gets answers over HTTPS (and
 * fails without the CA), that plain HTTP keeps working next to it, that a
 * TLS 1.1 client is refused by the server (protocol_version alert) while the
 * same client allowed TLS 1.2 gets through, that SIGHUP swaps in a new
 * certificate from the same paths, and that a broken certificate file on
 * SIGHUP keeps the previous one and logs why. A start with a certificate that
 * does not load exits 2 naming the setting. GET /api/v1/events streams an
 * event over TLS as over plain HTTP. */
#include "server_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

static srv_h_t S;
static const char *DSN;
static int TLS_PORT;
static char *CA_FILE, *CERT_FILE, *KEY_FILE;
static EVP_PKEY *CA_KEY;
static X509 *CA_CERT;

static void add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *e = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    CHECK(e != NULL);
    if (e) {
        X509_add_ext(x, e, -1);
        X509_EXTENSION_free(e);
    }
}

/* A certificate for key: self-signed CA when issuer is NULL, else a server
 * certificate for 127.0.0.1 / localhost signed by the issuer. */
static X509 *cert_new(EVP_PKEY *key, long serial, const char *cn, X509 *issuer, EVP_PKEY *issuer_key)
{
    X509 *x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer ? issuer : x, x, NULL, NULL, 0);
    if (!issuer) {
        add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE");
        add_ext(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
        add_ext(x, &ctx, NID_basic_constraints, "CA:FALSE");
        add_ext(x, &ctx, NID_subject_alt_name, "IP:127.0.0.1,DNS:localhost");
        add_ext(x, &ctx, NID_ext_key_usage, "serverAuth");
    }
    CHECK(X509_sign(x, issuer_key ? issuer_key : key, EVP_sha256()) > 0);
    return x;
}

static void write_pem(const char *path, X509 *cert, EVP_PKEY *key)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f)
        return;
    if (cert)
        PEM_write_X509(f, cert);
    if (key)
        PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
    fclose(f);
}

/* Writes a fresh server certificate with serial and its key to CERT/KEY_FILE. */
static void server_cert(long serial)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    X509 *c = cert_new(k, serial, "tidepool test server", CA_CERT, CA_KEY);
    write_pem(CERT_FILE, c, NULL);
    write_pem(KEY_FILE, NULL, k);
    X509_free(c);
    EVP_PKEY_free(k);
}

/* A raw OpenSSL handshake with 127.0.0.1:TLS_PORT limited to [minv, maxv],
 * verifying against the test CA. Returns the server certificate's serial,
 * or -1 with *reason the OpenSSL reason code of the failure. */
static long handshake(int minv, int maxv, int *reason)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, minv);
    SSL_CTX_set_max_proto_version(ctx, maxv);
    SSL_CTX_set_cipher_list(ctx, "DEFAULT:@SECLEVEL=0"); /* let the client offer TLS 1.1 */
    SSL_CTX_load_verify_locations(ctx, CA_FILE, NULL);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)TLS_PORT),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    long serial = -1;
    *reason = 0;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        SSL *ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        if (SSL_connect(ssl) == 1) {
            X509 *c = SSL_get1_peer_certificate(ssl);
            serial = c ? ASN1_INTEGER_get(X509_get_serialNumber(c)) : -1;
            X509_free(c);
            SSL_shutdown(ssl);
        } else {
            *reason = ERR_GET_REASON(ERR_peek_last_error());
        }
        SSL_free(ssl);
    }
    ERR_clear_error();
    close(fd);
    SSL_CTX_free(ctx);
    return serial;
}

/* GET path over HTTPS with libcurl; cafile NULL = the system's CAs. */
static long https_get(const char *path, const char *cafile, CURLcode *rc, long sslversion,
                      char **body)
{
    CURL *c = curl_easy_init();
    char url[256];
    snprintf(url, sizeof url, "https://127.0.0.1:%d%s", TLS_PORT, path);
    tp_buf_t b = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    if (cafile)
        curl_easy_setopt(c, CURLOPT_CAINFO, cafile);
    if (sslversion) {
        curl_easy_setopt(c, CURLOPT_SSLVERSION, sslversion);
        curl_easy_setopt(c, CURLOPT_SSL_CIPHER_LIST, "DEFAULT:@SECLEVEL=0");
    }
    long st = 0;
    *rc = curl_easy_perform(c);
    if (*rc == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
    curl_easy_cleanup(c);
    if (body)
        *body = b.data ? tp_buf_steal(&b) : tp_xstrdup("");
    tp_buf_free(&b);
    return st;
}

static bool log_has(const char *needle)
{
    for (int i = 0; i < 100; i++) {
        char *log = tp_read_file(S.log, NULL);
        bool found = log && strstr(log, needle);
        free(log);
        if (found)
            return true;
        usleep(100000);
    }
    return false;
}

static void test_https_verified(void)
{
    CURLcode rc;
    char *body = NULL;
    long st = https_get("/api/v1/datasets/users?prefix=user%201", CA_FILE, &rc, 0, &body);
    CHECK_MSG(rc == CURLE_OK, "curl: %s", curl_easy_strerror(rc));
    CHECK_INT_EQ(st, 200);
    CHECK_CONTAINS(body, "\"user 1\"");
    free(body);
    /* without the test CA the certificate does not verify */
    st = https_get("/healthz", "/dev/null", &rc, 0, NULL);
    CHECK(rc != CURLE_OK);
    /* plain HTTP stays on, with the same problem+json */
    resp_t r = get(&S, "/api/v1/datasets/nope");
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
}

typedef struct tls_sse {
    tp_buf_t b;
    bool notified;
} tls_sse_t;

static size_t tls_sse_body(char *p, size_t sz, size_t n, void *arg)
{
    tls_sse_t *t = arg;
    tp_buf_append(&t->b, p, sz * n);
    return strstr(t->b.data, "event: sync") ? 0 : sz * n; /* 0: enough, stop */
}

/* Once the stream has started, a sync commits (NOTIFY as tidepool-sync sends). */
static int tls_sse_progress(void *arg, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    (void)a, (void)b, (void)c, (void)d;
    tls_sse_t *t = arg;
    if (!t->notified && t->b.data && strstr(t->b.data, "retry: 3000")) {
        t->notified = true;
        free(tp_test_sql(DSN, "SELECT pg_notify('tidepool_sync', 'daily_metrics:5')"));
    }
    return 0;
}

/* GET /api/v1/events streams over TLS like over plain HTTP. */
static void test_events_over_tls(void)
{
    CURL *c = curl_easy_init();
    char url[256];
    snprintf(url, sizeof url, "https://127.0.0.1:%d/api/v1/events", TLS_PORT);
    tls_sse_t t = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, CA_FILE);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 20L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, tls_sse_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, tls_sse_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &t);
    CURLcode rc = curl_easy_perform(c);
    long st = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
    curl_easy_cleanup(c);
    CHECK_MSG(rc == CURLE_WRITE_ERROR, "curl: %s", curl_easy_strerror(rc)); /* we stopped it */
    CHECK_INT_EQ(st, 200);
    CHECK(t.notified);
    CHECK_CONTAINS(t.b.data, "\"job\":\"daily_metrics\",\"generation\":5");
    tp_buf_free(&t.b);
    /* the TLS client went away: its stream is freed */
    long v = -1;
    for (int i = 0; i < 100 && (v = harness_metric(&S, "tidepool_event_streams")) != 0; i++)
        usleep(100000);
    CHECK_INT_EQ(v, 0);
}

static void test_tls11_refused(void)
{
    int reason = 0;
    CHECK_INT_EQ(handshake(TLS1_1_VERSION, TLS1_1_VERSION, &reason), -1);
    CHECK_MSG(reason == SSL_R_TLSV1_ALERT_PROTOCOL_VERSION,
              "TLS 1.1 failed with reason %d, not the server's protocol_version alert", reason);
    /* the same client allowed TLS 1.2 gets through: the refusal was the server's */
    CHECK_INT_EQ(handshake(TLS1_1_VERSION, TLS1_2_VERSION, &reason), 1);
    CHECK_INT_EQ(handshake(TLS1_3_VERSION, TLS1_3_VERSION, &reason), 1);
    CURLcode rc;
    https_get("/healthz", CA_FILE, &rc, CURL_SSLVERSION_TLSv1_1 | CURL_SSLVERSION_MAX_TLSv1_1, NULL);
    CHECK(rc != CURLE_OK);
}

static void test_reload_swaps_cert(void)
{
    int reason;
    CHECK_INT_EQ(handshake(TLS1_2_VERSION, TLS1_3_VERSION, &reason), 1);
    server_cert(2);
    kill(S.pid, SIGHUP);
    CHECK(log_has("TLS certificate and key reloaded"));
    long serial = -1;
    for (int i = 0; i < 50 && serial != 2; i++) {
        serial = handshake(TLS1_2_VERSION, TLS1_3_VERSION, &reason);
        if (serial != 2)
            usleep(100000);
    }
    CHECK_INT_EQ(serial, 2);
    /* a broken certificate keeps the previous pair and says why */
    FILE *f = fopen(CERT_FILE, "w");
    fputs("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", f);
    fclose(f);
    kill(S.pid, SIGHUP);
    CHECK(log_has("TLS reload failed"));
    CHECK(log_has("server.tls_cert"));
    CHECK_INT_EQ(handshake(TLS1_2_VERSION, TLS1_3_VERSION, &reason), 2);
    CURLcode rc;
    CHECK_INT_EQ(https_get("/healthz", CA_FILE, &rc, 0, NULL), 200);
    /* the key never appears in the log */
    char *log = tp_read_file(S.log, NULL);
    CHECK(log && strstr(log, "PRIVATE KEY") == NULL);
    free(log);
}

/* n GETs of /healthz on one libcurl handle; fresh = a new connection (and
 * TLS handshake) each time. Returns requests per second, 0 on any failure. */
static double rate(bool tls, bool fresh, int n)
{
    CURL *c = curl_easy_init();
    char url[128];
    snprintf(url, sizeof url, "%s://127.0.0.1:%d/healthz", tls ? "https" : "http",
             tls ? TLS_PORT : S.port);
    tp_buf_t b = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, CA_FILE);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_FORBID_REUSE, fresh ? 1L : 0L);
    int64_t t0 = tp_now_us();
    bool ok = true;
    for (int i = 0; i < n && ok; i++) {
        long st = 0;
        ok = curl_easy_perform(c) == CURLE_OK &&
             curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st) == CURLE_OK && st == 200;
    }
    int64_t us = tp_now_us() - t0;
    curl_easy_cleanup(c);
    tp_buf_free(&b);
    return ok && us > 0 ? n * 1e6 / (double)us : 0;
}

/* Figures for the report (printed, not asserted beyond every answer being 200). */
static void test_measure(void)
{
    double http = rate(false, false, 300), https = rate(true, false, 300);
    double hs = rate(true, true, 100);
    CHECK(http > 0 && https > 0 && hs > 0);
    printf("# keep-alive GET /healthz: http %.0f req/s, https %.0f req/s; "
           "new TLS connection per request: %.0f req/s\n",
           http, https, hs);
}

static void test_bad_cert_at_start(void)
{
    char *bad = tp_test_write_tmp("bad.crt", "garbage\n");
    char conf[1024];
    snprintf(conf, sizeof conf,
             "[server]\nlisten = 127.0.0.1:%d\ntls_listen = 127.0.0.1:%d\ntls_cert = %s\n"
             "tls_key = %s\n[postgres]\ndsn = %s\n",
             tp_test_free_port(), tp_test_free_port(), bad, KEY_FILE, DSN);
    char *path = tp_test_write_tmp("bad-tls.conf", conf);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --config %s 2>&1", tp_test_bin("tidepool-server"), path);
    char *out = NULL;
    CHECK_INT_EQ(tp_test_cmd(cmd, &out), 2);
    CHECK_CONTAINS(out, "server.tls_cert: cannot use");
    CHECK_CONTAINS(out, bad);
    free(out);
    free(path);
    free(bad);
}

int main(void)
{
    CA_FILE = tp_xasprintf("%s/ca.crt", tp_test_tmpdir());
    CERT_FILE = tp_xasprintf("%s/server.crt", tp_test_tmpdir());
    KEY_FILE = tp_xasprintf("%s/server.key", tp_test_tmpdir());
    CA_KEY = EVP_EC_gen("P-256");
    CA_CERT = cert_new(CA_KEY, 1000, "Tidepool Test CA", NULL, NULL);
    write_pem(CA_FILE, CA_CERT, NULL);
    server_cert(1);
    TLS_PORT = tp_test_free_port();
    char conf[1024];
    snprintf(conf, sizeof conf, "tls_listen = 127.0.0.1:%d\ntls_cert = %s\ntls_key = %s\n",
             TLS_PORT, CERT_FILE, KEY_FILE);
    S.extra_conf = conf; /* lands in [server] */
    if (harness_setup(&S, "test_server_tls", &DSN, 2)) {
        TP_RUN(test_https_verified);
        TP_RUN(test_tls11_refused);
        TP_RUN(test_events_over_tls);
        TP_RUN(test_reload_swaps_cert);
        TP_RUN(test_bad_cert_at_start);
        TP_RUN(test_measure);
        harness_finish(&S);
    }
    X509_free(CA_CERT);
    EVP_PKEY_free(CA_KEY);
    free(CA_FILE);
    free(CERT_FILE);
    free(KEY_FILE);
    return tp_test_done();
}
