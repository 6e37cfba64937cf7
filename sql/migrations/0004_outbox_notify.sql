-- Wakes tidepool-sync's write-back shipper as soon as a write adds outbox rows:
-- every INSERT statement into tidepool.writeback_outbox sends one
-- NOTIFY tidepool_outbox. Postgres delivers it only when the writing
-- transaction commits (never for a rolled-back write), and folds the notifies
-- of one transaction into one. The shipper still looks every sync.outbox_poll
-- (default 5s) in case a notify was missed (its connection was down).
CREATE FUNCTION tidepool.writeback_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tidepool_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER writeback_outbox_notify AFTER INSERT ON tidepool.writeback_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tidepool.writeback_outbox_notify();
