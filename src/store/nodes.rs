//! `node_runs` and the transitions they log. Each state change is a conditional UPDATE
//! whose transition row is written by the same statement, so neither exists without the
//! other.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use super::StoreError;

/// The run a claimed node belongs to: what its templates may read.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Run id.
    pub run_id: Uuid,
    /// Workflow name.
    pub workflow: String,
    /// Pinned version.
    pub version: i32,
    /// The CloudEvent that started the run.
    pub event: Value,
    /// The run's input.
    pub input: Value,
    /// Default message priority of the run's tasks.
    pub priority: i16,
}

/// Result of trying to claim a node for one task message.
#[derive(Debug)]
pub enum Claim {
    /// This worker now owns the node; completions must present `fence`.
    Claimed {
        /// The fencing token written by the claim.
        fence: i64,
        /// `queued`, or `running` when taken over from a dead worker.
        from_state: String,
        /// What the node's templates read.
        run: RunContext,
    },
    /// The node is not claimable by this message: it is a duplicate or stale.
    NotClaimable {
        /// The node's state now (`None` when the node does not exist).
        state: Option<String>,
        /// The node's attempt now.
        attempt: i32,
    },
}

/// A node's state and output, as templates see `nodes.<id>`.
#[derive(Debug, Clone)]
pub struct NodeOutput {
    /// Node id.
    pub node_id: String,
    /// Node state.
    pub state: String,
    /// Output, when completed.
    pub output: Option<Value>,
}

/// A node in state `queued`, i.e. a task message that must be (or was) published.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedTask {
    /// Node id.
    pub node_id: String,
    /// Attempt the message must carry.
    pub attempt: i32,
    /// Task queue.
    pub queue: String,
    /// Node type.
    pub kind: String,
}

/// Claims `(run, node, attempt)`: `queued → running`; `retrying → queued → running` when
/// the message is the retry's (attempt one more than the node's); or `running → running`
/// with a new fence when `take_over` (a redelivered message whose worker died).
pub(crate) async fn claim(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
    attempt: i32,
    take_over: bool,
) -> Result<Claim, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH old AS (
                 SELECT state, attempt FROM node_runs
                 WHERE run_id = $1 AND node_id = $2 FOR UPDATE
             ), claimed AS (
                 UPDATE node_runs n
                 SET state = 'running', attempt = $3, fence = n.fence + 1, started_at = now(),
                     retry_at = NULL
                 FROM old
                 WHERE n.run_id = $1 AND n.node_id = $2
                   AND ((old.state = 'queued' AND old.attempt = $3)
                     OR (old.state = 'retrying' AND old.attempt + 1 = $3)
                     OR (old.state = 'running' AND old.attempt = $3 AND $4))
                 RETURNING n.fence, old.state AS from_state
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
                 SELECT $1, $2, 'retrying', 'queued', $3 FROM claimed WHERE from_state = 'retrying'
                 UNION ALL
                 SELECT $1, $2, CASE from_state WHEN 'retrying' THEN 'queued' ELSE from_state END,
                        'running', $3
                 FROM claimed
             )
             SELECT old.state, old.attempt, claimed.fence, claimed.from_state,
                    r.workflow, r.version, r.event, r.input, r.priority
             FROM old LEFT JOIN claimed ON true JOIN runs r ON r.id = $1",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id, &node_id, &attempt, &take_over])
        .await?;
    let Some(row) = row else {
        return Ok(Claim::NotClaimable {
            state: None,
            attempt: 0,
        });
    };
    match row.get::<_, Option<i64>>(2) {
        Some(fence) => Ok(Claim::Claimed {
            fence,
            from_state: row.get(3),
            run: RunContext {
                run_id,
                workflow: row.get(4),
                version: row.get(5),
                event: row.get(6),
                input: row.get(7),
                priority: row.get(8),
            },
        }),
        None => Ok(Claim::NotClaimable {
            state: Some(row.get(0)),
            attempt: row.get(1),
        }),
    }
}

