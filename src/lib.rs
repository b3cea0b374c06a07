//! dagq runs DAG workflows of AI-model tasks on RabbitMQ and Postgres.
//!
//! Producers publish CloudEvents; stateless workers start runs, execute each node through
//! the adapter layer, record every state transition in Postgres and publish the
//! follow-up tasks. The modules, from the outside in:
//!
//! - [`config`]: settings (defaults → `dagq.toml` → `DAGQ_*` environment), validated once.
//! - [`schema`]: the JSON Schemas every message and workflow is validated against.
//! - [`workflow`]: workflow definitions, validation at apply time, templates and conditions.
//! - [`broker`]: RabbitMQ connection, topology, confirmed publishing, consuming.
//! - [`store`]: the Postgres pool, migrations and the queries of each table.
//! - [`engine`]: trigger handling, node processing, DAG advancement, the worker.
//! - [`adapter`]: the model-adapter trait and its implementations.
//! - [`alert`]: notifiers (webhooks, Slack, e-mail) deduplicated per subject, and incidents.
//! - [`mock_llm`]: the deterministic model server for the demo, tests and benchmarks.
//! - [`telemetry`]: metric names, the exporter, health endpoints, the elected backlog
//!   poller, logging.
//! - [`bench`]: `dagq bench`, throughput, latency and overhead measured on this machine.
//! - [`commands`]: what the CLI subcommands do, so that tests can drive them directly.
#![forbid(unsafe_code)]
#![warn(
    unreachable_pub,
    missing_debug_implementations,
    clippy::dbg_macro,
    clippy::todo
)]

pub mod adapter;
pub mod alert;
pub mod bench;
pub mod broker;
pub mod commands;
pub mod config;
pub mod engine;
pub mod mock_llm;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod workflow;
