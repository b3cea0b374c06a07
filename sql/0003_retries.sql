-- Retries: when a node in state 'retrying' is due. The attempt counter itself is
-- node_runs.attempt; every retry is a transition (running -> retrying -> queued).
ALTER TABLE node_runs ADD COLUMN retry_at timestamptz;
