//! DAG advancement: what happens to the rest of a run when nodes finish. Runs inside the
//! transaction that records the finish, so the decision to start a child is made exactly
//! once even when its parents finish at the same moment on different workers.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};

use crate::store::{self, QueuedTask, RunContext, StoreError};
use crate::workflow::{TriggerRule, Workflow, template};

/// Final states a node can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Ran and succeeded.
    Completed,
    /// Ran (or could not) and failed for good.
    Failed,
    /// Did not run: a condition or an upstream outcome ruled it out.
    Skipped,
}

impl Finished {
    /// The state's name in `node_runs`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finished::Completed => "completed",
            Finished::Failed => "failed",
            Finished::Skipped => "skipped",
        }
    }
}

/// What a child does when one of its parents finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Ready,
    Skip,
    Wait,
}

/// Decides a child's fate from its rule, the outcome of the parent that just finished and
/// how many parents are still unfinished. Deciding as soon as the outcome is certain
/// (an `all_success` child skips on the first failure) means a child still `pending`
/// has seen only outcomes that kept it waiting, so no other parent's state is needed.
fn decide(rule: TriggerRule, parent: Finished, parents_left: i32) -> Decision {
    let all_in = parents_left <= 0;
    match rule {
        TriggerRule::AllSuccess if parent != Finished::Completed => Decision::Skip,
        TriggerRule::NoneFailed if parent == Finished::Failed => Decision::Skip,
        TriggerRule::OneSuccess if parent == Finished::Completed => Decision::Ready,
        TriggerRule::OneSuccess if all_in => Decision::Skip,
        _ if all_in => Decision::Ready,
        _ => Decision::Wait,
    }
}

/// The outcome of settling: tasks to publish once the transaction commits, and the run's
/// new state if it just finished.
#[derive(Debug, Default)]
pub struct Settled {
    /// Nodes that became `queued`.
    pub queued: Vec<QueuedTask>,
    /// `completed` or `failed` when this transaction closed the run.
    pub run_finished: Option<String>,
    /// Nodes that became `skipped`.
    pub skipped: Vec<String>,
}

impl Settled {
    /// Counts the skipped nodes in `dagq_tasks_total`: they are settled here, never
    /// delivered, so no worker counts them otherwise. Call after the commit.
    pub fn count_skipped(&self, workflow: &Workflow) {
        for node in self.skipped.iter().filter_map(|id| workflow.node(id)) {
            metrics::counter!(crate::telemetry::TASKS_TOTAL,
                "queue" => crate::workflow::queue_of(node),
                "type" => node.kind.as_str(),
                "outcome" => "skipped")
            .increment(1);
        }
    }
}

/// Advances a run: `ready` nodes are queued (or skipped when their `when` is false), and
/// every node in `finished` counts against its children, which may become ready or be
/// skipped in turn. Finally the run is closed when no node is left.
pub async fn settle(
    client: &impl GenericClient,
    workflow: &Workflow,
    run: &RunContext,
    mut ready: Vec<String>,
    mut finished: Vec<(String, Finished)>,
) -> Result<Settled, StoreError> {
    let mut settled = Settled::default();
    // Every node that reaches a final state passes through `finished` exactly once.
    let mut finished_count = 0;
    let mut failed_count = 0;
    loop {
        if !ready.is_empty() {
            let mut go = Vec::new();
            let mut skip = Vec::new();
            let mut broken = Vec::new();
            for id in ready.drain(..) {
                match evaluate_when(client, workflow, run, &id).await? {
                    Ok(true) => go.push(id),
                    Ok(false) => skip.push(id),
                    Err(e) => broken.push((id, e)),
                }
            }
            if !go.is_empty() {
                settled
                    .queued
                    .extend(store::nodes::enqueue(client, run.run_id, &go).await?);
            }
            let skipped = store::nodes::close_pending(
                client,
                run.run_id,
                &skip,
                "skipped",
                "when condition is false",
            )
            .await?;
            settled.skipped.extend(skipped.iter().cloned());
            finished.extend(skipped.into_iter().map(|id| (id, Finished::Skipped)));
            for (id, error) in broken {
                let reason = format!("when condition cannot be evaluated: {error}");
                let failed =
                    store::nodes::close_pending(client, run.run_id, &[id], "failed", &reason)
                        .await?;
                finished.extend(failed.into_iter().map(|id| (id, Finished::Failed)));
            }
        }
        if finished.is_empty() {
            break;
        }
        let mut to_skip: Vec<(String, String)> = Vec::new();
        for (id, outcome) in std::mem::take(&mut finished) {
            finished_count += 1;
            failed_count += i32::from(outcome == Finished::Failed);
            let mut children: Vec<String> =
                workflow.children_of(&id).map(|n| n.id.clone()).collect();
            if children.is_empty() {
                continue;
            }
            // A fixed lock order keeps two transactions from deadlocking on shared children.
            children.sort();
            for (child, left) in
                store::nodes::count_finished_dependency(client, run.run_id, &children).await?
            {
                let rule = workflow
                    .node(&child)
                    .map(|n| n.trigger_rule)
                    .unwrap_or_default();
                match decide(rule, outcome, left) {
                    Decision::Ready => ready.push(child),
                    Decision::Skip => {
                        to_skip.push((child, format!("upstream \"{id}\" {}", outcome.as_str())))
                    }
                    Decision::Wait => {}
                }
            }
        }
        for (child, reason) in to_skip {
            let skipped =
                store::nodes::close_pending(client, run.run_id, &[child], "skipped", &reason)
                    .await?;
            settled.skipped.extend(skipped.iter().cloned());
            finished.extend(skipped.into_iter().map(|id| (id, Finished::Skipped)));
        }
    }
    if finished_count > 0 {
        settled.run_finished =
            store::nodes::count_finished_nodes(client, run.run_id, finished_count, failed_count)
                .await?;
    }
    Ok(settled)
}

