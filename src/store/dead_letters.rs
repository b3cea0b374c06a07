//! The `dead_letters` table: every message that could not be processed, with why.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};

/// A dead letter as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterRow {
    /// Id.
    pub id: Uuid,
    /// Short reason (`task_failed`, `not_json`, `schema`, `unknown_workflow`, …).
    pub reason: String,
    /// What was wrong.
    pub detail: Option<String>,
    /// Broker queue the message was taken from.
    pub source_queue: Option<String>,
    /// For task failures: the run.
    pub run_id: Option<Uuid>,
    /// For task failures: the node.
    pub node_id: Option<String>,
    /// For task failures: the attempt.
    pub attempt: Option<i32>,
    /// The original message body.
    #[serde(serialize_with = "body_as_text")]
    pub body: Vec<u8>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When an operator replayed it.
    pub replayed_at: Option<DateTime<Utc>>,
}

fn body_as_text<S: serde::Serializer>(body: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(body))
}

const COLUMNS: &str =
    "id, reason, detail, source_queue, run_id, node_id, attempt, body, created_at, replayed_at";

fn row_to_letter(r: &tokio_postgres::Row) -> DeadLetterRow {
    DeadLetterRow {
        id: r.get(0),
        reason: r.get(1),
        detail: r.get(2),
        source_queue: r.get(3),
        run_id: r.get(4),
        node_id: r.get(5),
        attempt: r.get(6),
        body: r.get(7),
        created_at: r.get(8),
        replayed_at: r.get(9),
    }
}

impl Store {
    /// Records a dead letter; false when `dedupe_key` says it is already recorded.
    pub async fn record_dead_letter(
        &self,
        letter: &DeadLetterRow,
        dedupe_key: Option<&str>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO dead_letters (id, reason, detail, source_queue, run_id, node_id, attempt, body, dedupe_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (dedupe_key) DO NOTHING",
                &[
                    &letter.id,
                    &letter.reason,
                    &letter.detail,
                    &letter.source_queue,
                    &letter.run_id,
                    &letter.node_id,
                    &letter.attempt,
                    &letter.body,
                    &dedupe_key,
                ],
            )
            .await?;
        Ok(inserted == 1)
    }

    /// Dead letters, newest first; replayed ones only when asked.
    pub async fn list_dead_letters(
        &self,
        include_replayed: bool,
        limit: i64,
    ) -> Result<Vec<DeadLetterRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM dead_letters WHERE $1 OR replayed_at IS NULL
                     ORDER BY created_at DESC LIMIT $2"
                ),
                &[&include_replayed, &limit],
            )
            .await?;
        Ok(rows.iter().map(row_to_letter).collect())
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetterRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(row_to_letter))
    }

    /// Marks a dead letter replayed; false when it already was.
    pub async fn mark_replayed(&self, id: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE dead_letters SET replayed_at = now() WHERE id = $1 AND replayed_at IS NULL",
                &[&id],
            )
            .await?;
        Ok(changed == 1)
    }
}
