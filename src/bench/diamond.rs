//! `dagq bench diamond` and `dagq bench latency`: the diamond workflow (A → B, C, D → E)
//! run many times across worker processes of this binary.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::BenchError;
use super::env::BenchEnv;
use super::stats::{Latencies, Percentiles};
use crate::broker::{self, Publisher, Topology};
use crate::commands::Progress;
use crate::config::Settings;
use crate::engine::RUN_REQUESTED;
use crate::engine::messages::new_event;
use crate::mock_llm::{self, MockOptions};
use crate::workflow::Workflow;

/// Nodes per diamond run.
const TASKS_PER_RUN: u64 = 5;
/// Publishes in flight while flooding the trigger queue.
const PUBLISH_WINDOW: usize = 512;

/// Parameters of `dagq bench diamond`.
#[derive(Debug, Clone)]
pub struct DiamondBench {
    /// Runs to start.
    pub runs: u64,
    /// Worker processes.
    pub workers: usize,
    /// Concurrency of each worker.
    pub concurrency: usize,
    /// With `Some(ms)`, nodes are `chat` calls to a mock model answering after `ms`.
    pub task_latency_ms: Option<u64>,
}

/// What `dagq bench diamond --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DiamondReport {
    /// Runs completed.
    pub runs: u64,
    /// Tasks executed.
    pub tasks: u64,
    /// Wall time from the first publish to the last run completed.
    pub seconds: f64,
    /// Runs per second.
    pub runs_per_sec: f64,
    /// Tasks per second.
    pub tasks_per_sec: f64,
    /// Event published → run completed, milliseconds.
    pub run_latency_ms: Percentiles,
    /// Largest peak RSS among the workers, MiB.
    pub worker_peak_rss_mb: f64,
    /// CPU seconds of all workers together.
    pub worker_cpu_seconds: f64,
    /// Worker processes.
    pub workers: usize,
    /// Model latency of the mock, when nodes were chat calls.
    pub task_latency_ms: Option<u64>,
}

fn diamond(kind: &str) -> serde_json::Value {
    let node = |id: &str, depends: &[&str]| {
        let mut n = json!({"id": id, "type": kind, "depends": depends});
        if kind == "chat" {
            n["model"] = json!("bench");
            n["input"] =
                json!({"messages": [{"role": "user", "content": "benchmark {{ run.id }}"}]});
        }
        n
    };
    json!({"name": "bench-diamond", "nodes": [
        node("a", &[]), node("b", &["a"]), node("c", &["a"]), node("d", &["a"]), node("e", &["b", "c", "d"])
    ]})
}

/// Sets up the namespace, the workflow, the mock (for chat) and the workers.
async fn prepare(
    base: &Settings,
    bench: &DiamondBench,
    shutdown: &CancellationToken,
) -> Result<(BenchEnv, Vec<String>), BenchError> {
    let mut env = BenchEnv::create(base).await?;
    let (kind, config) = match bench.task_latency_ms {
        None => ("noop", String::new()),
        Some(ms) => {
            let mock = mock_llm::serve(
                "127.0.0.1:0".parse().expect("constant address"),
                MockOptions {
                    latency: Duration::from_millis(ms),
                    ..MockOptions::default()
                },
                shutdown.clone(),
            )
            .await
            .map_err(|e| BenchError::Setup(format!("cannot start the mock model: {e}")))?;
            (
                "chat",
                format!(
                    "[models.bench]\nprovider = \"openai\"\nbase_url = \"http://{mock}/v1\"\nmodel = \"mock\"\n"
                ),
            )
        }
    };
    let config_path = std::env::temp_dir().join(format!("{}.toml", env.settings.namespace));
    std::fs::write(&config_path, &config)
        .map_err(|e| BenchError::Setup(format!("cannot write {config_path:?}: {e}")))?;
    env.settings.file =
        crate::config::FileConfig::parse(&config).map_err(|e| BenchError::Setup(e.to_string()))?;
    let workflow = Workflow::from_json(&diamond(kind), Some(&env.settings.file.models))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    env.store.apply_workflow(&workflow).await?;
    env.start_workers(
        bench.workers,
        bench.concurrency,
        &config_path.to_string_lossy(),
    )?;
    Ok((env, workflow.queues().into_iter().collect()))
}

/// Runs the throughput benchmark and returns its report.
pub async fn bench_diamond(
    base: &Settings,
    bench: &DiamondBench,
) -> Result<DiamondReport, BenchError> {
    let shutdown = CancellationToken::new();
    let (env, queues) = prepare(base, bench, &shutdown).await?;
    let result = flood(&env, bench).await;
    shutdown.cancel();
    env.cleanup(&queues).await;
    result
}

