//! The OpenAI-compatible API through the gateway: happy paths and the bad-input table.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use llm_gateway::mock::MockBehavior;
use serde_json::{Value, json};

#[tokio::test]
async fn chat_completion_non_streaming_passes_through() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    );
    assert_eq!(body["usage"]["completion_tokens"], 8);
    let sent = up.state.last_request().unwrap().body;
    assert_eq!(sent["model"], "m");
    assert!(
        sent.get("stream_options").is_none(),
        "non-streaming body untouched"
    );
}

#[tokio::test]
async fn completions_and_embeddings_are_proxied() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = client()
        .post(gw.url("/v1/completions"))
        .json(&json!({"model":"m","prompt":"Say hi","max_tokens":3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["text"], "tok0 tok1 tok2 ");
    let r = client()
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model":"m","input":["a","b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(up.state.requests.load(Ordering::Relaxed), 2);
    // Embeddings count prompt tokens only (the mock reports them); no invented completion.
    let m = metrics_text(&gw).await;
    let prompt = body["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(
        metric(
            &m,
            "llm_gateway_tokens_total{model=\"m\",kind=\"completion\"}"
        ),
        Some(3.0),
        "only the completions request's 3 tokens"
    );
    assert!(metric(&m, "llm_gateway_tokens_total{model=\"m\",kind=\"prompt\"}").unwrap() >= prompt);
}

/// Collects an SSE body and returns its data payloads.
async fn sse_events(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streaming_strips_the_usage_chunk_the_client_did_not_ask_for() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_events(r).await;
    assert_eq!(events.len(), 9, "8 content chunks and [DONE]: {events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        events.iter().all(|e| !e.contains("\"prompt_tokens\"")),
        "usage chunk stripped"
    );
    let sent = up.state.last_request().unwrap().body;
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "gateway asked upstream for usage"
    );

    // The usage the gateway captured is exact (not estimated).
    let metrics = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &metrics,
            "llm_gateway_tokens_total{model=\"m\",kind=\"completion\"}"
        ),
        Some(8.0)
    );
}

#[tokio::test]
async fn null_stream_options_still_get_usage_requested() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let mut body = chat_body(true);
    body["stream_options"] = Value::Null;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(sse_events(r).await.len(), 9);
    let sent = up.state.last_request().unwrap().body;
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn streaming_keeps_the_usage_chunk_when_the_client_asked() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = sse_events(r).await;
    assert_eq!(events.len(), 10);
    let usage: Value = serde_json::from_str(&events[8]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    assert_eq!(usage["choices"], json!([]));
}

#[tokio::test]
async fn usage_is_estimated_when_upstream_sends_none() {
    let up = mock_with(MockBehavior {
        send_usage: false,
        chunks: 5,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, true).await;
    let events = sse_events(r).await;
    assert_eq!(events.len(), 6);
    let metrics = metrics_text(&gw).await;
    // One content event per token is the estimate for streams.
    assert_eq!(
        metric(
            &metrics,
            "llm_gateway_tokens_total{model=\"m\",kind=\"completion\"}"
        ),
        Some(5.0)
    );
    let prompt = metric(
        &metrics,
        "llm_gateway_tokens_total{model=\"m\",kind=\"prompt\"}",
    )
    .unwrap();
    assert!(prompt > 0.0);
}

#[tokio::test]
async fn upstream_model_name_is_rewritten_and_api_key_sent() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-upstream-secret\n").unwrap();
    let toml = format!(
        "[health_check]\nenabled = false\n{}[[models]]\nname = \"public\"\nroutes = [{{ backend = \"a\", upstream_model = \"org/Real-Model-8B\" }}]\n",
        backend(
            "a",
            &up.base_url(),
            &format!("api_key = {{ file = \"{}\" }}", key_file.display())
        ),
    );
    let gw = Gateway::start(&toml).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model":"public","messages":[]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.state.last_request().unwrap();
    let (sent, auth) = (seen.body, seen.authorization);
    assert_eq!(sent["model"], "org/Real-Model-8B");
    assert_eq!(auth.as_deref(), Some("Bearer sk-upstream-secret"));
}

