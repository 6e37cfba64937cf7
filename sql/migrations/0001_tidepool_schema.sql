-- 0001: Tidepool's own tables (DESIGN §6). Applied by lib/migrate.c inside one
-- transaction, which also created schema tidepool and tidepool.schema_migrations.
-- Never edit this file once released: add 0002_... instead (docs/migrations.md).

CREATE SCHEMA IF NOT EXISTS tidepool;

-- One row per sync job: where it is (watermark, generation) and how it went last.
CREATE TABLE tidepool.sync_state (
    job                  text PRIMARY KEY CHECK (job ~ '^[A-Za-z0-9_.-]+$' AND length(job) <= 1024),  -- no ':' (NOTIFY payload job:generation)
    mode                 text CHECK (mode IN ('snapshot', 'incremental')),
    target_table         text,                      -- schema-qualified target, as defined
    watermark            text,                      -- text form of the @watermark value; NULL = from the start
    generation           bigint NOT NULL DEFAULT 0 CHECK (generation >= 0),  -- +1 per committed run; NOTIFY tidepool_sync 'job:generation'
    rows                 bigint CHECK (rows >= 0),  -- rows in the target after the last successful run
    definition_sha256    text,                      -- of the job definition last run (a changed query resets nothing by itself)
    last_run_id          bigint,                    -- tidepool.sync_runs.id of the latest run
    last_attempt_at      timestamptz,
    last_success_at      timestamptz,
    last_error           text,                      -- NULL after a success
    last_error_at        timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    last_reconcile_at    timestamptz,               -- @deletes reconcile: last full key comparison
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tidepool.sync_state IS 'Per-job sync progress (watermark, generation) and last outcome; written by tidepool-sync';

-- One row per run attempt, inserted as 'running' and finished in place.
CREATE TABLE tidepool.sync_runs (
    id             bigserial PRIMARY KEY,
    job            text NOT NULL,
    mode           text CHECK (mode IN ('snapshot', 'incremental', 'reconcile')),
    trigger        text NOT NULL DEFAULT 'schedule' CHECK (trigger IN ('schedule', 'notify', 'once', 'manual', 'startup')),
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed', 'canceled')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    duration_ms    bigint CHECK (duration_ms >= 0),
    rows           bigint NOT NULL DEFAULT 0 CHECK (rows >= 0),
    bytes          bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    watermark_from text,                            -- incremental range fetched: (from, to]
    watermark_to   text,
    generation     bigint,                          -- generation committed by this run (succeeded only)
    statement_id   text,                            -- warehouse statement id, for support
    error          text,
    daemon         text NOT NULL DEFAULT '',        -- host:pid of the daemon that ran it
    CONSTRAINT sync_runs_finished_ck CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT sync_runs_error_ck CHECK (status <> 'failed' OR error IS NOT NULL),
    CONSTRAINT sync_runs_order_ck CHECK (finished_at IS NULL OR finished_at >= started_at)
);
CREATE INDEX sync_runs_job_started_idx ON tidepool.sync_runs (job, started_at DESC);
CREATE INDEX sync_runs_running_idx ON tidepool.sync_runs (job) WHERE status = 'running';
CREATE INDEX sync_runs_started_idx ON tidepool.sync_runs (started_at);  -- retention pruning
COMMENT ON TABLE tidepool.sync_runs IS 'History of sync runs (status, rows, bytes, duration, statement id, error)';

ALTER TABLE tidepool.sync_state
    ADD CONSTRAINT sync_state_last_run_fk FOREIGN KEY (last_run_id)
    REFERENCES tidepool.sync_runs (id) ON DELETE SET NULL;

-- Idempotency-Key store: written in the same transaction as the write it guards.
CREATE TABLE tidepool.idempotency_keys (
    actor            text NOT NULL,                  -- authenticated principal; keys are per actor
    key              text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    method           text NOT NULL,
    path             text NOT NULL,
    request_hash     text NOT NULL CHECK (request_hash ~ '^[0-9a-f]{64}$'),  -- sha256 hex of method, path and body
    status           integer NOT NULL CHECK (status BETWEEN 100 AND 599),
    response         text NOT NULL,                  -- body exactly as first sent (replayed byte for byte)
    response_headers jsonb NOT NULL DEFAULT '{}'::jsonb,  -- e.g. {"ETag": "...", "Location": "..."}
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (actor, key),
    CONSTRAINT idempotency_keys_expiry_ck CHECK (expires_at > created_at)
);
CREATE INDEX idempotency_keys_expires_idx ON tidepool.idempotency_keys (expires_at);
COMMENT ON TABLE tidepool.idempotency_keys IS 'First response per (actor, Idempotency-Key) until it expires';

-- Every API write, in the same transaction as the write.
CREATE TABLE tidepool.audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text NOT NULL,
    action     text NOT NULL CHECK (action IN ('insert', 'update', 'delete')),
    table_name text NOT NULL,                        -- schema-qualified
    pk         jsonb NOT NULL,                       -- {"column": value, ...}
    before     jsonb,                                -- NULL for insert
    after      jsonb,                                -- NULL for delete
    request_id text,
    CONSTRAINT audit_log_images_ck CHECK (
        (action = 'insert' AND before IS NULL AND after IS NOT NULL) OR
        (action = 'update' AND before IS NOT NULL AND after IS NOT NULL) OR
        (action = 'delete' AND before IS NOT NULL AND after IS NULL))
);
CREATE INDEX audit_log_table_pk_idx ON tidepool.audit_log (table_name, pk, at);
CREATE INDEX audit_log_at_idx ON tidepool.audit_log (at);
CREATE INDEX audit_log_actor_at_idx ON tidepool.audit_log (actor, at);
COMMENT ON TABLE tidepool.audit_log IS 'One row per API write: actor, action, key, before and after images';

