//! Starting runs from events. The event's `source` and `id` are the idempotency key: the
//! same event delivered twice starts one run per workflow.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use serde_json::Value;
use uuid::Uuid;

use super::dag::{Progress, Settled, settle_all};
use super::finish::with_commit_retries;
use super::messages::{Poison, RUN_REQUESTED, parse_json};
use super::{Engine, EngineError, Handled};
use crate::schema::Schema;
use crate::store::{self, NewRun, RunContext, StartedRun};
use crate::workflow::{Workflow, queue_of};

/// A workflow an event starts, with the run's input and priority.
struct Target {
    workflow: Arc<Workflow>,
    input: Value,
    priority: i16,
}

impl Engine {
    /// Handles one event from the trigger queue.
    pub async fn handle_trigger(
        &self,
        body: &[u8],
        redelivered: bool,
    ) -> Result<Handled, EngineError> {
        let mut handled = self.handle_triggers(&[(body, redelivered)]).await?;
        handled.pop().expect("one outcome per event")
    }

    /// Handles events (with whether each was redelivered) together: the runs they start
    /// are created in one transaction. One outcome per event, in order; `Err` only when
    /// that transaction failed, and then none of it took effect.
    pub async fn handle_triggers(
        &self,
        batch: &[(&[u8], bool)],
    ) -> Result<Vec<Result<Handled, EngineError>>, EngineError> {
        let mut outcomes: Vec<Option<Result<Handled, EngineError>>> =
            batch.iter().map(|_| None).collect();
        // (event index, run, target) for every run to start.
        let mut starts: Vec<(usize, RunContext, Target)> = Vec::new();
        let mut lookups = Lookups::default();
        for (i, (body, _)) in batch.iter().enumerate() {
            let event = match parse_json(body, Schema::Event) {
                Ok(event) => event,
                Err(poison) => {
                    outcomes[i] = Some(Ok(Handled::Poison(poison)));
                    continue;
                }
            };
            match self.targets(&event, &mut lookups).await {
                Err(e) => outcomes[i] = Some(Err(e)),
                Ok(Err(poison)) => outcomes[i] = Some(Ok(Handled::Poison(poison))),
                Ok(Ok(targets)) if targets.is_empty() => {
                    outcomes[i] = Some(Ok(Handled::Done("unmatched")))
                }
                Ok(Ok(targets)) => {
                    for target in targets {
                        starts.push((i, new_run_context(&event, &target), target));
                    }
                }
            }
        }
        let started = self.start_runs(&starts).await?;
        let published = join_all(starts.iter().zip(started).map(|((i, run, target), started)| {
            let redelivered = batch[*i].1;
            async move {
                let outcome = match started {
                    Started::Created(settled) => {
                        tracing::info!(run = %run.run_id, workflow = %run.workflow, version = run.version, "run started");
                        self.publish_settled(Some(&target.workflow), run, &settled)
                            .await
                            .map(|()| true)
                    }
                    // A redelivered event re-publishes the run's queued tasks, in case the
                    // first delivery committed but died before publishing.
                    Started::Existing(run_id) if redelivered => self
                        .republish_queued(&target.workflow, run_id)
                        .await
                        .map(|()| false),
                    Started::Existing(_) => Ok(false),
                };
                (*i, outcome)
            }
        }))
        .await;
        for (i, outcome) in published {
            let slot = &mut outcomes[i];
            match (slot.take(), outcome) {
                (Some(Err(e)), _) | (_, Err(e)) => *slot = Some(Err(e)),
                (Some(Ok(Handled::Done("started"))), _) | (_, Ok(true)) => {
                    *slot = Some(Ok(Handled::Done("started")))
                }
                (_, Ok(false)) => *slot = Some(Ok(Handled::Done("duplicate"))),
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every event has an outcome"))
            .collect())
    }

    /// The workflows this event starts: the one it names (`dagq.run.requested`), or every
    /// workflow whose trigger matches its type and filter.
    async fn targets(
        &self,
        event: &Value,
        lookups: &mut Lookups,
    ) -> Result<Result<Vec<Target>, Poison>, EngineError> {
        let kind = event["type"].as_str().unwrap_or_default();
        if kind == RUN_REQUESTED {
            let data = &event["data"];
            let name = data["workflow"].as_str().unwrap_or_default();
            let version = match lookups.latest.get(name) {
                Some(version) => *version,
                None => {
                    let version = self.store.latest_version(name).await?;
                    lookups.latest.insert(name.to_owned(), version);
                    version
                }
            };
            let Some(version) = version else {
                return Ok(Err(Poison::new(
                    "unknown_workflow",
                    format!(
                        "event {RUN_REQUESTED} names workflow \"{name}\", which is not applied; run `dagq workflow apply FILE` first"
                    ),
                )));
            };
            let Some(workflow) = self.workflow(name, version).await? else {
                return Ok(Err(Poison::new(
                    "unknown_workflow",
                    format!("workflow \"{name}\" vanished"),
                )));
            };
            return Ok(Ok(vec![Target {
                workflow,
                input: data
                    .get("input")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Default::default())),
                priority: data["priority"].as_i64().unwrap_or(0) as i16,
            }]));
        }
        let mut targets = Vec::new();
        if !lookups.triggered.contains_key(kind) {
            let found = self.store.workflows_triggered_by(kind).await?;
            lookups.triggered.insert(kind.to_owned(), found);
        }
        for (name, version) in &lookups.triggered[kind] {
            let (name, version) = (name.as_str(), *version);
            let Some(workflow) = self.workflow(name, version).await? else {
                continue;
            };
            match workflow.triggered_by(event) {
                Ok(true) => targets.push(Target {
                    workflow,
                    input: event.get("data").cloned().unwrap_or(Value::Null),
                    priority: 0,
                }),
                Ok(false) => {}
                // A filter that cannot be evaluated on this event (a field it reads is
                // missing) does not match it.
                Err(e) => {
                    tracing::debug!(workflow = name, error = %e, "trigger filter does not apply")
                }
            }
        }
        Ok(Ok(targets))
    }

    /// Creates the runs (each unless its event already started it) and queues their
    /// roots, in one transaction. One outcome per run, in order.
    async fn start_runs(
        &self,
        starts: &[(usize, RunContext, Target)],
    ) -> Result<Vec<Started>, EngineError> {
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let new_runs: Vec<NewRun> = starts
            .iter()
            .map(|(_, run, target)| NewRun {
                id: run.run_id,
                workflow: &run.workflow,
                version: run.version,
                event: &run.event,
                event_source: run.event["source"].as_str().unwrap_or_default(),
                event_id: run.event["id"].as_str().unwrap_or_default(),
                input: &run.input,
                priority: run.priority,
                nodes: target
                    .workflow
                    .def
                    .nodes
                    .iter()
                    .map(|n| {
                        let deps = n.depends.len() as i32;
                        (n.id.clone(), deps, queue_of(n), n.kind.as_str().to_owned())
                    })
                    .collect(),
            })
            .collect();
        let started = with_commit_retries(|| async {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            let started = store::runs::insert_runs(&tx, &new_runs).await?;
            let progress: Vec<Progress> = starts
                .iter()
                .zip(&started)
                .filter(|(_, s)| matches!(s, StartedRun::Created(_)))
                .map(|((_, run, target), _)| Progress {
                    workflow: &target.workflow,
                    run,
                    ready: target.workflow.roots().map(|n| n.id.clone()).collect(),
                    finished: Vec::new(),
                })
                .collect();
            let mut settled = settle_all(&tx, progress).await?.into_iter();
            tx.commit().await?;
            Ok(started
                .into_iter()
                .map(|s| match s {
                    StartedRun::Created(_) => {
                        Started::Created(settled.next().expect("one per created run"))
                    }
                    StartedRun::Existing(run_id) => Started::Existing(run_id),
                })
                .collect())
        })
        .await?;
        Ok(started)
    }

    /// Publishes a run's queued tasks again.
    async fn republish_queued(&self, workflow: &Workflow, run_id: Uuid) -> Result<(), EngineError> {
        let client = self.store.client().await?;
        let run = store::nodes::run_context(&client, run_id).await?;
        let queued = store::nodes::queued_tasks(&client, run_id, None).await?;
        drop(client);
        self.publish_tasks(workflow, &run, &queued).await
    }
}

/// What starting one run came to.
enum Started {
    /// Created; what queueing its roots caused.
    Created(Settled),
    /// Its event had started it before.
    Existing(Uuid),
}

/// Workflow lookups made for a batch of events, so that events alike cost one.
#[derive(Default)]
struct Lookups {
    /// Latest version by workflow name.
    latest: HashMap<String, Option<i32>>,
    /// (name, latest version) of the workflows an event type may trigger, by type.
    triggered: HashMap<String, Vec<(String, i32)>>,
}

/// The run an event starts for a target, with a fresh (time-ordered) id.
fn new_run_context(event: &Value, target: &Target) -> RunContext {
    RunContext {
        run_id: Uuid::now_v7(),
        workflow: target.workflow.name().to_owned(),
        version: target.workflow.version,
        event: event.clone(),
        input: target.input.clone(),
        priority: target.priority,
    }
}
