//! Processing one task message: claim with a fencing token, call the adapter outside any
//! transaction, then record the outcome and advance the DAG in one transaction, and only
//! then publish the follow-ups. See DESIGN §4 for the rules this implements.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::dag::{Finished, settle, template_context};
use super::messages::{Poison, parse_task};
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::adapter::{AdapterError, Call, ModelCall};
use crate::broker::DeadLetter;
use crate::store::{self, Claim, RunContext, StoreError};
use crate::telemetry;
use crate::workflow::{Workflow, template};

/// How long one attempt may take when the node sets no `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How often a transaction that hit a deadlock or lost connection is retried in-process
/// before the message is requeued.
const COMMIT_ATTEMPTS: u32 = 3;

impl Engine {
    /// Handles one task message from `queue`.
    pub async fn handle_task(&self, body: &[u8], redelivered: bool, queue: &str) -> Result<Handled, EngineError> {
        let message = match parse_task(body) {
            Ok(message) => message,
            Err(poison) => return Ok(Handled::Poison(poison)),
        };
        let handled = self.process_task(&message, redelivered).await?;
        if let Handled::Done(outcome) = &handled {
            metrics::counter!(telemetry::TASKS_TOTAL,
                "queue" => message.queue.clone().unwrap_or_else(|| queue.to_owned()),
                "type" => message.kind.clone().unwrap_or_default(),
                "outcome" => *outcome)
            .increment(1);
        }
        Ok(handled)
    }

