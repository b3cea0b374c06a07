//! Metric names and help text (defined once here), the Prometheus exporter, the health
//! endpoints every worker serves, the elected backlog poller, and log set-up.

mod backlog;
mod http;

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use backlog::{Backlog, BacklogExport, BacklogPoller, QueueBacklog, measure_backlog};
pub use http::{Readiness, serve_http};

/// Tasks finished, by `queue`, `type`, `outcome`.
pub const TASKS_TOTAL: &str = "dagq_tasks_total";
/// Task processing time, by `queue`, `type`.
pub const TASK_DURATION: &str = "dagq_task_duration_seconds";
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
/// Deliveries this worker processes at most at once (`--concurrency`).
pub const WORKER_CAPACITY: &str = "dagq_worker_capacity";
/// 1 on the worker elected to poll the backlog, 0 on the others.
pub const BACKLOG_LEADER: &str = "dagq_backlog_leader";
/// Model calls, by `profile`, `provider`, `status`.
pub const MODEL_CALLS_TOTAL: &str = "dagq_model_calls_total";
/// Model call latency, by `profile`, `provider`.
pub const MODEL_CALL_DURATION: &str = "dagq_model_call_duration_seconds";
/// Tokens, by `profile`, `kind`.
pub const MODEL_TOKENS_TOTAL: &str = "dagq_model_tokens_total";

/// Broker queue depth (ready messages), by `queue`. Elected poller only.
pub const QUEUE_MESSAGES: &str = "dagq_queue_messages";
/// Consumers per broker queue, by `queue`. Elected poller only.
pub const QUEUE_CONSUMERS: &str = "dagq_queue_consumers";
/// Live nodes per task queue, by `queue`, `state` (queued, running, retrying). Elected
/// poller only.
pub const QUEUE_NODES: &str = "dagq_queue_nodes";
/// Age of the oldest queued node, by `queue`. Elected poller only.
pub const QUEUE_OLDEST_QUEUED: &str = "dagq_queue_oldest_queued_seconds";
/// Events waiting in `<ns>.triggers`. Elected poller only.
pub const TRIGGER_QUEUE_MESSAGES: &str = "dagq_trigger_queue_messages";
/// Dead letters waiting in `<ns>.dead` to be recorded. Elected poller only.
pub const DEAD_LETTER_QUEUE_MESSAGES: &str = "dagq_dead_letter_queue_messages";
/// Whether a profile's breaker is open, by `profile`. Elected poller only.
pub const BREAKER_OPEN: &str = "dagq_breaker_open";

/// The type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up; named `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution with buckets; `_seconds` for durations.
    Histogram,
}

/// One metric dagq exports: the single place its name, type, unit, labels and help are
/// written down.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The Prometheus name.
    pub name: &'static str,
    /// Its type.
    pub kind: MetricKind,
    /// Its unit.
    pub unit: Unit,
    /// Every label it may carry (all bounded: never ids).
    pub labels: &'static [&'static str],
    /// The help text.
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: MetricKind,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        unit,
        labels,
        help,
    }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Metrics every worker exports about its own work.
