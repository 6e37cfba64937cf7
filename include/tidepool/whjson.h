/* Push (incremental) JSON parser for warehouse answers. Bytes are fed as they
 * arrive; one array found at a configured place (the "row array":
 * result.data_array of a StatementResponse, data_array of a ResultData, or the
 * whole document of an external JSON_ARRAY link) is not built as JSON values
 * but decoded row by row into a compact batch of cells (string or NULL), so a
 * chunk never exists as a tree of JSON objects. Everything else is built as a
 * jansson value. Errors name the byte offset and what was expected. */
#ifndef TIDEPOOL_WHJSON_H
#define TIDEPOOL_WHJSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "tidepool/util.h"

typedef struct tp_whjson tp_whjson_t;

/* Called after each complete row was added to the batch; returning false stops
 * the parse (tp_whjson_feed then returns false with error "stopped"). */
typedef bool (*tp_whjson_row_fn)(void *arg);

/* path: object keys leading from the root to the row array (copied), e.g.
 * {"result", "data_array"}; path_len 0 means the document itself is the row
 * array. Never NULL. */
tp_whjson_t *tp_whjson_new(const char *const *path, size_t path_len);
void tp_whjson_free(tp_whjson_t *p);
void tp_whjson_set_row_cb(tp_whjson_t *p, tp_whjson_row_fn fn, void *arg);
/* Expected cells per row; rows of another width are an error. Default: the
 * first row's width, and all rows must agree. */
void tp_whjson_set_ncols(tp_whjson_t *p, size_t ncols);
/* The first n rows are counted but not put in the batch (resuming a chunk). */
void tp_whjson_set_skip(tp_whjson_t *p, int64_t n);

/* Feeds bytes. False on a syntax error, a row that is not an array of strings
 * and nulls, a wrong row width, nesting deeper than 64, or a stopped parse. */
bool tp_whjson_feed(tp_whjson_t *p, const char *data, size_t len) TP_WUR;
/* Declares the end of input. False if the document is incomplete ("ends early"). */
bool tp_whjson_finish(tp_whjson_t *p) TP_WUR;
/* Message of the last failure (static storage of p). */
const char *tp_whjson_error(const tp_whjson_t *p);

/* The document built so far (borrowed; NULL when the root is the row array or
 * nothing was parsed). The row array itself is absent from it. */
json_t *tp_whjson_root(const tp_whjson_t *p);
/* True once the row array was found. */
bool tp_whjson_saw_rows(const tp_whjson_t *p);
/* Rows seen in the row array so far (including skipped ones). */
int64_t tp_whjson_rows_total(const tp_whjson_t *p);

/* The rows batched and not yet cleared: returns their number; *cells gets
 * n_rows * *ncols cell pointers (NULL = SQL NULL), *lens their lengths. Valid
 * until the next feed or clear. */
size_t tp_whjson_batch(tp_whjson_t *p, const char *const **cells, const size_t **lens,
                       size_t *ncols);
/* Empties the batch (memory is kept for reuse). */
void tp_whjson_batch_clear(tp_whjson_t *p);

#endif
