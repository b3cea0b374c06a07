-- Failure handling: dead letters, incidents, circuit breakers shared by every worker,
-- and the record that deduplicates alerts across workers.

CREATE TABLE dead_letters (
    id            uuid        PRIMARY KEY,
    reason        text        NOT NULL,
    detail        text,
    source_queue  text,
    -- Set for task failures (the body is a task message); NULL for poison messages.
    run_id        uuid,
    node_id       text,
    attempt       integer,
    body          bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    replayed_at   timestamptz,
    -- A re-driven task failure is published twice; it is recorded once.
    dedupe_key    text        UNIQUE
);
CREATE INDEX dead_letters_created_at ON dead_letters (created_at DESC);

CREATE TABLE incidents (
    id            uuid        PRIMARY KEY,
    subject       text        NOT NULL,
    profile       text,
    detail        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    -- What the incident webhook (a ticket system) answered, e.g. its ticket id.
    external_ref  text
);
-- One open incident per subject, however many workers see the failure.
CREATE UNIQUE INDEX incidents_one_open_per_subject ON incidents (subject) WHERE resolved_at IS NULL;

CREATE TABLE breakers (
    profile               text        PRIMARY KEY,
    state                 text        NOT NULL DEFAULT 'closed'
                          CHECK (state IN ('closed', 'open', 'half_open')),
    consecutive_failures  integer     NOT NULL DEFAULT 0,
    opened_at             timestamptz,
    last_error            text,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alerts_sent (
    subject       text        PRIMARY KEY,
    last_sent_at  timestamptz NOT NULL,
    -- Alerts for this subject swallowed since the last one sent.
    suppressed    integer     NOT NULL DEFAULT 0
);
