-- Demo lakehouse, step 1: silver_users, 1,000 smartwatch users with the seed
-- data's columns (DESIGN §14). Height in cm, weight in kg; smoker and
-- familyhistory 'Y'/'N'; cholestlevs 'Normal' | 'Above Normal' | 'High';
-- bp 'Normal' | 'High' | 'Very High'; risk 0..100 derived from the others.
CREATE TABLE iot.silver_users (
    user_id       integer PRIMARY KEY,
    gender        text NOT NULL,
    age           integer NOT NULL,
    height        double precision NOT NULL,
    weight        double precision NOT NULL,
    smoker        text NOT NULL,
    familyhistory text NOT NULL,
    cholestlevs   text NOT NULL,
    bp            text NOT NULL,
    risk          integer NOT NULL,
    updated_at    timestamptz NOT NULL
);

INSERT INTO iot.silver_users
WITH base AS (
    SELECT u AS user_id,
           CASE WHEN iot.r(u, 1) < 0.5 THEN 'F' ELSE 'M' END AS gender,
           20 + floor(iot.r(u, 2) * 60)::integer AS age,
           iot.r(u, 3) AS rh, iot.r(u, 4) AS rb,
           iot.r(u, 5) < 0.18 AS smoker, iot.r(u, 6) < 0.30 AS famhist,
           iot.r(u, 7) AS rc, iot.r(u, 8) AS rp, iot.r(u, 9) AS rr
    FROM generate_series(1, 1000) AS u
), body AS (
    SELECT *,
           round((CASE WHEN gender = 'F' THEN 152 + rh * 26 ELSE 165 + rh * 28 END)::numeric, 1)::double precision AS height,
           18.5 + power(rb, 1.5) * 17 AS bmi
    FROM base
), scored AS (
    SELECT *,
           round((bmi * (height / 100) ^ 2)::numeric, 1)::double precision AS weight,
           (bmi - 18.5) / 17 * 0.5 + (age - 20) / 60.0 * 0.3 + rc * 0.4 AS chol_score,
           (bmi - 18.5) / 17 * 0.4 + (age - 20) / 60.0 * 0.4 + rp * 0.3
               + CASE WHEN smoker THEN 0.1 ELSE 0 END AS bp_score
    FROM body
), ranked AS (
    SELECT *,
           CASE WHEN chol_score < 0.45 THEN 0 WHEN chol_score < 0.7 THEN 1 ELSE 2 END AS chol_rank,
           CASE WHEN bp_score < 0.45 THEN 0 WHEN bp_score < 0.7 THEN 1 ELSE 2 END AS bp_rank
    FROM scored
)
SELECT user_id, gender, age, height, weight,
       CASE WHEN smoker THEN 'Y' ELSE 'N' END,
       CASE WHEN famhist THEN 'Y' ELSE 'N' END,
       (ARRAY['Normal', 'Above Normal', 'High'])[chol_rank + 1],
       (ARRAY['Normal', 'High', 'Very High'])[bp_rank + 1],
       least(100, greatest(0, round(5 + (age - 20) * 0.45 + (bmi - 22) * 1.4
             + CASE WHEN smoker THEN 15 ELSE 0 END + CASE WHEN famhist THEN 10 ELSE 0 END
             + chol_rank * 8 + bp_rank * 8 + rr * 10)))::integer,
       (SELECT first_day FROM iot.demo_config)::timestamp AT TIME ZONE 'UTC'
FROM ranked;
