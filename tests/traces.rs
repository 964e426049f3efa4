//! OpenTelemetry trace export (`[tracing] otlp_endpoint`) from the real binary to a real
//! OTLP/HTTP receiver in the test, which decodes what it gets with the official protobuf
//! types (`opentelemetry-proto`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use common::process::Launch;
use common::{client, config_for, mock_with, wait_for, with_test_storage};
use llm_gateway::mock::MockBehavior;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use serde_json::json;

/// Spans received, with their resource's attributes.
type Received = Arc<Mutex<Vec<(Vec<KeyValue>, Span)>>>;

/// An OTLP/HTTP receiver on port 0: `POST /v1/traces` with a protobuf body.
async fn collector() -> (String, Received, tokio::task::JoinHandle<()>) {
    let received: Received = Arc::default();
    let sink = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let mut spans = sink.lock().unwrap();
                for resource in request.resource_spans {
                    let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push((attributes.clone(), span));
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, received, task)
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(attributes: &'a [KeyValue], key: &str) -> &'a str {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {attributes:#?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> i64 {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(n)) => *n,
        other => panic!("{key}: {other:?} in {attributes:#?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A streamed request that arrives with a `traceparent` is exported as a server span in
/// that trace, with the GenAI attributes and a first-token event, and a client span per
/// upstream attempt as its child, whose `traceparent` the backend receives. Prompt and
/// completion text appear nowhere.
#[tokio::test]
async fn requests_are_exported_as_genai_spans_in_the_clients_trace() {
    let (collector_url, received, _collector) = collector().await;
    let up = mock_with(MockBehavior {
        chunks: 4,
        ..MockBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let toml = with_test_storage(
        &config_for(
            &[&up],
            &format!("[tracing]\notlp_endpoint = \"{collector_url}\"\n"),
        ),
        &dir.path().join("state"),
    );
    std::fs::write(&config, toml).unwrap();
    let gw = Launch::serve(&config).start().await;

    let r = client()
        .post(gw.at("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(
            &json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "a secret prompt"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("tok0"), "{body}");
    let seen = up.state.last_request().unwrap();

    wait_for("two spans exported", Duration::from_secs(20), || {
        received.lock().unwrap().len() >= 2
    })
    .await;
    let spans = received.lock().unwrap().clone();
    let (resource, server) = spans
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    let (_, attempt) = spans
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Client as i32)
        .expect("a client span");
    assert_eq!(text(resource, "service.name"), "llm-gateway");

    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.name, "chat m");
    let a = &server.attributes;
    assert_eq!(text(a, "gen_ai.operation.name"), "chat");
    assert_eq!(text(a, "gen_ai.request.model"), "m");
    assert_eq!(text(a, "gen_ai.response.model"), "m");
    assert_eq!(text(a, "server.address"), "b0");
    assert_eq!(int(a, "http.response.status_code"), 200);
    assert!(int(a, "gen_ai.usage.input_tokens") > 0, "{a:#?}");
    assert_eq!(int(a, "gen_ai.usage.output_tokens"), 4, "{a:#?}");
    let first = server
        .events
        .iter()
        .find(|e| e.name == "first token")
        .expect("a first-token event");
    assert!(first.time_unix_nano >= server.start_time_unix_nano);

    assert_eq!(attempt.trace_id, server.trace_id);
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(text(&attempt.attributes, "gen_ai.request.model"), "m");
    assert_eq!(text(&attempt.attributes, "server.address"), "b0");
    let traceparent = seen.traceparent.expect("traceparent sent upstream");
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id))
    );

    let everything = format!("{spans:?}");
    assert!(!everything.contains("secret prompt"), "prompt exported");
    assert!(!everything.contains("tok0"), "completion exported");
}

/// A collector that accepts connections and never answers: clients see nothing of it, and
/// the process still exits on SIGTERM within the export timeout.
#[tokio::test]
async fn a_collector_that_never_answers_costs_clients_nothing_and_shutdown_stays_bounded() {
    // It takes connections and never reads them.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = mock_with(MockBehavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let toml = with_test_storage(
        &config_for(
            &[&up],
            &format!(
                "[tracing]\notlp_endpoint = \"http://{}\"\nexport_timeout = \"1s\"\n",
                blackhole.local_addr().unwrap()
            ),
        ),
        &dir.path().join("state"),
    );
    std::fs::write(&config, toml).unwrap();
    let mut gw = Launch::serve(&config).start().await;
    for stream in [false, true, false, true, false] {
        let r = client()
            .post(gw.at("/v1/chat/completions"))
            .json(&common::chat_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // The exporter has connected (an export is waiting for an answer that never comes).
    blackhole.set_nonblocking(true).unwrap();
    let mut held = Vec::new();
    wait_for("the exporter to connect", Duration::from_secs(20), || {
        if let Ok((conn, _)) = blackhole.accept() {
            held.push(conn);
        }
        !held.is_empty()
    })
    .await;
    let before = Instant::now();
    let status = gw.terminate();
    let took = before.elapsed();
    assert!(status.success(), "{status:?}");
    // Drain of an idle gateway plus at most one export timeout (1 s) for the last batch.
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    drop(held);
}
