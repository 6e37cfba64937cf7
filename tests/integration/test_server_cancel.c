/* tidepool-server cancels the Postgres statement of a client that left: a
 * dataset read (pg_sleep through a definition) and a table read (an exposed
 * view that sleeps), each from a raw socket closed while Postgres works. The
 * backend must be idle again within seconds (pg_stat_activity), the request is
 * logged as 499, and the server keeps answering normally. */
#include "server_harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static srv_h_t S;
static const char *DSN;

/* Active backends running a statement that contains needle (not ours). */
static int active_with(const char *needle)
{
    char *sql = tp_xasprintf("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                             " AND pid <> pg_backend_pid() AND query LIKE '%%%s%%'",
                             needle);
    char *v = tp_test_sql(DSN, sql);
    int n = v ? atoi(v) : -1;
    free(v);
    free(sql);
    return n;
}

static bool wait_active(const char *needle, int want, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        if (active_with(needle) == want)
            return true;
        usleep(50 * 1000);
    }
    return false;
}

/* Sends a GET for path and returns the open socket (the caller closes it). */
static int send_get(const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)S.port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    return fd;
}

static int log_count(const char *needle)
{
    char *log = tp_read_file(S.log, NULL);
    int n = 0;
    for (const char *p = log; p && (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(log);
    return n;
}

static void leave_while_postgres_works(const char *path, const char *needle, int nth)
{
    int fd = send_get(path);
    CHECK(fd >= 0);
    CHECK_MSG(wait_active(needle, 1, 5000), "the statement never started (%s)", path);
    int64_t t0 = tp_now_ms();
    close(fd); /* the client gives up */
    CHECK_MSG(wait_active(needle, 0, 3000), "the backend still runs %s after the client left",
              needle);
    CHECK(tp_now_ms() - t0 < 3000);
    /* the backend is idle (not terminated) and serves the next read */
    for (int i = 0; i < 40 && log_count("\"status\":\"499\"") < nth; i++)
        usleep(50 * 1000);
    CHECK_INT_EQ(log_count("\"status\":\"499\""), nth);
    CHECK_INT_EQ(log_count("client left before its answer"), nth);
    resp_t r = get(&S, "/api/v1/datasets/slow?secs=0.01");
    CHECK_INT_EQ(r.status, 200);
    resp_free(&r);
}

static void dataset_read_is_cancelled(void)
{
    leave_while_postgres_works("/api/v1/datasets/slow?secs=30", "pg_sleep", 1);
}

static void table_read_is_cancelled(void)
{
    leave_while_postgres_works("/api/v1/tables/iot.sleepy", "sleepy", 2);
}

/* A client that waits gets its answer: watching for closes changes nothing. */
static void patient_client_is_answered(void)
{
    resp_t r = get(&S, "/api/v1/datasets/slow?secs=0.3");
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(r.body, "slept");
    resp_free(&r);
    CHECK_INT_EQ(log_count("\"status\":\"499\""), 2);
}

int main(void)
{
    DSN = tp_test_dsn();
    if (!DSN) {
        tp_test_skip("test_server_cancel", "no harness Postgres");
        return tp_test_done();
    }
    (void)harness_setup; /* the view must exist before the server starts */
    (void)hdr;
    (void)problem_field;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    bool ok = harness_db(DSN);
    free(tp_test_sql(DSN, "CREATE FUNCTION iot.sleepy_marker() RETURNS int LANGUAGE sql AS"
                          " 'SELECT 1 FROM pg_sleep(30)';"
                          "CREATE VIEW iot.sleepy AS SELECT iot.sleepy_marker() AS id;"
                          "COMMENT ON VIEW iot.sleepy IS '@expose'"));
    harness_write_defs(&S);
    if (!ok || !harness_start(&S, DSN, 1) || !harness_ready(&S)) {
        tp_test_fail(__FILE__, __LINE__, "server did not start; see %s", S.log);
        return tp_test_done();
    }
    TP_RUN(dataset_read_is_cancelled);
    TP_RUN(table_read_is_cancelled);
    TP_RUN(patient_client_is_answered);
    harness_finish(&S);
    return tp_test_done();
}
