//! The JSON Schemas in `schemas/`, embedded at build time. Every event, task message and
//! workflow entering dagq passes through one of these validators, and a violation names
//! the path of the offending field.

use std::sync::LazyLock;

use jsonschema::Validator;
use serde_json::Value;

/// Which of the embedded schemas to check against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// A CloudEvents 1.0 envelope published to `<ns>.events`.
    Event,
    /// A task message on `<ns>.tasks`.
    Task,
    /// A workflow definition.
    Workflow,
}

static EVENT: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../schemas/event.schema.json")));
static TASK: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../schemas/task.schema.json")));
static WORKFLOW: LazyLock<Validator> =
    LazyLock::new(|| compile(include_str!("../schemas/workflow.schema.json")));

fn compile(text: &str) -> Validator {
    // The schemas are part of the binary and covered by the tests below, so a failure here
    // is a build defect, not a runtime condition.
    let schema: Value = serde_json::from_str(text).expect("embedded schema is valid JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("embedded schema compiles")
}

impl Schema {
    fn validator(self) -> &'static Validator {
        match self {
            Schema::Event => &EVENT,
            Schema::Task => &TASK,
            Schema::Workflow => &WORKFLOW,
        }
    }

    /// The schema's file name, for messages.
    pub fn file_name(self) -> &'static str {
        match self {
            Schema::Event => "schemas/event.schema.json",
            Schema::Task => "schemas/task.schema.json",
            Schema::Workflow => "schemas/workflow.schema.json",
        }
    }

    /// Checks `instance`; on failure returns every violation as `path: problem` lines,
    /// where the path is a JSON pointer such as `/nodes/2/priority`.
    pub fn check(self, instance: &Value) -> Result<(), SchemaViolation> {
        let validator = self.validator();
        if validator.is_valid(instance) {
            return Ok(());
        }
        let problems = validator
            .iter_errors(instance)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() {
                    "/".to_string()
                } else {
                    path
                };
                format!("{path}: {e}")
            })
            .collect();
        Err(SchemaViolation {
            schema: self,
            problems,
        })
    }
}

/// An instance that does not match its schema.
#[derive(Debug, Clone, thiserror::Error)]
#[error("does not match {}: {}", .schema.file_name(), .problems.join("; "))]
pub struct SchemaViolation {
    /// The schema that was violated.
    pub schema: Schema,
    /// One `path: problem` entry per violation.
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn embedded_schemas_compile() {
        for schema in [Schema::Event, Schema::Task, Schema::Workflow] {
            let _ = schema.validator();
        }
    }

    #[test]
    fn event_violation_names_the_field() {
        let err = Schema::Event
            .check(&json!({"specversion": "1.0", "id": "1", "source": "s", "type": 5}))
            .unwrap_err();
        assert!(err.to_string().contains("/type"), "{err}");
    }

    #[test]
    fn task_violation_names_the_field() {
        let err = Schema::Task
            .check(&json!({"run_id": "00000000-0000-0000-0000-000000000000", "node_id": "a", "attempt": 0}))
            .unwrap_err();
        assert!(err.to_string().contains("/attempt"), "{err}");
    }

    #[test]
    fn run_requested_needs_a_workflow() {
        let err = Schema::Event
            .check(&json!({"specversion": "1.0", "id": "1", "source": "s", "type": "dagq.run.requested", "data": {}}))
            .unwrap_err();
        assert!(err.to_string().contains("workflow"), "{err}");
    }
}
