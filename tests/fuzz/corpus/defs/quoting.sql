-- @param a TIMESTAMP = '2025-01-01T00:00:00+01:00'
-- @param b STRING IN ('x', 'y''z') = NULL
SELECT $q$ :a $q$, E'\' :z', ":z", /* /* :z */ */ :a::date, :b -- :z
;
