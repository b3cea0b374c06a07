//! Group commit for the outcomes of model and HTTP tasks. Their calls end at their own
//! pace, each wanting a transaction; recorded one by one, tasks of one run queue on the
//! run's lock while holding pool connections, and every task pays a commit. Here each
//! finished task hands its outcome to a committer, which records whatever has gathered
//! in one transaction (see `batch.rs`) while at most a few such transactions run.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::batch::Outcome;
use super::{Engine, EngineError, Handled};

/// Transactions of gathered outcomes in flight at once. Few: while they are busy, the
/// next outcomes gather into larger groups.
const COMMITS_AT_ONCE: usize = 2;

/// The most outcomes recorded in one transaction.
const MAX_GROUP: usize = 128;

struct Job {
    outcome: Outcome,
    reply: oneshot::Sender<Result<Handled, EngineError>>,
}

/// The handle through which finished tasks reach the committer. The committer stops
/// once every handle is gone.
#[derive(Debug, Clone)]
pub(super) struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl GroupCommit {
    /// Starts a committer that records through `engine` (which must not itself hold a
    /// `GroupCommit`, or the committer would keep itself alive).
    pub(super) fn start(engine: Engine) -> Self {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let slots = Arc::new(Semaphore::new(COMMITS_AT_ONCE));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = queue.recv().await else {
                    return;
                };
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match queue.try_recv() {
                        Ok(job) => group.push(job),
                        Err(_) => break,
                    }
                }
                let engine = engine.clone();
                tokio::spawn(async move {
                    commit(&engine, group).await;
                    drop(slot);
                });
            }
        });
        GroupCommit { jobs }
    }

    /// Records `outcome` with whatever else is finishing, and publishes what it caused.
    pub(super) async fn finish(
        &self,
        engine: &Engine,
        outcome: Outcome,
    ) -> Result<Handled, EngineError> {
        let (reply, answer) = oneshot::channel();
        if let Err(refused) = self.jobs.send(Job { outcome, reply }) {
            // The committer has stopped (shutdown): record this one alone.
            let outcome = refused.0.outcome;
            let mut results = engine.finish_batch(std::slice::from_ref(&outcome)).await?;
            return results.pop().expect("one result per outcome");
        }
        answer.await.unwrap_or_else(|_| {
            Err(EngineError::Interrupted(
                "the committer stopped before recording this outcome".into(),
            ))
        })
    }
}

/// Records a group in one transaction; when that fails for good, each outcome alone, so
/// that one bad outcome cannot fail the others.
async fn commit(engine: &Engine, group: Vec<Job>) {
    let (outcomes, replies): (Vec<Outcome>, Vec<_>) =
        group.into_iter().map(|j| (j.outcome, j.reply)).unzip();
    match engine.finish_batch(&outcomes).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, size = outcomes.len(), "a group commit failed; recording its outcomes one by one");
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                let result = match engine.finish_batch(std::slice::from_ref(&outcome)).await {
                    Ok(mut results) => results.pop().expect("one result per outcome"),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
    }
}
