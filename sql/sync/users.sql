-- Demo sync job: the smartwatch users, copied whole every hour (DESIGN §14).
-- @description Smartwatch users with their health profile (demo)
-- @target      iot.users
-- @mode        snapshot
-- @key         user_id
-- @every       1h
-- @timeout     5m
SELECT user_id, gender, age, height, weight, smoker, familyhistory, cholestlevs, bp, risk
FROM demo.iot.silver_users
