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
