//! Operator actions on runs: cancel, and reset nodes for a manual retry. Each changes
//! states conditionally and logs every change in `transitions`, like the engine does.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use super::StoreError;

/// A run's state and every node's state, with the run row locked for the transaction.
pub(crate) async fn lock_run(
    client: &impl GenericClient,
    run_id: Uuid,
) -> Result<Option<(String, Vec<(String, String)>)>, StoreError> {
    let Some(run) = client
        .query_opt(
            "SELECT state FROM runs WHERE id = $1 FOR UPDATE",
            &[&run_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let nodes = client
        .query(
            "SELECT node_id, state FROM node_runs WHERE run_id = $1",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some((run.get(0), nodes)))
}

/// Puts the named nodes back to `pending` for a new attempt, with their new dependency
/// counts, and reopens the run with `nodes_left` of them and `failed_nodes` failures
/// outside them. `input`, when given, replaces the run's input.
pub(crate) async fn reset_nodes(
    client: &impl GenericClient,
    run_id: Uuid,
    nodes: &[(String, i32)],
    failed_outside: i32,
    input: Option<&Value>,
) -> Result<(), StoreError> {
    let ids: Vec<&str> = nodes.iter().map(|(id, _)| id.as_str()).collect();
    let deps: Vec<i32> = nodes.iter().map(|(_, d)| *d).collect();
    client
        .execute(
            "WITH old AS (
                 SELECT node_id, state FROM node_runs WHERE run_id = $1 AND node_id = ANY($2) FOR UPDATE
             ), reset AS (
                 UPDATE node_runs n SET state = 'pending', attempt = n.attempt + 1, deps_left = u.deps,
                        output = NULL, error = NULL, retry_at = NULL,
                        queued_at = NULL, started_at = NULL, finished_at = NULL
                 FROM unnest($2::text[], $3::int[]) AS u(id, deps)
                 WHERE n.run_id = $1 AND n.node_id = u.id
                 RETURNING n.node_id, n.attempt
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
             SELECT $1, reset.node_id, old.state, 'pending', reset.attempt, 'manual retry'
             FROM reset JOIN old USING (node_id)",
            &[&run_id, &ids, &deps],
        )
        .await?;
    client
        .execute(
            "WITH old AS (SELECT state FROM runs WHERE id = $1), r AS (
                 UPDATE runs SET state = 'running', finished_at = NULL, nodes_left = $2,
                        failed_nodes = $3, input = coalesce($4, input)
                 WHERE id = $1 RETURNING id
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, detail)
             SELECT $1, NULL, old.state, 'running', 'manual retry' FROM old, r",
            &[&run_id, &(nodes.len() as i32), &failed_outside, &input],
        )
        .await?;
    Ok(())
}

/// Cancels a running run and every node not yet final. Returns false when the run was
/// not running.
pub(crate) async fn cancel_run(
    client: &impl GenericClient,
    run_id: Uuid,
) -> Result<bool, StoreError> {
    let cancelled = client
        .query_opt(
            "WITH r AS (
                 UPDATE runs SET state = 'cancelled', finished_at = now()
                 WHERE id = $1 AND state = 'running' RETURNING id
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state)
                 SELECT $1, NULL, 'running', 'cancelled' FROM r
             )
             SELECT id FROM r",
            &[&run_id],
        )
        .await?;
    if cancelled.is_none() {
        return Ok(false);
    }
    client
        .execute(
            "WITH old AS (
                 SELECT node_id, state FROM node_runs
                 WHERE run_id = $1 AND state IN ('pending', 'queued', 'retrying', 'running') FOR UPDATE
             ), c AS (
                 UPDATE node_runs n SET state = 'cancelled', finished_at = now(), retry_at = NULL
                 FROM old WHERE n.run_id = $1 AND n.node_id = old.node_id
                 RETURNING n.node_id, n.attempt, old.state AS from_state
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
             SELECT $1, node_id, from_state, 'cancelled', attempt, 'cancelled by an operator' FROM c",
            &[&run_id],
        )
        .await?;
    Ok(true)
}
