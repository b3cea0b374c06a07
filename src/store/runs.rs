//! The `runs` table, and the read side of a run for `dagq status` and `dagq runs`.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Store, StoreError};

/// A run about to start: one row in `runs` and one `pending` row per node.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    /// Fresh run id.
    pub id: Uuid,
    /// Workflow name.
    pub workflow: &'a str,
    /// Pinned version.
    pub version: i32,
    /// The triggering CloudEvent.
    pub event: &'a Value,
    /// `source` of the event: with `event_id`, the idempotency key.
    pub event_source: &'a str,
    /// `id` of the event.
    pub event_id: &'a str,
    /// The run's input.
    pub input: &'a Value,
    /// Default task priority.
    pub priority: i16,
    /// (node id, number of dependencies, queue, type) for every node.
    pub nodes: Vec<(String, i32, String, String)>,
}

/// Whether `insert_run` created the run or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedRun {
    /// The run is new.
    Created(Uuid),
    /// The same event already started this run.
    Existing(Uuid),
}

/// Inserts runs and their nodes, each unless the same event already started its
/// workflow; one `StartedRun` per run, in order. Three statements, whatever the number.
pub(crate) async fn insert_runs(
    client: &impl GenericClient,
    runs: &[NewRun<'_>],
) -> Result<Vec<StartedRun>, StoreError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let insert = client
        .prepare_cached(
            "INSERT INTO runs (id, workflow, version, state, event_source, event_id, event, input,
                               priority, nodes_left)
             SELECT id, workflow, version, 'running', source, event_id, event, input, priority,
                    nodes_left
             FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[],
                         $6::jsonb[], $7::jsonb[], $8::int2[], $9::int4[])
                  AS u(id, workflow, version, source, event_id, event, input, priority, nodes_left)
             ON CONFLICT (event_source, event_id, workflow) DO NOTHING
             RETURNING id",
        )
        .await?;
    let created: std::collections::HashSet<Uuid> = client
        .query(
            &insert,
            &[
                &runs.iter().map(|r| r.id).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.workflow).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.version).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.event_source).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.event_id).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.event).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.input).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.priority).collect::<Vec<_>>(),
                &runs
                    .iter()
                    .map(|r| r.nodes.len() as i32)
                    .collect::<Vec<_>>(),
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut started = Vec::with_capacity(runs.len());
    for run in runs {
        if created.contains(&run.id) {
            started.push(StartedRun::Created(run.id));
            continue;
        }
        // The same event started it before (a redelivery or a duplicate): rare.
        let existing = client
            .query_one(
                "SELECT id FROM runs WHERE event_source = $1 AND event_id = $2 AND workflow = $3",
                &[&run.event_source, &run.event_id, &run.workflow],
            )
            .await?;
        started.push(StartedRun::Existing(existing.get(0)));
    }
    let new: Vec<&NewRun> = runs.iter().filter(|r| created.contains(&r.id)).collect();
    if new.is_empty() {
        return Ok(started);
    }
    let nodes = || {
        new.iter()
            .flat_map(|r| r.nodes.iter().map(move |n| (r.id, n)))
    };
    let stmt = client
        .prepare_cached(
            "WITH n AS (
                 INSERT INTO node_runs (run_id, node_id, state, deps_left, queue, type)
                 SELECT u.run_id, u.id, 'pending', u.deps, u.queue, u.type
                 FROM unnest($2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[])
                      AS u(run_id, id, deps, queue, type)
                 RETURNING run_id, node_id
             )
             INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt)
             SELECT id, NULL, NULL, 'running', NULL FROM unnest($1::uuid[]) AS id
             UNION ALL
             SELECT run_id, node_id, NULL, 'pending', 1 FROM n",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &new.iter().map(|r| r.id).collect::<Vec<_>>(),
                &nodes().map(|(run, _)| run).collect::<Vec<_>>(),
                &nodes().map(|(_, n)| n.0.as_str()).collect::<Vec<_>>(),
                &nodes().map(|(_, n)| n.1).collect::<Vec<_>>(),
                &nodes().map(|(_, n)| n.2.as_str()).collect::<Vec<_>>(),
                &nodes().map(|(_, n)| n.3.as_str()).collect::<Vec<_>>(),
            ],
        )
        .await?;
    Ok(started)
}

/// A run as `dagq runs` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Run id.
    pub id: Uuid,
    /// Workflow name.
    pub workflow: String,
    /// Pinned version.
    pub version: i32,
    /// Run state.
    pub state: String,
    /// Type of the event that started it.
    pub event_type: String,
    /// Start time.
    pub created_at: DateTime<Utc>,
    /// End time, when finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One node of a run, as `dagq status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: String,
    /// Node state.
    pub state: String,
    /// Current attempt.
    pub attempt: i32,
    /// Task queue.
    pub queue: String,
    /// Node type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Output, when completed.
    pub output: Option<Value>,
    /// Error, when failed or skipped.
    pub error: Option<String>,
    /// When it was queued.
    pub queued_at: Option<DateTime<Utc>>,
    /// When its current attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Model calls made for it, every attempt and fallback included.
    pub model_calls: i64,
    /// Prompt tokens of those calls.
    pub prompt_tokens: i64,
    /// Completion tokens of those calls.
    pub completion_tokens: i64,
    /// Their cost, when the profiles are priced.
    pub cost: Option<f64>,
}

