-- Demo dataset: one user's daily figures and 7-day moving averages over a date
-- range (the 90-row read of DESIGN §15 when since..until spans the demo data).
-- Postgres holds 400 days (see sql/sync/daily_metrics.sql): a range starting
-- earlier runs on the warehouse twin, as does a stale sync.
-- @description A user's daily steps, miles and calories with 7-day moving averages
-- @param       user_id INT
-- @param       since DATE
-- @param       until DATE
-- @requires    daily_metrics
-- @max_staleness 6h
-- @covers      since >= 400d
-- @cache       30s
SELECT day, steps, miles, calories, steps_ma7, calories_ma7
FROM iot.user_daily_metrics
WHERE user_id = :user_id
  AND day BETWEEN :since AND :until
ORDER BY day

====
-- Warehouse twin of daily_metrics.sql: the same rows from the gold table.
-- @param       user_id INT
-- @param       since DATE
-- @param       until DATE
SELECT day, steps, miles, calories, steps_ma7, calories_ma7
FROM demo.iot.gold_user_daily_metrics
WHERE user_id = :user_id
  AND day BETWEEN :since AND :until
ORDER BY day
