//! Reading queue figures from the broker (ready messages and consumers), for the backlog
//! poller and `dagq top`.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{BrokerError, Topology};

/// What the broker says about one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not counting those delivered and unacked).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// A channel that counts the queues of one namespace.
#[derive(Debug)]
pub struct QueueProbe {
    channel: Channel,
    topology: Topology,
}

impl QueueProbe {
    /// Opens a channel and declares the namespace's exchanges and base queues, as every
    /// publisher does (idempotent): a passive declaration of a missing queue would
    /// close the channel, so counting never meets one.
    pub async fn open(
        connection: &Connection,
        topology: Topology,
    ) -> Result<QueueProbe, BrokerError> {
        let channel = connection.create_channel().await?;
        topology.declare_base(&channel).await?;
        Ok(QueueProbe { channel, topology })
    }

    /// Whether the channel still works.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// The task queue `queue` (the short name), declared first as its publishers would:
    /// a queue no worker serves yet holds what is published to it.
    pub async fn task_queue(&self, queue: &str) -> Result<QueueCounts, BrokerError> {
        self.topology
            .declare_task_queue(&self.channel, queue)
            .await?;
        self.count(&self.topology.task_queue(queue)).await
    }

    /// The trigger queue.
    pub async fn triggers(&self) -> Result<QueueCounts, BrokerError> {
        self.count(&self.topology.triggers_queue()).await
    }

    /// The dead-letter queue.
    pub async fn dead(&self) -> Result<QueueCounts, BrokerError> {
        self.count(&self.topology.dead_queue()).await
    }

    async fn count(&self, name: &str) -> Result<QueueCounts, BrokerError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = self
            .channel
            .queue_declare(name.into(), passive, FieldTable::default())
            .await?;
        Ok(QueueCounts {
            ready: declared.message_count(),
            consumers: declared.consumer_count(),
        })
    }

    /// Closes the channel.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}