/// `Ok(Ok(true))` when the node has no condition or it holds.
async fn evaluate_when(
    client: &impl GenericClient,
    workflow: &Workflow,
    run: &RunContext,
    node_id: &str,
) -> Result<Result<bool, template::TemplateError>, StoreError> {
    let Some(when) = workflow.node(node_id).and_then(|n| n.when.as_deref()) else {
        return Ok(Ok(true));
    };
    let context = template_context(client, workflow, run, node_id).await?;
    Ok(template::eval_condition(when, &context))
}

/// What a node's templates see: `event`, `input`, `run`, and `nodes.<id>.{state,output}`
/// for the upstream nodes it reads.
pub async fn template_context(
    client: &impl GenericClient,
    workflow: &Workflow,
    run: &RunContext,
    node_id: &str,
) -> Result<minijinja::Value, StoreError> {
    let reads = workflow.reads_of(node_id);
    let mut nodes = BTreeMap::new();
    if !reads.is_empty() {
        for out in store::nodes::outputs(client, run.run_id, reads).await? {
            nodes.insert(
                out.node_id,
                json!({"state": out.state, "output": out.output.unwrap_or(Value::Null)}),
            );
        }
    }
    Ok(template::context(&json!({
        "event": run.event,
        "input": run.input,
        "run": {"id": run.run_id, "workflow": run.workflow, "version": run.version},
        "nodes": nodes,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Finished::*;
    use TriggerRule::*;

    #[test]
    fn all_success_waits_then_runs_or_skips_at_first_failure() {
        assert_eq!(decide(AllSuccess, Completed, 1), Decision::Wait);
        assert_eq!(decide(AllSuccess, Completed, 0), Decision::Ready);
        assert_eq!(decide(AllSuccess, Failed, 1), Decision::Skip);
        assert_eq!(decide(AllSuccess, Skipped, 0), Decision::Skip);
    }

    #[test]
    fn one_success_fires_early_and_skips_when_none_succeeded() {
        assert_eq!(decide(OneSuccess, Completed, 2), Decision::Ready);
        assert_eq!(decide(OneSuccess, Failed, 1), Decision::Wait);
        assert_eq!(decide(OneSuccess, Failed, 0), Decision::Skip);
    }

    #[test]
    fn none_failed_accepts_skips_and_all_done_accepts_anything() {
        assert_eq!(decide(NoneFailed, Skipped, 0), Decision::Ready);
        assert_eq!(decide(NoneFailed, Failed, 1), Decision::Skip);
        assert_eq!(decide(AllDone, Failed, 0), Decision::Ready);
        assert_eq!(decide(AllDone, Failed, 1), Decision::Wait);
    }
}
