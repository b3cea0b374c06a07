//! The worker process: consumes triggers and task queues with bounded concurrency,
//! survives lost connections by reconnecting with backoff, and drains in-flight work on
//! shutdown. Stateless: any number run side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::delivery::{Held, Source, delivery_span, process, process_tasks, process_triggers};
use super::{Engine, EngineError};
use crate::adapter::{Breakers, Registry};
use crate::alert::Alerter;
use crate::broker::{self, Publisher, Topology};
use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::{self, Readiness};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Task queues to serve; `None` serves every queue of every applied workflow.
    pub queues: Option<Vec<String>>,
    /// Deliveries processed at once.
    pub concurrency: usize,
    /// Address of `/metrics`, `/healthz`, `/readyz`; `None` for no HTTP server.
    pub http: Option<SocketAddr>,
    /// Apply migrations before starting.
    pub migrate: bool,
    /// How long in-flight deliveries may take to finish after shutdown is requested.
    pub grace: Duration,
    /// How often the list of task queues is refreshed (new workflows bring new queues).
    pub queue_refresh: Duration,
    /// How often the elected worker polls the backlog (only workers serving HTTP run).
    pub backlog_interval: Duration,
    /// A retry overdue by this much lost its delayed message and is republished; the
    /// sweep for them runs at a tenth of this interval.
    pub lost_retry_grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            queues: None,
            concurrency: 64,
            http: None,
            migrate: true,
            grace: Duration::from_secs(30),
            queue_refresh: Duration::from_secs(2),
            backlog_interval: Duration::from_secs(5),
            lost_retry_grace: Duration::from_secs(120),
        }
    }
}

/// Dead letters are few and each is one insert: a small window is plenty.
const DEAD_LETTER_PREFETCH: u16 = 16;

/// Task batches processed at once by one worker. Few: while all are busy, deliveries
/// gather into the next batches, which is what makes batching pay (group commit).
const BATCHES_AT_ONCE: usize = 2;

/// The most task deliveries in one batch.
const MAX_BATCH: usize = 128;

/// The longest a batch waits for the rest of a burst. Siblings arrive ≈ 0.3 ms apart on
/// an idle machine; when some went to another worker, the wait is in vain but short
/// (timers tick in whole milliseconds, so it ends within 2 ms).
const BURST_WAIT: Duration = Duration::from_micros(800);

/// A worker: `run` it until its shutdown token is cancelled.
#[derive(Debug)]
pub struct Worker {
    settings: Settings,
    options: WorkerOptions,
    listener: Option<tokio::net::TcpListener>,
}

/// What `/readyz` reports.
#[derive(Debug)]
struct Health {
    store: Store,
    broker_up: AtomicBool,
}

impl Readiness for Health {
    async fn ready(&self) -> Result<(), String> {
        if !self.broker_up.load(Ordering::Relaxed) {
            return Err("RabbitMQ is not connected".into());
        }
        self.store
            .ping()
            .await
            .map_err(|e| format!("Postgres: {e}"))
    }
}

/// Shared by every consumer of one broker session.
#[derive(Clone)]
struct Consuming {
    engine: Engine,
    permits: Arc<Semaphore>,
    /// Batches of task deliveries being processed at once (see `delivery.rs`).
    batches: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
    lost: mpsc::Sender<String>,
}

impl Worker {
    /// A worker with these settings.
    pub fn new(settings: Settings, options: WorkerOptions) -> Self {
        Worker {
            settings,
            options,
            listener: None,
        }
    }

    /// Binds the HTTP address now, so that the caller learns it (e.g. port 0's) before
    /// `run`; `None` when the worker serves no HTTP.
    pub async fn bind_http(&mut self) -> std::io::Result<Option<SocketAddr>> {
        if let (Some(addr), None) = (self.options.http, &self.listener) {
            self.listener = Some(tokio::net::TcpListener::bind(addr).await?);
        }
        self.listener.as_ref().map(|l| l.local_addr()).transpose()
    }

