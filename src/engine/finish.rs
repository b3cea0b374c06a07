//! Recording an attempt's outcome: complete or fail the node and advance the DAG in one
//! transaction, or schedule a retry; then publish what that committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::batch::Outcome;
use super::dag::{Finished, Settled};
use super::retry::next_delay;
use super::{Engine, EngineError, Handled, TaskMessage};
use crate::adapter::{AdapterError, ModelCall};
use crate::broker::{DeadLetter, Topology};
use crate::store::{self, RunContext, StoreError};
use crate::telemetry;
use crate::workflow::Workflow;

/// How often a transaction that hit a deadlock or a lost connection is retried
/// in-process before the message is requeued.
const COMMIT_ATTEMPTS: u32 = 3;

impl Engine {
    /// Records the outcome of an attempt and publishes its follow-ups.
    // The attempt (message, fence, run) and its result travel together here.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn finish(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: Option<Arc<Workflow>>,
        result: Result<Value, AdapterError>,
        calls: Vec<ModelCall>,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let node = workflow.as_deref().and_then(|w| w.node(&message.node_id));
        if let (
            Err(AdapterError::BreakerOpen {
                profile,
                retry_after,
            }),
            Some(workflow),
        ) = (&result, workflow.as_deref())
        {
            return self
                .defer(message, fence, run, workflow, profile, *retry_after, &calls)
                .await;
        }
        if let Err(error) = &result {
            let policy = node.and_then(|n| n.retry.clone()).unwrap_or_default();
            if let (Some(workflow), Some(delay)) = (
                workflow.as_deref(),
                next_delay(&policy, message.attempt, error),
            ) {
                return self
                    .retry_later(message, fence, run, workflow, error, delay, &calls)
                    .await;
            }
        }
        let Some(workflow) = workflow else {
            return self
                .finish_orphan(message, fence, run, result, &calls, started)
                .await;
        };
        let outcome = Outcome {
            message: message.clone(),
            fence,
            run: run.clone(),
            workflow,
            result,
            calls,
            started,
            completed_by_claim: false,
        };
        match &self.group_commit {
            Some(group) => group.finish(self, outcome).await,
            None => {
                let mut results = self.finish_batch(std::slice::from_ref(&outcome)).await?;
                results.pop().expect("one result per outcome")
            }
        }
    }

    /// Records the outcome of a node whose workflow version is not stored: the node
    /// fails and counts against its run, but the DAG cannot advance; the rest is left
    /// for an operator.
    async fn finish_orphan(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        result: Result<Value, AdapterError>,
        calls: &[ModelCall],
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let settled = with_commit_retries(|| async {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            record_calls_in(&tx, message, calls).await?;
            let settled = self.finish_in(&tx, message, fence, run, &result).await?;
            tx.commit().await?;
            Ok(settled)
        })
        .await?;
        self.count_calls(calls);
        self.after_finish(message, run, None, settled, &result, started)
            .await
    }

    /// Records `running → completed | failed` for the holder of `fence` and counts the
    /// node against its run, inside the caller's transaction; `None` when the fence is
    /// stale.
    async fn finish_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        result: &Result<Value, AdapterError>,
    ) -> Result<Option<Settled>, StoreError> {
        let (outcome, output, error) = match result {
            Ok(output) => (Finished::Completed, Some(output), None),
            Err(e) => (Finished::Failed, None, Some(e.to_string())),
        };
        store::nodes::lock_runs(tx, &[run.run_id]).await?;
        let finishing = store::nodes::Finishing {
            run_id: message.run_id,
            node_id: &message.node_id,
            fence,
            state: outcome.as_str(),
            output,
            error: error.as_deref(),
        };
        if store::nodes::finish_all(tx, &[finishing]).await?.is_empty() {
            return Ok(None);
        }
        let failed = i32::from(outcome == Finished::Failed);
        let run_finished = store::advance::count_finished_nodes(tx, &[(run.run_id, 1, failed)])
            .await?
            .pop()
            .map(|(_, state)| state);
        Ok(Some(Settled {
            run_finished,
            ..Settled::default()
        }))
    }

    /// Publishes what a committed finish caused: the next tasks, a dead letter for a
    /// failure; then counts and logs it.
    pub(super) async fn after_finish(
        &self,
        message: &TaskMessage,
        run: &RunContext,
        workflow: Option<&Workflow>,
        settled: Option<Settled>,
        result: &Result<Value, AdapterError>,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        let Some(settled) = settled else {
            return Ok(fenced(message));
        };
        self.publish_settled(workflow, run, &settled).await?;
        self.after_task(message, result, started).await
    }

    /// Publishes the tasks that settling a run queued, then counts what it skipped and
    /// the run itself when it closed.
    pub(super) async fn publish_settled(
        &self,
        workflow: Option<&Workflow>,
        run: &RunContext,
        settled: &Settled,
    ) -> Result<(), EngineError> {
        if let Some(workflow) = workflow {
            self.publish_tasks(workflow, run, &settled.queued).await?;
            settled.count_skipped(workflow);
        }
        if let Some(state) = &settled.run_finished {
            self.record_run_finished(run, state);
        }
        Ok(())
    }

    /// What is left of a task once its run's follow-ups are out: a dead letter when it
    /// failed, and its duration.
    pub(super) async fn after_task(
        &self,
        message: &TaskMessage,
        result: &Result<Value, AdapterError>,
        started: Instant,
    ) -> Result<Handled, EngineError> {
        if let Err(error) = result {
            let error = error.to_string();
            self.publish_dead(&failure_letter(self.publisher.topology(), message, &error))
                .await?;
            tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
                %error, "node failed");
        }
        metrics::histogram!(telemetry::TASK_DURATION,
            "queue" => message.queue.clone().unwrap_or_default(),
            "type" => message.kind.clone().unwrap_or_default())
        .record(started.elapsed().as_secs_f64());
        Ok(Handled::Done(if result.is_ok() {
            "completed"
        } else {
            "failed"
        }))
    }

    /// `running → retrying`, then the next attempt's message into the retry tier that
    /// holds it for `delay`. No worker sleeps meanwhile.
    // The attempt (message, fence, run) and its result travel together here.
    #[allow(clippy::too_many_arguments)]
    async fn retry_later(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: &Workflow,
        error: &AdapterError,
        delay: Duration,
        calls: &[ModelCall],
    ) -> Result<Handled, EngineError> {
        let retry_at = chrono::Utc::now() + delay;
        let text = error.to_string();
        let fenced_in = with_commit_retries(|| async {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            record_calls_in(&tx, message, calls).await?;
            let fenced_in = store::nodes::schedule_retry(
                &tx,
                message.run_id,
                &message.node_id,
                fence,
                &text,
                retry_at,
            )
            .await?;
            tx.commit().await?;
            Ok(fenced_in)
        })
        .await?;
        self.count_calls(calls);
        if !fenced_in {
            return Ok(fenced(message));
        }
        self.publish_delayed(workflow, run, message, message.attempt + 1, delay)
            .await?;
        tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
            error = %text, retry_in = ?delay, "attempt failed; retrying");
        Ok(Handled::Done("retried"))
    }

    /// Puts the node back to `queued` without using up its attempt and sends the task
    /// around a retry tier: its profile's breaker is open and no fallback took it.
    // The attempt (message, fence, run) and its result travel together here.
    #[allow(clippy::too_many_arguments)]
    async fn defer(
        &self,
        message: &TaskMessage,
        fence: i64,
        run: &RunContext,
        workflow: &Workflow,
        profile: &str,
        delay: Duration,
        calls: &[ModelCall],
    ) -> Result<Handled, EngineError> {
        let reason = format!("deferred: circuit breaker of profile \"{profile}\" is open");
        let released = with_commit_retries(|| async {
            let mut client = self.store.client().await?;
            let tx = client.transaction().await?;
            record_calls_in(&tx, message, calls).await?;
            let released =
                store::nodes::release(&tx, message.run_id, &message.node_id, fence, &reason)
                    .await?;
            tx.commit().await?;
            Ok(released)
        })
        .await?;
        self.count_calls(calls);
        if !released {
            return Ok(fenced(message));
        }
        self.publish_delayed(workflow, run, message, message.attempt, delay)
            .await?;
        tracing::info!(run = %message.run_id, node = %message.node_id, attempt = message.attempt, %profile,
            wait = ?delay, "deferred: breaker open");
        Ok(Handled::Done("deferred"))
    }
}

