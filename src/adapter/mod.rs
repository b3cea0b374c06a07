//! The model-adapter layer: one small trait, one implementation per provider, chosen
//! through a closed enum built from the node type and its model profile. The registry
//! walks a profile's `fallback` chain within one attempt and reports every call made,
//! for the audit log.

mod anthropic;
pub mod breaker;
mod builtin;
mod http;
mod http_call;
mod openai;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

pub use anthropic::Anthropic;
pub use breaker::{Admission, BreakerEvent, Breakers};
pub use builtin::{Noop, Transform, noop_output};
pub use http::HttpAdapter;
pub use openai::OpenAi;

use crate::config::{FileConfig, ModelProfile, Provider};
use crate::workflow::{NodeDef, NodeType, provider_serves};

/// Why an adapter call failed, classified for retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    /// The node's input cannot work (bad template, missing field): fix the workflow.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The configuration cannot work (API key variable unset, unknown profile).
    #[error("configuration: {0}")]
    Config(String),
    /// No adapter can run this node.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The provider could not be reached, or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    /// The call took longer than its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The provider answered with an error status; `message` is the provider's own.
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider's answer could not be understood.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
    /// The profile's circuit breaker is open (and no fallback could take the call).
    #[error("circuit breaker of profile \"{profile}\" is open")]
    BreakerOpen {
        profile: String,
        retry_after: Duration,
    },
}

impl AdapterError {
    /// Connect errors, timeouts, 408, 429 and 5xx are worth retrying; everything else
    /// fails the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            AdapterError::Connect { .. }
            | AdapterError::Timeout(_)
            | AdapterError::BreakerOpen { .. } => true,
            AdapterError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..600).contains(status)
            }
            AdapterError::InvalidInput(_)
            | AdapterError::Config(_)
            | AdapterError::Unsupported(_)
            | AdapterError::InvalidResponse(_) => false,
        }
    }

    /// How long the provider asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AdapterError::Status { retry_after, .. } => *retry_after,
            AdapterError::BreakerOpen { retry_after, .. } => Some(*retry_after),
            AdapterError::InvalidInput(_)
            | AdapterError::Config(_)
            | AdapterError::Unsupported(_)
            | AdapterError::Connect { .. }
            | AdapterError::Timeout(_)
            | AdapterError::InvalidResponse(_) => None,
        }
    }

    /// A short, bounded label for the `status` of a model call.
    pub fn status_label(&self) -> String {
        match self {
            AdapterError::InvalidInput(_) => "invalid_input".into(),
            AdapterError::Config(_) => "config".into(),
            AdapterError::Unsupported(_) => "unsupported".into(),
            AdapterError::Connect { .. } => "connect".into(),
            AdapterError::Timeout(_) => "timeout".into(),
            AdapterError::Status { status, .. } => format!("http_{status}"),
            AdapterError::InvalidResponse(_) => "invalid_response".into(),
            AdapterError::BreakerOpen { .. } => "breaker_open".into(),
        }
    }
}

/// One call: a node's rendered input and who it is for.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The run.
    pub run_id: Uuid,
    /// The node definition.
    pub node: &'a NodeDef,
    /// The attempt number.
    pub attempt: i32,
    /// The node's input with templates rendered.
    pub input: Value,
    /// When the node's own `timeout` runs out: every call (fallbacks included) ends by
    /// then, so that a slow provider is recorded as a timed-out call, not lost.
    pub deadline: Option<Instant>,
}

impl Call<'_> {
    /// How long the next request may take: the profile's timeout, or less when the
    /// node's deadline is nearer.
    pub fn time_left(&self, cap: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => cap
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1)),
            None => cap,
        }
    }

    fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Sent as `Idempotency-Key` so that providers can drop repeats of one attempt.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.run_id, self.node.id, self.attempt)
    }
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: i64,
    /// Tokens generated.
    pub completion_tokens: i64,
}

/// What went over the wire in one call, for the audit log. Never holds credentials.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// The request body sent.
    pub request: Value,
    /// The response body (JSON, or a JSON string of the text).
    pub response: Option<Value>,
    /// The HTTP status received.
    pub http_status: Option<u16>,
    /// Tokens reported by the provider.
    pub usage: Usage,
    /// The model that answered, as the provider named it.
    pub model: Option<String>,
}

/// One call to one profile, as it goes into `model_calls`.
#[derive(Debug, Clone)]
pub struct ModelCall {
    /// Profile name (`-` for an `http` node without one).
    pub profile: String,
    /// `openai`, `anthropic` or `http`.
    pub provider: &'static str,
    /// Model name.
    pub model: Option<String>,
    /// `ok`, or the error's label (`http_429`, `timeout`, …).
    pub status: String,
    /// HTTP status, when one came back.
    pub http_status: Option<u16>,
    /// Wall time of the call.
    pub latency: Duration,
    /// Tokens.
    pub usage: Usage,
    /// Cost, when the profile has prices.
    pub cost: Option<f64>,
    /// Request body.
    pub request: Value,
    /// Response body.
    pub response: Option<Value>,
    /// Error text, when it failed.
    pub error: Option<String>,
}

