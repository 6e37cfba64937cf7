-- Demo lakehouse, step 2: silver_sensors, one reading every 40 minutes (36 a
-- day) per user for the 90 days of demo_config: 1,000 x 90 x 36 = 3,240,000
-- rows. Each user wears watch user_id*10+1; every third user switches to
-- watch user_id*10+2 on day 45. Steps follow the time of day (little at night),
-- a per-user activity level and a per-day factor, so moving averages move.
-- id is unique by construction (no constraint: lakehouse tables have none);
-- the one index, for sensor_readings lookups, is built after the load.
CREATE TABLE iot.silver_sensors (
    id             bigint NOT NULL,
    user_id        integer NOT NULL,
    device_id      integer NOT NULL,
    num_steps      integer NOT NULL,
    miles_walked   double precision NOT NULL,
    calories_burnt double precision NOT NULL,
    "timestamp"    timestamptz NOT NULL
);

-- Per (user, day) figures first (90,000 rows), then 36 cheap rows each.
INSERT INTO iot.silver_sensors
SELECT ud.day_key * 36 + s + 1,
       ud.user_id,
       ud.device_id,
       st.num_steps,
       round(st.num_steps * ud.stride_m / 1609.344 * 10000) / 10000,
       round((st.num_steps * ud.kcal_per_step + ud.kcal_basal) * 1000) / 1000,
       to_timestamp(ud.epoch + s * 2400)
FROM (
    SELECT u.user_id,
           (u.user_id - 1) * 90 + d AS day_key,
           u.user_id * 10 + CASE WHEN u.user_id % 3 = 0 AND d >= 45 THEN 2 ELSE 1 END AS device_id,
           (3000 + iot.r(u.user_id, 10) * 11000) / 36 * (0.7 + 0.6 * iot.r(u.user_id * 1000 + d, 11))
               AS steps_per_slot,
           u.height * 0.00414 AS stride_m,
           0.04 * u.weight / 70 AS kcal_per_step,
           u.weight * 24.0 / 36 AS kcal_basal,
           c.epoch0 + d * 86400 AS epoch
    FROM iot.silver_users AS u
    CROSS JOIN generate_series(0, 89) AS d
    CROSS JOIN (SELECT extract(epoch FROM first_day::timestamp AT TIME ZONE 'UTC')::bigint AS epoch0
                FROM iot.demo_config) AS c
) AS ud
CROSS JOIN generate_series(0, 35) AS s
CROSS JOIN LATERAL (
    SELECT floor(ud.steps_per_slot
                 * CASE WHEN s < 9 THEN 0.05 WHEN s < 33 THEN 1.4 ELSE 0.4 END
                 * (0.5 + iot.r(ud.day_key * 36 + s, 12)))::integer AS num_steps
) AS st;

CREATE INDEX silver_sensors_user_device_ts ON iot.silver_sensors (user_id, device_id, "timestamp");
ANALYZE iot.silver_sensors;
