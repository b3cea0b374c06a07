//! Helpers of the adapter and model-run tests: a stub HTTP server on loopback that
//! records every request, adapter registries over hand-made profiles, and running the
//! `dagq` binary to completion.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use dagq::adapter::{AdapterError, Call, ModelCall, Outcome, Registry};
use dagq::config::{FileConfig, ModelProfile, Provider};
use dagq::workflow::NodeDef;
use serde_json::{Value, json};
use uuid::Uuid;

/// One request as a stub received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The JSON body, `Null` when there was none.
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What a stub answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: String,
    pub delay: Duration,
}

pub fn json_reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json")],
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

pub fn text_reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "text/plain")],
        body: body.to_owned(),
        delay: Duration::ZERO,
    }
}

/// A stub HTTP server on loopback that records every request; stops on drop.
pub struct Stub {
    pub base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Stub {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Serves `answer` on a free loopback port.
pub async fn stub(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Stub {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let record = seen.clone();
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (record, answer) = (record.clone(), answer.clone());
            async move {
                let seen = Seen {
                    method: method.to_string(),
                    path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                        .collect(),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                let reply = answer(&seen);
                record.lock().unwrap().push(seen);
                tokio::time::sleep(reply.delay).await;
                let mut response = Response::builder().status(reply.status);
                for (name, value) in &reply.headers {
                    response = response.header(*name, *value);
                }
                response.body(axum::body::Body::from(reply.body)).unwrap()
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Stub {
        base: format!("http://{addr}"),
        seen,
        server,
    }
}

pub fn profile(provider: Provider, base_url: &str, model: &str) -> ModelProfile {
    ModelProfile {
        provider,
        base_url: Some(base_url.to_owned()),
        model: Some(model.to_owned()),
        api_key_env: None,
        timeout: Duration::from_secs(10),
        fallback: Vec::new(),
        headers: BTreeMap::new(),
        params: Default::default(),
        price_per_1k_prompt: None,
        price_per_1k_completion: None,
    }
}

pub fn registry(profiles: Vec<(&str, ModelProfile)>) -> Registry {
    let models = profiles
        .into_iter()
        .map(|(name, p)| (name.to_owned(), p))
        .collect();
    Registry::new(&FileConfig {
        models,
        ..FileConfig::default()
    })
}

pub fn node(id: &str, kind: &str, model: Option<&str>) -> NodeDef {
    serde_json::from_value(json!({"id": id, "type": kind, "model": model})).unwrap()
}

/// Runs `node` at attempt 3 with `input`; returns the expected idempotency key too.
pub async fn call(registry: &Registry, node: &NodeDef, input: Value) -> (Outcome, String) {
    let run_id = Uuid::now_v7();
    let call = Call {
        run_id,
        node,
        attempt: 3,
        input,
        deadline: None,
    };
    let outcome = registry.run(&call).await;
    (outcome, format!("{run_id}/{}/3", node.id))
}

/// A fresh environment variable holding a fake API key: (variable name, key).
pub fn fake_key() -> (String, String) {
    let id = Uuid::new_v4().simple().to_string();
    let (var, key) = (
        format!("DAGQ_TEST_KEY_{}", &id[..12]),
        format!("sk-test-{id}"),
    );
    // SAFETY: the variable is new and named only by this test's profile; Rust's own
    // environment accesses are serialised by the standard library.
    unsafe { std::env::set_var(&var, &key) };
    (var, key)
}

pub fn assert_key_not_recorded(outcome: &Outcome, key: &str) {
    let recorded = format!("{outcome:?}");
    assert!(
        !recorded.contains(key),
        "the API key leaked into {recorded}"
    );
}

/// Runs one chat call against `profile` and returns its error and its one record.
pub async fn failing_chat(profile: ModelProfile) -> (AdapterError, ModelCall) {
    let registry = registry(vec![("p", profile)]);
    let input = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (outcome, _) = call(&registry, &node("n", "chat", Some("p")), input).await;
    let error = outcome.result.expect_err("the call fails");
    let [record] = <[_; 1]>::try_from(outcome.calls).expect("one call recorded");
    (error, record)
}

/// Runs a `dagq` command to completion (within 120 s) and returns its stdout; it must
/// exit 0.
pub async fn run_dagq(command: Command) -> String {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("dagq finishes within 120 s")
        .expect("dagq starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dagq failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// An OpenAI chat-completions answer saying `text`.
pub fn chat_reply(text: &str) -> Reply {
    json_reply(
        200,
        json!({
            "id": "chatcmpl-stub", "object": "chat.completion", "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}
        }),
    )
}

/// How many requests a stub received on `path`.
pub fn hits(stub: &Stub, path: &str) -> usize {
    stub.seen().iter().filter(|s| s.path == path).count()
}

/// A JSON error answer with `status`.
pub fn status_reply(status: u16) -> Reply {
    json_reply(
        status,
        json!({"error": {"message": format!("stub says {status}")}}),
    )
}

/// A provider that answers its first `failures` requests with `failure`, then "fine".
pub async fn failing_first(failures: usize, failure: Reply) -> Stub {
    let count = std::sync::atomic::AtomicUsize::new(0);
    stub(move |_| {
        if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < failures {
            failure.clone()
        } else {
            chat_reply("fine")
        }
    })
    .await
}

/// A provider that answers `failure` until the switch is turned on, then `text`.
pub async fn switchable(
    failure: Reply,
    text: &'static str,
) -> (Stub, Arc<std::sync::atomic::AtomicBool>) {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = healthy.clone();
    let stub = stub(move |_| {
        if switch.load(std::sync::atomic::Ordering::SeqCst) {
            chat_reply(text)
        } else {
            failure.clone()
        }
    })
    .await;
    (stub, healthy)
}

/// OpenAI-speaking model profiles on stubs, alerts to `<alerts>/alerts` when given, and
/// the circuit breaker out of the way (an open breaker defers tasks instead of failing
/// them, which tests of retries and dead letters do not want).
pub fn stub_config(profiles: &[(&str, &Stub)], alerts: Option<&Stub>) -> FileConfig {
    let models = profiles
        .iter()
        .map(|(name, stub)| {
            let base = format!("{}/v1", stub.base);
            (
                name.to_string(),
                profile(Provider::Openai, &base, "stub-model"),
            )
        })
        .collect();
    let webhooks = alerts.map(|a| vec![format!("{}/alerts", a.base)]);
    FileConfig {
        models,
        breaker: dagq::config::BreakerConfig {
            threshold: 1000,
            cooldown: Duration::from_secs(1),
        },
        alerts: dagq::config::AlertsConfig {
            webhooks: webhooks.unwrap_or_default(),
            ..Default::default()
        },
    }
}

/// A node retry policy without jitter, delays doubling from `initial_delay`.
pub fn retry_policy(max_attempts: u32, initial_delay: &str) -> Value {
    json!({"max_attempts": max_attempts, "initial_delay": initial_delay, "max_delay": "1m",
           "multiplier": 2.0, "jitter": false})
}

/// Workflow `ask`: node `ask` (a chat on `profile` asking `input.q`) → `after` (a
/// transform of its answer).
pub fn ask_workflow(profile: &str, retry: Value) -> Value {
    json!({"name": "ask", "nodes": [
        {"id": "ask", "type": "chat", "model": profile, "retry": retry,
         "input": {"messages": [{"role": "user", "content": "{{ input.q }}"}]}},
        {"id": "after", "type": "transform", "depends": ["ask"],
         "input": {"said": "{{ nodes.ask.output.text }}"}}
    ]})
}