async fn flood(env: &BenchEnv, bench: &DiamondBench) -> Result<DiamondReport, BenchError> {
    let connection = broker::connect(&env.settings.amqp_url, "bench").await?;
    let publisher = Publisher::open(&connection, Topology::new(&env.settings.namespace)).await?;
    wait_for_consumers(env).await?;
    // On the database's clock, which writes `finished_at`: the end is read from there.
    let started = database_clock(env).await?;
    let mut publishes = futures::stream::iter(0..bench.runs)
        .map(|_| {
            let event = new_event(
                RUN_REQUESTED,
                "bench",
                None,
                json!({"workflow": "bench-diamond"}),
            );
            let body = serde_json::to_vec(&event).expect("JSON always serializes");
            let publisher = &publisher;
            async move { publisher.publish_event(RUN_REQUESTED, &body, 0).await }
        })
        .buffer_unordered(PUBLISH_WINDOW);
    while let Some(published) = publishes.next().await {
        published?;
    }
    drop(publishes);
    let mut progress = Progress::new("runs completed", bench.runs);
    let client = env.store.client().await?;
    let deadline = Instant::now() + Duration::from_secs(600 + bench.runs / 10);
    // The poll only notices the end, at leisure: it counts every run, which would take
    // Postgres time from the workers, and the end is read from the runs themselves.
    loop {
        let done: i64 = client
            .query_one("SELECT count(*) FROM runs WHERE state <> 'running'", &[])
            .await?
            .get(0);
        progress.set(done as u64, bench.runs);
        if done as u64 >= bench.runs {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "only {done} of {} runs finished in time",
                bench.runs
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = seconds_until_last_finished(env, started).await?;
    progress.finish();
    let usage = env.worker_usage();
    let failed: i64 = client
        .query_one("SELECT count(*) FROM runs WHERE state <> 'completed'", &[])
        .await?
        .get(0);
    if failed > 0 {
        return Err(BenchError::Setup(format!(
            "{failed} runs did not complete; see the worker logs (DAGQ_BENCH_WORKER_LOG=info)"
        )));
    }
    let latencies = run_latencies(env).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(DiamondReport {
        runs: bench.runs,
        tasks: bench.runs * TASKS_PER_RUN,
        seconds,
        runs_per_sec: bench.runs as f64 / seconds,
        tasks_per_sec: (bench.runs * TASKS_PER_RUN) as f64 / seconds,
        run_latency_ms: latencies.percentiles(),
        worker_peak_rss_mb: usage.iter().map(|u| u.peak_rss_mb).fold(0.0, f64::max),
        worker_cpu_seconds: usage.iter().map(|u| u.cpu_seconds).sum(),
        workers: bench.workers,
        task_latency_ms: bench.task_latency_ms,
    })
}

/// Waits until the workers consume the trigger queue, so that start-up is not timed.
async fn wait_for_consumers(env: &BenchEnv) -> Result<(), BenchError> {
    let connection = broker::connect(&env.settings.amqp_url, "bench").await?;
    let channel = connection.create_channel().await?;
    let queue = Topology::new(&env.settings.namespace).triggers_queue();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await;
        if matches!(&declared, Ok(q) if q.consumer_count() > 0) {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(
                "the workers did not start within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The database's clock now, in seconds since 1970.
async fn database_clock(env: &BenchEnv) -> Result<f64, BenchError> {
    let client = env.store.client().await?;
    let now = client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?;
    Ok(now.get(0))
}

/// From `started` (see [`database_clock`]) to the last run's `finished_at`: when the
/// benchmark's work was done, as the transaction that did it wrote, whenever the poll
/// noticed.
async fn seconds_until_last_finished(env: &BenchEnv, started: f64) -> Result<f64, BenchError> {
    let client = env.store.client().await?;
    let last: f64 = client
        .query_one(
            "SELECT extract(epoch FROM max(finished_at))::float8 FROM runs",
            &[],
        )
        .await?
        .get(0);
    Ok((last - started).max(f64::EPSILON))
}

/// Publish time (the event's `time`) to `finished_at`, for every run.
async fn run_latencies(env: &BenchEnv) -> Result<Latencies, BenchError> {
    let client = env.store.client().await?;
    let rows = client
        .query(
            "SELECT extract(epoch FROM finished_at - (event->>'time')::timestamptz)::float8 FROM runs",
            &[],
        )
        .await?;
    let mut latencies = Latencies::new();
    for row in rows {
        latencies.record(Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0)));
    }
    Ok(latencies)
}

/// Runs `runs` diamonds one after another on an otherwise idle system; returns the
/// end-to-end latency percentiles (event published → run completed in Postgres).
pub async fn bench_latency(base: &Settings, runs: u64) -> Result<Percentiles, BenchError> {
    let shutdown = CancellationToken::new();
    let bench = DiamondBench {
        runs,
        workers: 1,
        concurrency: 64,
        task_latency_ms: None,
    };
    let (env, queues) = prepare(base, &bench, &shutdown).await?;
    let result = one_by_one(&env, runs).await;
    shutdown.cancel();
    env.cleanup(&queues).await;
    result
}

async fn one_by_one(env: &BenchEnv, runs: u64) -> Result<Percentiles, BenchError> {
    let connection = broker::connect(&env.settings.amqp_url, "bench").await?;
    let publisher = Publisher::open(&connection, Topology::new(&env.settings.namespace)).await?;
    wait_for_consumers(env).await?;
    let client = env.store.client().await?;
    let find = client
        .prepare("SELECT state FROM runs WHERE event_source = 'bench' AND event_id = $1")
        .await?;
    let mut latencies = Latencies::new();
    let mut progress = Progress::new("runs completed", runs);
    for i in 0..runs {
        let event = new_event(
            RUN_REQUESTED,
            "bench",
            None,
            json!({"workflow": "bench-diamond"}),
        );
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let body = serde_json::to_vec(&event).expect("JSON always serializes");
        let started = Instant::now();
        publisher.publish_event(RUN_REQUESTED, &body, 0).await?;
        let deadline = started + Duration::from_secs(30);
        // Poll tightly: the figure measured is a few milliseconds.
        loop {
            let state: Option<String> = client.query_opt(&find, &[&id]).await?.map(|r| r.get(0));
            if state.as_deref().is_some_and(|s| s != "running") {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "run {i} did not finish within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.record(started.elapsed());
        progress.set(i + 1, runs);
    }
    progress.finish();
    let _ = connection.close(200, "done".into()).await;
    Ok(latencies.percentiles())
}