/// A run and all its nodes.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    /// The run.
    #[serde(flatten)]
    pub run: RunSummary,
    /// Its input.
    pub input: Value,
    /// Its nodes, in workflow order of first transition.
    pub nodes: Vec<NodeStatus>,
    /// Token and cost totals over every node.
    pub totals: Totals,
}

/// Token and cost totals of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Model calls.
    pub model_calls: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Cost, when priced.
    pub cost: Option<f64>,
}

/// One row of `transitions`.
#[derive(Debug, Clone, Serialize)]
pub struct TransitionRow {
    /// Node id, `None` for the run itself.
    pub node_id: Option<String>,
    /// Previous state (`None` on creation).
    pub from_state: Option<String>,
    /// New state.
    pub to_state: String,
    /// Attempt, for nodes.
    pub attempt: Option<i32>,
    /// When.
    pub at: DateTime<Utc>,
}

/// Filters of `dagq runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

const RUN_COLUMNS: &str = "id, workflow, version, state, event->>'type', created_at, finished_at";

fn run_summary(row: &tokio_postgres::Row) -> RunSummary {
    RunSummary {
        id: row.get(0),
        workflow: row.get(1),
        version: row.get(2),
        state: row.get(3),
        event_type: row.get::<_, Option<String>>(4).unwrap_or_default(),
        created_at: row.get(5),
        finished_at: row.get(6),
    }
}

impl Store {
    /// A run and its nodes, `None` when there is no such run.
    pub async fn run_status(&self, id: Uuid) -> Result<Option<RunStatus>, StoreError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                &format!("SELECT {RUN_COLUMNS}, input FROM runs WHERE id = $1"),
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let nodes = client
            .query(
                "SELECT node_id, state, attempt, queue, type, output, error,
                        queued_at, started_at, finished_at,
                        coalesce(c.calls, 0), coalesce(c.prompt, 0), coalesce(c.completion, 0), c.cost
                 FROM node_runs n
                 LEFT JOIN (SELECT node_id AS cn, count(*) AS calls, sum(prompt_tokens)::bigint AS prompt,
                                   sum(completion_tokens)::bigint AS completion, sum(cost) AS cost
                            FROM model_calls WHERE run_id = $1 GROUP BY node_id) c ON c.cn = n.node_id
                 WHERE run_id = $1
                 ORDER BY (SELECT min(id) FROM transitions t
                           WHERE t.run_id = n.run_id AND t.node_id = n.node_id)",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| NodeStatus {
                node_id: r.get(0),
                state: r.get(1),
                attempt: r.get(2),
                queue: r.get(3),
                kind: r.get(4),
                output: r.get(5),
                error: r.get(6),
                queued_at: r.get(7),
                started_at: r.get(8),
                finished_at: r.get(9),
                model_calls: r.get(10),
                prompt_tokens: r.get(11),
                completion_tokens: r.get(12),
                cost: r.get(13),
            })
            .collect::<Vec<_>>();
        let totals = Totals {
            model_calls: nodes.iter().map(|n| n.model_calls).sum(),
            prompt_tokens: nodes.iter().map(|n| n.prompt_tokens).sum(),
            completion_tokens: nodes.iter().map(|n| n.completion_tokens).sum(),
            cost: nodes.iter().filter_map(|n| n.cost).reduce(|a, b| a + b),
        };
        Ok(Some(RunStatus {
            run: run_summary(&row),
            input: row.get(7),
            nodes,
            totals,
        }))
    }

    /// The run that an event started for a workflow, if any yet.
    pub async fn run_for_event(
        &self,
        source: &str,
        event_id: &str,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE event_source = $1 AND event_id = $2"
                ),
                &[&source, &event_id],
            )
            .await?;
        Ok(rows.iter().map(run_summary).collect())
    }

    /// Runs, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs
                     WHERE ($1::text IS NULL OR workflow = $1) AND ($2::text IS NULL OR state = $2)
                     ORDER BY created_at DESC LIMIT $3"
                ),
                &[&filter.workflow, &filter.state, &filter.limit],
            )
            .await?;
        Ok(rows.iter().map(run_summary).collect())
    }

    /// Every transition of a run, in the order they happened.
    pub async fn transitions(&self, run_id: Uuid) -> Result<Vec<TransitionRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT node_id, from_state, to_state, attempt, at FROM transitions
                 WHERE run_id = $1 ORDER BY id",
                &[&run_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TransitionRow {
                node_id: r.get(0),
                from_state: r.get(1),
                to_state: r.get(2),
                attempt: r.get(3),
                at: r.get(4),
            })
            .collect())
    }
}
