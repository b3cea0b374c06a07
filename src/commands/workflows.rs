//! `dagq workflow apply | list | show`.

use std::fmt::Write;

use super::CommandError;
use crate::config::Settings;
use crate::store::{AppliedWorkflow, Store, WorkflowSummary};
use crate::workflow::Workflow;

/// Validates every file first, then stores them: one bad file applies none.
pub async fn apply_files(
    settings: &Settings,
    store: &Store,
    files: &[String],
) -> Result<Vec<AppliedWorkflow>, CommandError> {
    let mut workflows = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CommandError::Usage(format!("cannot read workflow file {file}: {e}")))?;
        workflows.push(Workflow::from_text(
            file,
            &text,
            Some(&settings.file.models),
        )?);
    }
    let mut applied = Vec::new();
    for workflow in &workflows {
        applied.push(store.apply_workflow(workflow).await?);
    }
    Ok(applied)
}

/// `dagq workflow list` as a table.
pub fn format_workflow_list(workflows: &[WorkflowSummary]) -> String {
    let mut out = format!(
        "{:<24} {:>7} {:>5}  {:<30} APPLIED\n",
        "WORKFLOW", "VERSION", "NODES", "TRIGGERS"
    );
    for w in workflows {
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>5}  {:<30} {}",
            w.name,
            w.version,
            w.nodes,
            w.triggers.join(","),
            w.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    out
}
