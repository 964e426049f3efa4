//! How the SSE relay writes to the client: events that arrive together go out together
//! (one HTTP chunk, so one write), and an event with nothing behind it is not held back.
//! A raw upstream on a real socket sends the events in HTTP chunks of its own, one per
//! event, as vLLM's server does.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

fn event(i: usize) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n")
}

/// `data` as one HTTP/1.1 chunk.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// A gateway whose only backend is the raw upstream at `addr`.
async fn gateway_for(addr: std::net::SocketAddr) -> Gateway {
    Gateway::start(&format!(
        "[health_check]\nenabled = false\n{}{}",
        backend("raw", &format!("http://{addr}/v1"), ""),
        model("m", &["raw"])
    ))
    .await
}

/// Sends a streamed chat request over a raw connection and returns the HTTP chunks of
/// the answer's body, in order.
async fn streamed_chunks(gw: &Gateway) -> Vec<String> {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("the answer ends")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, mut rest) = raw.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let mut chunks = Vec::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return chunks;
        }
        chunks.push(after[..size].to_owned());
        rest = &after[size + 2..];
    }
}

#[tokio::test]
/// Sixteen events and `[DONE]`, each in an HTTP chunk of its own but all in one write
/// from the upstream, reach the client in at most two chunks (each chunk the relay
/// passes on is one write to the client's socket), unchanged and in order.
async fn events_that_arrive_together_go_out_together() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let events: Vec<String> = (0..16)
        .map(event)
        .chain(["data: [DONE]\n\n".to_owned()])
        .collect();
    let answer = format!(
        "{HEAD}{}0\r\n\r\n",
        events.iter().map(|e| chunk(e)).collect::<String>()
    );
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        assert!(read_http_request(&mut s).await);
        s.write_all(answer.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let gw = gateway_for(addr).await;
    let chunks = streamed_chunks(&gw).await;
    assert_eq!(
        chunks.concat(),
        events.concat(),
        "events passed on unchanged"
    );
    assert!(
        chunks.len() <= 2,
        "{} chunks for 17 events that arrived at once: {chunks:?}",
        chunks.len()
    );
    upstream.await.unwrap();
    gw.stop().await;
}

#[tokio::test]
/// An event with nothing behind it goes out at once: the upstream sends the next one only
/// after the client has received the first.
async fn a_lone_event_is_not_held_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = oneshot::channel::<()>();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        assert!(read_http_request(&mut s).await);
        s.write_all(format!("{HEAD}{}", chunk(&event(0))).as_bytes())
            .await
            .unwrap();
        seen_rx.await.expect("the client saw the first event");
        let rest = format!("{}{}0\r\n\r\n", chunk(&event(1)), chunk("data: [DONE]\n\n"));
        s.write_all(rest.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let gw = gateway_for(addr).await;
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = String::new();
    while !got.contains(&event(0)) {
        let next = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("the first event arrives while the upstream waits")
            .unwrap()
            .expect("the stream is still open");
        got.push_str(std::str::from_utf8(&next).unwrap());
    }
    assert_eq!(got, event(0), "only the first event so far");
    seen_tx.send(()).unwrap();
    while let Some(next) = r.chunk().await.unwrap() {
        got.push_str(std::str::from_utf8(&next).unwrap());
    }
    assert_eq!(got, format!("{}{}data: [DONE]\n\n", event(0), event(1)));
    upstream.await.unwrap();
    gw.stop().await;
}
