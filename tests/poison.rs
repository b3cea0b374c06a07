//! Poison messages never crash a worker and are never dropped: each reaches `<ns>.dead`
//! with its reason, a detail that names the problem and its original body.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::TestEnv;
use dagq::broker::headers;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

/// A dead letter as a test sees it.
#[derive(Debug)]
struct Letter {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Letter {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no header {name}: {self:?}"))
    }
}

/// A private queue bound to the `<ns>.dead` fanout exchange: it receives a copy of
/// every dead letter, whoever else consumes `<ns>.dead`.
async fn watch_dead_letters(env: &TestEnv) -> lapin::Consumer {
    let channel = env.channel().await;
    let queue = dagq::broker::bind_private_queue(&channel, &env.topology().dead_exchange())
        .await
        .expect("a private queue bound to the dead-letter exchange");
    channel
        .basic_consume(
            queue,
            "poison-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

/// The next dead letter, within a bounded wait.
async fn next_letter(consumer: &mut lapin::Consumer) -> Letter {
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a dead letter arrives within 30 s")
        .expect("the consumer is open")
        .expect("a delivery");
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let mut headers = BTreeMap::new();
    if let Some(table) = delivery.properties.headers() {
        for (key, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            };
            headers.insert(key.to_string(), text);
        }
    }
    Letter {
        headers,
        body: delivery.data,
    }
}

/// Publishes `body` unchanged to the events exchange with routing key `key`.
async fn publish_raw_event(env: &TestEnv, key: &str, body: &[u8]) {
    env.publisher()
        .await
        .publish_event(key, body, 0)
        .await
        .expect("publish");
}

/// Not JSON, an event breaking the schema and a request for an unknown workflow, sent as
/// events; not JSON, a task breaking the schema and a task for no known run, sent to a
/// task queue: each is dead-lettered with its reason, and a normal run still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_worker_keeps_serving() {
    let env = TestEnv::new().await;
    env.apply(json!({"name": "fine", "nodes": [{"id": "only", "type": "noop"}]}))
        .await;
    let mut dead = watch_dead_letters(&env).await;
    let worker = env.start_default_worker();
    let triggers = env.topology().triggers_queue();

    // Each message is sent only after the previous one's letter came back, so that
    // letters arrive in a known order.
    let not_json: &[u8] = b"this is {not json";
    publish_raw_event(&env, "git.push", not_json).await;
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "not_json");
    assert!(
        letter.header(headers::DETAIL).contains("not JSON"),
        "{letter:?}"
    );
    assert_eq!(letter.header(headers::SOURCE_QUEUE), triggers);
    assert_eq!(letter.body, not_json, "original body intact");

    let mut no_source = dagq::engine::messages::new_event("git.push", "test", None, json!({}));
    no_source.as_object_mut().unwrap().remove("source");
    let body = serde_json::to_vec(&no_source).unwrap();
    publish_raw_event(&env, "git.push", &body).await;
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "schema");
    let detail = letter.header(headers::DETAIL);
    assert!(
        detail.contains("event.schema.json")
            && detail.contains("\"source\" is a required property"),
        "{detail}"
    );
    assert_eq!(letter.body, body);

    let bad_priority = dagq::engine::messages::new_event(
        dagq::engine::RUN_REQUESTED,
        "test",
        None,
        json!({"workflow": "fine", "priority": 12}),
    );
    let body = serde_json::to_vec(&bad_priority).unwrap();
    publish_raw_event(&env, dagq::engine::RUN_REQUESTED, &body).await;
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "schema");
    assert!(
        letter.header(headers::DETAIL).contains("/data/priority"),
        "the JSON path of the bad field: {letter:?}"
    );
    assert_eq!(letter.body, body);

    let unknown = env.request_run("nonexistent", json!({})).await;
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "unknown_workflow");
    assert!(
        letter.header(headers::DETAIL).contains("\"nonexistent\""),
        "{letter:?}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&letter.body).unwrap(),
        unknown
    );

    let publisher = env.publisher().await;
    let task_garbage: &[u8] = b"\xff\xfe binary";
    publisher
        .publish_task("noop", task_garbage, 0)
        .await
        .expect("publish task");
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "not_json");
    assert!(
        letter.header(headers::SOURCE_QUEUE).contains("noop"),
        "{letter:?}"
    );
    assert_eq!(letter.body, task_garbage);

    let run_id = uuid::Uuid::now_v7();
    let zero_attempt =
        serde_json::to_vec(&json!({"run_id": run_id, "node_id": "only", "attempt": 0})).unwrap();
    publisher
        .publish_task("noop", &zero_attempt, 0)
        .await
        .expect("publish task");
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "schema");
    let detail = letter.header(headers::DETAIL);
    assert!(
        detail.contains("task.schema.json") && detail.contains("/attempt"),
        "{detail}"
    );
    assert_eq!(letter.body, zero_attempt);

    let no_run =
        serde_json::to_vec(&json!({"run_id": run_id, "node_id": "only", "attempt": 1})).unwrap();
    publisher
        .publish_task("noop", &no_run, 0)
        .await
        .expect("publish task");
    let letter = next_letter(&mut dead).await;
    assert_eq!(letter.header(headers::REASON), "unknown_node");
    assert!(
        letter.header(headers::DETAIL).contains(&run_id.to_string()),
        "{letter:?}"
    );
    assert_eq!(letter.body, no_run);

    let event = env.request_run("fine", json!({})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    assert_eq!(
        status.run.state, "completed",
        "the worker still serves after poison"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM runs").await,
        1,
        "no poison started a run"
    );
    worker.stop().await;
}
