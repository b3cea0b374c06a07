//! What operators watch, scraped from real workers: counters and histograms of what ran,
//! the backlog gauges of the elected poller, and readiness following the broker.

mod common;
mod telemetry;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{TestEnv, eventually};
use dagq::config::{FileConfig, ModelProfile, Provider};
use dagq::engine::WorkerOptions;
use dagq::mock_llm::{self, MockOptions};
use dagq::telemetry::{self as names, MetricKind, all_metrics};
use serde_json::json;
use telemetry::{BrokerProxy, HttpWorker, Metrics, broker_address, expect_metrics, through_proxy};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn mock_profile(base: std::net::SocketAddr) -> FileConfig {
    let profile = ModelProfile {
        provider: Provider::Openai,
        base_url: Some(format!("http://{base}/v1")),
        model: Some("mock-1".into()),
        api_key_env: None,
        timeout: Duration::from_secs(10),
        fallback: Vec::new(),
        headers: BTreeMap::new(),
        params: Default::default(),
        price_per_1k_prompt: None,
        price_per_1k_completion: None,
    };
    FileConfig {
        models: [("scribe".to_owned(), profile)].into(),
        ..FileConfig::default()
    }
}

/// Every exported `dagq_` series is a metric of the registry, with declared labels only
/// (so never a run id); histograms have real buckets.
fn assert_series_are_declared(metrics: &Metrics) {
    for sample in metrics
        .samples
        .iter()
        .filter(|s| s.name.starts_with("dagq_"))
    {
        let def = all_metrics()
            .find(|d| {
                d.name == sample.name
                    || (d.kind == MetricKind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| sample.name == format!("{}{s}", d.name)))
            })
            .unwrap_or_else(|| panic!("{} is not in the registry", sample.name));
        for (label, value) in &sample.labels {
            let allowed = def.labels.contains(&label.as_str())
                || (label == "le" && sample.name.ends_with("_bucket"));
            assert!(allowed, "{}: undeclared label {label}", sample.name);
            assert!(
                uuid::Uuid::parse_str(value).is_err(),
                "{}: an id as label value {value}",
                sample.name
            );
        }
    }
}

