//! What operators do to runs: retry a failed run from its failed nodes, cancel a run.

use std::collections::BTreeSet;

use serde_json::Value;
use uuid::Uuid;

use super::dag::settle;
use super::{Engine, EngineError};
use crate::store::{self, StoreError};
use crate::workflow::Workflow;

impl Engine {
    /// Reruns a finished run from its failed (or cancelled) nodes, or from `node`, and
    /// everything downstream of them; upstream outputs are kept. `input` replaces the
    /// run's input. Returns how many nodes were reset.
    pub async fn retry_run(
        &self,
        run_id: Uuid,
        node: Option<&str>,
        input: Option<Value>,
    ) -> Result<usize, EngineError> {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let Some((state, nodes)) = store::control::lock_run(&tx, run_id).await? else {
            return Err(EngineError::Invalid(format!(
                "no run {run_id}; `dagq runs` lists runs"
            )));
        };
        if state == "running" {
            return Err(EngineError::Invalid(format!(
                "run {run_id} is still running; wait for it to finish or `dagq cancel {run_id}` first"
            )));
        }
        let run = store::nodes::run_context(&tx, run_id).await?;
        let workflow = self
            .workflow(&run.workflow, run.version)
            .await?
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "workflow {} version {} is not stored",
                    run.workflow, run.version
                ))
            })?;
        let targets: Vec<String> = match node {
            Some(node) if workflow.node(node).is_some() => vec![node.to_owned()],
            Some(node) => {
                return Err(EngineError::Invalid(format!(
                    "workflow {} has no node \"{node}\"; `dagq status {run_id}` lists them",
                    run.workflow
                )));
            }
            None => nodes
                .iter()
                .filter(|(_, s)| s == "failed" || s == "cancelled")
                .map(|(id, _)| id.clone())
                .collect(),
        };
        if targets.is_empty() {
            return Err(EngineError::Invalid(format!(
                "run {run_id} has no failed node to retry; name one with --node"
            )));
        }
        let reset = downstream_closure(&workflow, &targets);
        let with_deps: Vec<(String, i32)> = reset
            .iter()
            .map(|id| {
                let deps = workflow.node(id).map_or(0, |n| {
                    n.depends.iter().filter(|d| reset.contains(*d)).count()
                });
                (id.clone(), deps as i32)
            })
            .collect();
        let failed_outside = nodes
            .iter()
            .filter(|(id, s)| s == "failed" && !reset.contains(id))
            .count() as i32;
        store::control::reset_nodes(&tx, run_id, &with_deps, failed_outside, input.as_ref())
            .await?;
        let mut run = run;
        if let Some(input) = input {
            run.input = input;
        }
        let ready = with_deps
            .iter()
            .filter(|(_, d)| *d == 0)
            .map(|(id, _)| id.clone())
            .collect();
        let settled = settle(&tx, &workflow, &run, ready, Vec::new()).await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.publish_tasks(&workflow, &run, &settled.queued).await?;
        settled.count_skipped(&workflow);
        tracing::info!(run = %run_id, nodes = reset.len(), "run retried by an operator");
        Ok(reset.len())
    }

    /// Cancels a running run: nodes not yet final become `cancelled`, queued messages
    /// become duplicates, and results of nodes still running are dropped.
    pub async fn cancel_run(&self, run_id: Uuid) -> Result<(), EngineError> {
        let mut client = self.store.client().await?;
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let Some((state, _)) = store::control::lock_run(&tx, run_id).await? else {
            return Err(EngineError::Invalid(format!(
                "no run {run_id}; `dagq runs` lists runs"
            )));
        };
        if !store::control::cancel_run(&tx, run_id).await? {
            return Err(EngineError::Invalid(format!(
                "run {run_id} is {state}, not running: nothing to cancel"
            )));
        }
        tx.commit().await.map_err(StoreError::from)?;
        let run = store::nodes::run_context(&client, run_id).await?;
        self.record_run_finished(&run, "cancelled");
        Ok(())
    }
}

/// `targets` and every node downstream of them.
fn downstream_closure(workflow: &Workflow, targets: &[String]) -> BTreeSet<String> {
    let mut reset: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = targets.to_vec();
    while let Some(id) = todo.pop() {
        if reset.insert(id.clone()) {
            todo.extend(workflow.children_of(&id).map(|c| c.id.clone()));
        }
    }
    reset
}
