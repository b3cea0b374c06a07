//! Model nodes end to end through a worker: fallbacks, the `model_calls` audit, and
//! token and cost accounting in the run status and `dagq status`.

mod common;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::{Next, from_fn};
use common::{TestEnv, node};
use dagq::config::{FileConfig, ModelProfile, Provider};
use dagq::mock_llm::{self, MockOptions};
use serde_json::{Value, json};
use support::{fake_key, run_dagq};
use tokio_util::sync::{CancellationToken, DropGuard};

fn profile(provider: Provider, base_url: String, model: &str, fallback: &[&str]) -> ModelProfile {
    ModelProfile {
        provider,
        base_url: Some(base_url),
        model: Some(model.to_owned()),
        api_key_env: None,
        timeout: Duration::from_secs(10),
        fallback: fallback.iter().map(|f| f.to_string()).collect(),
        headers: BTreeMap::new(),
        params: Default::default(),
        price_per_1k_prompt: None,
        price_per_1k_completion: None,
    }
}

fn config(profiles: Vec<(&str, ModelProfile)>) -> FileConfig {
    FileConfig {
        models: profiles
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect(),
        ..FileConfig::default()
    }
}

/// The real mock model server on a free loopback port, counting the requests it gets.
struct CountedMock {
    base: String,
    requests: Arc<AtomicUsize>,
    _stop: DropGuard,
}

impl CountedMock {
    async fn start(options: MockOptions) -> CountedMock {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let app = mock_llm::router(options).layer(from_fn(move |request: Request, next: Next| {
            counter.fetch_add(1, Ordering::SeqCst);
            next.run(request)
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        });
        CountedMock {
            base: format!("http://{addr}"),
            requests,
            _stop: stop.drop_guard(),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn failing(status: u16) -> MockOptions {
    MockOptions {
        fail_rate: 1.0,
        fail_status: status,
        ..MockOptions::default()
    }
}

/// A one-node workflow asking `profile` a question from the run input.
fn ask(profile: &str) -> Value {
    json!({"name": "ask", "nodes": [{"id": "ask", "type": "chat", "model": profile,
        "input": {"messages": [{"role": "user", "content": "{{ input.question }}"}]}}]})
}

/// (seq, profile, provider, status, http_status, attempt, error) of a run's model calls.
type CallRow = (
    i16,
    String,
    String,
    String,
    Option<i32>,
    i32,
    Option<String>,
);

async fn call_rows(env: &TestEnv, run: uuid::Uuid) -> Vec<CallRow> {
    let sql = env.sql().await;
    let rows = sql
        .query(
            "SELECT seq, profile, provider, status, http_status, attempt, error
             FROM model_calls WHERE run_id = $1 ORDER BY attempt, seq",
            &[&run],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
}

/// A primary profile answering 503 falls back, within the same attempt, to a healthy
/// profile of another provider; the node completes with the fallback's answer and
/// `model_calls` holds both calls, the failed one first, and never the API key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_primary_completes_on_its_fallback_and_both_calls_are_recorded() {
    let down = CountedMock::start(failing(503)).await;
    let up = CountedMock::start(MockOptions::default()).await;
    let (key_var, key) = fake_key();
    let mut primary = profile(
        Provider::Openai,
        format!("{}/v1", down.base),
        "gpt-x",
        &["backup"],
    );
    primary.api_key_env = Some(key_var.clone());
    let mut backup = profile(Provider::Anthropic, up.base.clone(), "claude-y", &[]);
    backup.api_key_env = Some(key_var);
    let env = TestEnv::with_config(config(vec![("primary", primary), ("backup", backup)])).await;
    env.apply(ask("primary")).await;
    let worker = env.start_default_worker();
    let event = env
        .request_run("ask", json!({"question": "is this fine"}))
        .await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    worker.stop().await;

    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);
    let answer = node(&status, "ask").output.clone().expect("an output");
    assert_eq!(
        answer["text"],
        "Reviewed 1 lines (3 words). No critical issues found."
    );
    assert_eq!(answer["model"], "claude-y");
    let rows = call_rows(&env, status.run.id).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let (seq, profile, provider, state, http, attempt, error) = &rows[0];
    assert_eq!(
        (*seq, profile.as_str(), provider.as_str()),
        (0, "primary", "openai")
    );
    assert_eq!(
        (state.as_str(), *http, *attempt),
        ("http_503", Some(503), 1)
    );
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("injected failure")),
        "{error:?}"
    );
    let (seq, profile, provider, state, http, attempt, error) = &rows[1];
    assert_eq!(
        (*seq, profile.as_str(), provider.as_str()),
        (1, "backup", "anthropic")
    );
    assert_eq!(
        (state.as_str(), *http, *attempt, error),
        ("ok", Some(200), 1, &None)
    );
    assert_eq!((down.requests(), up.requests()), (1, 1));
    let leaks = env
        .count(&format!(
            "SELECT count(*) FROM model_calls WHERE concat(request::text, response::text, error) LIKE '%{key}%'"
        ))
        .await;
    assert_eq!(leaks, 0, "the API key is in model_calls");
}

/// A terminal failure (400) of the primary profile fails the node without trying the
/// fallback: one call recorded, and the fallback server never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_failure_does_not_try_the_fallback() {
    let rejecting = CountedMock::start(failing(400)).await;
    let up = CountedMock::start(MockOptions::default()).await;
    let env = TestEnv::with_config(config(vec![
        (
            "strict",
            profile(
                Provider::Openai,
                format!("{}/v1", rejecting.base),
                "gpt-x",
                &["backup"],
            ),
        ),
        (
            "backup",
            profile(Provider::Openai, format!("{}/v1", up.base), "gpt-y", &[]),
        ),
    ]))
    .await;
    env.apply(ask("strict")).await;
    let worker = env.start_default_worker();
    let event = env.request_run("ask", json!({"question": "hello"})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    worker.stop().await;

    assert_eq!(status.run.state, "failed");
    let failed = node(&status, "ask");
    assert_eq!(failed.state, "failed");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 400")),
        "{:?}",
        failed.error
    );
    let rows = call_rows(&env, status.run.id).await;
    let statuses: Vec<_> = rows
        .iter()
        .map(|r| (r.0, r.1.as_str(), r.3.as_str()))
        .collect();
    assert_eq!(statuses, [(0, "strict", "http_400")]);
    assert_eq!((rejecting.requests(), up.requests()), (1, 0));
}

