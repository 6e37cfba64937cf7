/* tidepool-server write-back over real HTTP against the harness Postgres (issue 7,
 * docs/writeback.md): POST one row / an array, PATCH, bulk PATCH, DELETE, each
 * answering the rows as written with ETag; Idempotency-Key (a retried POST
 * writes one row and one audit entry, the same key with another body is 409);
 * If-Match (concurrent PATCHes with the same version: one 200, the rest 412
 * with the current row); 2,000 concurrent requests with random retries end
 * with exactly the expected rows and audit entries; bad input answered with
 * problem+json naming the field and nothing written; Postgres killing the
 * connection mid-write -> 503 and a safe retry with the same key; roles
 * (auth mode token: reader 403, writer allowed); row-level scoping (404 for
 * another author's note); /api/v1/sync and NOTIFY tidepool_trigger;
 * outbox backlog in /metrics; OpenAPI; purge of expired keys; SIGHUP
 * re-reflection; writes on postgres.dsn when reads use a read-only read_dsn. */
#include "server_harness.h"

#include "tidepool/isots.h"

#include <openssl/sha.h>
#include <poll.h>
#include <pthread.h>

static srv_h_t S;
static const char *DSN;
static const char *ALICE = "tpk_alice-writer-secret";
static const char *BOB = "tpk_bob-writer-secret";
static const char *READER = "tpk_reader-only-secret";
static const char *BOSS = "tpk_boss-admin-secret";

static void sha_hex(const char *s, char out[65])
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)s, strlen(s), d);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* One write as token (NULL = none) with optional If-Match and Idempotency-Key. */
static resp_t wr(const char *token, const char *method, const char *path, const char *body,
                 const char *if_match, const char *key)
{
    char a[160], im[160], k[320];
    const char *hs[6];
    int n = 0;
    if (token) {
        snprintf(a, sizeof a, "Authorization: Bearer %s", token);
        hs[n++] = a;
    }
    if (body)
        hs[n++] = "Content-Type: application/json";
    if (if_match) {
        snprintf(im, sizeof im, "If-Match: %s", if_match);
        hs[n++] = im;
    }
    if (key) { /* "Name;" is how curl sends a header with an empty value */
        snprintf(k, sizeof k, *key ? "Idempotency-Key: %s" : "Idempotency-Key;", key);
        hs[n++] = k;
    }
    hs[n] = NULL;
    return http(&S, method, path, hs, body, body ? strlen(body) : 0);
}

static long long sql_int(const char *q)
{
    char *v = tp_test_sql(DSN, q);
    long long n = v ? atoll(v) : -1;
    free(v);
    return n;
}

static long long audit_count(void)
{
    return sql_int("SELECT count(*) FROM tidepool.audit_log");
}

/* True when s is already in the canonical UTC form (tidepool/isots.h). */
static bool canonical_utc(const char *s)
{
    char out[TP_ISOTS_MAX];
    size_t n = s ? strlen(s) : 0;
    return n > 6 && tp_isots_canon(s, n, true, out) == n && strcmp(out, s) == 0 &&
           strcmp(s + n - 6, "+00:00") == 0;
}

/* Write answers (to_jsonb in SQL) and table reads (the C encoder) give the
 * same timestamp text, in UTC although the server's environment asks for
 * another zone ($PGOPTIONS, set in main), equal to to_json's in UTC. */
static void test_timestamps_agree(void)
{
    resp_t w = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
                  "{\"user_id\": 3, \"note\": \"when\"}", NULL, "k-when");
    CHECK_INT_EQ(w.status, 201);
    long long id = json_integer_value(json_object_get(w.json, "id"));
    char path[160];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%lld", id);
    resp_t p = wr(ALICE, "PATCH", path, "{\"note\": \"later\"}", "\"1\"", NULL);
    CHECK_INT_EQ(p.status, 200);
    json_t *pj = p.json;
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes?id=eq.%lld", id);
    resp_t r = wr(ALICE, "GET", path, NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    json_t *row = json_array_get(r.json, 0);
    char q[200];
    snprintf(q, sizeof q, "SET TimeZone = UTC; SELECT to_json(created_at)::text || ' ' || "
                          "to_json(updated_at)::text FROM app.user_notes WHERE id = %lld", id);
    char *tj = tp_test_sql(DSN, q);
    static const char *const cols[] = {"created_at", "updated_at"};
    for (int c = 0; c < 2; c++) {
        const char *read = json_string_value(json_object_get(row, cols[c]));
        CHECK_MSG(canonical_utc(read), "%s read as %s", cols[c], read ? read : "(none)");
        const char *patched = json_string_value(json_object_get(pj, cols[c]));
        CHECK_STR_EQ(patched ? patched : "", read ? read : "");
        char quoted[TP_ISOTS_MAX + 2];
        snprintf(quoted, sizeof quoted, "\"%s\"", read ? read : "");
        CHECK_CONTAINS(tj ? tj : "", quoted);
    }
    const char *created = json_string_value(json_object_get(w.json, "created_at"));
    CHECK_STR_EQ(created ? created : "", json_string_value(json_object_get(row, "created_at")));
    free(tj);
    resp_free(&r);
    resp_free(&p);
    resp_free(&w);
}

