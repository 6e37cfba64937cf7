/* Bridges the [warehouse] settings (tidepool/config.h) to the warehouse
 * client's configuration (tidepool/wh.h), so every program builds its client
 * the same way: file settings first, DATABRICKS_* environment for the rest,
 * and one credential kind as tp_config_warehouse_auth decided. */
#ifndef TIDEPOOL_WH_SETTINGS_H
#define TIDEPOOL_WH_SETTINGS_H

#include "tidepool/config.h"
#include "tidepool/wh.h"

/* Fills wc (already tp_wh_config_init'ed) from cfg; strings borrow from cfg
 * and the environment, so cfg must outlive wc's use. Cannot fail. */
void tp_wh_config_from_settings(tp_wh_config_t *wc, const tp_config_t *cfg);

#endif
