//! Conditions, trigger rules and priorities decide which nodes run, which are skipped,
//! in what order, and how the run ends.

mod common;

use std::time::Duration;

use common::{TestEnv, eventually, node, queue_depth, run_id_of};
use dagq::engine::WorkerOptions;
use dagq::store::RunStatus;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A transform whose input reads an undefined variable: templates are strict, so the
/// node fails at render time, deterministically and without any provider.
fn broken(id: &str) -> Value {
    json!({"id": id, "type": "transform", "input": {"x": "{{ input.missing }}"}})
}

/// Runs `workflow` once with `input` on a fresh default worker and returns the result.
async fn run_once(env: &TestEnv, workflow: &str, input: Value) -> RunStatus {
    let worker = env.start_default_worker();
    let event = env.request_run(workflow, input).await;
    let status = env.wait_run(&event, WAIT).await;
    worker.stop().await;
    status
}

/// `when` reads `input.*`, `event.*` and `nodes.<id>.output.*` (with or without braces):
/// false skips the node, saying it was the condition, and the skip propagates down
/// `all_success` edges; true runs it. A run of completed and skipped nodes completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_skip_or_run_nodes_and_skips_propagate() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "gated",
        "nodes": [
            {"id": "gate", "type": "transform", "input": {"go": "{{ input.go }}"}},
            {"id": "on_input", "type": "noop", "when": "{{ input.go }}"},
            {"id": "on_event", "type": "noop", "when": "{{ event.data.input.go }}"},
            {"id": "on_output", "type": "noop", "depends": ["gate"], "when": "{{ nodes.gate.output.go }}"},
            {"id": "on_bare", "type": "noop", "depends": ["gate"], "when": "nodes.gate.output.go == true"},
            {"id": "below_input", "type": "noop", "depends": ["on_input"]},
            {"id": "below_output", "type": "noop", "depends": ["on_output", "on_bare"]},
            {"id": "tail", "type": "noop", "depends": ["below_output"]}
        ]
    }))
    .await;
    let gated = ["on_input", "on_event", "on_output", "on_bare"];

    let status = run_once(&env, "gated", json!({"go": false})).await;
    assert_eq!(
        status.run.state, "completed",
        "only completed and skipped nodes: {:?}",
        status.nodes
    );
    assert_eq!(node(&status, "gate").state, "completed");
    for id in gated {
        let n = node(&status, id);
        assert_eq!(n.state, "skipped", "{id}: {n:?}");
        let error = n.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("when condition") && error.contains("false"),
            "{id}: {error}"
        );
    }
    let below = node(&status, "below_input");
    assert_eq!(below.state, "skipped");
    assert_eq!(
        below.error.as_deref(),
        Some("upstream \"on_input\" skipped")
    );
    for id in ["below_output", "tail"] {
        assert_eq!(
            node(&status, id).state,
            "skipped",
            "skips propagate two levels down: {id}"
        );
    }
    for id in gated.iter().chain(&["below_input", "below_output", "tail"]) {
        assert_eq!(node(&status, id).started_at, None, "{id} never ran");
    }

    let status = run_once(&env, "gated", json!({"go": true})).await;
    assert_eq!(status.run.state, "completed");
    assert!(
        status.nodes.iter().all(|n| n.state == "completed"),
        "{:?}",
        status.nodes
    );
}

/// An `all_done` node runs after a failed and a skipped parent, while an `all_success`
/// sibling is skipped naming the failed parent; the run ends `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_done_runs_after_failed_and_skipped_parents() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "cleanup",
        "nodes": [
            broken("broken"),
            {"id": "off", "type": "noop", "when": "{{ false }}"},
            {"id": "ok", "type": "noop"},
            {"id": "cleanup", "type": "noop", "depends": ["broken", "off", "ok"], "trigger_rule": "all_done"},
            {"id": "strict", "type": "noop", "depends": ["broken"]}
        ]
    }))
    .await;
    let status = run_once(&env, "cleanup", json!({})).await;
    let failed = node(&status, "broken");
    assert_eq!(failed.state, "failed");
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("input template"),
        "{failed:?}"
    );
    assert_eq!(node(&status, "off").state, "skipped");
    assert_eq!(node(&status, "cleanup").state, "completed");
    let strict = node(&status, "strict");
    assert_eq!(strict.state, "skipped");
    assert_eq!(strict.error.as_deref(), Some("upstream \"broken\" failed"));
    assert_eq!(status.run.state, "failed", "a failed node fails the run");
}

/// A `one_success` node starts as soon as one parent completed, while the other parent
/// is still waiting in a queue that no worker serves yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_success_runs_as_soon_as_one_parent_completed() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "race",
        "nodes": [
            {"id": "fast", "type": "noop"},
            {"id": "slow", "type": "noop", "queue": "parked"},
            {"id": "either", "type": "noop", "depends": ["fast", "slow"], "trigger_rule": "one_success"}
        ]
    }))
    .await;
    let noop_only = env.start_worker(WorkerOptions {
        queues: Some(vec!["noop".into()]),
        queue_refresh: Duration::from_millis(200),
        ..WorkerOptions::default()
    });
    let event = env.request_run("race", json!({})).await;
    let run = run_id_of(&env, &event).await;
    let status = eventually("either to complete", WAIT, || async {
        let status = env.store.run_status(run).await.unwrap().unwrap();
        (node(&status, "either").state == "completed").then_some(status)
    })
    .await;
    assert_eq!(
        node(&status, "slow").state,
        "queued",
        "either did not wait for slow"
    );
    assert_eq!(status.run.state, "running");
    noop_only.stop().await;

    let parked = env.start_default_worker();
    let status = env.wait_run(&event, WAIT).await;
    assert_eq!(status.run.state, "completed");
    assert_eq!(node(&status, "slow").state, "completed");
    assert_eq!(node(&status, "either").attempt, 1, "either ran once");
    parked.stop().await;
}