-- Writes to mirrored tables waiting to be shipped to the warehouse (MERGE INTO, in order per key).
CREATE TABLE tidepool.writeback_outbox (
    id              bigserial PRIMARY KEY,           -- shipping order
    table_name      text NOT NULL,                   -- local table, schema-qualified
    warehouse_table text NOT NULL,                   -- catalog.schema.table it mirrors to
    pk              jsonb NOT NULL,
    op              text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    row             jsonb,                           -- full row after the write; NULL for delete
    audit_id        bigint REFERENCES tidepool.audit_log (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    shipped_at      timestamptz,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),  -- backoff: not retried before this
    statement_id    text,                            -- warehouse statement of the last attempt
    CONSTRAINT writeback_outbox_row_ck CHECK ((op = 'delete') = (row IS NULL))
);
-- The shipper reads unshipped rows in id order (and the backlog is their count).
CREATE INDEX writeback_outbox_unshipped_idx ON tidepool.writeback_outbox (id)
    WHERE shipped_at IS NULL;
CREATE INDEX writeback_outbox_key_idx ON tidepool.writeback_outbox (table_name, pk, id)
    WHERE shipped_at IS NULL;
CREATE INDEX writeback_outbox_audit_idx ON tidepool.writeback_outbox (audit_id);
COMMENT ON TABLE tidepool.writeback_outbox IS 'Writes to ship to the warehouse; the backlog is the unshipped rows';

-- API bearer tokens for auth mode "token": only the SHA-256 of the secret is kept.
CREATE TABLE tidepool.api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    roles        text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text,
    expires_at   timestamptz,                        -- NULL = no expiry
    revoked_at   timestamptz,
    last_used_at timestamptz,
    CONSTRAINT api_tokens_expiry_ck CHECK (expires_at IS NULL OR expires_at > created_at),
    CONSTRAINT api_tokens_roles_ck CHECK (array_position(roles, NULL) IS NULL)
);
CREATE UNIQUE INDEX api_tokens_active_name_idx ON tidepool.api_tokens (name) WHERE revoked_at IS NULL;
COMMENT ON TABLE tidepool.api_tokens IS 'Bearer tokens (SHA-256 only) with roles, expiry and revocation';
