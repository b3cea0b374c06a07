-- The core tables: workflow versions, runs, node states and the transition log.
-- Table and column names in DESIGN.md §3 are a public contract: operators query them.

CREATE TABLE workflows (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    definition  jsonb       NOT NULL,
    -- Task queues the nodes use, so that workers know what to consume without parsing.
    queues      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE runs (
    id            uuid        PRIMARY KEY,
    workflow      text        NOT NULL,
    version       integer     NOT NULL,
    state         text        NOT NULL
                  CHECK (state IN ('running', 'completed', 'failed', 'cancelled')),
    -- The CloudEvent that started the run; (source, id) makes triggering idempotent.
    event_source  text        NOT NULL,
    event_id      text        NOT NULL,
    event         jsonb       NOT NULL,
    input         jsonb       NOT NULL DEFAULT '{}',
    priority      smallint    NOT NULL DEFAULT 0,
    -- Nodes not yet in a final state; the transaction that takes it to 0 closes the run.
    nodes_left    integer     NOT NULL,
    failed_nodes  integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    UNIQUE (event_source, event_id, workflow),
    FOREIGN KEY (workflow, version) REFERENCES workflows (name, version)
);
CREATE INDEX runs_created_at ON runs (created_at DESC);
CREATE INDEX runs_workflow_created_at ON runs (workflow, created_at DESC);

CREATE TABLE node_runs (
    run_id       uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    node_id      text        NOT NULL,
    state        text        NOT NULL
                 CHECK (state IN ('pending', 'queued', 'running', 'completed', 'failed',
                                  'retrying', 'skipped', 'cancelled')),
    attempt      integer     NOT NULL DEFAULT 1,
    -- Dependencies not yet finished: the fan-in counter, decremented under the row lock.
    deps_left    integer     NOT NULL,
    -- Fencing token: bumped by every claim; a completion must present the current one.
    fence        bigint      NOT NULL DEFAULT 0,
    queue        text        NOT NULL,
    type         text        NOT NULL,
    output       jsonb,
    error        text,
    queued_at    timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, node_id)
);
-- Backlog figures (queued, running, retrying per queue) read only the live rows.
CREATE INDEX node_runs_live ON node_runs (queue, state)
    WHERE state IN ('queued', 'running', 'retrying');

CREATE TABLE transitions (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL,
    node_id     text,
    from_state  text,
    to_state    text        NOT NULL,
    attempt     integer,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    detail      text
);
CREATE INDEX transitions_run ON transitions (run_id, id);
