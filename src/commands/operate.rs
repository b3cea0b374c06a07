//! `dagq retry`, `dagq cancel` and `dagq dlq`: operator commands that act through the
//! engine, so they follow the same state machine and publish with the same guarantees.

use std::fmt::Write;
use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use super::{CommandError, Progress};
use crate::adapter::Registry;
use crate::adapter::breaker::BreakerState;
use crate::alert::Alerter;
use crate::broker::{self, Publisher, Topology};
use crate::config::Settings;
use crate::engine::Engine;
use crate::store::{DeadLetterRow, Store};

/// An engine over fresh connections, for one command.
pub struct OperatorSession {
    connection: lapin::Connection,
    /// The engine.
    pub engine: Engine,
    /// The store.
    pub store: Store,
}

impl std::fmt::Debug for OperatorSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSession").finish_non_exhaustive()
    }
}

impl OperatorSession {
    /// Connects to both services.
    pub async fn open(settings: &Settings) -> Result<Self, CommandError> {
        Store::migrate(&settings.database_url).await?;
        let store = Store::connect(&settings.database_url, 2)?;
        let connection = broker::connect(&settings.amqp_url, "cli").await?;
        let publisher =
            Arc::new(Publisher::open(&connection, Topology::new(&settings.namespace)).await?);
        let alerter = Alerter::new(settings.file.alerts.clone(), store.clone());
        let engine = Engine::new(store.clone(), publisher, Registry::new(&settings.file))
            .with_alerter(alerter);
        Ok(OperatorSession {
            connection,
            engine,
            store,
        })
    }

    /// Closes the broker connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }

    /// `dagq retry`.
    pub async fn retry(
        &self,
        run_id: Uuid,
        node: Option<&str>,
        input: Option<Value>,
    ) -> Result<String, CommandError> {
        let reset = self.engine.retry_run(run_id, node, input).await?;
        Ok(format!("run {run_id}: {reset} node(s) queued again"))
    }

    /// `dagq cancel`.
    pub async fn cancel(&self, run_id: Uuid) -> Result<String, CommandError> {
        self.engine.cancel_run(run_id).await?;
        Ok(format!("run {run_id} cancelled"))
    }

    /// `dagq breaker reset`.
    pub async fn reset_breaker(&self, profile: &str) -> Result<String, CommandError> {
        if self.engine.reset_breaker(profile).await? {
            Ok(format!(
                "breaker of {profile} closed; workers resume its queue"
            ))
        } else {
            Err(CommandError::NotFound(format!(
                "profile {profile} has no breaker yet (it never failed); `dagq breaker list` lists them"
            )))
        }
    }

    /// `dagq dlq replay ID…` or `--all` (every dead letter not yet replayed).
    pub async fn replay(&self, ids: &[Uuid], all: bool) -> Result<Vec<String>, CommandError> {
        let ids: Vec<Uuid> = if all {
            self.store
                .list_dead_letters(false, i64::MAX)
                .await?
                .into_iter()
                .rev()
                .map(|l| l.id)
                .collect()
        } else {
            ids.to_vec()
        };
        let mut progress = Progress::new("replaying dead letters", ids.len() as u64);
        let mut lines = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            lines.push(self.engine.replay_dead_letter(*id).await?);
            progress.set(i as u64 + 1, ids.len() as u64);
        }
        progress.finish();
        Ok(lines)
    }
}

/// `dagq dlq list` as a table.
pub fn format_dead_letters(letters: &[DeadLetterRow]) -> String {
    let mut out = format!(
        "{:<36}  {:<17} {:<19} {:<9} DETAIL\n",
        "ID", "REASON", "CREATED", "REPLAYED"
    );
    for l in letters {
        let detail = super::clip(l.detail.as_deref(), 100);
        let _ = writeln!(
            out,
            "{:<36}  {:<17} {:<19} {:<9} {}",
            l.id,
            l.reason,
            l.created_at.format("%Y-%m-%d %H:%M:%S"),
            if l.replayed_at.is_some() { "yes" } else { "no" },
            detail
        );
    }
    out
}

/// `dagq breaker list` as a table.
pub fn format_breakers(breakers: &[BreakerState]) -> String {
    let mut out = format!(
        "{:<20} {:<10} {:>8} {:<19} LAST ERROR\n",
        "PROFILE", "STATE", "FAILURES", "OPENED"
    );
    for b in breakers {
        let error = super::clip(b.last_error.as_deref(), 80);
        let opened = b
            .opened_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8} {:<19} {error}",
            b.profile, b.state, b.consecutive_failures, opened
        );
    }
    out
}
