//! RabbitMQ: the connection, the namespaced topology, publishing with confirms, and
//! consuming with bounded prefetch. RabbitMQ only carries work; Postgres holds state.

mod inspect;
mod publisher;
mod topology;

use lapin::{Connection, ConnectionProperties};

pub use inspect::{QueueCounts, QueueProbe};
pub use publisher::{BURST_HEADER, DeadLetter, Publisher, burst_of, headers};
pub use topology::{MAX_PRIORITY, RETRY_TIERS, Topology, bind_private_queue, retry_tier};

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Could not connect, or the connection or channel broke.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused a message (nack): it was not stored.
    #[error("RabbitMQ did not accept a message for exchange {exchange} (key {key})")]
    Nacked { exchange: String, key: String },
    /// A mandatory message matched no queue and came back.
    #[error(
        "RabbitMQ returned a message for exchange {exchange} (key {key}) as unroutable: {reply}"
    )]
    Unroutable {
        exchange: String,
        key: String,
        reply: String,
    },
}

impl BrokerError {
    /// Every broker failure is worth another try once the connection is back; an
    /// unroutable message is retried after redeclaring topology.
    pub fn is_retryable(&self) -> bool {
        match self {
            BrokerError::Amqp(_) | BrokerError::Nacked { .. } | BrokerError::Unroutable { .. } => {
                true
            }
        }
    }
}

/// Opens a connection named after the process role, so operators can tell them apart in
/// the management UI.
pub async fn connect(url: &str, role: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("dagq {role} (pid {})", std::process::id()).into());
    Ok(Connection::connect(url, properties).await?)
}
