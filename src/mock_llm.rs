//! `dagq mock-llm`: a deterministic model server speaking the OpenAI API (chat,
//! completions, embeddings, images, models) and Anthropic's messages API, with
//! configurable latency and failures. Its answers depend only on the request, so tests
//! can assert them; the demo, tests and benchmarks talk to it through the real adapters.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Delay before every answer.
    pub latency: Duration,
    /// Share of requests (0.0-1.0) that fail, chosen by a hash of the request, so the
    /// same request always gets the same verdict and a retry (new idempotency key) may not.
    pub fail_rate: f64,
    /// Status of injected failures (429 carries `Retry-After: 1`).
    pub fail_status: u16,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            latency: Duration::ZERO,
            fail_rate: 0.0,
            fail_status: 500,
        }
    }
}

/// Which API shape an answer takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    OpenAi,
    Anthropic,
}

/// The mock's routes, for serving or embedding in a test server.
pub fn router(options: MockOptions) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completion))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/images/generations", post(images))
        .route("/v1/messages", post(messages))
        .route("/demo/diff", get(demo_diff))
        .route("/demo/tickets", post(demo_ticket))
        .with_state(options)
}

/// Serves the mock on `addr` until `shutdown`; returns the bound address (pass port 0
/// for a free one).
pub async fn serve(
    addr: SocketAddr,
    options: MockOptions,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router(options))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "mock-llm stopped");
        }
    });
    Ok(bound)
}

/// FNV-1a: a stable hash, so that verdicts and vectors do not change between builds.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Waits the configured latency, then decides whether this request fails.
async fn prelude(
    options: &MockOptions,
    headers: &HeaderMap,
    body: &Value,
    api: Api,
) -> Option<Response> {
    if !options.latency.is_zero() {
        tokio::time::sleep(options.latency).await;
    }
    if api == Api::Anthropic && !headers.contains_key("anthropic-version") {
        return Some(error(api, 400, "anthropic-version header is required"));
    }
    if options.fail_rate <= 0.0 {
        return None;
    }
    let key = headers
        .get("idempotency-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let roll = fnv(&[body.to_string().as_bytes(), key]) as f64 / u64::MAX as f64;
    (roll < options.fail_rate).then(|| {
        error(
            api,
            options.fail_status,
            "injected failure (mock-llm --fail-rate)",
        )
    })
}

fn error(api: Api, status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match api {
        Api::OpenAi => {
            json!({"error": {"message": message, "type": "mock_error", "code": status.as_u16()}})
        }
        Api::Anthropic => {
            json!({"type": "error", "error": {"type": "api_error", "message": message}})
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    response
}

fn words(text: &str) -> i64 {
    text.split_whitespace().count() as i64
}

/// Text of a message's `content`: a string, or the text parts of a list of blocks.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Text of the last message with role `user`: what the mock answers.
fn last_user_text(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default()
}

/// The deterministic answer to a prompt: it flags prompts that look dangerous, so that
/// workflows can branch on it, and otherwise summarises.
fn reply_to(prompt: &str) -> String {
    let lowered = prompt.to_lowercase();
    let alarming = [
        "password",
        "secret",
        "api_key",
        "eval(",
        "drop table",
        "critical",
    ];
    let found: Vec<&str> = alarming
        .iter()
        .copied()
        .filter(|w| lowered.contains(w))
        .collect();
    let lines = prompt.lines().count();
    if found.is_empty() {
        format!(
            "Reviewed {lines} lines ({} words). No critical issues found.",
            words(prompt)
        )
    } else {
        format!(
            "Reviewed {lines} lines ({} words). CRITICAL: found {}.",
            words(prompt),
            found.join(", ")
        )
    }
}

fn model_of(body: &Value) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_owned()
}

fn id_of(body: &Value, prefix: &str) -> String {
    format!("{prefix}-{:016x}", fnv(&[body.to_string().as_bytes()]))
}

async fn models() -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [
        {"id": "mock-small", "object": "model", "owned_by": "dagq"},
        {"id": "mock-large", "object": "model", "owned_by": "dagq"}
    ]}))
}

