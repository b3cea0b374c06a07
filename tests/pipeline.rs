//! The core path: an event in, a DAG run across a worker, every transition in Postgres.

mod common;

use std::time::Duration;

use common::{TestEnv, diamond};
use serde_json::json;

/// A diamond (A → B, C, D → E) completes; each node is queued, running and completed
/// exactly once, in that order, and E starts only after B, C and D completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_runs_each_node_once_in_order() {
    let env = TestEnv::new().await;
    env.apply(diamond("diamond", "noop")).await;
    let worker = env.start_default_worker();
    let event = env.request_run("diamond", json!({})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    assert_eq!(status.run.state, "completed");
    assert_eq!(status.nodes.len(), 5);
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.state == "completed" && n.attempt == 1),
        "{:?}",
        status.nodes
    );

    let transitions = env.store.transitions(status.run.id).await.unwrap();
    for node in ["a", "b", "c", "d", "e"] {
        let path: Vec<_> = transitions
            .iter()
            .filter(|t| t.node_id.as_deref() == Some(node))
            .map(|t| t.to_state.as_str())
            .collect();
        assert_eq!(
            path,
            ["pending", "queued", "running", "completed"],
            "node {node}"
        );
    }
    let position = |node: &str, state: &str| {
        transitions
            .iter()
            .position(|t| t.node_id.as_deref() == Some(node) && t.to_state == state)
            .unwrap()
    };
    for parent in ["b", "c", "d"] {
        assert!(
            position(parent, "completed") < position("e", "queued"),
            "e queued before {parent} completed"
        );
        assert!(position("a", "completed") < position(parent, "queued"));
    }
    let run_states: Vec<_> = transitions
        .iter()
        .filter(|t| t.node_id.is_none())
        .map(|t| t.to_state.as_str())
        .collect();
    assert_eq!(run_states, ["running", "completed"]);
    worker.stop().await;
}

/// Templates read the event, the run input and upstream outputs, keeping JSON types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_nodes_read_input_and_upstream_outputs() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "shape",
        "nodes": [
            {"id": "first", "type": "transform", "input": {"n": "{{ input.n }}", "who": "{{ event.source }}"}},
            {"id": "second", "type": "transform", "depends": ["first"],
             "input": {"doubled": "{{ nodes.first.output.n * 2 }}", "text": "n is {{ nodes.first.output.n }}"}}
        ]
    }))
    .await;
    let worker = env.start_default_worker();
    let event = env.request_run("shape", json!({"n": 21})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    assert_eq!(status.run.state, "completed");
    let second = status.nodes.iter().find(|n| n.node_id == "second").unwrap();
    assert_eq!(
        second.output,
        Some(json!({"doubled": 42, "text": "n is 21"}))
    );
    let first = status.nodes.iter().find(|n| n.node_id == "first").unwrap();
    assert_eq!(first.output, Some(json!({"n": 21, "who": "test"})));
    worker.stop().await;
}

/// The same event published twice starts one run; a workflow's trigger filter decides
/// which events start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_twice_starts_one_run_and_filters_apply() {
    let env = TestEnv::new().await;
    env.apply(json!({
        "name": "on-push",
        "triggers": [{"event": "git.push", "filter": "{{ event.data.branch == 'main' }}"}],
        "nodes": [{"id": "only", "type": "noop"}]
    }))
    .await;
    let worker = env.start_default_worker();
    let main =
        dagq::engine::messages::new_event("git.push", "hook", None, json!({"branch": "main"}));
    let dev = dagq::engine::messages::new_event("git.push", "hook", None, json!({"branch": "dev"}));
    env.publish_event(&dev).await;
    env.publish_event(&main).await;
    env.publish_event(&main).await;
    env.wait_run(&main, Duration::from_secs(30)).await;
    // Publish a marker after the rest and wait for it; then stop the worker, which
    // finishes what it started and hands back the rest. An empty trigger queue after that
    // means every event was processed, so a missing run really is a filtered event.
    let marker =
        dagq::engine::messages::new_event("git.push", "hook", None, json!({"branch": "main"}));
    env.publish_event(&marker).await;
    env.wait_run(&marker, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(
        common::queue_depth(&env, &env.topology().triggers_queue()).await,
        0,
        "every event was processed"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM runs").await,
        2,
        "main once and the marker"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM runs WHERE event_id = '{}'",
            dev["id"].as_str().unwrap()
        ))
        .await,
        0
    );
}

/// The type in a task message is only a hint: a message calling a `transform` node a
/// `noop` still runs the transform stored in the run's workflow version (a noop would
/// be completed by its claim, with an empty output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_message_that_calls_a_node_noop_runs_the_node_as_stored() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "hint", "nodes": [
        {"id": "t", "type": "transform", "input": {"n": "{{ input.n }}"}},
        {"id": "after", "type": "noop", "queue": "elsewhere", "depends": ["t"]}
    ]}))
    .await;
    // Events and `after` only: t's message waits in its queue.
    let events = env.start_worker_serving("elsewhere");
    let event = env.request_run("hint", json!({"n": 7})).await;
    let run = common::run_id_of(&env, &event).await;
    let queue = env.topology().task_queue("transform");
    common::eventually(
        "t's message in its queue",
        Duration::from_secs(20),
        || async { (common::ready_messages(&env, &queue).await == Some(1)).then_some(()) },
    )
    .await;
    // Swap it for the same message saying "noop".
    env.channel()
        .await
        .queue_purge(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let forged = json!({"run_id": run, "node_id": "t", "attempt": 1, "workflow": "hint",
                        "version": 1, "queue": "transform", "type": "noop"});
    env.publisher()
        .await
        .publish_task("transform", &serde_json::to_vec(&forged).unwrap(), 0)
        .await
        .unwrap();
    let transforms = env.start_worker_serving("transform");
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    transforms.stop().await;
    events.stop().await;
    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    assert_eq!(common::node(&status, "t").output, Some(json!({"n": 7})));
}
