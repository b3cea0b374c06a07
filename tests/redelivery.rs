//! Exactly-once effects on at-least-once delivery (DESIGN §4): task messages delivered
//! twice, workers killed mid-flight, and follow-ups lost between commit and publish.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    KillOnDrop, TestEnv, assert_each_node_ran_once, diamond, eventually, queue_depth,
    wait_for_consumers,
};
use dagq::adapter::Registry;
use dagq::engine::{Engine, Handled, RUN_REQUESTED};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// Copies every task message routed to one task queue back into that queue through the
/// default exchange, so that workers receive each one twice. The copies bypass the tasks
/// exchange, so they are not tapped again.
struct Tap {
    name: String,
    channel: lapin::Channel,
    copied: Arc<AtomicU64>,
    copier: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(env: &TestEnv, queue: &str) -> Tap {
        let topology = env.topology();
        let name = format!("{}.tap", env.namespace);
        let channel = env.channel().await;
        let mut args = FieldTable::default();
        // Should the test panic before deleting it, the broker drops the queue unused.
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .expect("declare the tap queue");
        let (exchange, key) = (topology.tasks_exchange(), queue.to_owned());
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap queue");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        channel
            .basic_qos(32, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                name.as_str().into(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the tap queue");
        let copied = Arc::new(AtomicU64::new(0));
        let (count, publish, target) =
            (copied.clone(), channel.clone(), topology.task_queue(queue));
        let copier = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        target.as_str().into(),
                        options,
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await
                    .expect("publish the copy")
                    .await
                    .expect("confirm of the copy");
                assert!(
                    confirm.is_ack() && confirm.take_message().is_none(),
                    "the copy reached {target}"
                );
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack the tapped message");
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Tap {
            name,
            channel,
            copied,
            copier,
        }
    }

    fn copied(&self) -> u64 {
        self.copied.load(Ordering::SeqCst)
    }

    async fn remove(self) {
        self.copier.abort();
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Waits until `runs` runs exist and none is still running; on timeout, fails with the
/// states of the nodes left behind.
async fn wait_all_finished(env: &TestEnv, runs: i64, timeout: Duration) {
    let what = format!("{runs} runs to finish");
    let finished = eventually(&what, timeout * 2, || async {
        let finished = env
            .count("SELECT count(*) FROM runs WHERE state <> 'running'")
            .await;
        (finished == runs).then_some(())
    });
    if tokio::time::timeout(timeout, finished).await.is_err() {
        let left: Vec<(String, i64)> = env
            .sql()
            .await
            .query(
                "SELECT n.state, count(*) FROM node_runs n JOIN runs r ON r.id = n.run_id
                 WHERE r.state = 'running' AND n.state NOT IN ('completed', 'skipped', 'failed')
                 GROUP BY n.state ORDER BY n.state",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        panic!("runs still running after {timeout:?}; their unfinished nodes by state: {left:?}");
    }
}

/// 50 diamond runs on two workers while a tap republishes every task message once more:
/// each node is claimed and completed exactly once, and every copy reached the workers
/// and was acknowledged as a duplicate without effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_message_delivered_twice_has_one_effect() {
    const RUNS: i64 = 50;
    let env = TestEnv::new().await;
    let workflow = diamond("twice", "noop");
    env.apply(workflow.clone()).await;
    let task_queue = env.topology().task_queue("noop");
    // The copies go straight to the task queue: it must exist before the first task.
    env.publisher()
        .await
        .ensure_task_queue("noop")
        .await
        .expect("declare the task queue");
    let tap = Tap::start(&env, "noop").await;
    let workers = [env.start_default_worker(), env.start_default_worker()];

    for i in 0..RUNS {
        env.request_run("twice", json!({"i": i})).await;
    }
    wait_all_finished(&env, RUNS, Duration::from_secs(120)).await;
    let task_messages = (RUNS * 5) as u64;
    eventually(
        "every task message copied and consumed",
        Duration::from_secs(60),
        || async {
            (tap.copied() >= task_messages && queue_depth(&env, &task_queue).await == 0)
                .then_some(())
        },
    )
    .await;
    // A graceful stop finishes what is in flight; anything left unacked would be back in
    // the queue once the workers' connections close.
    for worker in workers {
        worker.stop().await;
    }
    assert_eq!(
        queue_depth(&env, &task_queue).await,
        0,
        "task messages never acknowledged"
    );
    assert_eq!(
        queue_depth(&env, &tap.name).await,
        0,
        "task messages never copied"
    );
    assert_eq!(tap.copied(), task_messages, "one copy of each task message");
    assert_each_node_ran_once(&env, &workflow, RUNS, false).await;
    tap.remove().await;
}

/// root → four middle nodes → join → tail.
fn multi_level() -> Value {
    let middle = ["m1", "m2", "m3", "m4"];
    let mut nodes = vec![json!({"id": "root", "type": "noop"})];
    nodes.extend(
        middle
            .iter()
            .map(|id| json!({"id": id, "type": "noop", "depends": ["root"]})),
    );
    nodes.push(json!({"id": "join", "type": "transform", "depends": middle, "input": {"n": "{{ input.n }}"}}));
    nodes.push(json!({"id": "tail", "type": "noop", "depends": ["join"]}));
    json!({"name": "levels", "nodes": nodes})
}

/// 200 multi-level runs on three worker processes, three of which are SIGKILLed while
/// nodes are in flight and replaced: every run completes, every node is queued once and
/// completed once (a node may be claimed again after its worker died), and no run is
/// left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_nothing_and_duplicate_nothing() {
    const RUNS: i64 = 200;
    const WORKERS: u32 = 3;
    let env = TestEnv::new().await;
    let workflow = multi_level();
    env.apply(workflow.clone()).await;
    let topology = env.topology();
    let spawn = || KillOnDrop(env.spawn_worker_process(&["--concurrency", "8"]));
    let mut workers: Vec<KillOnDrop> = (0..WORKERS).map(|_| spawn()).collect();
    let queues = [
        topology.triggers_queue(),
        topology.task_queue("noop"),
        topology.task_queue("transform"),
    ];
    wait_for_consumers(&env, &queues, WORKERS).await;

    let started = Instant::now();
    for n in 0..RUNS {
        env.request_run("levels", json!({"n": n})).await;
    }
    // Kill at progress milestones, each time while work is outstanding, so that the
    // victim is likely to hold in-flight work: open transactions (built-in nodes are
    // claimed and finished in one), commits not yet published, unacked deliveries.
    let total_nodes = RUNS * workflow["nodes"].as_array().unwrap().len() as i64;
    let milestones = [total_nodes / 10, total_nodes * 3 / 10, total_nodes / 2];
    for (k, milestone) in milestones.into_iter().enumerate() {
        let in_flight = format!(
            "SELECT (count(*) FILTER (WHERE state = 'completed') >= {milestone}
                     AND count(*) FILTER (WHERE state IN ('queued', 'running')) > 0)::int::int8
             FROM node_runs"
        );
        eventually(
            &format!("nodes in flight after {milestone} completed"),
            Duration::from_secs(120),
            || async { (env.count(&in_flight).await == 1).then_some(()) },
        )
        .await;
        let victim = &mut workers[k % WORKERS as usize];
        victim.0.kill().expect("SIGKILL a worker");
        victim.0.wait().expect("reap the killed worker");
        *victim = spawn();
    }
    wait_all_finished(&env, RUNS, Duration::from_secs(180)).await;
    let takeovers = env
        .count(
            "SELECT count(*) FROM (SELECT 1 FROM transitions WHERE to_state = 'running'
             GROUP BY run_id, node_id HAVING count(*) > 1) t",
        )
        .await;
    eprintln!(
        "{RUNS} runs with {} killed workers took {:?}; {takeovers} nodes re-claimed",
        milestones.len(),
        started.elapsed()
    );

    for worker in &mut workers {
        let exited = worker.0.try_wait().expect("worker process status");
        assert!(
            exited.is_none(),
            "a worker process died unasked: {exited:?}"
        );
    }
    assert_each_node_ran_once(&env, &workflow, RUNS, true).await;
}

/// A run whose root task was committed but never published (the trigger's worker died in
/// between) and a node whose children were committed but never published are both
/// re-driven when their message comes back redelivered, while a plain duplicate changes
/// nothing; the run then completes with each node once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_republish_follow_ups_lost_after_commit() {
    let env = TestEnv::new().await;
    let workflow = diamond("redrive", "noop");
    env.apply(workflow.clone()).await;
    let publisher = env.publisher().await;
    let task_queue = env.topology().task_queue("noop");
    // The engine alone, with no worker consuming: the test plays the broker's part.
    let engine = Engine::new(env.store.clone(), publisher.clone(), Registry::default());
    let channel = env.channel().await;
    let lose_published = || async {
        channel
            .queue_purge(task_queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .expect("purge the task queue")
    };
    let depth = || queue_depth(&env, &task_queue);

    let event = dagq::engine::messages::new_event(
        RUN_REQUESTED,
        "test",
        None,
        json!({"workflow": "redrive"}),
    );
    let trigger = serde_json::to_vec(&event).unwrap();
    assert_eq!(
        engine.handle_trigger(&trigger, false).await.unwrap(),
        Handled::Done("started")
    );
    assert_eq!(
        lose_published().await,
        1,
        "the root task was published once"
    );
    assert_eq!(
        engine.handle_trigger(&trigger, false).await.unwrap(),
        Handled::Done("duplicate")
    );
    assert_eq!(
        depth().await,
        0,
        "a duplicate (not redelivered) trigger republished"
    );
    assert_eq!(
        engine.handle_trigger(&trigger, true).await.unwrap(),
        Handled::Done("duplicate")
    );
    assert_eq!(
        depth().await,
        1,
        "the redelivered trigger republishes the queued root"
    );

    let root = channel
        .basic_get(task_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get the root task")
        .expect("the root task is in the queue")
        .delivery
        .data;
    assert_eq!(
        engine.handle_task(&root, false, "noop").await.unwrap(),
        Handled::Done("completed")
    );
    assert_eq!(
        lose_published().await,
        3,
        "the root's three children were published"
    );
    assert_eq!(
        engine.handle_task(&root, false, "noop").await.unwrap(),
        Handled::Done("duplicate")
    );
    assert_eq!(
        depth().await,
        0,
        "a duplicate (not redelivered) task republished"
    );
    assert_eq!(
        engine.handle_task(&root, true, "noop").await.unwrap(),
        Handled::Done("duplicate")
    );
    assert_eq!(
        depth().await,
        3,
        "the redelivered task republishes the queued children"
    );

    let worker = env.start_default_worker();
    env.wait_run(&event, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_each_node_ran_once(&env, &workflow, 1, false).await;
}
