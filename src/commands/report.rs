//! Text renderings of runs for `dagq status`, `dagq runs` and `dagq run --wait`.

use std::fmt::Write;

use crate::store::{RunStatus, RunSummary};

fn millis(
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    match (from, to) {
        (Some(a), Some(b)) => format!("{} ms", (b - a).num_milliseconds()),
        _ => "-".into(),
    }
}

/// Characters of each node's output shown in the text view.
const OUTPUT_PREVIEW: usize = 160;

fn tokens(calls: i64, prompt: i64, completion: i64) -> String {
    if calls == 0 {
        "-".into()
    } else {
        format!("{prompt}/{completion}")
    }
}

fn cost(cost: Option<f64>) -> String {
    cost.map_or_else(|| "-".into(), |c| format!("${c:.6}"))
}

/// A run, its nodes and the outputs of its final nodes, as a table.
pub fn format_run_status(status: &RunStatus) -> String {
    let run = &status.run;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  workflow {} v{}  state {}  took {}",
        run.id,
        run.workflow,
        run.version,
        run.state,
        millis(Some(run.created_at), run.finished_at)
    );
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>7} {:<16} {:>9} {:>9} {:>13} {:>10}  ERROR",
        "NODE", "STATE", "ATTEMPT", "QUEUE", "WAITED", "RAN", "TOKENS IN/OUT", "COST"
    );
    for node in &status.nodes {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>7} {:<16} {:>9} {:>9} {:>13} {:>10}  {}",
            node.node_id,
            node.state,
            node.attempt,
            node.queue,
            millis(node.queued_at, node.started_at),
            millis(node.started_at, node.finished_at),
            tokens(node.model_calls, node.prompt_tokens, node.completion_tokens),
            cost(node.cost),
            node.error.as_deref().unwrap_or("")
        );
    }
    let totals = &status.totals;
    if totals.model_calls > 0 {
        let _ = writeln!(
            out,
            "total: {} model calls, {} prompt + {} completion tokens, cost {}",
            totals.model_calls,
            totals.prompt_tokens,
            totals.completion_tokens,
            cost(totals.cost)
        );
    }
    let outputs: Vec<_> = status
        .nodes
        .iter()
        .filter_map(|n| Some((n, n.output.as_ref()?)))
        .filter(|(_, o)| !o.as_object().is_some_and(|o| o.is_empty()))
        .collect();
    if !outputs.is_empty() {
        let _ = writeln!(
            out,
            "\noutputs (`dagq status {} --json` has them whole):",
            run.id
        );
    }
    for (node, output) in outputs {
        let text = output.to_string();
        let shown: String = text.chars().take(OUTPUT_PREVIEW).collect();
        let more = if shown.len() < text.len() { " …" } else { "" };
        let _ = writeln!(out, "  {:<18} {shown}{more}", node.node_id);
    }
    out
}

/// Runs as a table, newest first.
pub fn format_runs(runs: &[RunSummary]) -> String {
    let mut out = format!(
        "{:<36}  {:<20} {:>3}  {:<10} {:<20} {}\n",
        "RUN", "WORKFLOW", "VER", "STATE", "EVENT", "STARTED"
    );
    for run in runs {
        let _ = writeln!(
            out,
            "{:<36}  {:<20} {:>3}  {:<10} {:<20} {}",
            run.id,
            run.workflow,
            run.version,
            run.state,
            run.event_type,
            run.created_at.format("%Y-%m-%d %H:%M:%S%.3f")
        );
    }
    out
}
