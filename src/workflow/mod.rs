//! Workflow definitions: parsing, apply-time validation, and the templates and conditions
//! that nodes evaluate at run time.

mod definition;
pub mod template;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

pub use definition::{NodeDef, NodeType, RetryPolicy, TriggerDef, TriggerRule, WorkflowDef};
pub use validate::provider_serves;

use crate::config::ModelProfile;
use crate::schema::SchemaViolation;

/// Why a workflow document was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkflowError {
    /// The document is not JSON.
    #[error("{file}: not valid JSON: {message}")]
    Json { file: String, message: String },
    /// The document breaks `schemas/workflow.schema.json`.
    #[error("workflow \"{workflow}\" {violation}")]
    Schema {
        workflow: String,
        violation: SchemaViolation,
    },
    /// The document is well-formed but wrong (cycle, unknown node, …).
    #[error("workflow \"{workflow}\": {message}")]
    Invalid { workflow: String, message: String },
}

impl WorkflowError {
    /// A bad workflow stays bad: retrying never helps.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkflowError::Json { .. }
            | WorkflowError::Schema { .. }
            | WorkflowError::Invalid { .. } => false,
        }
    }
}

/// A validated workflow with its DAG precomputed for the engine.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// The definition as written.
    pub def: WorkflowDef,
    /// Stored version (0 before it is applied).
    pub version: i32,
    index: HashMap<String, usize>,
    children: Vec<Vec<usize>>,
    /// Upstream nodes whose outputs each node's templates read.
    reads: Vec<Vec<String>>,
}

impl Workflow {
    /// Validates a document. With `profiles`, model nodes must name one of them.
    pub fn from_json(
        document: &Value,
        profiles: Option<&BTreeMap<String, ModelProfile>>,
    ) -> Result<Self, WorkflowError> {
        let def = validate::validate(document, profiles)?;
        Ok(Self::index(def))
    }

