-- Demo sync job: daily totals and 7-day moving averages per user, fetched
-- incrementally: only days the warehouse closed since the last run (their
-- updated_at is past the watermark). The window keeps 400 days in Postgres
-- (the daily_metrics dataset's @covers rule); the daily reconcile deletes days
-- that fell out of it. Before the first run :watermark is NULL, hence the
-- COALESCE.
-- @description Daily steps, miles and calories per user with 7-day moving averages (demo)
-- @target      iot.user_daily_metrics
-- @mode        incremental
-- @key         user_id, day
-- @watermark   updated_at
-- @every       5m
-- @timeout     10m
-- @deletes     reconcile:24h
-- @index       day
SELECT user_id, day, steps, miles, calories, steps_ma7, calories_ma7, updated_at
FROM demo.iot.gold_user_daily_metrics
WHERE updated_at > COALESCE(CAST(:watermark AS TIMESTAMP), TIMESTAMP '1970-01-01 00:00:00')
  AND day >= current_date - INTERVAL '400' DAY
