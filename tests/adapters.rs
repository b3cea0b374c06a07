//! The adapter layer against stub HTTP servers: requests have the exact shapes of the
//! real OpenAI, Anthropic and generic HTTP APIs, and answers map to the node outputs of
//! DESIGN §6.

mod support;

use std::collections::BTreeMap;

use dagq::config::Provider;
use serde_json::{Value, json};
use support::{
    assert_key_not_recorded, call, fake_key, json_reply, node, profile, registry, stub, text_reply,
};

/// A chat node sends OpenAI's chat-completions request (system message first, profile
/// params as defaults under the node's own, bearer key, idempotency key) and its answer
/// becomes `text`, `finish_reason`, `model` and `usage`, recorded with its cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_sends_the_real_request_shape_and_maps_the_answer() {
    let answer = json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion",
        "created": 1741569952, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris.", "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 2, "total_tokens": 21},
        "system_fingerprint": "fp_06737a9306"
    });
    let canned = answer.clone();
    let server = stub(move |_| json_reply(200, canned.clone())).await;
    let (var, key) = fake_key();
    let mut chat = profile(
        Provider::Openai,
        &format!("{}/v1", server.base),
        "gpt-4o-mini",
    );
    chat.api_key_env = Some(var);
    chat.params = json!({"temperature": 0.2, "top_p": 0.9})
        .as_object()
        .unwrap()
        .clone();
    chat.headers = BTreeMap::from([("OpenAI-Organization".into(), "org-test".into())]);
    chat.price_per_1k_prompt = Some(0.15);
    chat.price_per_1k_completion = Some(0.6);
    let registry = registry(vec![("chat", chat)]);
    let ask = node("ask", "chat", Some("chat"));
    let input = json!({"system": "Answer in one word.", "temperature": 0.7, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "Capital of France?"}]});
    let (outcome, idempotency_key) = call(&registry, &ask, input).await;

    let output = outcome.result.as_ref().expect("the call succeeds");
    assert_eq!(
        output,
        &json!({"text": "Paris.", "finish_reason": "stop", "model": "gpt-4o-mini-2024-07-18",
                "usage": {"prompt_tokens": 19, "completion_tokens": 2}})
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let sent = &seen[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    let body = json!({
        "model": "gpt-4o-mini", "temperature": 0.7, "top_p": 0.9, "max_tokens": 50,
        "messages": [{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Capital of France?"}]
    });
    assert_eq!(sent.body, body);
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(
        sent.header("idempotency-key"),
        Some(idempotency_key.as_str())
    );
    assert_eq!(sent.header("openai-organization"), Some("org-test"));

    let [record] = &outcome.calls[..] else {
        panic!("one call recorded: {:?}", outcome.calls)
    };
    assert_eq!(
        (record.profile.as_str(), record.provider),
        ("chat", "openai")
    );
    assert_eq!(record.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(
        (record.status.as_str(), record.http_status),
        ("ok", Some(200))
    );
    assert_eq!(
        (record.usage.prompt_tokens, record.usage.completion_tokens),
        (19, 2)
    );
    let cost = record.cost.expect("a priced profile records a cost");
    assert!(
        (cost - (19.0 * 0.15 + 2.0 * 0.6) / 1000.0).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(record.request, body);
    assert_eq!(record.response, Some(answer));
    assert_eq!(record.error, None);
    assert_key_not_recorded(&outcome, &key);
}

/// Completion, embedding and image nodes post to `/completions`, `/embeddings` and
/// `/images/generations`, and their answers become `text`, `embeddings` and `images`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_completion_embedding_and_image_nodes_use_their_endpoints() {
    let server = stub(|seen| match seen.path.as_str() {
        "/v1/completions" => json_reply(200, json!({
            "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion", "created": 1589478378,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})),
        "/v1/embeddings" => json_reply(200, json!({
            "object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292]},
                     {"object": "embedding", "index": 1, "embedding": [0.5, 0.25]}],
            "usage": {"prompt_tokens": 8, "total_tokens": 8}})),
        "/v1/images/generations" => json_reply(200, json!({
            "created": 1713833628,
            "data": [{"url": "https://images.invalid/otter.png", "revised_prompt": "A cute baby sea otter"},
                     {"b64_json": "iVBORw0KGgo="}]})),
        _ => json_reply(404, json!({"error": {"message": "unknown path"}})),
    })
    .await;
    let base = format!("{}/v1/", server.base);
    let mut openai = profile(Provider::Openai, &base, "gpt-3.5-turbo-instruct");
    openai.params = json!({"max_tokens": 16}).as_object().unwrap().clone();
    let embed = profile(Provider::Openai, &base, "text-embedding-3-small");
    let draw = profile(Provider::Openai, &base, "dall-e-3");
    let registry = registry(vec![("complete", openai), ("embed", embed), ("draw", draw)]);

    let input = json!({"prompt": "Say this is a test", "temperature": 0});
    let (done, key) = call(&registry, &node("c", "completion", Some("complete")), input).await;
    assert_eq!(
        done.result.unwrap(),
        json!({"text": "\n\nThis is indeed a test", "finish_reason": "length",
               "model": "gpt-3.5-turbo-instruct", "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    );
    let input = json!({"input": ["The food was delicious", "and the waiter"]});
    let (embedded, _) = call(&registry, &node("e", "embedding", Some("embed")), input).await;
    assert_eq!(
        embedded.result.unwrap(),
        json!({"embeddings": [[0.0023064255, -0.009327292], [0.5, 0.25]], "model": "text-embedding-3-small",
               "usage": {"prompt_tokens": 8, "completion_tokens": 0}})
    );
    let input = json!({"prompt": "A cute baby sea otter", "size": "1024x1024", "n": 2});
    let (drawn, _) = call(&registry, &node("i", "image", Some("draw")), input).await;
    assert_eq!(
        drawn.result.unwrap(),
        json!({"images": [{"url": "https://images.invalid/otter.png", "revised_prompt": "A cute baby sea otter"},
                          {"b64_json": "iVBORw0KGgo="}]})
    );

    let sent: Vec<(String, String, Value)> = server
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path, s.body))
        .collect();
    let expected = [
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test",
                                   "max_tokens": 16, "temperature": 0}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small",
                                  "input": ["The food was delicious", "and the waiter"]}),
        ),
        (
            "/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "A cute baby sea otter",
                                          "size": "1024x1024", "n": 2}),
        ),
    ]
    .map(|(path, body)| ("POST".to_owned(), path.to_owned(), body));
    assert_eq!(sent, expected);
    assert_eq!(
        server.seen()[0].header("idempotency-key"),
        Some(key.as_str())
    );
    assert!(
        server.seen()[0].header("authorization").is_none(),
        "no key configured, none sent"
    );
}

