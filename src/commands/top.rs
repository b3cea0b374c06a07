//! `dagq top`: a live view of the queues, in-flight work, recent runs and open breakers,
//! read straight from Postgres and RabbitMQ, for an operator without Grafana.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::CommandError;
use crate::adapter::breaker::{self, BreakerState};
use crate::broker::{self, QueueProbe, Topology};
use crate::config::Settings;
use crate::store::{RunFilter, RunSummary, Store};
use crate::telemetry::{Backlog, measure_backlog};

/// How often the view is redrawn.
const REFRESH: Duration = Duration::from_secs(1);

/// Recent runs shown.
const RECENT_RUNS: i64 = 10;

/// Everything one screen shows.
#[derive(Debug, Clone)]
pub struct TopFrame {
    /// The namespace looked at.
    pub namespace: String,
    /// When it was read.
    pub at: DateTime<Utc>,
    /// Queues; the broker's figures are missing while it is unreachable.
    pub backlog: Backlog,
    /// Why the broker's figures are missing, if they are.
    pub broker_error: Option<String>,
    /// The newest runs.
    pub runs: Vec<RunSummary>,
    /// Breakers that are not closed.
    pub breakers: Vec<BreakerState>,
}

/// Connections for reading frames; the broker's is reopened when it breaks.
#[derive(Debug)]
pub struct TopSession {
    store: Store,
    amqp_url: String,
    topology: Topology,
    broker: Option<(lapin::Connection, QueueProbe)>,
}

impl TopSession {
    /// Connects to Postgres (creating and migrating the database if needed); the broker
    /// is connected at the first frame.
    pub async fn open(settings: &Settings) -> Result<Self, CommandError> {
        Store::migrate(&settings.database_url).await?;
        Ok(TopSession {
            store: Store::connect(&settings.database_url, 2)?,
            amqp_url: settings.amqp_url.clone(),
            topology: Topology::new(&settings.namespace),
            broker: None,
        })
    }

    /// Reads one frame. Postgres must answer; a broker that does not leaves its columns
    /// empty and says why.
    pub async fn frame(&mut self) -> Result<TopFrame, CommandError> {
        let nodes = self.store.queue_nodes().await?;
        let (backlog, broker_error) = match self.measure(nodes.clone()).await {
            Ok(backlog) => (backlog, None),
            Err(e) => {
                self.broker = None;
                (Backlog::without_broker(nodes), Some(e.to_string()))
            }
        };
        let filter = RunFilter {
            workflow: None,
            state: None,
            limit: RECENT_RUNS,
        };
        let runs = self.store.list_runs(&filter).await?;
        let mut breakers = breaker::list(&self.store).await?;
        breakers.retain(|b| b.state != "closed");
        Ok(TopFrame {
            namespace: self.topology.namespace().to_owned(),
            at: Utc::now(),
            backlog,
            broker_error,
            runs,
            breakers,
        })
    }

    async fn measure(
        &mut self,
        nodes: Vec<crate::store::QueueNodes>,
    ) -> Result<Backlog, broker::BrokerError> {
        let usable = self
            .broker
            .as_ref()
            .is_some_and(|(connection, probe)| connection.status().connected() && probe.is_open());
        if !usable {
            let connection = broker::connect(&self.amqp_url, "top").await?;
            let probe = QueueProbe::open(&connection, self.topology.clone()).await?;
            self.broker = Some((connection, probe));
        }
        let (_, probe) = self.broker.as_ref().expect("connected above");
        measure_backlog(nodes, probe).await
    }

    /// Closes the broker connection.
    pub async fn close(self) {
        if let Some((connection, _)) = self.broker {
            let _ = connection.close(200, "done".into()).await;
        }
    }
}

/// `dagq top`: one frame with `once`; otherwise a frame every second until q, Esc or
/// Ctrl-C (on a terminal, redrawn in place; elsewhere, printed one after the other).
pub async fn top(settings: &Settings, once: bool) -> Result<(), CommandError> {
    let mut session = TopSession::open(settings).await?;
    let result = if once {
        // A closed stdout has nothing to tell: the frame was for it.
        session.frame().await.map(|frame| {
            print_frame(&frame);
        })
    } else if std::io::stdout().is_terminal() {
        live::run(&mut session).await
    } else {
        print_frames(&mut session).await
    };
    session.close().await;
    result
}

