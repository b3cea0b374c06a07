//! `dagq bench adapter`: the latency dagq's adapter path (render, request, parse,
//! classify, record) adds over a direct HTTP call to `mock-llm`, at a fixed request rate
//! (open loop: requests start on schedule whether or not earlier ones finished, and
//! latency counts from the scheduled start, so queueing shows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::BenchError;
use super::stats::{Latencies, Percentiles};
use crate::adapter::{Call, Registry};
use crate::config::FileConfig;
use crate::mock_llm::{self, MockOptions};
use crate::workflow::{NodeDef, template};

/// Parameters of `dagq bench adapter`.
#[derive(Debug, Clone)]
pub struct AdapterBench {
    /// Requests per second.
    pub rate: u64,
    /// How long each of the two passes lasts.
    pub seconds: u64,
}

/// Both passes' latency.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// Requests per second.
    pub rate: u64,
    /// Direct HTTP calls to the mock.
    pub direct_ms: Percentiles,
    /// The same calls through dagq's adapter path.
    pub adapter_ms: Percentiles,
    /// adapter − direct at p50 and p99, milliseconds.
    pub added_p50_ms: f64,
    /// adapter − direct at p99, milliseconds.
    pub added_p99_ms: f64,
    /// Requests per pass.
    pub requests: u64,
}

/// Runs both passes against an in-process mock.
pub async fn bench_adapter(bench: &AdapterBench) -> Result<AdapterReport, BenchError> {
    let shutdown = CancellationToken::new();
    let mock = mock_llm::serve(
        "127.0.0.1:0".parse().expect("constant address"),
        MockOptions::default(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| BenchError::Setup(format!("cannot start the mock model: {e}")))?;
    let config = FileConfig::parse(&format!(
        "[models.bench]\nprovider = \"openai\"\nbase_url = \"http://{mock}/v1\"\nmodel = \"mock\"\n"
    ))
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let registry = Arc::new(Registry::new(&config));
    let node: Arc<NodeDef> = Arc::new(
        serde_json::from_value(json!({
            "id": "review", "type": "chat", "model": "bench",
            "input": {"messages": [{"role": "user", "content": "Review {{ input.file }} please"}]}
        }))
        .expect("constant node"),
    );
    let direct_client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("default client builds");
    let url = format!("http://{mock}/v1/chat/completions");
    let direct_body = json!({"model": "mock", "messages": [{"role": "user", "content": "Review src/main.rs please"}]});

    // Warm both paths (connections, allocator, caches) before either is measured.
    let warm_up = AdapterBench {
        rate: bench.rate,
        seconds: 1,
    };
    let direct_request = {
        let (client, url, body) = (direct_client.clone(), url.clone(), direct_body.clone());
        move |_: u64| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let response = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let _: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    };
    open_loop(&warm_up, direct_request.clone()).await?;
    let direct = open_loop(bench, direct_request).await?;
    let adapter_request = {
        let (registry, node) = (registry.clone(), node.clone());
        move |i: u64| {
            let (registry, node) = (registry.clone(), node.clone());
            async move {
                let context = template::context(&json!({"input": {"file": "src/main.rs"}}));
                let input =
                    template::render_value(&node.input, &context).map_err(|e| e.to_string())?;
                let call = Call {
                    run_id: uuid::Uuid::now_v7(),
                    node: &node,
                    attempt: i as i32 + 1,
                    input,
                    deadline: None,
                };
                let outcome = registry.run(&call).await;
                outcome.result.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    };
    open_loop(&warm_up, adapter_request.clone()).await?;
    let adapter = open_loop(bench, adapter_request).await?;
    shutdown.cancel();
    let (d, a) = (direct.percentiles(), adapter.percentiles());
    Ok(AdapterReport {
        rate: bench.rate,
        direct_ms: d,
        adapter_ms: a,
        added_p50_ms: a.p50 - d.p50,
        added_p99_ms: a.p99 - d.p99,
        requests: direct.len(),
    })
}

/// Starts `request(i)` at `i / rate` seconds for `seconds`, and collects latency from
/// each scheduled start to its end.
async fn open_loop<F, Fut>(bench: &AdapterBench, request: F) -> Result<Latencies, BenchError>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let total = bench.rate * bench.seconds;
    let interval = Duration::from_secs_f64(1.0 / bench.rate.max(1) as f64);
    let latencies = Arc::new(Mutex::new(Latencies::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = started + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (latencies, errors, work) = (latencies.clone(), errors.clone(), request(i));
        tasks.spawn(async move {
            match work.await {
                Ok(()) => latencies.lock().await.record(scheduled.elapsed()),
                Err(e) => errors.lock().await.push(e),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let errors = errors.lock().await;
    if let Some(first) = errors.first() {
        return Err(BenchError::Setup(format!(
            "{} of {total} requests failed, e.g.: {first}",
            errors.len()
        )));
    }
    let latencies = std::mem::replace(&mut *latencies.lock().await, Latencies::new());
    Ok(latencies)
}
