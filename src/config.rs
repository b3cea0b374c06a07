//! Settings: defaults, then the `dagq.toml` file, then `DAGQ_*` environment variables,
//! validated once into the values the rest of dagq uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default broker address: the local RabbitMQ with the guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default database: created on first use when missing.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dagq";
/// Default namespace that prefixes every exchange and queue.
pub const DEFAULT_NAMESPACE: &str = "dagq";

/// A problem with the settings, naming the setting and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Everything a dagq process needs to know about its surroundings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// RabbitMQ address (`DAGQ_AMQP_URL`).
    pub amqp_url: String,
    /// Postgres address (`DAGQ_DATABASE_URL`).
    pub database_url: String,
    /// Prefix of every exchange and queue (`DAGQ_NAMESPACE`).
    pub namespace: String,
    /// The parsed configuration file, or its defaults when there is none.
    pub file: FileConfig,
}

/// The `dagq.toml` file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Model profiles by name: `[models.<profile>]`.
    #[serde(default)]
    pub models: BTreeMap<String, ModelProfile>,
    /// Circuit-breaker settings shared by every profile.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Where alerts and incidents are sent.
    #[serde(default)]
    pub alerts: AlertsConfig,
}

/// Which API a model profile speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI and every OpenAI-compatible server (vLLM, Ollama, llama.cpp, …).
    Openai,
    /// Anthropic's messages API.
    Anthropic,
    /// A generic JSON call.
    Http,
}

impl Provider {
    /// The name used in tables, metrics and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Http => "http",
        }
    }
}

/// One `[models.<profile>]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    /// The API this profile speaks.
    pub provider: Provider,
    /// Base URL as the provider's own SDK takes it (OpenAI's ends in `/v1`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The provider's model name.
    #[serde(default)]
    pub model: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// How long one call may take.
    #[serde(default = "default_model_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Profiles tried in order when this one fails retryably.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Extra headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Default request parameters (e.g. `temperature`), overridden by the node's input.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Price per 1000 prompt tokens, for cost accounting.
    #[serde(default)]
    pub price_per_1k_prompt: Option<f64>,
    /// Price per 1000 completion tokens, for cost accounting.
    #[serde(default)]
    pub price_per_1k_completion: Option<f64>,
}

fn default_model_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[breaker]`: when a profile's circuit opens and how long it stays open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    #[serde(default = "default_breaker_threshold")]
    pub threshold: u32,
    /// How long an open breaker waits before one trial call.
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: default_breaker_threshold(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

fn default_breaker_threshold() -> u32 {
    3
}

fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// `[alerts]`: notifier destinations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Generic JSON webhooks.
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Slack-compatible incoming webhooks.
    #[serde(default)]
    pub slack_webhooks: Vec<String>,
    /// E-mail over SMTP.
    #[serde(default)]
    pub email: Option<EmailConfig>,
    /// Where incidents are posted (e.g. a ticket system).
    #[serde(default)]
    pub incident_webhook: Option<String>,
    /// At most one alert per subject within this window; the rest are counted and
    /// reported with the next one.
    #[serde(default = "default_alert_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_alert_window() -> Duration {
    Duration::from_secs(300)
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            slack_webhooks: Vec::new(),
            email: None,
            incident_webhook: None,
            window: default_alert_window(),
        }
    }
}

/// `[alerts.email]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// SMTP server, e.g. `smtp://127.0.0.1:2525`.
    pub smtp: String,
    /// Sender address.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
}

impl Settings {
    /// Loads settings from the environment and the config file it names (`DAGQ_CONFIG`, or
    /// `dagq.toml` in the working directory when present).
    pub fn load() -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let file = match env("DAGQ_CONFIG") {
            Some(path) => FileConfig::read(Path::new(&path))?,
            None if Path::new("dagq.toml").exists() => FileConfig::read(Path::new("dagq.toml"))?,
            None => FileConfig::default(),
        };
        let settings = Settings {
            amqp_url: env("DAGQ_AMQP_URL").unwrap_or_else(|| DEFAULT_AMQP_URL.into()),
            database_url: env("DAGQ_DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            namespace: env("DAGQ_NAMESPACE").unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            file,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that would otherwise fail late and obscurely.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_namespace(&self.namespace)?;
        self.file.validate()
    }
}

/// A namespace becomes part of queue names: keep it to characters every tool accepts.
pub fn validate_namespace(namespace: &str) -> Result<(), ConfigError> {
    let ok = !namespace.is_empty()
        && namespace.len() <= 64
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "DAGQ_NAMESPACE {namespace:?} is not usable: use 1-64 letters, digits, '-' or '_'"
        )))
    }
}

impl FileConfig {
    /// Reads and validates one configuration file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text (the contents of a `dagq.toml`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    /// Cross-field checks: fallbacks name existing profiles, URLs are present where needed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, profile) in &self.models {
            for fallback in &profile.fallback {
                if fallback == name {
                    return Err(ConfigError::Invalid(format!(
                        "models.{name}.fallback names the profile itself; remove \"{fallback}\""
                    )));
                }
                if !self.models.contains_key(fallback) {
                    return Err(ConfigError::Invalid(format!(
                        "models.{name}.fallback names unknown profile \"{fallback}\"; add [models.{fallback}] or remove it"
                    )));
                }
            }
            if profile.provider != Provider::Http && profile.base_url.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "models.{name}.base_url is missing; set it to the provider's API address, e.g. \"http://127.0.0.1:8089/v1\""
                )));
            }
            if profile.provider != Provider::Http && profile.model.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "models.{name}.model is missing; set it to the provider's model name"
                )));
            }
        }
        if self.breaker.threshold == 0 {
            return Err(ConfigError::Invalid(
                "breaker.threshold must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fallback_is_named() {
        let err = FileConfig::parse(
            "[models.a]\nprovider = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\nfallback = [\"b\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown profile \"b\""), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = FileConfig::parse("[breaker]\nthreshhold = 3\n").unwrap_err();
        assert!(err.to_string().contains("threshhold"), "{err}");
    }

    #[test]
    fn namespace_rejects_dots_and_spaces() {
        assert!(validate_namespace("dagq").is_ok());
        assert!(validate_namespace("a b").is_err());
        assert!(validate_namespace("").is_err());
    }
}
