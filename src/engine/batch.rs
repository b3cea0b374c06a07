//! Built-in tasks in batches (group commit). The built-in task messages a worker holds
//! at once are claimed, run and finished in one transaction of a few statements,
//! whatever their number, and their follow-ups are published together. Each message
//! keeps the rules of DESIGN §4: the claim is conditional and fenced, the fan-in is
//! decided under the runs' locks, and every message is acked only after the commit and
//! the confirms of what it caused.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use serde_json::Value;
use uuid::Uuid;

use super::dag::{Finished, Progress, Settled, settle_all};
use super::finish::{fenced, with_commit_retries};
use super::task::{claim_request, is_builtin};
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::adapter::AdapterError;
use crate::broker::BrokerError;
use crate::store::nodes::{ClaimRequest, Finishing};
use crate::store::{self, Claim, RunContext, StoreError};
use crate::workflow::Workflow;

/// What the batch's transaction did with one message.
enum Step {
    /// Claimed, run and, unless its fence went stale, finished.
    Ran {
        run: RunContext,
        workflow: Arc<Workflow>,
        result: Result<Value, AdapterError>,
        finished: bool,
    },
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
        let started = Instant::now();
        let (steps, mut settled) = with_commit_retries(|| self.run_batch(batch)).await?;
        // Each run's follow-ups go out once, for all of its messages in the batch; a
        // failed publish fails every one of them, so that each is redelivered and
        // re-drives its own children.
        let runs: Vec<(&RunContext, &Workflow, Settled)> = unique_runs(&steps)
            .into_iter()
            .map(|(run, workflow)| {
                (
                    run,
                    workflow,
                    settled.remove(&run.run_id).unwrap_or_default(),
                )
            })
            .collect();
        let published = join_all(runs.iter().map(|(run, workflow, settled)| async {
            let outcome = self.publish_settled(Some(workflow), run, settled).await;
            (run.run_id, outcome)
        }))
        .await;
        let failed_runs: HashMap<Uuid, String> = published
            .into_iter()
            .filter_map(|(run, outcome)| outcome.err().map(|e| (run, e.to_string())))
            .collect();
        let outcomes = batch
            .iter()
            .zip(steps)
            .map(|((message, redelivered), step)| {
                let failed_runs = &failed_runs;
                async move {
                    match step {
                        Step::Ran {
                            finished: false, ..
                        } => Ok(fenced(message)),
                        Step::Ran { run, result, .. } => match failed_runs.get(&run.run_id) {
                            // Publishing only fails on the broker's side: requeue.
                            Some(error) => Err(EngineError::Broker(BrokerError::Amqp(
                                lapin::Error::from(std::io::Error::other(format!(
                                    "follow-ups of run {} not published: {error}",
                                    run.run_id
                                ))),
                            ))),
                            None => self.after_task(message, &result, started).await,
                        },
                        Step::HandedOff {
                            fence,
                            run,
                            workflow,
                        } => {
                            self.continue_claimed(
                                message,
                                fence,
                                &run,
                                workflow.as_deref(),
                                started,
                            )
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
        Ok(join_all(outcomes).await)
    }

    /// The batch's transaction: lock the runs, claim every node, run the built-ins,
    /// finish them and advance their runs.
    async fn run_batch(
        &self,
        batch: &[(TaskMessage, bool)],
    ) -> Result<(Vec<Step>, HashMap<Uuid, Settled>), StoreError> {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await?;
        let mut run_ids: Vec<Uuid> = batch.iter().map(|(m, _)| m.run_id).collect();
        run_ids.sort();
        run_ids.dedup();
        store::nodes::lock_runs(&tx, &run_ids).await?;
        let requests: Vec<ClaimRequest> = batch
            .iter()
            .map(|(message, redelivered)| claim_request(message, *redelivered))
            .collect();
        let claims = store::nodes::claim_all(&tx, &requests).await?;
        let mut steps = Vec::with_capacity(batch.len());
        let mut fences = Vec::with_capacity(batch.len());
        for ((message, _), claim) in batch.iter().zip(claims) {
            let Claim::Claimed { fence, run, .. } = claim else {
                steps.push(Step::NotClaimed(claim));
                fences.push(0);
                continue;
            };
            let workflow = self.workflow(&run.workflow, run.version).await?;
            let node = workflow.as_deref().and_then(|w| w.node(&message.node_id));
            let step = match (&workflow, node) {
                (Some(found), Some(node)) if is_builtin(node.kind.as_str()) => {
                    let result = self.run_builtin(&tx, found, &run, node, message).await?;
                    Step::Ran {
                        workflow: found.clone(),
                        run,
                        result,
                        finished: false,
                    }
                }
                _ => Step::HandedOff {
                    fence,
                    run,
                    workflow,
                },
            };
            steps.push(step);
            fences.push(fence);
        }
        let errors: Vec<Option<String>> = steps
            .iter()
            .map(|step| match step {
                Step::Ran { result: Err(e), .. } => Some(e.to_string()),
                _ => None,
            })
            .collect();
        let finishing: Vec<Finishing> = batch
            .iter()
            .zip(&steps)
            .zip(fences.iter().zip(&errors))
            .filter_map(|(((message, _), step), (fence, error))| match step {
                Step::Ran { result, .. } => Some(Finishing {
                    run_id: message.run_id,
                    node_id: &message.node_id,
                    fence: *fence,
                    state: finished_as(result).as_str(),
                    output: result.as_ref().ok(),
                    error: error.as_deref(),
                }),
                _ => None,
            })
            .collect();
        let done: std::collections::HashSet<(Uuid, String)> =
            store::nodes::finish_all(&tx, &finishing)
                .await?
                .into_iter()
                .collect();
        drop(finishing);
        // Each run's finished nodes, in the batch's order.
        let mut by_run: BTreeMap<Uuid, (usize, Vec<(String, Finished)>)> = BTreeMap::new();
        for (i, ((message, _), step)) in batch.iter().zip(steps.iter_mut()).enumerate() {
            if let Step::Ran {
                result, finished, ..
            } = step
                && done.contains(&(message.run_id, message.node_id.clone()))
            {
                *finished = true;
                by_run
                    .entry(message.run_id)
                    .or_insert_with(|| (i, Vec::new()))
                    .1
                    .push((message.node_id.clone(), finished_as(result)));
            }
        }
        let progress: Vec<Progress> = by_run
            .values()
            .map(|(first, finished)| {
                let Step::Ran { run, workflow, .. } = &steps[*first] else {
                    unreachable!("only finished steps are grouped")
                };
                Progress {
                    workflow,
                    run,
                    ready: Vec::new(),
                    finished: finished.clone(),
                }
            })
            .collect();
        let settled = settle_all(&tx, progress).await?;
        tx.commit().await?;
        let settled = by_run.keys().copied().zip(settled).collect();
        Ok((steps, settled))
    }
}

fn finished_as(result: &Result<Value, AdapterError>) -> Finished {
    if result.is_ok() {
        Finished::Completed
    } else {
        Finished::Failed
    }
}

/// The runs the batch finished nodes of, each once.
fn unique_runs(steps: &[Step]) -> Vec<(&RunContext, &Workflow)> {
    let mut seen = std::collections::HashSet::new();
    steps
        .iter()
        .filter_map(|step| match step {
            Step::Ran {
                run,
                workflow,
                finished: true,
                ..
            } if seen.insert(run.run_id) => Some((run, workflow.as_ref())),
            _ => None,
        })
        .collect()
}
