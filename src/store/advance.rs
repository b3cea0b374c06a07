//! The statements that advance runs once nodes finish: fan-in counters, queueing and
//! closing pending nodes, and closing runs. Each takes the nodes of many runs at once,
//! so that a batch of finished tasks costs a handful of statements, not a handful per
//! task. Every state change writes its transition row in the same statement.
//!
//! Each statement also says `run_id = ANY($1)`, which the join already implies: it
//! makes the plan an index scan even while the tables are new and their statistics
//! say they are empty (a cached generic plan would otherwise scan them whole for as
//! long as the connection lives).

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::StoreError;
use super::nodes::{QueuedTask, queued_task};

/// A pending node to close without running it.
#[derive(Debug, Clone)]
pub(crate) struct Closing {
    /// Run id.
    pub run_id: Uuid,
    /// Node id.
    pub node_id: String,
    /// `skipped`, or `failed` when its condition could not be evaluated.
    pub state: &'static str,
    /// Why, kept as the node's error.
    pub reason: String,
}

/// What counting a child's finished dependencies left.
#[derive(Debug)]
pub(crate) struct Counted {
    /// Run id.
    pub run_id: Uuid,
    /// The child.
    pub node_id: String,
    /// Its dependencies still unfinished.
    pub left: i32,
    /// The child's task, when counting queued it (see [`count_finished_dependencies`]).
    pub queued: Option<QueuedTask>,
}

/// One child's parents that just finished.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival<'a> {
    /// Run id.
    pub run_id: Uuid,
    /// The child.
    pub node_id: &'a str,
    /// How many of its parents just finished.
    pub finished: i32,
    /// Whether the child is ready once these were its last parents (its rule holds for
    /// their outcomes and it has no `when` condition): then counting queues it at once.
    pub ready_when_last: bool,
}

/// Counts finished dependencies of children still `pending`; returns each such child's
/// remaining count, and queues (`pending → queued`) the children whose last parents
/// these were and that are `ready_when_last`: one row version instead of two. The row
/// lock taken here is what makes a fan-in decision happen exactly once.
pub(crate) async fn count_finished_dependencies(
    client: &impl GenericClient,
    arrivals: &[Arrival<'_>],
) -> Result<Vec<Counted>, StoreError> {
    // A statement over no nodes changes nothing: skip the round trip.
    if arrivals.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH c AS (
                 UPDATE node_runs n SET deps_left = n.deps_left - m.finished,
                     state = CASE WHEN m.ready AND n.deps_left - m.finished <= 0
                                  THEN 'queued' ELSE n.state END,
                     queued_at = CASE WHEN m.ready AND n.deps_left - m.finished <= 0
                                      THEN now() ELSE n.queued_at END
                 FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::bool[])
                      AS m(run_id, node_id, finished, ready)
                 WHERE n.run_id = m.run_id AND n.node_id = m.node_id AND n.state = 'pending'
                   AND n.run_id = ANY($1)
                 RETURNING n.node_id, n.attempt, n.queue, n.type, n.run_id, n.deps_left, n.state
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
                 SELECT run_id, node_id, 'pending', 'queued', attempt FROM c
                 WHERE state = 'queued'
             )
             SELECT * FROM c",
        )
        .await?;
    let run_ids: Vec<Uuid> = arrivals.iter().map(|a| a.run_id).collect();
    let node_ids: Vec<&str> = arrivals.iter().map(|a| a.node_id).collect();
    let finished: Vec<i32> = arrivals.iter().map(|a| a.finished).collect();
    let ready: Vec<bool> = arrivals.iter().map(|a| a.ready_when_last).collect();
    let rows = client
        .query(&stmt, &[&run_ids, &node_ids, &finished, &ready])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Counted {
            run_id: r.get(4),
            node_id: r.get(0),
            left: r.get(5),
            queued: (r.get::<_, &str>(6) == "queued").then(|| queued_task(r)),
        })
        .collect())
}

