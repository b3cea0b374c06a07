//! The messages workers exchange: task messages (`schemas/task.schema.json`) and the
//! CloudEvents that start runs (`schemas/event.schema.json`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::schema::Schema;

/// The CloudEvent type that `dagq run` publishes to start a named workflow.
pub const RUN_REQUESTED: &str = "dagq.run.requested";

/// One attempt of one node of one run. The state lives in Postgres; this only names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// The run.
    pub run_id: Uuid,
    /// The node.
    pub node_id: String,
    /// Which attempt this message is for.
    pub attempt: i32,
    /// Workflow name (informational: the run pins the version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Workflow version (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    /// Task queue (informational, for metrics of poison messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Node type (informational).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<String>,
}

/// Why a message cannot be processed at all: it goes to `<ns>.dead` with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// Short reason code, also the `reason` label of `dagq_dead_letters_total`.
    pub reason: &'static str,
    /// What is wrong, naming the field.
    pub detail: String,
}

impl Poison {
    /// A poison verdict.
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Poison {
            reason,
            detail: detail.into(),
        }
    }
}

/// Parses and validates a message body against `schema`.
pub fn parse_json(body: &[u8], schema: Schema) -> Result<Value, Poison> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Poison::new("not_json", format!("message body is not JSON: {e}")))?;
    schema
        .check(&value)
        .map_err(|v| Poison::new("schema", format!("message {v}")))?;
    Ok(value)
}

/// Parses a task message.
pub fn parse_task(body: &[u8]) -> Result<TaskMessage, Poison> {
    let value = parse_json(body, Schema::Task)?;
    serde_json::from_value(value).map_err(|e| Poison::new("schema", format!("task message: {e}")))
}

impl TaskMessage {
    /// The message that runs `task`, a queued node of `run`.
    pub fn for_task(run: &crate::store::RunContext, task: &crate::store::QueuedTask) -> Self {
        TaskMessage {
            run_id: run.run_id,
            node_id: task.node_id.clone(),
            attempt: task.attempt,
            workflow: Some(run.workflow.clone()),
            version: Some(run.version),
            queue: Some(task.queue.clone()),
            kind: Some(task.kind.clone()),
        }
    }
}

/// A new CloudEvent with a fresh id.
pub fn new_event(event_type: &str, source: &str, subject: Option<&str>, data: Value) -> Value {
    let mut event = serde_json::json!({
        "specversion": "1.0",
        "id": Uuid::now_v7().to_string(),
        "source": source,
        "type": event_type,
        "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "datacontenttype": "application/json",
        "data": data,
    });
    if let Some(subject) = subject {
        event["subject"] = Value::String(subject.to_owned());
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_messages_round_trip_through_the_schema() {
        let msg = TaskMessage {
            run_id: Uuid::now_v7(),
            node_id: "a".into(),
            attempt: 1,
            workflow: Some("w".into()),
            version: Some(1),
            queue: Some("noop".into()),
            kind: Some("noop".into()),
        };
        let body = serde_json::to_vec(&msg).unwrap();
        assert_eq!(parse_task(&body).unwrap(), msg);
    }

    #[test]
    fn garbage_is_poison_with_a_reason() {
        assert_eq!(parse_task(b"{nope").unwrap_err().reason, "not_json");
        assert_eq!(parse_task(b"{\"run_id\": 1}").unwrap_err().reason, "schema");
    }

    #[test]
    fn new_events_match_the_schema() {
        let e = new_event(
            "git.push",
            "test",
            Some("repo"),
            serde_json::json!({"branch": "main"}),
        );
        Schema::Event.check(&e).unwrap();
    }
}
