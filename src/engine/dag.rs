//! DAG advancement: what happens to the rest of a run when nodes finish. Runs inside the
//! transaction that records the finish, so the decision to start a child is made exactly
//! once even when its parents finish at the same moment on different workers.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};

use uuid::Uuid;

use crate::store::advance::{Arrival, Closing};
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

/// One run's part in a settle: its nodes that just became ready (the roots of a new
/// run, say) and those that just reached a final state.
#[derive(Debug)]
pub struct Progress<'a> {
    /// The run's workflow version.
    pub workflow: &'a Workflow,
    /// The run.
    pub run: &'a RunContext,
    /// Nodes to queue, or to close when their `when` says so.
    pub ready: Vec<String>,
    /// Nodes that finished, in the order they did.
    pub finished: Vec<(String, Finished)>,
}

/// Advances one run; see [`settle_all`].
pub async fn settle(
    client: &impl GenericClient,
    workflow: &Workflow,
    run: &RunContext,
    ready: Vec<String>,
    finished: Vec<(String, Finished)>,
) -> Result<Settled, StoreError> {
    let progress = Progress {
        workflow,
        run,
        ready,
        finished,
    };
    let mut settled = settle_all(client, vec![progress]).await?;
    Ok(settled.pop().expect("one outcome per run"))
}

/// Advances runs (each named once): `ready` nodes are queued (or closed when their
/// `when` is false), and every finished node counts against its children, which may
/// become ready or be skipped in turn. Runs with no node left close. The caller holds
/// the runs' locks ([`store::nodes::lock_runs`]); each step is one statement for all
/// the runs. Returns one `Settled` per run, in order.
pub async fn settle_all(
    client: &impl GenericClient,
    mut runs: Vec<Progress<'_>>,
) -> Result<Vec<Settled>, StoreError> {
    let index: HashMap<Uuid, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, p)| (p.run.run_id, i))
        .collect();
    let mut settled: Vec<Settled> = runs.iter().map(|_| Settled::default()).collect();
    // (finished, failed) per run: every node reaching a final state is counted once.
    let mut counts = vec![(0, 0); runs.len()];
    let mut closing: Vec<Closing> = Vec::new();
    loop {
        let mut go: Vec<(Uuid, String)> = Vec::new();
        for p in runs.iter_mut() {
            for id in std::mem::take(&mut p.ready) {
                match evaluate_when(client, p.workflow, p.run, &id).await? {
                    Ok(true) => go.push((p.run.run_id, id)),
                    Ok(false) => closing.push(close(
                        p.run,
                        id,
                        "skipped",
                        "when condition is false".into(),
                    )),
                    Err(e) => closing.push(close(
                        p.run,
                        id,
                        "failed",
                        format!("when condition cannot be evaluated: {e}"),
                    )),
                }
            }
        }
        let go: Vec<(Uuid, &str)> = go.iter().map(|(r, n)| (*r, n.as_str())).collect();
        for (run_id, task) in store::advance::enqueue_all(client, &go).await? {
            settled[index[&run_id]].queued.push(task);
        }
        let closed =
            store::advance::close_pending_all(client, &std::mem::take(&mut closing)).await?;
        for (run_id, node_id, state) in closed {
            let i = index[&run_id];
            let outcome = if state == "failed" {
                Finished::Failed
            } else {
                settled[i].skipped.push(node_id.clone());
                Finished::Skipped
            };
            runs[i].finished.push((node_id, outcome));
        }
        if runs.iter().all(|p| p.finished.is_empty()) {
            break;
        }
        // Which parents of each (run, child) just finished, in order. BTreeMap: the
        // statement below then visits the rows in a fixed order.
        let mut arrivals: BTreeMap<(Uuid, String), Vec<(String, Finished)>> = BTreeMap::new();
        for (i, p) in runs.iter_mut().enumerate() {
            for (id, outcome) in std::mem::take(&mut p.finished) {
                counts[i].0 += 1;
                counts[i].1 += i32::from(outcome == Finished::Failed);
                for child in p.workflow.children_of(&id) {
                    arrivals
                        .entry((p.run.run_id, child.id.clone()))
                        .or_default()
                        .push((id.clone(), outcome));
                }
            }
        }
        let counting: Vec<Arrival> = arrivals
            .iter()
            .map(|((run, child), parents)| {
                let node = runs[index[run]].workflow.node(child);
                let rule = node.map(|n| n.trigger_rule).unwrap_or_default();
                Arrival {
                    run_id: *run,
                    node_id: child,
                    finished: parents.len() as i32,
                    ready_when_last: node.is_some_and(|n| n.when.is_none())
                        && matches!(first_decision(rule, parents, 0), Some((_, Decision::Ready))),
                }
            })
            .collect();
        for counted in store::advance::count_finished_dependencies(client, &counting).await? {
            let (run_id, child) = (counted.run_id, counted.node_id);
            if let Some(task) = counted.queued {
                settled[index[&run_id]].queued.push(task);
                continue;
            }
            let p = &mut runs[index[&run_id]];
            let rule = p
                .workflow
                .node(&child)
                .map(|n| n.trigger_rule)
                .unwrap_or_default();
            let parents = &arrivals[&(run_id, child.clone())];
            match first_decision(rule, parents, counted.left) {
                Some((_, Decision::Ready)) => p.ready.push(child),
                Some((parent, _)) => closing.push(close(
                    p.run,
                    child,
                    "skipped",
                    format!("upstream \"{}\" {}", parent.0, parent.1.as_str()),
                )),
                None => {}
            }
        }
    }
    let counts: Vec<(Uuid, i32, i32)> = runs
        .iter()
        .zip(&counts)
        .filter(|(_, (finished, _))| *finished > 0)
        .map(|(p, (finished, failed))| (p.run.run_id, *finished, *failed))
        .collect();
    for (run_id, state) in store::advance::count_finished_nodes(client, &counts).await? {
        settled[index[&run_id]].run_finished = Some(state);
    }
    Ok(settled)
}

