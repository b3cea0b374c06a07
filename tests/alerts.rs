//! Alerts and incidents against the real Postgres, delivered to sinks on 127.0.0.1: an
//! HTTP sink (axum) for the JSON, Slack and incident webhooks, and a minimal SMTP server.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::Uri;
use dagq::alert::{Alert, AlertError, AlertOutcome, Alerter, Severity};
use dagq::config::{AlertsConfig, EmailConfig};
use dagq::store::Store;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use common::{TestEnv, eventually};

/// Every call under test answers well within this (each notifier is bounded by 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {CALL_TIMEOUT:?}"))
}

/// What the HTTP sink received, in order.
#[derive(Clone, Default)]
struct HttpSink {
    received: Arc<Mutex<Vec<(String, Value)>>>,
    tickets: Arc<AtomicUsize>,
}

impl HttpSink {
    /// Starts the sink; returns it with its base URL. `/incidents` answers a ticket id
    /// (`TICKET-1`, `TICKET-2`, …), every other path `{"ok": true}`.
    async fn start() -> (HttpSink, String) {
        let sink = HttpSink::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(record)
            .with_state(sink.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (sink, url)
    }

    /// The JSON bodies received on `path`.
    fn bodies(&self, path: &str) -> Vec<Value> {
        let received = self.received.lock().unwrap();
        let bodies = received.iter().filter(|(p, _)| p == path);
        bodies.map(|(_, body)| body.clone()).collect()
    }
}

async fn record(State(sink): State<HttpSink>, uri: Uri, body: Bytes) -> Json<Value> {
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(format!("not JSON: {}", String::from_utf8_lossy(&body))));
    let path = uri.path().to_owned();
    sink.received.lock().unwrap().push((path.clone(), body));
    if path == "/incidents" {
        let n = sink.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        Json(json!({ "id": format!("TICKET-{n}") }))
    } else {
        Json(json!({ "ok": true }))
    }
}

/// One message as the SMTP sink received it.
#[derive(Debug, Clone, Default)]
struct Mail {
    mail_from: String,
    rcpt_to: Vec<String>,
    data: String,
}

impl Mail {
    /// The value of header `name` (unfolded), from the message's header block.
    fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        let prefix = format!("{}:", name.to_ascii_lowercase());
        unfolded
            .split("\r\n")
            .find(|line| line.to_ascii_lowercase().starts_with(&prefix))
            .map(|line| line[prefix.len()..].trim().to_owned())
    }
}

/// Starts a minimal SMTP server on 127.0.0.1; returns its port and the messages it got.
async fn start_smtp_sink() -> (u16, Arc<Mutex<Vec<Mail>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind SMTP sink");
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let store = mails.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mails = store.clone();
            tokio::spawn(async move {
                if let Err(e) = smtp_session(stream, mails).await {
                    eprintln!("SMTP sink session failed: {e}");
                }
            });
        }
    });
    (port, mails)
}

/// 220, EHLO/HELO → 250, MAIL → 250, RCPT → 250, DATA → 354, lines until "." → 250,
/// QUIT → 221.
async fn smtp_session(stream: TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink.test ESMTP\r\n").await?;
    let mut mail = Mail::default();
    while let Some(line) = lines.next_line().await? {
        let command = line.to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 sink.test\r\n"
        } else if command.starts_with("MAIL FROM:") {
            mail.mail_from = line["MAIL FROM:".len()..].trim().to_owned();
            b"250 OK\r\n"
        } else if command.starts_with("RCPT TO:") {
            mail.rcpt_to
                .push(line["RCPT TO:".len()..].trim().to_owned());
            b"250 OK\r\n"
        } else if command == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            while let Some(data) = lines.next_line().await? {
                if data == "." {
                    break;
                }
                // Dot-stuffing: a line starting with "." was sent with one more.
                mail.data.push_str(data.strip_prefix('.').unwrap_or(&data));
                mail.data.push_str("\r\n");
            }
            mails.lock().unwrap().push(std::mem::take(&mut mail));
            b"250 OK queued\r\n"
        } else if command == "QUIT" {
            write.write_all(b"221 Bye\r\n").await?;
            return Ok(());
        } else if command == "RSET" || command == "NOOP" {
            b"250 OK\r\n"
        } else {
            b"502 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
    Ok(())
}

/// A loopback port nothing listens on: connections to it are refused.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

