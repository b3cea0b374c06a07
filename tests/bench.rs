//! `dagq bench` end to end on the real services: it prints the figures it promises and
//! leaves nothing behind. Speed itself is never asserted here; `dagq bench` is where it
//! is measured.

mod common;

use common::TestEnv;
use serde_json::Value;

/// `bench diamond --json` runs every run to completion across a worker process of the
/// same binary, prints one JSON object with the documented fields, consistent with one
/// another, and drops the database it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_diamond_prints_consistent_json_and_drops_its_database() {
    let env = TestEnv::new().await;
    let bench_databases =
        || env.count("SELECT count(*) FROM pg_database WHERE datname LIKE 'dagq\\_bench\\_%'");
    let before = bench_databases().await;
    let output = env
        .command()
        .args(["bench", "diamond", "--runs", "20", "--json"])
        .output()
        .expect("run dagq bench");
    assert!(
        output.status.success(),
        "dagq bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(
        (report["runs"].as_u64(), report["tasks"].as_u64()),
        (Some(20), Some(100))
    );
    let number = |field: &str| {
        report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} is not a number: {report}"))
    };
    let seconds = number("seconds");
    assert!(seconds > 0.0, "{report}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.max(1.0);
    assert!(close(number("runs_per_sec"), 20.0 / seconds), "{report}");
    assert!(close(number("tasks_per_sec"), 100.0 / seconds), "{report}");
    let latency = &report["run_latency_ms"];
    let (p50, p95, p99) = (
        latency["p50"].as_f64().unwrap(),
        latency["p95"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{report}");
    assert!(number("worker_peak_rss_mb") > 0.0, "{report}");
    assert_eq!(
        bench_databases().await,
        before,
        "the bench left its database"
    );
}
