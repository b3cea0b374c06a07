//! Publishing the follow-ups of a committed transaction: the next tasks and dead letters.

use std::collections::HashMap;

use futures::future::try_join_all;

use super::{Engine, EngineError, TaskMessage};
use crate::broker::DeadLetter;
use crate::store::{QueuedTask, RunContext};
use crate::workflow::{Workflow, queue_of};

/// A node's own priority, else its run's.
fn task_priority(workflow: &Workflow, run: &RunContext, node_id: &str) -> u8 {
    workflow
        .node(node_id)
        .and_then(|n| n.priority)
        .unwrap_or(run.priority.clamp(0, 9) as u8)
}

impl Engine {
    /// Publishes one task message per queued node and waits for every confirm. The
    /// publishes go out together, so their confirms are awaited in one round trip; each
    /// says how many went to its queue (see [`crate::broker::BURST_HEADER`]).
    pub(super) async fn publish_tasks(
        &self,
        workflow: &Workflow,
        run: &RunContext,
        tasks: &[QueuedTask],
    ) -> Result<(), EngineError> {
        let mut bursts: HashMap<&str, u32> = HashMap::new();
        for task in tasks {
            *bursts.entry(task.queue.as_str()).or_default() += 1;
        }
        let publishes = tasks.iter().map(|task| {
            let priority = task_priority(workflow, run, &task.node_id);
            let message = TaskMessage::for_task(run, task);
            let body = serde_json::to_vec(&message).expect("a task message always serializes");
            let burst = bursts[task.queue.as_str()];
            async move {
                self.publisher
                    .publish_task_in_burst(&task.queue, &body, priority, burst)
                    .await
            }
        });
        try_join_all(publishes).await?;
        Ok(())
    }

    /// Publishes `attempt` of `message`'s node to wait `delay` in a retry tier.
    pub(super) async fn publish_delayed(
        &self,
        workflow: &Workflow,
        run: &RunContext,
        message: &TaskMessage,
        attempt: i32,
        delay: std::time::Duration,
    ) -> Result<(), EngineError> {
        let next = TaskMessage {
            attempt,
            ..message.clone()
        };
        let queue = match &next.queue {
            Some(queue) => queue.clone(),
            None => workflow
                .node(&next.node_id)
                .map(queue_of)
                .unwrap_or_default(),
        };
        let body = serde_json::to_vec(&next).expect("a task message always serializes");
        self.publisher
            .publish_retry(
                &queue,
                &body,
                task_priority(workflow, run, &next.node_id),
                delay,
            )
            .await?;
        Ok(())
    }

    /// Publishes a dead letter and counts it.
    pub(super) async fn publish_dead(&self, letter: &DeadLetter) -> Result<(), EngineError> {
        self.publisher.publish_dead(letter).await?;
        metrics::counter!(crate::telemetry::DEAD_LETTERS_TOTAL, "reason" => letter.reason.clone())
            .increment(1);
        Ok(())
    }
}
