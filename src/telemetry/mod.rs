//! Metric names and help text (defined once here), the Prometheus exporter, the health
//! endpoints every worker serves, and log set-up.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Tasks finished, by `queue`, `type`, `outcome`.
pub const TASKS_TOTAL: &str = "dagq_tasks_total";
/// Task processing time, by `queue`, `type`.
pub const TASK_DURATION: &str = "dagq_task_duration_seconds";
/// Broker queue depth, by `queue`.
pub const QUEUE_MESSAGES: &str = "dagq_queue_messages";
/// Consumers per broker queue, by `queue`.
pub const QUEUE_CONSUMERS: &str = "dagq_queue_consumers";
/// Runs finished, by `workflow`, `outcome`.
pub const RUNS_TOTAL: &str = "dagq_runs_total";
/// Run duration, by `workflow`.
pub const RUN_DURATION: &str = "dagq_run_duration_seconds";
/// Events consumed from the trigger queue, by `outcome`.
pub const EVENTS_TOTAL: &str = "dagq_events_total";
/// Dead letters published, by `reason`.
pub const DEAD_LETTERS_TOTAL: &str = "dagq_dead_letters_total";
/// Deliveries being processed by this worker.
pub const WORKER_INFLIGHT: &str = "dagq_worker_inflight";
/// Model calls, by `profile`, `provider`, `status`.
pub const MODEL_CALLS_TOTAL: &str = "dagq_model_calls_total";
/// Model call latency, by `profile`, `provider`.
pub const MODEL_CALL_DURATION: &str = "dagq_model_call_duration_seconds";
/// Tokens, by `profile`, `kind`.
pub const MODEL_TOKENS_TOTAL: &str = "dagq_model_tokens_total";
/// Whether a profile's breaker is open, by `profile`.
pub const BREAKER_OPEN: &str = "dagq_breaker_open";

fn describe() {
    describe_counter!(TASKS_TOTAL, Unit::Count, "Task deliveries processed, by outcome (completed, failed, retried, skipped, duplicate).");
    describe_histogram!(TASK_DURATION, Unit::Seconds, "Time from claim to committed outcome of one task.");
    describe_gauge!(QUEUE_MESSAGES, Unit::Count, "Messages ready in a broker queue.");
    describe_gauge!(QUEUE_CONSUMERS, Unit::Count, "Consumers attached to a broker queue.");
    describe_counter!(RUNS_TOTAL, Unit::Count, "Runs finished, by outcome.");
    describe_histogram!(RUN_DURATION, Unit::Seconds, "Time from run start to its final state.");
    describe_counter!(EVENTS_TOTAL, Unit::Count, "Events consumed, by outcome (started, duplicate, unmatched).");
    describe_counter!(DEAD_LETTERS_TOTAL, Unit::Count, "Messages sent to the dead-letter exchange, by reason.");
    describe_gauge!(WORKER_INFLIGHT, Unit::Count, "Deliveries this worker is processing now.");
    describe_counter!(MODEL_CALLS_TOTAL, Unit::Count, "Model calls, by profile, provider and status.");
    describe_histogram!(MODEL_CALL_DURATION, Unit::Seconds, "Model call latency.");
    describe_counter!(MODEL_TOKENS_TOTAL, Unit::Count, "Tokens used, by profile and kind (prompt, completion).");
    describe_gauge!(BREAKER_OPEN, Unit::Count, "1 while a profile's circuit breaker is open.");
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .expect("the recorder is installed only here, once per process");
            describe();
            handle
        })
        .clone()
}

/// Answers whether the worker can do its job (broker and database reachable).
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, otherwise what is missing.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown`.
pub async fn serve_http<R: Readiness>(
    addr: SocketAddr,
    readiness: Arc<R>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let handle = metrics_handle();
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route("/readyz", get(readyz::<R>))
        .with_state(readiness);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

async fn readyz<R: Readiness>(State(readiness): State<Arc<R>>) -> (StatusCode, String) {
    match readiness.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Sets up `tracing`: filter from `DAGQ_LOG` (default `info`), `DAGQ_LOG_FORMAT=json`
/// for JSON lines. Logs go to stderr so that command output on stdout stays clean.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DAGQ_LOG").unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let json = std::env::var("DAGQ_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
