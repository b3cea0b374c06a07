//! The `dagq` binary as its users drive it: exit codes and what it prints.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{TestEnv, node, queue_depth};
use serde_json::{Value, json};

/// A directory of workflow files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("dagq-cli-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Writes `text` to `name` and returns the path as an argument.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write workflow file");
        path.to_str().expect("temp paths are UTF-8").to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `dagq ARGS` in the test's namespace and database, within a minute.
async fn dagq(env: &TestEnv, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::from(env.command());
    command.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("dagq {args:?} finished within 60 s"))
        .expect("spawn dagq")
}

/// Runs `dagq ARGS`, asserts it succeeded and returns its stdout.
async fn dagq_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = dagq(env, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dagq {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Runs `dagq ARGS`, asserts it failed and returns its stderr.
async fn dagq_err(env: &TestEnv, args: &[&str]) -> String {
    let out = dagq(env, args).await;
    assert!(
        !out.status.success(),
        "dagq {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Greets `input.who`; started by `greet` events or by name.
fn hello() -> Value {
    json!({
        "name": "hello",
        "triggers": [{"event": "greet"}],
        "nodes": [{"id": "greet", "type": "transform", "input": {"text": "hello {{ input.who }}"}}]
    })
}

/// `workflow apply` prints the version, says unchanged for the same file and makes a
/// new version of a changed one; `workflow list` and `show` print what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_apply_versions_and_list_and_show_print_them() {
    let env = TestEnv::new().await;
    let dir = TempDir::new();
    let file = dir.write("hello.json", &hello().to_string());
    assert_eq!(
        dagq_ok(&env, &["workflow", "apply", &file]).await,
        "hello: version 1 (applied)\n"
    );
    assert_eq!(
        dagq_ok(&env, &["workflow", "apply", &file]).await,
        "hello: version 1 (unchanged)\n"
    );
    let mut changed = hello();
    changed["description"] = "now with a description".into();
    let file = dir.write("hello.json", &changed.to_string());
    assert_eq!(
        dagq_ok(&env, &["workflow", "apply", &file]).await,
        "hello: version 2 (applied)\n"
    );

    let list = dagq_ok(&env, &["workflow", "list"]).await;
    let line = list
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or_else(|| panic!("{list}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&columns[..4], ["hello", "2", "1", "greet"], "{list}");
    let list: Value =
        serde_json::from_str(&dagq_ok(&env, &["workflow", "list", "--json"]).await).unwrap();
    assert_eq!(list[0]["name"], "hello");
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["triggers"], json!(["greet"]));

    let shown: Value =
        serde_json::from_str(&dagq_ok(&env, &["workflow", "show", "hello"]).await).unwrap();
    assert_eq!(shown["description"], "now with a description");
    assert_eq!(shown["nodes"][0]["input"], hello()["nodes"][0]["input"]);
    let first: Value = serde_json::from_str(
        &dagq_ok(&env, &["workflow", "show", "hello", "--version", "1"]).await,
    )
    .unwrap();
    assert_eq!(first.get("description"), None);
    let missing = dagq_err(&env, &["workflow", "show", "nope"]).await;
    assert!(missing.contains("no workflow \"nope\""), "{missing}");
}

/// Invalid workflow files exit non-zero with a message naming the node and the problem,
/// and one bad file in a batch applies none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_workflow_files_are_refused_naming_node_and_problem() {
    let env = TestEnv::new().await;
    let dir = TempDir::new();
    let cases = [
        (
            json!({"name": "w", "nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "noop", "depends": ["sumary"]}]}),
            vec!["workflow \"w\": node \"b\" depends on unknown node \"sumary\""],
        ),
        (
            json!({"name": "w", "nodes": [
                {"id": "a", "type": "noop", "depends": ["c"]},
                {"id": "b", "type": "noop", "depends": ["a"]},
                {"id": "c", "type": "noop", "depends": ["b"]}]}),
            vec!["workflow \"w\": dependency cycle: "],
        ),
        (
            json!({"name": "w", "nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "telepathy"}]}),
            vec!["workflow \"w\"", "/nodes/1/type", "telepathy"],
        ),
        (
            json!({"name": "w", "nodes": [{"id": "a", "type": "transform", "input": {"x": "{{ event.data. }}"}}]}),
            vec!["workflow \"w\": node \"a\" input/x: template does not parse"],
        ),
    ];
    for (document, expected) in &cases {
        let file = dir.write("w.json", &document.to_string());
        let stderr = dagq_err(&env, &["workflow", "apply", &file]).await;
        for part in expected {
            assert!(stderr.contains(part), "{part:?} not in: {stderr}");
        }
    }
    let cycle = dagq_err(
        &env,
        &[
            "workflow",
            "apply",
            &dir.write("w.json", &cases[1].0.to_string()),
        ],
    )
    .await;
    assert!(
        ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]
            .iter()
            .any(|c| cycle.contains(c)),
        "{cycle}"
    );

    let not_json = dir.write("broken.json", "{\"name\": ");
    let stderr = dagq_err(&env, &["workflow", "apply", &not_json]).await;
    assert!(
        stderr.contains("broken.json") && stderr.contains("not valid JSON"),
        "{stderr}"
    );

    let good = dir.write("hello.json", &hello().to_string());
    let bad = dir.write("bad.json", &cases[0].0.to_string());
    dagq_err(&env, &["workflow", "apply", &good, &bad]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM workflows").await,
        0,
        "one bad file applies none"
    );
}

/// `run --wait` prints the run's result and exits 0 (1 when the run failed), `--json`
/// prints it as JSON; `status` and `runs` show the same runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wait_prints_result_and_status_and_runs_show_it() {
    let env = TestEnv::new().await;
    env.apply(hello()).await;
    env.apply(json!({"name": "broken", "nodes": [{"id": "x", "type": "transform", "input": {"x": "{{ input.missing }}"}}]}))
        .await;
    let worker = env.start_default_worker();

    let text = dagq_ok(
        &env,
        &["run", "hello", "--input", r#"{"who": "world"}"#, "--wait"],
    )
    .await;
    assert!(
        text.starts_with("run ") && text.contains("workflow hello v1  state completed"),
        "{text}"
    );
    assert!(
        text.contains("\"hello world\""),
        "the output is printed: {text}"
    );

    let json = dagq_ok(
        &env,
        &[
            "run",
            "hello",
            "--input",
            r#"{"who": "json"}"#,
            "--wait",
            "--json",
        ],
    )
    .await;
    let run: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(run["state"], "completed");
    assert_eq!(run["nodes"][0]["output"], json!({"text": "hello json"}));
    let id = run["id"].as_str().unwrap().to_owned();

    let status = dagq_ok(&env, &["status", &id]).await;
    assert!(
        status.starts_with(&format!("run {id}  workflow hello v1  state completed")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("greet ") && l.contains("completed")),
        "{status}"
    );
    let status: Value =
        serde_json::from_str(&dagq_ok(&env, &["status", &id, "--json"]).await).unwrap();
    assert_eq!(status["nodes"][0]["node_id"], "greet");
    let unknown = dagq_err(&env, &["status", &uuid::Uuid::now_v7().to_string()]).await;
    assert!(unknown.contains("no run"), "{unknown}");

    let failed = dagq(&env, &["run", "broken", "--wait"]).await;
    assert_eq!(failed.status.code(), Some(1), "a failed run exits 1");
    assert!(String::from_utf8_lossy(&failed.stdout).contains("state failed"));
    let missing = dagq_err(&env, &["run", "nope"]).await;
    assert!(
        missing.contains("workflow \"nope\" is not applied"),
        "{missing}"
    );

    let runs: Value = serde_json::from_str(&dagq_ok(&env, &["runs", "--json"]).await).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(
        runs.iter()
            .any(|r| r["id"] == id.as_str() && r["state"] == "completed")
    );
    let completed: Value =
        serde_json::from_str(&dagq_ok(&env, &["runs", "--state", "completed", "--json"]).await)
            .unwrap();
    assert_eq!(completed.as_array().unwrap().len(), 2);
    assert!(
        completed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["workflow"] == "hello")
    );
    let table = dagq_ok(&env, &["runs", "--workflow", "broken"]).await;
    assert_eq!(
        table.lines().count(),
        2,
        "a header and the one broken run: {table}"
    );
    assert!(table.contains("failed"), "{table}");
    worker.stop().await;
}

/// `dagq publish` into a namespace where no worker ever ran keeps the event in
/// `<ns>.triggers`; a worker started later runs the workflow it triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_fresh_namespace_keeps_the_event_until_a_worker_starts() {
    let env = TestEnv::new().await;
    env.apply(hello()).await;
    let out = dagq_ok(
        &env,
        &[
            "publish",
            "--type",
            "greet",
            "--source",
            "hook",
            "--id",
            "push-1",
            "--data",
            r#"{"who": "hook"}"#,
        ],
    )
    .await;
    assert_eq!(out, "published greet event push-1\n");
    assert_eq!(
        queue_depth(&env, &env.topology().triggers_queue()).await,
        1,
        "the event waits for a worker"
    );
    assert_eq!(env.count("SELECT count(*) FROM runs").await, 0);
    let bad = dagq_err(&env, &["publish", "--type", "greet", "--data", "{nope"]).await;
    assert!(bad.contains("--data") && bad.contains("not JSON"), "{bad}");

    let worker = env.start_default_worker();
    let status = env
        .wait_run(
            &json!({"source": "hook", "id": "push-1"}),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status.run.state, "completed");
    assert_eq!(status.run.event_type, "greet");
    assert_eq!(
        node(&status, "greet").output,
        Some(json!({"text": "hello hook"}))
    );
    worker.stop().await;
}

/// `dagq demo` runs its sample workflow end to end in the test's namespace and database,
/// exits 0 and prints the run table with every node completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_to_completion_and_prints_the_run() {
    let env = TestEnv::new().await;
    let out = dagq_ok(&env, &["demo"]).await;
    let summary = out
        .lines()
        .find(|l| l.starts_with("run "))
        .unwrap_or_else(|| panic!("no run line:\n{out}"));
    assert!(summary.contains("state completed"), "{summary}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("NODE ") && l.contains("STATE")),
        "a table header:\n{out}"
    );
    let runs = env
        .store
        .list_runs(&dagq::store::RunFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        runs.len(),
        1,
        "the demo started one run in the test's database"
    );
    assert_eq!(runs[0].state, "completed");
    assert!(summary.contains(&runs[0].id.to_string()), "{summary}");
    let status = env.store.run_status(runs[0].id).await.unwrap().unwrap();
    assert!(!status.nodes.is_empty());
    for n in &status.nodes {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{} ", n.node_id)) && l.contains(" completed ")),
            "{} completed in the table:\n{out}",
            n.node_id
        );
    }
}