/// Runs through a worker show in its `/metrics`: tasks per queue, type and outcome,
/// runs per workflow and outcome, one duration observation per finished task in real
/// histogram buckets, model calls and tokens as `model_calls` recorded them, and the
/// worker's capacity next to its (now zero) in-flight count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_tasks_runs_and_model_calls_that_ran() {
    let mock_stop = CancellationToken::new();
    let _mock_guard = mock_stop.clone().drop_guard();
    let mock = mock_llm::serve(
        "127.0.0.1:0".parse().unwrap(),
        MockOptions::default(),
        mock_stop,
    )
    .await
    .expect("mock model binds");
    let env = TestEnv::with_config(mock_profile(mock)).await;
    // A port nothing listens on: the http node's calls are refused (retryable).
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    env.apply(json!({"name": "counted", "nodes": [
        {"id": "ask", "type": "chat", "model": "scribe",
         "input": {"messages": [{"role": "user", "content": "{{ input.q }}"}]}},
        {"id": "shape", "type": "transform", "depends": ["ask"], "input": {"text": "{{ nodes.ask.output.text }}"}}
    ]}))
    .await;
    env.apply(json!({"name": "broken", "nodes": [
        {"id": "fetch", "type": "http", "retry": {"max_attempts": 2, "initial_delay": "10ms", "jitter": false},
         "input": {"url": format!("http://{refused}/")}},
        {"id": "after", "type": "noop", "depends": ["fetch"]}
    ]}))
    .await;
    let worker = HttpWorker::start(
        &env.settings,
        WorkerOptions {
            concurrency: 4,
            ..WorkerOptions::default()
        },
    )
    .await;
    let mut counted = Vec::new();
    for i in 0..3 {
        counted.push(
            env.request_run("counted", json!({"q": format!("question {i}")}))
                .await,
        );
    }
    let broken = env.request_run("broken", json!({})).await;
    for event in &counted {
        assert_eq!(env.wait_run(event, WAIT).await.run.state, "completed");
    }
    assert_eq!(env.wait_run(&broken, WAIT).await.run.state, "failed");
    let env = &env;
    let tokens = |kind: &'static str| async move {
        let sql = format!(
            "SELECT COALESCE(sum({kind}_tokens), 0)::bigint FROM model_calls WHERE profile = 'scribe'"
        );
        env.count(&sql).await as f64
    };
    let (prompt, completion) = (tokens("prompt").await, tokens("completion").await);
    assert!(
        prompt > 0.0 && completion > 0.0,
        "the mock model reports usage"
    );

    let chat = [("queue", "scribe"), ("type", "chat")];
    let http = [("queue", "http"), ("type", "http")];
    let with = |base: &[(&'static str, &'static str)], extra: &[(&'static str, &'static str)]| {
        base.iter().chain(extra).copied().collect::<Vec<_>>()
    };
    let expected = vec![
        (
            names::TASKS_TOTAL,
            with(&chat, &[("outcome", "completed")]),
            3.0,
        ),
        (
            names::TASKS_TOTAL,
            vec![("queue", "transform"), ("outcome", "completed")],
            3.0,
        ),
        (
            names::TASKS_TOTAL,
            with(&http, &[("outcome", "retried")]),
            1.0,
        ),
        (
            names::TASKS_TOTAL,
            with(&http, &[("outcome", "failed")]),
            1.0,
        ),
        // Skipped nodes are settled, never delivered, and still counted.
        (
            names::TASKS_TOTAL,
            vec![("queue", "noop"), ("type", "noop"), ("outcome", "skipped")],
            1.0,
        ),
        (
            names::RUNS_TOTAL,
            vec![("workflow", "counted"), ("outcome", "completed")],
            3.0,
        ),
        (
            names::RUNS_TOTAL,
            vec![("workflow", "broken"), ("outcome", "failed")],
            1.0,
        ),
        ("dagq_task_duration_seconds_count", chat.to_vec(), 3.0),
        (
            "dagq_task_duration_seconds_bucket",
            with(&chat, &[("le", "+Inf")]),
            3.0,
        ),
        // Only the final outcome of a task is timed, not the retried attempt.
        ("dagq_task_duration_seconds_count", http.to_vec(), 1.0),
        (
            "dagq_run_duration_seconds_count",
            vec![("workflow", "counted")],
            3.0,
        ),
        (
            names::MODEL_CALLS_TOTAL,
            vec![
                ("profile", "scribe"),
                ("provider", "openai"),
                ("status", "ok"),
            ],
            3.0,
        ),
        (
            "dagq_model_call_duration_seconds_count",
            vec![("profile", "scribe")],
            3.0,
        ),
        (
            names::MODEL_TOKENS_TOTAL,
            vec![("profile", "scribe"), ("kind", "prompt")],
            prompt,
        ),
        (
            names::MODEL_TOKENS_TOTAL,
            vec![("profile", "scribe"), ("kind", "completion")],
            completion,
        ),
        (
            names::DEAD_LETTERS_TOTAL,
            vec![("reason", "task_failed")],
            1.0,
        ),
        (names::EVENTS_TOTAL, vec![("outcome", "started")], 4.0),
        (names::WORKER_CAPACITY, vec![], 4.0),
        (names::WORKER_INFLIGHT, vec![], 0.0),
    ];
    // Counters move just after the commits that wait_run sees: poll until they settle.
    let metrics = expect_metrics(&worker, &expected, WAIT).await;
    let bucket = |le: &'static str| {
        metrics.value(
            "dagq_task_duration_seconds_bucket",
            &with(&chat, &[("le", le)]),
        )
    };
    assert!(
        bucket("30").is_some(),
        "histograms have a 30 s bucket (the P99 alert's threshold)"
    );
    assert!(bucket("0.005") <= bucket("30"), "buckets are cumulative");
    assert_series_are_declared(&metrics);
    worker.stop().await;
}