/// Writes the audit rows of an attempt's calls in the transaction that records its
/// outcome: a call is recorded even when its result is dropped (stale fence).
async fn record_calls_in(
    tx: &deadpool_postgres::Transaction<'_>,
    message: &TaskMessage,
    calls: &[ModelCall],
) -> Result<(), StoreError> {
    let attempt = store::model_calls::AttemptCalls {
        run_id: message.run_id,
        node_id: &message.node_id,
        attempt: message.attempt,
        calls,
    };
    store::model_calls::insert_model_calls(tx, &[attempt]).await
}

/// Runs a database step, retrying it in-process on deadlocks and lost connections.
pub(super) async fn with_commit_retries<T, F, Fut>(mut step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match step().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_retryable() && tries < COMMIT_ATTEMPTS => {
                tracing::debug!(error = %e, "retrying a transaction");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(tries))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn fenced(message: &TaskMessage) -> Handled {
    tracing::warn!(run = %message.run_id, node = %message.node_id, attempt = message.attempt,
        "another worker took this node over; dropping this result");
    Handled::Done("fenced")
}

/// The dead letter of a node that failed for good.
pub(super) fn failure_letter(
    topology: &Topology,
    message: &TaskMessage,
    error: &str,
) -> DeadLetter {
    DeadLetter {
        reason: "task_failed".into(),
        detail: format!(
            "run {} node \"{}\" attempt {} failed: {error}",
            message.run_id, message.node_id, message.attempt
        ),
        source_queue: topology.task_queue(message.queue.as_deref().unwrap_or_default()),
        body: serde_json::to_vec(message).expect("a task message always serializes"),
    }
}
