-- Demo lakehouse, step 3: gold aggregates computed in the warehouse, the
-- tables the demo sync jobs copy to Postgres.
--
-- gold_user_daily_metrics: per user and UTC day, totals and 7-day moving
-- averages (the day and the six before it; fewer at the start of the range).
-- updated_at is when the day was closed (next midnight + 1 hour): the
-- watermark of the incremental daily_metrics job. 1,000 users x 90 days.
CREATE TABLE iot.gold_user_daily_metrics (
    user_id      integer NOT NULL,
    day          date NOT NULL,
    steps        bigint NOT NULL,
    miles        double precision NOT NULL,
    calories     double precision NOT NULL,
    steps_ma7    double precision NOT NULL,
    calories_ma7 double precision NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, day)
);

INSERT INTO iot.gold_user_daily_metrics
WITH daily AS (
    SELECT user_id, ("timestamp" AT TIME ZONE 'UTC')::date AS day,
           sum(num_steps)::bigint AS steps,
           sum(miles_walked) AS miles,
           sum(calories_burnt) AS calories
    FROM iot.silver_sensors
    GROUP BY 1, 2
)
SELECT user_id, day, steps,
       round(miles::numeric, 2)::double precision,
       round(calories::numeric, 1)::double precision,
       round(avg(steps) OVER w, 1)::double precision,
       round((avg(calories) OVER w)::numeric, 1)::double precision,
       (day + 1)::timestamp AT TIME ZONE 'UTC' + interval '1 hour'
FROM daily
WINDOW w AS (PARTITION BY user_id ORDER BY day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW);

CREATE INDEX gold_user_daily_metrics_updated ON iot.gold_user_daily_metrics (updated_at);

-- gold_cohort_risk: risk by 10 kg weight band and cholesterol level (the seeds'
-- scatter comparison). cholest_rank orders the levels (0 Normal, 1 Above
-- Normal, 2 High); weight_band_lo orders the bands.
CREATE TABLE iot.gold_cohort_risk (
    weight_band    text NOT NULL,
    weight_band_lo integer NOT NULL,
    cholestlevs    text NOT NULL,
    cholest_rank   integer NOT NULL,
    users          bigint NOT NULL,
    avg_risk       double precision NOT NULL,
    avg_age        double precision NOT NULL,
    avg_weight     double precision NOT NULL,
    PRIMARY KEY (weight_band_lo, cholest_rank)
);

INSERT INTO iot.gold_cohort_risk
SELECT lo || '-' || (lo + 9) || ' kg', lo, cholestlevs,
       CASE cholestlevs WHEN 'Normal' THEN 0 WHEN 'Above Normal' THEN 1 ELSE 2 END,
       count(*), round(avg(risk), 2)::double precision, round(avg(age), 1)::double precision,
       round(avg(weight)::numeric, 1)::double precision
FROM (SELECT *, (floor(weight / 10) * 10)::integer AS lo FROM iot.silver_users) AS u
GROUP BY lo, cholestlevs;
