//! `dagq demo`: the whole path on the local services. A `git.push` event goes in, a
//! worker runs the workflow, and the run's result comes out.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{CommandError, format_run_status, publish_event, wait_for_run};
use crate::config::Settings;
use crate::engine::messages::new_event;
use crate::engine::{Worker, WorkerOptions};
use crate::store::{RunStatus, Store};
use crate::workflow::Workflow;

const DEMO_WORKFLOW: &str = include_str!("../../workflows/release-digest.json");

/// Runs the demo and returns the finished run; its report goes to stdout.
pub async fn demo(settings: &Settings) -> Result<RunStatus, CommandError> {
    println!("dagq demo: namespace {}, database {}", settings.namespace, redact(&settings.database_url));
    let applied = Store::migrate(&settings.database_url).await?;
    if !applied.is_empty() {
        println!("applied migrations: {}", applied.join(", "));
    }
    let store = Store::connect(&settings.database_url, 4)?;
    let workflow = Workflow::from_text("workflows/release-digest.json", DEMO_WORKFLOW, None)?;
    let applied = store.apply_workflow(&workflow).await?;
    println!("workflow {} is at version {}", applied.name, applied.version);

    let shutdown = CancellationToken::new();
    let worker = Worker::new(
        settings.clone(),
        WorkerOptions {
            migrate: false,
            concurrency: 8,
            ..WorkerOptions::default()
        },
    );
    let worker = tokio::spawn(worker.run(shutdown.clone()));

    let event = new_event(
        "git.push",
        "dagq-demo",
        Some("acme/api"),
        json!({
            "repo": "acme/api",
            "branch": "main",
            "commits": [
                {"id": "a1f3", "message": "Add rate limiting to the search endpoint"},
                {"id": "b7c9", "message": "BREAKING: remove the v1 orders API"},
                {"id": "c2d4", "message": "Fix typo in the README"}
            ]
        }),
    );
    println!("publishing git.push event {} ...", event["id"].as_str().unwrap_or_default());
    publish_event(settings, &event, 0).await?;
    let waited = wait_for_run(
        &store,
        event["source"].as_str().unwrap_or_default(),
        event["id"].as_str().unwrap_or_default(),
        Duration::from_secs(60),
        true,
    )
    .await;
    shutdown.cancel();
    match worker.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(CommandError::Usage(format!("the demo worker crashed: {e}"))),
    }
    let status = waited?;
    println!("\n{}", format_run_status(&status));
    if status.run.state != "completed" {
        return Err(CommandError::Usage(format!("the demo run ended {}", status.run.state)));
    }
    Ok(status)
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
