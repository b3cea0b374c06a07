//! The `incidents` table: at most one open incident per subject, whatever the number of
//! workers that see the failure.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::store::{Store, StoreError};

/// An incident just opened, as posted to the incident webhook.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct OpenedIncident {
    pub(super) id: Uuid,
    pub(super) subject: String,
    pub(super) profile: Option<String>,
    pub(super) detail: String,
    pub(super) opened_at: DateTime<Utc>,
}

/// Opens an incident for `subject` unless one is open; `None` when one was.
pub(super) async fn insert_open(
    store: &Store,
    subject: &str,
    profile: Option<&str>,
    detail: &str,
) -> Result<Option<OpenedIncident>, StoreError> {
    let client = store.client().await?;
    // The partial unique index decides between racing workers: the loser waits for the
    // winner's commit and then does nothing.
    let stmt = client
        .prepare_cached(
            "INSERT INTO incidents (id, subject, profile, detail) VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject) WHERE resolved_at IS NULL DO NOTHING
             RETURNING created_at",
        )
        .await?;
    let id = Uuid::now_v7();
    let row = client
        .query_opt(&stmt, &[&id, &subject, &profile, &detail])
        .await?;
    Ok(row.map(|row| OpenedIncident {
        id,
        subject: subject.to_owned(),
        profile: profile.map(str::to_owned),
        detail: detail.to_owned(),
        opened_at: row.get(0),
    }))
}

/// Records what the ticket system answered for incident `id`.
pub(super) async fn set_external_ref(
    store: &Store,
    id: Uuid,
    external_ref: &str,
) -> Result<(), StoreError> {
    let client = store.client().await?;
    let stmt = client
        .prepare_cached("UPDATE incidents SET external_ref = $2 WHERE id = $1")
        .await?;
    client.execute(&stmt, &[&id, &external_ref]).await?;
    Ok(())
}

/// Resolves the open incident of `subject`; false when none was open.
pub(super) async fn resolve(store: &Store, subject: &str) -> Result<bool, StoreError> {
    let client = store.client().await?;
    let stmt = client
        .prepare_cached(
            "UPDATE incidents SET resolved_at = now() WHERE subject = $1 AND resolved_at IS NULL",
        )
        .await?;
    Ok(client.execute(&stmt, &[&subject]).await? > 0)
}
