//! Starting runs from events. The event's `source` and `id` are the idempotency key: the
//! same event delivered twice starts one run per workflow.

use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use super::dag::settle;
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
        let event = match parse_json(body, Schema::Event) {
            Ok(event) => event,
            Err(poison) => return Ok(Handled::Poison(poison)),
        };
        let targets = match self.targets(&event).await? {
            Ok(targets) => targets,
            Err(poison) => return Ok(Handled::Poison(poison)),
        };
        if targets.is_empty() {
            return Ok(Handled::Done("unmatched"));
        }
        let mut outcome = "duplicate";
        for target in targets {
            if self.start_run(&event, &target, redelivered).await? {
                outcome = "started";
            }
        }
        Ok(Handled::Done(outcome))
    }

    /// The workflows this event starts: the one it names (`dagq.run.requested`), or every
    /// workflow whose trigger matches its type and filter.
    async fn targets(&self, event: &Value) -> Result<Result<Vec<Target>, Poison>, EngineError> {
        let kind = event["type"].as_str().unwrap_or_default();
        if kind == RUN_REQUESTED {
            let data = &event["data"];
            let name = data["workflow"].as_str().unwrap_or_default();
            let Some(version) = self.store.latest_version(name).await? else {
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
        for (name, version) in self.store.workflows_triggered_by(kind).await? {
            let name = name.as_str();
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

    /// Creates the run and publishes its root tasks; returns false when the event had
    /// already started it. A redelivered event re-publishes the run's queued tasks, in
    /// case the first delivery committed but died before publishing.
    async fn start_run(
        &self,
        event: &Value,
        target: &Target,
        redelivered: bool,
    ) -> Result<bool, EngineError> {
        let workflow = &target.workflow;
        let run = RunContext {
            run_id: Uuid::now_v7(),
            workflow: workflow.name().to_owned(),
            version: workflow.version,
            event: event.clone(),
            input: target.input.clone(),
            priority: target.priority,
        };
        let new_run = NewRun {
            id: run.run_id,
            workflow: &run.workflow,
            version: run.version,
            event,
            event_source: event["source"].as_str().unwrap_or_default(),
            event_id: event["id"].as_str().unwrap_or_default(),
            input: &run.input,
            priority: run.priority,
            nodes: workflow
                .def
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.id.clone(),
                        n.depends.len() as i32,
                        queue_of(n),
                        n.kind.as_str().to_owned(),
                    )
                })
                .collect(),
        };
        let mut client = self.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(store::StoreError::from)?;
        match store::runs::insert_run(&tx, &new_run).await? {
            StartedRun::Created(_) => {
                let roots = workflow.roots().map(|n| n.id.clone()).collect();
                let settled = settle(&tx, workflow, &run, roots, Vec::new()).await?;
                tx.commit().await.map_err(store::StoreError::from)?;
                tracing::info!(run = %run.run_id, workflow = %run.workflow, version = run.version, "run started");
                self.publish_settled(Some(workflow), &run, &settled).await?;
                Ok(true)
            }
            StartedRun::Existing(run_id) => {
                drop(tx);
                if redelivered {
                    let run = store::nodes::run_context(&client, run_id).await?;
                    let queued = store::nodes::queued_tasks(&client, run_id, None).await?;
                    self.publish_tasks(workflow, &run, &queued).await?;
                }
                Ok(false)
            }
        }
    }
}