/// Tasks published while no worker consumes their queue show as a backlog on exactly
/// one worker's `/metrics` (the elected one): ready messages and queued nodes equal the
/// runs requested, the queue has no consumer, and the oldest-queued age grows while
/// they wait. When that worker stops, the other takes over; once a worker serves the
/// queue, the gauges fall to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_shows_in_the_gauges_of_one_elected_worker() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "held", "nodes": [{"id": "wait", "type": "noop", "queue": "held"}]}))
        .await;
    // Serving only this queue, the workers start runs without taking any `held` task.
    env.apply(json!({"name": "idle", "nodes": [{"id": "idle", "type": "noop", "queue": "idle"}]}))
        .await;
    let idle_only = || WorkerOptions {
        queues: Some(vec!["idle".into()]),
        ..WorkerOptions::default()
    };
    let workers = [
        HttpWorker::start(&env.settings, idle_only()).await,
        HttpWorker::start(&env.settings, idle_only()).await,
    ];
    for i in 0..4 {
        env.request_run("held", json!({"i": i})).await;
    }
    let held = [("queue", "held")];
    let waiting = |m: &Metrics| {
        m.value(names::QUEUE_MESSAGES, &held) == Some(4.0)
            && m.value(
                names::QUEUE_NODES,
                &[("queue", "held"), ("state", "queued")],
            ) == Some(4.0)
            && m.value(
                names::QUEUE_NODES,
                &[("queue", "held"), ("state", "running")],
            ) == Some(0.0)
            && m.value(names::QUEUE_CONSUMERS, &held) == Some(0.0)
            && m.value(names::QUEUE_CONSUMERS, &[("queue", "idle")]) == Some(2.0)
            && m.value(names::TRIGGER_QUEUE_MESSAGES, &[]) == Some(0.0)
    };
    let (leader, first) = eventually(
        "one worker, and only one, to export the backlog of 4",
        WAIT,
        || async {
            let scrapes = [workers[0].scrape().await, workers[1].scrape().await];
            let exporting: Vec<usize> = (0..2)
                .filter(|&i| scrapes[i].has_prefix("dagq_queue_"))
                .collect();
            match exporting[..] {
                [i] if waiting(&scrapes[i]) => Some((i, scrapes[i].clone())),
                [_, _] => panic!("both workers export the backlog gauges"),
                _ => None,
            }
        },
    )
    .await;
    let age = |m: &Metrics| {
        m.value(names::QUEUE_OLDEST_QUEUED, &held)
            .expect("the age of the oldest queued node")
    };
    let first_age = age(&first);
    assert!(
        first_age > 0.0,
        "the oldest queued node has waited: {first_age}"
    );
    let later = eventually("the oldest-queued age to grow", WAIT, || async {
        let m = workers[leader].scrape().await;
        (age(&m) >= first_age + 0.5).then_some(m)
    })
    .await;
    assert!(waiting(&later), "the backlog is unchanged while it waits");

    let [a, b] = workers;
    let (gone, follower) = if leader == 0 { (a, b) } else { (b, a) };
    gone.stop().await;
    eventually(
        "the other worker to take over the backlog gauges",
        WAIT,
        || async {
            let m = follower.scrape().await;
            (m.value(names::QUEUE_MESSAGES, &held) == Some(4.0) && age(&m) > first_age)
                .then_some(())
        },
    )
    .await;

    let serving = env.start_worker(WorkerOptions {
        queues: Some(vec!["held".into()]),
        ..WorkerOptions::default()
    });
    eventually("the drained backlog to show as zero", WAIT, || async {
        let m = follower.scrape().await;
        let drained = m.value(names::QUEUE_MESSAGES, &held) == Some(0.0)
            && m.value(
                names::QUEUE_NODES,
                &[("queue", "held"), ("state", "queued")],
            ) == Some(0.0)
            && m.value(names::QUEUE_OLDEST_QUEUED, &held) == Some(0.0);
        drained.then_some(())
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM runs WHERE state = 'completed'")
            .await,
        4
    );
    serving.stop().await;
    follower.stop().await;
}

/// `/readyz` answers 503 naming RabbitMQ while the broker is unreachable (its proxy
/// cut), `/healthz` stays 200, and both recover when it comes back, after which the
/// worker processes runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_broker_is_unreachable_and_recovers() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "after", "nodes": [{"id": "only", "type": "noop"}]}))
        .await;
    let mut proxy = BrokerProxy::start(broker_address(&env.settings)).await;
    let settings = through_proxy(&env.settings, proxy.addr);
    let worker = HttpWorker::start(&settings, WorkerOptions::default()).await;
    let readyz = |want: u16| {
        let worker = &worker;
        async move {
            let (status, body) = worker.get("/readyz").await;
            (status == want).then_some(body)
        }
    };
    eventually("/readyz to answer 200", WAIT, || readyz(200)).await;

    proxy.cut().await;
    let why = eventually("/readyz to answer 503", WAIT, || readyz(503)).await;
    assert!(
        why.contains("RabbitMQ"),
        "/readyz says what is missing: {why}"
    );
    assert_eq!(
        worker.get("/healthz").await.0,
        200,
        "the process is still alive"
    );

    proxy.restore().await;
    eventually("/readyz to answer 200 again", WAIT, || readyz(200)).await;
    let event = env.request_run("after", json!({})).await;
    assert_eq!(env.wait_run(&event, WAIT).await.run.state, "completed");
    worker.stop().await;
}
