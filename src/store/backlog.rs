//! Backlog figures from `node_runs` (nodes queued, running and retrying per task queue,
//! and the age of the oldest queued one), and the advisory lock that elects the one
//! worker that polls them.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_postgres::NoTls;

use super::{Store, StoreError};

/// The nodes of one task queue that are not finished.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueNodes {
    /// Task queue (the short name, as in workflows and metric labels).
    pub queue: String,
    /// Waiting in `queued`: published, not yet claimed.
    pub queued: i64,
    /// In flight: claimed by a worker.
    pub running: i64,
    /// Waiting in a retry tier for their next attempt.
    pub retrying: i64,
    /// Seconds the oldest `queued` node has waited; 0 when none waits.
    pub oldest_queued_seconds: f64,
}

/// Every task queue a stored workflow names, and any other queue with live nodes, with
/// their live node counts (the partial index `node_runs_live` serves the counts).
pub(crate) async fn queue_nodes(
    client: &impl GenericClient,
) -> Result<Vec<QueueNodes>, StoreError> {
    let rows = client
        .query(
            "WITH known AS (SELECT DISTINCT unnest(queues) AS queue FROM workflows),
                  live AS (
                      SELECT queue,
                             count(*) FILTER (WHERE state = 'queued') AS queued,
                             count(*) FILTER (WHERE state = 'running') AS running,
                             count(*) FILTER (WHERE state = 'retrying') AS retrying,
                             min(queued_at) FILTER (WHERE state = 'queued') AS oldest
                      FROM node_runs WHERE state IN ('queued', 'running', 'retrying')
                      GROUP BY queue)
             SELECT COALESCE(k.queue, l.queue), COALESCE(l.queued, 0), COALESCE(l.running, 0),
                    COALESCE(l.retrying, 0),
                    COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - l.oldest), 0)::float8
             FROM known k FULL JOIN live l ON l.queue = k.queue
             ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| QueueNodes {
            queue: r.get(0),
            queued: r.get(1),
            running: r.get(2),
            retrying: r.get(3),
            oldest_queued_seconds: r.get::<_, f64>(4).max(0.0),
        })
        .collect())
}

/// Whether each known profile's breaker is not closed (open, or in its trial call).
pub(crate) async fn breakers_not_closed(
    client: &impl GenericClient,
) -> Result<Vec<(String, bool)>, StoreError> {
    let rows = client
        .query(
            "SELECT profile, state <> 'closed' FROM breakers ORDER BY profile",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

impl Store {
    /// Live node counts per task queue (see [`QueueNodes`]).
    pub async fn queue_nodes(&self) -> Result<Vec<QueueNodes>, StoreError> {
        queue_nodes(&**self.client().await?).await
    }

    /// Whether each known profile's breaker is not closed.
    pub async fn breakers_not_closed(&self) -> Result<Vec<(String, bool)>, StoreError> {
        breakers_not_closed(&**self.client().await?).await
    }
}

/// A dedicated connection on which a worker runs for a session-level advisory lock and,
/// once it won, holds it: whoever holds it leads. Postgres frees the lock when the
/// session ends, so a dead leader's lock goes with its connection and another worker's
/// next try wins.
#[derive(Debug)]
pub struct Election {
    client: tokio_postgres::Client,
}

impl Election {
    /// Opens the dedicated connection.
    pub async fn connect(url: &str) -> Result<Election, StoreError> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
        config
            .connect_timeout(Duration::from_secs(5))
            .application_name("dagq backlog poller");
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "the backlog poller's database connection ended");
            }
        });
        Ok(Election { client })
    }

    /// Tries to take the lock named `name` without waiting; true when this session holds
    /// it now. Call it only while not leading: each success counts once more.
    pub async fn try_lead(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&name])
            .await?
            .get(0))
    }

    /// Whether the connection, and so any lock it held, is gone.
    pub fn is_lost(&self) -> bool {
        self.client.is_closed()
    }

    /// Live node counts per task queue, on this connection.
    pub async fn queue_nodes(&self) -> Result<Vec<QueueNodes>, StoreError> {
        queue_nodes(&self.client).await
    }

    /// Whether each known profile's breaker is not closed, on this connection.
    pub async fn breakers_not_closed(&self) -> Result<Vec<(String, bool)>, StoreError> {
        breakers_not_closed(&self.client).await
    }
}
