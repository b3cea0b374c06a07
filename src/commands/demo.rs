//! `dagq demo`: the seed's scenario on the local services. A `git.push` event starts the
//! code-review workflow: fetch the diff, three model reviews in parallel, a joined
//! report, and a ticket only when the report flags something critical. The models are
//! `dagq mock-llm`, reached through the real OpenAI and Anthropic adapters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{CommandError, format_run_status, publish_event, wait_for_run};
use crate::config::{ModelProfile, Provider, Settings};
use crate::engine::messages::new_event;
use crate::engine::{Worker, WorkerOptions};
use crate::mock_llm::{self, MockOptions};
use crate::store::{RunStatus, Store};
use crate::workflow::Workflow;

const CODE_REVIEW: &str = include_str!("../../workflows/code-review.json");

/// The demo's model profiles: `reviewer` on the OpenAI API, `writer` on Anthropic's,
/// both served by the mock at `mock`.
fn demo_profiles(mock: SocketAddr) -> BTreeMap<String, ModelProfile> {
    let profile = |provider, base_url: String, model: &str| ModelProfile {
        provider,
        base_url: Some(base_url),
        model: Some(model.to_owned()),
        api_key_env: None,
        timeout: Duration::from_secs(10),
        fallback: Vec::new(),
        headers: BTreeMap::new(),
        params: Default::default(),
        price_per_1k_prompt: Some(0.00015),
        price_per_1k_completion: Some(0.0006),
    };
    BTreeMap::from([
        (
            "reviewer".to_owned(),
            profile(Provider::Openai, format!("http://{mock}/v1"), "mock-small"),
        ),
        (
            "writer".to_owned(),
            profile(Provider::Anthropic, format!("http://{mock}"), "mock-large"),
        ),
    ])
}

/// Runs the demo and returns the finished run; its report goes to stdout.
pub async fn demo(settings: &Settings) -> Result<RunStatus, CommandError> {
    let shutdown = CancellationToken::new();
    let mock = mock_llm::serve(
        "127.0.0.1:0".parse().expect("a constant address"),
        MockOptions {
            latency: Duration::from_millis(20),
            ..MockOptions::default()
        },
        shutdown.clone(),
    )
    .await
    .map_err(|e| CommandError::Usage(format!("cannot start the mock model server: {e}")))?;
    let mut settings = settings.clone();
    settings.file.models = demo_profiles(mock);

    println!(
        "dagq demo: namespace {}, mock-llm at http://{mock}",
        settings.namespace
    );
    let applied = Store::migrate(&settings.database_url).await?;
    if !applied.is_empty() {
        println!("applied migrations: {}", applied.join(", "));
    }
    let store = Store::connect(&settings.database_url, 4)?;
    let workflow = Workflow::from_text(
        "workflows/code-review.json",
        CODE_REVIEW,
        Some(&settings.file.models),
    )?;
    let applied = store.apply_workflow(&workflow).await?;
    println!(
        "workflow {} is at version {}",
        applied.name, applied.version
    );

    let worker = Worker::new(
        settings.clone(),
        WorkerOptions {
            migrate: false,
            concurrency: 16,
            ..WorkerOptions::default()
        },
    );
    let worker = tokio::spawn(worker.run(shutdown.clone()));

    let event = new_event(
        "git.push",
        "dagq-demo",
        Some("acme/payments"),
        json!({
            "repo": "acme/payments",
            "branch": "main",
            "before": "3f2a1c4",
            "after": "8b9e0d2",
            "diff_url": format!("http://{mock}/demo/diff"),
            "tickets_url": format!("http://{mock}/demo/tickets"),
        }),
    );
    println!(
        "publishing git.push event {} for acme/payments ...",
        event["id"].as_str().unwrap_or_default()
    );
    publish_event(&settings, &event, 0).await?;
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
    let text_of = |id: &str| {
        status
            .nodes
            .iter()
            .find(|n| n.node_id == id)
            .and_then(|n| n.output.as_ref())
            .map(|o| {
                o.get("text")
                    .and_then(|t| t.as_str())
                    .map_or_else(|| o.to_string(), str::to_owned)
            })
    };
    if let Some(report) = text_of("report") {
        println!("\nreport:\n  {report}");
    }
    if let Some(ticket) = status.nodes.iter().find(|n| n.node_id == "ticket") {
        match (&ticket.state[..], &ticket.output) {
            ("completed", Some(output)) => println!(
                "ticket opened: {}",
                output["body"]["id"].as_str().unwrap_or("?")
            ),
            (state, _) => println!("ticket: {state}"),
        }
    }
    println!("\n{}", format_run_status(&status));
    if status.run.state != "completed" {
        return Err(CommandError::Usage(format!(
            "the demo run ended {}",
            status.run.state
        )));
    }
    Ok(status)
}