static void test_post_idempotent(void)
{
    const char *body = "{\"user_id\": 1, \"note\": \"first note\"}";
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes", body, NULL, "k-first");
    CHECK_INT_EQ(r.status, 201);
    CHECK_STR_EQ(hdr(&r, "ETag"), "\"1\"");
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "author")), "token:alice");
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "note")), "first note");
    CHECK(json_integer_value(json_object_get(r.json, "id")) > 0);
    char *first = tp_xstrdup(r.body);
    resp_free(&r);
    /* the retry is answered from the stored response, nothing written again */
    r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes", body, NULL, "k-first");
    CHECK_INT_EQ(r.status, 201);
    CHECK_STR_EQ(r.body, first);
    CHECK_STR_EQ(hdr(&r, "Idempotent-Replayed"), "true");
    CHECK_STR_EQ(hdr(&r, "ETag"), "\"1\"");
    resp_free(&r);
    free(first);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note = 'first note'"), 1);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM tidepool.audit_log WHERE after->>'note' = "
                         "'first note' AND actor = 'token:alice' AND action = 'insert'"),
                 1);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM tidepool.idempotency_keys WHERE key = 'k-first'"),
                 1);
    /* same key, another body */
    r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes", "{\"user_id\": 1, \"note\": \"other\"}",
           NULL, "k-first");
    CHECK_PROBLEM(r, 409, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "idempotency-key-reused");
    resp_free(&r);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note = 'other'"), 0);
    /* keys are per actor: bob's k-first is his own */
    r = wr(BOB, "POST", "/api/v1/tables/app.user_notes", body, NULL, "k-first");
    CHECK_INT_EQ(r.status, 201);
    CHECK(!hdr(&r, "Idempotent-Replayed"));
    resp_free(&r);
}

static void test_post_array(void)
{
    long long before = audit_count();
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
                  "[{\"user_id\": 2, \"note\": \"a1\"}, {\"user_id\": 3, \"note\": \"a2\"},"
                  " {\"user_id\": 4, \"note\": \"a3\"}]",
                  NULL, NULL);
    CHECK_INT_EQ(r.status, 201);
    CHECK_INT_EQ(json_array_size(r.json), 3);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(r.json, 2), "note")), "a3");
    resp_free(&r);
    CHECK_INT_EQ(audit_count(), before + 3);
    /* one bad item: nothing of the array is written */
    r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
           "[{\"user_id\": 5, \"note\": \"b1\"}, {\"user_id\": 6, \"note\": null}]", NULL, NULL);
    CHECK_PROBLEM(r, 422, NULL);
    CHECK_CONTAINS(r.body, "note");
    resp_free(&r);
    /* a CHECK constraint failing in Postgres (user_id > 0): 422 naming it, no row */
    r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
           "[{\"user_id\": 7, \"note\": \"c1\"}, {\"user_id\": -1, \"note\": \"c2\"}]", NULL, NULL);
    CHECK_PROBLEM(r, 422, NULL);
    CHECK_CONTAINS(r.body, "user_id");
    resp_free(&r);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note IN ('b1', 'c1')"), 0);
    CHECK_INT_EQ(audit_count(), before + 3);
}

static long long new_note(const char *token, const char *note)
{
    char body[256];
    snprintf(body, sizeof body, "{\"user_id\": 9, \"note\": \"%s\"}", note);
    resp_t r = wr(token, "POST", "/api/v1/tables/app.user_notes", body, NULL, NULL);
    CHECK_INT_EQ(r.status, 201);
    long long id = json_integer_value(json_object_get(r.json, "id"));
    resp_free(&r);
    return id;
}

static void test_patch_delete(void)
{
    long long id = new_note(ALICE, "to edit");
    char path[128];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%lld", id);
    resp_t r = wr(ALICE, "PATCH", path, "{\"note\": \"edited\"}", "\"1\"", NULL);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "ETag"), "\"2\"");
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "note")), "edited");
    CHECK_INT_EQ(json_integer_value(json_object_get(r.json, "version")), 2);
    resp_free(&r);
    /* stale: 412 with the current row */
    r = wr(ALICE, "PATCH", path, "{\"note\": \"lost update\"}", "\"1\"", NULL);
    CHECK_PROBLEM(r, 412, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(json_object_get(r.json, "current"), "note")),
                 "edited");
    CHECK_STR_EQ(hdr(&r, "ETag"), "\"2\"");
    resp_free(&r);
    /* no If-Match on an if_match=optional table: allowed */
    r = wr(ALICE, "PATCH", path, "{\"note\": \"edited again\"}", NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(hdr(&r, "ETag"), "\"3\"");
    resp_free(&r);
    r = wr(ALICE, "DELETE", path, NULL, "\"2\"", NULL);
    CHECK_PROBLEM(r, 412, NULL);
    resp_free(&r);
    r = wr(ALICE, "DELETE", path, NULL, "\"3\"", NULL);
    CHECK_INT_EQ(r.status, 200);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "note")), "edited again");
    resp_free(&r);
    r = wr(ALICE, "DELETE", path, NULL, NULL, NULL);
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    char q[200];
    snprintf(q, sizeof q,
             "SELECT string_agg(action, ',' ORDER BY id) FROM tidepool.audit_log WHERE "
             "table_name = 'app.user_notes' AND pk->>'id' = '%lld'",
             id);
    char *acts = tp_test_sql(DSN, q);
    CHECK_STR_EQ(acts, "insert,update,update,delete");
    free(acts);
    /* wrong routes */
    r = wr(ALICE, "DELETE", "/api/v1/tables/app.user_notes", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 405, NULL);
    resp_free(&r);
    r = wr(ALICE, "POST", path, "{}", NULL, NULL);
    CHECK_PROBLEM(r, 405, NULL);
    resp_free(&r);
    r = wr(ALICE, "POST", "/api/v1/tables/iot.users", "{}", NULL, NULL); /* @expose only */
    CHECK_PROBLEM(r, 405, NULL);
    CHECK_STR_EQ(hdr(&r, "Allow"), "GET, HEAD");
    resp_free(&r);
    r = wr(ALICE, "POST", "/api/v1/%74ables/app.user_notes", "{}", NULL, NULL);
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.user_notes/1/2", "{}", NULL, NULL);
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
}

