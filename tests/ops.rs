//! Operations: health, readiness, metrics, request ids, limits, socket behaviour, shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use llm_gateway::mock::MockBehavior;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn health_and_ready_report_state() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let h = health(&gw).await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_seconds"].is_u64());
    assert_eq!(h["backends"][0]["name"], "b0");
    assert_eq!(h["backends"][0]["circuit"], "closed");
    assert_eq!(
        h["backends"][0]["health"], "unknown",
        "probing is off in this config"
    );
    let r = client().get(gw.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_count_requests_with_fixed_labels() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let c = client();
    let ok = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let unknown = c
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model":"user-chosen-name-xyz","messages":[]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let r = c.get(gw.url("/metrics")).send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("text")
    );
    let m = r.text().await.unwrap();
    let ok_series = "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"m\",backend=\"b0\",status=\"200\"}";
    assert_eq!(metric(&m, ok_series), Some(1.0), "{m}");
    let nf_series = "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"none\",backend=\"none\",status=\"404\"}";
    assert_eq!(metric(&m, nf_series), Some(1.0), "{m}");
    assert!(
        !m.contains("user-chosen-name-xyz"),
        "no user input in labels"
    );
    assert_eq!(metric(&m, "llm_gateway_in_flight_requests"), Some(0.0));
    assert_eq!(
        metric(&m, "llm_gateway_backend_up{backend=\"b0\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "llm_gateway_backend_circuit_open{backend=\"b0\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "llm_gateway_request_duration_seconds_count{model=\"m\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "llm_gateway_tokens_total{model=\"m\",kind=\"completion\"}"
        ),
        Some(8.0)
    );
    let build = format!(
        "llm_gateway_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&m, &build), Some(1.0));
}

#[tokio::test]
async fn streaming_records_time_to_first_token() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, true).await;
    r.bytes().await.unwrap();
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_time_to_first_token_seconds_count{model=\"m\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn metrics_can_have_their_own_listener() {
    let up = mock().await;
    let gw = Gateway::start_with(&config_for(&[&up], ""), true).await;
    let on_api = client().get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(on_api.status(), 404);
    let own = format!("http://{}/metrics", gw.metrics_addr.unwrap());
    let r = client().get(own).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("llm_gateway_build_info"));
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let c = client();
    let r = c
        .get(gw.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let r = c
        .get(gw.url("/health"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"].len(),
        36,
        "overlong ids are replaced"
    );
}

#[tokio::test]
async fn excess_requests_are_shed_with_503() {
    let up = mock_with(MockBehavior {
        delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nmax_concurrent_requests = 1\n",
    ))
    .await;
    let url = gw.url("/v1/chat/completions");
    let first =
        tokio::spawn(async move { client().post(url).json(&chat_body(false)).send().await });
    wait_for("first request upstream", Duration::from_secs(10), || {
        up.state.requests.load(Ordering::Relaxed) == 1
    })
    .await;
    let r = chat(&gw, false).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    let m = metrics_text(&gw).await;
    let shed = |reason: &str| {
        metric(
            &m,
            &format!("llm_gateway_requests_shed_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(shed("overloaded"), Some(1.0), "{m}");
    assert_eq!(shed("backends_saturated"), Some(0.0), "{m}");
    // Operational endpoints are not shed.
    assert_eq!(
        client()
            .get(gw.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    first.abort();
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nheader_read_timeout = \"300ms\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server must end the connection; without the timeout this read would block.
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection with incomplete headers was not closed"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn slow_body_is_cut_off_with_408() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nbody_read_timeout = \"300ms\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

/// A streamed chat completion request as raw HTTP/1.1 bytes, for tests that need one socket.
fn raw_stream_request() -> String {
    let body = serde_json::to_string(&chat_body(true)).unwrap();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one chunked HTTP/1.1 response from `s` (up to the terminating chunk).
async fn read_chunked_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    while !buf.ends_with(b"\r\n0\r\n\r\n") {
        let n = s.read(&mut tmp).await.unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
    String::from_utf8(buf).unwrap()
}

#[tokio::test]
async fn streams_over_a_reused_connection_do_not_stall() {
    // Nagle's algorithm plus delayed ACKs stalls each streamed response on a reused
    // keep-alive connection by ~40 ms. TCP_NODELAY on both sides must prevent it.
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let request = raw_stream_request();
    let mut times = Vec::new();
    for i in 0..21 {
        let t = Instant::now();
        s.write_all(request.as_bytes()).await.unwrap();
        let response = read_chunked_response(&mut s).await;
        assert!(response.contains("data: [DONE]"), "{response}");
        if i > 0 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "median streamed response on a reused connection took {median:?} (Nagle stall?): {times:?}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_streams_and_refuses_new_connections() {
    let up = mock_with(MockBehavior {
        chunks: 20,
        chunk_interval: Duration::from_millis(25),
        ..Default::default()
    })
    .await;
    let mut gw = Gateway::start(&config_for(&[&up], "")).await;
    let r = chat(&gw, true).await;
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let serving = gw.begin_shutdown();
    // New connections are refused once shutdown began.
    wait_for_refused(gw.addr).await;
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream completed during drain: {text}"
    );
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(up.state.completed_streams.load(Ordering::Relaxed), 1);
}

async fn wait_for_refused(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still accepting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_deadline_cuts_streams_that_run_too_long() {
    let up = mock_with(MockBehavior {
        chunks: 1000,
        chunk_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let mut gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nshutdown_timeout = \"300ms\"\n",
    ))
    .await;
    let r = chat(&gw, true).await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    let serving = gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The client's stream ends (cut) instead of running for 100 s.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(rest.is_ok());
    wait_for("upstream cancelled", Duration::from_secs(10), || {
        up.state.cancelled_streams.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nheader_read_timeout = \"300ms\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Then silence: the server closes the idle connection instead of holding it forever.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle keep-alive connection stayed open");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nheader_read_timeout = \"300ms\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a silent connection was held open");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_upstream_cancelled() {
    // More events than the socket buffers on the way can hold, or the mock would finish
    // into them and never see the cancel: the receive side autotunes up to tcp_rmem's
    // maximum (32 MiB on these machines; a fixed 18 MB stream fit in it under load).
    let up = mock_with(MockBehavior {
        chunks: chunks_beyond_socket_buffers(),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(
        &[&up],
        "[server]\nwrite_stall_timeout = \"300ms\"\n",
    ))
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw.addr).await.unwrap();
    let request = raw_stream_request();
    s.write_all(request.as_bytes()).await.unwrap();
    // Never read. The gateway's writes stall, it gives up, and drops the upstream stream.
    wait_for("upstream stream cancelled", Duration::from_secs(60), || {
        up.state.cancelled_streams.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(health(&gw).await["backends"][0]["in_flight"], 0);
    drop(s);
}

/// How many of the mock's stream events (each over 150 bytes) are more than twice what
/// the kernel's TCP buffers can hold, both directions' maxima summed.
fn chunks_beyond_socket_buffers() -> usize {
    let max = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
            .unwrap_or(32 << 20)
    };
    let buffers = max("/proc/sys/net/ipv4/tcp_rmem") + max("/proc/sys/net/ipv4/tcp_wmem");
    2 * buffers / 150
}

/// A request head over `server.max_header_bytes` gets 431, so a connection cannot make the
/// gateway buffer more than that while its headers trickle in.
#[tokio::test]
async fn oversized_request_headers_get_431() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "[server]\nmax_header_bytes = 16384\n")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let filler = "a".repeat(32 * 1024);
    let request = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
    // The server may answer and close before it has read everything.
    let _ = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // Within the limit, the same request is served.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let filler = "a".repeat(8 * 1024);
    s.write_all(
        format!(
            "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

/// At `server.max_connections` the gateway stops accepting: a further connection waits in
/// the backlog (counted, logged) and is served as soon as another one closes. (Tried on the
/// metrics listener, which has the same accept loop and no pooled test connection.)
#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let up = mock().await;
    let gw =
        Gateway::start_with(&config_for(&[&up], "[server]\nmax_connections = 2\n"), true).await;
    let addr = gw.metrics_addr.unwrap();
    const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(GET).await.unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        idle.push(s);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut answer)).await;
    assert!(
        waited.is_err(),
        "answered beyond the limit: {}",
        String::from_utf8_lossy(&answer)
    );
    drop(idle.pop());
    tokio::time::timeout(Duration::from_secs(20), third.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let counted = metric(&text, "llm_gateway_connection_limit_reached_total").unwrap();
    assert!(counted >= 1.0, "limit not counted");
}

/// A whole answer a client is slow to read keeps its request counted in flight (and its
/// concurrency permit held) until the connection has taken it, so the memory of answers
/// waiting to be written is bounded by `max_concurrent_requests`.
#[tokio::test]
async fn a_large_answer_holds_its_permit_until_the_client_has_taken_it() {
    // About 20 MB: more than the loopback socket buffers hold.
    let up = mock_with(MockBehavior {
        chunks: 2_000_000,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let body = serde_json::to_string(&chat_body(false)).unwrap();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The handler is done once the request is counted.
    let requests = "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"m\",backend=\"b0\",status=\"200\"}";
    wait_for_async("the request finished", Duration::from_secs(30), || async {
        metric(&metrics_text(&gw).await, requests) == Some(1.0)
    })
    .await;
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_in_flight_requests"),
        Some(1.0),
        "the answer is not written yet, but its permit was released"
    );
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert!(answer.len() > 10_000_000);
    wait_for_async("the permit released", Duration::from_secs(10), || async {
        metric(&metrics_text(&gw).await, "llm_gateway_in_flight_requests") == Some(0.0)
    })
    .await;
}

/// A client that writes its whole over-limit body before it reads (as Node's `fetch` does)
/// still gets the 413, with `Connection: close`, instead of a broken pipe.
#[tokio::test]
async fn an_over_limit_body_written_whole_before_reading_gets_its_413() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let body = vec![b' '; 5 << 20];
    for chunked in [false, true] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head = if chunked {
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
                .to_owned()
        } else {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
        };
        s.write_all(head.as_bytes()).await.unwrap();
        if chunked {
            for part in body.chunks(64 * 1024) {
                s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(part).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
        } else {
            s.write_all(&body).await.expect("the whole body is taken");
        }
        let text = read_all(&mut s).await.to_lowercase();
        assert!(
            text.starts_with("http/1.1 413"),
            "chunked {chunked}: {text}"
        );
        assert!(text.contains("connection: close"), "{text}");
        assert!(text.contains("body_too_large"), "{text}");
    }
}

/// A chunked body that breaks off is reported as such, not as bad JSON.
#[tokio::test]
async fn a_broken_chunked_body_gets_its_own_code() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\nzz-not-a-chunk-size\r\n",
    )
    .await
    .unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"code\":\"invalid_body\""), "{text}");
}

/// RFC 9112: an HTTP/1.1 request without a Host header, or with two, is answered 400.
#[tokio::test]
async fn a_request_needs_exactly_one_host_header() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "")).await;
    for (request, status) in [
        ("GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (
            "GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "200",
        ),
        ("GET /health HTTP/1.0\r\n\r\n", "200"),
    ] {
        let version = &request[request.find("HTTP/").unwrap()..][..8];
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let text = read_all(&mut s).await;
        assert!(
            text.starts_with(&format!("{version} {status}")),
            "{request:?}: {text}"
        );
        if status == "400" {
            assert!(text.contains("invalid_host_header"), "{text}");
        }
    }
}

/// Reads `s` to its end (the server closes it), as text.
async fn read_all(s: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
        .await
        .expect("the server ends the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}