    /// Runs until `shutdown` is cancelled, then drains in-flight work within the grace
    /// period. Lost connections are retried with backoff, never fatal.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<Option<SocketAddr>, EngineError> {
        // A bad alert destination found now, not at the first outage.
        Alerter::check_config(&self.settings.file.alerts)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if self.options.migrate {
            let mut backoff = Backoff::default();
            loop {
                match Store::migrate(&self.settings.database_url).await {
                    Ok(_) => break,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(error = %e, "cannot migrate yet; retrying");
                        if !backoff.wait(&shutdown).await {
                            return Ok(None);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let pool_size = self.options.concurrency.clamp(2, 32) + 2;
        let store = Store::connect(&self.settings.database_url, pool_size)?;
        let health = Arc::new(Health {
            store: store.clone(),
            broker_up: AtomicBool::new(false),
        });
        let io_error = |e: std::io::Error| {
            EngineError::Broker(broker::BrokerError::Amqp(lapin::Error::from(e)))
        };
        self.bind_http().await.map_err(io_error)?;
        let http = match self.listener.take() {
            Some(listener) => {
                // Only workers that export take part in the election; the poller starts
                // once serving installed the metrics recorder.
                let poller =
                    telemetry::BacklogPoller::new(&self.settings, self.options.backlog_interval);
                let addr = telemetry::serve_http(
                    listener,
                    health.clone(),
                    poller.export(),
                    shutdown.clone(),
                )
                .await
                .map_err(io_error)?;
                tokio::spawn(poller.run(shutdown.clone()));
                tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
                Some(addr)
            }
            None => None,
        };
        metrics::gauge!(telemetry::WORKER_CAPACITY).set(self.options.concurrency as f64);
        let permits = Arc::new(Semaphore::new(self.options.concurrency));
        let tracker = TaskTracker::new();
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            let result = self
                .session(&store, &health, &permits, &tracker, &shutdown)
                .await;
            health.broker_up.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "broker session ended; reconnecting");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                }
            }
        }
        tracker.close();
        if tokio::time::timeout(self.options.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.len(),
                "grace period over; unfinished deliveries stay unacked and will be redelivered"
            );
        }
        Ok(http)
    }

    /// One broker connection's lifetime: declare, consume, and return when it breaks
    /// (`Err`) or shutdown is requested (`Ok`).
    async fn session(
        &self,
        store: &Store,
        health: &Health,
        permits: &Arc<Semaphore>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), EngineError> {
        let connection = broker::connect(&self.settings.amqp_url, "worker").await?;
        let topology = Topology::new(&self.settings.namespace);
        let publisher = Arc::new(Publisher::open(&connection, topology.clone()).await?);
        let breakers = Breakers::new(store.clone(), self.settings.file.breaker.clone());
        let registry = Registry::new(&self.settings.file).with_breakers(breakers.clone());
        let alerter = Alerter::new(self.settings.file.alerts.clone(), store.clone());
        let engine = Engine::new(store.clone(), publisher.clone(), registry.clone())
            .with_alerter(alerter)
            .with_group_commit();
        let (lost_tx, mut lost) = mpsc::channel(4);
        let consuming = Consuming {
            engine,
            permits: permits.clone(),
            batches: Arc::new(Semaphore::new(BATCHES_AT_ONCE)),
            tracker: tracker.clone(),
            stop: shutdown.child_token(),
            lost: lost_tx,
        };
        let prefetch = self.options.concurrency.min(u16::MAX as usize) as u16;
        let triggers = open_channel(&connection, prefetch).await?;
        let trigger_tag = start_consumer(
            &triggers,
            &topology.triggers_queue(),
            Source::Triggers,
            &consuming,
            consuming.stop.clone(),
        )
        .await?;
        let dead = open_channel(&connection, DEAD_LETTER_PREFETCH).await?;
        let dead_tag = start_consumer(
            &dead,
            &topology.dead_queue(),
            Source::DeadLetters,
            &consuming,
            consuming.stop.clone(),
        )
        .await?;
        let tasks = open_channel(&connection, prefetch).await?;
        let control = Arc::new(Notify::new());
        listen_for_control(
            &connection,
            &topology,
            control.clone(),
            consuming.stop.clone(),
            consuming.lost.clone(),
        )
        .await?;
        let mut served: BTreeMap<String, TaskConsumer> = BTreeMap::new();
        health.broker_up.store(true, Ordering::Relaxed);
        tracing::info!(namespace = %topology.namespace(), "connected to RabbitMQ");
        tokio::spawn(sweep_lost_retries(
            consuming.engine.clone(),
            self.options.lost_retry_grace,
            consuming.stop.clone(),
        ));
        let mut refresh = tokio::time::interval(self.options.queue_refresh);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                why = lost.recv() => {
                    break Err(EngineError::Broker(broker::BrokerError::Amqp(lapin::Error::from(
                        std::io::Error::other(why.unwrap_or_default()),
                    ))));
                }
                _ = refresh.tick() => {}
                _ = control.notified() => {}
            }
            let wanted = match &self.options.queues {
                Some(queues) => queues.clone(),
                None => match store.known_queues().await {
                    Ok(queues) => queues,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list task queues; keeping the current ones");
                        continue;
                    }
                },
            };
            let paused = match paused_profiles(&breakers, &registry).await {
                Ok(paused) => paused,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read circuit breakers; keeping queues as they are");
                    continue;
                }
            };
            for queue in wanted {
                let pause = paused.contains(&queue);
                match (served.get(&queue), pause) {
                    (Some(_), true) => {
                        let consumer = served.remove(&queue).expect("present: matched Some");
                        consumer.stop.cancel();
                        cancel_consumer(&tasks, &consumer.tag).await;
                        tracing::warn!(%queue, "paused: the circuit breaker of this profile is open");
                    }
                    (None, false) => {
                        publisher.ensure_task_queue(&queue).await?;
                        let stop = consuming.stop.child_token();
                        let tag = start_consumer(
                            &tasks,
                            &topology.task_queue(&queue),
                            Source::Tasks(queue.clone()),
                            &consuming,
                            stop.clone(),
                        )
                        .await?;
                        tracing::info!(%queue, "serving task queue");
                        served.insert(queue, TaskConsumer { tag, stop });
                    }
                    (Some(_), false) | (None, true) => {}
                }
            }
        };
        // Stop new deliveries first; in-flight ones finish on the still-open channels.
        consuming.stop.cancel();
        if outcome.is_ok() {
            tracing::debug!("cancelling consumers");
            cancel_consumer(&triggers, &trigger_tag).await;
            cancel_consumer(&dead, &dead_tag).await;
            for consumer in served.values() {
                cancel_consumer(&tasks, &consumer.tag).await;
            }
            tracing::debug!(
                in_flight = tracker.len(),
                "waiting for deliveries in flight"
            );
            tracker.close();
            if tokio::time::timeout(self.options.grace, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    left = tracker.len(),
                    "grace period over; closing with deliveries unacked"
                );
            }
            let closed = connection.close(200, "worker shutting down".into());
            if tokio::time::timeout(BROKER_REPLY, closed).await.is_err() {
                tracing::warn!("the broker did not confirm closing the connection; leaving it");
            }
        }
        outcome
    }
}

