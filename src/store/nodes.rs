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
        /// The claim also completed the node (see `ClaimRequest::complete_noop`).
        completed: bool,
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

/// One task message's claim on its node.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRequest<'a> {
    /// Run id.
    pub run_id: Uuid,
    /// Node id.
    pub node_id: &'a str,
    /// The attempt the message carries.
    pub attempt: i32,
    /// Whether a node left `running` at this attempt may be taken over (the message was
    /// redelivered, so its first worker may have died).
    pub take_over: bool,
    /// For a message naming a `noop` node: the claim completes the node too, with this
    /// output, when the node is a `noop` of the workflow version named (one row version
    /// and one statement instead of two; a noop reads nothing and always succeeds).
    pub complete_noop: Option<NoopCompletion<'a>>,
}

/// What a claim needs to complete a `noop` node at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoopCompletion<'a> {
    /// The workflow the message names; the run must pin it.
    pub workflow: &'a str,
    /// Its version.
    pub version: i32,
    /// The noop's output.
    pub output: &'a Value,
}

/// Claims `(run, node, attempt)`: `queued → running`; `retrying → queued → running` when
/// the message is the retry's (attempt one more than the node's); or `running → running`
/// with a new fence when `take_over` (a redelivered message whose worker died).
pub(crate) async fn claim(
    client: &impl GenericClient,
    request: ClaimRequest<'_>,
) -> Result<Claim, StoreError> {
    let mut claims = claim_all(client, std::slice::from_ref(&request)).await?;
    Ok(claims.pop().expect("one claim per request"))
}

/// Claims many nodes in one statement; one `Claim` per request, in order. Of two
/// requests for the same node, at most one claims it: the other is a duplicate. Node
/// rows are locked in (run, node) order, so that two claims cannot deadlock, and no run
/// is locked: a claim waits on no finishing transaction but one finishing that very
/// node. (`run_id = ANY($1)` keeps the plan on the index while the tables are new; see
/// `advance.rs`. The UPDATE joins the rows `old` locked by key alone: there the guard
/// became a condition of an index scan repeated per row, which sorts the array anew
/// each time, and cost more than the rest of the statement.)
pub(crate) async fn claim_all(
    client: &impl GenericClient,
    requests: &[ClaimRequest<'_>],
) -> Result<Vec<Claim>, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH m AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::bool[],
                                      $5::text[], $6::int4[], $7::jsonb[])
                     WITH ORDINALITY
                     AS m(run_id, node_id, attempt, take_over, noop_workflow, noop_version,
                          noop_output, i)
             ), old AS (
                 SELECT m.i, n.run_id, n.node_id, n.state, n.attempt,
                        coalesce(n.type = 'noop' AND r.workflow = m.noop_workflow
                                 AND r.version = m.noop_version, false) AS noop
                 FROM m JOIN node_runs n ON n.run_id = m.run_id AND n.node_id = m.node_id
                        JOIN runs r ON r.id = n.run_id AND r.id = ANY($1)
                 WHERE n.run_id = ANY($1)
                 ORDER BY n.run_id, n.node_id
                 FOR UPDATE OF n
             ), claimed AS (
                 UPDATE node_runs n
                 SET state = CASE WHEN old.noop THEN 'completed' ELSE 'running' END,
                     attempt = m.attempt, fence = n.fence + 1,
                     started_at = now(), retry_at = NULL,
                     output = CASE WHEN old.noop THEN m.noop_output ELSE n.output END,
                     finished_at = CASE WHEN old.noop THEN now() ELSE n.finished_at END
                 FROM old JOIN m ON m.i = old.i
                 WHERE n.run_id = old.run_id AND n.node_id = old.node_id
                   AND ((old.state = 'queued' AND old.attempt = m.attempt)
                     OR (old.state = 'retrying' AND old.attempt + 1 = m.attempt)
                     OR (old.state = 'running' AND old.attempt = m.attempt AND m.take_over))
                 RETURNING old.i, n.run_id, n.node_id, n.attempt, n.fence,
                           old.state AS from_state, old.noop
             ), logged AS (
                 -- Appended in this order, so that a node's rows keep it in `id`.
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
                 SELECT run_id, node_id, 'retrying', 'queued', attempt
                 FROM claimed WHERE from_state = 'retrying'
                 UNION ALL
                 SELECT run_id, node_id,
                        CASE from_state WHEN 'retrying' THEN 'queued' ELSE from_state END,
                        'running', attempt
                 FROM claimed
                 UNION ALL
                 SELECT run_id, node_id, 'running', 'completed', attempt
                 FROM claimed WHERE noop
             )
             SELECT old.state, old.attempt, claimed.fence, claimed.from_state,
                    r.workflow, r.version, r.event, r.input, r.priority, claimed.noop
             FROM m LEFT JOIN old ON old.i = m.i LEFT JOIN claimed ON claimed.i = m.i
                    LEFT JOIN runs r ON r.id = m.run_id AND r.id = ANY($1)
             ORDER BY m.i",
        )
        .await?;
    let run_ids: Vec<Uuid> = requests.iter().map(|r| r.run_id).collect();
    let node_ids: Vec<&str> = requests.iter().map(|r| r.node_id).collect();
    let attempts: Vec<i32> = requests.iter().map(|r| r.attempt).collect();
    let take_over: Vec<bool> = requests.iter().map(|r| r.take_over).collect();
    let noop = || requests.iter().map(|r| r.complete_noop.as_ref());
    let noop_workflows: Vec<Option<&str>> = noop().map(|c| c.map(|c| c.workflow)).collect();
    let noop_versions: Vec<Option<i32>> = noop().map(|c| c.map(|c| c.version)).collect();
    let noop_outputs: Vec<Option<&Value>> = noop().map(|c| c.map(|c| c.output)).collect();
    let rows = client
        .query(
            &stmt,
            &[
                &run_ids,
                &node_ids,
                &attempts,
                &take_over,
                &noop_workflows,
                &noop_versions,
                &noop_outputs,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .zip(requests)
        .map(|(row, request)| match row.get::<_, Option<i64>>(2) {
            Some(fence) => Claim::Claimed {
                fence,
                from_state: row.get(3),
                run: RunContext {
                    run_id: request.run_id,
                    workflow: row.get(4),
                    version: row.get(5),
                    event: row.get(6),
                    input: row.get(7),
                    priority: row.get(8),
                },
                completed: row.get(9),
            },
            None => Claim::NotClaimable {
                state: row.get(0),
                attempt: row.get::<_, Option<i32>>(1).unwrap_or(0),
            },
        })
        .collect())
}