/// A `one_success` node is skipped when every parent failed or was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_success_is_skipped_when_no_parent_completed() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "nobody",
        "nodes": [
            broken("broken"),
            {"id": "off", "type": "noop", "when": "{{ input.go }}"},
            {"id": "either", "type": "noop", "depends": ["broken", "off"], "trigger_rule": "one_success"}
        ]
    }))
    .await;
    let status = run_once(&env, "nobody", json!({"go": false})).await;
    assert_eq!(node(&status, "broken").state, "failed");
    assert_eq!(node(&status, "off").state, "skipped");
    let either = node(&status, "either");
    assert_eq!(either.state, "skipped", "{either:?}");
    assert_eq!(either.started_at, None);
    assert_eq!(status.run.state, "failed");
}

/// A `none_failed` node runs when its parents completed or were skipped (and the run
/// completes), but is skipped when one of them failed (and the run fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_failed_accepts_skipped_parents_but_not_failed_ones() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "clean",
        "nodes": [
            {"id": "ok", "type": "noop"},
            {"id": "off", "type": "noop", "when": "{{ false }}"},
            {"id": "after", "type": "noop", "depends": ["ok", "off"], "trigger_rule": "none_failed"}
        ]
    }))
    .await;
    env.apply(json!({
        "name": "tainted",
        "nodes": [
            {"id": "ok", "type": "noop"},
            broken("broken"),
            {"id": "after", "type": "noop", "depends": ["ok", "broken"], "trigger_rule": "none_failed"}
        ]
    }))
    .await;
    let clean = run_once(&env, "clean", json!({})).await;
    assert_eq!(node(&clean, "off").state, "skipped");
    assert_eq!(
        node(&clean, "after").state,
        "completed",
        "{:?}",
        clean.nodes
    );
    assert_eq!(clean.run.state, "completed");

    let tainted = run_once(&env, "tainted", json!({})).await;
    assert_eq!(node(&tainted, "broken").state, "failed");
    let after = node(&tainted, "after");
    assert_eq!(after.state, "skipped", "{after:?}");
    assert_eq!(after.error.as_deref(), Some("upstream \"broken\" failed"));
    assert_eq!(tainted.run.state, "failed");
}

/// From a backlog on one queue, a worker taking one task at a time starts them by
/// priority: the run's priority (`dagq run --priority`), overridden by the node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_tasks_are_taken_first_from_a_backlog() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "plain", "nodes": [{"id": "only", "type": "noop"}]}))
        .await;
    env.apply(json!({"name": "urgent", "nodes": [{"id": "only", "type": "noop", "priority": 9}]}))
        .await;
    // Serving only this queue, a worker starts runs without taking any `noop` task.
    env.apply(json!({"name": "idle", "nodes": [{"id": "idle", "type": "noop", "queue": "idle"}]}))
        .await;
    let triggers_only = env.start_worker(WorkerOptions {
        queues: Some(vec!["idle".into()]),
        queue_refresh: Duration::from_millis(200),
        ..WorkerOptions::default()
    });
    // (workflow, --priority, the priority its task should get), interleaved so that
    // publication order and priority order differ.
    let mut backlog = Vec::new();
    for _ in 0..3 {
        backlog.extend([
            ("plain", Some(1), 1),
            ("plain", None, 0),
            ("urgent", Some(2), 9),
            ("plain", Some(5), 5),
        ]);
    }
    for (workflow, priority, expected) in &backlog {
        dagq::commands::request_run(
            &env.settings,
            workflow,
            json!({"expected": expected}),
            *priority,
        )
        .await
        .expect("request a run");
    }
    let total = backlog.len() as i64;
    eventually("every task to be queued", WAIT, || async {
        (env.count("SELECT count(*) FROM node_runs WHERE state = 'queued'")
            .await
            == total)
            .then_some(())
    })
    .await;
    // Stopping drains in-flight triggers, so every queued task was also published.
    triggers_only.stop().await;
    let noop_queue = env.topology().task_queue("noop");
    assert_eq!(
        i64::from(queue_depth(&env, &noop_queue).await),
        total,
        "the backlog waits in {noop_queue}"
    );

    let one_at_a_time = env.start_worker(WorkerOptions {
        queues: Some(vec!["noop".into()]),
        concurrency: 1,
        queue_refresh: Duration::from_millis(200),
        ..WorkerOptions::default()
    });
    eventually("every run to complete", WAIT, || async {
        (env.count("SELECT count(*) FROM runs WHERE state = 'completed'")
            .await
            == total)
            .then_some(())
    })
    .await;
    one_at_a_time.stop().await;

    let rows = env
        .sql()
        .await
        .query(
            "SELECT (r.input->>'expected')::int FROM transitions t JOIN runs r ON r.id = t.run_id
             WHERE t.node_id IS NOT NULL AND t.to_state = 'running' ORDER BY t.id",
            &[],
        )
        .await
        .unwrap();
    let started: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let mut by_priority = started.clone();
    by_priority.sort_by(|a, b| b.cmp(a));
    assert_eq!(started, by_priority, "tasks started in priority order");
    let node_order = env
        .count(
            "SELECT count(*) FROM node_runs a JOIN runs ra ON ra.id = a.run_id,
                    node_runs b JOIN runs rb ON rb.id = b.run_id
             WHERE (ra.input->>'expected')::int > (rb.input->>'expected')::int
               AND a.started_at > b.started_at",
        )
        .await;
    assert_eq!(
        node_order, 0,
        "node_runs.started_at agrees: no lower priority started first"
    );
}
