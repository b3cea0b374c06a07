//! Producing events: `dagq publish` and `dagq run`.

use serde_json::Value;

use super::CommandError;
use crate::broker::{self, Publisher, Topology};
use crate::config::Settings;
use crate::engine::RUN_REQUESTED;
use crate::engine::messages::new_event;
use crate::schema::Schema;

/// Publishes one CloudEvent, declaring the topology first so that an event published to
/// a fresh broker (a git hook before any worker ever started) is kept, not dropped.
pub async fn publish_event(
    settings: &Settings,
    event: &Value,
    priority: u8,
) -> Result<(), CommandError> {
    Schema::Event
        .check(event)
        .map_err(|v| CommandError::Usage(format!("event {v}")))?;
    let kind = event["type"].as_str().unwrap_or_default();
    let connection = broker::connect(&settings.amqp_url, "publish").await?;
    let publisher = Publisher::open(&connection, Topology::new(&settings.namespace)).await?;
    let body = serde_json::to_vec(event).expect("a JSON value always serializes");
    publisher.publish_event(kind, &body, priority).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Publishes `dagq.run.requested` for a workflow; returns the event (its `source` and
/// `id` find the run).
pub async fn request_run(
    settings: &Settings,
    workflow: &str,
    input: Value,
    priority: Option<u8>,
) -> Result<Value, CommandError> {
    let mut data = serde_json::json!({"workflow": workflow, "input": input});
    if let Some(priority) = priority {
        if priority > 9 {
            return Err(CommandError::Usage(format!(
                "--priority {priority} is out of range; use 0-9"
            )));
        }
        data["priority"] = priority.into();
    }
    let event = new_event(RUN_REQUESTED, "dagq-cli", Some(workflow), data);
    publish_event(settings, &event, priority.unwrap_or(0)).await?;
    Ok(event)
}
