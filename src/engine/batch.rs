//! Tasks in batches (group commit). The built-in task messages a worker holds at once
//! are claimed, run and finished in one transaction of a few statements, whatever
//! their number; the outcomes of model calls that end together are recorded the same
//! way (see `group_commit.rs`). Each message keeps the rules of DESIGN §4: the claim
//! is conditional and fenced, the fan-in is decided under the runs' locks, and every
//! message is acked only after the commit and the confirms of what it caused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use serde_json::Value;
use uuid::Uuid;

use super::dag::{Finished, Progress, Settled, settle_all};
use super::finish::{fenced, with_commit_retries};
use super::task::{claim_request, is_builtin};
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::adapter::{AdapterError, ModelCall, noop_output};
use crate::store::model_calls::AttemptCalls;
use crate::store::nodes::{ClaimRequest, Finishing, NoopCompletion};
use crate::store::{self, Claim, RunContext, StoreError};
use crate::workflow::{NodeType, Workflow};

/// A claimed task's final outcome (completed, or failed for good), to be recorded.
#[derive(Debug)]
pub(super) struct Outcome {
    pub message: TaskMessage,
    pub fence: i64,
    pub run: RunContext,
    pub workflow: Arc<Workflow>,
    pub result: Result<Value, AdapterError>,
    /// The calls the attempt made, recorded in the same transaction.
    pub calls: Vec<ModelCall>,
    pub started: Instant,
    /// Its claim already wrote the final state (a noop): only the run is advanced.
    pub completed_by_claim: bool,
}

/// What recording outcomes committed.
#[derive(Debug, Default)]
struct Recorded {
    /// Per outcome, whether its fence held (else another worker took the node over).
    finished: Vec<bool>,
    /// Per run, what settling it caused.
    settled: HashMap<Uuid, Settled>,
}

/// What a batch of built-in messages became in its transaction.
enum Step {
    /// Run; its outcome is the next in the batch's outcomes.
    Ran,
    /// Claimed, but not a built-in after all (the type in a message is only a hint), or
    /// its workflow is gone: it goes on by the ordinary path, with its claim committed.
    HandedOff {
        fence: i64,
        run: RunContext,
        workflow: Option<Arc<Workflow>>,
    },
    /// Not claimable: a duplicate, a stale message or one naming no node.
    NotClaimed(Claim),
}

impl Engine {
    /// Processes built-in task messages (with whether each was redelivered) together.
    /// Returns one outcome per message, in order; `Err` only when the batch's
    /// transaction failed, and then none of it took effect.
    pub async fn handle_builtin_batch(
        &self,
        batch: &[(TaskMessage, bool)],
    ) -> Result<Vec<Result<Handled, EngineError>>, EngineError> {
        let (steps, outcomes, recorded) = with_commit_retries(|| self.run_batch(batch)).await?;
        let mut published = self.publish_outcomes(&outcomes, recorded).await.into_iter();
        let handled = batch
            .iter()
            .zip(steps)
            .map(|((message, redelivered), step)| {
                let ran = match step {
                    Step::Ran => published.next(),
                    _ => None,
                };
                async move {
                    match step {
                        Step::Ran => ran.expect("one result per outcome"),
                        Step::HandedOff {
                            fence,
                            run,
                            workflow,
                        } => {
                            self.continue_claimed(message, fence, &run, workflow, Instant::now())
                                .await
                        }
                        Step::NotClaimed(claim) => {
                            match self.claimed(message, *redelivered, claim).await? {
                                Err(handled) => Ok(handled),
                                Ok(_) => Ok(Handled::Done("duplicate")),
                            }
                        }
                    }
                }
            });
        Ok(join_all(handled).await)
    }

    /// Claims the nodes of task messages together, in one statement (its own
    /// transaction); one claim per message, in order. For model and HTTP tasks, whose
    /// calls then run each on its own.
    pub async fn claim_batch(
        &self,
        batch: &[(TaskMessage, bool)],
    ) -> Result<Vec<Claim>, EngineError> {
        let requests: Vec<ClaimRequest> = batch
            .iter()
            .map(|(message, redelivered)| claim_request(message, *redelivered))
            .collect();
        let claims = with_commit_retries(|| async {
            let client = self.store.client().await?;
            store::nodes::claim_all(&client, &requests).await
        })
        .await?;
        Ok(claims)
    }

