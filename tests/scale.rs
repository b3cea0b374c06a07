//! Horizontal scale: many runs of a fan-out/fan-in workflow across several worker
//! processes, with every node's effect exactly once and every join after its parents.

mod common;

use std::time::{Duration, Instant};

use common::{KillOnDrop, TestEnv, assert_each_node_ran_once, eventually, wait_for_consumers};
use serde_json::{Value, json};

const RUNS: i64 = 300;
const WORKERS: u32 = 3;

/// Root, five parallel middle nodes, a join reading the run input: one transform queue
/// and one noop queue, so each worker serves two task queues and the trigger queue.
fn fan_out_fan_in() -> Value {
    let middle = ["m1", "m2", "m3", "m4", "m5"];
    let mut nodes =
        vec![json!({"id": "root", "type": "transform", "input": {"n": "{{ input.n }}"}})];
    nodes.extend(
        middle
            .iter()
            .map(|id| json!({"id": id, "type": "noop", "depends": ["root"]})),
    );
    nodes.push(json!({
        "id": "join", "type": "transform", "depends": middle,
        "input": {"n": "{{ input.n }}", "m1": "{{ nodes.m1.state }}"}
    }));
    json!({"name": "fan", "nodes": nodes})
}

/// 300 runs of root → five middle nodes → join, spread over three `dagq worker`
/// processes, all complete; every node is queued, claimed and completed exactly once, and
/// no join is queued before all five of its parents completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_run_300_fan_in_runs_exactly_once() {
    let env = TestEnv::new().await;
    let workflow = fan_out_fan_in();
    env.apply(workflow.clone()).await;
    let topology = env.topology();
    let mut workers: Vec<KillOnDrop> = (0..WORKERS)
        .map(|_| KillOnDrop(env.spawn_worker_process(&["--concurrency", "8"])))
        .collect();
    // Publish only once every process consumes every queue, so the work is shared.
    let queues = [
        topology.triggers_queue(),
        topology.task_queue("transform"),
        topology.task_queue("noop"),
    ];
    wait_for_consumers(&env, &queues, WORKERS).await;

    let started = Instant::now();
    for n in 0..RUNS {
        env.request_run("fan", json!({"n": n})).await;
    }
    eventually("every run to finish", Duration::from_secs(180), || async {
        (env.count("SELECT count(*) FROM runs WHERE state <> 'running'")
            .await
            == RUNS)
            .then_some(())
    })
    .await;
    eprintln!(
        "{RUNS} runs on {WORKERS} worker processes took {:?}",
        started.elapsed()
    );

    for worker in &mut workers {
        let exited = worker.0.try_wait().expect("worker process status");
        assert!(
            exited.is_none(),
            "a worker process died during the runs: {exited:?}"
        );
    }
    assert_each_node_ran_once(&env, &workflow, RUNS, false).await;
    // Each join rendered its own run's input: no output crossed runs.
    let joined = env
        .count(
            "SELECT count(*) FROM node_runs n JOIN runs r ON r.id = n.run_id
             WHERE n.node_id = 'join' AND n.output = jsonb_build_object('n', r.input->'n', 'm1', 'completed')",
        )
        .await;
    assert_eq!(joined, RUNS, "joins whose output matches their run's input");
}

/// A backlog taken in batches: 200 events, each published twice, wait in the queue
/// before three worker processes start, so every worker takes many deliveries at once
/// and the copies of an event land in the same batch or in batches on different
/// workers. Each event starts one run, every node is completed exactly once, and the
/// work was in fact batched: runs were started, and nodes finished, several per
/// transaction (rows written by one transaction share its `xmin`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_backlog_is_batched_on_three_workers_with_one_effect_each() {
    const RUNS: i64 = 200;
    let env = TestEnv::new().await;
    let workflow = fan_out_fan_in();
    env.apply(workflow.clone()).await;
    for n in 0..RUNS {
        let event = env.request_run("fan", json!({"n": n})).await;
        env.publish_event(&event).await;
    }
    let _workers: Vec<KillOnDrop> = (0..WORKERS)
        .map(|_| KillOnDrop(env.spawn_worker_process(&["--concurrency", "64"])))
        .collect();
    eventually("every run to finish", Duration::from_secs(180), || async {
        (env.count("SELECT count(*) FROM runs WHERE state = 'completed'")
            .await
            == RUNS)
            .then_some(())
    })
    .await;
    let topology = env.topology();
    eventually(
        "the trigger queue to drain",
        Duration::from_secs(30),
        || async {
            (common::queue_depth(&env, &topology.triggers_queue()).await == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM runs").await,
        RUNS,
        "one run per event, however often it was delivered"
    );
    assert_each_node_ran_once(&env, &workflow, RUNS, false).await;
    let start_transactions = env
        .count(
            "SELECT count(DISTINCT xmin::text) FROM transitions
             WHERE node_id IS NULL AND to_state = 'running'",
        )
        .await;
    assert!(
        start_transactions < RUNS,
        "runs were started one per transaction ({start_transactions} for {RUNS})"
    );
    let finish_transactions = env
        .count(
            "SELECT count(DISTINCT xmin::text) FROM transitions
             WHERE from_state = 'running' AND to_state = 'completed'",
        )
        .await;
    assert!(
        finish_transactions < RUNS * 7 / 2,
        "nodes were finished one per transaction ({finish_transactions} for {})",
        RUNS * 7
    );
}

/// The children a finished node makes ready are published together, each saying how
/// many went to its queue (header `dagq-burst`), and a worker that gets them processes
/// them in one transaction rather than one after another on their run's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siblings_published_together_say_so_and_finish_in_one_transaction() {
    use futures::StreamExt;
    use lapin::options::BasicConsumeOptions;

    let env = TestEnv::new().await;
    env.apply(json!({"name": "burst", "nodes": [
        {"id": "a", "type": "noop", "queue": "head"},
        {"id": "b", "type": "noop", "queue": "fan", "depends": ["a"]},
        {"id": "c", "type": "noop", "queue": "fan", "depends": ["a"]},
        {"id": "d", "type": "noop", "queue": "fan", "depends": ["a"]},
        {"id": "e", "type": "noop", "queue": "head", "depends": ["b", "c", "d"]}
    ]}))
    .await;
    let head = env.start_worker_serving("head");
    let event = env.request_run("burst", json!({})).await;
    // Nobody serves "fan" yet: b, c and d wait there once a completed.
    let fan = env.topology().task_queue("fan");
    eventually(
        "b, c and d in their queue",
        Duration::from_secs(20),
        || async { (common::ready_messages(&env, &fan).await == Some(3)).then_some(()) },
    )
    .await;
    let channel = env.channel().await;
    let mut peek = channel
        .basic_consume(
            fan.as_str().into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bursts = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), peek.next())
            .await
            .expect("a delivery")
            .expect("consuming")
            .unwrap();
        bursts.push(dagq::broker::burst_of(&delivery.properties));
    }
    // Hand them back untouched, for the worker below.
    channel.close(200, "peeked".into()).await.unwrap();
    assert_eq!(bursts, [3, 3, 3]);

    let fan_worker = env.start_worker_serving("fan");
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    fan_worker.stop().await;
    head.stop().await;
    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    let run = status.run.id;
    let transactions = env
        .count(&format!(
            "SELECT count(DISTINCT xmin::text) FROM transitions
             WHERE run_id = '{run}' AND node_id IN ('b', 'c', 'd') AND to_state = 'completed'"
        ))
        .await;
    assert_eq!(
        transactions, 1,
        "b, c and d finished in separate transactions"
    );
}