static void test_bulk_patch_and_outbox(void)
{
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.device_assignments",
                  "[{\"device_id\": 1, \"user_id\": 1}, {\"device_id\": 2, \"user_id\": 2},"
                  " {\"device_id\": 3, \"user_id\": 3}]",
                  NULL, "dev-1");
    CHECK_INT_EQ(r.status, 201);
    resp_free(&r);
    /* if_match=required */
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.device_assignments/1", "{\"note\": \"x\"}", NULL,
           NULL);
    CHECK_PROBLEM(r, 428, NULL);
    resp_free(&r);
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.device_assignments",
           "[{\"device_id\": 1, \"changes\": {\"note\": \"one\"}, \"if_match\": 1},"
           " {\"device_id\": 3, \"changes\": {\"user_id\": 30}, \"if_match\": 1}]",
           NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    CHECK_INT_EQ(json_array_size(r.json), 2);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(r.json, 1), "user_id")), 30);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(r.json, 0), "version")), 2);
    resp_free(&r);
    /* one stale item: all or nothing */
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.device_assignments",
           "[{\"device_id\": 2, \"changes\": {\"note\": \"two\"}, \"if_match\": 1},"
           " {\"device_id\": 1, \"changes\": {\"note\": \"stale\"}, \"if_match\": 1}]",
           NULL, NULL);
    CHECK_PROBLEM(r, 412, NULL);
    resp_free(&r);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.device_assignments WHERE note = 'two'"), 0);
    /* outbox: 3 inserts + 2 updates, none shipped */
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM tidepool.writeback_outbox WHERE table_name = "
                         "'app.device_assignments'"),
                 5);
    r = wr(ALICE, "GET", "/api/v1/sync", NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    json_t *ob = json_object_get(r.json, "outbox");
    CHECK_INT_EQ(json_array_size(ob), 1);
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(ob, 0), "table")),
                 "app.device_assignments");
    CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(ob, 0), "backlog")), 5);
    CHECK_INT_EQ(json_integer_value(json_object_get(r.json, "backlog")), 5);
    CHECK(json_array_size(json_object_get(r.json, "jobs")) >= 2);
    resp_free(&r);
    /* /metrics (admin only): the status thread's snapshot (refreshed every few seconds) */
    bool seen = false;
    for (int i = 0; i < 80 && !seen; i++) {
        r = wr(BOSS, "GET", "/metrics", NULL, NULL, NULL);
        seen = strstr(r.body, "tidepool_writeback_outbox_backlog{table=\"app.device_assignments\"} 5") != NULL;
        resp_free(&r);
        if (!seen)
            usleep(100000);
    }
    CHECK_MSG(seen, "backlog gauge not in /metrics");
}

