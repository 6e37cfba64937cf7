/* Fuzz target: the write-back parsers (lib/writeback*.c) on arbitrary bytes: the
 * @writable comment grammar, primary key splitting and text checks, and request
 * validation (tp_wb_prepare) against a hand-built table with every column kind.
 * Input: "mode\npk\nif_match\nkey\nbody"; mode's first byte picks the operation.
 * Any answer is fine; crashes, leaks and sanitizer reports are not. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tidepool/writeback.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static tp_wb_col_t cols[] = {
    {"k1", "integer", TP_WB_INT4, -1, true, false, NULL, NULL, 0},
    {"k2", "text", TP_WB_TEXT, -1, true, false, NULL, NULL, 1},
    {"s", "smallint", TP_WB_INT2, -1, false, false, NULL, NULL, -1},
    {"b", "bigint", TP_WB_INT8, -1, true, true, "0", NULL, -1},
    {"n", "numeric", TP_WB_NUMERIC, -1, false, false, NULL, NULL, -1},
    {"f", "double precision", TP_WB_FLOAT, -1, false, false, NULL, NULL, -1},
    {"o", "boolean", TP_WB_BOOL, -1, false, false, NULL, NULL, -1},
    {"v", "character varying(5)", TP_WB_TEXT, 5, false, false, NULL, NULL, -1},
    {"d", "date", TP_WB_DATE, -1, false, false, NULL, NULL, -1},
    {"tz", "timestamp with time zone", TP_WB_TIMESTAMPTZ, -1, false, false, NULL, NULL, -1},
    {"ts", "timestamp without time zone", TP_WB_TIMESTAMP, -1, false, false, NULL, NULL, -1},
    {"u", "uuid", TP_WB_UUID, -1, false, false, NULL, NULL, -1},
    {"j", "jsonb", TP_WB_JSON, -1, false, false, NULL, NULL, -1},
    {"x", "inet", TP_WB_OTHER, -1, false, false, NULL, NULL, -1},
    {"id", "bigint", TP_WB_INT8, -1, true, true, NULL, "identity", -1},
    {"version", "bigint", TP_WB_INT8, -1, true, true, "1", "version", -1},
};
static int pk[] = {0, 1};
static char *roles[] = {"writer", NULL};

static char *part(const uint8_t **p, const uint8_t *end)
{
    const uint8_t *nl = memchr(*p, '\n', (size_t)(end - *p));
    const uint8_t *stop = nl ? nl : end;
    char *s = malloc((size_t)(stop - *p) + 1);
    memcpy(s, *p, (size_t)(stop - *p));
    s[stop - *p] = '\0';
    *p = nl ? nl + 1 : end;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *p = data, *end = data + size;
    char *mode = part(&p, end), *pkseg = part(&p, end), *im = part(&p, end), *key = part(&p, end);
    const char *body = (const char *)p;
    size_t body_len = (size_t)(end - p);
    char m = mode[0];

    if (m == 'c') { /* comment grammar: the rest of the input is the comment */
        char *c = malloc(body_len + 1);
        memcpy(c, body, body_len);
        c[body_len] = '\0';
        tp_wb_decl_t d;
        char err[256];
        if (tp_wb_parse_comment("s.t", c, &d, err, sizeof err) > 0)
            tp_wb_decl_free(&d);
        free(c);
    } else if (m == 'k') { /* key splitting and text checks */
        char **v;
        if (tp_wb_split_pk(pkseg, 2, &v)) {
            for (int i = 0; i < 2; i++) {
                for (int k = TP_WB_INT2; k <= TP_WB_OTHER; k++)
                    (void)tp_wb_check_text((tp_wb_kind_t)k, 5, v[i]);
                free(v[i]);
            }
            free(v);
        }
    } else {
        static char sql[] = "SELECT 1";
        tp_wb_table_t t = {
            .magic = TP_WB_TABLE_MAGIC,
            .schema = "s",
            .name = "t",
            .qualified = "s.t",
            .cols = cols,
            .ncols = (int)(sizeof cols / sizeof cols[0]),
            .pk = pk,
            .npk = 2,
            .version_col = 15,
            .owner_col = -1,
            .touch_col = -1,
            .write_roles = roles,
            .read_roles = roles,
            .if_match_required = m == 'R',
            .sql = {sql, sql, sql},
        };
        tp_wb_request_t req = {
            .op = m == 'd'                             ? TP_WB_DELETE
                  : (m == 'u' || m == 'b' || m == 'R') ? TP_WB_UPDATE
                                                       : TP_WB_INSERT,
            .method = "X",
            .path = "/p",
            .pk = m == 'b' ? NULL : pkseg,
            .body = body,
            .body_len = body_len,
            .if_match = im[0] ? im : NULL,
            .idem_key = key[0] ? key : NULL,
            .actor = "fuzz",
            .request_id = "r",
            .key_ttl_s = 60,
        };
        tp_wb_call_t *call;
        tp_wb_answer_t ans;
        if (tp_wb_prepare(&t, &req, &call, &ans))
            tp_wb_call_free(call);
        else
            tp_wb_answer_free(&ans);
    }
    free(mode);
    free(pkseg);
    free(im);
    free(key);
    return 0;
}
