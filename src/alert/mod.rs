//! Alerts and incidents: notifiers (JSON webhooks, Slack-compatible webhooks, e-mail)
//! behind a per-subject window shared by every worker through `alerts_sent`, and one open
//! incident per subject in `incidents`, posted to the incident webhook.

mod email;
mod incidents;
mod notify;
mod render;
mod window;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::AlertsConfig;
use crate::store::{Store, StoreError};

use notify::Notifiers;
use render::Notice;

/// Why raising an alert or recording an incident failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The database that deduplicates alerts and holds incidents failed.
    #[error("alerts: {0}")]
    Store(#[from] StoreError),
    /// `[alerts]` names a destination that cannot work.
    #[error("[alerts] configuration: {0}")]
    Config(String),
    /// Every notifier failed (each failure is logged). The window is taken all the same,
    /// so that notifiers that are down do not turn every failure into a send attempt.
    #[error(
        "alert {subject:?} reached none of its {notifiers} notifiers; see the warnings logged for each"
    )]
    Undelivered { subject: String, notifiers: usize },
}

impl AlertError {
    /// Whether calling again can succeed: only when the database was briefly away. An
    /// undelivered alert already took its window, so raising it again is suppressed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AlertError::Store(e) => e.is_retryable(),
            AlertError::Config(_) | AlertError::Undelivered { .. } => false,
        }
    }
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Degraded, but work goes on (e.g. failover to a backup model).
    Warning,
    /// Work has stopped or is being lost (e.g. a profile paused, dead letters).
    Critical,
}

impl Severity {
    /// `warning` or `critical`, as the JSON webhook carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert. `subject` is the deduplication key: alerts with the same subject within
/// the window are counted, not sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// What the alert is about, stable across repeats (e.g. `breaker open: reviewer`).
    pub subject: String,
    /// How urgent it is.
    pub severity: Severity,
    /// One sentence for a human.
    pub summary: String,
    /// Structured context (profile, run, error); `null` when there is none.
    pub details: serde_json::Value,
}

/// What `raise` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertOutcome {
    /// The alert went out; it reported this many alerts of its subject suppressed since
    /// the previous one.
    Sent { suppressed_before: i32 },
    /// An alert with the same subject went out within the window: this one was counted.
    Suppressed,
}

/// Raises alerts and opens incidents. Cheap to clone; every clone shares the HTTP client.
#[derive(Clone)]
pub struct Alerter {
    inner: Arc<Inner>,
}

struct Inner {
    config: AlertsConfig,
    store: Store,
    notifiers: Notifiers,
}

impl fmt::Debug for Alerter {
    /// Webhook URLs (Slack's carry their token) and SMTP credentials are secrets: only
    /// what is configured is shown, not where.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("Alerter")
            .field("webhooks", &config.webhooks.len())
            .field("slack_webhooks", &config.slack_webhooks.len())
            .field("email", &config.email.is_some())
            .field("incident_webhook", &config.incident_webhook.is_some())
            .field("window", &config.window)
            .finish_non_exhaustive()
    }
}

impl Alerter {
    /// An alerter for `config`. A destination that cannot work (an SMTP URL or address
    /// that does not parse) fails each send with a warning; [`Alerter::check_config`]
    /// reports it up front.
    pub fn new(config: AlertsConfig, store: Store) -> Self {
        let notifiers = Notifiers::new(&config);
        Alerter {
            inner: Arc::new(Inner {
                config,
                store,
                notifiers,
            }),
        }
    }

    /// Whether every destination in `config` is usable: HTTP(S) webhook URLs, an
    /// `smtp://` or `smtps://` server, and e-mail addresses that parse.
    pub fn check_config(config: &AlertsConfig) -> Result<(), AlertError> {
        notify::check_config(config).map_err(AlertError::Config)
    }

