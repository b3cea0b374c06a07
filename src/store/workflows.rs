//! The `workflows` table: one row per applied version.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use super::{Store, StoreError};
use crate::workflow::Workflow;

/// What `apply` did.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedWorkflow {
    /// Workflow name.
    pub name: String,
    /// The version now current.
    pub version: i32,
    /// False when the definition equals the latest stored version (nothing written).
    pub created: bool,
}

/// One line of `dagq workflow list`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowSummary {
    /// Workflow name.
    pub name: String,
    /// Latest version.
    pub version: i32,
    /// Number of nodes in the latest version.
    pub nodes: i64,
    /// Event types that trigger it.
    pub triggers: Vec<String>,
    /// When the latest version was applied.
    pub created_at: DateTime<Utc>,
}

/// Arbitrary constant naming the advisory lock that serialises version numbering.
const APPLY_LOCK: i64 = 0x0064_6167_7161_7070;

impl Store {
    /// Stores a validated workflow as a new version unless it equals the latest one.
    pub async fn apply_workflow(&self, workflow: &Workflow) -> Result<AppliedWorkflow, StoreError> {
        let definition =
            serde_json::to_value(&workflow.def).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let queues: Vec<String> = workflow.queues().into_iter().collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPLY_LOCK])
            .await?;
        let latest = tx
            .query_opt(
                "SELECT version, definition FROM workflows WHERE name = $1
                 ORDER BY version DESC LIMIT 1",
                &[&workflow.name()],
            )
            .await?;
        if let Some(row) = &latest {
            let stored: Value = row.get(1);
            if stored == definition {
                return Ok(AppliedWorkflow {
                    name: workflow.name().to_owned(),
                    version: row.get(0),
                    created: false,
                });
            }
        }
        let version = latest.map_or(1, |row| row.get::<_, i32>(0) + 1);
        tx.execute(
            "INSERT INTO workflows (name, version, definition, queues) VALUES ($1, $2, $3, $4)",
            &[&workflow.name(), &version, &definition, &queues],
        )
        .await?;
        tx.commit().await?;
        Ok(AppliedWorkflow {
            name: workflow.name().to_owned(),
            version,
            created: true,
        })
    }

    /// One stored version's definition, `None` when it does not exist.
    pub async fn workflow_definition(
        &self,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<(i32, Value)>, StoreError> {
        let client = self.client().await?;
        definition(&client, name, version).await
    }

    /// (name, latest version) of every workflow whose versions an event of `event_type`
    /// may trigger. Only names and numbers: the engine keeps parsed versions cached.
    pub async fn workflows_triggered_by(
        &self,
        event_type: &str,
    ) -> Result<Vec<(String, i32)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT DISTINCT ON (name) name, version FROM workflows
                 WHERE name IN (
                     SELECT name FROM workflows
                     WHERE definition->'triggers' @> jsonb_build_array(jsonb_build_object('event', $1::text)))
                 ORDER BY name, version DESC",
            )
            .await?;
        let rows = client.query(&stmt, &[&event_type]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The latest version number of a workflow, `None` when it is not applied.
    pub async fn latest_version(&self, name: &str) -> Result<Option<i32>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT max(version) FROM workflows WHERE name = $1")
            .await?;
        Ok(client.query_one(&stmt, &[&name]).await?.get(0))
    }

    /// Latest versions, for `dagq workflow list`.
    pub async fn list_workflows(&self) -> Result<Vec<WorkflowSummary>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT DISTINCT ON (name) name, version,
                        jsonb_array_length(definition->'nodes')::bigint,
                        coalesce((SELECT array_agg(t->>'event') FROM jsonb_array_elements(definition->'triggers') t), '{}'),
                        created_at
                 FROM workflows ORDER BY name, version DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| WorkflowSummary {
                name: r.get(0),
                version: r.get(1),
                nodes: r.get(2),
                triggers: r.get(3),
                created_at: r.get(4),
            })
            .collect())
    }

    /// Every task queue any stored workflow version uses.
    pub async fn known_queues(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT DISTINCT unnest(queues) AS q FROM workflows ORDER BY q",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// A workflow's definition (the latest version when `version` is `None`), read through
/// `client`: a pooled connection, or a transaction in progress.
pub(crate) async fn definition(
    client: &impl GenericClient,
    name: &str,
    version: Option<i32>,
) -> Result<Option<(i32, Value)>, StoreError> {
    let row = client
        .query_opt(
            "SELECT version, definition FROM workflows
             WHERE name = $1 AND ($2::int IS NULL OR version = $2)
             ORDER BY version DESC LIMIT 1",
            &[&name, &version],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}
