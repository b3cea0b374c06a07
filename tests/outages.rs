//! Outages of the broker and the database in the middle of a batch of runs: workers
//! reconnect by themselves, nothing acknowledged is lost, nothing runs twice, and
//! `/readyz` says when a worker cannot work.
//!
//! These tests stop and start the machine's own RabbitMQ (`rabbitmqctl stop_app`) and
//! PostgreSQL (`pg_ctlcluster`), so they must run alone, when nothing else uses those
//! services: `cargo nextest run --profile outages` (one at a time; the default profile
//! leaves them out), which `scripts/test` runs after everything else. A guard restarts
//! both services even when a test fails, and waits until they answer.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{
    KillOnDrop, MockModels, TestEnv, assert_each_node_ran_once, chat_diamond, eventually,
    queue_consumers, queue_depth,
};
use serde_json::json;

const RUNS: i64 = 100;
/// Model latency: long enough that the batch is still running when the outage starts.
const LATENCY: Duration = Duration::from_millis(200);
const SERVICE_TIMEOUT: Duration = Duration::from_secs(120);
const BATCH_TIMEOUT: Duration = Duration::from_secs(240);

/// Under `cargo test`, which runs a binary's tests on parallel threads, one outage at a
/// time (nextest runs each test in a process of its own, one at a time in its profile).
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The newest PostgreSQL cluster version installed (Debian layout), e.g. "15".
fn pg_version() -> String {
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("these tests restart the local PostgreSQL, configured under /etc/postgresql");
    let mut versions: Vec<String> = versions
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|v| v.parse::<f64>().unwrap_or(0.0) as u64);
    versions
        .pop()
        .expect("a PostgreSQL cluster under /etc/postgresql")
}

fn pg_ctlcluster(action: &str) -> Command {
    let mut command = Command::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", &pg_version(), "main", action]);
    command
}

fn rabbitmqctl(action: &str) -> Command {
    let mut command = Command::new("rabbitmqctl");
    command.args(["-q", action]);
    command
}

