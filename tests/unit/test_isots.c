/* Unit tests for lib/isots.c: Postgres ISO text and Databricks ISO 8601
 * timestamps into the one canonical form (to_json's with TimeZone=UTC), the
 * refusals, and the session conninfo. tests/integration/test_isots_pg.c
 * checks the same conversion against the real Postgres' to_json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../tp_test.h"
#include "tidepool/isots.h"

static const char *canon(const char *s, bool tz)
{
    static char out[TP_ISOTS_MAX];
    size_t n = tp_isots_canon(s, strlen(s), tz, out);
    if (n == 0)
        return "(refused)";
    CHECK_INT_EQ(n, strlen(out));
    return out;
}

static void postgres_text(void)
{
    static const struct {
        const char *in, *want;
        bool tz;
    } cases[] = {
        {"2025-01-01 10:00:00+00", "2025-01-01T10:00:00+00:00", true},
        {"2025-01-01 10:00:00", "2025-01-01T10:00:00", false},
        /* fractional seconds: to_json trims trailing zeros, as Postgres' text does */
        {"2025-01-01 10:00:00.5+00", "2025-01-01T10:00:00.5+00:00", true},
        {"2025-01-01 10:00:00.120+00", "2025-01-01T10:00:00.12+00:00", true},
        {"2025-01-01 10:00:00.000001", "2025-01-01T10:00:00.000001", false},
        {"2025-01-01 10:00:00.999999+00", "2025-01-01T10:00:00.999999+00:00", true},
        /* offsets are moved to UTC, across days, months and years */
        {"2025-01-01 15:30:00+05:30", "2025-01-01T10:00:00+00:00", true},
        {"2025-01-01 01:00:00+05:30", "2024-12-31T19:30:00+00:00", true},
        {"2024-12-31 20:30:00-03:30", "2025-01-01T00:00:00+00:00", true},
        {"2025-02-28 23:00:00-08", "2025-03-01T07:00:00+00:00", true},
        {"2024-02-28 23:00:00-08", "2024-02-29T07:00:00+00:00", true},
        {"2025-03-01 00:15:00+14", "2025-02-28T10:15:00+00:00", true},
        {"1850-01-01 00:19:32+00:19:32", "1850-01-01T00:00:00+00:00", true},
        {"1850-01-01 00:00:00.25-00:00:36", "1850-01-01T00:00:36.25+00:00", true},
        /* BC years: Postgres' " BC" suffix, kept after the offset like to_json */
        {"0044-03-15 10:00:00.5 BC", "0044-03-15T10:00:00.5 BC", false},
        {"0044-03-15 15:53:28.5+05:53:28 BC", "0044-03-15T10:00:00.5+00:00 BC", true},
        {"0001-01-01 05:53:28+05:53:28", "0001-01-01T00:00:00+00:00", true},
        {"0001-01-01 00:30:00+01", "0001-12-31T23:30:00+00:00 BC", true},
        {"0001-12-31 23:30:00-01 BC", "0001-01-01T00:30:00+00:00", true},
        {"4714-11-24 00:00:00+00 BC", "4714-11-24T00:00:00+00:00 BC", true},
        {"0005-02-29 12:00:00 BC", "0005-02-29T12:00:00 BC", false}, /* 4 BC, a leap year */
        /* long years, infinity */
        {"10000-01-01 00:00:00", "10000-01-01T00:00:00", false},
        {"294276-12-31 23:59:59.999999+00", "294276-12-31T23:59:59.999999+00:00", true},
        {"infinity", "infinity", true},
        {"-infinity", "-infinity", true},
        {"infinity", "infinity", false},
        {"-infinity", "-infinity", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK_STR_EQ(canon(cases[i].in, cases[i].tz), cases[i].want);
}

