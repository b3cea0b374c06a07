//! The model-adapter layer: one small trait, one implementation per provider, chosen
//! through a closed enum built from the node type and its model profile.

mod builtin;

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

pub use builtin::{Noop, Transform};

use crate::config::FileConfig;
use crate::workflow::{NodeDef, NodeType};

/// Why an adapter call failed, classified for retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    /// The node's input cannot work (bad template, missing field): fix the workflow.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No adapter can run this node (unknown type, provider not available).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The provider could not be reached.
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    /// The call took longer than the node's or profile's timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The provider answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider's answer could not be understood.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
}

impl AdapterError {
    /// Connect errors, timeouts, 408, 429 and 5xx are worth retrying; everything else
    /// fails the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            AdapterError::Connect { .. } | AdapterError::Timeout(_) => true,
            AdapterError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..600).contains(status)
            }
            AdapterError::InvalidInput(_)
            | AdapterError::Unsupported(_)
            | AdapterError::InvalidResponse(_) => false,
        }
    }

    /// How long the provider asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AdapterError::Status { retry_after, .. } => *retry_after,
            AdapterError::InvalidInput(_)
            | AdapterError::Unsupported(_)
            | AdapterError::Connect { .. }
            | AdapterError::Timeout(_)
            | AdapterError::InvalidResponse(_) => None,
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
}

impl Call<'_> {
    /// Sent as `Idempotency-Key` so that providers can drop repeats of one attempt.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.run_id, self.node.id, self.attempt)
    }
}

/// What every provider implements.
pub trait Adapter {
    /// Performs the call and returns the node's output.
    fn call(&self, call: &Call<'_>) -> impl Future<Output = Result<Value, AdapterError>> + Send;
}

/// The closed set of adapters, chosen per node.
#[derive(Debug, Clone)]
pub enum AdapterKind {
    /// `noop`.
    Noop(Noop),
    /// `transform`.
    Transform(Transform),
}

impl AdapterKind {
    /// Performs the call through whichever adapter this is.
    pub async fn call(&self, call: &Call<'_>) -> Result<Value, AdapterError> {
        match self {
            AdapterKind::Noop(a) => a.call(call).await,
            AdapterKind::Transform(a) => a.call(call).await,
        }
    }

    /// Whether the adapter reads the node's input (so the engine renders templates).
    pub fn reads_input(&self) -> bool {
        match self {
            AdapterKind::Noop(_) => false,
            AdapterKind::Transform(_) => true,
        }
    }
}

/// Builds the adapter for each node from configuration.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    config: FileConfig,
}

impl Registry {
    /// A registry over the model profiles of `config`.
    pub fn new(config: FileConfig) -> Self {
        Registry { config }
    }

    /// The adapter that runs `node`, or why there is none.
    pub fn adapter_for(&self, node: &NodeDef) -> Result<AdapterKind, AdapterError> {
        match node.kind {
            NodeType::Noop => Ok(AdapterKind::Noop(Noop)),
            NodeType::Transform => Ok(AdapterKind::Transform(Transform)),
            NodeType::Chat
            | NodeType::Completion
            | NodeType::Embedding
            | NodeType::Image
            | NodeType::Http => {
                let profile = node.model.as_deref().unwrap_or("(none)");
                let provider = self
                    .config
                    .models
                    .get(profile)
                    .map(|p| p.provider.as_str())
                    .unwrap_or("unknown");
                Err(AdapterError::Unsupported(format!(
                    "node type {} (profile \"{profile}\", provider {provider}) has no adapter in this build; \
                     only noop and transform nodes can run",
                    node.kind.as_str()
                )))
            }
        }
    }
}
