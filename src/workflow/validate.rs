//! Apply-time validation: everything that can be known wrong about a workflow before it
//! runs is reported then, naming the node and the problem.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use super::WorkflowError;
use super::definition::{NodeDef, NodeType, WorkflowDef};
use super::template::{self, CONTEXT_ROOTS};
use crate::config::{ModelProfile, Provider};
use crate::schema::Schema;

/// Checks a workflow document and returns its definition. `profiles`, when given, are the
/// model profiles that model nodes must name.
pub(super) fn validate(
    document: &Value,
    profiles: Option<&BTreeMap<String, ModelProfile>>,
) -> Result<WorkflowDef, WorkflowError> {
    let name = document
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    Schema::Workflow
        .check(document)
        .map_err(|violation| WorkflowError::Schema {
            workflow: name.clone(),
            violation,
        })?;
    let def: WorkflowDef =
        serde_json::from_value(document.clone()).map_err(|e| WorkflowError::Invalid {
            workflow: name.clone(),
            message: e.to_string(),
        })?;
    let invalid = |message: String| WorkflowError::Invalid {
        workflow: def.name.clone(),
        message,
    };

    let mut index = HashMap::new();
    for (i, node) in def.nodes.iter().enumerate() {
        if index.insert(node.id.as_str(), i).is_some() {
            return Err(invalid(format!(
                "node id \"{}\" is used twice; ids must be unique",
                node.id
            )));
        }
    }
    for node in &def.nodes {
        let mut seen = BTreeSet::new();
        for dep in &node.depends {
            if dep == &node.id {
                return Err(invalid(format!("node \"{}\" depends on itself", node.id)));
            }
            if !index.contains_key(dep.as_str()) {
                return Err(invalid(format!(
                    "node \"{}\" depends on unknown node \"{dep}\"",
                    node.id
                )));
            }
            if !seen.insert(dep) {
                return Err(invalid(format!(
                    "node \"{}\" lists dependency \"{dep}\" twice",
                    node.id
                )));
            }
        }
    }
    if let Some(cycle) = find_cycle(&def, &index) {
        return Err(invalid(format!("dependency cycle: {}", cycle.join(" -> "))));
    }
    for node in &def.nodes {
        check_model(node, profiles).map_err(invalid)?;
    }
    for (i, trigger) in def.triggers.iter().enumerate() {
        if let Some(filter) = &trigger.filter {
            let vars = template::condition_variables(filter)
                .map_err(|e| invalid(format!("triggers[{i}].filter does not parse: {e}")))?;
            for var in vars {
                if root_of(&var) != "event" {
                    return Err(invalid(format!(
                        "triggers[{i}].filter reads \"{var}\"; a trigger filter can only read event.*"
                    )));
                }
            }
        }
    }
    let ancestors = ancestors(&def, &index);
    for (i, node) in def.nodes.iter().enumerate() {
        check_templates(node, &ancestors[i]).map_err(invalid)?;
    }
    Ok(def)
}

fn root_of(var: &str) -> &str {
    var.split('.').next().unwrap_or(var)
}

