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
