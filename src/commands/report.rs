//! Text renderings of runs for `dagq status`, `dagq runs` and `dagq run --wait`.

use std::fmt::Write;

use crate::store::{RunStatus, RunSummary};

fn millis(from: Option<chrono::DateTime<chrono::Utc>>, to: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match (from, to) {
        (Some(a), Some(b)) => format!("{} ms", (b - a).num_milliseconds()),
        _ => "-".into(),
    }
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
        "{:<20} {:<10} {:>7} {:<16} {:>9} {:>9}  ERROR",
        "NODE", "STATE", "ATTEMPT", "QUEUE", "WAITED", "RAN"
    );
    for node in &status.nodes {
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>7} {:<16} {:>9} {:>9}  {}",
            node.node_id,
            node.state,
            node.attempt,
            node.queue,
            millis(node.queued_at, node.started_at),
            millis(node.started_at, node.finished_at),
            node.error.as_deref().unwrap_or("")
        );
    }
    for node in status.nodes.iter().filter(|n| n.output.is_some()) {
        let output = node.output.as_ref().expect("filtered on is_some");
        if output.as_object().is_some_and(|o| o.is_empty()) {
            continue;
        }
        let text = serde_json::to_string_pretty(output).expect("a JSON value always serializes");
        let _ = writeln!(out, "\noutput of {}:\n{text}", node.node_id);
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
