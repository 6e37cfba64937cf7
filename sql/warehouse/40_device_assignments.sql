-- Demo lakehouse, step 4: device_assignments, which watch a user wears. The
-- Postgres table app.device_assignments is written by the demo form and
-- mirrored here by the write-back shipper (MERGE INTO on device_id).
-- Seeded with each user's watches as silver_sensors uses them (20_sensors.sql).
CREATE TABLE iot.device_assignments (
    user_id     integer NOT NULL,
    device_id   integer NOT NULL,
    assigned_at timestamptz NOT NULL,
    note        text,
    -- the mirror's MERGE writes every column of app.device_assignments
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, device_id)
);

INSERT INTO iot.device_assignments
SELECT u.user_id, u.user_id * 10 + w.n,
       (c.first_day + w.from_day)::timestamp AT TIME ZONE 'UTC',
       CASE WHEN w.n = 2 THEN 'replacement watch' ELSE 'first watch' END
FROM iot.silver_users AS u
CROSS JOIN iot.demo_config AS c
JOIN (VALUES (1, 0), (2, 45)) AS w (n, from_day) ON w.n = 1 OR u.user_id % 3 = 0;
