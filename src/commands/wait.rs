//! Waiting for a run started by an event to finish.

use std::time::{Duration, Instant};

use super::{CommandError, Progress};
use crate::store::{RunStatus, Store};

/// Polls Postgres until the run that event `(source, id)` started is finished, showing
/// progress when asked. Times out after `timeout`.
pub async fn wait_for_run(
    store: &Store,
    source: &str,
    event_id: &str,
    timeout: Duration,
    show_progress: bool,
) -> Result<RunStatus, CommandError> {
    let deadline = Instant::now() + timeout;
    let mut progress = show_progress.then(|| Progress::new("waiting for the run", 1));
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(run) = store
            .run_for_event(source, event_id)
            .await?
            .into_iter()
            .next()
        {
            let status = store
                .run_status(run.id)
                .await?
                .ok_or_else(|| CommandError::NotFound(format!("run {} vanished", run.id)))?;
            let total = status.nodes.len() as u64;
            let done = status.nodes.iter().filter(|n| is_final(&n.state)).count() as u64;
            if let Some(progress) = &mut progress {
                progress.set(done, total);
            }
            if status.run.state != "running" {
                if let Some(progress) = progress {
                    progress.finish();
                }
                return Ok(status);
            }
        }
        if Instant::now() >= deadline {
            return Err(CommandError::Timeout(format!(
                "the run of event {source}/{event_id} did not finish within {timeout:?}; \
                 is a worker running (`dagq worker`) in the same namespace?"
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Whether a node state is final.
pub(super) fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "skipped" | "cancelled")
}
