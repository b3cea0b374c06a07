//! `dagq bench`: throughput, latency and overhead measured on this machine, in a fresh
//! namespace and database that are removed afterwards. Figures are printed, never
//! asserted: the machine is shared and noisy, so compare medians of several runs.

mod adapter;
mod diamond;
mod env;
mod limit;
mod stats;

pub use adapter::{AdapterBench, AdapterReport, bench_adapter};
pub use diamond::{DiamondBench, DiamondReport, bench_diamond, bench_latency};
pub use limit::{LimitReport, bench_limit};

/// The ceiling `dagq bench limit` measured last on this machine, if it ran.
pub fn saved_ceiling() -> Option<f64> {
    limit::saved_ceiling()
}

use crate::broker::BrokerError;
use crate::store::StoreError;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A worker process or the mock could not start, or a run never finished.
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    /// A benchmark is run by hand; nothing about it is retried automatically.
    pub fn is_retryable(&self) -> bool {
        match self {
            BenchError::Store(_) | BenchError::Broker(_) | BenchError::Setup(_) => false,
        }
    }
}

impl From<tokio_postgres::Error> for BenchError {
    fn from(e: tokio_postgres::Error) -> Self {
        BenchError::Store(StoreError::from(e))
    }
}

impl From<lapin::Error> for BenchError {
    fn from(e: lapin::Error) -> Self {
        BenchError::Broker(BrokerError::from(e))
    }
}
