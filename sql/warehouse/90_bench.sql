-- Benchmark table (DESIGN §15 "snapshot sync of 3.65 million rows"): 10,000
-- users x 365 days of daily figures ending on demo_config.last_day. Not part
-- of the demo: scripts/load-warehouse.sh loads it only with --with-bench.
-- Cheap arithmetic only (about 10 s on 2 cores).
DROP TABLE IF EXISTS iot.bench_daily;
CREATE TABLE iot.bench_daily (
    user_id  integer NOT NULL,
    day      date NOT NULL,
    steps    integer NOT NULL,
    miles    double precision NOT NULL,
    calories double precision NOT NULL,
    device   text NOT NULL
);

INSERT INTO iot.bench_daily
SELECT u, c.first_day + d,
       (2000 + (u * 7919 + d * 104729) % 12000),
       ((2000 + (u * 7919 + d * 104729) % 12000) * 0.00047)::double precision,
       (1500 + (u * 31 + d * 17) % 1400)::double precision,
       'watch-' || u
FROM generate_series(1, 10000) AS u
CROSS JOIN generate_series(0, 364) AS d
CROSS JOIN (SELECT last_day - 364 AS first_day FROM iot.demo_config) AS c;

ALTER TABLE iot.bench_daily ADD PRIMARY KEY (user_id, day);
ANALYZE iot.bench_daily;
