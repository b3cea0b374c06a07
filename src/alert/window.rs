//! The per-subject window in `alerts_sent`: which worker sends an alert, and how many
//! were suppressed before it, decided by Postgres so that every worker agrees.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::{Store, StoreError};

/// This caller won the window: it sends.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    /// Alerts of the subject suppressed since the previous one sent.
    pub(super) suppressed_before: i32,
    /// When the window started, by the database clock.
    pub(super) sent_at: DateTime<Utc>,
}

/// Takes the window of `subject` when the previous alert is older than `window`, or
/// counts this alert as suppressed. `None` when suppressed.
pub(super) async fn claim(
    store: &Store,
    subject: &str,
    window: Duration,
) -> Result<Option<Claim>, StoreError> {
    let client = store.client().await?;
    // One statement decides, whichever worker runs it: the sub-select locks the row (and
    // in READ COMMITTED returns its latest version), so the decision and the count it
    // reports are those of the row being updated, and `RETURNING prev.*` gives the count
    // from before the reset, which a plain upsert cannot return.
    let decide = client
        .prepare_cached(
            "UPDATE alerts_sent a
                SET last_sent_at = CASE WHEN prev.due THEN now() ELSE a.last_sent_at END,
                    suppressed   = CASE WHEN prev.due THEN 0 ELSE a.suppressed + 1 END
               FROM (SELECT subject, suppressed,
                            last_sent_at < now() - make_interval(secs => $2) AS due
                       FROM alerts_sent WHERE subject = $1 FOR UPDATE) prev
              WHERE a.subject = prev.subject
          RETURNING prev.due, prev.suppressed, a.last_sent_at",
        )
        .await?;
    let first = client
        .prepare_cached(
            "INSERT INTO alerts_sent (subject, last_sent_at, suppressed) VALUES ($1, now(), 0)
             ON CONFLICT (subject) DO NOTHING
             RETURNING last_sent_at",
        )
        .await?;
    let seconds = window.as_secs_f64();
    // The first alert of a subject inserts its row; when another worker inserted it
    // meanwhile, the row now exists and the second update decides.
    for _ in 0..2 {
        if let Some(row) = client.query_opt(&decide, &[&subject, &seconds]).await? {
            let due: bool = row.get(0);
            return Ok(due.then(|| Claim {
                suppressed_before: row.get(1),
                sent_at: row.get(2),
            }));
        }
        if let Some(row) = client.query_opt(&first, &[&subject]).await? {
            return Ok(Some(Claim {
                suppressed_before: 0,
                sent_at: row.get(0),
            }));
        }
    }
    Err(StoreError::NotFound(format!(
        "the alerts_sent row of {subject:?} was deleted while deciding whether to send"
    )))
}
