//! Circuit breakers per model profile, shared by every worker through Postgres: three
//! consecutive failures open one, with an alert and an incident; tasks then go to the
//! fallback, or the profile's queue pauses on every worker until a trial call after the
//! cool-down (or `dagq breaker reset`) closes it.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestEnv, eventually, node, queue_consumers, queue_depth, run_id_of};
use dagq::config::{AlertsConfig, BreakerConfig, FileConfig, ModelProfile, Provider};
use serde_json::{Value, json};
use support::{
    Stub, chat_reply, hits, json_reply, profile, retry_policy, run_dagq, status_reply, stub,
};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A provider answering 503 until switched on, recording when each request came.
struct Provider503 {
    stub: Stub,
    healthy: Arc<AtomicBool>,
    times: Arc<Mutex<Vec<DateTime<Utc>>>>,
}

impl Provider503 {
    async fn start() -> Provider503 {
        let healthy = Arc::new(AtomicBool::new(false));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (switch, log) = (healthy.clone(), times.clone());
        let stub = stub(move |_| {
            log.lock().unwrap().push(Utc::now());
            if switch.load(Ordering::SeqCst) {
                chat_reply("fine")
            } else {
                status_reply(503)
            }
        })
        .await;
        Provider503 {
            stub,
            healthy,
            times,
        }
    }

    fn profile(&self, fallback: &[&str]) -> ModelProfile {
        let mut profile = profile(Provider::Openai, &format!("{}/v1", self.stub.base), "m");
        profile.fallback = fallback.iter().map(|f| f.to_string()).collect();
        profile
    }

