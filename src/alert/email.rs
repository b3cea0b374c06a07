//! E-mail over SMTP with lettre: `smtp://host:port` speaks plain SMTP (a local relay),
//! `smtp://…?tls=required` upgrades with STARTTLS, `smtps://` is implicit TLS; the URL
//! may carry `user:password`.

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::notify::{SEND_TIMEOUT, redact_url};
use super::render::{Notice, email_body, email_subject};
use crate::config::EmailConfig;

/// The SMTP transport and the addresses of `[alerts.email]`, checked once.
pub(super) struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// The server without credentials, for logs.
    server: String,
}

impl Mailer {
    /// Builds the mailer; the message names the setting that cannot work.
    pub(super) fn from_config(config: &EmailConfig) -> Result<Self, String> {
        let server = redact_url(&config.smtp);
        let scheme = config.smtp.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("smtp" | "smtps")) {
            return Err(format!(
                "email.smtp: {server} is not an smtp:// or smtps:// URL"
            ));
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.smtp)
            .map_err(|e| format!("email.smtp: {server}: {e}"))?
            .timeout(Some(SEND_TIMEOUT))
            .build();
        let parse = |key: &str, address: &str| {
            address
                .parse::<Mailbox>()
                .map_err(|e| format!("email.{key}: {address:?} is not an e-mail address ({e})"))
        };
        let from = parse("from", &config.from)?;
        let to = config
            .to
            .iter()
            .map(|address| parse("to", address))
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_empty() {
            return Err("email.to: no recipient".into());
        }
        Ok(Mailer {
            transport,
            from,
            to,
            server,
        })
    }

    /// Names this notifier in logs.
    pub(super) fn label(&self) -> String {
        format!("e-mail via {}", self.server)
    }

    /// Sends `notice` to every recipient in one message.
    pub(super) async fn send(&self, notice: &Notice<'_>) -> Result<(), String> {
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(email_subject(notice))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            message = message.to(to.clone());
        }
        let message = message
            .body(email_body(notice))
            .map_err(|e| format!("cannot build the message: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(smtp: &str, from: &str, to: &[&str]) -> EmailConfig {
        EmailConfig {
            smtp: smtp.into(),
            from: from.into(),
            to: to.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn smtp_and_smtps_urls_with_credentials_are_accepted() {
        for smtp in [
            "smtp://127.0.0.1:2525",
            "smtp://relay.example.org?tls=required",
            "smtps://alerts:s%3Acret@mail.example.org:465",
        ] {
            let mailer =
                Mailer::from_config(&config(smtp, "dagq@example.org", &["ops@example.org"]));
            assert!(mailer.is_ok(), "{smtp}: {:?}", mailer.err());
        }
    }

    #[test]
    fn unusable_email_settings_name_the_key_and_hide_credentials() {
        let error = |c: EmailConfig| Mailer::from_config(&c).err().expect("rejected");
        let bad_scheme = error(config(
            "http://u:pw@127.0.0.1:2525",
            "a@b.org",
            &["c@d.org"],
        ));
        assert!(
            bad_scheme.starts_with("email.smtp: http://127.0.0.1:2525"),
            "{bad_scheme}"
        );
        assert!(!bad_scheme.contains("pw"), "{bad_scheme}");
        let bad_from = error(config("smtp://127.0.0.1", "not an address", &["c@d.org"]));
        assert!(
            bad_from.starts_with("email.from: \"not an address\""),
            "{bad_from}"
        );
        let no_to = error(config("smtp://127.0.0.1", "a@b.org", &[]));
        assert_eq!(no_to, "email.to: no recipient");
    }
}
