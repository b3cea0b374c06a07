//! Publishing with publisher confirms: a publish returns only once the broker has taken
//! responsibility for the message. Publishes are `mandatory`, so an unroutable message
//! is an error rather than silence, and whatever a publisher sends to is declared first
//! (once per process).

use std::collections::HashSet;
use std::sync::Mutex;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::{BrokerError, Topology};

/// Header of a task message published together with others to the same queue (the
/// children one finished node made ready): how many there are. A worker that gets one
/// waits a moment for the rest, so that they are processed in one transaction instead
/// of taking turns on their run's lock.
pub const BURST_HEADER: &str = "dagq-burst";

/// The burst a delivered task message came in (1 when it says nothing).
pub fn burst_of(properties: &BasicProperties) -> u32 {
    let key = ShortString::from(BURST_HEADER);
    match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&key))
    {
        Some(AMQPValue::LongUInt(n)) => *n,
        _ => 1,
    }
}

/// A message that could not be processed, with why, for `<ns>.dead`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Short machine-readable reason (`not_json`, `schema`, `unknown_workflow`, …).
    pub reason: String,
    /// Human-readable detail naming the problem.
    pub detail: String,
    /// Queue the message came from.
    pub source_queue: String,
    /// The original body, unchanged.
    pub body: Vec<u8>,
}

/// Header names carried by dead letters.
pub mod headers {
    /// Short reason code.
    pub const REASON: &str = "x-dagq-reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "x-dagq-detail";
    /// Queue the message was taken from.
    pub const SOURCE_QUEUE: &str = "x-dagq-source-queue";

    /// A string header of a received message.
    pub fn text(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
        let value = properties.headers().as_ref()?.inner().get(name)?.clone();
        match value {
            lapin::types::AMQPValue::LongString(s) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }
}

/// A confirm-mode channel plus the declarations it depends on.
#[derive(Debug)]
pub struct Publisher {
    channel: Channel,
    /// Declarations go through their own channel: a failed declaration closes its
    /// channel, which must not take in-flight publishes with it.
    declare: tokio::sync::Mutex<Channel>,
    declared: Mutex<HashSet<String>>,
    topology: Topology,
}

impl Publisher {
    /// Opens the channels and declares the namespace's base topology.
    pub async fn open(connection: &Connection, topology: Topology) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let declare = connection.create_channel().await?;
        topology.declare_base(&declare).await?;
        Ok(Publisher {
            channel,
            declare: tokio::sync::Mutex::new(declare),
            declared: Mutex::new(HashSet::new()),
            topology,
        })
    }

    /// The topology this publisher declares and publishes to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares a task queue unless this process already did.
    pub async fn ensure_task_queue(&self, queue: &str) -> Result<(), BrokerError> {
        if self.is_declared(queue) {
            return Ok(());
        }
        let channel = self.declare.lock().await;
        self.topology.declare_task_queue(&channel, queue).await?;
        self.declared
            .lock()
            .expect("declared-set lock is never held across a panic")
            .insert(queue.to_owned());
        Ok(())
    }

    fn is_declared(&self, queue: &str) -> bool {
        self.declared
            .lock()
            .expect("declared-set lock is never held across a panic")
            .contains(queue)
    }

    /// Publishes one task message to task queue `queue` and waits for its confirm.
    pub async fn publish_task(
        &self,
        queue: &str,
        body: &[u8],
        priority: u8,
    ) -> Result<(), BrokerError> {
        self.publish_task_in_burst(queue, body, priority, 1).await
    }

    /// Publishes one of `burst` task messages published to `queue` at once, saying so
    /// in [`BURST_HEADER`], and waits for its confirm.
    pub async fn publish_task_in_burst(
        &self,
        queue: &str,
        body: &[u8],
        priority: u8,
        burst: u32,
    ) -> Result<(), BrokerError> {
        self.ensure_task_queue(queue).await?;
        let mut properties = json_properties().with_priority(priority.min(super::MAX_PRIORITY));
        if burst > 1 {
            let mut headers = FieldTable::default();
            headers.insert(BURST_HEADER.into(), AMQPValue::LongUInt(burst));
            properties = properties.with_headers(headers);
        }
        self.publish_confirmed(&self.topology.tasks_exchange(), queue, body, properties)
            .await
    }

    /// Publishes a task message that waits `delay` (rounded up to a retry tier) before
    /// it reaches task queue `queue`. Returns the tier it waits in.
    pub async fn publish_retry(
        &self,
        queue: &str,
        body: &[u8],
        priority: u8,
        delay: std::time::Duration,
    ) -> Result<std::time::Duration, BrokerError> {
        // The expiry dead-letters to the tasks exchange, which drops what no queue takes:
        // the task queue must exist before the message waits.
        self.ensure_task_queue(queue).await?;
        let tier = super::topology::retry_tier(delay);
        let properties = json_properties().with_priority(priority.min(super::MAX_PRIORITY));
        self.publish_confirmed(&self.topology.retry_exchange(tier), queue, body, properties)
            .await?;
        Ok(tier)
    }

    /// Publishes a CloudEvent (JSON) to the events exchange with its type as routing key.
    pub async fn publish_event(
        &self,
        event_type: &str,
        body: &[u8],
        priority: u8,
    ) -> Result<(), BrokerError> {
        let properties = json_properties()
            .with_priority(priority.min(super::MAX_PRIORITY))
            .with_content_type("application/cloudevents+json".into());
        self.publish_confirmed(
            &self.topology.events_exchange(),
            event_type,
            body,
            properties,
        )
        .await
    }

    /// Publishes a dead letter to `<ns>.dead`, the reason in its headers.
    pub async fn publish_dead(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        let mut table = FieldTable::default();
        for (key, value) in [
            (headers::REASON, &letter.reason),
            (headers::DETAIL, &letter.detail),
            (headers::SOURCE_QUEUE, &letter.source_queue),
        ] {
            table.insert(key.into(), AMQPValue::LongString(value.as_str().into()));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(table);
        self.publish_confirmed(&self.topology.dead_exchange(), "", &letter.body, properties)
            .await
    }

    /// Tells every worker that something changed. Not mandatory: with no worker bound
    /// there is nobody to tell, and the state itself lives in Postgres.
    pub async fn publish_control(&self, body: &[u8]) -> Result<(), BrokerError> {
        let exchange = self.topology.control_exchange();
        self.channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                json_properties(),
            )
            .await?
            .await?;
        Ok(())
    }

    /// Publishes a persistent, mandatory message and waits until the broker confirms it.
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirmation = self
            .channel
            .basic_publish(exchange.into(), key.into(), options, body, properties)
            .await?
            .await?;
        if confirmation.is_nack() {
            return Err(BrokerError::Nacked {
                exchange: exchange.to_owned(),
                key: key.to_owned(),
            });
        }
        if let Some(returned) = confirmation.take_message() {
            // The queue may have been deleted behind our back: forget the declaration so
            // the next attempt declares it again.
            self.declared
                .lock()
                .expect("declared-set lock is never held across a panic")
                .remove(key);
            return Err(BrokerError::Unroutable {
                exchange: exchange.to_owned(),
                key: key.to_owned(),
                reply: returned.reply_text.to_string(),
            });
        }
        Ok(())
    }
}

fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}