/// Locks the runs named (`FOR NO KEY UPDATE`, in id order) before their nodes are
/// finished. Every transaction that advances runs takes these locks before it touches
/// any node row but those it claimed, and in the same order, so transactions that
/// advance several runs at once cannot deadlock: a pending node is only ever locked
/// under its run's lock, and a claimed one only by its claimer (or by another claim,
/// which takes rows in order and holds no run lock).
pub(crate) async fn lock_runs(
    client: &impl GenericClient,
    run_ids: &[Uuid],
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached("SELECT 1 FROM runs WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .await?;
    client.execute(&stmt, &[&run_ids]).await?;
    Ok(())
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

/// A claimed node's final outcome, to be recorded by the holder of `fence`.
#[derive(Debug, Clone)]
pub(crate) struct Finishing<'a> {
    /// Run id.
    pub run_id: Uuid,
    /// Node id.
    pub node_id: &'a str,
    /// The fence the claim wrote.
    pub fence: i64,
    /// `completed` or `failed`.
    pub state: &'static str,
    /// Output, when completed.
    pub output: Option<&'a Value>,
    /// Error, when failed.
    pub error: Option<&'a str>,
}

/// `running → state` for each holder of its `fence`, in one statement. Returns the
/// (run, node) pairs that changed; a node missing from it had a stale fence (another
/// worker took it over), and nothing changed for it.
pub(crate) async fn finish_all(
    client: &impl GenericClient,
    nodes: &[Finishing<'_>],
) -> Result<Vec<(Uuid, String)>, StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH done AS (
                 UPDATE node_runs n
                 SET state = m.state, output = m.output, error = m.error, finished_at = now()
                 FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::jsonb[],
                             $6::text[]) AS m(run_id, node_id, fence, state, output, error)
                 WHERE n.run_id = m.run_id AND n.node_id = m.node_id AND n.fence = m.fence
                   AND n.state = 'running' AND n.run_id = ANY($1)
                 RETURNING n.run_id, n.node_id, n.attempt, m.state, m.error
             ), logged AS (
                 INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt, detail)
                 SELECT run_id, node_id, 'running', state, attempt, error FROM done
             )
             SELECT run_id, node_id FROM done",
        )
        .await?;
    let run_ids: Vec<Uuid> = nodes.iter().map(|n| n.run_id).collect();
    let node_ids: Vec<&str> = nodes.iter().map(|n| n.node_id).collect();
    let fences: Vec<i64> = nodes.iter().map(|n| n.fence).collect();
    let states: Vec<&str> = nodes.iter().map(|n| n.state).collect();
    let outputs: Vec<Option<&Value>> = nodes.iter().map(|n| n.output).collect();
    let errors: Vec<Option<&str>> = nodes.iter().map(|n| n.error).collect();
    let rows = client
        .query(
            &stmt,
            &[&run_ids, &node_ids, &fences, &states, &outputs, &errors],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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

pub(super) fn queued_task(row: &tokio_postgres::Row) -> QueuedTask {
    QueuedTask {
        node_id: row.get(0),
        attempt: row.get(1),
        queue: row.get(2),
        kind: row.get(3),
    }
}