    /// Records final outcomes of claimed tasks in one transaction, then publishes what
    /// they caused. Returns one result per outcome; `Err` when the transaction failed,
    /// and then none of it took effect.
    pub(super) async fn finish_batch(
        &self,
        outcomes: &[Outcome],
    ) -> Result<Vec<Result<Handled, EngineError>>, EngineError> {
        let recorded = with_commit_retries(|| async {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            let recorded = self.record_outcomes(&tx, outcomes).await?;
            tx.commit().await?;
            Ok(recorded)
        })
        .await?;
        for outcome in outcomes {
            self.count_calls(&outcome.calls);
        }
        Ok(self.publish_outcomes(outcomes, recorded).await)
    }

    /// The built-in batch's transaction: lock the runs, claim every node, run the
    /// built-ins, then record their outcomes.
    async fn run_batch(
        &self,
        batch: &[(TaskMessage, bool)],
    ) -> Result<(Vec<Step>, Vec<Outcome>, Recorded), StoreError> {
        let started = Instant::now();
        let mut client = self.store.client().await?;
        let tx = client.transaction().await?;
        let noop = noop_output();
        let mut requests = Vec::with_capacity(batch.len());
        for (message, redelivered) in batch {
            let complete_noop = self.noop_completion(&tx, message, &noop).await?;
            requests.push(ClaimRequest {
                complete_noop,
                ..claim_request(message, *redelivered)
            });
        }
        let claims = store::nodes::claim_all(&tx, &requests).await?;
        let mut steps = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::new();
        for ((message, _), claim) in batch.iter().zip(claims) {
            let Claim::Claimed {
                fence,
                run,
                completed,
                ..
            } = claim
            else {
                steps.push(Step::NotClaimed(claim));
                continue;
            };
            let workflow = self.workflow_in(&tx, &run.workflow, run.version).await?;
            let builtin = workflow
                .as_deref()
                .and_then(|w| w.node(&message.node_id))
                .filter(|node| is_builtin(node.kind.as_str()));
            match (&workflow, builtin) {
                (Some(found), Some(node)) => {
                    let result = if completed {
                        Ok(noop.clone())
                    } else {
                        self.run_builtin(&tx, found, &run, node, message).await?
                    };
                    steps.push(Step::Ran);
                    outcomes.push(Outcome {
                        message: message.clone(),
                        fence,
                        workflow: found.clone(),
                        run,
                        result,
                        calls: Vec::new(),
                        started,
                        completed_by_claim: completed,
                    });
                }
                // The claim checked that the run pins the workflow found before it.
                _ if completed => {
                    return Err(StoreError::NotFound(format!(
                        "workflow {} version {} of run {} vanished while its node {} completed",
                        run.workflow, run.version, run.run_id, message.node_id
                    )));
                }
                _ => steps.push(Step::HandedOff {
                    fence,
                    run,
                    workflow,
                }),
            }
        }
        let recorded = self.record_outcomes(&tx, &outcomes).await?;
        tx.commit().await?;
        Ok((steps, outcomes, recorded))
    }