/// Runs a service command; whether it worked is judged by waiting for the service.
fn quietly(mut command: Command) {
    let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn rabbitmq_answers() -> bool {
    let port_open = || {
        let addr = SocketAddr::from(([127, 0, 0, 1], 5672));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    };
    let booted = rabbitmqctl("await_startup")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    booted.is_ok_and(|s| s.success()) && port_open()
}

fn postgres_answers() -> bool {
    let ready = Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
        .status();
    ready.is_ok_and(|s| s.success())
}

/// Starts both services (a no-op for one already running) and waits until they answer.
fn start_services() {
    quietly(rabbitmqctl("start_app"));
    quietly(pg_ctlcluster("start"));
    let deadline = Instant::now() + SERVICE_TIMEOUT;
    while !(rabbitmq_answers() && postgres_answers()) {
        assert!(
            Instant::now() < deadline,
            "RabbitMQ or PostgreSQL did not come back within {SERVICE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restarts both services on drop, so that a failing test leaves them running.
struct RestoreServices;

impl Drop for RestoreServices {
    fn drop(&mut self) {
        // Drop may run on a runtime thread while unwinding: block on a thread of its own.
        let restored = std::thread::spawn(start_services).join();
        if restored.is_err() && !std::thread::panicking() {
            panic!("could not restore RabbitMQ and PostgreSQL");
        }
    }
}

async fn blocking(command: Command) {
    tokio::task::spawn_blocking(move || quietly(command))
        .await
        .expect("service command");
}

/// A free loopback address for a worker's `/readyz`.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("bound address")
}

/// The status `/readyz` answers, `None` when nothing answers.
async fn readyz(addr: SocketAddr) -> Option<u16> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let answer = client
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    answer.ok().map(|r| r.status().as_u16())
}

async fn wait_ready(addr: SocketAddr, status: u16, what: &str) {
    eventually(what, SERVICE_TIMEOUT, || async {
        (readyz(addr).await == Some(status)).then_some(())
    })
    .await;
}

/// Two worker processes (the first serving `/readyz` on `addr`) consuming the trigger
/// and task queues, with `RUNS` diamond runs requested.
async fn start_batch(env: &TestEnv, mock: &MockModels, addr: SocketAddr) -> Vec<KillOnDrop> {
    env.apply(chat_diamond("diamond")).await;
    let http = addr.to_string();
    let workers = vec![
        KillOnDrop(mock.spawn_worker(env, &["--concurrency", "8", "--http", &http])),
        KillOnDrop(mock.spawn_worker(env, &["--concurrency", "8", "--http", "off"])),
    ];
    let topology = env.topology();
    for queue in [topology.triggers_queue(), topology.task_queue("mock")] {
        eventually(
            &format!("2 consumers on {queue}"),
            SERVICE_TIMEOUT,
            || async { (queue_consumers(env, &queue).await == 2).then_some(()) },
        )
        .await;
    }
    wait_ready(addr, 200, "the worker to be ready").await;
    for n in 0..RUNS {
        env.request_run("diamond", json!({"n": n})).await;
    }
    eventually("the batch to be under way", SERVICE_TIMEOUT, || async {
        (env.count("SELECT count(*) FROM runs WHERE state = 'completed'")
            .await
            >= 5)
            .then_some(())
    })
    .await;
    workers
}

/// Waits for `runs` runs to finish, then checks that the outage that began at `outage`
/// hit the batch, that both workers lived through it, and that every node ran once.
async fn assert_batch_survived(
    env: &TestEnv,
    workers: &mut [KillOnDrop],
    runs: i64,
    outage: chrono::DateTime<Utc>,
) {
    let finished = "SELECT count(*) FROM runs WHERE state <> 'running'";
    eventually(&format!("{runs} runs to finish"), BATCH_TIMEOUT, || async {
        (env.count(finished).await == runs).then_some(())
    })
    .await;
    for worker in workers.iter_mut() {
        let exited = worker.0.try_wait().expect("worker process status");
        assert!(exited.is_none(), "a worker process died: {exited:?}");
    }
    let after = env
        .count(&format!(
            "SELECT count(*) FROM runs WHERE finished_at > '{}'",
            outage.to_rfc3339()
        ))
        .await;
    assert!(
        after > 0,
        "every run finished before the outage: it tested nothing"
    );
    // A node whose worker lost its connection mid-task may be claimed again on
    // redelivery (a take-over); it is still queued once and completed once.
    assert_each_node_ran_once(env, &chat_diamond("diamond"), runs, true).await;
}

/// RabbitMQ stopped (`rabbitmqctl stop_app`) and started in the middle of 100 diamond
/// runs on two worker processes: the workers reconnect by themselves and every run
/// completes with each node completed exactly once; a worker's `/readyz` answers 503
/// while the broker is away and 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_batch_loses_nothing_and_readiness_follows_it() {
    let _alone = ALONE.lock().await;
    let mock = MockModels::start(LATENCY).await;
    let env = TestEnv::with_config(mock.file.clone()).await;
    let addr = free_addr();
    let _restore = RestoreServices;
    let mut workers = start_batch(&env, &mock, addr).await;

    let outage = Utc::now();
    blocking(rabbitmqctl("stop_app")).await;
    wait_ready(addr, 503, "/readyz to report the broker down").await;
    tokio::task::spawn_blocking(start_services)
        .await
        .expect("restart RabbitMQ");
    wait_ready(addr, 200, "/readyz to recover with the broker").await;

    assert_batch_survived(&env, &mut workers, RUNS, outage).await;
}

/// PostgreSQL stopped and started in the middle of 100 diamond runs on two worker
/// processes: while it is away `/readyz` answers 503 and deliveries are not acked (runs
/// requested meanwhile wait in the trigger queue); once it is back every run, those
/// included, completes with each node completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_batch_loses_nothing_and_acks_nothing_meanwhile() {
    let _alone = ALONE.lock().await;
    let mock = MockModels::start(LATENCY).await;
    let env = TestEnv::with_config(mock.file.clone()).await;
    let addr = free_addr();
    let _restore = RestoreServices;
    let mut workers = start_batch(&env, &mock, addr).await;

    let outage = Utc::now();
    blocking(pg_ctlcluster("stop")).await;
    wait_ready(addr, 503, "/readyz to report the database down").await;
    let during: u32 = 20;
    for n in RUNS..RUNS + i64::from(during) {
        env.request_run("diamond", json!({"n": n})).await;
    }
    // Each worker holds at most its prefetch (8) of them unacked at a time; the rest
    // must stay in the queue for as long as no worker can start a run, which a worker
    // acking them without effect would drain at once.
    let triggers = env.topology().triggers_queue();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let depth = queue_depth(&env, &triggers).await;
        assert!(
            depth >= during - 16,
            "only {depth} of {during} runs requested during the outage wait in {triggers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!postgres_answers(), "PostgreSQL came back during the check");
    tokio::task::spawn_blocking(start_services)
        .await
        .expect("restart PostgreSQL");
    wait_ready(addr, 200, "/readyz to recover with the database").await;

    assert_batch_survived(&env, &mut workers, RUNS + i64::from(during), outage).await;
}