/// A model node names a known profile whose provider can serve the node's type.
fn check_model(
    node: &NodeDef,
    profiles: Option<&BTreeMap<String, ModelProfile>>,
) -> Result<(), String> {
    let id = &node.id;
    let kind = node.kind.as_str();
    match (&node.model, node.kind.needs_model()) {
        (None, true) => {
            return Err(format!(
                "node \"{id}\" of type {kind} needs \"model\": the name of a [models.<profile>] in dagq.toml"
            ));
        }
        (Some(_), false) if node.kind != NodeType::Http => {
            return Err(format!(
                "node \"{id}\" of type {kind} takes no \"model\"; remove it"
            ));
        }
        _ => {}
    }
    let (Some(model), Some(profiles)) = (&node.model, profiles) else {
        return Ok(());
    };
    let Some(profile) = profiles.get(model) else {
        let known: Vec<_> = profiles.keys().map(String::as_str).collect();
        return Err(format!(
            "node \"{id}\" uses unknown model profile \"{model}\"; add [models.{model}] to dagq.toml (known: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    if !provider_serves(profile.provider, node.kind) {
        return Err(format!(
            "node \"{id}\" of type {kind} cannot run on profile \"{model}\": provider {} does not serve {kind}",
            profile.provider.as_str()
        ));
    }
    Ok(())
}

/// Which node types each provider's API can serve.
pub fn provider_serves(provider: Provider, kind: NodeType) -> bool {
    match provider {
        Provider::Openai => matches!(
            kind,
            NodeType::Chat | NodeType::Completion | NodeType::Embedding | NodeType::Image
        ),
        Provider::Anthropic => matches!(kind, NodeType::Chat | NodeType::Completion),
        Provider::Http => matches!(kind, NodeType::Http),
    }
}

/// Templates parse, read only known roots, and read outputs of upstream nodes only.
fn check_templates(node: &NodeDef, upstream: &BTreeSet<String>) -> Result<(), String> {
    let id = &node.id;
    let mut sources: Vec<(String, &str, bool)> = template::template_strings(&node.input)
        .into_iter()
        .map(|(path, text)| (format!("input{path}"), text, false))
        .collect();
    if let Some(when) = &node.when {
        sources.push(("when".into(), when.as_str(), true));
    }
    for (place, text, is_condition) in sources {
        let vars = if is_condition {
            template::condition_variables(text)
        } else {
            template::variables_of(text)
        }
        .map_err(|e| format!("node \"{id}\" {place}: template does not parse: {e}"))?;
        for var in vars {
            let root = root_of(&var);
            if !CONTEXT_ROOTS.contains(&root) {
                return Err(format!(
                    "node \"{id}\" {place} reads unknown variable \"{var}\"; templates can read {}",
                    CONTEXT_ROOTS.join(", ")
                ));
            }
            if root == "nodes" {
                let Some(other) = var.split('.').nth(1) else {
                    continue;
                };
                if !upstream.contains(other) {
                    return Err(format!(
                        "node \"{id}\" {place} reads \"{var}\" but \"{other}\" is not upstream of \"{id}\"; add it to depends"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A cycle as a list of node ids, first repeated at the end, if there is one.
fn find_cycle(def: &WorkflowDef, index: &HashMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        at: usize,
        def: &WorkflowDef,
        index: &HashMap<&str, usize>,
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        marks[at] = Mark::Active;
        stack.push(at);
        for dep in &def.nodes[at].depends {
            let next = index[dep.as_str()];
            match marks[next] {
                Mark::Active => {
                    let start = stack.iter().position(|&n| n == next).unwrap_or(0);
                    // The stack follows "depends on" edges; print it in execution order.
                    let mut cycle: Vec<String> = stack[start..]
                        .iter()
                        .rev()
                        .map(|&n| def.nodes[n].id.clone())
                        .collect();
                    cycle.push(cycle[0].clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, def, index, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks[at] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; def.nodes.len()];
    let mut stack = Vec::new();
    (0..def.nodes.len()).find_map(|i| {
        if marks[i] == Mark::New {
            visit(i, def, index, &mut marks, &mut stack)
        } else {
            None
        }
    })
}

/// For each node, the ids of every node upstream of it (transitively).
pub(super) fn ancestors(def: &WorkflowDef, index: &HashMap<&str, usize>) -> Vec<BTreeSet<String>> {
    fn collect(
        at: usize,
        def: &WorkflowDef,
        index: &HashMap<&str, usize>,
        memo: &mut Vec<Option<BTreeSet<String>>>,
    ) -> BTreeSet<String> {
        if let Some(done) = &memo[at] {
            return done.clone();
        }
        let mut set = BTreeSet::new();
        for dep in &def.nodes[at].depends {
            set.insert(dep.clone());
            set.extend(collect(index[dep.as_str()], def, index, memo));
        }
        memo[at] = Some(set.clone());
        set
    }
    let mut memo = vec![None; def.nodes.len()];
    (0..def.nodes.len())
        .map(|i| collect(i, def, index, &mut memo))
        .collect()
}
