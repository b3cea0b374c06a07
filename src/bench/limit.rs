//! `dagq bench limit`: this machine's ceiling with the clients and settings dagq uses.
//! (a) broker hops/s: consume a persistent message, publish one follow-up with a
//! confirm, ack; (b) Postgres transitions/s: the transaction shape of one node
//! transition (conditional UPDATE plus a transition row) at several client counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;

use super::BenchError;
use super::env::BenchEnv;
use crate::broker::{self, Publisher, Topology};
use crate::config::Settings;

/// Messages circulating in the hop benchmark: the broker's window of work.
const HOP_MESSAGES: u16 = 256;
/// The task queue the hop benchmark circulates its messages through.
const HOP_QUEUE: &str = "hops";
/// Node rows the transition benchmark updates.
const PG_ROWS: i32 = 10_000;

/// What `dagq bench limit` measured.
#[derive(Debug, Clone, Serialize)]
pub struct LimitReport {
    /// Broker hops per second.
    pub broker_hops_per_sec: f64,
    /// Postgres transition transactions per second, by client count.
    pub pg_transitions_per_sec: Vec<(usize, f64)>,
    /// The lower of the broker's and the best Postgres figure.
    pub ceiling_per_sec: f64,
}

/// Measures both ceilings for `seconds` each.
pub async fn bench_limit(base: &Settings, seconds: u64) -> Result<LimitReport, BenchError> {
    let env = BenchEnv::create(base).await?;
    let result = measure(&env, Duration::from_secs(seconds)).await;
    env.cleanup(&[HOP_QUEUE.to_owned()]).await;
    let report = result?;
    save(&report);
    Ok(report)
}

async fn measure(env: &BenchEnv, period: Duration) -> Result<LimitReport, BenchError> {
    let hops = broker_hops(env, period).await?;
    let mut pg = Vec::new();
    for clients in [1, 4, 16, 32] {
        pg.push((clients, pg_transitions(env, clients, period).await?));
    }
    let best_pg = pg.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    Ok(LimitReport {
        broker_hops_per_sec: hops,
        pg_transitions_per_sec: pg,
        ceiling_per_sec: hops.min(best_pg),
    })
}

async fn broker_hops(env: &BenchEnv, period: Duration) -> Result<f64, BenchError> {
    let connection = broker::connect(&env.settings.amqp_url, "bench-limit").await?;
    let topology = Topology::new(&env.settings.namespace);
    let publisher = Arc::new(Publisher::open(&connection, topology.clone()).await?);
    publisher.ensure_task_queue(HOP_QUEUE).await?;
    let queue = topology.task_queue(HOP_QUEUE);
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(HOP_MESSAGES, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for _ in 0..HOP_MESSAGES {
        publisher.publish_task(HOP_QUEUE, b"{}", 0).await?;
    }
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    while started.elapsed() < period {
        tokio::select! {
            Some(delivery) = consumer.next() => {
                let delivery = delivery?;
                let publisher = publisher.clone();
                let count = count.clone();
                inflight.push(async move {
                    publisher.publish_task(HOP_QUEUE, &delivery.data, 0).await?;
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, BenchError>(())
                });
            }
            Some(done) = inflight.next() => done?,
        }
    }
    let hops = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    Ok(hops)
}

async fn pg_transitions(
    env: &BenchEnv,
    clients: usize,
    period: Duration,
) -> Result<f64, BenchError> {
    let url = env.settings.database_url.clone();
    let (setup, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let run_id = uuid::Uuid::new_v4();
    setup
        .batch_execute(&format!(
            "INSERT INTO workflows (name, version, definition, queues) VALUES ('bench-limit', 1, '{{}}', '{{}}') ON CONFLICT DO NOTHING;
             INSERT INTO runs (id, workflow, version, state, event_source, event_id, event, nodes_left)
             VALUES ('{run_id}', 'bench-limit', 1, 'running', 'bench', '{run_id}', '{{}}', {PG_ROWS});
             INSERT INTO node_runs (run_id, node_id, state, deps_left, queue, type)
             SELECT '{run_id}', 'n' || i, 'queued', 0, 'bench', 'noop' FROM generate_series(1, {PG_ROWS}) i;"
        ))
        .await?;
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let (url, count) = (url.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let update = client
                .prepare(
                    "UPDATE node_runs SET state = CASE state WHEN 'queued' THEN 'running' ELSE 'queued' END,
                            fence = fence + 1
                     WHERE run_id = $1 AND node_id = $2 RETURNING state, attempt",
                )
                .await?;
            let log = client
                .prepare("INSERT INTO transitions (run_id, node_id, from_state, to_state, attempt) VALUES ($1, $2, 'queued', $3, $4)")
                .await?;
            let mut i = client_index as i32;
            while started.elapsed() < period {
                let node = format!("n{}", i % PG_ROWS + 1);
                i += clients as i32;
                let tx = client.transaction().await?;
                let row = tx.query_one(&update, &[&run_id, &node]).await?;
                let (state, attempt): (String, i32) = (row.get(0), row.get(1));
                tx.execute(&log, &[&run_id, &node, &state, &attempt]).await?;
                tx.commit().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| BenchError::Setup(e.to_string()))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Where the last `bench limit` result is kept for `bench diamond` to compare with.
pub(super) fn saved_path() -> std::path::PathBuf {
    std::env::temp_dir().join("dagq-bench-limit.json")
}

fn save(report: &LimitReport) {
    if let Ok(text) = serde_json::to_string(report) {
        let _ = std::fs::write(saved_path(), text);
    }
}

/// The last saved `bench limit` ceiling, if any.
pub(super) fn saved_ceiling() -> Option<f64> {
    let text = std::fs::read_to_string(saved_path()).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["ceiling_per_sec"].as_f64()
}
