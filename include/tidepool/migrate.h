/* Schema migrations: sql/migrations/NNNN_name.sql applied in numeric order,
 * each in its own transaction, under a session advisory lock, recorded with a
 * SHA-256 checksum in tidepool.schema_migrations. See docs/migrations.md. */
#ifndef TIDEPOOL_MIGRATE_H
#define TIDEPOOL_MIGRATE_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

#include "tidepool/util.h"

/* Session advisory lock held while migrating (one bigint key: "tidepool" in
 * ASCII). Other modules must not use this key. */
#define TP_MIGRATE_LOCK_KEY 0x74696465706f6f6cLL

/* Compiled-in fallback directory; the Makefile may pass -DTP_MIGRATIONS_DIR=... */
#ifndef TP_MIGRATIONS_DIR
#define TP_MIGRATIONS_DIR "/usr/local/share/tidepool/migrations"
#endif

/* The directory programs read migrations from: $TIDEPOOL_MIGRATIONS_DIR if set
 * and non-empty, else "sql/migrations" when that directory exists relative to
 * the working directory (a source checkout), else TP_MIGRATIONS_DIR. The
 * string is borrowed (environment or static); it is not checked further. */
const char *tp_migrate_default_dir(void);

/* Applies every pending migration in dir to the database of conn (a plain
 * blocking connection, not inside a transaction; see tp_pg_connect).
 * Takes the advisory lock TP_MIGRATE_LOCK_KEY, waiting for another migrator
 * if one holds it (so a second process waits, then finds nothing to do), and
 * releases it before returning. Creates schema tidepool and its
 * schema_migrations table when absent. Each file runs in its own transaction
 * together with its schema_migrations row; a failing file is rolled back
 * whole and nothing after it runs.
 * Refuses (returns false, nothing applied) when: dir is unreadable or empty;
 * a file name is not NNNN_name.sql (dot-files are ignored); versions have a gap
 * or a duplicate; an applied migration's file changed (checksum); the database
 * has a version this build does not know (a newer schema).
 * *applied_out (may be NULL) receives the number of migrations applied by
 * this call, also when a later one failed. On failure err holds one line
 * naming the file ("DIR/0002_x.sql:4: relation ... (SQLSTATE 42P01)") or the
 * version. Returns true when the schema is current afterwards. */
bool tp_migrate_apply(PGconn *conn, const char *dir, int *applied_out, char *err,
                      size_t errlen) TP_WUR;

/* Read-only view of the schema state, for /readyz and --check. */
typedef struct tp_migrate_status {
    int known;         /* highest version among the files in dir */
    int current;       /* highest version applied in the database (0: none) */
    int pending;       /* known versions not yet applied */
    int unknown_newer; /* highest applied version this build does not know, 0: none */
    int changed;       /* lowest applied version whose file content differs, 0: none */
} tp_migrate_status_t;

/* Fills *out without writing or locking anything (a database that has no
 * tidepool.schema_migrations yet counts as version 0). Returns false with err
 * set only when the state cannot be determined (bad dir, bad file names,
 * query failure). */
bool tp_migrate_status(PGconn *conn, const char *dir, tp_migrate_status_t *out, char *err,
                       size_t errlen) TP_WUR;

/* True when s describes a database that is exactly up to date; otherwise
 * writes why into why ("2 migrations pending (run tidepool-sync --migrate)",
 * "database has migration 0009, newer than this build (0004)", ...). */
bool tp_migrate_status_current(const tp_migrate_status_t *s, char *why, size_t whylen) TP_WUR;

#endif