/// The node's result and every call made to get it.
#[derive(Debug)]
pub struct Outcome {
    /// Output, or the last error.
    pub result: Result<Value, AdapterError>,
    /// Calls in the order made (primary first, then fallbacks).
    pub calls: Vec<ModelCall>,
    /// Breakers that opened or closed because of these calls.
    pub breaker_events: Vec<BreakerEvent>,
}

/// What every provider implements: perform one call of a node type, noting what went
/// over the wire in `exchange` whether or not the call succeeds.
pub trait Adapter {
    /// Performs the call and returns the node's output.
    fn call(
        &self,
        kind: NodeType,
        call: &Call<'_>,
        exchange: &mut Exchange,
    ) -> impl Future<Output = Result<Value, AdapterError>> + Send;
}

/// The closed set of adapters.
#[derive(Debug, Clone)]
pub enum AdapterKind {
    /// `noop`.
    Noop(Noop),
    /// `transform`.
    Transform(Transform),
    /// OpenAI and compatible servers.
    OpenAi(OpenAi),
    /// Anthropic's messages API.
    Anthropic(Anthropic),
    /// Generic JSON over HTTP.
    Http(HttpAdapter),
}

impl AdapterKind {
    async fn call(
        &self,
        kind: NodeType,
        call: &Call<'_>,
    ) -> (Exchange, Result<Value, AdapterError>) {
        let mut exchange = Exchange::default();
        let result = match self {
            AdapterKind::Noop(a) => a.call(kind, call, &mut exchange).await,
            AdapterKind::Transform(a) => a.call(kind, call, &mut exchange).await,
            AdapterKind::OpenAi(a) => a.call(kind, call, &mut exchange).await,
            AdapterKind::Anthropic(a) => a.call(kind, call, &mut exchange).await,
            AdapterKind::Http(a) => a.call(kind, call, &mut exchange).await,
        };
        (exchange, result)
    }
}

/// A configured profile with its adapter.
#[derive(Debug, Clone)]
struct Profile {
    config: ModelProfile,
    adapter: AdapterKind,
}

/// Builds and holds the adapter of every profile; runs nodes through them.
#[derive(Debug, Clone)]
pub struct Registry {
    profiles: BTreeMap<String, Profile>,
    plain_http: AdapterKind,
    breakers: Option<Breakers>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(&FileConfig::default())
    }
}

impl Registry {
    /// Adapters for every profile of `config`, sharing one HTTP connection pool.
    pub fn new(config: &FileConfig) -> Self {
        let client = http_call::client();
        let profiles = config
            .models
            .iter()
            .map(|(name, profile)| {
                let adapter = match profile.provider {
                    Provider::Openai => {
                        AdapterKind::OpenAi(OpenAi::new(client.clone(), profile.clone()))
                    }
                    Provider::Anthropic => {
                        AdapterKind::Anthropic(Anthropic::new(client.clone(), profile.clone()))
                    }
                    Provider::Http => {
                        AdapterKind::Http(HttpAdapter::new(client.clone(), Some(profile.clone())))
                    }
                };
                (
                    name.clone(),
                    Profile {
                        config: profile.clone(),
                        adapter,
                    },
                )
            })
            .collect();
        Registry {
            profiles,
            plain_http: AdapterKind::Http(HttpAdapter::new(client, None)),
            breakers: None,
        }
    }

    /// The same registry with circuit breakers on every profile.
    pub fn with_breakers(mut self, breakers: Breakers) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// The fallback chain of `profile`, itself first.
    pub fn chain_of(&self, profile: &str) -> Vec<String> {
        let mut chain = vec![profile.to_owned()];
        if let Some(p) = self.profiles.get(profile) {
            chain.extend(p.config.fallback.iter().cloned());
        }
        chain
    }

    /// Whether the engine must render the node's input templates.
    pub fn reads_input(&self, node: &NodeDef) -> bool {
        node.kind != NodeType::Noop
    }

