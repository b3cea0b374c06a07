//! A retry whose delayed message is lost (a broker crash at the moment of expiry loses a
//! classic queue's dead-lettered message) is found overdue in Postgres and republished:
//! the node still completes, once.

mod common;
mod support;

use std::time::Duration;

use common::{TestEnv, eventually, node};
use dagq::engine::WorkerOptions;
use lapin::options::QueuePurgeOptions;
use serde_json::json;
use support::{
    ask_workflow as ask, failing_first, retry_policy as policy, status_reply, stub_config as config,
};

/// The node fails once and waits in the 5 s retry tier; the test purges that tier, so the
/// retry message is gone. A worker whose lost-retry grace is 1 s republishes the attempt
/// once the node is overdue, and the node completes on attempt 2 with one model call per
/// attempt and one `completed` transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_message_was_lost_is_republished_and_completes() {
    let provider = failing_first(1, status_reply(503)).await;
    let env = TestEnv::with_config(config(&[("flaky", &provider)], None)).await;
    env.apply(ask("flaky", policy(3, "5s"))).await;
    let worker = env.start_worker(WorkerOptions {
        queue_refresh: Duration::from_millis(200),
        concurrency: 4,
        lost_retry_grace: Duration::from_secs(1),
        ..WorkerOptions::default()
    });
    let event = env.request_run("ask", json!({"q": "hello"})).await;
    eventually(
        "the node waits for its retry",
        Duration::from_secs(30),
        || async {
            (env.count(
                "SELECT count(*) FROM node_runs WHERE node_id = 'ask' AND state = 'retrying'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    let tier = env.topology().retry_queue(Duration::from_secs(5));
    let purged = env
        .channel()
        .await
        .queue_purge(tier.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge the retry tier");
    assert_eq!(purged, 1, "the retry message was waiting in {tier}");

    let status = env.wait_run(&event, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    assert_eq!(node(&status, "ask").attempt, 2);
    let completed = env
        .count("SELECT count(*) FROM transitions WHERE node_id = 'ask' AND to_state = 'completed'")
        .await;
    assert_eq!(completed, 1);
    assert_eq!(provider.seen().len(), 2, "one call per attempt");
}
