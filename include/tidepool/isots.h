/* One ISO 8601 form for timestamps in every JSON answer (see lib/isots.c). */
#ifndef TIDEPOOL_ISOTS_H
#define TIDEPOOL_ISOTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tidepool/util.h"

/* Longest canonical form plus its NUL ("-123456789-12-31T23:59:59.999999+00:00 BC"). */
#define TP_ISOTS_MAX 64

/* A parsed timestamp. year is astronomical (0 = 1 BC, -1 = 2 BC). */
typedef struct tp_isots {
    int special; /* 0: a date-time; +1: infinity; -1: -infinity (other fields unset) */
    int64_t year;
    int mon, day, hour, min, sec;
    int usec;     /* 0..999999 (digits past the sixth are dropped) */
    bool has_off; /* an offset or Z was given */
    int off;      /* seconds east of UTC */
} tp_isots_t;

/* Parses s (n bytes, no NUL needed) in either input form:
 *   Postgres DateStyle ISO: "2025-01-01 10:00:00.5+05:30", "+HH", "+HH:MM:SS",
 *     " BC" suffix, years of 4+ digits, "infinity", "-infinity";
 *   ISO 8601 / Databricks: "2025-01-01T10:00:00.500Z", "-0043-03-15T...-08:00",
 *     "+10000-01-01T..." (signed astronomical years).
 * Checks field ranges (day within its month). Returns false on anything else. */
bool tp_isots_parse(const char *s, size_t n, tp_isots_t *ts) TP_WUR;

/* Writes the canonical form of ts (what Postgres' to_json writes with
 * TimeZone=UTC) into out, NUL-terminated, and returns its length:
 *   tz (timestamptz): "2025-01-01T04:30:00.5+00:00", shifted to UTC;
 *   !tz (timestamp):  "2025-01-01T10:00:00.5" (no offset);
 * fraction without trailing zeros, years below 1 as "0044-...  BC" (to_json's
 * form), "infinity" / "-infinity" as is. Returns 0 (out unspecified) when ts
 * has no offset but tz is set, or has one but tz is not. Cannot otherwise fail. */
size_t tp_isots_format(const tp_isots_t *ts, bool tz, char out[TP_ISOTS_MAX]);

/* tp_isots_parse then tp_isots_format: the canonical form of s in out and its
 * length, or 0 when s is not a timestamp of that kind (the caller then sends
 * s as it is). No allocation. */
size_t tp_isots_canon(const char *s, size_t n, bool tz, char out[TP_ISOTS_MAX]);

/* Proleptic Gregorian calendar on astronomical years (any sign; no
 * validation): days in month m (1..12) of year y, days since 1970-01-01 of
 * y-m-d, and the inverse. Pure. */
int tp_isots_days_in_month(int64_t y, int m);
int64_t tp_isots_days_from_civil(int64_t y, int m, int d);
void tp_isots_civil_from_days(int64_t days, int64_t *y, int *m, int *d);

/* Returns a new conninfo (caller frees) that connects like dsn but whose
 * sessions run with DateStyle=ISO and TimeZone=UTC (the forms the encoders
 * parse and the zone write answers are rendered in): dsn's own options (or
 * $PGOPTIONS when dsn has none) are kept and these two appended. dsn may be
 * "", a bare database name, key=value pairs or a postgres[ql]:// URI. */
char *tp_isots_dsn(const char *dsn);

#endif
