-- The audit log of every call to a model provider or HTTP service, failed ones and
-- fallbacks included. Never holds credentials: requests are bodies only.

CREATE TABLE model_calls (
    id                 bigserial   PRIMARY KEY,
    run_id             uuid        NOT NULL,
    node_id            text        NOT NULL,
    attempt            integer     NOT NULL,
    -- Order within the attempt: 0 for the primary profile, then each fallback.
    seq                smallint    NOT NULL,
    profile            text        NOT NULL,
    provider           text        NOT NULL,
    model              text,
    -- 'ok', or the failure class: http_429, http_500, timeout, connect, invalid_response, …
    status             text        NOT NULL,
    http_status        integer,
    latency_ms         double precision NOT NULL,
    prompt_tokens      integer     NOT NULL DEFAULT 0,
    completion_tokens  integer     NOT NULL DEFAULT 0,
    cost               double precision,
    request            jsonb,
    response           jsonb,
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX model_calls_run ON model_calls (run_id, node_id);
CREATE INDEX model_calls_profile_created_at ON model_calls (profile, created_at);
