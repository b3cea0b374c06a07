//! Shared test harness: every test gets a fresh namespace (exchanges and queues) and a
//! fresh database on the real RabbitMQ and Postgres, both removed by a guard even when
//! the test panics. A service that is down fails the test with how to start it.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagq::broker::{self, Publisher, Topology};
use dagq::config::{DEFAULT_AMQP_URL, FileConfig, Settings};
use dagq::engine::{Worker, WorkerOptions};
use dagq::store::{RunStatus, Store};
use dagq::workflow::Workflow;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Base Postgres URL (without database) from DAGQ_DATABASE_URL or the default.
fn server_url() -> String {
    let url = std::env::var("DAGQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/dagq".into());
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").unwrap() + 2 => {
            url[..i].to_owned()
        }
        _ => url,
    }
}

fn amqp_url() -> String {
    std::env::var("DAGQ_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// One test's private namespace and database.
pub struct TestEnv {
    pub settings: Settings,
    pub store: Store,
    pub namespace: String,
    pub database: String,
    publisher: tokio::sync::OnceCell<(lapin::Connection, Arc<Publisher>)>,
}

impl TestEnv {
    /// A fresh namespace and migrated database.
    pub async fn new() -> TestEnv {
        Self::with_config(FileConfig::default()).await
    }

    /// As `new`, with a `dagq.toml` configuration.
    pub async fn with_config(file: FileConfig) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = format!("t{}", &id[..12]);
        let database = format!("dagq_test_{}", &id[..12]);
        let settings = Settings {
            amqp_url: amqp_url(),
            database_url: format!("{}/{database}", server_url()),
            namespace: namespace.clone(),
            file,
        };
        if let Err(e) = broker::connect(&settings.amqp_url, "test").await {
            panic!(
                "RabbitMQ is not reachable at {} ({e}); start it with `rabbitmq-server -detached`",
                settings.amqp_url
            );
        }
        if let Err(e) = Store::migrate(&settings.database_url).await {
            panic!(
                "PostgreSQL is not reachable at {} ({e}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                settings.database_url
            );
        }
        let store = Store::connect(&settings.database_url, 4).expect("database URL parses");
        TestEnv {
            settings,
            store,
            namespace,
            database,
            publisher: Default::default(),
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.namespace)
    }

    /// Validates and stores a workflow; returns it with its version.
    pub async fn apply(&self, document: Value) -> Workflow {
        let mut workflow = Workflow::from_json(&document, Some(&self.settings.file.models))
            .expect("test workflow is valid");
        workflow.version = self
            .store
            .apply_workflow(&workflow)
            .await
            .expect("apply")
            .version;
        workflow
    }

    /// A publisher on this namespace (one connection per test).
    pub async fn publisher(&self) -> Arc<Publisher> {
        let (_, publisher) = self
            .publisher
            .get_or_init(|| async {
                let connection = broker::connect(&self.settings.amqp_url, "test")
                    .await
                    .expect("connect");
                let publisher = Publisher::open(&connection, self.topology())
                    .await
                    .expect("publisher");
                (connection, Arc::new(publisher))
            })
            .await;
        publisher.clone()
    }

    /// A new channel on the test's publisher connection.
    pub async fn channel(&self) -> lapin::Channel {
        let _ = self.publisher().await;
        let (connection, _) = self.publisher.get().expect("initialised above");
        connection.create_channel().await.expect("channel")
    }

    /// Publishes an event and returns it.
    pub async fn publish_event(&self, event: &Value) {
        let body = serde_json::to_vec(event).unwrap();
        self.publisher()
            .await
            .publish_event(event["type"].as_str().unwrap(), &body, 0)
            .await
            .expect("publish event");
    }

    /// Requests a run of `workflow` with `input`; returns the event that starts it.
    pub async fn request_run(&self, workflow: &str, input: Value) -> Value {
        let event = dagq::engine::messages::new_event(
            dagq::engine::RUN_REQUESTED,
            "test",
            None,
            serde_json::json!({"workflow": workflow, "input": input}),
        );
        self.publish_event(&event).await;
        event
    }

    /// Waits for the run an event started to finish.
    pub async fn wait_run(&self, event: &Value, timeout: Duration) -> RunStatus {
        dagq::commands::wait_for_run(
            &self.store,
            event["source"].as_str().unwrap(),
            event["id"].as_str().unwrap(),
            timeout,
            false,
        )
        .await
        .expect("run finishes")
    }

    /// Starts an in-process worker; stop it with `WorkerHandle::stop`.
    pub fn start_worker(&self, options: WorkerOptions) -> WorkerHandle {
        let options = WorkerOptions {
            migrate: false,
            ..options
        };
        WorkerHandle::spawn(Worker::new(self.settings.clone(), options))
    }

    /// An in-process worker with default options and a fast queue refresh.
    pub fn start_default_worker(&self) -> WorkerHandle {
        self.start_worker(WorkerOptions {
            queue_refresh: Duration::from_millis(200),
            concurrency: 16,
            ..WorkerOptions::default()
        })
    }

    /// Like `start_default_worker`, serving the events and task queue `queue` only.
    pub fn start_worker_serving(&self, queue: &str) -> WorkerHandle {
        self.start_worker(WorkerOptions {
            queues: Some(vec![queue.to_owned()]),
            queue_refresh: Duration::from_millis(200),
            concurrency: 16,
            ..WorkerOptions::default()
        })
    }

    /// The environment a `dagq` process needs to work in this test's namespace.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dagq"));
        command
            .env("DAGQ_AMQP_URL", &self.settings.amqp_url)
            .env("DAGQ_DATABASE_URL", &self.settings.database_url)
            .env("DAGQ_NAMESPACE", &self.namespace)
            .env("DAGQ_CONFIG", "/dev/null")
            .env("DAGQ_LOG", "warn");
        command
    }

    /// Spawns `dagq worker` as a separate process.
    pub fn spawn_worker_process(&self, extra: &[&str]) -> Child {
        self.command()
            .args(["worker", "--http", "off", "--no-migrate"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dagq worker")
    }

    /// Runs a SQL query returning one i64.
    pub async fn count(&self, sql: &str) -> i64 {
        let url = &self.settings.database_url;
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// A direct Postgres client for assertions.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.settings.database_url, tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let database = self.database.clone();
        let namespace = self.namespace.clone();
        // Drop runs outside any runtime guarantee: clean up on a thread of our own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let queues = match Store::connect(&settings.database_url, 1) {
                    Ok(store) => store.known_queues().await.unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                if let Ok(connection) = broker::connect(&settings.amqp_url, "test-cleanup").await
                    && let Ok(channel) = connection.create_channel().await
                {
                    let _ = Topology::new(&namespace).delete(&channel, &queues).await;
                }
                if let Ok((client, connection)) = tokio_postgres::connect(
                    &format!("{}/postgres", server_url()),
                    tokio_postgres::NoTls,
                )
                .await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                        ))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// An in-process worker.
pub struct WorkerHandle {
    pub shutdown: CancellationToken,
    join: Option<
        tokio::task::JoinHandle<Result<Option<std::net::SocketAddr>, dagq::engine::EngineError>>,
    >,
}

impl WorkerHandle {
    /// Runs `worker` on a task of its own until `stop`.
    pub fn spawn(worker: Worker) -> WorkerHandle {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("dagq=debug"))
            .with_test_writer()
            .try_init();
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(worker.run(shutdown.clone()));
        WorkerHandle {
            shutdown,
            join: Some(join),
        }
    }

    /// Asks the worker to stop and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(join) = self.join.take() {
            tokio::time::timeout(Duration::from_secs(60), join)
                .await
                .expect("worker stops within 60 s")
                .expect("worker task did not panic")
                .expect("worker ended without error");
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Kills a child process on drop, so that a failing test leaves no worker behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The diamond: A → B, C, D → E.
pub fn diamond(name: &str, kind: &str) -> Value {
    serde_json::json!({
        "name": name,
        "nodes": [
            {"id": "a", "type": kind},
            {"id": "b", "type": kind, "depends": ["a"]},
            {"id": "c", "type": kind, "depends": ["a"]},
            {"id": "d", "type": kind, "depends": ["a"]},
            {"id": "e", "type": kind, "depends": ["b", "c", "d"]}
        ]
    })
}

/// The node `id` of a run's status; panics naming the node when it is missing.
pub fn node<'a>(status: &'a RunStatus, id: &str) -> &'a dagq::store::NodeStatus {
    status
        .nodes
        .iter()
        .find(|n| n.node_id == id)
        .unwrap_or_else(|| panic!("run has no node {id:?}: {:?}", status.nodes))
}

