/* lib/isots.c against the harness Postgres: for edge-case and random
 * timestamps (BC years, year 294276, fractions, infinity, historic LMT
 * offsets with seconds), the canonical form of Postgres' text under several
 * session time zones and DateStyle=ISO equals what to_json writes under
 * TimeZone=UTC, byte for byte; and the conninfo of tp_isots_dsn really gives
 * sessions DateStyle=ISO and TimeZone=UTC, over a database whose default
 * zone is not UTC and with $PGOPTIONS kept. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "../tp_test.h"
#include "tidepool/isots.h"

static const char *DSN;

/* Edge cases, then 3,000 random instants from 4713 BC to 294276 AD (a day short of
 * Postgres' limit, so that every zone can print them). */
static const char *VALUES_SQL =
    "CREATE TEMP TABLE v AS SELECT row_number() OVER () AS id, t, t::timestamp AS ntz FROM ("
    " SELECT unnest(ARRAY['2025-01-01 10:00:00+00', '2025-01-01 10:00:00.5+00',"
    " '2025-01-01 10:00:00.000001+00', '2025-06-30 23:59:59.999999+00', '2024-02-29 12:00:00+00',"
    " '1850-01-01 00:00:00+00', '1900-01-01 00:00:00+00', '0001-01-01 00:00:00+00',"
    " '0001-12-31 23:59:59+00 BC', '0044-03-15 10:00:00.25+00 BC', '4713-01-01 00:00:00+00 BC',"
    " '9999-12-31 23:59:59+00', '10000-01-01 00:00:00+00', '294276-12-30 23:59:59.999999+00',"
    " 'infinity', '-infinity']::timestamptz[]) AS t"
    " UNION ALL SELECT '4713-01-01 00:00:00+00 BC'::timestamptz"
    "  + (random() * 109195000)::int * interval '1 day' + random() * interval '1 day'"
    "  FROM generate_series(1, 3000)) s";

static PGconn *conn(const char *dsn)
{
    PGconn *c = PQconnectdb(dsn);
    CHECK_MSG(PQstatus(c) == CONNECTION_OK, "connect: %s", PQerrorMessage(c));
    return c;
}

static PGresult *q(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    CHECK_MSG(PQresultStatus(r) == PGRES_TUPLES_OK || PQresultStatus(r) == PGRES_COMMAND_OK,
              "%s: %s", sql, PQerrorMessage(c));
    return r;
}

static void agrees_with_to_json(void)
{
    PGconn *c = conn(DSN);
    PQclear(q(c, "SET DateStyle = ISO"));
    PQclear(q(c, "SET TimeZone = UTC"));
    PQclear(q(c, VALUES_SQL));
    PGresult *want = q(c, "SELECT to_json(t)::text, to_json(ntz)::text FROM v ORDER BY id");
    int n = PQntuples(want);
    CHECK(n > 3000);
    static const char *const zones[] = {"UTC", "Asia/Kolkata", "America/St_Johns",
                                        "Europe/Amsterdam", "Pacific/Kiritimati", "Etc/GMT+12",
                                        "America/Los_Angeles"};
    int bad = 0;
    for (size_t z = 0; z < sizeof zones / sizeof zones[0]; z++) {
        char set[80];
        snprintf(set, sizeof set, "SET TimeZone = '%s'", zones[z]);
        PQclear(q(c, set));
        PGresult *got = q(c, "SELECT t::text, ntz::text FROM v ORDER BY id");
        CHECK_INT_EQ(PQntuples(got), n);
        for (int i = 0; i < n && i < PQntuples(got) && bad < 10; i++) {
            for (int col = 0; col < 2; col++) {
                const char *text = PQgetvalue(got, i, col);
                const char *js = PQgetvalue(want, i, col);
                char out[TP_ISOTS_MAX], quoted[TP_ISOTS_MAX + 2];
                size_t len = tp_isots_canon(text, strlen(text), col == 0, out);
                snprintf(quoted, sizeof quoted, "\"%s\"", out);
                if (len == 0 || strcmp(quoted, js) != 0) {
                    CHECK_MSG(false, "zone %s: %s -> %s, to_json %s", zones[z], text,
                              len ? out : "(refused)", js);
                    bad++;
                }
            }
        }
        PQclear(got);
    }
    PQclear(want);
    PQfinish(c);
}

static void session_settings(void)
{
    PGconn *c = conn(DSN);
    char *db = tp_xstrdup(PQdb(c));
    char alter[200];
    snprintf(alter, sizeof alter, "ALTER DATABASE \"%s\" SET TimeZone = 'Asia/Kolkata'", db);
    PQclear(q(c, alter));
    snprintf(alter, sizeof alter, "ALTER DATABASE \"%s\" SET DateStyle = 'SQL, DMY'", db);
    PQclear(q(c, alter));
    PQfinish(c);
    /* a plain session now gets the database's defaults */
    c = conn(DSN);
    PGresult *r = q(c, "SELECT current_setting('TimeZone'), current_setting('DateStyle')");
    CHECK_STR_EQ(PQgetvalue(r, 0, 0), "Asia/Kolkata");
    CHECK_STR_EQ(PQgetvalue(r, 0, 1), "SQL, DMY");
    PQclear(r);
    PQfinish(c);
    /* the server's conninfo overrides them and keeps $PGOPTIONS */
    setenv("PGOPTIONS", "-c application_name=isots-test -c TimeZone=America/St_Johns", 1);
    char *dsn = tp_isots_dsn(DSN);
    c = conn(dsn);
    r = q(c, "SELECT current_setting('TimeZone'), current_setting('DateStyle'),"
             " current_setting('application_name'), '2025-01-01 10:00:00+00'::timestamptz::text");
    CHECK_STR_EQ(PQgetvalue(r, 0, 0), "UTC");
    CHECK_STR_EQ(PQgetvalue(r, 0, 1), "ISO, MDY");
    CHECK_STR_EQ(PQgetvalue(r, 0, 2), "isots-test");
    CHECK_STR_EQ(PQgetvalue(r, 0, 3), "2025-01-01 10:00:00+00");
    PQclear(r);
    PQfinish(c);
    free(dsn);
    unsetenv("PGOPTIONS");
    /* the same through a URI */
    const char *host = getenv("PGHOST"), *port = getenv("PGPORT");
    char uri[600];
    snprintf(uri, sizeof uri, "postgresql:///%s?host=%s&port=%s&user=tidepool", db,
             host ? host : "/tmp", port ? port : "5432");
    dsn = tp_isots_dsn(uri);
    c = conn(dsn);
    r = q(c, "SELECT current_setting('TimeZone'), current_setting('DateStyle')");
    CHECK_STR_EQ(PQgetvalue(r, 0, 0), "UTC");
    CHECK_STR_EQ(PQgetvalue(r, 0, 1), "ISO, MDY");
    PQclear(r);
    PQfinish(c);
    free(dsn);
    c = conn(DSN);
    snprintf(alter, sizeof alter, "ALTER DATABASE \"%s\" RESET ALL", db);
    PQclear(q(c, alter));
    PQfinish(c);
    free(db);
}

int main(void)
{
    DSN = tp_test_dsn();
    if (!DSN)
        return tp_test_done();
    TP_RUN(agrees_with_to_json);
    TP_RUN(session_settings);
    return tp_test_done();
}
