//! The backlog that tells the truth: per task queue, the broker's ready messages and
//! consumers next to what Postgres knows (nodes queued, running = in flight, retrying,
//! and the age of the oldest queued one), plus the trigger and dead-letter queues and
//! the breakers.
//!
//! Every worker that serves `/metrics` runs a [`BacklogPoller`], but only the holder of
//! a Postgres advisory lock measures and exports, so that summing over workers counts
//! each figure once. The lock lives on a dedicated connection: when its worker dies the
//! session ends, the lock frees, and another poller's next try wins.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::Connection;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{
    BACKLOG_LEADER, BACKLOG_METRICS, BREAKER_OPEN, DEAD_LETTER_QUEUE_MESSAGES, QUEUE_CONSUMERS,
    QUEUE_MESSAGES, QUEUE_NODES, QUEUE_OLDEST_QUEUED, TRIGGER_QUEUE_MESSAGES, describe,
};
use crate::broker::{self, BrokerError, QueueCounts, QueueProbe, Topology};
use crate::config::Settings;
use crate::store::{Election, QueueNodes, StoreError};

/// How long one measurement may take before it is abandoned (and retried next tick).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// One task queue's backlog.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueBacklog {
    /// Live nodes from Postgres (the queue's name is `nodes.queue`).
    pub nodes: QueueNodes,
    /// The broker's figures; `None` when the broker could not be asked.
    pub broker: Option<QueueCounts>,
}

/// The whole backlog at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    /// Every task queue, by name.
    pub queues: Vec<QueueBacklog>,
    /// The trigger queue; `None` when the broker could not be asked.
    pub triggers: Option<QueueCounts>,
    /// The dead-letter queue; `None` when the broker could not be asked.
    pub dead: Option<QueueCounts>,
}

/// Adds the broker's figures to the node counts of `nodes`.
pub async fn measure_backlog(
    nodes: Vec<QueueNodes>,
    probe: &QueueProbe,
) -> Result<Backlog, BrokerError> {
    let mut queues = Vec::with_capacity(nodes.len());
    for nodes in nodes {
        let broker = Some(probe.task_queue(&nodes.queue).await?);
        queues.push(QueueBacklog { nodes, broker });
    }
    Ok(Backlog {
        queues,
        triggers: Some(probe.triggers().await?),
        dead: Some(probe.dead().await?),
    })
}

impl Backlog {
    /// The Postgres figures alone, while the broker cannot be asked.
    pub fn without_broker(nodes: Vec<QueueNodes>) -> Backlog {
        Backlog {
            queues: nodes
                .into_iter()
                .map(|nodes| QueueBacklog {
                    nodes,
                    broker: None,
                })
                .collect(),
            triggers: None,
            dead: None,
        }
    }

    /// The backlog gauges in the Prometheus text format. A fresh recorder each time,
    /// so that a queue that disappeared leaves no stale series behind.
    fn render(&self, breakers: &[(String, bool)]) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            describe(BACKLOG_METRICS);
            for q in &self.queues {
                let queue = q.nodes.queue.clone();
                if let Some(counts) = q.broker {
                    metrics::gauge!(QUEUE_MESSAGES, "queue" => queue.clone()).set(counts.ready);
                    metrics::gauge!(QUEUE_CONSUMERS, "queue" => queue.clone())
                        .set(counts.consumers);
                }
                let n = &q.nodes;
                for (state, count) in [
                    ("queued", n.queued),
                    ("running", n.running),
                    ("retrying", n.retrying),
                ] {
                    metrics::gauge!(QUEUE_NODES, "queue" => queue.clone(), "state" => state)
                        .set(count as f64);
                }
                metrics::gauge!(QUEUE_OLDEST_QUEUED, "queue" => queue).set(n.oldest_queued_seconds);
            }
            if let Some(triggers) = self.triggers {
                metrics::gauge!(TRIGGER_QUEUE_MESSAGES).set(triggers.ready);
            }
            if let Some(dead) = self.dead {
                metrics::gauge!(DEAD_LETTER_QUEUE_MESSAGES).set(dead.ready);
            }
            for (profile, not_closed) in breakers {
                metrics::gauge!(BREAKER_OPEN, "profile" => profile.clone())
                    .set(f64::from(u8::from(*not_closed)));
            }
        });
        recorder.handle().render()
    }
}

/// The leader's latest rendering of the backlog gauges, which `/metrics` appends; empty
/// on the other workers.
#[derive(Debug, Clone, Default)]
pub struct BacklogExport {
    latest: Arc<Mutex<Option<(Instant, String)>>>,
}

impl BacklogExport {
    /// Appends the latest rendering, unless it expired (its poller stalled).
    pub fn render_into(&self, out: &mut String) {
        let latest = self
            .latest
            .lock()
            .expect("the export lock is never held across a panic");
        if let Some((until, text)) = latest.as_ref()
            && Instant::now() < *until
        {
            out.push_str(text);
        }
    }

