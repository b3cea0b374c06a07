//! What an alert looks like on each channel: the generic webhook's JSON, one paragraph
//! for Slack-compatible chats, an e-mail's subject and body.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::Alert;

/// How much of an alert's details a one-paragraph text carries.
const INLINE_DETAILS_CHARS: usize = 500;

/// An alert as it goes out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Notice<'a> {
    pub(super) alert: &'a Alert,
    /// Alerts of the same subject swallowed since the previous one sent.
    pub(super) suppressed_before: i32,
    /// When its window started, by the database clock.
    pub(super) sent_at: DateTime<Utc>,
}

/// The generic webhook's JSON.
pub(super) fn webhook_payload(notice: &Notice<'_>) -> Value {
    let alert = notice.alert;
    json!({
        "subject": alert.subject,
        "severity": alert.severity,
        "summary": alert.summary,
        "details": alert.details,
        "suppressed_before": notice.suppressed_before,
        "sent_at": notice.sent_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "source": "dagq",
    })
}

/// One paragraph for a chat channel, escaped as Slack's `text` requires.
pub(super) fn slack_text(notice: &Notice<'_>) -> String {
    let alert = notice.alert;
    let mut text = format!(
        "[{}] {} — {}",
        alert.severity.as_str().to_uppercase(),
        alert.subject,
        alert.summary.trim()
    );
    end_sentence(&mut text);
    if let Some(line) = suppressed_sentence(notice.suppressed_before) {
        let _ = write!(text, " {line}");
    }
    if let Some(details) = inline_details(&alert.details) {
        let _ = write!(text, " Details: {details}");
        end_sentence(&mut text);
    }
    let _ = write!(
        text,
        " (dagq, {})",
        notice.sent_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    escape_slack(&text)
}

/// The e-mail's subject line: severity first, so that inbox rules can sort on it.
pub(super) fn email_subject(notice: &Notice<'_>) -> String {
    // Header lines end at a line break: a subject with one would be cut.
    let subject: String = notice
        .alert
        .subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("[dagq {}] {subject}", notice.alert.severity)
}

/// The e-mail's plain-text body: the summary, then the facts, then the full details.
pub(super) fn email_body(notice: &Notice<'_>) -> String {
    let alert = notice.alert;
    let mut body = format!("{}\n\n", alert.summary.trim());
    let _ = writeln!(body, "Subject:  {}", alert.subject);
    let _ = writeln!(body, "Severity: {}", alert.severity);
    let _ = writeln!(
        body,
        "Sent at:  {}",
        notice
            .sent_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    if let Some(line) = suppressed_sentence(notice.suppressed_before) {
        let _ = writeln!(body, "\n{line}");
    }
    if !matches!(&alert.details, Value::Null) {
        let details =
            serde_json::to_string_pretty(&alert.details).expect("a JSON value always serializes");
        let _ = writeln!(body, "\nDetails:\n{details}");
    }
    body.push_str("\n-- \nSent by dagq.\n");
    body
}

/// "4 similar alerts were suppressed since the last one.", or nothing for none.
pub(super) fn suppressed_sentence(suppressed_before: i32) -> Option<String> {
    match suppressed_before {
        n if n <= 0 => None,
        1 => Some("1 similar alert was suppressed since the last one.".into()),
        n => Some(format!(
            "{n} similar alerts were suppressed since the last one."
        )),
    }
}

/// Details on one line: `key: value` pairs for an object, compact JSON otherwise,
/// shortened to a few hundred characters; nothing for `null` or `{}`.
fn inline_details(details: &Value) -> Option<String> {
    let text = match details {
        Value::Null => return None,
        Value::Object(map) if map.is_empty() => return None,
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| match value {
                Value::String(s) => format!("{key}: {s}"),
                other => format!("{key}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut chars = text.chars();
    let mut short: String = chars.by_ref().take(INLINE_DETAILS_CHARS).collect();
    if chars.next().is_some() {
        short.push('…');
    }
    Some(short)
}

fn end_sentence(text: &mut String) {
    if !text.ends_with(['.', '!', '?', '…']) {
        text.push('.');
    }
}

/// Slack reads `&`, `<` and `>` as markup (links, mentions): they must be escaped.
fn escape_slack(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The ticket id in an incident webhook's answer: its `id`, string or number.
pub(super) fn external_ref(answer: &Value) -> Option<String> {
    match answer.get("id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Severity;

    fn alert(details: Value) -> Alert {
        Alert {
            subject: "breaker open: reviewer".into(),
            severity: Severity::Critical,
            summary: "3 consecutive failures; tasks of reviewer are paused".into(),
            details,
        }
    }

    fn notice(alert: &Alert, suppressed_before: i32) -> Notice<'_> {
        Notice {
            alert,
            suppressed_before,
            sent_at: "2025-03-01T12:30:05.250Z".parse().unwrap(),
        }
    }

    #[test]
    fn webhook_payload_carries_every_field() {
        let alert = alert(json!({"profile": "reviewer"}));
        assert_eq!(
            webhook_payload(&notice(&alert, 4)),
            json!({
                "subject": "breaker open: reviewer",
                "severity": "critical",
                "summary": "3 consecutive failures; tasks of reviewer are paused",
                "details": {"profile": "reviewer"},
                "suppressed_before": 4,
                "sent_at": "2025-03-01T12:30:05.250Z",
                "source": "dagq",
            })
        );
    }

    #[test]
    fn slack_text_is_one_readable_paragraph() {
        let alert = alert(json!({"failures": 3, "profile": "reviewer"}));
        assert_eq!(
            slack_text(&notice(&alert, 4)),
            "[CRITICAL] breaker open: reviewer — 3 consecutive failures; tasks of reviewer \
             are paused. 4 similar alerts were suppressed since the last one. Details: \
             failures: 3, profile: reviewer. (dagq, 2025-03-01 12:30:05 UTC)"
        );
    }

    #[test]
    fn slack_text_without_suppressed_alerts_or_details_stays_short() {
        let alert = alert(Value::Null);
        assert_eq!(
            slack_text(&notice(&alert, 0)),
            "[CRITICAL] breaker open: reviewer — 3 consecutive failures; tasks of reviewer \
             are paused. (dagq, 2025-03-01 12:30:05 UTC)"
        );
    }

    #[test]
    fn slack_markup_characters_are_escaped() {
        let mut alert = alert(json!({"error": "<html> & more"}));
        alert.subject = "dead letter: <run>".into();
        let text = slack_text(&notice(&alert, 1));
        assert!(text.contains("dead letter: &lt;run&gt;"), "{text}");
        assert!(text.contains("error: &lt;html&gt; &amp; more"), "{text}");
        assert!(text.contains("1 similar alert was suppressed"), "{text}");
    }

    #[test]
    fn long_details_are_shortened() {
        let details = json!({"body": "x".repeat(2_000)});
        let inline = inline_details(&details).unwrap();
        assert_eq!(inline.chars().count(), INLINE_DETAILS_CHARS + 1);
        assert!(inline.ends_with('…'));
        assert_eq!(inline_details(&json!({})), None);
        assert_eq!(inline_details(&json!([1, 2])).as_deref(), Some("[1,2]"));
    }

    #[test]
    fn email_names_severity_and_subject_and_carries_the_details() {
        let mut alert = alert(json!({"profile": "reviewer"}));
        assert_eq!(
            email_subject(&notice(&alert, 0)),
            "[dagq critical] breaker open: reviewer"
        );
        let body = email_body(&notice(&alert, 2));
        assert!(body.starts_with("3 consecutive failures"), "{body}");
        assert!(body.contains("Severity: critical\n"), "{body}");
        assert!(body.contains("Sent at:  2025-03-01T12:30:05Z\n"), "{body}");
        assert!(body.contains("2 similar alerts were suppressed"), "{body}");
        assert!(body.contains("\"profile\": \"reviewer\""), "{body}");
        alert.subject = "line\r\nBcc: someone@example.org".into();
        assert!(!email_subject(&notice(&alert, 0)).contains('\n'));
    }

    #[test]
    fn ticket_ids_are_read_as_strings_or_numbers() {
        assert_eq!(
            external_ref(&json!({"id": "INC-7"})).as_deref(),
            Some("INC-7")
        );
        assert_eq!(external_ref(&json!({"id": 42})).as_deref(), Some("42"));
        assert_eq!(external_ref(&json!({"id": ""})), None);
        assert_eq!(external_ref(&json!({"ticket": "x"})), None);
        assert_eq!(external_ref(&json!("ok")), None);
    }
}
