-- Demo dataset, warehouse only: raw readings of one user's watch over any time
-- range (never synced; DESIGN §9 and issue 6). until is exclusive.
-- @description Raw sensor readings of one user and device between two instants
-- @param       user_id INT
-- @param       device_id INT
-- @param       since TIMESTAMP
-- @param       until TIMESTAMP
-- @cache       5m
SELECT id, `timestamp`, num_steps, miles_walked, calories_burnt
FROM demo.iot.silver_sensors
WHERE user_id = :user_id
  AND device_id = :device_id
  AND `timestamp` >= :since
  AND `timestamp` < :until
ORDER BY `timestamp`
