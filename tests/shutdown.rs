//! SIGTERM: a worker stops taking deliveries, lets its in-flight tasks finish within the
//! grace period, leaves the rest unacked for the next worker, and exits 0.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    KillOnDrop, MockModels, TestEnv, assert_each_node_ran_once, chat_diamond, eventually,
    queue_consumers,
};
use serde_json::json;

const RUNS: i64 = 40;
const GRACE: Duration = Duration::from_secs(10);

/// Waits for the worker process to exit within `within`; returns its status and when.
fn wait_exit(worker: &mut KillOnDrop, within: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = worker.0.try_wait().expect("worker process status") {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "the worker did not exit within {within:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to a worker process in the middle of 40 diamond runs on a model answering in
/// 200 ms: it exits 0 within its 10 s grace period, with nothing failed and work left
/// over (it did not drain the queues first); the nodes it had in flight completed or
/// were left for redelivery. A new worker then completes every run, each node exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_zero_within_the_grace_period_and_loses_nothing() {
    let mock = MockModels::start(Duration::from_millis(200)).await;
    let env = TestEnv::with_config(mock.file.clone()).await;
    let workflow = chat_diamond("diamond");
    env.apply(workflow.clone()).await;
    let grace = GRACE.as_secs().to_string();
    let args = ["--http", "off", "--concurrency", "8", "--grace", &grace];
    let mut worker = KillOnDrop(mock.spawn_worker(&env, &args));
    let topology = env.topology();
    for queue in [topology.triggers_queue(), topology.task_queue("mock")] {
        eventually(
            &format!("a consumer on {queue}"),
            Duration::from_secs(60),
            || async { (queue_consumers(&env, &queue).await == 1).then_some(()) },
        )
        .await;
    }
    for n in 0..RUNS {
        env.request_run("diamond", json!({"n": n})).await;
    }
    let running = "SELECT count(*) FROM node_runs WHERE state = 'running'";
    eventually("nodes to be running", Duration::from_secs(60), || async {
        (env.count(running).await > 0).then_some(())
    })
    .await;

    let pid = worker.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid} failed");
    let (status, took) = tokio::task::block_in_place(|| wait_exit(&mut worker, GRACE));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM ({took:?})"
    );
    eprintln!("the worker exited {took:?} after SIGTERM");

    let failed = "SELECT count(*) FROM node_runs WHERE state IN ('failed', 'retrying', 'skipped')";
    assert_eq!(env.count(failed).await, 0, "nodes failed by the shutdown");
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    // The grace period is far longer than one model call: whatever the worker had
    // claimed, it finished; the rest waits unclaimed in the queues.
    assert_eq!(env.count(running).await, 0, "nodes abandoned while running");
    let completed = env
        .count("SELECT count(*) FROM runs WHERE state = 'completed'")
        .await;
    assert!(
        completed < RUNS,
        "the worker drained every run before exiting"
    );

    let _next = KillOnDrop(mock.spawn_worker(&env, &["--http", "off", "--concurrency", "8"]));
    eventually("every run to finish", Duration::from_secs(180), || async {
        (env.count("SELECT count(*) FROM runs WHERE state <> 'running'")
            .await
            == RUNS)
            .then_some(())
    })
    .await;
    assert_each_node_ran_once(&env, &workflow, RUNS, false).await;
}