static void test_bad_input(void)
{
    long long before = audit_count();
    long long id = new_note(ALICE, "bad input target");
    before++;
    char path[128];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%lld", id);
    static const char *T = "/api/v1/tables/app.user_notes";
    resp_t r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": ", NULL, NULL);
    CHECK_PROBLEM(r, 400, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "code")), "malformed-json");
    resp_free(&r);
    const char *hs[] = {"Authorization: Bearer tpk_alice-writer-secret",
                        "Content-Type: text/plain", NULL};
    r = http(&S, "POST", T, hs, "{\"user_id\": 1}", 14);
    CHECK_PROBLEM(r, 415, "Content-Type");
    resp_free(&r);
    r = wr(ALICE, "POST", "/api/v1/tables/app.nope", "{\"x\": 1}", NULL, NULL);
    CHECK_PROBLEM(r, 404, "table");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": \"n\", \"colour\": \"blue\"}", NULL,
           NULL);
    CHECK_PROBLEM(r, 422, "colour");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": \"one\", \"note\": \"n\"}", NULL, NULL);
    CHECK_PROBLEM(r, 422, "user_id");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": null}", NULL, NULL);
    CHECK_PROBLEM(r, 422, "note");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": \"n\", \"author\": \"someone\"}", NULL,
           NULL);
    CHECK_PROBLEM(r, 422, "author"); /* read-only: set from the caller */
    resp_free(&r);
    char big[400];
    snprintf(big, sizeof big, "{\"device_id\": 50, \"user_id\": 1, \"note\": \"%0250d\"}", 0);
    r = wr(ALICE, "POST", "/api/v1/tables/app.device_assignments", big, NULL, NULL);
    CHECK_PROBLEM(r, 422, "note");
    resp_free(&r);
    r = wr(ALICE, "PATCH", path, "{\"note\": \"x\"}", "W/\"1\"", NULL);
    CHECK_PROBLEM(r, 400, "If-Match");
    resp_free(&r);
    r = wr(ALICE, "PATCH", path, "{\"note\": \"x\"}", "\"abc\"", NULL);
    CHECK_PROBLEM(r, 400, "If-Match");
    resp_free(&r);
    r = wr(ALICE, "DELETE", "/api/v1/tables/app.device_assignments/2", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 428, NULL);
    resp_free(&r);
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.user_notes/not-a-number", "{\"note\": \"x\"}",
           NULL, NULL);
    CHECK_PROBLEM(r, 422, "id");
    resp_free(&r);
    r = wr(ALICE, "PATCH", "/api/v1/tables/app.user_notes/1%2C2", "{\"note\": \"x\"}", NULL, NULL);
    CHECK_PROBLEM(r, 422, "id");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": \"n\"}", NULL, "bad\x01key");
    CHECK_PROBLEM(r, 400, "Idempotency-Key");
    resp_free(&r);
    r = wr(ALICE, "POST", T, "{\"user_id\": 1, \"note\": \"n\"}", NULL, "");
    CHECK_PROBLEM(r, 400, "Idempotency-Key");
    resp_free(&r);
    CHECK_INT_EQ(audit_count(), before);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note = 'x'"), 0);
}

/* ---- concurrency ---- */

typedef struct pjob {
    const char *path;
    long status;
} pjob_t;

static pthread_barrier_t bar;

static void *patch_thread(void *arg)
{
    pjob_t *j = arg;
    char body[64];
    snprintf(body, sizeof body, "{\"note\": \"winner %p\"}", arg);
    pthread_barrier_wait(&bar);
    resp_t r = wr(ALICE, "PATCH", j->path, body, "\"1\"", NULL);
    j->status = r.status;
    resp_free(&r);
    return NULL;
}

static void test_concurrent_if_match(void)
{
    long long id = new_note(ALICE, "contended");
    char path[128];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%lld", id);
    enum { N = 8 };
    pthread_t th[N];
    pjob_t jobs[N];
    pthread_barrier_init(&bar, NULL, N);
    for (int i = 0; i < N; i++) {
        jobs[i].path = path;
        jobs[i].status = 0;
        pthread_create(&th[i], NULL, patch_thread, &jobs[i]);
    }
    int ok = 0, stale = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ok += jobs[i].status == 200;
        stale += jobs[i].status == 412;
    }
    pthread_barrier_destroy(&bar);
    CHECK_INT_EQ(ok, 1);
    CHECK_INT_EQ(stale, N - 1);
    char q[160];
    snprintf(q, sizeof q, "SELECT version FROM app.user_notes WHERE id = %lld", id);
    CHECK_INT_EQ(sql_int(q), 2);
}

typedef struct ljob {
    int set; /* key set: two threads share each set, so their keys race */
    int per;
    int sent, errors;
    unsigned seed;
} ljob_t;

static void *load_thread(void *arg)
{
    ljob_t *j = arg;
    CURL *c = curl_easy_init();
    char url[128], a[160];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/api/v1/tables/app.user_notes", S.port);
    snprintf(a, sizeof a, "Authorization: Bearer %s", ALICE);
    for (int i = 0; i < j->per; i++) {
        int tries = 1 + (rand_r(&j->seed) % 4 == 0); /* a quarter retried */
        for (int t = 0; t < tries; t++) {
            char key[64], body[96], kh[96];
            snprintf(key, sizeof key, "load-%d-%d", j->set, i);
            snprintf(kh, sizeof kh, "Idempotency-Key: %s", key);
            snprintf(body, sizeof body, "{\"user_id\": 777, \"note\": \"%s\"}", key);
            struct curl_slist *sl = NULL;
            sl = curl_slist_append(sl, a);
            sl = curl_slist_append(sl, kh);
            sl = curl_slist_append(sl, "Content-Type: application/json");
            sl = curl_slist_append(sl, "Expect:");
            tp_buf_t sink = {0};
            curl_easy_setopt(c, CURLOPT_URL, url);
            curl_easy_setopt(c, CURLOPT_HTTPHEADER, sl);
            curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
            curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
            curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
            curl_easy_setopt(c, CURLOPT_TIMEOUT, 20L);
            long st = 0;
            if (curl_easy_perform(c) == CURLE_OK)
                curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
            j->sent++;
            if (st != 201) {
                j->errors++;
                fprintf(stderr, "# load: status %ld: %.200s\n", st, sink.data ? sink.data : "");
            }
            tp_buf_free(&sink);
            curl_slist_free_all(sl);
        }
    }
    curl_easy_cleanup(c);
    return NULL;
}