/// The run a node belongs to, for re-driving without a claim.
pub(crate) async fn run_context(
    client: &impl GenericClient,
    run_id: Uuid,
) -> Result<RunContext, StoreError> {
    let row = client
        .query_opt(
            "SELECT workflow, version, event, input, priority FROM runs WHERE id = $1",
            &[&run_id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id} does not exist")))?;
    Ok(RunContext {
        run_id,
        workflow: row.get(0),
        version: row.get(1),
        event: row.get(2),
        input: row.get(3),
        priority: row.get(4),
    })
}

/// States and outputs of the named nodes of a run.
pub(crate) async fn outputs(
    client: &impl GenericClient,
    run_id: Uuid,
    node_ids: &[String],
) -> Result<Vec<NodeOutput>, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT node_id, state, output FROM node_runs WHERE run_id = $1 AND node_id = ANY($2)",
        )
        .await?;
    let rows = client.query(&stmt, &[&run_id, &node_ids]).await?;
    Ok(rows
        .iter()
        .map(|r| NodeOutput {
            node_id: r.get(0),
            state: r.get(1),
            output: r.get(2),
        })
        .collect())
}

/// `running → state` for the holder of `fence`. Returns false when the fence is stale
/// (another worker took the node over), in which case nothing changed.
pub(crate) async fn finish(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
    fence: i64,
    state: &str,
    output: Option<&Value>,
    error: Option<&str>,
) -> Result<bool, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH done AS (
                 UPDATE node_runs SET state = $4, output = $5, error = $6, finished_at = now()
                 WHERE run_id = $1 AND node_id = $2 AND fence = $3 AND state = 'running'
                 RETURNING attempt
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
             SELECT $1, $2, 'running', $4, attempt, $6 FROM done
             RETURNING attempt",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&run_id, &node_id, &fence, &state, &output, &error])
        .await?;
    Ok(!rows.is_empty())
}

