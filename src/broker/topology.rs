//! Names and declarations of every exchange and queue, all under one namespace so that
//! deployments and tests can share a broker. Declarations are idempotent.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;

/// Highest message priority; task and trigger queues are declared with it.
pub const MAX_PRIORITY: u8 = 9;

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

    /// Declares the exchanges, the trigger queue and the dead-letter queue.
    pub async fn declare_base(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (self.events_exchange(), ExchangeKind::Topic),
            (self.tasks_exchange(), ExchangeKind::Direct),
            (self.dead_exchange(), ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        declare_queue(channel, &self.triggers_queue(), priority_args()).await?;
        bind(channel, &self.triggers_queue(), &self.events_exchange(), "#").await?;
        declare_queue(channel, &self.dead_queue(), FieldTable::default()).await?;
        bind(channel, &self.dead_queue(), &self.dead_exchange(), "").await?;
        Ok(())
    }

    /// Declares one task queue and binds it to the tasks exchange. Messages wait there
    /// even while no worker serves the queue.
    pub async fn declare_task_queue(&self, channel: &Channel, queue: &str) -> Result<(), BrokerError> {
        let name = self.task_queue(queue);
        declare_queue(channel, &name, priority_args()).await?;
        bind(channel, &name, &self.tasks_exchange(), queue).await
    }

    /// Deletes the namespace's exchanges and the named task queues (for tests and benches
    /// that made a namespace of their own).
    pub async fn delete(&self, channel: &Channel, task_queues: &[String]) -> Result<(), BrokerError> {
        let mut queues = vec![self.triggers_queue(), self.dead_queue()];
        queues.extend(task_queues.iter().map(|q| self.task_queue(q)));
        for queue in queues {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [self.events_exchange(), self.tasks_exchange(), self.dead_exchange()] {
            channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn priority_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(MAX_PRIORITY));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await?;
    Ok(())
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
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
