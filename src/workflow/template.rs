//! Templates and conditions, rendered with minijinja.
//!
//! A string that is exactly one `{{ expression }}` evaluates to the expression's JSON
//! value (so `"{{ nodes.a.output }}"` yields an object, not its text); any other string
//! containing `{{` or `{%` renders to text. Undefined variables are errors, so a typo in
//! a template fails the node with a message instead of sending an empty prompt.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// Names a template may read at the top level.
pub const CONTEXT_ROOTS: [&str; 4] = ["event", "input", "nodes", "run"];

/// The environment that renders at run time; compiled expressions own their source.
static ENV: LazyLock<Environment<'static>> = LazyLock::new(strict_env);

fn strict_env<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
}

/// A template that failed to parse or to render.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
        // minijinja's Display includes the kind and the detail; keep it on one line.
        let mut text = e.to_string();
        if let Some(detail) = e.detail()
            && !text.contains(detail)
        {
            text = format!("{text}: {detail}");
        }
        TemplateError(text)
    }
}

/// The expression inside a string that is exactly one `{{ … }}`, if it is one.
fn sole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// Turns JSON into the value templates read.
pub fn context(value: &Value) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

/// Parses `text` and returns the dotted variable paths it reads (`nodes.diff.output.body`).
pub fn variables_of(text: &str) -> Result<BTreeSet<String>, TemplateError> {
    if let Some(expr) = sole_expression(text) {
        return condition_variables(expr);
    }
    if !is_template(text) {
        return Ok(BTreeSet::new());
    }
    let env = strict_env();
    let template = env.template_from_str(text)?;
    Ok(template.undeclared_variables(true).into_iter().collect())
}

/// Every template string inside a JSON value, with its JSON pointer.
pub fn template_strings(value: &Value) -> Vec<(String, &str)> {
    fn walk<'a>(value: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
        match value {
            Value::String(s) if is_template(s) => out.push((path, s)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, format!("{path}/{i}"), out);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    walk(v, format!("{path}/{k}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, String::new(), &mut out);
    out
}

/// Renders every template string in `value` against `context`.
pub fn render_value(value: &Value, context: &minijinja::Value) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(s) => render_string(s, context)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_value(v, context))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, context)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn render_string(text: &str, context: &minijinja::Value) -> Result<Value, TemplateError> {
    if let Some(expr) = sole_expression(text) {
        let value = ENV
            .compile_expression_owned(expr.to_owned())?
            .eval(context)?;
        // Evaluating an expression returns undefined instead of failing as rendering
        // does; strict templates must not turn a typo into `null`.
        if value.is_undefined() {
            return Err(TemplateError(format!(
                "undefined value: `{expr}` is undefined"
            )));
        }
        return serde_json::to_value(&value).map_err(|e| TemplateError(e.to_string()));
    }
    if !is_template(text) {
        return Ok(Value::String(text.to_owned()));
    }
    Ok(Value::String(ENV.render_str(text, context)?))
}

/// Evaluates a condition (`when`, trigger `filter`): `{{ expr }}` or a bare expression.
pub fn eval_condition(text: &str, context: &minijinja::Value) -> Result<bool, TemplateError> {
    let expr = sole_expression(text).unwrap_or(text.trim());
    Ok(ENV
        .compile_expression_owned(expr.to_owned())?
        .eval(context)?
        .is_true())
}

/// Checks that a condition parses, returning the variables it reads.
pub fn condition_variables(text: &str) -> Result<BTreeSet<String>, TemplateError> {
    let expr = sole_expression(text).unwrap_or(text.trim());
    let env = strict_env();
    let expr = env.compile_expression(expr)?;
    Ok(expr.undeclared_variables(true).into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> minijinja::Value {
        context(&v)
    }

    #[test]
    fn sole_expression_keeps_json_type() {
        let c = ctx(json!({"nodes": {"a": {"output": {"n": 3, "list": [1, 2]}}}}));
        let out = render_value(
            &json!({"x": "{{ nodes.a.output.list }}", "y": "n={{ nodes.a.output.n }}"}),
            &c,
        )
        .unwrap();
        assert_eq!(out, json!({"x": [1, 2], "y": "n=3"}));
    }

    #[test]
    fn undefined_variable_is_an_error() {
        let err = render_value(
            &json!("{{ event.data.missing }}"),
            &ctx(json!({"event": {"data": {}}})),
        )
        .unwrap_err();
        assert!(err.0.contains("undefined"), "{err}");
    }

    #[test]
    fn conditions_accept_braces_or_bare_expressions() {
        let c = ctx(json!({"event": {"data": {"branch": "main"}}}));
        assert!(eval_condition("{{ event.data.branch == 'main' }}", &c).unwrap());
        assert!(!eval_condition("event.data.branch == 'dev'", &c).unwrap());
    }

    #[test]
    fn variables_are_reported_with_paths() {
        let vars =
            variables_of("Review:\n{{ nodes.diff.output.body }} {{ event.data.x }}").unwrap();
        assert!(vars.contains("nodes.diff.output.body"), "{vars:?}");
        assert!(vars.contains("event.data.x"), "{vars:?}");
    }

    #[test]
    fn parse_errors_are_reported() {
        assert!(variables_of("{{ nodes.a.output. }}").is_err());
        assert!(condition_variables("{{ 'a' in }}").is_err());
    }
}
