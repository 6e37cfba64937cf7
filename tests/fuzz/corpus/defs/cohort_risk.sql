-- Demo dataset: average risk per cohort, cohorts being 10 kg weight bands
-- (metric=weight) or cholesterol levels (metric=cholesterol), in their natural
-- order. The IN list makes any other metric a 422 before SQL runs.
-- @description Average risk score by weight band or by cholesterol level
-- @param       metric STRING IN (weight, cholesterol) = weight
-- @requires    cohort_risk
-- @cache       5m
SELECT CASE WHEN :metric = 'weight' THEN weight_band ELSE cholestlevs END AS cohort,
       sum(users)::bigint AS users,
       round((sum(avg_risk * users) / sum(users))::numeric, 2)::double precision AS avg_risk
FROM iot.cohort_risk
GROUP BY 1
ORDER BY min(CASE WHEN :metric = 'weight' THEN weight_band_lo ELSE cholest_rank END)