pub const WORKER_METRICS: &[MetricDef] = &[
    def(
        TASKS_TOTAL,
        Counter,
        Unit::Count,
        &["queue", "type", "outcome"],
        "Task deliveries processed, by outcome (completed, failed, retried, duplicate, deferred, fenced).",
    ),
    def(
        TASK_DURATION,
        Histogram,
        Unit::Seconds,
        &["queue", "type"],
        "Time from claim to the committed final outcome (completed or failed) of one task.",
    ),
    def(
        RUNS_TOTAL,
        Counter,
        Unit::Count,
        &["workflow", "outcome"],
        "Runs finished, by outcome.",
    ),
    def(
        RUN_DURATION,
        Histogram,
        Unit::Seconds,
        &["workflow"],
        "Time from run start to its final state.",
    ),
    def(
        EVENTS_TOTAL,
        Counter,
        Unit::Count,
        &["outcome"],
        "Events consumed, by outcome (started, duplicate, unmatched).",
    ),
    def(
        DEAD_LETTERS_TOTAL,
        Counter,
        Unit::Count,
        &["reason"],
        "Messages sent to the dead-letter exchange, by reason.",
    ),
    def(
        WORKER_INFLIGHT,
        Gauge,
        Unit::Count,
        &[],
        "Deliveries this worker is processing now.",
    ),
    def(
        WORKER_CAPACITY,
        Gauge,
        Unit::Count,
        &[],
        "Deliveries this worker processes at most at once (--concurrency); inflight / capacity is its utilisation.",
    ),
    def(
        BACKLOG_LEADER,
        Gauge,
        Unit::Count,
        &[],
        "1 on the one worker elected to poll the backlog (it exports the dagq_queue_* gauges), 0 elsewhere.",
    ),
    def(
        MODEL_CALLS_TOTAL,
        Counter,
        Unit::Count,
        &["profile", "provider", "status"],
        "Model calls, by profile, provider and status (ok or the failure class).",
    ),
    def(
        MODEL_CALL_DURATION,
        Histogram,
        Unit::Seconds,
        &["profile", "provider"],
        "Model call latency.",
    ),
    def(
        MODEL_TOKENS_TOTAL,
        Counter,
        Unit::Count,
        &["profile", "kind"],
        "Tokens used, by profile and kind (prompt, completion).",
    ),
];

/// Gauges only the elected backlog poller exports, so that sums over workers count each
/// figure once.
pub const BACKLOG_METRICS: &[MetricDef] = &[
    def(
        QUEUE_MESSAGES,
        Gauge,
        Unit::Count,
        &["queue"],
        "Messages ready in a task queue on the broker.",
    ),
    def(
        QUEUE_CONSUMERS,
        Gauge,
        Unit::Count,
        &["queue"],
        "Consumers attached to a task queue on the broker.",
    ),
    def(
        QUEUE_NODES,
        Gauge,
        Unit::Count,
        &["queue", "state"],
        "Nodes of a task queue not yet finished, from Postgres, by state (queued, running = in flight, retrying).",
    ),
    def(
        QUEUE_OLDEST_QUEUED,
        Gauge,
        Unit::Seconds,
        &["queue"],
        "Age of the oldest node of a task queue waiting in state queued (0 when none waits).",
    ),
    def(
        TRIGGER_QUEUE_MESSAGES,
        Gauge,
        Unit::Count,
        &[],
        "Events waiting in the trigger queue.",
    ),
    def(
        DEAD_LETTER_QUEUE_MESSAGES,
        Gauge,
        Unit::Count,
        &[],
        "Dead letters waiting in the dead-letter queue to be recorded.",
    ),
    def(
        BREAKER_OPEN,
        Gauge,
        Unit::Count,
        &["profile"],
        "1 while a profile's circuit breaker is not closed (open or in its trial call), from Postgres.",
    ),
];

/// Every metric dagq exports.
pub fn all_metrics() -> impl Iterator<Item = &'static MetricDef> {
    WORKER_METRICS.iter().chain(BACKLOG_METRICS)
}

/// Upper bounds of the buckets of every `_seconds` histogram: from a fast `noop` task
/// to a long run, with 30 s (the P99 alert's threshold) among them.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
];

fn describe(metrics: &[MetricDef]) {
    for m in metrics {
        match m.kind {
            Counter => describe_counter!(m.name, m.unit, m.help),
            Gauge => describe_gauge!(m.name, m.unit, m.help),
            Histogram => describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

/// A Prometheus builder that renders histograms with buckets (not summaries), so that
/// `histogram_quantile` works and workers' histograms add up.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
        .expect("the bucket list is a non-empty constant")
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = builder()
                .install_recorder()
                .expect("the recorder is installed only here, once per process");
            describe(WORKER_METRICS);
            handle
        })
        .clone()
}

/// Sets up `tracing`: filter from `DAGQ_LOG` (default `info`), `DAGQ_LOG_FORMAT=json`
/// for JSON lines (with the fields of the current span, e.g. a delivery's run, node and
/// attempt). Logs go to stderr so that command output on stdout stays clean.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DAGQ_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
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