/// `pending → queued` for the named (run, node) pairs; returns the tasks to publish.
pub(crate) async fn enqueue_all(
    client: &impl GenericClient,
    nodes: &[(Uuid, &str)],
) -> Result<Vec<(Uuid, QueuedTask)>, StoreError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH q AS (
                 UPDATE node_runs n SET state = 'queued', queued_at = now()
                 FROM unnest($1::uuid[], $2::text[]) AS m(run_id, node_id)
                 WHERE n.run_id = m.run_id AND n.node_id = m.node_id AND n.state = 'pending'
                   AND n.run_id = ANY($1)
                 RETURNING n.run_id, n.node_id, n.attempt, n.queue, n.type
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
                 SELECT run_id, node_id, 'pending', 'queued', attempt FROM q
             )
             SELECT node_id, attempt, queue, type, run_id FROM q",
        )
        .await?;
    let run_ids: Vec<Uuid> = nodes.iter().map(|n| n.0).collect();
    let node_ids: Vec<&str> = nodes.iter().map(|n| n.1).collect();
    let rows = client.query(&stmt, &[&run_ids, &node_ids]).await?;
    Ok(rows.iter().map(|r| (r.get(4), queued_task(r))).collect())
}

/// `pending → state` for each node, with its reason as the error; returns the (run,
/// node, state) of those actually changed.
pub(crate) async fn close_pending_all(
    client: &impl GenericClient,
    nodes: &[Closing],
) -> Result<Vec<(Uuid, String, String)>, StoreError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH s AS (
                 UPDATE node_runs n SET state = m.state, error = m.reason, finished_at = now()
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                      AS m(run_id, node_id, state, reason)
                 WHERE n.run_id = m.run_id AND n.node_id = m.node_id AND n.state = 'pending'
                   AND n.run_id = ANY($1)
                 RETURNING n.run_id, n.node_id, n.attempt, m.state, m.reason
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
                 SELECT run_id, node_id, 'pending', state, attempt, reason FROM s
             )
             SELECT run_id, node_id, state FROM s",
        )
        .await?;
    let run_ids: Vec<Uuid> = nodes.iter().map(|n| n.run_id).collect();
    let node_ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    let states: Vec<&str> = nodes.iter().map(|n| n.state).collect();
    let reasons: Vec<&str> = nodes.iter().map(|n| n.reason.as_str()).collect();
    let rows = client
        .query(&stmt, &[&run_ids, &node_ids, &states, &reasons])
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Counts (run, finished, failed) nodes as final. A run with no node left closes
/// (`completed`, or `failed` if any node failed); returns the runs closed, with their
/// new state.
pub(crate) async fn count_finished_nodes(
    client: &impl GenericClient,
    counts: &[(Uuid, i32, i32)],
) -> Result<Vec<(Uuid, String)>, StoreError> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH r AS (
                 UPDATE runs SET
                     nodes_left = nodes_left - m.finished,
                     failed_nodes = failed_nodes + m.failed,
                     state = CASE WHEN nodes_left - m.finished > 0 THEN state
                                  WHEN failed_nodes + m.failed > 0 THEN 'failed'
                                  ELSE 'completed' END,
                     finished_at = CASE WHEN nodes_left - m.finished > 0 THEN NULL
                                        ELSE now() END
                 FROM unnest($1::uuid[], $2::int4[], $3::int4[]) AS m(id, finished, failed)
                 WHERE runs.id = m.id AND runs.state = 'running' AND runs.id = ANY($1)
                 RETURNING runs.id, runs.state
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state)
                 SELECT id, NULL, 'running', state FROM r WHERE state <> 'running'
             )
             SELECT id, state FROM r WHERE state <> 'running'",
        )
        .await?;
    let run_ids: Vec<Uuid> = counts.iter().map(|c| c.0).collect();
    let finished: Vec<i32> = counts.iter().map(|c| c.1).collect();
    let failed: Vec<i32> = counts.iter().map(|c| c.2).collect();
    let rows = client.query(&stmt, &[&run_ids, &finished, &failed]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
