-- Warehouse twin of daily_metrics.sql: the same rows from the gold table.
-- @param       user_id INT
-- @param       since DATE
-- @param       until DATE
SELECT day, steps, miles, calories, steps_ma7, calories_ma7
FROM demo.iot.gold_user_daily_metrics
WHERE user_id = :user_id
  AND day BETWEEN :since AND :until
ORDER BY day