static void databricks_text(void)
{
    CHECK_STR_EQ(canon("2021-01-01T10:00:00.000Z", true), "2021-01-01T10:00:00+00:00");
    CHECK_STR_EQ(canon("2021-01-01T10:00:00.000-08:00", true), "2021-01-01T18:00:00+00:00");
    CHECK_STR_EQ(canon("2021-06-15T12:34:56.789-07:00", true), "2021-06-15T19:34:56.789+00:00");
    CHECK_STR_EQ(canon("2021-06-15T12:34:56.123456Z", true), "2021-06-15T12:34:56.123456+00:00");
    CHECK_STR_EQ(canon("2021-06-15T12:34:56.1234567Z", true), "2021-06-15T12:34:56.123456+00:00");
    CHECK_STR_EQ(canon("2021-06-15T12:34:56+0530", true), "2021-06-15T07:04:56+00:00");
    CHECK_STR_EQ(canon("2021-01-01T10:00:00.000", false), "2021-01-01T10:00:00");
    /* java.time's expanded years: astronomical -0043 is 44 BC, year 0 is 1 BC */
    CHECK_STR_EQ(canon("-0043-03-15T10:00:00.500Z", true), "0044-03-15T10:00:00.5+00:00 BC");
    CHECK_STR_EQ(canon("0000-12-31T23:00:00.000", false), "0001-12-31T23:00:00 BC");
    CHECK_STR_EQ(canon("+10000-01-01T00:00:00.000Z", true), "10000-01-01T00:00:00+00:00");
}

static void refuses_what_it_cannot_read(void)
{
    static const char *const bad[] = {
        "",
        "2025-01-01",
        "2025-01-01 10:00",
        "01/01/2025 10:00:00 UTC",       /* DateStyle SQL */
        "Wed Jan 01 10:00:00 2025 UTC", /* DateStyle Postgres */
        "2025-13-01 10:00:00+00",
        "2025-02-29 10:00:00+00",
        "2025-04-31 10:00:00+00",
        "2025-01-01 24:00:00+00",
        "2025-01-01 10:60:00+00",
        "2025-01-01 10:00:60+00",
        "2025-01-01 10:00:00.+00",
        "2025-01-01 10:00:00+16",
        "2025-01-01 10:00:00+05:60",
        "2025-01-01 10:00:00+00 AD",
        "2025-01-01 10:00:00+00 BCE",
        "0000-01-01 10:00:00+00 BC",
        "-0043-01-01T10:00:00Z BC",
        "025-01-01 10:00:00+00",
        "2025-01-01x10:00:00+00",
        "2025-01-01 10:00:00+00 ",
        "1234567890-01-01 10:00:00+00",
        "Infinity",
        "infinity ",
    };
    char out[TP_ISOTS_MAX];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_MSG(tp_isots_canon(bad[i], strlen(bad[i]), true, out) == 0, "accepted \"%s\"",
                  bad[i]);
        CHECK_MSG(tp_isots_canon(bad[i], strlen(bad[i]), false, out) == 0, "accepted \"%s\"",
                  bad[i]);
    }
    /* a zone where none belongs, or none where one does */
    CHECK_STR_EQ(canon("2025-01-01 10:00:00+00", false), "(refused)");
    CHECK_STR_EQ(canon("2025-01-01T10:00:00Z", false), "(refused)");
    CHECK_STR_EQ(canon("2025-01-01 10:00:00", true), "(refused)");
    /* the length is what counts, not a NUL */
    CHECK_INT_EQ(tp_isots_canon("2025-01-01 10:00:00+00xyz", 22, true, out), 25);
    CHECK_STR_EQ(out, "2025-01-01T10:00:00+00:00");
    CHECK_INT_EQ(tp_isots_canon("2025-01-01 10:00:00+00", 21, true, out), 0);
}

static void parse_fields(void)
{
    tp_isots_t ts;
    CHECK(tp_isots_parse("0044-03-15 10:20:30.000042-03:30 BC", 35, &ts));
    CHECK_INT_EQ(ts.special, 0);
    CHECK_INT_EQ(ts.year, -43);
    CHECK_INT_EQ(ts.mon, 3);
    CHECK_INT_EQ(ts.day, 15);
    CHECK_INT_EQ(ts.hour, 10);
    CHECK_INT_EQ(ts.min, 20);
    CHECK_INT_EQ(ts.sec, 30);
    CHECK_INT_EQ(ts.usec, 42);
    CHECK(ts.has_off);
    CHECK_INT_EQ(ts.off, -(3 * 3600 + 30 * 60));
    CHECK(tp_isots_parse("-infinity", 9, &ts));
    CHECK_INT_EQ(ts.special, -1);
}

/* Offsets of both signs over a four-century cycle of days (from 1600, every
 * 7th day plus the turns of months around it) agree with gmtime on the
 * epoch: the UTC shift has no off-by-one at month, year or century ends. */
