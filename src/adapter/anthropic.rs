//! Anthropic's messages API: its own headers (`x-api-key`, `anthropic-version`), a
//! top-level `system`, a required `max_tokens`, and content blocks in the answer.

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Client, Method};
use serde_json::{Map, Value, json};

use super::http_call::{self, JsonRequest};
use super::{Adapter, AdapterError, Call, Exchange, Usage};
use crate::config::ModelProfile;
use crate::workflow::NodeType;

/// The API version dagq speaks.
const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when neither the node nor the profile sets it.
const DEFAULT_MAX_TOKENS: u64 = 1024;

/// An Anthropic profile.
#[derive(Debug, Clone)]
pub struct Anthropic {
    client: Client,
    profile: ModelProfile,
}

impl Anthropic {
    /// An adapter for one profile.
    pub fn new(client: Client, profile: ModelProfile) -> Self {
        Anthropic { client, profile }
    }

    fn request_body(&self, kind: NodeType, input: &Value) -> Result<Value, AdapterError> {
        let input = input.as_object().ok_or_else(|| {
            AdapterError::InvalidInput(format!("{} input must be a JSON object", kind.as_str()))
        })?;
        let mut body: Map<String, Value> = self.profile.params.clone();
        let mut system: Vec<String> = input
            .get("system")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .collect();
        let messages: Vec<Value> = match kind {
            NodeType::Chat => {
                let messages = input.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()).ok_or_else(|| {
                    AdapterError::InvalidInput("chat input needs \"messages\": [{\"role\": \"user\", \"content\": \"…\"}, …]".into())
                })?;
                // Anthropic takes the system prompt beside the messages, not among them.
                let mut rest = Vec::new();
                for message in messages {
                    match message.get("role").and_then(Value::as_str) {
                        Some("system") => system.extend(
                            message
                                .get("content")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                        ),
                        Some(_) => rest.push(message.clone()),
                        None => {
                            return Err(AdapterError::InvalidInput(
                                "every chat message needs a \"role\"".into(),
                            ));
                        }
                    }
                }
                rest
            }
            NodeType::Completion => {
                let prompt = input.get("prompt").and_then(Value::as_str).ok_or_else(|| {
                    AdapterError::InvalidInput("completion input needs \"prompt\": a string".into())
                })?;
                vec![json!({"role": "user", "content": prompt})]
            }
            NodeType::Embedding
            | NodeType::Image
            | NodeType::Http
            | NodeType::Transform
            | NodeType::Noop => {
                return Err(AdapterError::Unsupported(format!(
                    "provider anthropic does not serve node type {}",
                    kind.as_str()
                )));
            }
        };
        for (k, v) in input
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "messages" | "system" | "prompt"))
        {
            body.insert(k.clone(), v.clone());
        }
        body.entry("max_tokens")
            .or_insert(json!(DEFAULT_MAX_TOKENS));
        if !system.is_empty() {
            body.insert("system".into(), Value::String(system.join("\n\n")));
        }
        body.insert("messages".into(), Value::Array(messages));
        if let Some(model) = &self.profile.model {
            body.insert("model".into(), Value::String(model.clone()));
        }
        Ok(Value::Object(body))
    }
}

impl Adapter for Anthropic {
    async fn call(
        &self,
        kind: NodeType,
        call: &Call<'_>,
        exchange: &mut Exchange,
    ) -> Result<Value, AdapterError> {
        let body = self.request_body(kind, &call.input)?;
        exchange.request = body.clone();
        let mut headers = http_call::base_headers(Some(&self.profile), &call.idempotency_key())?;
        headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
        let label = call.node.model.as_deref().unwrap_or("?");
        let key_header = HeaderName::from_static("x-api-key");
        http_call::insert_key(&mut headers, &self.profile, label, key_header, "")?;
        let base = self.profile.base_url.as_deref().unwrap_or_default();
        let request = JsonRequest {
            method: Method::POST,
            url: http_call::join_url(base, "v1/messages"),
            headers,
            body: Some(body),
            timeout: call.time_left(self.profile.timeout),
        };
        let body = http_call::send_recorded(&self.client, request, exchange).await?;
        let tokens = |key: &str| {
            body.pointer(&format!("/usage/{key}"))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        exchange.usage = Usage {
            prompt_tokens: tokens("input_tokens"),
            completion_tokens: tokens("output_tokens"),
        };
        exchange.model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        let Some(blocks) = body.get("content").and_then(Value::as_array) else {
            let text: String = body.to_string().chars().take(300).collect();
            return Err(AdapterError::InvalidResponse(format!(
                "the answer has no content: {text}"
            )));
        };
        let text: String = blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect();
        let usage = exchange.usage;
        Ok(json!({
            "text": text,
            "finish_reason": body.get("stop_reason").cloned().unwrap_or(Value::Null),
            "model": body.get("model").cloned().unwrap_or(Value::Null),
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        }))
    }
}
