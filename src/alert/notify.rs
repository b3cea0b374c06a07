//! The notifiers: generic JSON webhooks, Slack-compatible webhooks and e-mail, sent to
//! concurrently, each bounded by a timeout; one failing is logged and the others go on.
//! The incident webhook is posted to here as well.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{Value, json};

use super::email::Mailer;
use super::incidents::OpenedIncident;
use super::render::{Notice, external_ref, slack_text, webhook_payload};
use crate::config::AlertsConfig;

/// The longest one notifier may take, connection included.
pub(super) const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How many notifiers were tried and how many took the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Delivery {
    pub(super) attempted: usize,
    pub(super) delivered: usize,
}

/// Every configured destination, built once.
pub(super) struct Notifiers {
    http: reqwest::Client,
    webhooks: Vec<String>,
    slack_webhooks: Vec<String>,
    /// The mailer, or why the `[alerts.email]` settings cannot work.
    email: Option<Result<Mailer, String>>,
}

type Pending<'a> = Pin<Box<dyn Future<Output = (String, Result<(), String>)> + Send + 'a>>;

impl Notifiers {
    pub(super) fn new(config: &AlertsConfig) -> Self {
        let email = config.email.as_ref().map(|email| {
            Mailer::from_config(email).inspect_err(|e| {
                tracing::error!(error = %e, "e-mail alerts cannot be sent; fix [alerts.email]");
            })
        });
        Notifiers {
            http: reqwest::Client::builder()
                .connect_timeout(SEND_TIMEOUT)
                .build()
                .expect("a client with these settings always builds"),
            webhooks: config.webhooks.clone(),
            slack_webhooks: config.slack_webhooks.clone(),
            email,
        }
    }

    /// Sends `notice` to every notifier at once and logs each failure.
    pub(super) async fn send_all(&self, notice: &Notice<'_>) -> Delivery {
        let payload = webhook_payload(notice);
        let slack = json!({ "text": slack_text(notice) });
        let mut sends: Vec<Pending<'_>> = Vec::new();
        for url in &self.webhooks {
            let label = format!("webhook {}", redact_url(url));
            let payload = &payload;
            sends.push(Box::pin(async move {
                (label, self.post_json(url, payload).await.map(drop))
            }));
        }
        for url in &self.slack_webhooks {
            let label = format!("Slack webhook {}", redact_url(url));
            let slack = &slack;
            sends.push(Box::pin(async move {
                (label, self.post_json(url, slack).await.map(drop))
            }));
        }
        match &self.email {
            None => {}
            Some(Ok(mailer)) => sends.push(Box::pin(async move {
                let sent = tokio::time::timeout(SEND_TIMEOUT, mailer.send(notice))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {SEND_TIMEOUT:?}")));
                (mailer.label(), sent)
            })),
            Some(Err(e)) => {
                let failure = (String::from("e-mail"), Err(e.clone()));
                sends.push(Box::pin(std::future::ready(failure)));
            }
        }
        let attempted = sends.len();
        let mut delivered = 0;
        for (notifier, result) in futures::future::join_all(sends).await {
            match result {
                Ok(()) => delivered += 1,
                Err(error) => tracing::warn!(
                    %notifier,
                    subject = %notice.alert.subject,
                    %error,
                    "alert notifier failed"
                ),
            }
        }
        Delivery {
            attempted,
            delivered,
        }
    }

    /// Posts a new incident to the incident webhook; returns the ticket id it answered.
    pub(super) async fn post_incident(
        &self,
        url: &str,
        incident: &OpenedIncident,
    ) -> Option<String> {
        let mut body = serde_json::to_value(incident).expect("an incident serializes");
        body["source"] = json!("dagq");
        match self.post_json(url, &body).await {
            Ok(answer) => answer.as_ref().and_then(external_ref),
            Err(error) => {
                tracing::warn!(
                    webhook = %redact_url(url),
                    subject = %incident.subject,
                    %error,
                    "incident webhook failed; the incident stays open without a ticket"
                );
                None
            }
        }
    }

    /// POSTs `body`; a 2xx answer is success, with its body when it is JSON.
    async fn post_json(&self, url: &str, body: &Value) -> Result<Option<Value>, String> {
        let response = self
            .http
            .post(url)
            .json(body)
            .timeout(SEND_TIMEOUT)
            .send()
            .await
            // The URL may carry a token (Slack's do): keep it out of the message.
            .map_err(|e| error_chain(&e.without_url()))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| error_chain(&e.without_url()))?;
        if !status.is_success() {
            let start: String = text.chars().take(200).collect();
            return Err(format!("HTTP {status}: {start}"));
        }
        Ok(serde_json::from_str(&text).ok())
    }
}

/// The error and its causes ("connection refused" is usually in a source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}

/// Whether every destination in `config` can work; the message names the one that can't.
pub(super) fn check_config(config: &AlertsConfig) -> Result<(), String> {
    let urls = config
        .webhooks
        .iter()
        .map(|url| ("webhooks", url))
        .chain(
            config
                .slack_webhooks
                .iter()
                .map(|url| ("slack_webhooks", url)),
        )
        .chain(
            config
                .incident_webhook
                .iter()
                .map(|url| ("incident_webhook", url)),
        );
    for (key, url) in urls {
        let usable = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !usable {
            return Err(format!(
                "{key}: {} is not an http:// or https:// URL",
                redact_url(url)
            ));
        }
    }
    match &config.email {
        Some(email) => Mailer::from_config(email).map(drop),
        None => Ok(()),
    }
}

/// Scheme, host and port of `url`: paths, queries and user info may hold secrets.
pub(super) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}", parsed.scheme()),
            (None, _) => format!("{}:…", parsed.scheme()),
        },
        Err(_) => String::from("(a value that is not a URL)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_keep_only_scheme_host_and_port() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/secret"),
            "https://hooks.slack.com"
        );
        assert_eq!(
            redact_url("smtps://user:pw@mail.example.org:465"),
            "smtps://mail.example.org:465"
        );
        assert_eq!(redact_url("not a url"), "(a value that is not a URL)");
    }

    #[test]
    fn unusable_destinations_are_named() {
        let config = AlertsConfig {
            webhooks: vec!["http://127.0.0.1:9099/alerts".into()],
            slack_webhooks: vec!["hooks.slack.com/services/T0".into()],
            ..AlertsConfig::default()
        };
        let error = check_config(&config).unwrap_err();
        assert!(error.starts_with("slack_webhooks:"), "{error}");
        assert!(check_config(&AlertsConfig::default()).is_ok());
    }
}