/// `running → retrying` for the holder of `fence`, due at `retry_at`. Returns false when
/// the fence is stale.
pub(crate) async fn schedule_retry(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
    fence: i64,
    error: &str,
    retry_at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH r AS (
                 UPDATE node_runs SET state = 'retrying', error = $4, retry_at = $5
                 WHERE run_id = $1 AND node_id = $2 AND fence = $3 AND state = 'running'
                 RETURNING attempt
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
             SELECT $1, $2, 'running', 'retrying', attempt, $4 FROM r
             RETURNING attempt",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&run_id, &node_id, &fence, &error, &retry_at])
        .await?;
    Ok(!rows.is_empty())
}

/// `running → queued` for the holder of `fence`, without using up the attempt: the task
/// was deferred (its profile's breaker is open) and comes back later. False when the
/// fence is stale.
pub(crate) async fn release(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
    fence: i64,
    reason: &str,
) -> Result<bool, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH r AS (
                 UPDATE node_runs SET state = 'queued', queued_at = now(), started_at = NULL
                 WHERE run_id = $1 AND node_id = $2 AND fence = $3 AND state = 'running'
                 RETURNING attempt
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
             SELECT $1, $2, 'running', 'queued', attempt, $4 FROM r
             RETURNING attempt",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&run_id, &node_id, &fence, &reason])
        .await?;
    Ok(!rows.is_empty())
}

/// Nodes still `retrying` more than `grace` after they were due: their delayed message
/// was lost (a classic queue's dead-lettering is at-most-once when the broker crashes at
/// the moment of expiry). Each returned node's due time moves `grace` ahead, so that the
/// next sweep leaves it alone while its republished message waits in a backlog. The
/// advisory lock lets one worker sweep at a time; the others get nothing.
pub(crate) async fn take_overdue_retries(
    client: &impl GenericClient,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<(Uuid, QueuedTask)>, StoreError> {
    let rows = client
        .query(
            "WITH due AS (
                 SELECT run_id, node_id FROM node_runs
                 WHERE state = 'retrying'
                   AND retry_at < now() - make_interval(secs => $1)
                   AND pg_try_advisory_xact_lock(7221640113)
                 LIMIT $2 FOR UPDATE SKIP LOCKED
             )
             UPDATE node_runs n SET retry_at = now() + make_interval(secs => $1)
             FROM due WHERE n.run_id = due.run_id AND n.node_id = due.node_id
             RETURNING n.run_id, n.node_id, n.attempt, n.queue, n.type",
            &[&grace.as_secs_f64(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let task = QueuedTask {
                node_id: r.get(1),
                attempt: r.get(2),
                queue: r.get(3),
                kind: r.get(4),
            };
            (r.get(0), task)
        })
        .collect())
}

/// When a node waiting in `retrying` is due, if it is.
pub(crate) async fn retry_due(
    client: &impl GenericClient,
    run_id: Uuid,
    node_id: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    let row = client
        .query_opt(
            "SELECT retry_at FROM node_runs WHERE run_id = $1 AND node_id = $2 AND state = 'retrying'",
            &[&run_id, &node_id],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// Counts one finished dependency for each of `children` still `pending`, returning
/// each child's remaining count. The row lock taken here is what makes the fan-in
/// decision happen exactly once: concurrent parents queue on it.
pub(crate) async fn count_finished_dependency(
    client: &impl GenericClient,
    run_id: Uuid,
    children: &[String],
) -> Result<Vec<(String, i32)>, StoreError> {
    // A statement over no nodes changes nothing: skip the round trip.
    if children.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "UPDATE node_runs SET deps_left = deps_left - 1
             WHERE run_id = $1 AND node_id = ANY($2) AND state = 'pending'
             RETURNING node_id, deps_left",
        )
        .await?;
    let rows = client.query(&stmt, &[&run_id, &children]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `pending → queued` for the named nodes; returns the tasks to publish.
pub(crate) async fn enqueue(
    client: &impl GenericClient,
    run_id: Uuid,
    node_ids: &[String],
) -> Result<Vec<QueuedTask>, StoreError> {
    // A statement over no nodes changes nothing: skip the round trip.
    if node_ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH q AS (
                 UPDATE node_runs SET state = 'queued', queued_at = now()
                 WHERE run_id = $1 AND node_id = ANY($2) AND state = 'pending'
                 RETURNING node_id, attempt, queue, type
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
                 SELECT $1, node_id, 'pending', 'queued', attempt FROM q
             )
             SELECT node_id, attempt, queue, type FROM q",
        )
        .await?;
    let rows = client.query(&stmt, &[&run_id, &node_ids]).await?;
    Ok(rows.iter().map(queued_task).collect())
}

/// `pending → state` (`skipped`, or `failed` when a condition could not be evaluated)
/// for the named nodes, with `reason` as their error; returns the ids actually changed.
pub(crate) async fn close_pending(
    client: &impl GenericClient,
    run_id: Uuid,
    node_ids: &[String],
    state: &str,
    reason: &str,
) -> Result<Vec<String>, StoreError> {
    // A statement over no nodes changes nothing: skip the round trip.
    if node_ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached(
            "WITH s AS (
                 UPDATE node_runs SET state = $3, error = $4, finished_at = now()
                 WHERE run_id = $1 AND node_id = ANY($2) AND state = 'pending'
                 RETURNING node_id, attempt
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
                 SELECT $1, node_id, 'pending', $3, attempt, $4 FROM s
             )
             SELECT node_id FROM s",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&run_id, &node_ids, &state, &reason])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Nodes of a run in state `queued`, optionally only among `among`: the follow-ups a
/// redelivered message republishes.
pub(crate) async fn queued_tasks(
    client: &impl GenericClient,
    run_id: Uuid,
    among: Option<&[String]>,
) -> Result<Vec<QueuedTask>, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT node_id, attempt, queue, type FROM node_runs
             WHERE run_id = $1 AND state = 'queued' AND ($2::text[] IS NULL OR node_id = ANY($2))",
        )
        .await?;
    let rows = client.query(&stmt, &[&run_id, &among]).await?;
    Ok(rows.iter().map(queued_task).collect())
}

fn queued_task(row: &tokio_postgres::Row) -> QueuedTask {
    QueuedTask {
        node_id: row.get(0),
        attempt: row.get(1),
        queue: row.get(2),
        kind: row.get(3),
    }
}

/// Counts `finished` nodes of a run as final (`failed` of them failed). When none is
/// left, the run closes (`completed`, or `failed` if any node failed) and the new run
/// state is returned.
pub(crate) async fn count_finished_nodes(
    client: &impl GenericClient,
    run_id: Uuid,
    finished: i32,
    failed: i32,
) -> Result<Option<String>, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH r AS (
                 UPDATE runs SET
                     nodes_left = nodes_left - $2,
                     failed_nodes = failed_nodes + $3,
                     state = CASE WHEN nodes_left - $2 > 0 THEN state
                                  WHEN failed_nodes + $3 > 0 THEN 'failed'
                                  ELSE 'completed' END,
                     finished_at = CASE WHEN nodes_left - $2 > 0 THEN NULL ELSE now() END
                 WHERE id = $1 AND state = 'running'
                 RETURNING state
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state)
                 SELECT $1, NULL, 'running', state FROM r WHERE state <> 'running'
             )
             SELECT state FROM r",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id, &finished, &failed])
        .await?;
    Ok(row
        .map(|r| r.get::<_, String>(0))
        .filter(|state| state != "running"))
}