    /// Sends unless an alert with the same subject went out within `config.window`,
    /// across every worker; a suppressed alert is counted and the next one sent reports
    /// the count. Notifiers are sent to concurrently; one failing is logged and does
    /// not stop the others. With notifiers configured and none of them reached, the
    /// result is [`AlertError::Undelivered`]; with none configured, the alert is only
    /// recorded.
    pub async fn raise(&self, alert: &Alert) -> Result<AlertOutcome, AlertError> {
        let inner = &self.inner;
        let claim = window::claim(&inner.store, &alert.subject, inner.config.window).await?;
        let Some(claim) = claim else {
            tracing::debug!(subject = %alert.subject, "alert suppressed within its window");
            return Ok(AlertOutcome::Suppressed);
        };
        let notice = Notice {
            alert,
            suppressed_before: claim.suppressed_before,
            sent_at: claim.sent_at,
        };
        let delivery = inner.notifiers.send_all(&notice).await;
        if delivery.attempted > 0 && delivery.delivered == 0 {
            return Err(AlertError::Undelivered {
                subject: alert.subject.clone(),
                notifiers: delivery.attempted,
            });
        }
        tracing::info!(
            subject = %alert.subject,
            severity = %alert.severity,
            suppressed_before = claim.suppressed_before,
            delivered = delivery.delivered,
            failed = delivery.attempted - delivery.delivered,
            "alert sent"
        );
        Ok(AlertOutcome::Sent {
            suppressed_before: claim.suppressed_before,
        })
    }

    /// Opens an incident unless one is open for `subject` (the partial unique index makes
    /// this race-free across workers); posts it to `incident_webhook` when configured and
    /// stores the ticket id it answers (`id` of its JSON) in `external_ref`. Returns the
    /// id of the incident opened, `None` when one was already open. A webhook that fails
    /// is logged: the incident stays open without an external reference.
    pub async fn open_incident(
        &self,
        subject: &str,
        profile: Option<&str>,
        detail: &str,
    ) -> Result<Option<uuid::Uuid>, AlertError> {
        let inner = &self.inner;
        let Some(incident) = incidents::insert_open(&inner.store, subject, profile, detail).await?
        else {
            return Ok(None);
        };
        tracing::warn!(%subject, id = %incident.id, "incident opened");
        if let Some(url) = &inner.config.incident_webhook
            && let Some(external_ref) = inner.notifiers.post_incident(url, &incident).await
        {
            incidents::set_external_ref(&inner.store, incident.id, &external_ref).await?;
        }
        Ok(Some(incident.id))
    }

    /// Resolves the open incident of `subject`; false when none was open.
    pub async fn resolve_incident(&self, subject: &str) -> Result<bool, AlertError> {
        let resolved = incidents::resolve(&self.inner.store, subject).await?;
        if resolved {
            tracing::info!(%subject, "incident resolved");
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EmailConfig;

    #[test]
    fn debug_output_hides_webhook_urls_and_smtp_credentials() {
        let config = AlertsConfig {
            slack_webhooks: vec!["https://hooks.slack.com/services/T0/B0/token".into()],
            email: Some(EmailConfig {
                smtp: "smtps://alerts:hunter2@mail.example.org".into(),
                from: "dagq@example.org".into(),
                to: vec!["ops@example.org".into()],
            }),
            ..AlertsConfig::default()
        };
        let store = Store::connect("postgres://postgres@127.0.0.1:5432/dagq", 1).unwrap();
        let shown = format!("{:?}", Alerter::new(config, store));
        assert!(shown.contains("slack_webhooks: 1"), "{shown}");
        for secret in ["token", "hunter2", "hooks.slack.com"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn only_database_outages_are_worth_raising_again() {
        let undelivered = AlertError::Undelivered {
            subject: "s".into(),
            notifiers: 2,
        };
        assert!(!undelivered.is_retryable());
        assert!(!AlertError::Config("x".into()).is_retryable());
        let pool_down = deadpool_postgres::PoolError::Closed;
        assert!(AlertError::Store(StoreError::Pool(pool_down)).is_retryable());
    }
}