    async fn process_task(&self, message: &TaskMessage, redelivered: bool) -> Result<Handled, EngineError> {
        let started = Instant::now();
        let client = self.store.client().await?;
        let claim = store::nodes::claim(&client, message.run_id, &message.node_id, message.attempt, redelivered).await?;
        drop(client);
        let (fence, run) = match claim {
            Claim::Claimed { fence, from_state, run } => {
                if from_state == "running" {
                    tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
                        "took over a node left running by a lost worker");
                }
                (fence, run)
            }
            Claim::NotClaimable { state: None, .. } => {
                return Ok(Handled::Poison(Poison::new(
                    "unknown_node",
                    format!("run {} has no node \"{}\"", message.run_id, message.node_id),
                )));
            }
            Claim::NotClaimable { state: Some(state), attempt } => {
                if redelivered && attempt == message.attempt {
                    self.redrive(message, &state).await?;
                }
                return Ok(Handled::Done("duplicate"));
            }
        };
        let Some(workflow) = self.workflow(&run.workflow, run.version).await? else {
            let error = format!("workflow \"{}\" version {} is not stored", run.workflow, run.version);
            return self.finish(message, fence, &run, None, Err(error), started).await;
        };
        let result = self.execute(&workflow, &run, message).await?;
        self.finish(message, fence, &run, Some(&workflow), result.map_err(|e| e.to_string()), started)
            .await
    }

    /// Renders the node's input and calls its adapter, within the node's timeout.
    async fn execute(
        &self,
        workflow: &Workflow,
        run: &RunContext,
        message: &TaskMessage,
    ) -> Result<Result<Value, AdapterError>, EngineError> {
        let Some(node) = workflow.node(&message.node_id) else {
            return Ok(Err(AdapterError::InvalidInput(format!(
                "workflow \"{}\" version {} has no node \"{}\"",
                run.workflow, run.version, message.node_id
            ))));
        };
        let input = if self.adapters.reads_input(node) {
            let client = self.store.client().await?;
            let context = template_context(&client, workflow, run, &node.id).await?;
            drop(client);
            match template::render_value(&node.input, &context) {
                Ok(input) => input,
                Err(e) => return Ok(Err(AdapterError::InvalidInput(format!("input template: {e}")))),
            }
        } else {
            Value::Null
        };
        let call = Call {
            run_id: run.run_id,
            node,
            attempt: message.attempt,
            input,
        };
        let timeout = node.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let outcome = match tokio::time::timeout(timeout, self.adapters.run(&call)).await {
            Ok(outcome) => outcome,
            Err(_) => return Ok(Err(AdapterError::Timeout(timeout))),
        };
        self.record_calls(message, &outcome.calls).await?;
        Ok(outcome.result)
    }

    /// Writes the audit rows of the calls an attempt made and counts them in metrics.
    async fn record_calls(&self, message: &TaskMessage, calls: &[ModelCall]) -> Result<(), EngineError> {
        self.store
            .record_model_calls(message.run_id, &message.node_id, message.attempt, calls)
            .await?;
        for call in calls {
            let (profile, provider) = (call.profile.clone(), call.provider);
            metrics::counter!(telemetry::MODEL_CALLS_TOTAL, "profile" => profile.clone(), "provider" => provider, "status" => call.status.clone())
                .increment(1);
            metrics::histogram!(telemetry::MODEL_CALL_DURATION, "profile" => profile.clone(), "provider" => provider)
                .record(call.latency.as_secs_f64());
            metrics::counter!(telemetry::MODEL_TOKENS_TOTAL, "profile" => profile.clone(), "kind" => "prompt")
                .increment(call.usage.prompt_tokens.max(0) as u64);
            metrics::counter!(telemetry::MODEL_TOKENS_TOTAL, "profile" => profile, "kind" => "completion")
                .increment(call.usage.completion_tokens.max(0) as u64);
        }
        Ok(())
    }

    /// Records the outcome, advances the DAG and publishes what became ready.
    async fn finish(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: Option<&Workflow>,
        result: Result<Value, String>,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let (outcome, output, error) = match result {
            Ok(output) => (Finished::Completed, Some(output), None),
            Err(error) => (Finished::Failed, None, Some(error)),
        };
        let mut tries = 0;
        let settled = loop {
            tries += 1;
            match self.commit_finish(message, fence, run, workflow, outcome, output.as_ref(), error.as_deref()).await {
                Ok(settled) => break settled,
                Err(e) if e.is_retryable() && tries < COMMIT_ATTEMPTS => {
                    tracing::debug!(error = %e, "retrying the finishing transaction");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(tries))).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let Some(settled) = settled else {
            tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
                "another worker took this node over; dropping this result");
            return Ok(Handled::Done("fenced"));
        };
        if let Some(workflow) = workflow {
            self.publish_tasks(workflow, run, &settled.queued).await?;
        }
        if let Some(error) = &error {
            self.publish_dead(&failure_letter(message, error)).await?;
        }
        if let Some(state) = &settled.run_finished {
            self.record_run_finished(run, state);
        }
        let label = outcome.as_str();
        let queue = message.queue.clone().unwrap_or_default();
        let kind = message.kind.clone().unwrap_or_default();
        metrics::histogram!(telemetry::TASK_DURATION, "queue" => queue, "type" => kind)
            .record(started.elapsed().as_secs_f64());
        match &error {
            Some(error) => tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt, %error, "node failed"),
            None => tracing::debug!(run = %message.run_id, node = %message.node_id, attempt = message.attempt, "node completed"),
        }
        Ok(Handled::Done(label))
    }

    /// The finishing transaction; `None` when the fence is stale.
    #[allow(clippy::too_many_arguments)]
    async fn commit_finish(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: Option<&Workflow>,
        outcome: Finished,
        output: Option<&Value>,
        error: Option<&str>,
    ) -> Result<Option<super::dag::Settled>, StoreError> {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await?;
        let fenced_in = store::nodes::finish(&tx, message.run_id, &message.node_id, fence, outcome.as_str(), output, error).await?;
        if !fenced_in {
            return Ok(None);
        }
        let settled = match workflow {
            Some(workflow) => settle(&tx, workflow, run, Vec::new(), vec![(message.node_id.clone(), outcome)]).await?,
            None => {
                let run_finished = store::nodes::count_finished_nodes(&tx, run.run_id, 1, 1).await?;
                super::dag::Settled { queued: Vec::new(), run_finished }
            }
        };
        tx.commit().await?;
        Ok(Some(settled))
    }

    /// A redelivered message for a node already past it: republish what its earlier
    /// processing committed but may not have published (children still queued, the dead
    /// letter of a failure).
    async fn redrive(&self, message: &TaskMessage, state: &str) -> Result<(), EngineError> {
        let client = self.store.client().await?;
        let run = store::nodes::run_context(&client, message.run_id).await?;
        let Some(workflow) = self.workflow(&run.workflow, run.version).await? else {
            return Ok(());
        };
        match state {
            "completed" | "failed" | "skipped" => {
                let children: Vec<String> = workflow.children_of(&message.node_id).map(|n| n.id.clone()).collect();
                let queued = store::nodes::queued_tasks(&client, run.run_id, Some(&children)).await?;
                drop(client);
                tracing::info!(run = %run.run_id, node = %message.node_id, republished = queued.len(), "re-drove a redelivered task");
                self.publish_tasks(&workflow, &run, &queued).await?;
                if state == "failed" {
                    let error = "node failed (re-driven dead letter)";
                    self.publish_dead(&failure_letter(message, error)).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Counts a finished run in the metrics.
    pub(super) fn record_run_finished(&self, run: &RunContext, state: &str) {
        metrics::counter!(telemetry::RUNS_TOTAL, "workflow" => run.workflow.clone(), "outcome" => state.to_owned())
            .increment(1);
        let started = uuid_time(&run.run_id);
        if let Some(started) = started {
            metrics::histogram!(telemetry::RUN_DURATION, "workflow" => run.workflow.clone())
                .record((chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0);
        }
        tracing::info!(run = %run.run_id, workflow = %run.workflow, %state, "run finished");
    }
}

/// Run ids are UUIDv7: their timestamp is the run's start.
fn uuid_time(id: &uuid::Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    chrono::DateTime::from_timestamp(secs as i64, nanos)
}

fn failure_letter(message: &TaskMessage, error: &str) -> DeadLetter {
    DeadLetter {
        reason: "task_failed".into(),
        detail: format!(
            "run {} node \"{}\" attempt {} failed: {error}",
            message.run_id, message.node_id, message.attempt
        ),
        source_queue: message.queue.clone().unwrap_or_default(),
        body: serde_json::to_vec(message).expect("a task message always serializes"),
    }
}
