//! Processing one task message: claim with a fencing token, call the adapter outside any
//! transaction, then record the outcome and advance the DAG in one transaction, and only
//! then publish the follow-ups. See DESIGN §4 for the rules this implements.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::dag::template_context;
use super::messages::{Poison, parse_task};
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::adapter::{AdapterError, Call, ModelCall};
use crate::store::nodes::ClaimRequest;
use crate::store::{self, Claim, RunContext};
use crate::telemetry;
use crate::workflow::{NodeDef, Workflow, template};

/// How long one attempt may take when the node sets no `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Slack past a node's deadline before its adapter call is abandoned unrecorded.
const BACKSTOP: Duration = Duration::from_secs(5);

impl Engine {
    /// Handles one task message from `queue`.
    pub async fn handle_task(
        &self,
        body: &[u8],
        redelivered: bool,
        queue: &str,
    ) -> Result<Handled, EngineError> {
        match parse_task(body) {
            Ok(message) => self.handle_task_message(&message, redelivered, queue).await,
            Err(poison) => Ok(Handled::Poison(poison)),
        }
    }

    /// Handles one task message, already parsed, from `queue`.
    pub(super) async fn handle_task_message(
        &self,
        message: &TaskMessage,
        redelivered: bool,
        queue: &str,
    ) -> Result<Handled, EngineError> {
        let span = tracing::Span::current();
        span.record("run", tracing::field::display(message.run_id));
        span.record("node", message.node_id.as_str());
        span.record("attempt", message.attempt);
        let handled = self.process_task(message, redelivered).await?;
        count_task(message, queue, &handled);
        Ok(handled)
    }

    async fn process_task(
        &self,
        message: &TaskMessage,
        redelivered: bool,
    ) -> Result<Handled, EngineError> {
        if message.kind.as_deref().is_some_and(is_builtin) {
            return self.process_builtin(message, redelivered).await;
        }
        let started = Instant::now();
        let client = self.store.client().await?;
        let claim = store::nodes::claim(&client, claim_request(message, redelivered)).await?;
        drop(client);
        self.after_claim(message, redelivered, claim, started).await
    }

    /// Goes on from a claim: runs the node if it was claimed, else handles the message
    /// as the duplicate (or poison) it is.
    pub(super) async fn after_claim(
        &self,
        message: &TaskMessage,
        redelivered: bool,
        claim: Claim,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let (fence, run) = match self.claimed(message, redelivered, claim).await? {
            Ok(claimed) => claimed,
            Err(handled) => return Ok(handled),
        };
        let workflow = self.workflow(&run.workflow, run.version).await?;
        self.continue_claimed(message, fence, &run, workflow, started)
            .await
    }

    /// Runs a claimed node's adapter and records the outcome; a node whose workflow is
    /// not stored fails at once.
    pub(super) async fn continue_claimed(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: Option<Arc<Workflow>>,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let Some(workflow) = workflow else {
            let error = format!(
                "workflow \"{}\" version {} is not stored",
                run.workflow, run.version
            );
            let error = Err(AdapterError::Config(error));
            return self
                .finish(message, fence, run, None, error, Vec::new(), started)
                .await;
        };
        let (result, calls) = self.execute(&workflow, run, message).await?;
        self.finish(message, fence, run, Some(workflow), result, calls, started)
            .await
    }

    /// Built-in nodes (`noop`, `transform`) call nothing outside: they are claimed,
    /// executed and finished in one transaction, as a batch of one.
    async fn process_builtin(
        &self,
        message: &TaskMessage,
        redelivered: bool,
    ) -> Result<Handled, EngineError> {
        let batch = [(message.clone(), redelivered)];
        let mut outcomes = self.handle_builtin_batch(&batch).await?;
        outcomes.pop().expect("one outcome per message")
    }

    /// Renders a built-in node's input (reading upstream outputs through `client`, the
    /// claiming transaction) and runs it in-process.
    pub(super) async fn run_builtin(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        workflow: &Workflow,
        run: &RunContext,
        node: &NodeDef,
        message: &TaskMessage,
    ) -> Result<Result<Value, AdapterError>, store::StoreError> {
        let input = if self.adapters.reads_input(node) {
            let context = template_context(client, workflow, run, &node.id).await?;
            template::render_value(&node.input, &context)
                .map_err(|e| AdapterError::InvalidInput(format!("input template: {e}")))
        } else {
            Ok(Value::Null)
        };
        Ok(match input {
            Ok(input) => {
                let call = Call {
                    run_id: run.run_id,
                    node,
                    attempt: message.attempt,
                    input,
                    deadline: None,
                };
                self.adapters.run(&call).await.result
            }
            Err(e) => Err(e),
        })
    }

