//! What operators read besides `/metrics`: `dagq top`, JSON logs with the delivery's
//! run, node and attempt, and the dashboard and alert rules of `deploy/`, whose queries
//! must name metrics that dagq exports.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{KillOnDrop, TestEnv, eventually};
use dagq::engine::WorkerOptions;
use dagq::telemetry::{MetricKind, all_metrics};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// `dagq top --once` prints every queue with its ready messages, consumers and nodes
/// (a backlog nobody serves included), the number of workers, and the recent runs with
/// their state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_the_queues_and_recent_runs() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "done", "nodes": [{"id": "only", "type": "noop"}]}))
        .await;
    env.apply(json!({"name": "held", "nodes": [{"id": "wait", "type": "noop", "queue": "held"}]}))
        .await;
    let worker = env.start_worker(WorkerOptions {
        queues: Some(vec!["noop".into()]),
        queue_refresh: Duration::from_millis(200),
        ..WorkerOptions::default()
    });
    let done = env
        .wait_run(&env.request_run("done", json!({})).await, WAIT)
        .await;
    assert_eq!(done.run.state, "completed");
    for _ in 0..2 {
        env.request_run("held", json!({})).await;
    }
    let held = env.topology().task_queue("held");
    eventually("two tasks to wait in the held queue", WAIT, || async {
        // A passive declaration of a queue not declared yet closes its channel: use a
        // fresh one each time.
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = env
            .channel()
            .await
            .queue_declare(
                held.as_str().into(),
                passive,
                lapin::types::FieldTable::default(),
            )
            .await;
        declared.is_ok_and(|q| q.message_count() == 2).then_some(())
    })
    .await;

    let mut command = tokio::process::Command::from(env.command());
    command
        .args(["top", "--once"])
        .kill_on_drop(true)
        .stdin(Stdio::null());
    let out = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("dagq top --once returns")
        .expect("dagq starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dagq top failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |queue: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))
            .unwrap_or_else(|| panic!("no row for queue {queue} in:\n{stdout}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // QUEUE READY CONSUMERS QUEUED RUNNING RETRYING OLDEST
    assert_eq!(row("held")[1..6], ["2", "0", "2", "0", "0"], "{stdout}");
    assert_ne!(row("held")[6], "-", "the oldest queued task has an age");
    assert_eq!(
        row("noop")[1..7],
        ["0", "1", "0", "0", "0", "-"],
        "{stdout}"
    );
    assert!(
        stdout.contains("workers 1"),
        "one worker consumes the triggers:\n{stdout}"
    );
    let run_line = stdout
        .lines()
        .find(|l| l.starts_with(&done.run.id.to_string()))
        .unwrap_or_else(|| panic!("the finished run is listed:\n{stdout}"));
    assert!(
        run_line.contains("done") && run_line.contains("completed"),
        "{run_line}"
    );
    let running = stdout
        .lines()
        .filter(|l| l.contains(" held ") && l.contains("running"))
        .count();
    assert_eq!(
        running, 2,
        "both held runs are listed as running:\n{stdout}"
    );
    worker.stop().await;
}

/// A worker started with `DAGQ_LOG_FORMAT=json` writes JSON lines; those about a task
/// delivery carry its run, node and attempt in their span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_run_node_and_attempt_of_each_delivery() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "logged", "nodes": [
        {"id": "a", "type": "noop"}, {"id": "b", "type": "noop", "depends": ["a"]}
    ]}))
    .await;
    let log = std::env::temp_dir().join(format!("dagq-{}-worker.jsonl", env.namespace));
    let _remove = RemoveOnDrop(log.clone());
    let stderr = std::fs::File::create(&log).expect("temp file");
    let worker = env
        .command()
        .args(["worker", "--http", "off", "--no-migrate"])
        .env("DAGQ_LOG_FORMAT", "json")
        .env("DAGQ_LOG", "dagq=debug,warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn dagq worker");
    let _worker = KillOnDrop(worker);
    let status = env
        .wait_run(&env.request_run("logged", json!({})).await, WAIT)
        .await;
    assert_eq!(status.run.state, "completed");
    let run = status.run.id.to_string();

    let lines = eventually("the worker to log both nodes' deliveries", WAIT, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        // The worker may be writing the last line: read whole lines only.
        let lines: Vec<Value> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
            })
            .collect();
        let about = |node: &str| {
            lines.iter().any(|l| {
                l["message"] == "delivery processed"
                    && l["span"]["run"] == run.as_str()
                    && l["span"]["node"] == node
                    && l["span"]["attempt"] == 1
            })
        };
        (about("a") && about("b")).then_some(lines)
    })
    .await;
    for line in lines
        .iter()
        .filter(|l| l["span"]["name"] == "delivery" && l["span"]["queue"] == "noop")
    {
        for field in ["run", "node", "attempt"] {
            assert!(
                !line["span"][field].is_null(),
                "a task delivery's line lacks {field}: {line}"
            );
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn deploy(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a PromQL expression reads (label values and strings aside).
fn metric_names(expr: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("dagq_") || *word == "up")
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is a metric of dagq's registry, or a series of one of its histograms.
fn exported(name: &str) -> bool {
    name == "up"
        || all_metrics().any(|d| {
            d.name == name
                || (d.kind == MetricKind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{}{s}", d.name)))
        })
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(expr)) = map.get("expr") {
                out.push(expr.clone());
            }
            map.values().for_each(|v| collect_exprs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The Grafana dashboard is valid JSON whose every query names metrics of dagq's
/// registry (histogram series by their base name), on the provisioned data source, and
/// covers queues, throughput, success rate, latency, model calls and tokens, breakers.
#[test]
fn the_dashboard_queries_metrics_that_exist() {
    let dashboard: Value =
        serde_json::from_str(&deploy("grafana/dashboards/dagq.json")).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 15, "the dashboard has its panels: {exprs:?}");
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query names no dagq metric: {expr}");
        for name in names {
            assert!(
                exported(&name),
                "dashboard query names {name}, which dagq does not export: {expr}"
            );
        }
    }
    let all = exprs.join("\n");
    for needed in [
        "dagq_queue_messages",
        "dagq_queue_nodes",
        "dagq_tasks_total{outcome=\"completed\"}",
        "histogram_quantile(0.99, sum by (le) (rate(dagq_task_duration_seconds_bucket",
        "dagq_model_calls_total",
        "dagq_model_tokens_total",
        "dagq_breaker_open",
        "dagq_worker_capacity",
    ] {
        assert!(all.contains(needed), "the dashboard shows {needed}");
    }
    let datasource: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&deploy("grafana/provisioning/datasources/prometheus.yml"))
            .expect("YAML");
    let uid = datasource["datasources"][0]["uid"]
        .as_str()
        .expect("the data source has a uid");
    for panel in dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
    {
        assert_eq!(
            panel["datasource"]["uid"], uid,
            "panel {} uses the provisioned data source",
            panel["title"]
        );
    }
}

/// The alert rules are valid YAML whose every expression names metrics of dagq's
/// registry, with the seed's thresholds: success rate below 99.5 %, P99 above 30 s,
/// backlog above 50, plus dead letters, breakers and queues without consumers.
#[test]
fn the_alert_rules_watch_metrics_that_exist_with_the_seed_thresholds() {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&deploy("alerts.yml")).expect("alerts.yml is YAML");
    let mut alerts = std::collections::BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule").to_owned();
            let expr = rule["expr"].as_str().expect("an expression").to_owned();
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{name} names no metric: {expr}");
            for metric in names {
                assert!(
                    exported(&metric),
                    "{name} watches {metric}, which dagq does not export"
                );
            }
            alerts.insert(name, expr.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    for (alert, needed) in [
        ("DagqTaskSuccessRateLow", "< 0.995"),
        ("DagqTaskLatencyP99High", "histogram_quantile(0.99,"),
        ("DagqTaskLatencyP99High", "> 30"),
        ("DagqBacklogHigh", "dagq_queue_messages) > 50"),
        (
            "DagqDeadLettersIncreasing",
            "increase(dagq_dead_letters_total",
        ),
        ("DagqBreakerOpen", "dagq_breaker_open) == 1"),
        ("DagqQueueWithoutConsumers", "dagq_queue_consumers) == 0"),
    ] {
        let expr = alerts
            .get(alert)
            .unwrap_or_else(|| panic!("alerts.yml has no {alert}"));
        assert!(expr.contains(needed), "{alert} has {needed:?}: {expr}");
    }
}