/// An Anthropic chat posts to `{host}/v1/messages` with `x-api-key` and
/// `anthropic-version`, a top-level `system`, and a defaulted `max_tokens`; its content
/// blocks, `stop_reason` and input/output tokens map to the chat output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_chat_sends_the_messages_api_shape_and_maps_the_answer() {
    let server = stub(|_| {
        json_reply(
            200,
            json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": "claude-3-5-haiku-20241022",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": ", world"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 6}}),
        )
    })
    .await;
    let (var, key) = fake_key();
    let mut claude = profile(Provider::Anthropic, &server.base, "claude-3-5-haiku-latest");
    claude.api_key_env = Some(var);
    let registry = registry(vec![("claude", claude)]);
    let input = json!({"system": "You are terse.", "temperature": 0,
                       "messages": [{"role": "system", "content": "Answer in English."},
                                    {"role": "user", "content": "Greet the world."}]});
    let (outcome, idempotency_key) =
        call(&registry, &node("greet", "chat", Some("claude")), input).await;

    assert_eq!(
        outcome.result.as_ref().unwrap(),
        &json!({"text": "Hello, world", "finish_reason": "end_turn", "model": "claude-3-5-haiku-20241022",
                "usage": {"prompt_tokens": 12, "completion_tokens": 6}})
    );
    let seen = server.seen();
    let [sent] = &seen[..] else {
        panic!("one request: {seen:#?}")
    };
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(
        sent.body,
        json!({"model": "claude-3-5-haiku-latest", "max_tokens": 1024, "temperature": 0,
               "system": "You are terse.\n\nAnswer in English.",
               "messages": [{"role": "user", "content": "Greet the world."}]})
    );
    assert_eq!(sent.header("x-api-key"), Some(key.as_str()));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        sent.header("idempotency-key"),
        Some(idempotency_key.as_str())
    );
    assert!(
        sent.header("authorization").is_none(),
        "Anthropic takes x-api-key, not a bearer"
    );
    let record = &outcome.calls[0];
    assert_eq!(
        (record.provider, record.status.as_str()),
        ("anthropic", "ok")
    );
    assert_eq!(
        (record.usage.prompt_tokens, record.usage.completion_tokens),
        (12, 6)
    );
    assert_key_not_recorded(&outcome, &key);
}

/// An `http` node sends its method, URL, headers and JSON body (a profile adds its base
/// URL and bearer key) and outputs the status with the body, JSON when it parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_nodes_send_method_url_headers_and_body_and_output_status_and_body() {
    let server = stub(|seen| match seen.path.as_str() {
        "/hooks/build?ref=main" => json_reply(201, json!({"id": "B-7"})),
        _ => text_reply(200, "created"),
    })
    .await;
    let (var, key) = fake_key();
    let mut tickets = profile(Provider::Http, &format!("{}/api", server.base), "-");
    tickets.model = None;
    tickets.api_key_env = Some(var);
    let registry = registry(vec![("tickets", tickets)]);

    let input = json!({"url": format!("{}/hooks/build?ref=main", server.base), "method": "put",
                       "headers": {"X-Token": "t0k"}, "body": {"status": "green"}});
    let (plain, plain_key) = call(&registry, &node("hook", "http", None), input).await;
    assert_eq!(
        plain.result.as_ref().unwrap(),
        &json!({"status": 201, "body": {"id": "B-7"}})
    );
    assert_eq!(
        (plain.calls[0].profile.as_str(), plain.calls[0].provider),
        ("-", "http")
    );
    let input = json!({"url": "tickets", "body": {"title": "flaky test"}});
    let (profiled, _) = call(&registry, &node("open", "http", Some("tickets")), input).await;
    assert_eq!(
        profiled.result.as_ref().unwrap(),
        &json!({"status": 200, "body": "created"})
    );

    let seen = server.seen();
    let [hook, open] = &seen[..] else {
        panic!("two requests: {seen:#?}")
    };
    assert_eq!(
        (hook.method.as_str(), hook.path.as_str()),
        ("PUT", "/hooks/build?ref=main")
    );
    assert_eq!(hook.body, json!({"status": "green"}));
    assert_eq!(hook.header("x-token"), Some("t0k"));
    assert_eq!(hook.header("idempotency-key"), Some(plain_key.as_str()));
    assert!(hook.header("authorization").is_none());
    assert_eq!(
        (open.method.as_str(), open.path.as_str()),
        ("POST", "/api/tickets")
    );
    assert_eq!(open.body, json!({"title": "flaky test"}));
    assert_eq!(
        open.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
    assert_key_not_recorded(&profiled, &key);
}