static void test_load_with_retries(void)
{
    enum { THREADS = 16, SETS = 8, PER = 100 };
    long long audit0 = audit_count();
    pthread_t th[THREADS];
    ljob_t jobs[THREADS];
    int64_t t0 = tp_now_ms();
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (ljob_t){.set = i % SETS, .per = PER, .seed = (unsigned)(i * 7919 + 1)};
        pthread_create(&th[i], NULL, load_thread, &jobs[i]);
    }
    int sent = 0, errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        sent += jobs[i].sent;
        errors += jobs[i].errors;
    }
    int64_t ms = tp_now_ms() - t0;
    printf("# load: %d requests (%d distinct writes) in %lld ms, %.0f req/s\n", sent,
           SETS * PER, (long long)ms, ms ? sent * 1000.0 / (double)ms : 0.0);
    CHECK_INT_EQ(errors, 0);
    CHECK(sent >= THREADS * PER);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE user_id = 777"), SETS * PER);
    CHECK_INT_EQ(sql_int("SELECT count(DISTINCT note) FROM app.user_notes WHERE user_id = 777"),
                 SETS * PER);
    CHECK_INT_EQ(audit_count() - audit0, SETS * PER);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM tidepool.idempotency_keys WHERE key LIKE 'load-%'"),
                 SETS * PER);
}

/* A burst: KEYS distinct writes, each sent twice at once (the copies race),
 * all 2 x KEYS requests in flight together; answers the server sheds (503,
 * 429) are retried, as are a random tenth of the successes (a client that
 * lost the answer). Ends with exactly one row, audit entry and key per write. */
enum { BURST_KEYS = 600 };

typedef struct breq {
    CURL *h;
    struct curl_slist *sl;
    tp_buf_t sink, head;
    int key;
    bool done;
} breq_t;

static void burst_add(CURLM *m, breq_t *b, const char *auth)
{
    char kh[96];
    snprintf(kh, sizeof kh, "Idempotency-Key: burst-%d", b->key);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/api/v1/tables/app.user_notes", S.port);
    static char body[BURST_KEYS][80];
    snprintf(body[b->key], sizeof body[b->key], "{\"user_id\": 778, \"note\": \"burst %d\"}",
             b->key);
    b->h = curl_easy_init();
    b->sl = curl_slist_append(NULL, auth);
    b->sl = curl_slist_append(b->sl, kh);
    b->sl = curl_slist_append(b->sl, "Content-Type: application/json");
    b->sl = curl_slist_append(b->sl, "Expect:");
    tp_buf_init(&b->sink);
    tp_buf_init(&b->head);
    curl_easy_setopt(b->h, CURLOPT_HEADERFUNCTION, on_body);
    curl_easy_setopt(b->h, CURLOPT_HEADERDATA, &b->head);
    curl_easy_setopt(b->h, CURLOPT_URL, url);
    curl_easy_setopt(b->h, CURLOPT_HTTPHEADER, b->sl);
    curl_easy_setopt(b->h, CURLOPT_POSTFIELDS, body[b->key]);
    curl_easy_setopt(b->h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(b->h, CURLOPT_WRITEDATA, &b->sink);
    curl_easy_setopt(b->h, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(b->h, CURLOPT_PRIVATE, b);
    curl_multi_add_handle(m, b->h);
}

static void test_burst_of_writes(void)
{
    enum { N = 2 * BURST_KEYS };
    static breq_t reqs[N];
    char auth[160];
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", ALICE);
    long long audit0 = audit_count();
    CURLM *m = curl_multi_init();
    curl_multi_setopt(m, CURLMOPT_MAX_HOST_CONNECTIONS, (long)N);
    unsigned seed = 20261207;
    for (int i = 0; i < N; i++) {
        reqs[i] = (breq_t){.key = i % BURST_KEYS};
        burst_add(m, &reqs[i], auth);
    }
    int running = 1, left = N, shed = 0, replays = 0, bad = 0, resent = 0;
    int64_t deadline = tp_now_ms() + 120000;
    while (left > 0 && tp_now_ms() < deadline) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 50, NULL);
        CURLMsg *msg;
        int q;
        while ((msg = curl_multi_info_read(m, &q)) != NULL) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            breq_t *b;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&b);
            long st = 0;
            if (msg->data.result == CURLE_OK)
                curl_easy_getinfo(b->h, CURLINFO_RESPONSE_CODE, &st);
            bool again = false;
            if (st == 503 || st == 429) {
                shed++;
                again = true;
            } else if (st == 201) {
                if (strstr(b->head.data ? b->head.data : "", "Idempotent-Replayed: true"))
                    replays++; /* answered from the stored first answer */
                if (rand_r(&seed) % 10 == 0 && resent < N / 10) {
                    resent++;
                    again = true; /* the client never saw it: sends it again */
                }
            } else {
                bad++;
                fprintf(stderr, "# burst: status %ld (curl %d): %.200s\n", st,
                        (int)msg->data.result, b->sink.data ? b->sink.data : "");
            }
            curl_multi_remove_handle(m, b->h);
            curl_easy_cleanup(b->h);
            curl_slist_free_all(b->sl);
            tp_buf_free(&b->sink);
            tp_buf_free(&b->head);
            if (again)
                burst_add(m, b, auth);
            else
                left--;
        }
    }
    curl_multi_cleanup(m);
    printf("# burst: %d requests at once over %d keys: %d shed and retried, %d resent, "
           "%d replayed, %d bad, %d unfinished\n",
           N, BURST_KEYS, shed, resent, replays, bad, left);
    CHECK_INT_EQ(left, 0);
    CHECK_INT_EQ(bad, 0);
    /* every key was sent at least twice: all but its first write were replays */
    CHECK_INT_EQ(replays, N + resent - BURST_KEYS);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE user_id = 778"), BURST_KEYS);
    CHECK_INT_EQ(sql_int("SELECT count(DISTINCT note) FROM app.user_notes WHERE user_id = 778"),
                 BURST_KEYS);
    CHECK_INT_EQ(audit_count() - audit0, BURST_KEYS);
    CHECK_INT_EQ(
        sql_int("SELECT count(*) FROM tidepool.idempotency_keys WHERE key LIKE 'burst-%'"),
        BURST_KEYS);
}

