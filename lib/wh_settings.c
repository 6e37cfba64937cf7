/* tp_wh_config_from_settings: the one place where [warehouse] settings become
 * a warehouse client configuration (see the header). */
#include "tidepool/wh_settings.h"

static const char *nonempty(const char *s)
{
    return s && *s ? s : NULL;
}

void tp_wh_config_from_settings(tp_wh_config_t *wc, const tp_config_t *cfg)
{
    wc->host = nonempty(cfg->warehouse.host);
    wc->warehouse_id = nonempty(cfg->warehouse.warehouse_id);
    /* tp_config_load applied the env fallbacks and the token-wins rule already. */
    switch (tp_config_warehouse_auth(cfg)) {
    case TP_WH_AUTH_TOKEN:
        wc->token = nonempty(cfg->warehouse.token);
        break;
    case TP_WH_AUTH_OAUTH:
        wc->client_id = nonempty(cfg->warehouse.client_id);
        wc->client_secret = nonempty(cfg->warehouse.client_secret);
        break;
    default:
        break;
    }
    if (cfg->warehouse.timeout_ms > 0)
        wc->statement_timeout_ms = cfg->warehouse.timeout_ms;
    tp_wh_config_from_env(wc);
}
