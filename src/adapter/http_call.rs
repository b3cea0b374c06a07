//! JSON over HTTP with the classification every provider shares: connect errors and
//! timeouts, 408, 429 and 5xx are retryable (with `Retry-After` carried), other 4xx are
//! terminal with the provider's own error message kept.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Method};
use serde_json::Value;

use super::{AdapterError, Exchange};
use crate::config::ModelProfile;

/// The HTTP client every adapter shares, so that connections are pooled per host.
pub(super) fn client() -> Client {
    Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("a client with these settings always builds")
}

/// One JSON request.
#[derive(Debug)]
pub(super) struct JsonRequest {
    pub(super) method: Method,
    pub(super) url: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<Value>,
    pub(super) timeout: Duration,
}

/// The answer: HTTP status (when one came back) and the body, JSON when it parses, else
/// a JSON string of the text.
#[derive(Debug)]
pub(super) struct JsonResponse {
    pub(super) status: Option<u16>,
    pub(super) body: Option<Value>,
    pub(super) result: Result<(), AdapterError>,
}

/// Sends the request and classifies the outcome.
pub(super) async fn send(client: &Client, request: JsonRequest) -> JsonResponse {
    let mut builder = client
        .request(request.method, &request.url)
        .headers(request.headers)
        .timeout(request.timeout);
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    let response = match builder.send().await {
        Ok(response) => response,
        Err(e) => {
            return JsonResponse {
                status: None,
                body: None,
                result: Err(transport_error(&request.url, request.timeout, &e)),
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) => {
            return JsonResponse {
                status: Some(status),
                body: None,
                result: Err(transport_error(&request.url, request.timeout, &e)),
            };
        }
    };
    let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
    let result = if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(AdapterError::Status {
            status,
            message: error_message(&body),
            retry_after,
        })
    };
    JsonResponse {
        status: Some(status),
        body: Some(body),
        result,
    }
}

fn transport_error(url: &str, timeout: Duration, e: &reqwest::Error) -> AdapterError {
    if e.is_timeout() {
        AdapterError::Timeout(timeout)
    } else {
        // Connect failures and connections broken mid-answer are both worth retrying.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(inner) = source {
            message = format!("{message}: {inner}");
            source = inner.source();
        }
        AdapterError::Connect {
            url: url.to_owned(),
            message,
        }
    }
}

/// The provider's own error message: OpenAI's and Anthropic's `error.message`, a plain
/// `message` or `detail`, or the start of the body.
fn error_message(body: &Value) -> String {
    let found = body
        .pointer("/error/message")
        .or_else(|| body.get("message"))
        .or_else(|| body.get("detail"))
        .or_else(|| body.get("error"));
    match found {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => {
            let text = match body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.chars().take(500).collect()
        }
    }
}

/// `Retry-After` as seconds or as an HTTP date.
pub(super) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// Headers every provider call carries: JSON, the idempotency key and the profile's
/// extra headers. Credentials are added by the provider, never logged.
pub(super) fn base_headers(
    profile: Option<&ModelProfile>,
    idempotency_key: &str,
) -> Result<HeaderMap, AdapterError> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "idempotency-key",
        HeaderValue::from_str(idempotency_key)
            .map_err(|e| AdapterError::InvalidInput(e.to_string()))?,
    );
    if let Some(profile) = profile {
        for (name, value) in &profile.headers {
            insert_header(&mut headers, name, value)?;
        }
    }
    Ok(headers)
}

/// Adds one header, naming it when it is not valid.
pub(super) fn insert_header(
    headers: &mut HeaderMap,
    name: &str,
    value: &str,
) -> Result<(), AdapterError> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| AdapterError::InvalidInput(format!("header name {name:?} is not valid")))?;
    let value = HeaderValue::from_str(value).map_err(|_| {
        AdapterError::InvalidInput(format!("header {name} has a value that is not valid"))
    })?;
    headers.insert(header, value);
    Ok(())
}

/// The API key named by the profile's `api_key_env`, if it names one.
pub(super) fn api_key(
    profile: &ModelProfile,
    profile_label: &str,
) -> Result<Option<String>, AdapterError> {
    let Some(var) = &profile.api_key_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(key) if !key.is_empty() => Ok(Some(key)),
        _ => Err(AdapterError::Config(format!(
            "environment variable {var} (api_key_env of profile {profile_label}) is not set"
        ))),
    }
}

/// Adds the profile's API key, when it names one, as header `name` with `prefix`
/// (e.g. `Bearer `), marked sensitive so that it never reaches logs.
pub(super) fn insert_key(
    headers: &mut HeaderMap,
    profile: &ModelProfile,
    profile_label: &str,
    name: HeaderName,
    prefix: &str,
) -> Result<(), AdapterError> {
    let Some(key) = api_key(profile, profile_label)? else {
        return Ok(());
    };
    let mut value = HeaderValue::from_str(&format!("{prefix}{key}"))
        .map_err(|_| AdapterError::Config("the API key is not a valid header value".into()))?;
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(())
}

/// Sends the request, noting the status and body in `exchange` for the audit log;
/// returns the answer's body when the status is a success.
pub(super) async fn send_recorded(
    client: &Client,
    request: JsonRequest,
    exchange: &mut Exchange,
) -> Result<Value, AdapterError> {
    let response = send(client, request).await;
    exchange.http_status = response.status;
    exchange.response = response.body.clone();
    response.result?;
    Ok(response.body.unwrap_or(Value::Null))
}

/// `base` and `path` joined with exactly one slash.
pub(super) fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn provider_error_messages_are_kept() {
        let openai =
            serde_json::json!({"error": {"message": "Rate limit reached", "type": "requests"}});
        assert_eq!(error_message(&openai), "Rate limit reached");
        let anthropic = serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        assert_eq!(error_message(&anthropic), "Overloaded");
        assert_eq!(
            error_message(&Value::String("bad gateway".into())),
            "bad gateway"
        );
    }
}
