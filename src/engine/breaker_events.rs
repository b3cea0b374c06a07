//! What happens when a profile's circuit breaker opens or closes: every worker hears it
//! at once on the control exchange (and pauses or resumes the profile's queue), and
//! operators get an alert and an incident. (The `dagq_breaker_open` gauge is exported
//! from the `breakers` table by the elected backlog poller, whichever worker saw it.)

use serde_json::json;

use super::Engine;
use crate::adapter::BreakerEvent;
use crate::alert::{Alert, Severity};
use crate::store::DeadLetterRow;

impl Engine {
    /// Spreads breaker changes caused by one task's calls.
    pub(super) async fn on_breaker_events(&self, events: &[BreakerEvent]) {
        for event in events {
            let (profile, open) = match event {
                BreakerEvent::Opened {
                    profile,
                    error,
                    failures,
                } => {
                    tracing::error!(%profile, failures, %error, "circuit breaker opened");
                    (profile, true)
                }
                BreakerEvent::Closed { profile } => {
                    tracing::info!(%profile, "circuit breaker closed: the trial call succeeded");
                    (profile, false)
                }
            };
            let body = json!({"breaker": profile, "state": if open { "open" } else { "closed" }});
            if let Err(e) = self
                .publisher
                .publish_control(body.to_string().as_bytes())
                .await
            {
                // Workers also poll the breakers; the message only makes them act sooner.
                tracing::warn!(error = %e, "cannot announce the breaker change");
            }
            self.notify_breaker(event).await;
        }
    }
}

impl Engine {
    /// Alerts and the incident for a breaker change. Alerting trouble is logged, never
    /// allowed to fail the task that caused it.
    async fn notify_breaker(&self, event: &BreakerEvent) {
        let Some(alerter) = &self.alerter else { return };
        let result = match event {
            BreakerEvent::Opened {
                profile,
                error,
                failures,
            } => {
                let subject = breaker_subject(profile);
                let alert = Alert {
                    subject: subject.clone(),
                    severity: Severity::Critical,
                    summary: format!(
                        "Model profile {profile} failed {failures} times in a row; its circuit breaker is open \
                         (tasks go to its fallback, or wait). Last error: {error}"
                    ),
                    details: json!({"profile": profile, "failures": failures, "error": error}),
                };
                let detail = format!("{failures} consecutive failures; last: {error}");
                // The incident is the durable record: open it even when no notifier answers.
                let incident = alerter
                    .open_incident(&subject, Some(profile), &detail)
                    .await
                    .map(|_| ());
                alerter.raise(&alert).await.map(|_| ()).and(incident)
            }
            BreakerEvent::Closed { profile } => {
                let subject = breaker_subject(profile);
                let alert = Alert {
                    subject: format!("breaker closed: {profile}"),
                    severity: Severity::Warning,
                    summary: format!(
                        "Model profile {profile} answered its trial call; its circuit breaker is closed"
                    ),
                    details: json!({"profile": profile}),
                };
                let resolved = alerter.resolve_incident(&subject).await.map(|_| ());
                alerter.raise(&alert).await.map(|_| ()).and(resolved)
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot send the breaker alert");
        }
    }

    /// Alerts operators about a new dead letter.
    pub(super) async fn alert_dead_letter(&self, letter: &DeadLetterRow) {
        let Some(alerter) = &self.alerter else { return };
        let place = match (&letter.run_id, &letter.node_id) {
            (Some(_), Some(node)) => format!("node {node}"),
            _ => letter.source_queue.clone().unwrap_or_else(|| "?".into()),
        };
        let alert = Alert {
            // One subject per reason and place: an outage of one node type sends one alert
            // per window, not one per failed run.
            subject: format!("dead letter: {} on {place}", letter.reason),
            severity: Severity::Warning,
            summary: letter
                .detail
                .clone()
                .unwrap_or_else(|| letter.reason.clone()),
            details: json!({
                "dead_letter": letter.id, "reason": letter.reason, "run_id": letter.run_id,
                "node_id": letter.node_id, "attempt": letter.attempt, "source_queue": letter.source_queue,
            }),
        };
        if let Err(e) = alerter.raise(&alert).await {
            tracing::warn!(error = %e, "cannot send the dead-letter alert");
        }
    }
}

/// The incident and alert subject of a profile's breaker.
pub fn breaker_subject(profile: &str) -> String {
    format!("breaker open: {profile}")
}