/// How long a worker waits for the broker's reply to a cancel or a close. A stop must
/// not hang on a reply that never comes; the connection's end cancels all anyway.
const BROKER_REPLY: Duration = Duration::from_secs(5);

/// Cancels a consumer, waiting at most `BROKER_REPLY` for the broker to confirm.
async fn cancel_consumer(channel: &Channel, tag: &str) {
    let cancelled = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
    if tokio::time::timeout(BROKER_REPLY, cancelled).await.is_err() {
        tracing::warn!(%tag, "the broker did not confirm cancelling a consumer; going on");
    }
}

async fn open_channel(connection: &Connection, prefetch: u16) -> Result<Channel, EngineError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(broker::BrokerError::from)?;
    // global: the limit covers every consumer on the channel, so the worker never holds
    // more unacked deliveries than it can process, whatever the number of queues.
    channel
        .basic_qos(prefetch, BasicQosOptions { global: true })
        .await
        .map_err(broker::BrokerError::from)?;
    Ok(channel)
}

async fn start_consumer(
    channel: &Channel,
    queue: &str,
    source: Source,
    consuming: &Consuming,
    stop: CancellationToken,
) -> Result<String, EngineError> {
    let tag = format!(
        "dagq-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker::BrokerError::from)?;
    let consuming = consuming.clone();
    tokio::spawn(consume(consumer, source, consuming, stop));
    Ok(tag)
}

async fn consume(
    mut consumer: lapin::Consumer,
    source: Source,
    consuming: Consuming,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                give_back(consumer).await;
                return;
            }
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                let _ = consuming.lost.send(e.to_string()).await;
                return;
            }
            None => {
                let _ = consuming
                    .lost
                    .send("consumer cancelled by the broker".into())
                    .await;
                return;
            }
        };
        // A stop while waiting for a slot hands the delivery back rather than starting it
        // after shutdown began.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            permit = consuming.permits.clone().acquire_owned() => permit.ok(),
        };
        let Some(permit) = permit else {
            requeue(&delivery).await;
            give_back(consumer).await;
            return;
        };
        let engine = consuming.engine.clone();
        if !matches!(source, Source::DeadLetters) {
            let slot = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                slot = consuming.batches.clone().acquire_owned() => slot.ok(),
            };
            let Some(slot) = slot else {
                requeue(&delivery).await;
                give_back(consumer).await;
                return;
            };
            let (batch, ended) =
                gather(&mut consumer, (delivery, permit), &consuming.permits).await;
            if let Source::Tasks(_) = &source {
                let tracker = consuming.tracker.clone();
                consuming.tracker.spawn(process_tasks(
                    engine,
                    source.clone(),
                    batch,
                    slot,
                    tracker,
                ));
            } else {
                consuming
                    .tracker
                    .spawn(process_triggers(engine, batch, slot));
            }
            if let Some(why) = ended {
                let _ = consuming.lost.send(why).await;
                return;
            }
            continue;
        }
        let span = delivery_span(&source);
        let source = source.clone();
        consuming.tracker.spawn(
            async move {
                let _permit = permit;
                process(&engine, &source, delivery).await;
            }
            .instrument(span),
        );
    }
}

