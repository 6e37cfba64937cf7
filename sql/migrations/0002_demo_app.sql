-- 0002: the demo application's writable tables (DESIGN §14, issue 7; docs/writeback.md).
-- Each is declared writable by its table comment (@writable ...); tidepool-server
-- reflects them from pg_catalog at start and on SIGHUP. The version column is the
-- row version behind ETag / If-Match: the write-back SQL bumps it on every update.

CREATE SCHEMA IF NOT EXISTS app;

-- A free-text note about a user, written from the dashboard's form. Rows are scoped
-- to their author: the API sets author from the caller and only lets the author
-- change or delete them.
CREATE TABLE app.user_notes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    integer NOT NULL CHECK (user_id > 0),
    author     text NOT NULL,
    note       text NOT NULL CONSTRAINT user_notes_note_length_ck CHECK (length(note) BETWEEN 1 AND 2000),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version    bigint NOT NULL DEFAULT 1 CHECK (version >= 1)
);
CREATE INDEX user_notes_user_idx ON app.user_notes (user_id, created_at DESC);
COMMENT ON TABLE app.user_notes IS
    '@writable roles=writer read=reader owner=author touch=updated_at readonly=created_at';

-- Which device a user wears; mirrored to the warehouse table demo.iot.device_assignments
-- (the daemon ships writeback_outbox rows there with MERGE INTO, in order per key).
CREATE TABLE app.device_assignments (
    device_id   integer PRIMARY KEY CHECK (device_id > 0),
    user_id     integer NOT NULL CHECK (user_id > 0),
    assigned_at timestamptz NOT NULL DEFAULT now(),
    note        varchar(200),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 1 CHECK (version >= 1)
);
CREATE INDEX device_assignments_user_idx ON app.device_assignments (user_id);
COMMENT ON TABLE app.device_assignments IS
    '@writable roles=writer,admin read=reader if_match=required touch=updated_at mirror=demo.iot.device_assignments';
