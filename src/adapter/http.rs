//! Generic JSON over HTTP: webhooks, internal services, ticket systems. The node's input
//! gives `url`, optional `method`, `headers` and `body`; a profile with provider `http`
//! adds a base URL, headers and a bearer key.

use reqwest::header::AUTHORIZATION;
use reqwest::{Client, Method};
use serde_json::{Value, json};

use super::http_call::{self, JsonRequest};
use super::{Adapter, AdapterError, Call, Exchange};
use crate::config::ModelProfile;
use crate::workflow::NodeType;

/// Timeout of an `http` node without a profile (the node's own `timeout` still bounds it).
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The generic HTTP adapter, with or without a profile.
#[derive(Debug, Clone)]
pub struct HttpAdapter {
    client: Client,
    profile: Option<ModelProfile>,
}

impl HttpAdapter {
    /// An adapter using `profile`'s base URL, headers and key when given.
    pub fn new(client: Client, profile: Option<ModelProfile>) -> Self {
        HttpAdapter { client, profile }
    }

    fn request(&self, call: &Call<'_>) -> Result<JsonRequest, AdapterError> {
        let input = &call.input;
        let url = input
            .get("url")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                AdapterError::InvalidInput("http input needs \"url\": a string".into())
            })?;
        let url = match (
            &self.profile,
            url.starts_with("http://") || url.starts_with("https://"),
        ) {
            (_, true) => url.to_owned(),
            (
                Some(ModelProfile {
                    base_url: Some(base),
                    ..
                }),
                false,
            ) => http_call::join_url(base, url),
            (_, false) => {
                return Err(AdapterError::InvalidInput(format!(
                    "http url {url:?} must start with http:// or https:// (or set base_url on the profile)"
                )));
            }
        };
        let body = input.get("body").cloned();
        let method = match input.get("method").and_then(Value::as_str) {
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                AdapterError::InvalidInput(format!("http method {m:?} is not valid"))
            })?,
            None if body.is_some() => Method::POST,
            None => Method::GET,
        };
        let mut headers = http_call::base_headers(self.profile.as_ref(), &call.idempotency_key())?;
        if let Some(extra) = input.get("headers") {
            let extra = extra.as_object().ok_or_else(|| {
                AdapterError::InvalidInput("http \"headers\" must be an object of strings".into())
            })?;
            for (name, value) in extra {
                let value = value.as_str().ok_or_else(|| {
                    AdapterError::InvalidInput(format!("http header {name} must be a string"))
                })?;
                http_call::insert_header(&mut headers, name, value)?;
            }
        }
        if let Some(profile) = &self.profile {
            let label = call.node.model.as_deref().unwrap_or("?");
            http_call::insert_key(&mut headers, profile, label, AUTHORIZATION, "Bearer ")?;
        }
        Ok(JsonRequest {
            method,
            url,
            headers,
            body,
            timeout: call.time_left(self.profile.as_ref().map_or(DEFAULT_TIMEOUT, |p| p.timeout)),
        })
    }
}

impl Adapter for HttpAdapter {
    async fn call(
        &self,
        kind: NodeType,
        call: &Call<'_>,
        exchange: &mut Exchange,
    ) -> Result<Value, AdapterError> {
        if kind != NodeType::Http {
            return Err(AdapterError::Unsupported(format!(
                "provider http does not serve node type {}",
                kind.as_str()
            )));
        }
        let request = self.request(call)?;
        exchange.request =
            json!({"method": request.method.as_str(), "url": request.url, "body": request.body});
        let body = http_call::send_recorded(&self.client, request, exchange).await?;
        Ok(json!({"status": exchange.http_status, "body": body}))
    }
}