async fn chat(
    State(options): State<MockOptions>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(failure) = prelude(&options, &headers, &body, Api::OpenAi).await {
        return failure;
    }
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return error(Api::OpenAi, 400, "'messages' is a required property");
    };
    let prompt: Vec<String> = messages
        .iter()
        .map(|m| content_text(&m["content"]))
        .collect();
    let last_user = last_user_text(messages);
    let text = reply_to(&last_user);
    axum::Json(json!({
        "id": id_of(&body, "chatcmpl"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model_of(&body),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": words(&prompt.join(" ")), "completion_tokens": words(&text),
                  "total_tokens": words(&prompt.join(" ")) + words(&text)}
    }))
    .into_response()
}

async fn completion(
    State(options): State<MockOptions>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(failure) = prelude(&options, &headers, &body, Api::OpenAi).await {
        return failure;
    }
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return error(Api::OpenAi, 400, "'prompt' is a required property");
    };
    let text = reply_to(prompt);
    axum::Json(json!({
        "id": id_of(&body, "cmpl"),
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": model_of(&body),
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": words(prompt), "completion_tokens": words(&text),
                  "total_tokens": words(prompt) + words(&text)}
    }))
    .into_response()
}

async fn embeddings(
    State(options): State<MockOptions>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(failure) = prelude(&options, &headers, &body, Api::OpenAi).await {
        return failure;
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => return error(Api::OpenAi, 400, "'input' is a required property"),
    };
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096) as usize;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": vector(text, dimensions)}))
        .collect();
    let tokens: i64 = inputs.iter().map(|t| words(t)).sum();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model_of(&body),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}

/// A unit vector derived from the text's hash.
fn vector(text: &str, dimensions: usize) -> Vec<f64> {
    let mut state = fnv(&[text.as_bytes()]) | 1;
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f64 / 1000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::EPSILON);
    raw.iter().map(|x| (x / norm * 1e6).round() / 1e6).collect()
}

async fn images(
    State(options): State<MockOptions>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(failure) = prelude(&options, &headers, &body, Api::OpenAi).await {
        return failure;
    }
    let Some(prompt) = body.get("prompt").and_then(Value::as_str) else {
        return error(Api::OpenAi, 400, "'prompt' is a required property");
    };
    let n = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let hash = fnv(&[prompt.as_bytes()]);
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"url": format!("http://mock-llm.invalid/images/{hash:016x}-{i}.png"), "revised_prompt": prompt}))
        .collect();
    axum::Json(json!({"created": 1_700_000_000, "data": data})).into_response()
}

async fn messages(
    State(options): State<MockOptions>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(failure) = prelude(&options, &headers, &body, Api::Anthropic).await {
        return failure;
    }
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return error(Api::Anthropic, 400, "messages: field required");
    };
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return error(Api::Anthropic, 400, "max_tokens: field required");
    }
    let mut prompt: Vec<String> = messages
        .iter()
        .map(|m| content_text(&m["content"]))
        .collect();
    if let Some(system) = body.get("system") {
        prompt.push(content_text(system));
    }
    let last_user = last_user_text(messages);
    let text = reply_to(&last_user);
    axum::Json(json!({
        "id": id_of(&body, "msg"),
        "type": "message",
        "role": "assistant",
        "model": model_of(&body),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": words(&prompt.join(" ")), "output_tokens": words(&text)}
    }))
    .into_response()
}

/// A sample diff for the demo's code review.
async fn demo_diff() -> &'static str {
    include_str!("../workflows/demo.diff")
}

/// Accepts a ticket for the demo and returns its id.
async fn demo_ticket(axum::Json(body): axum::Json<Value>) -> (StatusCode, axum::Json<Value>) {
    let id = format!("TICKET-{}", fnv(&[body.to_string().as_bytes()]) % 10_000);
    (
        StatusCode::CREATED,
        axum::Json(json!({"id": id, "status": "open"})),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_flag_dangerous_prompts_deterministically() {
        assert!(reply_to("+ let password = \"hunter2\";").contains("CRITICAL"));
        assert!(reply_to("+ fn add(a: i32) {}").contains("No critical issues"));
        assert_eq!(reply_to("same"), reply_to("same"));
    }

    #[test]
    fn vectors_are_unit_length_and_stable() {
        let v = vector("hello", 16);
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3);
        assert_eq!(v, vector("hello", 16));
    }
}
