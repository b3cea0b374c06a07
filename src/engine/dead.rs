//! The dead-letter consumer and replay: every dead letter (task failures and poison
//! messages alike) is recorded in `dead_letters`; an operator lists and replays them.

use uuid::Uuid;

use super::messages::parse_task;
use super::{Engine, EngineError, Handled};
use crate::broker::headers;
use crate::store::DeadLetterRow;

impl Engine {
    /// Records one dead letter from `<ns>.dead`.
    pub async fn handle_dead(
        &self,
        body: &[u8],
        properties: &lapin::BasicProperties,
    ) -> Result<Handled, EngineError> {
        let reason = headers::text(properties, headers::REASON).unwrap_or_else(|| "unknown".into());
        let detail = headers::text(properties, headers::DETAIL);
        let source_queue = headers::text(properties, headers::SOURCE_QUEUE);
        let task = if reason == "task_failed" {
            parse_task(body).ok()
        } else {
            None
        };
        let letter = DeadLetterRow {
            id: Uuid::now_v7(),
            reason: reason.clone(),
            detail,
            source_queue,
            run_id: task.as_ref().map(|t| t.run_id),
            node_id: task.as_ref().map(|t| t.node_id.clone()),
            attempt: task.as_ref().map(|t| t.attempt),
            body: body.to_vec(),
            created_at: chrono::Utc::now(),
            replayed_at: None,
        };
        // A re-driven failure publishes its dead letter again: one row per attempt.
        let dedupe = task.map(|t| format!("task:{}/{}/{}", t.run_id, t.node_id, t.attempt));
        let recorded = self
            .store
            .record_dead_letter(&letter, dedupe.as_deref())
            .await?;
        if recorded {
            tracing::warn!(id = %letter.id, %reason, detail = letter.detail.as_deref().unwrap_or(""), "dead letter recorded");
            self.alert_dead_letter(&letter).await;
        }
        Ok(Handled::Done(if recorded {
            "recorded"
        } else {
            "duplicate"
        }))
    }

    /// Replays a dead letter: a failed task's node runs again (with its downstream); a
    /// poison message goes back to the queue it came from. Returns what was done.
    pub async fn replay_dead_letter(&self, id: Uuid) -> Result<String, EngineError> {
        let Some(letter) = self.store.dead_letter(id).await? else {
            return Err(EngineError::Invalid(format!(
                "no dead letter {id}; `dagq dlq list` lists them"
            )));
        };
        if letter.replayed_at.is_some() {
            return Ok(format!("{id}: already replayed"));
        }
        let done = match (&letter.run_id, &letter.node_id) {
            (Some(run_id), Some(node_id)) => {
                let reset = self.retry_run(*run_id, Some(node_id), None).await?;
                format!("{id}: run {run_id} node {node_id} queued again ({reset} nodes reset)")
            }
            _ => {
                let queue = letter.source_queue.clone().ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "dead letter {id} does not say which queue it came from"
                    ))
                })?;
                self.publisher
                    .publish_confirmed(
                        "",
                        &queue,
                        &letter.body,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?;
                format!("{id}: republished to {queue}")
            }
        };
        self.store.mark_replayed(id).await?;
        Ok(done)
    }
}