    /// Parses a workflow file's text, naming the file in errors.
    pub fn from_text(
        file: &str,
        text: &str,
        profiles: Option<&BTreeMap<String, ModelProfile>>,
    ) -> Result<Self, WorkflowError> {
        let document: Value = serde_json::from_str(text).map_err(|e| WorkflowError::Json {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_json(&document, profiles)
    }

    fn index(def: WorkflowDef) -> Self {
        let index: HashMap<String, usize> = def
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let mut children = vec![Vec::new(); def.nodes.len()];
        for (i, node) in def.nodes.iter().enumerate() {
            for dep in &node.depends {
                children[index[dep]].push(i);
            }
        }
        let reads = def
            .nodes
            .iter()
            .map(|node| {
                let inputs = template::template_strings(&node.input)
                    .into_iter()
                    .map(|(_, t)| template::variables_of(t));
                // A condition may be a bare expression, which `variables_of` would take
                // for plain text: parse it as a condition, as validation does.
                let when = node.when.as_deref().map(template::condition_variables);
                let mut ids = BTreeSet::new();
                for vars in inputs.chain(when) {
                    for var in vars.unwrap_or_default() {
                        let mut parts = var.split('.');
                        if parts.next() == Some("nodes") {
                            ids.extend(parts.next().map(str::to_owned));
                        }
                    }
                }
                ids.into_iter().collect()
            })
            .collect();
        Workflow {
            def,
            version: 0,
            index,
            children,
            reads,
        }
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeDef> {
        self.index.get(id).map(|&i| &self.def.nodes[i])
    }

    /// Nodes that depend directly on `id`.
    pub fn children_of(&self, id: &str) -> impl Iterator<Item = &NodeDef> {
        self.index
            .get(id)
            .map(|&i| self.children[i].as_slice())
            .unwrap_or_default()
            .iter()
            .map(|&c| &self.def.nodes[c])
    }

    /// Nodes without dependencies: they start when the run starts.
    pub fn roots(&self) -> impl Iterator<Item = &NodeDef> {
        self.def.nodes.iter().filter(|n| n.depends.is_empty())
    }

    /// Ids of the upstream nodes whose outputs `id`'s input and condition read.
    pub fn reads_of(&self, id: &str) -> &[String] {
        self.index
            .get(id)
            .map(|&i| self.reads[i].as_slice())
            .unwrap_or_default()
    }

    /// Every task queue this workflow's nodes use.
    pub fn queues(&self) -> BTreeSet<String> {
        self.def.nodes.iter().map(queue_of).collect()
    }

    /// Whether an event of this type, with this content, starts a run.
    pub fn triggered_by(&self, event: &Value) -> Result<bool, template::TemplateError> {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        for trigger in self.def.triggers.iter().filter(|t| t.event == kind) {
            let Some(filter) = &trigger.filter else {
                return Ok(true);
            };
            let context = template::context(&serde_json::json!({ "event": event }));
            if template::eval_condition(filter, &context)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The task queue a node's messages go to: its `queue`, else its model profile for model
/// nodes, else its type.
pub fn queue_of(node: &NodeDef) -> String {
    match (&node.queue, &node.model) {
        (Some(queue), _) => queue.clone(),
        (None, Some(model)) if node.kind.needs_model() => model.clone(),
        _ => node.kind.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(doc: Value) -> String {
        Workflow::from_json(&doc, None).unwrap_err().to_string()
    }

    #[test]
    fn unknown_dependency_is_named() {
        let e = err(
            json!({"name": "w", "nodes": [{"id": "a", "type": "noop", "depends": ["sumary"]}]}),
        );
        assert_eq!(
            e,
            "workflow \"w\": node \"a\" depends on unknown node \"sumary\""
        );
    }

    #[test]
    fn cycle_is_named_in_order() {
        let e = err(json!({"name": "w", "nodes": [
            {"id": "a", "type": "noop", "depends": ["c"]},
            {"id": "b", "type": "noop", "depends": ["a"]},
            {"id": "c", "type": "noop", "depends": ["b"]}]}));
        assert!(e.contains("dependency cycle: "), "{e}");
        assert!(
            e.contains("a -> b -> c -> a")
                || e.contains("b -> c -> a -> b")
                || e.contains("c -> a -> b -> c"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let e = err(
            json!({"name": "w", "nodes": [{"id": "a", "type": "noop"}, {"id": "a", "type": "noop"}]}),
        );
        assert!(e.contains("\"a\" is used twice"), "{e}");
    }

    #[test]
    fn unknown_type_names_the_path() {
        let e = err(json!({"name": "w", "nodes": [{"id": "a", "type": "telepathy"}]}));
        assert!(e.contains("/nodes/0/type"), "{e}");
    }

    #[test]
    fn bad_template_is_named() {
        let e = err(
            json!({"name": "w", "nodes": [{"id": "a", "type": "transform", "input": {"x": "{{ event.data. }}"}}]}),
        );
        assert!(
            e.contains("node \"a\" input/x: template does not parse"),
            "{e}"
        );
    }

    #[test]
    fn reading_a_non_upstream_node_is_refused() {
        let e = err(json!({"name": "w", "nodes": [
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "transform", "input": {"x": "{{ nodes.a.output }}"}}]}));
        assert!(e.contains("\"a\" is not upstream of \"b\""), "{e}");
    }

    #[test]
    fn model_nodes_need_a_known_profile() {
        let e = Workflow::from_json(
            &json!({"name": "w", "nodes": [{"id": "a", "type": "chat", "model": "gpt"}]}),
            Some(&BTreeMap::new()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown model profile \"gpt\""), "{e}");
    }

    #[test]
    fn queues_default_to_profile_or_type() {
        let wf = Workflow::from_json(
            &json!({"name": "w", "nodes": [
                {"id": "a", "type": "chat", "model": "reviewer"},
                {"id": "b", "type": "noop", "depends": ["a"]},
                {"id": "c", "type": "noop", "queue": "special", "depends": ["a"]}]}),
            None,
        )
        .unwrap();
        assert_eq!(
            wf.queues().into_iter().collect::<Vec<_>>(),
            ["noop", "reviewer", "special"]
        );
        assert_eq!(wf.children_of("a").count(), 2);
    }

    #[test]
    fn reads_lists_upstream_outputs_used() {
        let wf = Workflow::from_json(
            &json!({"name": "w", "nodes": [
                {"id": "a", "type": "noop"},
                {"id": "b", "type": "transform", "depends": ["a"], "input": {"x": "{{ nodes.a.output }}"}, "when": "{{ nodes.a.state == 'completed' }}"}]}),
            None,
        )
        .unwrap();
        assert_eq!(wf.reads_of("b"), ["a"]);
    }

    #[test]
    fn reads_include_a_bare_condition() {
        let wf = Workflow::from_json(
            &json!({"name": "w", "nodes": [
                {"id": "a", "type": "noop"},
                {"id": "b", "type": "noop", "depends": ["a"], "when": "nodes.a.output.go == true"}]}),
            None,
        )
        .unwrap();
        assert_eq!(wf.reads_of("b"), ["a"]);
    }
}
