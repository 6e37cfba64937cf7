-- Demo lakehouse, step 0: the schema and the helpers every later file uses.
-- Plain PostgreSQL, run on the warehouse emulator's database: the emulator maps
-- `catalog.schema.table` to `schema.table`, so with catalog `demo` these tables
-- are `demo.iot.silver_users` and so on in warehouse SQL. Idempotent: the whole
-- schema is dropped and rebuilt.
--
-- Dates: the data covers the 90 days ending on psql variable :anchor (a date,
-- e.g. psql -v anchor=2025-06-30), or yesterday when it is unset, so that synced
-- data always looks recent. Every value is a deterministic function of
-- (user, day index, reading index): two loads with the same anchor are identical.
\set ON_ERROR_STOP 1
\if :{?anchor}
\else
\set anchor ''
\endif

DROP SCHEMA IF EXISTS iot CASCADE;
CREATE SCHEMA iot;

-- Uniform pseudo-random number in [0, 1) from a key and a salt: Postgres's own
-- integer hash, so no random() and no seed. Inlined by the planner.
CREATE FUNCTION iot.r(k bigint, salt integer) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (hashint8(k * 1000003 + salt) & 2147483647)::double precision / 2147483648.0 $$;

CREATE TABLE iot.demo_config (
    last_day  date NOT NULL,  -- the newest day with readings
    days      integer NOT NULL,
    first_day date GENERATED ALWAYS AS (last_day - (days - 1)) STORED
);
INSERT INTO iot.demo_config (last_day, days)
VALUES (COALESCE(NULLIF(:'anchor', '')::date, current_date - 1), 90);
