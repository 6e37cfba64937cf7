-- Demo sync job: risk by weight band and cholesterol level, a small table
-- copied whole every hour.
-- @description Average risk per 10 kg weight band and cholesterol level (demo)
-- @target      iot.cohort_risk
-- @mode        snapshot
-- @key         weight_band_lo, cholest_rank
-- @every       1h
SELECT weight_band, weight_band_lo, cholestlevs, cholest_rank, users, avg_risk, avg_age, avg_weight
FROM demo.iot.gold_cohort_risk