fn alert(subject: &str) -> Alert {
    Alert {
        subject: subject.into(),
        severity: Severity::Critical,
        summary: format!("3 consecutive failures on {subject}"),
        details: json!({ "profile": "reviewer", "failures": 3 }),
    }
}

/// A second worker's view: the same database through a pool of its own, connected.
async fn other_worker(env: &TestEnv, config: AlertsConfig) -> Alerter {
    let store = Store::connect(&env.settings.database_url, 4).expect("database URL parses");
    store.ping().await.expect("the test database answers");
    Alerter::new(config, store)
}

/// Five alerts with one subject from two workers within the window reach the webhook
/// once; the first after the window reports the four suppressed; other subjects are
/// independent.
#[tokio::test]
async fn one_alert_per_subject_and_window_reports_the_suppressed_count() {
    let env = TestEnv::new().await;
    let (sink, url) = HttpSink::start().await;
    let window = Duration::from_secs(1);
    let config = AlertsConfig {
        webhooks: vec![format!("{url}/alerts")],
        window,
        ..AlertsConfig::default()
    };
    let workers = [
        Alerter::new(config.clone(), env.store.clone()),
        other_worker(&env, config).await,
    ];
    // Connected pools, so that the five raises fall well within the window.
    env.store.ping().await.expect("the test database answers");
    let outage = alert("breaker open: reviewer");
    let raises = (0..5).map(|i| workers[i % 2].raise(&outage));
    let outcomes = bounded("five raises", futures::future::join_all(raises)).await;
    let outcomes: Vec<AlertOutcome> = outcomes.into_iter().map(|o| o.expect("raise")).collect();
    let sent = outcomes.iter().filter(|o| {
        **o == AlertOutcome::Sent {
            suppressed_before: 0,
        }
    });
    assert_eq!(sent.count(), 1, "one of five raises sends: {outcomes:?}");
    let first = sink.bodies("/alerts");
    assert_eq!(
        first.len(),
        1,
        "webhook posts after five raises: {first:#?}"
    );
    assert_eq!(first[0]["subject"], "breaker open: reviewer");
    assert_eq!(first[0]["severity"], "critical");
    assert_eq!(first[0]["summary"], outage.summary);
    assert_eq!(first[0]["details"], outage.details);
    assert_eq!(first[0]["suppressed_before"], 0);
    assert_eq!(first[0]["source"], "dagq");
    assert!(first[0]["sent_at"].is_string(), "{:#}", first[0]);

    let other = bounded(
        "raise",
        workers[1].raise(&alert("dead letters: code-review")),
    )
    .await;
    assert_eq!(
        other.unwrap(),
        AlertOutcome::Sent {
            suppressed_before: 0
        }
    );
    let posted: Vec<Value> = sink.bodies("/alerts");
    assert_eq!(
        posted.len(),
        2,
        "a second subject is sent within the first's window"
    );
    assert_eq!(posted[1]["subject"], "dead letters: code-review");

    // The window is the behaviour under test: wait until the database, whose clock
    // decides, sees it over (polling `raise` would count suppressed alerts).
    let sql = env.sql().await;
    eventually(
        "the alert window to pass",
        Duration::from_secs(10),
        || async {
            let row = sql
                .query_one(
                    "SELECT last_sent_at < now() - make_interval(secs => $2)
                   FROM alerts_sent WHERE subject = $1",
                    &[&outage.subject, &window.as_secs_f64()],
                )
                .await
                .expect("alerts_sent row of the subject");
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
    let after = bounded("raise", workers[0].raise(&outage)).await;
    assert_eq!(
        after.unwrap(),
        AlertOutcome::Sent {
            suppressed_before: 4
        }
    );
    let posted = sink.bodies("/alerts");
    assert_eq!(posted.len(), 3, "{posted:#?}");
    assert_eq!(posted[2]["subject"], "breaker open: reviewer");
    assert_eq!(posted[2]["suppressed_before"], 4);
    let row = sql
        .query_one(
            "SELECT suppressed FROM alerts_sent WHERE subject = $1",
            &[&outage.subject],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        0,
        "the count restarts with the new window"
    );
}

/// A Slack-compatible webhook receives `{"text": …}`: one paragraph naming the subject.
#[tokio::test]
async fn slack_webhook_receives_one_paragraph_naming_the_subject() {
    let env = TestEnv::new().await;
    let (sink, url) = HttpSink::start().await;
    let config = AlertsConfig {
        slack_webhooks: vec![format!("{url}/slack")],
        ..AlertsConfig::default()
    };
    let alerter = Alerter::new(config, env.store.clone());
    let outcome = bounded("raise", alerter.raise(&alert("breaker open: writer"))).await;
    assert_eq!(
        outcome.unwrap(),
        AlertOutcome::Sent {
            suppressed_before: 0
        }
    );
    let bodies = sink.bodies("/slack");
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    let object = bodies[0].as_object().expect("a JSON object");
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["text"],
        "{:#}",
        bodies[0]
    );
    let text = object["text"].as_str().expect("text is a string");
    assert!(
        text.starts_with("[CRITICAL] breaker open: writer — "),
        "{text}"
    );
    assert!(
        text.contains("3 consecutive failures on breaker open: writer."),
        "{text}"
    );
    assert!(!text.contains('\n'), "one paragraph: {text}");
}

/// An e-mail alert reaches the SMTP server from the configured sender, to every
/// configured recipient, with the alert's subject.
#[tokio::test]
async fn email_alert_reaches_the_smtp_server_from_and_to_the_configured_addresses() {
    let env = TestEnv::new().await;
    let (port, mails) = start_smtp_sink().await;
    let config = AlertsConfig {
        email: Some(EmailConfig {
            smtp: format!("smtp://127.0.0.1:{port}"),
            from: "dagq@example.org".into(),
            to: vec!["ops@example.org".into(), "oncall@example.org".into()],
        }),
        ..AlertsConfig::default()
    };
    let alerter = Alerter::new(config, env.store.clone());
    let outcome = bounded("raise", alerter.raise(&alert("dead letters: code-review"))).await;
    assert_eq!(
        outcome.unwrap(),
        AlertOutcome::Sent {
            suppressed_before: 0
        }
    );
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert_eq!(mail.mail_from, "<dagq@example.org>");
    assert_eq!(mail.rcpt_to, ["<ops@example.org>", "<oncall@example.org>"]);
    assert_eq!(mail.header("From").as_deref(), Some("dagq@example.org"));
    assert_eq!(
        mail.header("To").as_deref(),
        Some("ops@example.org, oncall@example.org")
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("[dagq critical] dead letters: code-review"),
        "{}",
        mail.data
    );
    assert!(
        mail.data
            .contains("3 consecutive failures on dead letters: code-review"),
        "{}",
        mail.data
    );
}

/// Two workers opening an incident for one subject at once create one row, posted once
/// to the incident webhook, whose ticket id is stored; once resolved, a new one opens.
#[tokio::test]
async fn concurrent_workers_open_one_incident_per_subject_and_post_it_once() {
    let env = TestEnv::new().await;
    let (sink, url) = HttpSink::start().await;
    let config = AlertsConfig {
        incident_webhook: Some(format!("{url}/incidents")),
        ..AlertsConfig::default()
    };
    let first = Alerter::new(config.clone(), env.store.clone());
    let second = other_worker(&env, config).await;
    let subject = "breaker open: reviewer";
    let detail = "3 consecutive failures: HTTP 503";
    let (a, b) = bounded("two concurrent open_incident", async {
        tokio::join!(
            first.open_incident(subject, Some("reviewer"), detail),
            second.open_incident(subject, Some("reviewer"), detail),
        )
    })
    .await;
    let opened: Vec<uuid::Uuid> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(opened.len(), 1, "exactly one of two workers opens it");
    let id = opened[0];

    let sql = env.sql().await;
    let rows = sql
        .query(
            "SELECT id, subject, profile, detail, external_ref, resolved_at IS NULL FROM incidents",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "incident rows");
    let row = &rows[0];
    assert_eq!(row.get::<_, uuid::Uuid>(0), id);
    assert_eq!(row.get::<_, &str>(1), subject);
    assert_eq!(row.get::<_, Option<&str>>(2), Some("reviewer"));
    assert_eq!(row.get::<_, Option<&str>>(3), Some(detail));
    assert_eq!(row.get::<_, Option<&str>>(4), Some("TICKET-1"));
    assert!(row.get::<_, bool>(5), "the incident is open");
    let posted = sink.bodies("/incidents");
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert_eq!(posted[0]["id"], id.to_string());
    assert_eq!(posted[0]["subject"], subject);
    assert_eq!(posted[0]["profile"], "reviewer");
    assert_eq!(posted[0]["detail"], detail);
    assert_eq!(posted[0]["source"], "dagq");

    assert!(
        bounded("resolve", first.resolve_incident(subject))
            .await
            .unwrap()
    );
    assert!(
        !bounded("resolve", second.resolve_incident(subject))
            .await
            .unwrap(),
        "nothing left to resolve"
    );
    let reopened = bounded("open", second.open_incident(subject, None, "again")).await;
    let reopened = reopened
        .unwrap()
        .expect("a new incident opens once resolved");
    assert_ne!(reopened, id);
    let open: Vec<(uuid::Uuid, Option<String>)> = sql
        .query(
            "SELECT id, external_ref FROM incidents WHERE resolved_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(open, [(reopened, Some("TICKET-2".to_owned()))]);
    assert_eq!(env.count("SELECT count(*) FROM incidents").await, 2);
}

/// A webhook and an SMTP server that refuse connections don't keep the alert from the
/// webhook and Slack sinks that are up.
#[tokio::test]
async fn a_notifier_that_is_down_does_not_stop_the_others() {
    let env = TestEnv::new().await;
    let (sink, url) = HttpSink::start().await;
    let dead = closed_port().await;
    let config = AlertsConfig {
        webhooks: vec![
            format!("http://127.0.0.1:{dead}/alerts"),
            format!("{url}/alerts"),
        ],
        slack_webhooks: vec![format!("{url}/slack")],
        email: Some(EmailConfig {
            smtp: format!("smtp://127.0.0.1:{dead}"),
            from: "dagq@example.org".into(),
            to: vec!["ops@example.org".into()],
        }),
        ..AlertsConfig::default()
    };
    let alerter = Alerter::new(config, env.store.clone());
    let outcome = bounded("raise", alerter.raise(&alert("breaker open: reviewer"))).await;
    assert_eq!(
        outcome.unwrap(),
        AlertOutcome::Sent {
            suppressed_before: 0
        }
    );
    assert_eq!(sink.bodies("/alerts").len(), 1, "the webhook that is up");
    assert_eq!(sink.bodies("/slack").len(), 1, "the Slack webhook");
}

/// When every notifier is down, `raise` says so (not retryable), and the window still
/// holds: the next alert of the subject is counted, not sent.
#[tokio::test]
async fn alert_that_reaches_no_notifier_is_an_error_and_keeps_its_window() {
    let env = TestEnv::new().await;
    let dead = closed_port().await;
    let config = AlertsConfig {
        webhooks: vec![format!("http://127.0.0.1:{dead}/alerts")],
        slack_webhooks: vec![format!("http://127.0.0.1:{dead}/slack")],
        ..AlertsConfig::default()
    };
    let alerter = Alerter::new(config, env.store.clone());
    let outage = alert("breaker open: reviewer");
    let error = bounded("raise", alerter.raise(&outage)).await.unwrap_err();
    assert!(
        matches!(&error, AlertError::Undelivered { notifiers: 2, .. }),
        "{error}"
    );
    assert!(!error.is_retryable());
    let again = bounded("raise", alerter.raise(&outage)).await.unwrap();
    assert_eq!(again, AlertOutcome::Suppressed);
    let suppressed = env
        .count(
            "SELECT suppressed::bigint FROM alerts_sent WHERE subject = 'breaker open: reviewer'",
        )
        .await;
    assert_eq!(suppressed, 1);
}

/// An incident webhook that is down doesn't prevent the incident: the row is open,
/// without a ticket reference.
#[tokio::test]
async fn incident_opens_without_a_ticket_when_its_webhook_is_down() {
    let env = TestEnv::new().await;
    let dead = closed_port().await;
    let config = AlertsConfig {
        incident_webhook: Some(format!("http://127.0.0.1:{dead}/incidents")),
        ..AlertsConfig::default()
    };
    let alerter = Alerter::new(config, env.store.clone());
    let opened = bounded(
        "open",
        alerter.open_incident("breaker open: writer", None, "down"),
    );
    let id = opened.await.unwrap().expect("the incident opens");
    let sql = env.sql().await;
    let row = sql
        .query_one(
            "SELECT external_ref, resolved_at IS NULL FROM incidents WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), None);
    assert!(row.get::<_, bool>(1));
}