/// Messages ready in the broker queue `queue` (a full name such as `<ns>.triggers`).
pub async fn queue_depth(env: &TestEnv, queue: &str) -> u32 {
    ready_messages(env, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// Messages ready in the broker queue `queue`, or `None` while it does not exist (a task
/// queue exists from the first publish to it).
pub async fn ready_messages(env: &TestEnv, queue: &str) -> Option<u32> {
    // A passive declaration of a missing queue closes its channel: use a fresh one.
    let channel = env.channel().await;
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
        .await
        .ok()
        .map(|q| q.message_count())
}

/// Waits until the run that `event` started exists and returns its id.
pub async fn run_id_of(env: &TestEnv, event: &Value) -> uuid::Uuid {
    let (source, id) = (
        event["source"].as_str().unwrap(),
        event["id"].as_str().unwrap(),
    );
    eventually(
        "the event to start a run",
        Duration::from_secs(30),
        || async {
            env.store
                .run_for_event(source, id)
                .await
                .unwrap()
                .first()
                .map(|r| r.id)
        },
    )
    .await
}

/// Consumers of the broker queue `queue` (a full name), 0 while it does not exist yet.
pub async fn queue_consumers(env: &TestEnv, queue: &str) -> u32 {
    // A passive declaration of a missing queue closes its channel: use a fresh one, and
    // close it, since callers poll and channels per connection are limited.
    let channel = env.channel().await;
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match channel
        .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
        .await
    {
        Ok(declared) => {
            let _ = channel.close(200, "counted".into()).await;
            declared.consumer_count()
        }
        Err(_) => 0,
    }
}

/// Asserts the exactly-once effects of `runs` runs of `workflow`, all `completed`: every
/// node completed at attempt 1, with exactly one transition to `queued` and one to
/// `completed` (and one to `running` unless `takeovers` allows a re-claim after a lost
/// worker), and every node queued only after all its parents completed.
pub async fn assert_each_node_ran_once(
    env: &TestEnv,
    workflow: &Value,
    runs: i64,
    takeovers: bool,
) {
    let nodes = workflow["nodes"].as_array().expect("workflow has nodes");
    let sql = env.sql().await;
    let one = |row: tokio_postgres::Row| row.get::<_, i64>(0);
    let q = |text: &'static str| sql.query_one(text, &[]);
    assert_eq!(
        one(q("SELECT count(*) FROM runs").await.unwrap()),
        runs,
        "runs started"
    );
    let states: Vec<(String, i64)> = sql
        .query("SELECT state, count(*) FROM runs GROUP BY state", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(states, [("completed".to_owned(), runs)], "run states");
    let node_runs = one(q("SELECT count(*) FROM node_runs").await.unwrap());
    assert_eq!(node_runs, runs * nodes.len() as i64, "node rows");
    let unfinished = one(q(
        "SELECT count(*) FROM node_runs WHERE state <> 'completed' OR attempt <> 1",
    )
    .await
    .unwrap());
    assert_eq!(unfinished, 0, "nodes not completed at attempt 1");
    let offenders: Vec<String> = sql
        .query(
            "SELECT run_id::text || '/' || node_id || ': queued ' || q || ', running ' || r
                    || ', completed ' || c
             FROM (SELECT run_id, node_id,
                          count(*) FILTER (WHERE to_state = 'queued') AS q,
                          count(*) FILTER (WHERE to_state = 'running') AS r,
                          count(*) FILTER (WHERE to_state = 'completed') AS c
                   FROM transitions WHERE node_id IS NOT NULL GROUP BY run_id, node_id) t
             WHERE q <> 1 OR c <> 1 OR r < 1 OR (r > 1 AND NOT $1)
             LIMIT 10",
            &[&takeovers],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        offenders.is_empty(),
        "nodes whose transitions break exactly-once: {offenders:#?}"
    );
    for child in nodes {
        let parents: Vec<&str> = child["depends"]
            .as_array()
            .map(|d| d.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if parents.is_empty() {
            continue;
        }
        let early = sql
            .query_one(
                "SELECT count(*) FROM transitions c JOIN transitions p ON p.run_id = c.run_id
                 WHERE c.node_id = $1 AND c.to_state = 'queued'
                   AND p.node_id = ANY($2) AND p.to_state = 'completed' AND p.id > c.id",
                &[&child["id"].as_str(), &parents],
            )
            .await
            .unwrap();
        assert_eq!(
            one(early),
            0,
            "node {} queued before one of its parents {parents:?} completed",
            child["id"]
        );
    }
}

/// The mock model server (`dagq::mock_llm`) on a free loopback port with this latency,
/// and a model profile `mock` on it, both as a `FileConfig` (for in-process use and
/// `apply`) and as a `dagq.toml` file for worker processes. Stops and removes the file
/// on drop.
pub struct MockModels {
    pub file: FileConfig,
    pub config_path: std::path::PathBuf,
    _stop: tokio_util::sync::DropGuard,
}

impl MockModels {
    pub async fn start(latency: Duration) -> MockModels {
        let stop = CancellationToken::new();
        let options = dagq::mock_llm::MockOptions {
            latency,
            ..Default::default()
        };
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let addr = dagq::mock_llm::serve(loopback, options, stop.clone())
            .await
            .expect("the mock model server binds a loopback port");
        let toml = format!(
            "[models.mock]\nprovider = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"mock-1\"\n"
        );
        let file: FileConfig = toml::from_str(&toml).expect("the mock profile parses");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let config_path = std::env::temp_dir().join(format!("dagq-test-{}.toml", &id[..12]));
        std::fs::write(&config_path, toml).expect("write the worker configuration");
        MockModels {
            file,
            config_path,
            _stop: stop.drop_guard(),
        }
    }

    /// `dagq worker ARGS` as a separate process on this configuration (stderr shown).
    pub fn spawn_worker(&self, env: &TestEnv, args: &[&str]) -> Child {
        env.command()
            .env("DAGQ_CONFIG", &self.config_path)
            .args(["worker", "--no-migrate"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dagq worker")
    }
}

impl Drop for MockModels {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// The diamond A → B, C, D → E of chat nodes on the `mock` profile, each asking about
/// the run input and its parents' answers.
pub fn chat_diamond(name: &str) -> Value {
    let chat = |id: &str, depends: &[&str]| {
        let asked: String = depends
            .iter()
            .map(|d| format!(" {{{{ nodes.{d}.output.text }}}}"))
            .collect();
        serde_json::json!({"id": id, "type": "chat", "model": "mock", "depends": depends,
            "input": {"messages": [{"role": "user", "content": format!("{id} {{{{ input.n }}}}{asked}")}]}})
    };
    serde_json::json!({"name": name, "nodes": [
        chat("a", &[]), chat("b", &["a"]), chat("c", &["a"]), chat("d", &["a"]),
        chat("e", &["b", "c", "d"])
    ]})
}

/// (attempt, status) of a run's model calls, in order.
pub async fn model_call_statuses(env: &TestEnv, run: uuid::Uuid) -> Vec<(i32, String)> {
    let rows = env
        .sql()
        .await
        .query(
            "SELECT attempt, status FROM model_calls WHERE run_id = $1 ORDER BY id",
            &[&run],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Waits until every one of `queues` has `count` consumers, so that work published next is
/// shared by all the workers started.
pub async fn wait_for_consumers(env: &TestEnv, queues: &[String], count: u32) {
    for queue in queues {
        eventually(
            &format!("{count} consumers on {queue}"),
            Duration::from_secs(60),
            || async { (queue_consumers(env, queue).await == count).then_some(()) },
        )
        .await;
    }
}
