-- The event store: one append-only table of every order's events.
CREATE TABLE IF NOT EXISTS events (
    -- Global position, handed out at INSERT. Unique, but NOT commit order:
    -- readers order by (tx_id, position), see orders/event_store.py.
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction; readers only take rows whose transaction is
    -- older than every transaction still running, so none can appear behind them.
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id      text        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    event_type     text        NOT NULL,
    schema_version smallint    NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Two writers racing on one order: exactly one wins each version.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

-- The tailing query's index; without it every idle poll scans the table.
CREATE INDEX IF NOT EXISTS events_tx_position_idx ON events (tx_id, position);

-- Durable idempotency keys: a retried command returns its first result.
CREATE TABLE IF NOT EXISTS processed_commands (
    command_id   text        PRIMARY KEY,
    fingerprint  text        NOT NULL,
    stream_id    text        NOT NULL,
    version      integer     NOT NULL,
    position     bigint      NOT NULL,
    tx_id        xid8        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
