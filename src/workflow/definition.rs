//! The workflow document as users write it (`schemas/workflow.schema.json`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A workflow as written in its JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    /// Unique name; applying the same name again creates a new version.
    pub name: String,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Events that start a run of this workflow.
    #[serde(default)]
    pub triggers: Vec<TriggerDef>,
    /// The nodes of the DAG.
    pub nodes: Vec<NodeDef>,
}

/// One event subscription.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerDef {
    /// The CloudEvent `type` that starts a run.
    pub event: String,
    /// Optional condition on `event`; the run starts only when it is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// One node of the DAG.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDef {
    /// Unique within the workflow.
    pub id: String,
    /// Which adapter runs it.
    #[serde(rename = "type")]
    pub kind: NodeType,
    /// Model profile name, for model node types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Nodes that must finish first.
    #[serde(default)]
    pub depends: Vec<String>,
    /// Which upstream outcome this node needs.
    #[serde(default)]
    pub trigger_rule: TriggerRule,
    /// Condition on the event and upstream outputs; false means `skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The adapter's input, with templates.
    #[serde(default = "empty_object")]
    pub input: Value,
    /// Message priority 0-9 (higher first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Task queue; default: the model profile for model nodes, else the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// How long one attempt may take.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// The adapter a node runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    /// Chat completion through a model profile.
    Chat,
    /// Plain text completion through a model profile.
    Completion,
    /// Embeddings through a model profile.
    Embedding,
    /// Image generation through a model profile.
    Image,
    /// A generic JSON HTTP call.
    Http,
    /// Renders its input template into JSON.
    Transform,
    /// Does nothing and outputs `{}`.
    Noop,
}

impl NodeType {
    /// The name used in workflow files, queues and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Chat => "chat",
            NodeType::Completion => "completion",
            NodeType::Embedding => "embedding",
            NodeType::Image => "image",
            NodeType::Http => "http",
            NodeType::Transform => "transform",
            NodeType::Noop => "noop",
        }
    }

    /// Whether this type needs a model profile (`model`).
    pub fn needs_model(self) -> bool {
        match self {
            NodeType::Chat | NodeType::Completion | NodeType::Embedding | NodeType::Image => true,
            NodeType::Http | NodeType::Transform | NodeType::Noop => false,
        }
    }
}

/// Which upstream outcomes let a node run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerRule {
    /// Every dependency completed (the default); any other outcome skips the node.
    #[default]
    AllSuccess,
    /// Every dependency finished, whatever the outcome.
    AllDone,
    /// At least one dependency completed; runs as soon as the first one does.
    OneSuccess,
    /// No dependency failed (skipped ones are fine).
    NoneFailed,
}

/// Retry policy of a node, as data: attempts and the delays between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(default = "default_initial_delay", with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
    /// Growth factor between consecutive delays.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Randomise each delay (full jitter between half and the whole delay).
    #[serde(default = "default_jitter")]
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}
fn default_initial_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_max_delay() -> Duration {
    Duration::from_secs(60)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> bool {
    true
}