static void utc_shift_matches_epoch_arithmetic(void)
{
    static const int offs[] = {-57600 + 1, -3600, -1, 1, 19800, 50400};
    char in[80], want[TP_ISOTS_MAX], out[TP_ISOTS_MAX];
    int bad = 0;
    static const int hours[] = {0, 15, 23};
    for (int64_t day = -135140; day < -135140 + 146097 && bad < 5; day += 7) {
        for (size_t k = 0; k < sizeof offs / sizeof offs[0] * 3; k++) {
            int off = offs[k / 3];
            int64_t utc = day * 86400 + hours[k % 3] * 3600 + (k % 3 == 2 ? 3599 : 0);
            int64_t local = utc + off;
            struct tm lt, ut;
            time_t lt_t = (time_t)local, ut_t = (time_t)utc;
            gmtime_r(&lt_t, &lt);
            gmtime_r(&ut_t, &ut);
            long long ly = lt.tm_year + 1900LL, uy = ut.tm_year + 1900LL;
            if (ly < 1 || uy < 1)
                continue;
            int a = off < 0 ? -off : off;
            snprintf(in, sizeof in, "%04lld-%02d-%02d %02d:%02d:%02d%c%02d:%02d:%02d", ly,
                     lt.tm_mon + 1, lt.tm_mday, lt.tm_hour, lt.tm_min, lt.tm_sec,
                     off < 0 ? '-' : '+', a / 3600, a / 60 % 60, a % 60);
            snprintf(want, sizeof want, "%04lld-%02d-%02dT%02d:%02d:%02d+00:00", uy, ut.tm_mon + 1,
                     ut.tm_mday, ut.tm_hour, ut.tm_min, ut.tm_sec);
            size_t n = tp_isots_canon(in, strlen(in), true, out);
            if (n == 0 || strcmp(out, want) != 0) {
                CHECK_MSG(false, "%s -> %s, want %s", in, n ? out : "(refused)", want);
                bad++;
            }
        }
    }
}

static void dsn_is(const char *in, const char *want)
{
    char *d = tp_isots_dsn(in);
    CHECK_STR_EQ(d, want);
    free(d);
}

static void session_dsn(void)
{
    unsetenv("PGOPTIONS");
    dsn_is("", "options='-c DateStyle=ISO -c TimeZone=UTC'");
    dsn_is(NULL, "options='-c DateStyle=ISO -c TimeZone=UTC'");
    dsn_is("mydb", "dbname='mydb' options='-c DateStyle=ISO -c TimeZone=UTC'");
    dsn_is("it's", "dbname='it\\'s' options='-c DateStyle=ISO -c TimeZone=UTC'");
    /* the dsn's own options are kept (libpq takes the last options=) */
    dsn_is("host=/tmp dbname=x options='-c work_mem=64MB'",
           "host=/tmp dbname=x options='-c work_mem=64MB' "
           "options='-c work_mem=64MB -c DateStyle=ISO -c TimeZone=UTC'");
    dsn_is("postgresql://u@h:5/db",
           "postgresql://u@h:5/db?options=-c%20DateStyle%3DISO%20-c%20TimeZone%3DUTC");
    dsn_is("postgres://h/db?sslmode=disable&options=-c%20a%3Db",
           "postgres://h/db?sslmode=disable&options=-c%20a%3Db"
           "&options=-c%20a%3Db%20-c%20DateStyle%3DISO%20-c%20TimeZone%3DUTC");
    /* $PGOPTIONS, which an options= in the conninfo would otherwise hide */
    setenv("PGOPTIONS", "-c statement_timeout=5s", 1);
    dsn_is("host=x", "host=x options='-c statement_timeout=5s -c DateStyle=ISO -c TimeZone=UTC'");
    dsn_is("host=x options=-cgeqo=off", "host=x options=-cgeqo=off options='-cgeqo=off -c "
                                         "DateStyle=ISO -c TimeZone=UTC'");
    unsetenv("PGOPTIONS");
}

int main(void)
{
    TP_RUN(postgres_text);
    TP_RUN(databricks_text);
    TP_RUN(refuses_what_it_cannot_read);
    TP_RUN(parse_fields);
    TP_RUN(utc_shift_matches_epoch_arithmetic);
    TP_RUN(session_dsn);
    return tp_test_done();
}
