//! Retries through the TTL delay queues: the attempt and every wait are in Postgres,
//! a provider's `Retry-After` wins when longer, and no worker sleeps meanwhile. End to
//! end through a worker against a stub provider on loopback.

mod common;
mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestEnv, eventually, model_call_statuses, node};
use dagq::engine::WorkerOptions;
use serde_json::{Value, json};
use support::{
    ask_workflow as ask, failing_first, retry_policy as policy, status_reply, stub_config as config,
};
use uuid::Uuid;

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A one-node workflow that needs no provider.
fn quick() -> Value {
    json!({"name": "quick", "nodes": [{"id": "only", "type": "transform", "input": {"ok": true}}]})
}

type Step = (Option<String>, String, Option<i32>, DateTime<Utc>);

/// (from, to, attempt, at) of one node's transitions, in order.
async fn steps(env: &TestEnv, run: Uuid, node_id: &str) -> Vec<Step> {
    let rows = env.store.transitions(run).await.expect("transitions");
    rows.into_iter()
        .filter(|t| t.node_id.as_deref() == Some(node_id))
        .map(|t| (t.from_state, t.to_state, t.attempt, t.at))
        .collect()
}

fn shape(steps: &[Step]) -> Vec<(String, String, i32)> {
    let text = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    steps
        .iter()
        .map(|(f, t, a, _)| (text(f), t.clone(), a.unwrap_or(0)))
        .collect()
}

/// The wait between `running → retrying` of `attempt` and `retrying → queued` of the next.
fn wait_after(steps: &[Step], attempt: i32) -> Duration {
    let at = |from: &str, to: &str, a: i32| {
        let found = steps
            .iter()
            .find(|(f, t, n, _)| f.as_deref() == Some(from) && t == to && *n == Some(a));
        found
            .unwrap_or_else(|| panic!("no {from} → {to} at attempt {a}: {:?}", shape(steps)))
            .3
    };
    let gap = at("retrying", "queued", attempt + 1) - at("running", "retrying", attempt);
    gap.to_std().expect("the retry comes after the failure")
}

/// A provider answering 503 twice, then 200: the node completes on attempt 3; each
/// failure shows in `transitions` as running → retrying → queued → running, with at least
/// the policy's delay (250 ms, then 500 ms) between `retrying` and the next `queued`; one
/// model call per attempt, each with its own idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_failing_twice_completes_the_node_on_attempt_three_after_visible_waits() {
    let provider = failing_first(2, status_reply(503)).await;
    let env = TestEnv::with_config(config(&[("flaky", &provider)], None)).await;
    env.apply(ask("flaky", policy(4, "250ms"))).await;
    let worker = env.start_default_worker();
    let event = env.request_run("ask", json!({"q": "hello"})).await;
    let status = env.wait_run(&event, RUN_TIMEOUT).await;
    worker.stop().await;

    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    assert_eq!(node(&status, "ask").attempt, 3);
    let run = status.run.id;
    let steps = steps(&env, run, "ask").await;
    let s = |f: &str, t: &str, a: i32| (f.to_owned(), t.to_owned(), a);
    assert_eq!(
        shape(&steps),
        [
            s("-", "pending", 1),
            s("pending", "queued", 1),
            s("queued", "running", 1),
            s("running", "retrying", 1),
            s("retrying", "queued", 2),
            s("queued", "running", 2),
            s("running", "retrying", 2),
            s("retrying", "queued", 3),
            s("queued", "running", 3),
            s("running", "completed", 3),
        ]
    );
    for (attempt, delay) in [(1, 250), (2, 500)] {
        let waited = wait_after(&steps, attempt);
        assert!(
            waited >= Duration::from_millis(delay),
            "attempt {attempt} waited only {waited:?}"
        );
    }
    let s = |a: i32, status: &str| (a, status.to_owned());
    assert_eq!(
        model_call_statuses(&env, run).await,
        [s(1, "http_503"), s(2, "http_503"), s(3, "ok")]
    );
    let keys: Vec<_> = provider
        .seen()
        .iter()
        .map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    let expected: Vec<_> = (1..=3).map(|a| Some(format!("{run}/ask/{a}"))).collect();
    assert_eq!(keys, expected);
}

/// With one worker of concurrency 1, a run of another workflow completes while a node
/// waits out its 2 s retry delay: the wait is in a delay queue, not in a sleeping worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_retry_does_not_keep_a_single_slot_worker_from_other_runs() {
    let provider = failing_first(1, status_reply(503)).await;
    let env = TestEnv::with_config(config(&[("flaky", &provider)], None)).await;
    env.apply(ask("flaky", policy(3, "2s"))).await;
    env.apply(quick()).await;
    let worker = env.start_worker(WorkerOptions {
        concurrency: 1,
        queue_refresh: Duration::from_millis(200),
        ..WorkerOptions::default()
    });
    let slow = env.request_run("ask", json!({"q": "hello"})).await;
    let slow_run = common::run_id_of(&env, &slow).await;
    eventually("the first attempt to fail", RUN_TIMEOUT, || async {
        let status = env.store.run_status(slow_run).await.unwrap()?;
        (node(&status, "ask").state == "retrying").then_some(())
    })
    .await;
    let other = env
        .wait_run(&env.request_run("quick", json!({})).await, RUN_TIMEOUT)
        .await;
    let slow_status = env.wait_run(&slow, RUN_TIMEOUT).await;
    worker.stop().await;

    assert_eq!(other.run.state, "completed");
    assert_eq!(
        slow_status.run.state, "completed",
        "{:?}",
        slow_status.nodes
    );
    let steps = steps(&env, slow_run, "ask").await;
    let failed_at = steps.iter().find(|s| s.1 == "retrying").expect("a retry").3;
    let other_done = other.run.finished_at.expect("a finished run has an end");
    assert!(
        other_done < failed_at + chrono::Duration::seconds(2),
        "the other run finished {:?} after the failure, not within the 2 s retry delay",
        other_done - failed_at
    );
    assert!(
        wait_after(&steps, 1) >= Duration::from_secs(2),
        "{:?}",
        shape(&steps)
    );
    assert_eq!(node(&slow_status, "ask").attempt, 2);
}

/// A 429 with `Retry-After: 2` under a 250 ms policy waits the 2 s the provider asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_the_provider_wins_over_a_shorter_policy_delay() {
    let mut limited = status_reply(429);
    limited.headers.push(("retry-after", "2"));
    let provider = failing_first(1, limited).await;
    let env = TestEnv::with_config(config(&[("limited", &provider)], None)).await;
    env.apply(ask("limited", policy(3, "250ms"))).await;
    let worker = env.start_default_worker();
    let status = env
        .wait_run(
            &env.request_run("ask", json!({"q": "hi"})).await,
            RUN_TIMEOUT,
        )
        .await;
    worker.stop().await;

    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    let steps = steps(&env, status.run.id, "ask").await;
    let waited = wait_after(&steps, 1);
    assert!(
        waited >= Duration::from_secs(2),
        "waited only {waited:?} despite Retry-After: 2"
    );
    let s = |a: i32, status: &str| (a, status.to_owned());
    assert_eq!(
        model_call_statuses(&env, status.run.id).await,
        [s(1, "http_429"), s(2, "ok")]
    );
}