/// A three-chat-node run against `mock-llm` with priced profiles records each node's
/// tokens (the sum of its model calls) and cost (tokens × price / 1000), the run's totals
/// over its nodes, and `dagq status` prints them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_records_tokens_and_cost_per_node_and_in_total() {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mock = mock_llm::serve("127.0.0.1:0".parse().unwrap(), MockOptions::default(), stop)
        .await
        .unwrap();
    let priced = |provider, base, model, prompt, completion| ModelProfile {
        price_per_1k_prompt: Some(prompt),
        price_per_1k_completion: Some(completion),
        ..profile(provider, base, model, &[])
    };
    let prices = BTreeMap::from([("cheap", (0.5, 1.5)), ("claude", (3.0, 15.0))]);
    let env = TestEnv::with_config(config(vec![
        (
            "cheap",
            priced(
                Provider::Openai,
                format!("http://{mock}/v1"),
                "mock-small",
                0.5,
                1.5,
            ),
        ),
        (
            "claude",
            priced(
                Provider::Anthropic,
                format!("http://{mock}"),
                "mock-large",
                3.0,
                15.0,
            ),
        ),
    ]))
    .await;
    env.apply(json!({"name": "talk", "nodes": [
        {"id": "outline", "type": "chat", "model": "cheap",
         "input": {"system": "You outline.", "messages": [{"role": "user", "content": "Outline a short talk about queues"}]}},
        {"id": "draft", "type": "chat", "model": "cheap", "depends": ["outline"],
         "input": {"messages": [{"role": "user", "content": "Draft from: {{ nodes.outline.output.text }}"}]}},
        {"id": "polish", "type": "chat", "model": "claude", "depends": ["draft"],
         "input": {"messages": [{"role": "user", "content": "Polish: {{ nodes.draft.output.text }}"}], "max_tokens": 200}}
    ]}))
    .await;
    let worker = env.start_default_worker();
    let event = env.request_run("talk", json!({})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);

    let sql = env.sql().await;
    let sums: BTreeMap<String, (i64, i64, i64, f64)> = sql
        .query(
            "SELECT node_id, count(*), sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost)
             FROM model_calls WHERE run_id = $1 GROUP BY node_id",
            &[&status.run.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect();
    assert_eq!((sums.len(), status.nodes.len()), (3, 3), "{sums:?}");
    // The mock counts words: "You outline. Outline a short talk about queues" is 8, and its
    // answer "Reviewed 1 lines (6 words). No critical issues found." is 9.
    let outline = node(&status, "outline");
    assert_eq!((outline.prompt_tokens, outline.completion_tokens), (8, 9));
    for n in &status.nodes {
        let (calls, prompt, completion, cost) = sums[&n.node_id];
        assert_eq!(n.model_calls, calls, "{}", n.node_id);
        assert_eq!(
            (n.prompt_tokens, n.completion_tokens),
            (prompt, completion),
            "{}",
            n.node_id
        );
        assert!(
            prompt > 0 && completion > 0,
            "{}: {prompt}/{completion}",
            n.node_id
        );
        let usage = &n.output.as_ref().unwrap()["usage"];
        assert_eq!(
            (
                usage["prompt_tokens"].as_i64(),
                usage["completion_tokens"].as_i64()
            ),
            (Some(prompt), Some(completion))
        );
        let (per_prompt, per_completion) = prices[if n.node_id == "polish" {
            "claude"
        } else {
            "cheap"
        }];
        let expected = (prompt as f64 * per_prompt + completion as f64 * per_completion) / 1000.0;
        let recorded = n.cost.expect("priced nodes have a cost");
        assert!(
            (recorded - expected).abs() < 1e-9 && (cost - expected).abs() < 1e-9,
            "{}: {recorded} vs {expected}",
            n.node_id
        );
    }
    let totals = &status.totals;
    assert_eq!(totals.model_calls, 3);
    assert_eq!(
        totals.prompt_tokens,
        status.nodes.iter().map(|n| n.prompt_tokens).sum::<i64>()
    );
    assert_eq!(
        totals.completion_tokens,
        status
            .nodes
            .iter()
            .map(|n| n.completion_tokens)
            .sum::<i64>()
    );
    let total_cost: f64 = status.nodes.iter().filter_map(|n| n.cost).sum();
    assert!(
        (totals.cost.unwrap() - total_cost).abs() < 1e-9,
        "{:?}",
        totals.cost
    );

    let out = run_dagq({
        let mut status_command = env.command();
        status_command.args(["status", &status.run.id.to_string()]);
        status_command
    })
    .await;
    assert!(
        out.lines()
            .any(|l| l.contains("TOKENS IN/OUT") && l.contains("COST")),
        "{out}"
    );
    for n in &status.nodes {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{} ", n.node_id)))
            .unwrap_or_else(|| panic!("{out}"));
        let columns = format!("{}/{}", n.prompt_tokens, n.completion_tokens);
        assert!(
            line.contains(&columns) && line.contains(&format!("${:.6}", n.cost.unwrap())),
            "{line}"
        );
    }
    let total = format!(
        "total: 3 model calls, {} prompt + {} completion tokens, cost ${:.6}",
        totals.prompt_tokens,
        totals.completion_tokens,
        totals.cost.unwrap()
    );
    assert!(
        out.lines().any(|l| l == total),
        "no line {total:?} in:\n{out}"
    );
}

/// Parallel model nodes whose calls end together are recorded together (group commit,
/// one statement for all their calls); each node keeps exactly its own calls: the
/// failed primary at seq 0, then the fallback's answer to its own prompt at seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_model_nodes_finishing_together_are_recorded_each_under_its_own_node() {
    let down = CountedMock::start(failing(503)).await;
    let up = CountedMock::start(MockOptions {
        // Long enough that the calls of all nodes are out at once and end together.
        latency: Duration::from_millis(300),
        ..MockOptions::default()
    })
    .await;
    let primary = profile(
        Provider::Openai,
        format!("{}/v1", down.base),
        "gpt-x",
        &["backup"],
    );
    let backup = profile(Provider::Openai, format!("{}/v1", up.base), "gpt-y", &[]);
    let mut file = config(vec![("primary", primary), ("backup", backup)]);
    // Every node tries the primary first, however many failed before it.
    file.breaker.threshold = 1000;
    let env = TestEnv::with_config(file).await;
    const NODES: usize = 12;
    // Node i's prompt has i + 1 words, which the mock reports as its prompt tokens.
    let nodes: Vec<Value> = (0..NODES)
        .map(|i| {
            let prompt = vec!["word"; i + 1].join(" ");
            json!({"id": format!("n{i:02}"), "type": "chat", "model": "primary",
                   "input": {"messages": [{"role": "user", "content": prompt}]}})
        })
        .collect();
    env.apply(json!({"name": "wide", "nodes": nodes})).await;
    let worker = env.start_default_worker();
    let event = env.request_run("wide", json!({})).await;
    let status = env.wait_run(&event, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(status.run.state, "completed", "{:?}", status.nodes);

    let sql = env.sql().await;
    let rows = sql
        .query(
            "SELECT node_id, seq, profile, status, prompt_tokens FROM model_calls
             WHERE run_id = $1 ORDER BY node_id, seq",
            &[&status.run.id],
        )
        .await
        .unwrap();
    let mut by_node: BTreeMap<String, Vec<(i16, String, String, i32)>> = BTreeMap::new();
    for r in &rows {
        by_node
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    assert_eq!(by_node.len(), NODES, "{by_node:#?}");
    for (i, (node_id, calls)) in by_node.iter().enumerate() {
        assert_eq!(node_id, &format!("n{i:02}"));
        assert_eq!(calls.len(), 2, "{node_id}: {calls:?}");
        assert_eq!(
            (calls[0].0, calls[0].1.as_str(), calls[0].2.as_str()),
            (0, "primary", "http_503"),
            "{node_id}"
        );
        assert_eq!(
            (calls[1].0, calls[1].1.as_str(), calls[1].2.as_str()),
            (1, "backup", "ok"),
            "{node_id}"
        );
        assert_eq!(calls[1].3, i as i32 + 1, "{node_id}: prompt tokens");
    }
    assert_eq!((down.requests(), up.requests()), (NODES, NODES));
}
