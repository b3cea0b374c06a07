//! What each CLI subcommand does, as library functions so that tests drive them directly;
//! `main.rs` only parses arguments and prints.

mod demo;
mod operate;
mod produce;
mod progress;
mod report;
mod top;
mod wait;
mod workflows;

use std::path::Path;

pub use demo::demo;
pub use operate::{OperatorSession, format_breakers, format_dead_letters};
pub use produce::{publish_event, request_run};
pub use progress::Progress;
pub use report::{format_run_status, format_runs};
pub use top::{TopFrame, TopSession, format_top, top};
pub use wait::wait_for_run;
pub use workflows::{apply_files, format_workflow_list};

use crate::broker::BrokerError;
use crate::config::ConfigError;
use crate::engine::EngineError;
use crate::store::StoreError;
use crate::workflow::WorkflowError;

/// Why a command failed, in words for the person who ran it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Postgres failed or is unreachable.
    #[error("{0} (is PostgreSQL running and DAGQ_DATABASE_URL right?)")]
    Store(#[from] StoreError),
    /// RabbitMQ failed or is unreachable.
    #[error("{0} (is RabbitMQ running and DAGQ_AMQP_URL right?)")]
    Broker(#[from] BrokerError),
    /// A workflow file is wrong.
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    /// The worker failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An argument is wrong.
    #[error("{0}")]
    Usage(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Waited too long.
    #[error("{0}")]
    Timeout(String),
}

/// At most `max` characters of an optional text, for one line of a table.
pub(crate) fn clip(text: Option<&str>, max: usize) -> String {
    text.unwrap_or("").chars().take(max).collect()
}

/// Reads a JSON argument: inline JSON, or `@FILE` for a file's contents.
pub fn json_argument(what: &str, text: &str) -> Result<serde_json::Value, CommandError> {
    let (source, body) = match text.strip_prefix('@') {
        Some(file) => (
            file.to_owned(),
            std::fs::read_to_string(Path::new(file))
                .map_err(|e| CommandError::Usage(format!("{what}: cannot read {file}: {e}")))?,
        ),
        None => ("the argument".to_owned(), text.to_owned()),
    };
    serde_json::from_str(&body).map_err(|e| {
        CommandError::Usage(format!(
            "{what}: {source} is not JSON ({e}); pass JSON such as '{{\"key\": \"value\"}}' or @file.json"
        ))
    })
}