/// Replays parents finishing one by one, as if each had been alone, from the count
/// left after all of them: the first decision that is not to wait stands, with the
/// parent that caused it.
fn first_decision(
    rule: TriggerRule,
    parents: &[(String, Finished)],
    left_after_all: i32,
) -> Option<(&(String, Finished), Decision)> {
    let k = parents.len() as i32;
    parents.iter().enumerate().find_map(|(j, parent)| {
        let left_then = left_after_all + (k - 1 - j as i32);
        match decide(rule, parent.1, left_then) {
            Decision::Wait => None,
            decision => Some((parent, decision)),
        }
    })
}

fn close(run: &RunContext, node_id: String, state: &'static str, reason: String) -> Closing {
    Closing {
        run_id: run.run_id,
        node_id,
        state,
        reason,
    }
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
    fn parents_finishing_together_decide_as_if_one_by_one() {
        let parents = |outcomes: &[Finished]| -> Vec<(String, Finished)> {
            outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| (format!("p{i}"), *o))
                .collect()
        };
        // The last of three parents in: all complete, so the child runs.
        let all = parents(&[Completed, Completed, Completed]);
        assert_eq!(
            first_decision(AllSuccess, &all, 0).map(|d| d.1),
            Some(Decision::Ready)
        );
        // One of three still out: wait.
        assert_eq!(first_decision(AllSuccess, &all[..2], 1), None);
        // A failure skips at once, naming the parent that failed.
        let mixed = parents(&[Completed, Failed, Completed]);
        let (parent, decision) = first_decision(AllSuccess, &mixed, 0).unwrap();
        assert_eq!((parent.0.as_str(), decision), ("p1", Decision::Skip));
        // one_success runs on the first success even after a failure.
        let late = parents(&[Failed, Completed]);
        assert_eq!(
            first_decision(OneSuccess, &late, 0).map(|d| d.1),
            Some(Decision::Ready)
        );
    }

    #[test]
    fn none_failed_accepts_skips_and_all_done_accepts_anything() {
        assert_eq!(decide(NoneFailed, Skipped, 0), Decision::Ready);
        assert_eq!(decide(NoneFailed, Failed, 1), Decision::Skip);
        assert_eq!(decide(AllDone, Failed, 0), Decision::Ready);
        assert_eq!(decide(AllDone, Failed, 1), Decision::Wait);
    }
}