/* ---- Postgres failing mid-write ---- */

typedef struct kjob {
    long status;
    char code[64];
} kjob_t;

static void *slow_post(void *arg)
{
    kjob_t *j = arg;
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
                  "{\"user_id\": 1, \"note\": \"slow write\"}", NULL, "k-slow");
    j->status = r.status;
    const char *c = json_string_value(json_object_get(r.json, "code"));
    snprintf(j->code, sizeof j->code, "%s", c ? c : "");
    resp_free(&r);
    return NULL;
}

static void test_pg_killed_mid_write(void)
{
    char *ok = tp_test_sql(
        DSN, "CREATE FUNCTION app.slow_trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
             "IF NEW.note = 'slow write' THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;"
             "CREATE TRIGGER slow BEFORE INSERT ON app.user_notes FOR EACH ROW EXECUTE "
             "FUNCTION app.slow_trg(); SELECT 'ok'");
    CHECK_STR_EQ(ok, "ok");
    free(ok);
    kjob_t j = {0};
    pthread_t th;
    pthread_create(&th, NULL, slow_post, &j);
    long long killed = 0;
    for (int i = 0; i < 50 && killed < 1; i++) {
        usleep(50000);
        killed = sql_int("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                         "state = 'active' AND query LIKE '%user_notes%' AND pid <> "
                         "pg_backend_pid()");
    }
    pthread_join(th, NULL);
    CHECK_INT_EQ(killed, 1);
    CHECK_INT_EQ(j.status, 503);
    CHECK_STR_EQ(j.code, "postgres-unavailable");
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note = 'slow write'"), 0);
    /* the retry with the same key (once the pool has reconnected) writes once */
    for (int i = 0; i < 50; i++) {
        slow_post(&j);
        if (j.status != 503)
            break;
        usleep(200000);
    }
    CHECK_INT_EQ(j.status, 201);
    slow_post(&j);
    CHECK_INT_EQ(j.status, 201);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note = 'slow write'"), 1);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM tidepool.audit_log WHERE after->>'note' = 'slow "
                         "write'"),
                 1);
    free(tp_test_sql(DSN, "DROP TRIGGER slow ON app.user_notes; SELECT 1"));
}

/* ---- roles, scoping, sync trigger ---- */

static void test_roles(void)
{
    resp_t r = wr(READER, "POST", "/api/v1/tables/app.user_notes",
                  "{\"user_id\": 1, \"note\": \"reader\"}", NULL, NULL);
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    r = wr(NULL, "POST", "/api/v1/tables/app.user_notes", "{\"user_id\": 1, \"note\": \"anon\"}",
           NULL, NULL);
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    /* admin implies writer (the server's role rule) */
    r = wr(BOSS, "POST", "/api/v1/tables/app.user_notes", "{\"user_id\": 1, \"note\": \"boss\"}",
           NULL, NULL);
    CHECK_INT_EQ(r.status, 201);
    resp_free(&r);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.user_notes WHERE note IN ('reader', 'anon')"),
                 0);
}

