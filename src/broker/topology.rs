//! Names and declarations of every exchange and queue, all under one namespace so that
//! deployments and tests can share a broker. Declarations are idempotent.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;

/// Highest message priority; task and trigger queues are declared with it.
pub const MAX_PRIORITY: u8 = 9;

/// Delays of the retry queues. Each queue has one TTL, so that no message waits behind a
/// longer one (per-message TTLs only expire at the head of a queue); a retry waits in the
/// shortest tier at least as long as its delay.
pub const RETRY_TIERS: &[Duration] = &[
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(900),
    Duration::from_secs(3600),
];

/// The tier a retry after `delay` waits in: the shortest at least as long, or the longest.
pub fn retry_tier(delay: Duration) -> Duration {
    RETRY_TIERS
        .iter()
        .copied()
        .find(|tier| *tier >= delay)
        .unwrap_or(RETRY_TIERS[RETRY_TIERS.len() - 1])
}

fn tier_name(tier: Duration) -> String {
    humantime::format_duration(tier)
        .to_string()
        .replace(' ', "")
}

/// The namespaced names of dagq's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    /// Names under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Topology {
            namespace: namespace.to_owned(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Topic exchange producers publish events to (routing key = event type).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// Queue of events that may start runs.
    pub fn triggers_queue(&self) -> String {
        format!("{}.triggers", self.namespace)
    }

    /// Direct exchange of task messages (routing key = task queue name).
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.namespace)
    }

    /// The broker queue behind the task queue `queue`.
    pub fn task_queue(&self, queue: &str) -> String {
        format!("{}.tasks.{queue}", self.namespace)
    }

    /// Fanout exchange of dead letters.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Queue that keeps dead letters until the dead-letter consumer records them.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Fanout exchange that tells every worker at once that something changed (a
    /// breaker opened or closed); each worker binds a private queue to it.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.namespace)
    }

    /// Fanout exchange of one retry tier. Messages keep the routing key they were
    /// published with (the task queue), which is what their expiry dead-letters them by.
    pub fn retry_exchange(&self, tier: Duration) -> String {
        format!("{}.retry.{}", self.namespace, tier_name(tier))
    }

    /// Queue of one retry tier: messages wait there for the tier's TTL.
    pub fn retry_queue(&self, tier: Duration) -> String {
        self.retry_exchange(tier)
    }

    /// Declares the exchanges, the trigger queue, the retry tiers and the dead-letter
    /// queue.
    pub async fn declare_base(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (self.events_exchange(), ExchangeKind::Topic),
            (self.tasks_exchange(), ExchangeKind::Direct),
            (self.dead_exchange(), ExchangeKind::Fanout),
            (self.control_exchange(), ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        declare_queue(channel, &self.triggers_queue(), priority_args()).await?;
        bind(
            channel,
            &self.triggers_queue(),
            &self.events_exchange(),
            "#",
        )
        .await?;
        declare_queue(channel, &self.dead_queue(), FieldTable::default()).await?;
        bind(channel, &self.dead_queue(), &self.dead_exchange(), "").await?;
        for tier in RETRY_TIERS {
            let exchange = self.retry_exchange(*tier);
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await?;
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(tier.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.tasks_exchange().as_str().into()),
            );
            declare_queue(channel, &self.retry_queue(*tier), args).await?;
            bind(channel, &self.retry_queue(*tier), &exchange, "").await?;
        }
        Ok(())
    }

    /// Declares one task queue and binds it to the tasks exchange. Messages wait there
    /// even while no worker serves the queue.
    pub async fn declare_task_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<(), BrokerError> {
        let name = self.task_queue(queue);
        declare_queue(channel, &name, priority_args()).await?;
        bind(channel, &name, &self.tasks_exchange(), queue).await
    }

    /// Deletes the namespace's exchanges and the named task queues (for tests and benches
    /// that made a namespace of their own).
    pub async fn delete(
        &self,
        channel: &Channel,
        task_queues: &[String],
    ) -> Result<(), BrokerError> {
        let mut queues = vec![self.triggers_queue(), self.dead_queue()];
        queues.extend(task_queues.iter().map(|q| self.task_queue(q)));
        queues.extend(RETRY_TIERS.iter().map(|t| self.retry_queue(*t)));
        for queue in queues {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
        }
        let mut exchanges = vec![
            self.events_exchange(),
            self.tasks_exchange(),
            self.dead_exchange(),
            self.control_exchange(),
        ];
        exchanges.extend(RETRY_TIERS.iter().map(|t| self.retry_exchange(*t)));
        for exchange in exchanges {
            channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// Declares a queue private to this connection (server-named, gone with it) bound to a
/// fanout `exchange`, and returns its name: a copy of everything the exchange carries.
pub async fn bind_private_queue(
    channel: &Channel,
    exchange: &str,
) -> Result<lapin::types::ShortString, BrokerError> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await?;
    bind(channel, queue.name().as_str(), exchange, "").await?;
    Ok(queue.name().clone())
}

fn priority_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await?;
    Ok(())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_in_the_shortest_tier_long_enough() {
        assert_eq!(
            retry_tier(Duration::from_millis(10)),
            Duration::from_millis(250)
        );
        assert_eq!(
            retry_tier(Duration::from_millis(1500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_tier(Duration::from_secs(7200)),
            Duration::from_secs(3600)
        );
        let topology = Topology::new("ns");
        assert_eq!(
            topology.retry_queue(Duration::from_millis(250)),
            "ns.retry.250ms"
        );
        assert_eq!(
            topology.retry_queue(Duration::from_secs(120)),
            "ns.retry.2m"
        );
    }
}
