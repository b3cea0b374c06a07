//! OpenAI's API: chat completions, completions, embeddings and image generation. Every
//! OpenAI-compatible server (vLLM, Ollama, llama.cpp, DeepSeek, Qwen, …) speaks it at its
//! own `base_url`.

use reqwest::header::AUTHORIZATION;
use reqwest::{Client, Method};
use serde_json::{Map, Value, json};

use super::http_call::{self, JsonRequest};
use super::{Adapter, AdapterError, Call, Exchange, Usage};
use crate::config::ModelProfile;
use crate::workflow::NodeType;

/// An OpenAI-compatible profile.
#[derive(Debug, Clone)]
pub struct OpenAi {
    client: Client,
    profile: ModelProfile,
}

impl OpenAi {
    /// An adapter for one profile.
    pub fn new(client: Client, profile: ModelProfile) -> Self {
        OpenAi { client, profile }
    }

    fn request_body(
        &self,
        kind: NodeType,
        input: &Value,
    ) -> Result<(&'static str, Value), AdapterError> {
        let input = input.as_object().ok_or_else(|| {
            AdapterError::InvalidInput(format!("{} input must be a JSON object", kind.as_str()))
        })?;
        // Profile defaults first, then the node's own parameters, then the model.
        let mut body: Map<String, Value> = self.profile.params.clone();
        let path = match kind {
            NodeType::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = input.get("system") {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.extend(chat_messages(input)?.iter().cloned());
                for (k, v) in input
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "messages" | "system"))
                {
                    body.insert(k.clone(), v.clone());
                }
                body.insert("messages".into(), Value::Array(messages));
                "chat/completions"
            }
            NodeType::Completion => {
                require_string(input, "prompt", "completion")?;
                body.extend(input.clone());
                "completions"
            }
            NodeType::Embedding => {
                match input.get("input") {
                    Some(Value::String(_)) => {}
                    Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
                    _ => {
                        return Err(AdapterError::InvalidInput(
                            "embedding input needs \"input\": a string or a list of strings".into(),
                        ));
                    }
                }
                body.extend(input.clone());
                "embeddings"
            }
            NodeType::Image => {
                require_string(input, "prompt", "image")?;
                body.extend(input.clone());
                "images/generations"
            }
            NodeType::Http | NodeType::Transform | NodeType::Noop => {
                return Err(AdapterError::Unsupported(format!(
                    "provider openai does not serve node type {}",
                    kind.as_str()
                )));
            }
        };
        if let Some(model) = &self.profile.model {
            body.insert("model".into(), Value::String(model.clone()));
        }
        Ok((path, Value::Object(body)))
    }
}

impl Adapter for OpenAi {
    async fn call(
        &self,
        kind: NodeType,
        call: &Call<'_>,
        exchange: &mut Exchange,
    ) -> Result<Value, AdapterError> {
        let (path, body) = self.request_body(kind, &call.input)?;
        exchange.request = body.clone();
        let mut headers = http_call::base_headers(Some(&self.profile), &call.idempotency_key())?;
        let label = call.node.model.as_deref().unwrap_or("?");
        http_call::insert_key(&mut headers, &self.profile, label, AUTHORIZATION, "Bearer ")?;
        let base = self.profile.base_url.as_deref().unwrap_or_default();
        let request = JsonRequest {
            method: Method::POST,
            url: http_call::join_url(base, path),
            headers,
            body: Some(body),
            timeout: call.time_left(self.profile.timeout),
        };
        let body = http_call::send_recorded(&self.client, request, exchange).await?;
        exchange.usage = usage(&body);
        exchange.model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        parse_output(kind, &body, exchange.usage)
    }
}

fn chat_messages(input: &Map<String, Value>) -> Result<&Vec<Value>, AdapterError> {
    let invalid = || {
        AdapterError::InvalidInput(
            "chat input needs \"messages\": [{\"role\": \"user\", \"content\": \"…\"}, …]".into(),
        )
    };
    let messages = input
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(invalid)?;
    let well_formed = !messages.is_empty()
        && messages
            .iter()
            .all(|m| m.get("role").is_some_and(Value::is_string) && m.get("content").is_some());
    if well_formed {
        Ok(messages)
    } else {
        Err(invalid())
    }
}

fn require_string(input: &Map<String, Value>, key: &str, kind: &str) -> Result<(), AdapterError> {
    match input.get(key) {
        Some(Value::String(_)) => Ok(()),
        _ => Err(AdapterError::InvalidInput(format!(
            "{kind} input needs \"{key}\": a string"
        ))),
    }
}

fn usage(body: &Value) -> Usage {
    let tokens = |key: &str| {
        body.pointer(&format!("/usage/{key}"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    Usage {
        prompt_tokens: tokens("prompt_tokens"),
        completion_tokens: tokens("completion_tokens"),
    }
}

/// Maps the provider's answer onto the node output of DESIGN §6.
fn parse_output(kind: NodeType, body: &Value, usage: Usage) -> Result<Value, AdapterError> {
    let missing = |what: &str| {
        AdapterError::InvalidResponse(format!("the answer has no {what}: {}", truncate(body)))
    };
    let usage_json =
        json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens});
    match kind {
        NodeType::Chat | NodeType::Completion => {
            let choice = body
                .pointer("/choices/0")
                .ok_or_else(|| missing("choices[0]"))?;
            let text = if kind == NodeType::Chat {
                choice.pointer("/message/content")
            } else {
                choice.get("text")
            };
            let text = match text {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None
                    if kind == NodeType::Chat
                        && choice.pointer("/message/tool_calls").is_some() =>
                {
                    String::new()
                }
                _ => return Err(missing("text in choices[0]")),
            };
            Ok(json!({
                "text": text,
                "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
                "model": body.get("model").cloned().unwrap_or(Value::Null),
                "usage": usage_json,
            }))
        }
        NodeType::Embedding => {
            let data = body
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| missing("data"))?;
            let embeddings = data
                .iter()
                .map(|d| {
                    d.get("embedding")
                        .cloned()
                        .ok_or_else(|| missing("data[].embedding"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(
                json!({"embeddings": embeddings, "model": body.get("model").cloned().unwrap_or(Value::Null), "usage": usage_json}),
            )
        }
        NodeType::Image => {
            let data = body
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| missing("data"))?;
            let images: Vec<Value> = data
                .iter()
                .map(|d| {
                    let mut image = Map::new();
                    for key in ["url", "b64_json", "revised_prompt"] {
                        if let Some(v) = d.get(key) {
                            image.insert(key.into(), v.clone());
                        }
                    }
                    Value::Object(image)
                })
                .collect();
            Ok(json!({"images": images}))
        }
        NodeType::Http | NodeType::Transform | NodeType::Noop => {
            Err(AdapterError::Unsupported(kind.as_str().into()))
        }
    }
}

fn truncate(body: &Value) -> String {
    body.to_string().chars().take(300).collect()
}
