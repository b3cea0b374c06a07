//! Re-driving (DESIGN §4 rule 3): a redelivered message whose node is already past it
//! republishes what its earlier processing committed but may not have published, so a
//! crash between commit and publish loses nothing. The `node_runs` rows are the outbox.

use std::time::Duration;

use super::finish::failure_letter;
use super::{Engine, EngineError, TaskMessage};
use crate::store;

impl Engine {
    /// Republishes the follow-ups of `message`'s node, now in `state`.
    pub(super) async fn redrive(
        &self,
        message: &TaskMessage,
        state: &str,
    ) -> Result<(), EngineError> {
        let client = self.store.client().await?;
        let run = store::nodes::run_context(&client, message.run_id).await?;
        let Some(workflow) = self.workflow(&run.workflow, run.version).await? else {
            return Ok(());
        };
        match state {
            "completed" | "failed" | "skipped" => {
                let children: Vec<String> = workflow
                    .children_of(&message.node_id)
                    .map(|n| n.id.clone())
                    .collect();
                let queued =
                    store::nodes::queued_tasks(&client, run.run_id, Some(&children)).await?;
                drop(client);
                tracing::info!(run = %run.run_id, node = %message.node_id, republished = queued.len(),
                    "re-drove a redelivered task");
                self.publish_tasks(&workflow, &run, &queued).await?;
                if state == "failed" {
                    self.publish_dead(&failure_letter(
                        self.publisher.topology(),
                        message,
                        "node failed (re-driven dead letter)",
                    ))
                    .await?;
                }
            }
            "retrying" => {
                let due = store::nodes::retry_due(&client, run.run_id, &message.node_id).await?;
                drop(client);
                let delay = due
                    .map(|at| (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(Duration::ZERO);
                tracing::info!(run = %run.run_id, node = %message.node_id, "re-drove a pending retry");
                self.publish_delayed(&workflow, &run, message, message.attempt + 1, delay)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Republishes the next attempt of nodes whose retry is overdue by more than
    /// `grace`: their delayed message was lost. A message that was only late becomes a
    /// duplicate, which the claim ignores. Returns how many were republished.
    pub async fn republish_overdue_retries(&self, grace: Duration) -> Result<usize, EngineError> {
        let mut client = self.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(crate::store::StoreError::from)?;
        let overdue = store::nodes::take_overdue_retries(&tx, grace, 500).await?;
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        for (run_id, task) in &overdue {
            let run = store::nodes::run_context(&client, *run_id).await?;
            let Some(workflow) = self.workflow(&run.workflow, run.version).await? else {
                continue;
            };
            let message = TaskMessage::for_task(&run, task);
            tracing::warn!(run = %run_id, node = %task.node_id, attempt = task.attempt + 1,
                "a retry was overdue (its delayed message was lost); republishing it");
            self.publish_delayed(&workflow, &run, &message, task.attempt + 1, Duration::ZERO)
                .await?;
        }
        Ok(overdue.len())
    }
}
