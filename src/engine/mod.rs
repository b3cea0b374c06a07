//! The engine: starting runs from events, processing node tasks with exactly-once
//! effects on at-least-once delivery (DESIGN §4), advancing the DAG, and the worker
//! process that consumes all of it.

mod batch;
mod breaker_events;
pub mod dag;
mod dead;
mod delivery;
mod finish;
mod group_commit;
pub mod messages;
mod operate;
mod publish;
mod redrive;
pub mod retry;
mod task;
mod trigger;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::adapter::Registry;
use crate::alert::Alerter;
use crate::broker::{BrokerError, Publisher};
use crate::store::{Store, StoreError};
use crate::workflow::Workflow;

pub use breaker_events::breaker_subject;
pub use messages::{Poison, RUN_REQUESTED, TaskMessage};
pub use worker::{Worker, WorkerOptions};

/// A failure to process a message that is not the message's fault: it is requeued.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// An operator asked for something that cannot be done.
    #[error("{0}")]
    Invalid(String),
    /// Processing stopped short of a settled outcome (a group's follow-ups were not
    /// published, a committer stopped): requeueing the message redoes or re-drives it.
    #[error("{0}")]
    Interrupted(String),
}

impl EngineError {
    /// Whether requeueing the message can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_retryable(),
            EngineError::Broker(e) => e.is_retryable(),
            EngineError::Invalid(_) => false,
            EngineError::Interrupted(_) => true,
        }
    }
}

/// What became of one delivery; the `outcome` label of the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Processed; the label says how (`completed`, `failed`, `started`, …).
    Done(&'static str),
    /// Unprocessable: dead-letter it with this reason.
    Poison(Poison),
}

/// Parsed workflow versions by (name, version).
type WorkflowCache = HashMap<(String, i32), Arc<Workflow>>;

/// Everything a worker needs to process messages; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    store: Store,
    publisher: Arc<Publisher>,
    adapters: Registry,
    alerter: Option<Alerter>,
    workflows: Arc<Mutex<WorkflowCache>>,
    /// Where model and HTTP tasks' outcomes are recorded together; `None` records each
    /// on its own.
    group_commit: Option<group_commit::GroupCommit>,
}

impl Engine {
    /// An engine over these connections.
    pub fn new(store: Store, publisher: Arc<Publisher>, adapters: Registry) -> Self {
        Engine {
            store,
            publisher,
            adapters,
            alerter: None,
            workflows: Arc::default(),
            group_commit: None,
        }
    }

    /// The same engine, recording the outcomes of tasks that finish together in one
    /// transaction (see `group_commit.rs`). For workers, which finish many at once.
    pub fn with_group_commit(mut self) -> Self {
        self.group_commit = Some(group_commit::GroupCommit::start(self.clone()));
        self
    }

    /// The same engine, sending alerts and opening incidents through `alerter`.
    pub fn with_alerter(mut self, alerter: Alerter) -> Self {
        self.alerter = Some(alerter);
        self
    }

    /// Closes a profile's breaker by hand, resolves its incident and tells every worker.
    /// Returns false when the profile never had a breaker.
    pub async fn reset_breaker(&self, profile: &str) -> Result<bool, EngineError> {
        let known = crate::adapter::breaker::reset(&self.store, profile).await?;
        if known {
            if let Some(alerter) = &self.alerter
                && let Err(e) = alerter.resolve_incident(&breaker_subject(profile)).await
            {
                tracing::warn!(error = %e, "cannot resolve the breaker's incident");
            }
            let body = serde_json::json!({"breaker": profile, "state": "closed"});
            self.publisher
                .publish_control(body.to_string().as_bytes())
                .await?;
        }
        Ok(known)
    }

    /// A stored workflow version, parsed once per process: versions never change.
    async fn workflow(
        &self,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Workflow>>, StoreError> {
        if let Some(found) = self.cached(&(name.to_owned(), version)) {
            return Ok(Some(found));
        }
        let client = self.store.client().await?;
        self.workflow_in(&client, name, version).await
    }

    /// The same, read through `client` on a miss: a transaction that holds locks reads
    /// it there rather than wait for a second connection.
    async fn workflow_in(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        name: &str,
        version: i32,
    ) -> Result<Option<Arc<Workflow>>, StoreError> {
        let key = (name.to_owned(), version);
        if let Some(found) = self.cached(&key) {
            return Ok(Some(found));
        }
        let Some((version, definition)) =
            crate::store::workflows::definition(client, name, Some(version)).await?
        else {
            return Ok(None);
        };
        let mut workflow = Workflow::from_json(&definition, None)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        workflow.version = version;
        let workflow = Arc::new(workflow);
        self.workflows
            .lock()
            .expect("workflow cache lock is never held across a panic")
            .insert(key, workflow.clone());
        Ok(Some(workflow))
    }

    fn cached(&self, key: &(String, i32)) -> Option<Arc<Workflow>> {
        self.workflows
            .lock()
            .expect("workflow cache lock is never held across a panic")
            .get(key)
            .cloned()
    }
}