/// What the gateway changes in a body (the model name, include_usage) is spliced into the
/// client's bytes: numbers and escapes a re-serialiser would rewrite reach the backend as
/// sent.
#[tokio::test]
async fn the_upstream_gets_the_clients_bytes_with_only_the_model_and_usage_spliced() {
    let up = mock().await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}[[models]]\nname = \"public\"\nroutes = [{{ backend = \"a\", upstream_model = \"org/Real-Model-8B\" }}]\n",
        backend("a", &up.base_url(), ""),
    );
    let gw = Gateway::start(&toml).await;
    let body = r#"{"model":"public","stream":true,"seed":18446744073709551616,"temperature":-0,"messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00"}],"top_p":1.0e0}"#;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let seen = String::from_utf8(up.state.last_request().unwrap().raw.to_vec()).unwrap();
    for kept in [
        r#""seed":18446744073709551616"#,
        r#""temperature":-0,"#,
        r#""content":"caf\u00e9 \ud83d\ude00""#,
        r#""top_p":1.0e0"#,
    ] {
        assert!(seen.contains(kept), "{kept} changed on the way: {seen}");
    }
    assert!(seen.contains(r#""model":"org/Real-Model-8B""#), "{seen}");
    assert!(seen.contains(r#""include_usage":true"#), "{seen}");

    // An array is not an object, whatever serde would make of it.
    for options in ["[]", "[true]"] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"public","stream":true,"stream_options":{options},"messages":[]}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "stream_options {options}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "stream_options");
    }
}

#[tokio::test]
async fn models_endpoint_lists_configured_names() {
    let up = mock().await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}{}",
        backend("a", &up.base_url(), ""),
        model("llama-3-8b", &["a"]),
        model("qwen/qwen2.5", &["a"])
    );
    let gw = Gateway::start(&toml).await;
    let body: Value = client()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama-3-8b", "qwen/qwen2.5"]);
    assert_eq!(body["object"], "list");
    let one: Value = client()
        .get(gw.url("/v1/models/qwen/qwen2.5"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "qwen/qwen2.5");
    let missing = client()
        .get(gw.url("/v1/models/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    error_type: &'static str,
    code: &'static str,
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: &str,
    status: u16,
    error_type: &'static str,
    code: &'static str,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        path,
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
        status,
        error_type,
        code,
        param,
    }
}

#[tokio::test]
async fn bad_inputs_get_exact_status_and_openai_error() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "[server]\nmax_body_bytes = 1024\n")).await;
    const CHAT: &str = "/v1/chat/completions";
    let ir = "invalid_request_error";
    let mut cases = vec![
        case(
            "malformed JSON",
            CHAT,
            "{\"model\":",
            400,
            ir,
            "invalid_json",
            None,
        ),
        case(
            "not an object",
            CHAT,
            "[1,2]",
            400,
            ir,
            "invalid_json",
            None,
        ),
        case(
            "missing model",
            CHAT,
            r#"{"messages":[]}"#,
            400,
            ir,
            "missing_required_parameter",
            Some("model"),
        ),
        case(
            "null model",
            CHAT,
            r#"{"model":null,"messages":[]}"#,
            400,
            ir,
            "missing_required_parameter",
            Some("model"),
        ),
        case(
            "model not a string",
            CHAT,
            r#"{"model":7,"messages":[]}"#,
            400,
            ir,
            "invalid_type",
            Some("model"),
        ),
        case(
            "stream not a bool",
            CHAT,
            r#"{"model":"m","messages":[],"stream":"yes"}"#,
            400,
            ir,
            "invalid_type",
            Some("stream"),
        ),
        case(
            "missing messages",
            CHAT,
            r#"{"model":"m"}"#,
            400,
            ir,
            "missing_required_parameter",
            Some("messages"),
        ),
        case(
            "messages not an array",
            CHAT,
            r#"{"model":"m","messages":"hi"}"#,
            400,
            ir,
            "invalid_type",
            Some("messages"),
        ),
        case(
            "stream_options not an object",
            CHAT,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":1}"#,
            400,
            ir,
            "invalid_type",
            Some("stream_options"),
        ),
        case(
            "include_usage not a bool",
            CHAT,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":"yes"}}"#,
            400,
            ir,
            "invalid_type",
            Some("stream_options"),
        ),
        case(
            "prompt a number",
            "/v1/completions",
            r#"{"model":"m","prompt":42}"#,
            400,
            ir,
            "invalid_type",
            Some("prompt"),
        ),
        case(
            "trailing garbage",
            CHAT,
            r#"{"model":"m","messages":[]} x"#,
            400,
            ir,
            "invalid_json",
            None,
        ),
        case(
            "missing prompt",
            "/v1/completions",
            r#"{"model":"m"}"#,
            400,
            ir,
            "missing_required_parameter",
            Some("prompt"),
        ),
        case(
            "missing input",
            "/v1/embeddings",
            r#"{"model":"m"}"#,
            400,
            ir,
            "missing_required_parameter",
            Some("input"),
        ),
        case(
            "streamed embeddings",
            "/v1/embeddings",
            r#"{"model":"m","input":"x","stream":true}"#,
            400,
            ir,
            "unsupported_parameter",
            Some("stream"),
        ),
        case(
            "unknown model",
            CHAT,
            r#"{"model":"gpt-nope","messages":[]}"#,
            404,
            ir,
            "model_not_found",
            Some("model"),
        ),
        case(
            "unknown path",
            "/v1/nothing",
            "{}",
            404,
            ir,
            "unknown_path",
            None,
        ),
        case(
            "body over the limit",
            CHAT,
            &format!(
                r#"{{"model":"m","messages":[],"pad":"{}"}}"#,
                "x".repeat(2000)
            ),
            413,
            ir,
            "body_too_large",
            None,
        ),
    ];
    cases.push(Case {
        name: "wrong method",
        method: "GET",
        path: CHAT,
        content_type: None,
        body: vec![],
        status: 405,
        error_type: ir,
        code: "method_not_allowed",
        param: None,
    });
    cases.push(Case {
        name: "form content type",
        method: "POST",
        path: CHAT,
        content_type: Some("application/x-www-form-urlencoded"),
        body: b"model=m".to_vec(),
        status: 415,
        error_type: ir,
        code: "unsupported_media_type",
        param: None,
    });
    let c = client();
    for case in cases {
        let mut req = c
            .request(case.method.parse().unwrap(), gw.url(case.path))
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), case.status, "{}", case.name);
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{}",
            case.name
        );
        let body: Value = r.json().await.unwrap();
        let err = &body["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            case.name
        );
        assert_eq!(err["type"], case.error_type, "{}: {body}", case.name);
        assert_eq!(err["code"], case.code, "{}: {body}", case.name);
        assert_eq!(err["param"], json!(case.param), "{}: {body}", case.name);
    }
    assert_eq!(
        up.state.requests.load(Ordering::Relaxed),
        0,
        "no bad request reached upstream"
    );
}

#[tokio::test]
async fn upstream_client_errors_pass_through_sanitised() {
    let up = mock_with(MockBehavior {
        fail_status: Some(400),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock failure 400");
    assert_eq!(body["error"]["code"], "400");
    assert_eq!(
        up.state.requests.load(Ordering::Relaxed),
        1,
        "4xx is not retried"
    );
}
