//! The `dagq` command line. Parsing and printing only; the work is in the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dagq::commands::{self, CommandError, json_argument};
use dagq::config::Settings;
use dagq::engine::{Worker, WorkerOptions};
use dagq::store::{RunFilter, Store};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "dagq",
    version,
    about = "DAG workflows of AI-model tasks on RabbitMQ and Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Consume triggers and tasks until SIGINT/SIGTERM.
    Worker {
        /// Task queues to serve, comma-separated (default: every queue of every workflow).
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
        /// Tasks processed at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Address for /metrics, /healthz and /readyz, or "off".
        #[arg(long, default_value = "0.0.0.0:9464")]
        http: String,
        /// Do not apply migrations at start.
        #[arg(long)]
        no_migrate: bool,
        /// Seconds in-flight tasks may take to finish after SIGTERM.
        #[arg(long, default_value_t = 30)]
        grace: u64,
    },
    /// Manage workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Start a run of a workflow (publishes dagq.run.requested).
    Run {
        /// Workflow name.
        workflow: String,
        /// Run input: JSON or @FILE.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Message priority 0-9 for the run's tasks.
        #[arg(long)]
        priority: Option<u8>,
        /// Wait until the run finishes and print its result.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Publish a CloudEvent (for git hooks, cron and scripts).
    Publish {
        /// Event type, also the routing key (e.g. git.push).
        #[arg(long = "type")]
        kind: String,
        /// Event source.
        #[arg(long, default_value = "dagq-cli")]
        source: String,
        /// Event id (default: a new UUID); publishing the same source and id twice starts one run.
        #[arg(long)]
        id: Option<String>,
        /// Event subject.
        #[arg(long)]
        subject: Option<String>,
        /// Event data: JSON or @FILE.
        #[arg(long)]
        data: String,
    },
    /// Show one run with its nodes.
    Status {
        /// Run id.
        run_id: Uuid,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first.
    Runs {
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this state (running, completed, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rerun a failed run from its failed node(s), keeping upstream outputs.
    Retry {
        /// Run id.
        run_id: Uuid,
        /// Rerun from this node (and everything downstream) instead of the failed ones.
        #[arg(long)]
        node: Option<String>,
        /// Replace the run's input: JSON or @FILE.
        #[arg(long)]
        input: Option<String>,
    },
    /// Cancel a running run.
    Cancel {
        /// Run id.
        run_id: Uuid,
    },
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect and reset the circuit breakers of model profiles.
    #[command(subcommand)]
    Breaker(BreakerCommand),
    /// Measure throughput, latency and overhead on this machine (prints figures).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Live view of queues, in-flight tasks, recent runs and open breakers (q to quit).
    Top {
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Run the code-review scenario end to end on the local services and a mock model.
    Demo,
    /// Serve a deterministic OpenAI- and Anthropic-compatible model API.
    MockLlm {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        addr: SocketAddr,
        /// Delay before every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of requests that fail (0.0-1.0), chosen by a hash of the request.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// HTTP status of injected failures.
        #[arg(long, default_value_t = 500)]
        fail_status: u16,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Diamond runs (A → B, C, D → E) across worker processes: runs/s, tasks/s, latency, memory.
    Diamond {
        /// Runs to start.
        #[arg(long, default_value_t = 2000)]
        runs: u64,
        /// Worker processes.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Concurrency of each worker.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Make nodes chat calls to a mock model answering after this many milliseconds.
        #[arg(long)]
        task_latency_ms: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Diamond runs one after another on an idle system: end-to-end latency.
    Latency {
        /// Runs.
        #[arg(long, default_value_t = 200)]
        runs: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// This machine's ceiling: broker hops/s and Postgres transitions/s.
    Limit {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Latency the adapter path adds over a direct HTTP call, at a fixed request rate.
    Adapter {
        /// Requests per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Seconds per pass.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BreakerCommand {
    /// List breakers with their state.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close a profile's breaker now.
    Reset {
        /// Model profile.
        profile: String,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters, newest first.
    List {
        /// Include replayed ones.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay dead letters: a failed task's node runs again; a poison message returns to its queue.
    Replay {
        /// Dead-letter ids.
        #[arg(required_unless_present = "all")]
        ids: Vec<Uuid>,
        /// Every dead letter not yet replayed.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum WorkflowCommand {
    /// Validate and store workflow files (a changed definition becomes a new version).
    Apply {
        /// Workflow JSON files.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// List workflows with their latest version.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a workflow definition.
    Show {
        /// Workflow name.
        name: String,
        /// Version (default: latest).
        #[arg(long)]
        version: Option<i32>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    dagq::telemetry::init_logging();
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let settings = Settings::load()?;
    match command {
        Command::Migrate => {
            let applied = Store::migrate(&settings.database_url).await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                println!("applied: {}", applied.join(", "));
            }
        }
        Command::Worker {
            queues,
            concurrency,
            http,
            no_migrate,
            grace,
        } => {
            let http = match http.as_str() {
                "off" | "none" | "" => None,
                addr => Some(addr.parse::<SocketAddr>().with_context(|| {
                    format!("--http {addr:?} is not an address like 0.0.0.0:9464 (or \"off\")")
                })?),
            };
            if concurrency == 0 {
                anyhow::bail!("--concurrency must be at least 1");
            }
            let options = WorkerOptions {
                queues,
                concurrency,
                http,
                migrate: !no_migrate,
                grace: Duration::from_secs(grace),
                ..WorkerOptions::default()
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            Worker::new(settings, options).run(shutdown).await?;
        }
        Command::Workflow(command) => workflow(&settings, command).await?,
        Command::Run {
            workflow,
            input,
            priority,
            wait,
            json,
            timeout,
        } => {
            let input = json_argument("--input", &input)?;
            let store = Store::connect(&settings.database_url, 2)?;
            if store.workflow_definition(&workflow, None).await?.is_none() {
                anyhow::bail!(CommandError::NotFound(format!(
                    "workflow \"{workflow}\" is not applied; run `dagq workflow apply FILE` first"
                )));
            }
            let event = commands::request_run(&settings, &workflow, input, priority).await?;
            let (source, id) = (
                event["source"].as_str().unwrap_or_default(),
                event["id"].as_str().unwrap_or_default(),
            );
            if !wait {
                println!("requested a run of {workflow} (event {id})");
                return Ok(ExitCode::SUCCESS);
            }
            let status =
                commands::wait_for_run(&store, source, id, Duration::from_secs(timeout), !json)
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", commands::format_run_status(&status));
            }
            if status.run.state != "completed" {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Publish {
            kind,
            source,
            id,
            subject,
            data,
        } => {
            let data = json_argument("--data", &data)?;
            let mut event =
                dagq::engine::messages::new_event(&kind, &source, subject.as_deref(), data);
            if let Some(id) = id {
                event["id"] = id.into();
            }
            commands::publish_event(&settings, &event, 0).await?;
            println!(
                "published {kind} event {}",
                event["id"].as_str().unwrap_or_default()
            );
        }
        Command::Status { run_id, json } => {
            let store = Store::connect(&settings.database_url, 1)?;
            let status = store.run_status(run_id).await?.ok_or_else(|| {
                CommandError::NotFound(format!("no run {run_id}; `dagq runs` lists runs"))
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", commands::format_run_status(&status));
            }
        }
        Command::Runs {
            workflow,
            state,
            limit,
            json,
        } => {
            let store = Store::connect(&settings.database_url, 1)?;
            let runs = store
                .list_runs(&RunFilter {
                    workflow,
                    state,
                    limit,
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print!("{}", commands::format_runs(&runs));
            }
        }
        Command::Retry {
            run_id,
            node,
            input,
        } => {
            let input = input.map(|i| json_argument("--input", &i)).transpose()?;
            let session = commands::OperatorSession::open(&settings).await?;
            let result = session.retry(run_id, node.as_deref(), input).await;
            session.close().await;
            println!("{}", result?);
        }
        Command::Cancel { run_id } => {
            let session = commands::OperatorSession::open(&settings).await?;
            let result = session.cancel(run_id).await;
            session.close().await;
            println!("{}", result?);
        }
        Command::Dlq(DlqCommand::List { all, limit, json }) => {
            Store::migrate(&settings.database_url).await?;
            let store = Store::connect(&settings.database_url, 1)?;
            let letters = store.list_dead_letters(all, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", commands::format_dead_letters(&letters));
            }
        }
        Command::Dlq(DlqCommand::Replay { ids, all }) => {
            let session = commands::OperatorSession::open(&settings).await?;
            let result = session.replay(&ids, all).await;
            session.close().await;
            for line in result? {
                println!("{line}");
            }
        }
        Command::Breaker(BreakerCommand::List { json }) => {
            Store::migrate(&settings.database_url).await?;
            let store = Store::connect(&settings.database_url, 1)?;
            let breakers = dagq::adapter::breaker::list(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&breakers)?);
            } else {
                print!("{}", commands::format_breakers(&breakers));
            }
        }
        Command::Breaker(BreakerCommand::Reset { profile }) => {
            let session = commands::OperatorSession::open(&settings).await?;
            let result = session.reset_breaker(&profile).await;
            session.close().await;
            println!("{}", result?);
        }
        Command::Bench(command) => bench(&settings, command).await?,
        Command::Top { once } => commands::top(&settings, once).await?,
        Command::Demo => {
            commands::demo(&settings).await?;
        }
        Command::MockLlm {
            addr,
            latency_ms,
            fail_rate,
            fail_status,
        } => {
            if !(0.0..=1.0).contains(&fail_rate) {
                anyhow::bail!(
                    "--fail-rate {fail_rate} is out of range; use a share from 0.0 to 1.0"
                );
            }
            let options = dagq::mock_llm::MockOptions {
                latency: Duration::from_millis(latency_ms),
                fail_rate,
                fail_status,
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let bound = dagq::mock_llm::serve(addr, options, shutdown.clone())
                .await
                .with_context(|| format!("cannot listen on {addr}; pick another with --addr"))?;
            println!(
                "mock-llm serving OpenAI (/v1/...) and Anthropic (/v1/messages) APIs on http://{bound}"
            );
            shutdown.cancelled().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    use dagq::bench;
    match command {
        BenchCommand::Diamond {
            runs,
            workers,
            concurrency,
            task_latency_ms,
            json,
        } => {
            let params = bench::DiamondBench {
                runs,
                workers,
                concurrency,
                task_latency_ms,
            };
            let r = bench::bench_diamond(settings, &params).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let model = task_latency_ms.map_or("noop tasks".to_owned(), |ms| {
                format!("chat tasks, mock model {ms} ms")
            });
            println!(
                "diamond: {} runs ({} tasks) in {:.2} s with {workers} worker(s), {model}",
                r.runs, r.tasks, r.seconds
            );
            println!(
                "  throughput   {:.0} runs/s, {:.0} tasks/s",
                r.runs_per_sec, r.tasks_per_sec
            );
            println!(
                "  run latency  p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms (event published -> run completed)",
                r.run_latency_ms.p50, r.run_latency_ms.p95, r.run_latency_ms.p99
            );
            println!(
                "  workers      peak RSS {:.1} MiB, CPU {:.1} s",
                r.worker_peak_rss_mb, r.worker_cpu_seconds
            );
            match bench::saved_ceiling() {
                Some(ceiling) => println!(
                    "  vs ceiling   {:.0}% of {ceiling:.0}/s measured by `dagq bench limit`",
                    100.0 * r.tasks_per_sec / ceiling
                ),
                None => println!("  vs ceiling   run `dagq bench limit` first to compare"),
            }
        }
        BenchCommand::Latency { runs, json } => {
            let p = bench::bench_latency(settings, runs).await?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!(
                    "latency: {runs} diamond runs one at a time: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
                    p.p50, p.p95, p.p99
                );
            }
        }
        BenchCommand::Limit { seconds, json } => {
            let r = bench::bench_limit(settings, seconds).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "broker:   {:.0} hops/s (consume, publish a follow-up with confirm, ack)",
                    r.broker_hops_per_sec
                );
                for (clients, rate) in &r.pg_transitions_per_sec {
                    println!("postgres: {rate:.0} transitions/s with {clients} client(s)");
                }
                println!(
                    "ceiling:  {:.0}/s (the lower of the two)",
                    r.ceiling_per_sec
                );
            }
        }
        BenchCommand::Adapter {
            rate,
            seconds,
            json,
        } => {
            let r = bench::bench_adapter(&bench::AdapterBench { rate, seconds }).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "adapter overhead at {rate} requests/s ({} requests per pass):",
                    r.requests
                );
                println!(
                    "  direct HTTP   p50 {:.3} ms, p99 {:.3} ms",
                    r.direct_ms.p50, r.direct_ms.p99
                );
                println!(
                    "  dagq adapter  p50 {:.3} ms, p99 {:.3} ms",
                    r.adapter_ms.p50, r.adapter_ms.p99
                );
                println!(
                    "  added         p50 {:.3} ms, p99 {:.3} ms",
                    r.added_p50_ms, r.added_p99_ms
                );
            }
        }
    }
    Ok(())
}

async fn workflow(settings: &Settings, command: WorkflowCommand) -> anyhow::Result<()> {
    Store::migrate(&settings.database_url).await?;
    let store = Store::connect(&settings.database_url, 1)?;
    match command {
        WorkflowCommand::Apply { files } => {
            for applied in commands::apply_files(settings, &store, &files).await? {
                let what = if applied.created {
                    "applied"
                } else {
                    "unchanged"
                };
                println!("{}: version {} ({what})", applied.name, applied.version);
            }
        }
        WorkflowCommand::List { json } => {
            let workflows = store.list_workflows().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workflows)?);
            } else {
                print!("{}", commands::format_workflow_list(&workflows));
            }
        }
        WorkflowCommand::Show { name, version } => {
            let (_, definition) = store
                .workflow_definition(&name, version)
                .await?
                .ok_or_else(|| {
                    CommandError::NotFound(format!(
                        "no workflow \"{name}\"; `dagq workflow list` lists them"
                    ))
                })?;
            println!("{}", serde_json::to_string_pretty(&definition)?);
        }
    }
    Ok(())
}

/// The first SIGINT/SIGTERM asks for a graceful stop; a second one exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        if round == 0 {
            tracing::info!("shutting down: finishing in-flight tasks (signal again to exit now)");
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}