    /// For a message naming a `noop` node of a stored workflow version: what lets its
    /// claim complete it at once. `None` for anything else, which is claimed as usual.
    async fn noop_completion<'a>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        message: &'a TaskMessage,
        output: &'a Value,
    ) -> Result<Option<NoopCompletion<'a>>, StoreError> {
        let (Some("noop"), Some(workflow), Some(version)) =
            (message.kind.as_deref(), &message.workflow, message.version)
        else {
            return Ok(None);
        };
        let is_noop = self
            .workflow_in(tx, workflow, version)
            .await?
            .and_then(|w| w.node(&message.node_id).map(|n| n.kind == NodeType::Noop))
            .unwrap_or(false);
        Ok(is_noop.then_some(NoopCompletion {
            workflow,
            version,
            output,
        }))
    }

    /// In `tx`: locks the outcomes' runs, records their calls, finishes their nodes and
    /// advances their runs.
    async fn record_outcomes(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        outcomes: &[Outcome],
    ) -> Result<Recorded, StoreError> {
        if outcomes.is_empty() {
            return Ok(Recorded::default());
        }
        lock_runs_of(tx, outcomes.iter().map(|o| o.run.run_id)).await?;
        let calls: Vec<AttemptCalls> = outcomes
            .iter()
            .map(|o| AttemptCalls {
                run_id: o.message.run_id,
                node_id: &o.message.node_id,
                attempt: o.message.attempt,
                calls: &o.calls,
            })
            .collect();
        store::model_calls::insert_model_calls(tx, &calls).await?;
        let errors: Vec<Option<String>> = outcomes
            .iter()
            .map(|o| o.result.as_ref().err().map(|e| e.to_string()))
            .collect();
        let finishing: Vec<Finishing> = outcomes
            .iter()
            .zip(&errors)
            .filter(|(o, _)| !o.completed_by_claim)
            .map(|(o, error)| Finishing {
                run_id: o.message.run_id,
                node_id: &o.message.node_id,
                fence: o.fence,
                state: finished_as(&o.result).as_str(),
                output: o.result.as_ref().ok(),
                error: error.as_deref(),
            })
            .collect();
        let mut done: HashSet<(Uuid, String)> = store::nodes::finish_all(tx, &finishing)
            .await?
            .into_iter()
            .collect();
        done.extend(
            outcomes
                .iter()
                .filter(|o| o.completed_by_claim)
                .map(|o| (o.message.run_id, o.message.node_id.clone())),
        );
        let finished: Vec<bool> = outcomes
            .iter()
            .map(|o| done.contains(&(o.message.run_id, o.message.node_id.clone())))
            .collect();
        // Each run's finished nodes, in order, with the first outcome of the run.
        let mut by_run: BTreeMap<Uuid, (usize, Vec<(String, Finished)>)> = BTreeMap::new();
        for (i, o) in outcomes.iter().enumerate().filter(|(i, _)| finished[*i]) {
            by_run
                .entry(o.run.run_id)
                .or_insert_with(|| (i, Vec::new()))
                .1
                .push((o.message.node_id.clone(), finished_as(&o.result)));
        }
        let progress: Vec<Progress> = by_run
            .values()
            .map(|(first, nodes)| Progress {
                workflow: &outcomes[*first].workflow,
                run: &outcomes[*first].run,
                ready: Vec::new(),
                finished: nodes.clone(),
            })
            .collect();
        let settled = settle_all(tx, progress).await?;
        Ok(Recorded {
            finished,
            settled: by_run.keys().copied().zip(settled).collect(),
        })
    }

    /// After the commit: each run's follow-ups go out once, for all of its outcomes; a
    /// failed publish fails every one of them, so that each is redelivered and re-drives
    /// its own children. Then what is left of each task. One result per outcome.
    async fn publish_outcomes(
        &self,
        outcomes: &[Outcome],
        mut recorded: Recorded,
    ) -> Vec<Result<Handled, EngineError>> {
        let runs: Vec<(&Outcome, Settled)> = outcomes
            .iter()
            .filter_map(|o| Some((o, recorded.settled.remove(&o.run.run_id)?)))
            .collect();
        let published = join_all(runs.iter().map(|(o, settled)| async {
            let published = self
                .publish_settled(Some(&o.workflow), &o.run, settled)
                .await;
            (o.run.run_id, published)
        }))
        .await;
        let failed_runs: HashMap<Uuid, String> = published
            .into_iter()
            .filter_map(|(run, published)| published.err().map(|e| (run, e.to_string())))
            .collect();
        let tasks = outcomes.iter().zip(recorded.finished).map(|(o, finished)| {
            let failed = failed_runs.get(&o.run.run_id);
            async move {
                match (finished, failed) {
                    (false, _) => Ok(fenced(&o.message)),
                    (true, Some(error)) => Err(EngineError::Interrupted(format!(
                        "follow-ups of run {} not published: {error}",
                        o.run.run_id
                    ))),
                    (true, None) => self.after_task(&o.message, &o.result, o.started).await,
                }
            }
        });
        join_all(tasks).await
    }
}

/// Locks the runs named, each once and in id order: see [`store::nodes::lock_runs`].
async fn lock_runs_of(
    tx: &deadpool_postgres::Transaction<'_>,
    run_ids: impl Iterator<Item = Uuid>,
) -> Result<(), StoreError> {
    let mut run_ids: Vec<Uuid> = run_ids.collect();
    run_ids.sort();
    run_ids.dedup();
    store::nodes::lock_runs(tx, &run_ids).await
}

fn finished_as(result: &Result<Value, AdapterError>) -> Finished {
    if result.is_ok() {
        Finished::Completed
    } else {
        Finished::Failed
    }
}
