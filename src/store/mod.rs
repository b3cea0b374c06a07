//! Postgres: the source of truth. The pool, migrations, and the queries of each table.

pub(crate) mod advance;
mod backlog;
pub(crate) mod control;
mod dead_letters;
mod migrate;
pub(crate) mod model_calls;
pub(crate) mod nodes;
pub(crate) mod runs;
pub(crate) mod workflows;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub use backlog::{Election, QueueNodes};
pub use dead_letters::DeadLetterRow;
pub use nodes::{Claim, NodeOutput, QueuedTask, RunContext};
pub use runs::{
    NewRun, NodeStatus, RunFilter, RunStatus, RunSummary, StartedRun, Totals, TransitionRow,
};
pub use workflows::{AppliedWorkflow, WorkflowSummary};

/// A database failure, classified for the caller's retry decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had from the pool (database down, pool exhausted).
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The database address is unusable.
    #[error("DAGQ_DATABASE_URL is not usable: {0}")]
    Url(String),
    /// A row the caller named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Stored data that dagq cannot read back (e.g. a workflow from a newer version).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether trying again later can succeed: lost connections, deadlocks and
    /// serialization failures can; constraint violations and missing rows cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Db(e) => match e.code() {
                None => true, // I/O or closed connection: no SQLSTATE
                Some(code) => {
                    let code = code.code();
                    // 08: connection exception, 40: transaction rollback (deadlock,
                    // serialization), 53: insufficient resources, 57P: admin shutdown.
                    code.starts_with("08")
                        || code.starts_with("40")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                }
            },
            StoreError::Url(_) | StoreError::NotFound(_) | StoreError::Corrupt(_) => false,
        }
    }
}

/// The connection pool and every query dagq makes.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Opens a pool of at most `max_size` connections. Connections are made lazily, so
    /// this succeeds even while the database is down.
    pub fn connect(url: &str, max_size: usize) -> Result<Self, StoreError> {
        let config =
            tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            // The most recently used connection first: under light load a few hot
            // connections serve everything, with warm caches and prepared statements
            // past their custom-plan phase. FIFO would rotate through every connection.
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        Ok(Store { pool })
    }

    /// Closes the pool: its connections end now, before, say, their database is
    /// dropped under them.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Creates the database if it is missing, then applies pending migrations.
    pub async fn migrate(url: &str) -> Result<Vec<String>, StoreError> {
        migrate::create_database_if_missing(url).await?;
        let store = Store::connect(url, 1)?;
        migrate::apply(&store).await
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}
