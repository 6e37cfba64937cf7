-- Demo dataset: every user, for the dashboard's dropdown.
-- @description Smartwatch users for pickers: id, gender, age and risk score
-- @requires    users
-- @cache       5m
SELECT user_id, gender, age, risk
FROM iot.users
ORDER BY user_id