    /// Requests received within [from, until).
    fn requests_between(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> usize {
        let times = self.times.lock().unwrap();
        times.iter().filter(|t| **t >= from && **t < until).count()
    }
}

/// Breakers open after 3 failures and cool down for `cooldown`; alerts and incidents go
/// to `sink` (`/alerts`, `/incidents`).
fn config(profiles: Vec<(&str, ModelProfile)>, sink: &Stub, cooldown: Duration) -> FileConfig {
    FileConfig {
        models: profiles
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect(),
        breaker: BreakerConfig {
            threshold: 3,
            cooldown,
        },
        alerts: AlertsConfig {
            webhooks: vec![format!("{}/alerts", sink.base)],
            incident_webhook: Some(format!("{}/incidents", sink.base)),
            ..AlertsConfig::default()
        },
    }
}

/// Workflow `ask`: one chat node on `profile`.
fn ask(profile: &str, retry: Value) -> Value {
    json!({"name": "ask", "nodes": [{"id": "ask", "type": "chat", "model": profile,
        "retry": retry, "input": {"messages": [{"role": "user", "content": "{{ input.q }}"}]}}]})
}

/// (state, consecutive failures, opened_at) of a profile's breaker.
async fn breaker(env: &TestEnv, profile: &str) -> Option<(String, i32, Option<DateTime<Utc>>)> {
    let sql = env.sql().await;
    let row = sql
        .query_opt(
            "SELECT state, consecutive_failures, opened_at FROM breakers WHERE profile = $1",
            &[&profile],
        )
        .await
        .unwrap();
    row.map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// `dagq breaker list --json`, as (profile, state) pairs.
async fn breaker_list(env: &TestEnv) -> Vec<(String, String)> {
    let mut command = env.command();
    command.args(["breaker", "list", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&run_dagq(command).await).expect("JSON");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    listed
        .iter()
        .map(|b| (text(&b["profile"]), text(&b["state"])))
        .collect()
}

/// (resolved, count) of the incidents of a profile's breaker.
async fn incidents(env: &TestEnv, profile: &str) -> Vec<bool> {
    let sql = env.sql().await;
    let rows = sql
        .query(
            "SELECT resolved_at IS NOT NULL FROM incidents WHERE subject = $1 ORDER BY created_at",
            &[&format!("breaker open: {profile}")],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn alert_subjects(sink: &Stub) -> Vec<String> {
    let alerts = sink.seen().into_iter().filter(|s| s.path == "/alerts");
    alerts
        .map(|s| s.body["subject"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// (profile, status) of a run's model calls, in order.
async fn calls(env: &TestEnv, run: Uuid) -> Vec<(String, String)> {
    let sql = env.sql().await;
    let rows = sql
        .query(
            "SELECT profile, status FROM model_calls WHERE run_id = $1 ORDER BY id",
            &[&run],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

/// Three runs in a row whose primary profile answers 503 (each completing on the
/// fallback) open the primary's breaker: `dagq breaker list` shows it open, an incident is
/// open and was posted once, the alert went out. The next runs complete on the fallback
/// without a call to the primary while its breaker stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failures_open_the_breaker_and_the_next_tasks_complete_on_the_fallback() {
    let primary = Provider503::start().await;
    let backup = stub(|_| chat_reply("from the backup")).await;
    let sink = stub(|_| json_reply(200, json!({}))).await;
    let backup_profile = profile(Provider::Openai, &format!("{}/v1", backup.base), "b");
    let profiles = vec![
        ("primary", primary.profile(&["backup"])),
        ("backup", backup_profile),
    ];
    let env = TestEnv::with_config(config(profiles, &sink, Duration::from_secs(2))).await;
    env.apply(ask("primary", retry_policy(1, "250ms"))).await;
    let worker = env.start_default_worker();
    for n in 0..3 {
        assert_eq!(
            breaker(&env, "primary").await.map(|b| b.0),
            (n > 0).then(|| "closed".into())
        );
        let status = env
            .wait_run(&env.request_run("ask", json!({"q": n})).await, TIMEOUT)
            .await;
        assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
        let expected = [pair("primary", "http_503"), pair("backup", "ok")];
        assert_eq!(calls(&env, status.run.id).await, expected);
    }

    let (state, failures, opened_at) = breaker(&env, "primary").await.expect("a breaker row");
    assert_eq!((state.as_str(), failures), ("open", 3));
    assert!(breaker_list(&env).await.contains(&pair("primary", "open")));
    assert_eq!(
        incidents(&env, "primary").await,
        [false],
        "one open incident"
    );
    let posted: Vec<_> = sink
        .seen()
        .into_iter()
        .filter(|s| s.path == "/incidents")
        .collect();
    assert_eq!(posted.len(), 1, "the incident was posted once");
    assert_eq!(posted[0].body["subject"], "breaker open: primary");
    assert_eq!(alert_subjects(&sink), ["breaker open: primary"]);

    let mut events = Vec::new();
    for n in 3..6 {
        events.push(env.request_run("ask", json!({"q": n})).await);
    }
    for event in &events {
        let status = env.wait_run(event, TIMEOUT).await;
        assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
        let answer = node(&status, "ask").output.clone().expect("an answer");
        assert_eq!(answer["text"], "from the backup");
        assert_eq!(calls(&env, status.run.id).await, [pair("backup", "ok")]);
    }
    worker.stop().await;
    assert_eq!(
        hits(&primary.stub, "/v1/chat/completions"),
        3,
        "the primary was called while open"
    );
    let still = breaker(&env, "primary").await.expect("a breaker row");
    assert_eq!(
        (still.0.as_str(), still.2),
        ("open", opened_at),
        "no trial happened meanwhile"
    );
}

/// Without a fallback, an open breaker pauses the profile's queue on both workers: its
/// consumers drop to 0 and new tasks wait there, queued at attempt 1. After the 2 s
/// cool-down, with the provider healthy, one trial call closes the breaker, the incident
/// is resolved, both workers consume again and every run completes; the tasks that waited
/// were never failed and no request reached the provider while the breaker was open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fallback_the_queue_pauses_on_every_worker_until_a_trial_call_closes_it() {
    let provider = Provider503::start().await;
    let sink = stub(|_| json_reply(200, json!({}))).await;
    let cooldown = Duration::from_secs(2);
    let env = TestEnv::with_config(config(
        vec![("solo", provider.profile(&[]))],
        &sink,
        cooldown,
    ))
    .await;
    env.apply(ask("solo", retry_policy(10, "250ms"))).await;
    let workers = [env.start_default_worker(), env.start_default_worker()];
    let queue = env.topology().task_queue("solo");
    eventually("both workers to consume the queue", TIMEOUT, || async {
        (queue_consumers(&env, &queue).await == 2).then_some(())
    })
    .await;

    let first = run_id_of(&env, &env.request_run("ask", json!({"q": "first"})).await).await;
    let opened_at = eventually(
        "the breaker to open and both workers to pause",
        TIMEOUT,
        || async {
            let (state, _, opened_at) = breaker(&env, "solo").await?;
            (state == "open" && queue_consumers(&env, &queue).await == 0).then_some(opened_at?)
        },
    )
    .await;
    let mut waiting = Vec::new();
    for n in 0..3 {
        waiting.push(run_id_of(&env, &env.request_run("ask", json!({"q": n})).await).await);
    }
    let queued_at_1 = "SELECT count(*) FROM node_runs WHERE state = 'queued' AND attempt = 1";
    eventually(
        "the new tasks to wait in the paused queue",
        TIMEOUT,
        || async {
            let queued = env
                .count(&format!("{queued_at_1} AND run_id <> '{first}'"))
                .await;
            let paused = queue_consumers(&env, &queue).await == 0;
            (queued == 3 && paused && queue_depth(&env, &queue).await >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        breaker(&env, "solo").await.unwrap().0,
        "open",
        "still open: the checks above raced the cool-down"
    );
    assert_eq!(incidents(&env, "solo").await, [false]);
    assert_eq!(hits(&sink, "/incidents"), 1);

    provider.healthy.store(true, Ordering::SeqCst);
    eventually("every run to complete", TIMEOUT, || async {
        (env.count("SELECT count(*) FROM runs WHERE state = 'completed'")
            .await
            == 4)
            .then_some(())
    })
    .await;
    eventually(
        "the incident to be resolved and both workers back",
        TIMEOUT,
        || async {
            let resolved = incidents(&env, "solo").await == [true];
            (resolved && queue_consumers(&env, &queue).await == 2).then_some(())
        },
    )
    .await;
    for worker in workers {
        worker.stop().await;
    }

    assert_eq!(breaker(&env, "solo").await.unwrap().0, "closed");
    assert_eq!(
        alert_subjects(&sink),
        ["breaker open: solo", "breaker closed: solo"]
    );
    let until = opened_at + chrono::Duration::from_std(cooldown).unwrap();
    assert_eq!(
        provider.requests_between(opened_at, until),
        0,
        "requests while open"
    );
    let failed = [
        pair("solo", "http_503"),
        pair("solo", "http_503"),
        pair("solo", "http_503"),
    ];
    assert_eq!(
        calls(&env, first).await,
        [&failed[..], &[pair("solo", "ok")]].concat()
    );
    for run in waiting {
        assert_eq!(calls(&env, run).await, [pair("solo", "ok")], "run {run}");
        let status = env.store.run_status(run).await.unwrap().unwrap();
        assert_eq!(
            node(&status, "ask").attempt,
            1,
            "a waiting task used up an attempt"
        );
    }
    let lost =
        "SELECT count(*) FROM transitions WHERE to_state IN ('failed', 'retrying') AND run_id <> ";
    assert_eq!(
        env.count(&format!("{lost} '{first}'")).await,
        0,
        "waiting tasks failed or retried"
    );
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

/// `dagq breaker reset PROFILE` closes an open breaker long before its cool-down (1 h
/// here), resolves its incident, and the worker resumes the queue: the waiting task
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_reset_closes_an_open_breaker_by_hand() {
    let provider = Provider503::start().await;
    let sink = stub(|_| json_reply(200, json!({}))).await;
    let hour = Duration::from_secs(3600);
    let env =
        TestEnv::with_config(config(vec![("solo", provider.profile(&[]))], &sink, hour)).await;
    env.apply(ask("solo", retry_policy(10, "250ms"))).await;
    let worker = env.start_default_worker();
    let queue = env.topology().task_queue("solo");
    let run = run_id_of(&env, &env.request_run("ask", json!({"q": "hi"})).await).await;
    eventually(
        "the breaker to open and the queue to pause",
        TIMEOUT,
        || async {
            let open = breaker(&env, "solo").await.is_some_and(|b| b.0 == "open");
            (open && queue_consumers(&env, &queue).await == 0).then_some(())
        },
    )
    .await;
    assert!(breaker_list(&env).await.contains(&pair("solo", "open")));

    provider.healthy.store(true, Ordering::SeqCst);
    let mut command = env.command();
    command.args(["breaker", "reset", "solo"]);
    let said = run_dagq(command).await;
    assert!(said.contains("closed"), "{said}");
    assert_eq!(
        breaker(&env, "solo").await.map(|b| (b.0, b.1)),
        Some(("closed".into(), 0))
    );
    assert!(breaker_list(&env).await.contains(&pair("solo", "closed")));
    assert_eq!(incidents(&env, "solo").await, [true]);
    eventually("the run to complete", TIMEOUT, || async {
        let status = env.store.run_status(run).await.unwrap()?;
        (status.run.state == "completed").then_some(())
    })
    .await;
    assert_eq!(
        queue_consumers(&env, &queue).await,
        1,
        "the worker consumes the queue again"
    );
    worker.stop().await;
}