static void test_row_scoping(void)
{
    long long id = new_note(ALICE, "alice's own");
    char path[128];
    snprintf(path, sizeof path, "/api/v1/tables/app.user_notes/%lld", id);
    /* 404, not 403: another author's row is invisible, so its existence is not revealed */
    resp_t r = wr(BOB, "PATCH", path, "{\"note\": \"bob was here\"}", NULL, NULL);
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    r = wr(BOB, "DELETE", path, NULL, NULL, NULL);
    CHECK_PROBLEM(r, 404, NULL);
    resp_free(&r);
    char q[160];
    snprintf(q, sizeof q, "SELECT note || version FROM app.user_notes WHERE id = %lld", id);
    char *v = tp_test_sql(DSN, q);
    CHECK_STR_EQ(v, "alice's own1");
    free(v);
    /* reads are scoped the same way (migration 0003 exposes the table with owner=author) */
    long long bobs = new_note(BOB, "bob's own");
    CHECK(bobs > 0);
    bool alice_sees_hers = false, bob_sees_alices = false, bob_sees_his = false;
    for (int i = 0; i < 50 && !alice_sees_hers; i++) { /* tables are reflected in the background */
        r = wr(ALICE, "GET", "/api/v1/tables/app.user_notes?select=note,author&order=id.desc&limit=1000", NULL, NULL, NULL);
        alice_sees_hers = r.status == 200 && strstr(r.body, "alice's own") != NULL;
        CHECK(r.status != 200 || strstr(r.body, "bob's own") == NULL);
        CHECK(r.status != 200 || strstr(r.body, "token:bob") == NULL);
        resp_free(&r);
        if (!alice_sees_hers)
            usleep(100000);
    }
    CHECK_MSG(alice_sees_hers, "alice cannot read her own notes");
    r = wr(BOB, "GET", "/api/v1/tables/app.user_notes?select=note&author=eq.token:alice", NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    bob_sees_alices = strstr(r.body, "alice's own") != NULL;
    resp_free(&r);
    r = wr(BOB, "GET", "/api/v1/tables/app.user_notes?select=note", NULL, NULL, NULL);
    bob_sees_his = r.status == 200 && strstr(r.body, "bob's own") != NULL;
    resp_free(&r);
    CHECK_MSG(!bob_sees_alices, "a filter widened bob's scope to alice's notes");
    CHECK(bob_sees_his);
}

static void test_sync_trigger(void)
{
    char err[256];
    PGconn *c = tp_pg_connect(DSN, 5000, err, sizeof err);
    CHECK(c != NULL);
    if (!c)
        return;
    PQclear(PQexec(c, "LISTEN tidepool_trigger"));
    resp_t r = wr(READER, "POST", "/api/v1/sync/users/run", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 403, NULL);
    resp_free(&r);
    r = wr(BOSS, "POST", "/api/v1/sync/no_such_job/run", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 404, "job");
    resp_free(&r);
    r = wr(BOSS, "POST", "/api/v1/sync/bad%20name/run", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 422, "job");
    resp_free(&r);
    r = wr(BOSS, "GET", "/api/v1/sync/users/run", NULL, NULL, NULL);
    CHECK_PROBLEM(r, 405, NULL);
    resp_free(&r);
    r = wr(BOSS, "POST", "/api/v1/sync/users/run", NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 202);
    CHECK_STR_EQ(json_string_value(json_object_get(r.json, "job")), "users");
    resp_free(&r);
    char got[64] = "";
    for (int i = 0; i < 30 && !got[0]; i++) {
        struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
        poll(&p, 1, 100);
        PQconsumeInput(c);
        PGnotify *n;
        while ((n = PQnotifies(c))) {
            snprintf(got, sizeof got, "%s", n->extra);
            PQfreemem(n);
        }
    }
    CHECK_STR_EQ(got, "users");
    PQfinish(c);
}

static void test_openapi(void)
{
    /* the description needs a caller, and shows only what the caller may do */
    resp_t r = get(&S, "/api/v1/openapi.json");
    CHECK_PROBLEM(r, 401, NULL);
    resp_free(&r);
    r = wr(READER, "GET", "/api/v1/openapi.json", NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    json_t *rt = json_object_get(json_object_get(r.json, "paths"), "/api/v1/tables/app.user_notes");
    CHECK(json_object_get(rt, "post") == NULL); /* @writable roles=writer */
    CHECK(json_object_get(json_object_get(r.json, "paths"),
                          "/api/v1/tables/app.user_notes/{pk}") == NULL);
    resp_free(&r);
    r = wr(ALICE, "GET", "/api/v1/openapi.json", NULL, NULL, NULL);
    CHECK_INT_EQ(r.status, 200);
    json_t *paths = json_object_get(r.json, "paths");
    json_t *t = json_object_get(paths, "/api/v1/tables/app.user_notes");
    CHECK(json_object_get(t, "post") != NULL);
    CHECK(json_object_get(t, "patch") != NULL);
    json_t *k = json_object_get(paths, "/api/v1/tables/app.user_notes/{pk}");
    CHECK(json_object_get(k, "delete") != NULL);
    CHECK(json_object_get(paths, "/api/v1/sync") != NULL);
    CHECK_CONTAINS(r.body, "\"readOnly\":true");
    resp_free(&r);
}

static void test_purge_expired_keys(void)
{
    free(tp_test_sql(DSN, "INSERT INTO tidepool.idempotency_keys(actor, key, method, path, "
                          "request_hash, status, response, created_at, expires_at) VALUES "
                          "('token:alice', 'old-key', 'POST', '/x', repeat('a', 64), 201, '{}', "
                          "now() - interval '2 days', now() - interval '1 day'); SELECT 1"));
    long long n = 1;
    for (int i = 0; i < 50 && n; i++) {
        usleep(100000);
        n = sql_int("SELECT count(*) FROM tidepool.idempotency_keys WHERE key = 'old-key'");
    }
    CHECK_INT_EQ(n, 0);
    CHECK(sql_int("SELECT count(*) FROM tidepool.idempotency_keys") > 0); /* live keys stay */
}

/* server.idempotency_ttl sets how long a key is kept (90m in this config). */
static void test_key_ttl_from_config(void)
{
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
                  "{\"user_id\": 3, \"note\": \"ttl\"}", NULL, "ttl-key");
    CHECK_INT_EQ(r.status, 201);
    resp_free(&r);
    CHECK_INT_EQ(sql_int("SELECT extract(epoch FROM expires_at - created_at)::bigint "
                         "FROM tidepool.idempotency_keys WHERE key = 'ttl-key'"),
                 90 * 60);
}

static void test_sighup_reflects(void)
{
    free(tp_test_sql(DSN, "CREATE TABLE app.targets(id int PRIMARY KEY, steps int NOT NULL,"
                          " version bigint NOT NULL DEFAULT 1);"
                          "COMMENT ON TABLE app.targets IS '@writable roles=writer'; SELECT 1"));
    const char *body = "{\"id\": 1, \"steps\": 9000}";
    resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.targets", body, NULL, NULL);
    CHECK_PROBLEM(r, 404, "table");
    resp_free(&r);
    kill(S.pid, SIGHUP);
    long st = 0;
    for (int i = 0; i < 100 && st != 201; i++) {
        usleep(100000);
        r = wr(ALICE, "POST", "/api/v1/tables/app.targets", body, NULL, NULL);
        st = r.status;
        resp_free(&r);
    }
    CHECK_INT_EQ(st, 201);
}

/* Reads on a read-only replica DSN: writes must still go to postgres.dsn (the
 * read_dsn here refuses writes, so a write sent through the read pool fails). */
static void test_writes_use_primary_with_read_dsn(void)
{
    srv_h_t s2 = {0};
    snprintf(s2.qdir, sizeof s2.qdir, "%s", S.qdir);
    char extra[1024];
    snprintf(extra, sizeof extra,
             "[postgres]\nread_dsn = %s options='-c default_transaction_read_only=on'\n", DSN);
    s2.extra_conf = extra;
    CHECK(harness_start(&s2, DSN, 1));
    srv_h_t keep = S;
    S = s2;
    long st = 0;
    for (int i = 0; i < 100 && st != 201; i++) {
        resp_t r = wr(NULL, "POST", "/api/v1/tables/app.targets", "{\"id\": 2, \"steps\": 1}",
                      NULL, "replica-1");
        st = r.status;
        resp_free(&r);
        if (st != 201)
            usleep(100000);
    }
    CHECK_INT_EQ(st, 201);
    CHECK_INT_EQ(sql_int("SELECT count(*) FROM app.targets WHERE id = 2"), 1);
    s2 = S;
    S = keep;
    CHECK_INT_EQ(tp_test_stop(s2.pid, 15000), 0);
    free(s2.conf);
    free(s2.log);
}

int main(void)
{
    char ah[65], bh[65], rh[65], xh[65], conf[1024];
    sha_hex(ALICE, ah);
    sha_hex(BOB, bh);
    sha_hex(READER, rh);
    sha_hex(BOSS, xh);
    snprintf(conf, sizeof conf,
             "[auth]\nmode = token\ntokens = alice:writer:%s, bob:writer:%s, rdr:reader:%s, "
             "boss:admin:%s\nrate_per_identity = 1000000\nburst_per_identity = 1000000\n"
             "rate_per_address = 1000000\nburst_per_address = 1000000\n"
             "[server]\nidempotency_ttl = 90m\n",
             ah, bh, rh, xh);
    S.extra_conf = conf;
    setenv("TIDEPOOL_WB_PURGE_MS", "300", 1);
    setenv("PGOPTIONS", "-c TimeZone=Asia/Kolkata", 1); /* the server must answer in UTC anyway */
    if (!harness_setup(&S, "test_server_writes", &DSN, 2))
        return tp_test_done();
    /* writable tables are reflected by the status thread shortly after start */
    long st = 0;
    for (int i = 0; i < 100 && st != 201; i++) {
        resp_t r = wr(ALICE, "POST", "/api/v1/tables/app.user_notes",
                      "{\"user_id\": 1, \"note\": \"warm-up\"}", NULL, "warm-up");
        st = r.status;
        resp_free(&r);
        if (st != 201)
            usleep(100000);
    }
    CHECK_INT_EQ(st, 201);
    TP_RUN(test_post_idempotent);
    TP_RUN(test_timestamps_agree);
    TP_RUN(test_post_array);
    TP_RUN(test_patch_delete);
    TP_RUN(test_bulk_patch_and_outbox);
    TP_RUN(test_bad_input);
    TP_RUN(test_concurrent_if_match);
    TP_RUN(test_load_with_retries);
    TP_RUN(test_burst_of_writes);
    TP_RUN(test_pg_killed_mid_write);
    TP_RUN(test_roles);
    TP_RUN(test_row_scoping);
    TP_RUN(test_sync_trigger);
    TP_RUN(test_openapi);
    TP_RUN(test_purge_expired_keys);
    TP_RUN(test_key_ttl_from_config);
    TP_RUN(test_sighup_reflects);
    TP_RUN(test_writes_use_primary_with_read_dsn);
    harness_finish(&S);
    return tp_test_done();
}
