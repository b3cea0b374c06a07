//! `dagq mock-llm` as a process: injected failures and deterministic answers; and
//! `dagq demo`, whose models are the mock reached through the real adapters.

mod common;
mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KillOnDrop, TestEnv, eventually, node};
use serde_json::{Value, json};
use support::run_dagq;

/// `dagq mock-llm` with `args` on a free loopback port, once it accepts connections.
async fn spawn_mock_llm(args: &[&str]) -> (KillOnDrop, String, reqwest::Client) {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dagq"))
        .args(["mock-llm", "--addr", &addr.to_string()])
        .args(args)
        .env("DAGQ_CONFIG", "/dev/null")
        .env("DAGQ_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn dagq mock-llm");
    let child = KillOnDrop(child);
    eventually(
        &format!("dagq mock-llm to accept connections on {addr}"),
        Duration::from_secs(30),
        || async { tokio::net::TcpStream::connect(addr).await.ok() },
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    (child, format!("http://{addr}"), client)
}

/// `dagq mock-llm --fail-rate 1 --fail-status 429` answers every chat with 429 and
/// `Retry-After`, in OpenAI's and Anthropic's error shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_llm_binary_injects_rate_limits_with_retry_after() {
    let (_mock, base, client) = spawn_mock_llm(&["--fail-rate", "1", "--fail-status", "429"]).await;
    let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]});
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure")),
        "{body}"
    );
    let messages = json!({"model": "mock-large", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let response = client
        .post(format!("{base}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&messages)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
}

/// `dagq mock-llm` with default options lists its models and answers the same request
/// with the same answer, reporting word counts as token usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_llm_binary_lists_models_and_answers_deterministically() {
    let (_mock, base, client) = spawn_mock_llm(&[]).await;
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-small", "mock-large"]);
    let chat = json!({"model": "mock-small", "messages": [{"role": "user", "content": "store the password here"}]});
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert_eq!(
        answers[0], answers[1],
        "the same request gets the same answer"
    );
    let text = "Reviewed 1 lines (4 words). CRITICAL: found password.";
    assert_eq!(answers[0]["choices"][0]["message"]["content"], text);
    assert_eq!(
        answers[0]["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12})
    );
}

/// `dagq demo` exits 0 and prints the joined review report, the opened ticket and the
/// token total, matching what the run recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_the_report_the_ticket_and_the_token_total() {
    let env = TestEnv::new().await;
    let out = run_dagq({
        let mut demo = env.command();
        demo.arg("demo");
        demo
    })
    .await;
    let lines: Vec<&str> = out.lines().collect();
    let report = lines
        .iter()
        .position(|l| *l == "report:")
        .unwrap_or_else(|| panic!("no report in:\n{out}"));
    assert!(
        lines[report + 1].trim().starts_with("Reviewed") && lines[report + 1].contains("CRITICAL"),
        "{out}"
    );
    let ticket = lines
        .iter()
        .find_map(|l| l.strip_prefix("ticket opened: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(ticket.starts_with("TICKET-"), "{ticket}");

    let runs = env
        .store
        .list_runs(&dagq::store::RunFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let [run] = &runs[..] else {
        panic!("one run: {runs:?}")
    };
    let status = env.store.run_status(run.id).await.unwrap().unwrap();
    assert_eq!(
        node(&status, "ticket").output.as_ref().unwrap()["body"]["id"],
        ticket
    );
    let totals = &status.totals;
    // Three reviews and the report, and the two HTTP calls (diff and ticket).
    assert_eq!(totals.model_calls, 6);
    for review in ["style", "security", "performance", "report"] {
        let n = node(&status, review);
        assert!(
            n.prompt_tokens > 0 && n.completion_tokens > 0,
            "{review}: {n:?}"
        );
    }
    let total = format!(
        "total: 6 model calls, {} prompt + {} completion tokens, cost ${:.6}",
        totals.prompt_tokens,
        totals.completion_tokens,
        totals.cost.expect("the demo's profiles are priced")
    );
    assert!(
        lines.contains(&total.as_str()),
        "no line {total:?} in:\n{out}"
    );
}
