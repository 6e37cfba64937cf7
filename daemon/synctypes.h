/* Warehouse result columns as Postgres sees them: the DESIGN §7 type mapping,
 * identifier quoting and COPY text-format encoding of JSON_ARRAY cells.
 * Program-private to tidepool-sync; pure functions, no I/O. */
#ifndef TIDEPOOL_DAEMON_SYNCTYPES_H
#define TIDEPOOL_DAEMON_SYNCTYPES_H

#include <stdbool.h>
#include <stddef.h>

#include "tidepool/util.h"

typedef struct tp_synccol {
    char *name;
    char *type_text; /* as the warehouse wrote it, for messages */
    char *pg_type;   /* canonical format_type() spelling: "integer", "numeric(10,2)" */
    bool binary;     /* BINARY: hex text on the wire, bytea in Postgres */
} tp_synccol_t;

/* Maps a warehouse column type to the Postgres type in format_type() spelling.
 * type_name is an open set; type_text is the fallback and the detail for
 * DECIMAL when precision/scale are negative. Returns a heap string, or NULL
 * for a type with no mapping (the caller names the column and type_text). */
char *tp_synctypes_map(const char *type_name, const char *type_text, int precision, int scale);

/* Appends ident as a double-quoted SQL identifier. */
void tp_synctypes_ident(tp_buf_t *b, const char *ident);
/* Appends "schema"."table". */
void tp_synctypes_qname(tp_buf_t *b, const char *schema, const char *table);
/* Appends s as a single-quoted SQL literal (E'' form when it has a backslash). */
void tp_synctypes_literal(tp_buf_t *b, const char *s);

/* Appends one cell in COPY text format: NULL -> \N; backslash, tab, newline
 * and carriage return escaped; a binary cell (hex text) becomes \\x<hex>. */
void tp_synctypes_copy_cell(tp_buf_t *b, const char *s, size_t len, bool binary);

void tp_synccols_free(tp_synccol_t *cols, size_t n);

#endif