    fn set(&self, text: String, valid_for: Duration) {
        *self
            .latest
            .lock()
            .expect("the export lock is never held across a panic") =
            Some((Instant::now() + valid_for, text));
    }

    fn clear(&self) {
        *self
            .latest
            .lock()
            .expect("the export lock is never held across a panic") = None;
    }
}

/// Runs for the lead and, while leading, measures the backlog every `interval`.
#[derive(Debug)]
pub struct BacklogPoller {
    database_url: String,
    amqp_url: String,
    topology: Topology,
    interval: Duration,
    export: BacklogExport,
}

/// A poller's connections: the election's, and the broker's while leading.
struct Connections {
    election: Election,
    broker: Option<(Connection, QueueProbe)>,
    leading: bool,
}

impl Connections {
    /// Closes the broker connection (in the background: it may hang or be gone).
    fn drop_broker(&mut self) {
        if let Some((connection, _)) = self.broker.take() {
            tokio::spawn(async move {
                let _ = connection
                    .close(200, "backlog poller reconnecting".into())
                    .await;
            });
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.drop_broker();
    }
}

impl BacklogPoller {
    /// A poller for the deployment of `settings`.
    pub fn new(settings: &Settings, interval: Duration) -> Self {
        BacklogPoller {
            database_url: settings.database_url.clone(),
            amqp_url: settings.amqp_url.clone(),
            topology: Topology::new(&settings.namespace),
            interval,
            export: BacklogExport::default(),
        }
    }

    /// What `/metrics` appends.
    pub fn export(&self) -> BacklogExport {
        self.export.clone()
    }

    /// Runs until `shutdown`; then stands down, which frees the lock at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let lock = format!("dagq backlog poller {}", self.topology.namespace());
        let leader = metrics::gauge!(BACKLOG_LEADER);
        leader.set(0.0);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut session: Option<Connections> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if session.as_ref().is_some_and(|s| s.election.is_lost()) {
                self.stand_down(&mut session, "its database connection ended");
            }
            let connections = match &mut session {
                Some(connections) => connections,
                None => match Election::connect(&self.database_url).await {
                    Ok(election) => session.insert(Connections {
                        election,
                        broker: None,
                        leading: false,
                    }),
                    Err(e) => {
                        tracing::debug!(error = %e, "backlog poller cannot reach Postgres");
                        continue;
                    }
                },
            };
            if !connections.leading {
                match connections.election.try_lead(&lock).await {
                    Ok(true) => {
                        tracing::info!(
                            "elected to poll the backlog; exporting the dagq_queue_* gauges"
                        );
                        connections.leading = true;
                        leader.set(1.0);
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        self.stand_down(&mut session, &e.to_string());
                        continue;
                    }
                }
            }
            match tokio::time::timeout(POLL_TIMEOUT, self.poll(connections)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.stand_down(&mut session, &e.to_string()),
                Err(_) => {
                    tracing::warn!(timeout = ?POLL_TIMEOUT, "measuring the backlog took too long");
                    connections.drop_broker();
                }
            }
            if session.is_none() {
                leader.set(0.0);
            }
        }
        self.export.clear();
        leader.set(0.0);
        if let Some((broker, _)) = session.as_mut().and_then(|s| s.broker.take()) {
            let _ = broker.close(200, "worker shutting down".into()).await;
        }
    }

    /// Drops the election's connection, which frees the lock if this poller held it.
    fn stand_down(&self, session: &mut Option<Connections>, why: &str) {
        if session.take().is_some_and(|s| s.leading) {
            tracing::warn!(%why, "no longer polling the backlog; another worker takes over");
        }
        self.export.clear();
    }

    /// One measurement. A broker failure leaves the Postgres figures exported; a
    /// database failure is returned, since it may have cost the lock.
    async fn poll(&self, connections: &mut Connections) -> Result<(), StoreError> {
        let nodes = connections.election.queue_nodes().await?;
        let breakers = connections.election.breakers_not_closed().await?;
        let backlog = match self.with_broker(connections, nodes.clone()).await {
            Ok(backlog) => backlog,
            Err(e) => {
                if connections.broker.is_some() {
                    connections.drop_broker();
                    tracing::warn!(error = %e, "backlog poller lost RabbitMQ; exporting Postgres figures only");
                }
                Backlog::without_broker(nodes)
            }
        };
        self.export
            .set(backlog.render(&breakers), self.interval * 3 + POLL_TIMEOUT);
        Ok(())
    }

    async fn with_broker(
        &self,
        connections: &mut Connections,
        nodes: Vec<QueueNodes>,
    ) -> Result<Backlog, BrokerError> {
        let usable = connections
            .broker
            .as_ref()
            .is_some_and(|(connection, probe)| connection.status().connected() && probe.is_open());
        if !usable {
            let connection = broker::connect(&self.amqp_url, "backlog poller").await?;
            let probe = QueueProbe::open(&connection, self.topology.clone()).await?;
            connections.broker = Some((connection, probe));
        }
        let (_, probe) = connections.broker.as_ref().expect("connected above");
        measure_backlog(nodes, probe).await
    }
}
