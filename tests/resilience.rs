//! Routing under failure: failover, attempt bounds, breaker, prober, stale connections,
//! timeouts and cancellation, against mock upstreams on real sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use llm_gateway::mock::MockBehavior;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

fn requests(m: &llm_gateway::mock::MockUpstream) -> u64 {
    m.state.requests.load(Ordering::Relaxed)
}

fn backend_field(h: &Value, name: &str, field: &str) -> String {
    h["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .map(|b| b[field].as_str().unwrap_or("").to_owned())
        .unwrap()
}

/// A base URL where nothing listens.
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn fails_over_when_a_backend_refuses_connections() {
    let good = mock().await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}{}",
        backend("dead", &dead_url().await, ""),
        backend("good", &good.base_url(), ""),
        model("m", &["dead", "good"])
    );
    let gw = Gateway::start(&toml).await;
    for stream in [false, true] {
        for _ in 0..30 {
            let r = chat(&gw, stream).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    let m = metrics_text(&gw).await;
    let connect_errors = metric(
        &m,
        "llm_gateway_upstream_errors_total{backend=\"dead\",kind=\"connect\"}",
    );
    assert!(
        connect_errors.unwrap_or(0.0) >= 1.0,
        "the dead backend was tried: {m}"
    );
    assert_eq!(requests(&good), 60);
}

#[tokio::test]
async fn fails_over_on_5xx_and_429_before_the_first_byte() {
    for status in [500u16, 503, 429] {
        let bad = mock_with(MockBehavior {
            fail_status: Some(status),
            ..Default::default()
        })
        .await;
        let good = mock().await;
        let gw = Gateway::start(&config_for(&[&bad, &good], "")).await;
        for i in 0..30 {
            let r = chat(&gw, i % 2 == 0).await;
            assert_eq!(r.status(), 200, "status {status}");
            r.bytes().await.unwrap();
        }
        assert!(requests(&bad) >= 1, "{status}: bad backend was tried");
        assert_eq!(requests(&good), 30);
    }
}

#[tokio::test]
async fn attempts_are_bounded() {
    let mocks = [
        mock_with(MockBehavior {
            fail_status: Some(502),
            ..Default::default()
        })
        .await,
        mock_with(MockBehavior {
            fail_status: Some(502),
            ..Default::default()
        })
        .await,
        mock_with(MockBehavior {
            fail_status: Some(502),
            ..Default::default()
        })
        .await,
    ];
    let refs: Vec<_> = mocks.iter().collect();
    let gw = Gateway::start(&config_for(&refs, "[upstream]\nmax_attempts = 2\n")).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(
        body["error"]["message"], "mock failure 502",
        "sanitised upstream message"
    );
    assert_eq!(
        body["error"]["code"], "upstream_status",
        "the gateway's own code, as README's error table says"
    );
    let total: u64 = mocks.iter().map(requests).sum();
    assert_eq!(total, 2);
}

#[tokio::test]
async fn upstream_429_everywhere_is_passed_on_as_429() {
    let up = mock_with(MockBehavior {
        fail_status: Some(429),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");
}

#[tokio::test]
async fn no_retry_once_bytes_reached_the_client() {
    // Paced so the first chunk reaches the gateway (and the client) before the break.
    let b = MockBehavior {
        drop_after: Some(2),
        chunk_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let (m0, m1) = (mock_with(b.clone()).await, mock_with(b).await);
    let gw = Gateway::start(&config_for(&[&m0, &m1], "")).await;
    let r = chat(&gw, true).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        3,
        "two chunks, then the gateway's error event: {text}"
    );
    assert!(events[2].contains("\"code\":\"stream_broken\""), "{text}");
    assert_eq!(
        requests(&m0) + requests(&m1),
        1,
        "not retried after the first byte"
    );
}

#[tokio::test]
async fn breaker_ejects_after_consecutive_failures() {
    let bad = mock_with(MockBehavior {
        fail_status: Some(500),
        ..Default::default()
    })
    .await;
    let good = mock().await;
    let extra = "[circuit_breaker]\nfailure_threshold = 2\nopen_duration = \"1h\"\n";
    let gw = Gateway::start(&config_for(&[&bad, &good], extra)).await;
    // Every request that lands on b0 fails over to b1; keep sending until b0 is ejected.
    let mut sent = 0;
    while backend_field(&health(&gw).await, "b0", "circuit") != "open" {
        assert_eq!(chat(&gw, false).await.status(), 200);
        sent += 1;
        assert!(sent < 200, "breaker never opened");
    }
    assert_eq!(
        requests(&bad),
        2,
        "opened after exactly failure_threshold failures"
    );
    assert_eq!(health(&gw).await["status"], "degraded");
    for _ in 0..20 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    assert_eq!(requests(&bad), 2, "no traffic while the circuit is open");
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_backend_circuit_open{backend=\"b0\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn half_open_probe_closes_the_circuit_when_the_backend_recovered() {
    let bad = mock_with(MockBehavior {
        fail_status: Some(500),
        ..Default::default()
    })
    .await;
    let good = mock().await;
    let extra = "[circuit_breaker]\nfailure_threshold = 1\nopen_duration = \"200ms\"\n";
    let gw = Gateway::start(&config_for(&[&bad, &good], extra)).await;
    while requests(&bad) == 0 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    assert_ne!(backend_field(&health(&gw).await, "b0", "circuit"), "closed");
    bad.set(|b| b.fail_status = None);
    // After the cool-down one probe request goes to b0; its success closes the circuit.
    let mut tries = 0;
    while backend_field(&health(&gw).await, "b0", "circuit") != "closed" {
        assert_eq!(chat(&gw, false).await.status(), 200);
        tries += 1;
        assert!(tries < 5000, "breaker never closed again");
    }
    assert!(
        requests(&bad) >= 2,
        "the half-open probe reached the backend"
    );
}

#[tokio::test]
async fn prober_marks_backends_unhealthy_and_traffic_avoids_them() {
    let sick = mock().await;
    let good = mock().await;
    let extra = "[health_check]\ninterval = \"50ms\"\nunhealthy_threshold = 1\n";
    let toml = format!(
        "{extra}{}{}{}",
        backend("sick", &sick.base_url(), ""),
        backend("good", &good.base_url(), ""),
        model("m", &["sick", "good"])
    );
    let gw = Gateway::start(&toml).await;
    sick.set(|b| b.healthy = false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while backend_field(&health(&gw).await, "sick", "health") != "unhealthy" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = health(&gw).await;
    assert_eq!(h["status"], "degraded");
    assert_eq!(backend_field(&h, "sick", "last_error"), "HTTP 503");
    let before = requests(&sick);
    for _ in 0..20 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    assert_eq!(
        requests(&sick),
        before,
        "no traffic to an unhealthy backend"
    );
    sick.set(|b| b.healthy = true);
    while backend_field(&health(&gw).await, "sick", "health") != "healthy" {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(10),
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn all_backends_unhealthy_gives_503_with_retry_after() {
    let sick = mock_with(MockBehavior {
        healthy: false,
        ..Default::default()
    })
    .await;
    let toml = format!(
        "[health_check]\ninterval = \"50ms\"\nunhealthy_threshold = 1\n{}{}",
        backend("sick", &sick.base_url(), ""),
        model("m", &["sick"])
    );
    let gw = Gateway::start(&toml).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while backend_field(&health(&gw).await, "sick", "health") != "unhealthy" {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_healthy_backend");
    let ready = client().get(gw.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn health_answers_while_probes_hang() {
    // A backend that accepts connections and never answers: probes hang until their timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let held2 = Arc::clone(&held);
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            held2.lock().await.push(s);
        }
    });
    let toml = format!(
        "[health_check]\ninterval = \"20ms\"\ntimeout = \"60s\"\n{}{}",
        backend("silent", &format!("http://{addr}/v1"), ""),
        model("m", &["silent"])
    );
    let gw = Gateway::start(&toml).await;
    wait_for("a probe connection", Duration::from_secs(10), || {
        held.try_lock().map(|h| !h.is_empty()).unwrap_or(false)
    })
    .await;
    // If /health waited on the hanging probe this would take 60 s and hit the 5 s timeout.
    let r = client()
        .get(gw.url("/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/health answers while a probe hangs");
    assert_eq!(r.status(), 200);
    acceptor.abort();
}

#[tokio::test]
/// A backend that took a request on a pooled connection and closed it without answering
/// may be working on it: the gateway does not send it to that backend again (with another
/// backend it would fail over, as an attempt).
async fn a_request_the_backend_took_and_dropped_is_not_sent_to_it_again() {
    // Connection 1 answers one request with keep-alive, then reads the next request and
    // closes without answering. Later connections answer normally.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let conns = Arc::clone(&connections);
    let server = tokio::spawn(async move {
        let body = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tasks = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let n = conns.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tasks.push(tokio::spawn(async move {
                let mut served = 0;
                while read_http_request(&mut s).await {
                    if n == 0 && served == 1 {
                        return; // drop the connection with the request unanswered
                    }
                    s.write_all(response.as_bytes()).await.unwrap();
                    served += 1;
                }
            }));
        }
    });
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("flaky", &format!("http://{addr}/v1"), ""),
        model("m", &["flaky"])
    );
    let gw = Gateway::start(&toml).await;
    assert_eq!(chat(&gw, false).await.status(), 200);
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 502, "the only backend failed after taking it");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "sent again on a fresh connection"
    );
    server.abort();
}

/// An upstream on a raw socket: answers requests alternately whole and streamed (chunked
/// SSE), and closes each connection after `per_connection` answers without saying so.
async fn raw_upstream(per_connection: usize) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = RawUpstream {
        url: format!("http://{addr}/v1"),
        connections: Arc::default(),
        closed: Arc::default(),
        heads: Arc::default(),
    };
    let (conns, closed, seen) = (
        Arc::clone(&up.connections),
        Arc::clone(&up.closed),
        Arc::clone(&up.heads),
    );
    tokio::spawn(async move {
        let body = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let whole = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let done = "data: [DONE]\n\n";
        let streamed = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n{:x}\r\n{done}\r\n0\r\n\r\n",
            event.len(),
            done.len()
        );
        let answered = Arc::new(AtomicUsize::new(0));
        while let Ok((mut s, _)) = listener.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            let (whole, streamed, seen, answered, closed) = (
                whole.clone(),
                streamed.clone(),
                Arc::clone(&seen),
                Arc::clone(&answered),
                Arc::clone(&closed),
            );
            tokio::spawn(async move {
                for _ in 0..per_connection {
                    let Some(head) = read_http_request_head(&mut s).await else {
                        return;
                    };
                    seen.lock().unwrap().push(head);
                    let n = answered.fetch_add(1, Ordering::SeqCst);
                    let answer = if n % 2 == 0 { &whole } else { &streamed };
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
                // As a server ends an idle keep-alive connection.
                drop(s);
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    up
}

struct RawUpstream {
    url: String,
    connections: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Whole and streamed answers read to the end leave their connection for the next
/// request; the request line is origin-form with the backend's `Host`.
#[tokio::test]
async fn answers_read_to_the_end_leave_their_connection_to_the_next_request() {
    let up = raw_upstream(usize::MAX).await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("b", &up.url, ""),
        model("m", &["b"])
    );
    let gw = Gateway::start(&toml).await;
    for i in 0..6 {
        let r = chat(&gw, i % 2 == 1).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        if i % 2 == 1 {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let host = up.url.trim_start_matches("http://").trim_end_matches("/v1");
    for head in up.heads.lock().unwrap().iter() {
        assert!(
            head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("\r\nhost: {host}\r\n")),
            "{head}"
        );
    }
}

/// A pooled connection the backend closed while it was idle is not used: every request
/// is answered, each on a new connection.
#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_not_used() {
    let up = raw_upstream(1).await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("b", &up.url, ""),
        model("m", &["b"])
    );
    let gw = Gateway::start(&toml).await;
    for i in 0..6 {
        let r = chat(&gw, i % 2 == 1).await;
        assert_eq!(r.status(), 200, "request {i}");
        r.text().await.unwrap();
        // The close reaches the gateway while its connection is idle.
        wait_for("the backend closed it", Duration::from_secs(5), || {
            up.closed.load(Ordering::SeqCst) == i + 1
        })
        .await;
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn non_streaming_upstream_timeout_is_504() {
    let up = mock_with(MockBehavior {
        hang: true,
        ..Default::default()
    })
    .await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("slow", &up.base_url(), "request_timeout = \"300ms\""),
        model("m", &["slow"])
    );
    let gw = Gateway::start(&toml).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn first_token_deadline_is_504_and_fails_over() {
    let slow = mock_with(MockBehavior {
        first_chunk_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("slow", &slow.base_url(), "first_token_timeout = \"300ms\""),
        model("m", &["slow"])
    );
    let gw = Gateway::start(&toml).await;
    let r = chat(&gw, true).await;
    assert_eq!(r.status(), 504);

    let fast = mock().await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}{}",
        backend("slow", &slow.base_url(), "first_token_timeout = \"200ms\""),
        backend("fast", &fast.base_url(), ""),
        model("m", &["slow", "fast"])
    );
    let gw = Gateway::start(&toml).await;
    for _ in 0..10 {
        let r = chat(&gw, true).await;
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
}

/// A gateway with a 300 ms stream idle timeout in front of a mock behaving so.
async fn with_idle_timeout(behavior: MockBehavior) -> (llm_gateway::mock::MockUpstream, Gateway) {
    let up = mock_with(behavior).await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("b", &up.base_url(), "stream_idle_timeout = \"300ms\""),
        model("m", &["b"])
    );
    let gw = Gateway::start(&toml).await;
    (up, gw)
}

#[tokio::test]
async fn idle_stream_is_closed_with_an_error_event() {
    let (up, gw) = with_idle_timeout(MockBehavior {
        chunk_interval: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let r = chat(&gw, true).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[1].contains("stream_idle_timeout"));
    wait_for("upstream stream dropped", Duration::from_secs(10), || {
        up.state.cancelled_streams.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn a_stream_that_keeps_sending_outlives_its_idle_timeout() {
    // Events 100 ms apart for about 1.2 s: each one restarts the 300 ms idle timer.
    let (_up, gw) = with_idle_timeout(MockBehavior {
        chunks: 12,
        chunk_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let r = chat(&gw, true).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("stream_idle_timeout"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("chat.completion.chunk").count(), 12, "{text}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let up = mock_with(MockBehavior {
        chunks: 1000,
        chunk_interval: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, true).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    wait_for("upstream stream cancelled", Duration::from_secs(10), || {
        up.state.cancelled_streams.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(up.state.completed_streams.load(Ordering::Relaxed), 0);
    // The backend's in-flight slot is released with the stream.
    let h = health(&gw).await;
    assert_eq!(h["backends"][0]["in_flight"], 0);
}

/// Without a queue (`queue_max = 0`), a saturated model answers 503 at once
/// (tests/fairness.rs has the queue).
#[tokio::test]
async fn a_full_backend_is_skipped_and_503_when_all_are_full() {
    let up = mock_with(MockBehavior {
        delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let toml = format!(
        "[health_check]\nenabled = false\n[upstream]\nqueue_max = 0\n{}{}",
        backend("b", &up.base_url(), "max_concurrency = 1"),
        model("m", &["b"])
    );
    let gw = Gateway::start(&toml).await;
    let url = gw.url("/v1/chat/completions");
    let first =
        tokio::spawn(async move { client().post(url).json(&chat_body(false)).send().await });
    wait_for("first request upstream", Duration::from_secs(10), || {
        requests(&up) == 1
    })
    .await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "backends_saturated");
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_requests_shed_total{reason=\"backends_saturated\"}"
        ),
        Some(1.0),
        "{m}"
    );
    first.abort();
}

#[tokio::test]
async fn no_new_attempt_after_the_retry_budget() {
    let slow_fail = MockBehavior {
        delay: Duration::from_millis(300),
        fail_status: Some(500),
        ..Default::default()
    };
    let mocks = [
        mock_with(slow_fail.clone()).await,
        mock_with(slow_fail).await,
    ];
    let refs: Vec<_> = mocks.iter().collect();
    let gw = Gateway::start(&config_for(
        &refs,
        "[upstream]\nmax_attempts = 2\nretry_budget = \"100ms\"\n",
    ))
    .await;
    assert_eq!(chat(&gw, false).await.status(), 502);
    let total: u64 = mocks.iter().map(requests).sum();
    assert_eq!(total, 1, "the first attempt used up the budget");
}

#[tokio::test]
async fn traffic_follows_backend_weights() {
    let (heavy, light) = (mock().await, mock().await);
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}{}",
        backend("heavy", &heavy.base_url(), "weight = 3"),
        backend("light", &light.base_url(), "weight = 1"),
        model("m", &["heavy", "light"])
    );
    let gw = Gateway::start(&toml).await;
    for _ in 0..400 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    let share = requests(&heavy) as f64 / 400.0;
    // Expected 0.75; the band is more than 4 standard deviations wide.
    assert!((0.65..=0.85).contains(&share), "heavy got {share}");
    assert_eq!(requests(&heavy) + requests(&light), 400);
}

#[tokio::test]
async fn less_loaded_backend_wins_under_concurrency() {
    // One backend holds a request for a long time, the other answers at once: with
    // least-in-flight selection every new request goes to the free one.
    let stuck = mock_with(MockBehavior {
        delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let free = mock().await;
    let gw = Gateway::start(&config_for(&[&stuck, &free], "")).await;
    let url = gw.url("/v1/chat/completions");
    let mut held = Vec::new();
    // Send until one request is stuck (the first may land on either backend).
    while requests(&stuck) < 1 {
        let url = url.clone();
        held.push(tokio::spawn(async move {
            client().post(url).json(&chat_body(false)).send().await
        }));
        let before = requests(&stuck) + requests(&free);
        wait_for("request arrived upstream", Duration::from_secs(10), || {
            requests(&stuck) + requests(&free) > before
        })
        .await;
    }
    let before = requests(&stuck);
    for _ in 0..50 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    assert_eq!(
        requests(&stuck),
        before,
        "the loaded backend got no new request"
    );
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn a_client_gone_before_the_answer_is_counted_as_499() {
    let up = mock_with(MockBehavior {
        delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .timeout(Duration::from_millis(300))
        .json(&chat_body(false))
        .send()
        .await;
    assert!(r.is_err(), "client gave up");
    let series = "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"m\",backend=\"b0\",status=\"499\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(&gw).await;
        if metric(&m, series) == Some(1.0) {
            assert_eq!(metric(&m, "llm_gateway_in_flight_requests"), Some(0.0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 499 recorded: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h = health(&gw).await;
    assert_eq!(h["backends"][0]["in_flight"], 0, "backend slot released");
}

#[tokio::test]
async fn a_backend_rejecting_the_gateways_key_is_failed_over_and_ejected() {
    let wrong_key = mock_with(MockBehavior {
        fail_status: Some(401),
        ..Default::default()
    })
    .await;
    let good = mock().await;
    let extra = "[circuit_breaker]\nfailure_threshold = 2\nopen_duration = \"1h\"\n";
    let gw = Gateway::start(&config_for(&[&wrong_key, &good], extra)).await;
    for _ in 0..30 {
        assert_eq!(chat(&gw, false).await.status(), 200);
    }
    assert_eq!(
        requests(&wrong_key),
        2,
        "ejected after failure_threshold 401s"
    );
    assert_eq!(backend_field(&health(&gw).await, "b0", "circuit"), "open");
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_upstream_errors_total{backend=\"b0\",kind=\"status_4xx_route\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn with_a_single_misconfigured_backend_the_client_gets_502() {
    let wrong_key = mock_with(MockBehavior {
        fail_status: Some(403),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&wrong_key], "")).await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_status", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
}

#[tokio::test]
async fn a_stream_ending_without_done_is_passed_on_and_counted_incomplete() {
    let up = mock_with(MockBehavior {
        send_done: false,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let text = chat(&gw, true).await.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        8,
        "content passed on, no error event added: {text}"
    );
    assert!(!text.contains("\"error\""));
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_upstream_errors_total{backend=\"b0\",kind=\"stream_incomplete\"}"
        ),
        Some(1.0)
    );
}