    /// Turns a claim into (fence, run), or into how the message was handled when it is
    /// not claimable (a duplicate, re-driven when redelivered; or a poison message).
    pub(super) async fn claimed(
        &self,
        message: &TaskMessage,
        redelivered: bool,
        claim: Claim,
    ) -> Result<Result<(i64, RunContext), Handled>, EngineError> {
        match claim {
            Claim::Claimed {
                fence,
                from_state,
                run,
                ..
            } => {
                if from_state == "running" {
                    tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
                        "took over a node left running by a lost worker");
                }
                Ok(Ok((fence, run)))
            }
            Claim::NotClaimable { state: None, .. } => Ok(Err(Handled::Poison(Poison::new(
                "unknown_node",
                format!("run {} has no node \"{}\"", message.run_id, message.node_id),
            )))),
            Claim::NotClaimable {
                state: Some(state),
                attempt,
            } => {
                if redelivered && attempt == message.attempt {
                    self.redrive(message, &state).await?;
                }
                Ok(Err(Handled::Done("duplicate")))
            }
        }
    }

    /// Renders the node's input and calls its adapter, within the node's timeout.
    /// Returns the result and the calls made, which the finishing transaction records.
    async fn execute(
        &self,
        workflow: &Workflow,
        run: &RunContext,
        message: &TaskMessage,
    ) -> Result<(Result<Value, AdapterError>, Vec<ModelCall>), EngineError> {
        let Some(node) = workflow.node(&message.node_id) else {
            let error = AdapterError::InvalidInput(format!(
                "workflow \"{}\" version {} has no node \"{}\"",
                run.workflow, run.version, message.node_id
            ));
            return Ok((Err(error), Vec::new()));
        };
        let input = if self.adapters.reads_input(node) {
            let client = self.store.client().await?;
            let context = template_context(&client, workflow, run, &node.id).await?;
            drop(client);
            match template::render_value(&node.input, &context) {
                Ok(input) => input,
                Err(e) => {
                    let error = AdapterError::InvalidInput(format!("input template: {e}"));
                    return Ok((Err(error), Vec::new()));
                }
            }
        } else {
            Value::Null
        };
        let timeout = node.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let call = Call {
            run_id: run.run_id,
            node,
            attempt: message.attempt,
            input,
            deadline: Some(Instant::now() + timeout),
        };
        // The adapters end their requests by the deadline and report them; this bound is
        // only a backstop for an adapter that hangs outside a request.
        let outcome = match tokio::time::timeout(timeout + BACKSTOP, self.adapters.run(&call)).await
        {
            Ok(outcome) => outcome,
            Err(_) => return Ok((Err(AdapterError::Timeout(timeout)), Vec::new())),
        };
        self.on_breaker_events(&outcome.breaker_events).await;
        Ok((outcome.result, outcome.calls))
    }

    /// Counts the calls an attempt made, once their audit rows are committed.
    pub(super) fn count_calls(&self, calls: &[ModelCall]) {
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

/// Counts a processed task message in `dagq_tasks_total`.
pub(super) fn count_task(message: &TaskMessage, queue: &str, handled: &Handled) {
    if let Handled::Done(outcome) = handled {
        metrics::counter!(telemetry::TASKS_TOTAL,
            "queue" => message.queue.clone().unwrap_or_else(|| queue.to_owned()),
            "type" => message.kind.clone().unwrap_or_default(),
            "outcome" => *outcome)
        .increment(1);
    }
}

/// The claim a task message makes on its node; a redelivered message may take over a
/// node left running by a lost worker.
pub(super) fn claim_request(message: &TaskMessage, redelivered: bool) -> ClaimRequest<'_> {
    ClaimRequest {
        run_id: message.run_id,
        node_id: &message.node_id,
        attempt: message.attempt,
        take_over: redelivered,
        complete_noop: None,
    }
}

/// Node types that run in-process and call nothing outside.
pub(super) fn is_builtin(kind: &str) -> bool {
    matches!(kind, "noop" | "transform")
}
