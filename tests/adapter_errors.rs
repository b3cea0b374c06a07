//! How the adapter layer classifies failures: connect errors, timeouts, 429 (with
//! `Retry-After`) and 5xx are retryable; 400 and malformed answers are terminal, with the
//! provider's own message kept.

mod support;

use std::time::{Duration, Instant};

use dagq::adapter::AdapterError;
use dagq::config::Provider;
use serde_json::json;
use support::{Reply, failing_chat, json_reply, profile, stub, text_reply};

/// 429 with `Retry-After: 7`, 500 and 503 are retryable; the 429 carries its 7 s and
/// every one keeps the provider's message and is recorded as `http_<status>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_are_retryable_and_carry_retry_after() {
    let server = stub(|seen| match seen.path.as_str() {
        "/limited/chat/completions" => Reply {
            headers: vec![("content-type", "application/json"), ("retry-after", "7")],
            ..json_reply(
                429,
                json!({"error": {"message": "Rate limit reached for gpt-4o-mini",
                                               "type": "requests", "code": "rate_limit_exceeded"}}),
            )
        },
        "/broken/chat/completions" => json_reply(
            500,
            json!({"error": {"message": "The server had an error"}}),
        ),
        _ => text_reply(503, "upstream unavailable"),
    })
    .await;
    let cases = [
        (
            "limited",
            429,
            "Rate limit reached for gpt-4o-mini",
            Some(Duration::from_secs(7)),
        ),
        ("broken", 500, "The server had an error", None),
        ("overloaded", 503, "upstream unavailable", None),
    ];
    for (path, code, text, after) in cases {
        let base = format!("{}/{path}", server.base);
        let (error, record) = failing_chat(profile(Provider::Openai, &base, "m")).await;
        assert!(error.is_retryable(), "{path}: {error:?}");
        assert_eq!(error.retry_after(), after, "{path}");
        let AdapterError::Status {
            status, message, ..
        } = &error
        else {
            panic!("{path}: a status error, not {error:?}")
        };
        assert_eq!((*status, message.as_str()), (code, text), "{path}");
        assert_eq!(record.status, format!("http_{code}"));
        assert_eq!(record.http_status, Some(code));
        assert_eq!(
            record.error.as_deref(),
            Some(format!("HTTP {code}: {text}").as_str())
        );
    }
}

/// A provider slower than the profile's timeout fails with `Timeout` after that
/// timeout, not after the provider's delay, and the failure is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_slower_than_the_profile_timeout_times_out_retryably() {
    let server = stub(|_| Reply {
        delay: Duration::from_secs(30),
        ..json_reply(200, json!({}))
    })
    .await;
    let mut slow = profile(Provider::Openai, &server.base, "m");
    slow.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (error, record) = failing_chat(slow).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(error, AdapterError::Timeout(t) if t == Duration::from_millis(300)),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(
        (record.status.as_str(), record.http_status),
        ("timeout", None)
    );
    assert_eq!(server.seen().len(), 1, "the request reached the stub");
}

/// A 400 is terminal and keeps the provider's own error message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_terminal_and_keep_the_provider_message() {
    let message = "Invalid value for 'temperature': must be between 0 and 2.";
    let server = stub(move |_| {
        json_reply(
            400,
            json!({"error": {"message": message, "type": "invalid_request_error",
                                         "param": "temperature", "code": "invalid_value"}}),
        )
    })
    .await;
    let (error, record) = failing_chat(profile(Provider::Openai, &server.base, "m")).await;
    assert!(!error.is_retryable(), "{error:?}");
    assert!(
        matches!(&error, AdapterError::Status { status: 400, message: m, retry_after: None } if m == message),
        "{error:?}"
    );
    assert_eq!(
        (record.status.as_str(), record.http_status),
        ("http_400", Some(400))
    );
    assert_eq!(record.error, Some(format!("HTTP 400: {message}")));
}

/// A 200 whose body is not JSON, or is JSON without `choices` (OpenAI) or `content`
/// (Anthropic), is an invalid response and terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_success_bodies_are_invalid_responses_and_terminal() {
    let server = stub(|seen| match seen.path.as_str() {
        "/html/chat/completions" => text_reply(200, "<html>gateway says hi</html>"),
        _ => json_reply(200, json!({"id": "x-1", "object": "chat.completion"})),
    })
    .await;
    let cases = [
        profile(Provider::Openai, &format!("{}/html", server.base), "m"),
        profile(Provider::Openai, &format!("{}/hollow", server.base), "m"),
        profile(Provider::Anthropic, &format!("{}/hollow", server.base), "m"),
    ];
    for profile in cases {
        let (error, record) = failing_chat(profile).await;
        assert!(
            matches!(error, AdapterError::InvalidResponse(_)),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        assert_eq!(
            (record.status.as_str(), record.http_status),
            ("invalid_response", Some(200))
        );
    }
    assert_eq!(server.seen().len(), 3);
}

/// A provider nobody listens for is a retryable connect error with no HTTP status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_is_a_retryable_connect_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (error, record) = failing_chat(profile(
        Provider::Openai,
        &format!("http://{closed}/v1"),
        "m",
    ))
    .await;
    assert!(matches!(error, AdapterError::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(
        (record.status.as_str(), record.http_status),
        ("connect", None)
    );
}