    /// Runs a node: built-ins directly, model nodes through their profile and then its
    /// fallbacks, in order, for as long as the failures are retryable.
    pub async fn run(&self, call: &Call<'_>) -> Outcome {
        let node = call.node;
        match (node.kind, &node.model) {
            (NodeType::Noop, _) => {
                return plain(AdapterKind::Noop(Noop).call(node.kind, call).await.1);
            }
            (NodeType::Transform, _) => {
                return plain(
                    AdapterKind::Transform(Transform)
                        .call(node.kind, call)
                        .await
                        .1,
                );
            }
            (NodeType::Http, None) => {
                let started = Instant::now();
                let (exchange, result) = self.plain_http.call(node.kind, call).await;
                let record = record("-", "http", None, None, started, exchange, &result);
                return Outcome {
                    result,
                    calls: vec![record],
                    breaker_events: Vec::new(),
                };
            }
            _ => {}
        }
        let Some(primary) = node.model.as_deref() else {
            return plain(Err(AdapterError::Config(format!(
                "node \"{}\" of type {} names no model profile",
                node.id,
                node.kind.as_str()
            ))));
        };
        let chain = self.chain_of(primary);
        let mut calls = Vec::new();
        let mut breaker_events = Vec::new();
        let mut last = None;
        for name in &chain {
            if call.out_of_time() {
                last = Some(AdapterError::Timeout(node.timeout.unwrap_or_default()));
                break;
            }
            let Some(profile) = self.profiles.get(name) else {
                last = Some(AdapterError::Config(format!(
                    "model profile \"{name}\" is not configured; add [models.{name}] to dagq.toml"
                )));
                break;
            };
            if !provider_serves(profile.config.provider, node.kind) {
                continue;
            }
            if let Some(retry_after) = self.breaker_blocks(name).await {
                last = Some(AdapterError::BreakerOpen {
                    profile: name.clone(),
                    retry_after,
                });
                continue;
            }
            let started = Instant::now();
            let (exchange, result) = profile.adapter.call(node.kind, call).await;
            breaker_events.extend(self.breaker_record(name, &result).await);
            calls.push(record(
                name,
                profile.config.provider.as_str(),
                profile.config.model.clone(),
                Some(&profile.config),
                started,
                exchange,
                &result,
            ));
            match result {
                Ok(output) => {
                    return Outcome {
                        result: Ok(output),
                        calls,
                        breaker_events,
                    };
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(run = %call.run_id, node = %node.id, profile = %name, error = %e,
                        "model call failed; trying the next fallback if any");
                    last = Some(e);
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let error = last.unwrap_or_else(|| {
            AdapterError::Unsupported(format!(
                "no profile in {chain:?} can serve node type {}",
                node.kind.as_str()
            ))
        });
        Outcome {
            result: Err(error),
            calls,
            breaker_events,
        }
    }

    /// `Some(wait)` when the profile's breaker is open. A breaker that cannot be read
    /// (database trouble) does not block calls: the provider may well be fine.
    async fn breaker_blocks(&self, profile: &str) -> Option<Duration> {
        let breakers = self.breakers.as_ref()?;
        match breakers.admit(profile).await {
            Ok(Admission::Open(wait)) => Some(wait),
            Ok(Admission::Closed | Admission::Trial) => None,
            Err(e) => {
                tracing::warn!(%profile, error = %e, "cannot read the circuit breaker; calling anyway");
                None
            }
        }
    }

    async fn breaker_record(
        &self,
        profile: &str,
        result: &Result<Value, AdapterError>,
    ) -> Option<BreakerEvent> {
        let breakers = self.breakers.as_ref()?;
        let failure = match result {
            Ok(_) => None,
            Err(e) if e.is_retryable() => Some(e.to_string()),
            // A request the provider rejected says nothing about the provider's health.
            Err(_) => return None,
        };
        match breakers.record(profile, failure.as_deref()).await {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(%profile, error = %e, "cannot record the call in the circuit breaker");
                None
            }
        }
    }
}

fn plain(result: Result<Value, AdapterError>) -> Outcome {
    Outcome {
        result,
        calls: Vec::new(),
        breaker_events: Vec::new(),
    }
}

fn record(
    profile: &str,
    provider: &'static str,
    model: Option<String>,
    config: Option<&ModelProfile>,
    started: Instant,
    exchange: Exchange,
    result: &Result<Value, AdapterError>,
) -> ModelCall {
    let usage = exchange.usage;
    let cost = config.and_then(
        |c| match (c.price_per_1k_prompt, c.price_per_1k_completion) {
            (None, None) => None,
            (p, c) => Some(
                p.unwrap_or(0.0) * usage.prompt_tokens as f64 / 1000.0
                    + c.unwrap_or(0.0) * usage.completion_tokens as f64 / 1000.0,
            ),
        },
    );
    ModelCall {
        profile: profile.to_owned(),
        provider,
        model: exchange.model.or(model),
        status: match result {
            Ok(_) => "ok".into(),
            Err(e) => e.status_label(),
        },
        http_status: exchange.http_status,
        latency: started.elapsed(),
        usage,
        cost,
        request: exchange.request,
        response: exchange.response,
        error: result.as_ref().err().map(ToString::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_http_semantics() {
        let status = |s| AdapterError::Status {
            status: s,
            message: String::new(),
            retry_after: None,
        };
        for retryable in [408, 429, 500, 502, 503, 504] {
            assert!(status(retryable).is_retryable(), "{retryable}");
        }
        for terminal in [400, 401, 403, 404, 422] {
            assert!(!status(terminal).is_retryable(), "{terminal}");
        }
        assert!(AdapterError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!AdapterError::InvalidResponse("x".into()).is_retryable());
    }
}