async fn print_frames(session: &mut TopSession) -> Result<(), CommandError> {
    loop {
        if !print_frame(&session.frame().await?) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// Prints a frame and a blank line; false when stdout is closed (`dagq top | head`),
/// which ends the view.
fn print_frame(frame: &TopFrame) -> bool {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", format_top(frame))
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// One frame as text.
pub fn format_top(frame: &TopFrame) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dagq top  namespace {}  {}",
        frame.namespace,
        frame.at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    if let Some(error) = &frame.broker_error {
        let _ = writeln!(out, "RabbitMQ unreachable, its columns are empty: {error}");
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8}",
        "QUEUE", "READY", "CONSUMERS", "QUEUED", "RUNNING", "RETRYING", "OLDEST"
    );
    let count = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let (mut ready, mut queued, mut running, mut retrying) = (0u64, 0, 0, 0);
    for q in &frame.backlog.queues {
        let n = &q.nodes;
        ready += q.broker.map_or(0, |b| u64::from(b.ready));
        (queued, running, retrying) = (
            queued + n.queued,
            running + n.running,
            retrying + n.retrying,
        );
        let oldest = if n.queued > 0 {
            age(n.oldest_queued_seconds)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8}",
            n.queue,
            count(q.broker.map(|b| b.ready)),
            count(q.broker.map(|b| b.consumers)),
            n.queued,
            n.running,
            n.retrying,
            oldest
        );
    }
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>9} {:>7} {:>7} {:>8}",
        "total", ready, "", queued, running, retrying
    );
    let _ = writeln!(
        out,
        "\nin flight {running}   events waiting {}   dead letters waiting {}   workers {}",
        count(frame.backlog.triggers.map(|t| t.ready)),
        count(frame.backlog.dead.map(|d| d.ready)),
        // Every worker consumes the trigger queue once.
        count(frame.backlog.triggers.map(|t| t.consumers)),
    );
    let _ = writeln!(out, "\nRECENT RUNS");
    let _ = writeln!(
        out,
        "{:<36}  {:<20} {:<10} {:<19} {:>9}",
        "RUN", "WORKFLOW", "STATE", "STARTED", "TOOK"
    );
    for run in &frame.runs {
        let took = (run.finished_at.unwrap_or(frame.at) - run.created_at)
            .num_milliseconds()
            .max(0);
        let _ = writeln!(
            out,
            "{:<36}  {:<20} {:<10} {:<19} {:>9}",
            run.id,
            run.workflow,
            run.state,
            run.created_at.format("%Y-%m-%d %H:%M:%S"),
            age(took as f64 / 1000.0)
        );
    }
    if frame.breakers.is_empty() {
        let _ = writeln!(out, "\nBREAKERS  all closed");
    } else {
        let _ = writeln!(out, "\nBREAKERS NOT CLOSED");
        for b in &frame.breakers {
            let since = b
                .opened_at
                .map(|t| age((frame.at - t).num_milliseconds() as f64 / 1000.0));
            let error = super::clip(b.last_error.as_deref(), 80);
            let _ = writeln!(
                out,
                "{:<20} {:<10} for {:>8}  {error}",
                b.profile,
                b.state,
                since.unwrap_or_else(|| "-".into())
            );
        }
    }
    out
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `2h03m`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0);
    match s {
        s if s < 1.0 => format!("{}ms", (s * 1000.0).round()),
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, s as u64 % 60),
        s => format!("{}h{:02}m", (s / 3600.0) as u64, (s as u64 % 3600) / 60),
    }
}

/// The in-place view on a terminal.
mod live {
    use std::io::Write as _;

    use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyModifiers};
    use crossterm::{cursor, execute, queue, terminal};
    use futures::StreamExt;

    use super::{CommandError, REFRESH, TopSession, format_top};

    /// Restores the terminal however the view ends.
    struct Screen;

    impl Screen {
        fn enter() -> std::io::Result<Screen> {
            terminal::enable_raw_mode()?;
            execute!(
                std::io::stdout(),
                terminal::EnterAlternateScreen,
                cursor::Hide
            )?;
            Ok(Screen)
        }
    }

    impl Drop for Screen {
        fn drop(&mut self) {
            let _ = execute!(
                std::io::stdout(),
                cursor::Show,
                terminal::LeaveAlternateScreen
            );
            let _ = terminal::disable_raw_mode();
        }
    }

    fn quits(key: &KeyEvent) -> bool {
        matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
    }

    pub(super) async fn run(session: &mut TopSession) -> Result<(), CommandError> {
        let terminal_error =
            |e: std::io::Error| CommandError::Usage(format!("cannot drive the terminal: {e}"));
        let _screen = Screen::enter().map_err(terminal_error)?;
        let mut events = EventStream::new();
        loop {
            let frame = session.frame().await?;
            // Raw mode: lines need a carriage return too.
            let text = format_top(&frame).replace('\n', "\r\n") + "\r\n(q to quit)";
            let mut stdout = std::io::stdout();
            queue!(
                stdout,
                cursor::MoveTo(0, 0),
                terminal::Clear(terminal::ClearType::All)
            )
            .map_err(terminal_error)?;
            stdout.write_all(text.as_bytes()).map_err(terminal_error)?;
            stdout.flush().map_err(terminal_error)?;
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                event = events.next() => match event {
                    Some(Ok(Event::Key(key))) if quits(&key) => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(terminal_error(e)),
                    None => return Ok(()),
                },
            }
        }
    }
}