/// Adds to `first` the deliveries the consumer already holds, as long as there are free
/// slots, up to `MAX_BATCH`. While the batch is smaller than the burst one of its
/// messages came in (the siblings of a node that just finished), it waits up to
/// `BURST_WAIT` for the rest: they arrive a fraction of a millisecond apart, and
/// processed apart they would take turns on their run's lock, commit after commit.
/// Returns the batch, and why the consumer ended if it did.
async fn gather(
    consumer: &mut lapin::Consumer,
    first: Held,
    permits: &Arc<Semaphore>,
) -> (Vec<Held>, Option<String>) {
    let mut expected = broker::burst_of(&first.0.properties);
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + BURST_WAIT;
    while batch.len() < MAX_BATCH {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            break;
        };
        let next = if batch.len() < expected as usize {
            tokio::time::timeout_at(deadline, consumer.next())
                .await
                .ok()
        } else {
            consumer.next().now_or_never()
        };
        match next {
            Some(Some(Ok(delivery))) => {
                expected = expected.max(broker::burst_of(&delivery.properties));
                batch.push((delivery, permit));
            }
            Some(Some(Err(e))) => return (batch, Some(e.to_string())),
            Some(None) => return (batch, Some("consumer cancelled by the broker".into())),
            None => break,
        }
    }
    (batch, None)
}

async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}

/// Periodically republishes retries whose delayed message was lost, until `stop`.
async fn sweep_lost_retries(engine: Engine, grace: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(grace / 10);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = engine.republish_overdue_retries(grace).await {
            tracing::warn!(error = %e, "cannot sweep for lost retries; trying again later");
        }
    }
}

/// Returns the deliveries a stopped consumer had buffered but not started, so that they
/// go to another consumer now instead of waiting for this channel to close.
async fn give_back(mut consumer: lapin::Consumer) {
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
    {
        requeue(&delivery).await;
    }
}

/// Binds a private queue to the control exchange; every message on it wakes `control`.
async fn listen_for_control(
    connection: &Connection,
    topology: &Topology,
    control: Arc<Notify>,
    stop: CancellationToken,
    lost: mpsc::Sender<String>,
) -> Result<(), EngineError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(broker::BrokerError::from)?;
    let queue = broker::bind_private_queue(&channel, &topology.control_exchange()).await?;
    let mut consumer = channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(broker::BrokerError::from)?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                next = consumer.next() => match next {
                    Some(Ok(_)) => control.notify_one(),
                    _ => {
                        let _ = lost.send("control consumer ended".into()).await;
                        return;
                    }
                },
            }
        }
    });
    Ok(())
}

/// Profiles whose queues no worker should consume now: their breaker is cooling down and
/// so is every fallback (with a live fallback, tasks go there instead).
async fn paused_profiles(
    breakers: &Breakers,
    registry: &Registry,
) -> Result<BTreeSet<String>, crate::store::StoreError> {
    let cooling: BTreeSet<String> = breakers.cooling_down().await?.into_iter().collect();
    Ok(cooling
        .iter()
        .filter(|profile| {
            registry
                .chain_of(profile)
                .iter()
                .all(|p| cooling.contains(p))
        })
        .cloned()
        .collect())
}

/// A running consumer of one task queue.
#[derive(Debug)]
struct TaskConsumer {
    tag: String,
    stop: CancellationToken,
}

/// Exponential backoff between reconnection attempts: 100 ms doubling to 5 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// Waits the next delay; false when shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
