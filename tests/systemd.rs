//! The notify protocol and the watchdog, against the real binary with a unix datagram
//! socket standing in for systemd's `NOTIFY_SOCKET`. (Behaviour under a real systemd is
//! the VM tests' job.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, config_for, mock, with_test_storage};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;

const BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// Kills the gateway if a test fails before it stopped it (an orphan would hold the test
/// harness's output pipe open).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Next notify message, or a failure after `limit`.
async fn next(sock: &UnixDatagram, limit: Duration) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, sock.recv(&mut buf))
        .await
        .expect("a notify message in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Messages until one contains `what`; returns it and the ones before.
async fn until(sock: &UnixDatagram, what: &str) -> (String, Vec<String>) {
    let mut before = Vec::new();
    loop {
        let m = next(sock, Duration::from_secs(20)).await;
        if m.lines().any(|l| l == what) {
            return (m, before);
        }
        before.push(m);
    }
}

#[tokio::test]
async fn ready_after_bind_watchdog_at_half_the_interval_and_stopping_at_sigterm() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config_path = dir.path().join("gw.toml");
    std::fs::write(
        &config_path,
        with_test_storage(&config_for(&[&up], ""), &dir.path().join("state")),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .env("LLM_GATEWAY__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = &mut Reap(child).0;

    let (ready, before) = until(&sock, "READY=1").await;
    assert!(before.is_empty(), "nothing before READY: {before:?}");
    assert!(ready.contains("STATUS=serving 1 models"), "{ready}");
    // READY means the listener is bound: the first request after it is answered.
    let r = client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // WATCHDOG_USEC = 200 ms: a ping every 100 ms.
    let mut pings = 0;
    let mut first = None;
    while pings < 6 {
        let m = next(&sock, Duration::from_secs(5)).await;
        if m.lines().any(|l| l == "WATCHDOG=1") {
            first.get_or_insert_with(Instant::now);
            pings += 1;
        }
    }
    let five_intervals = first.unwrap().elapsed();
    assert!(
        five_intervals >= Duration::from_millis(400)
            && five_intervals <= Duration::from_millis(850),
        "5 watchdog intervals took {five_intervals:?} (expected ~500 ms)"
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let (stopping, _) = until(&sock, "STOPPING=1").await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn nothing_is_sent_when_the_watchdog_is_meant_for_another_process() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config_path = dir.path().join("gw.toml");
    std::fs::write(
        &config_path,
        with_test_storage(&config_for(&[&up], ""), &dir.path().join("state")),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .env("LLM_GATEWAY__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "100000")
        .env("WATCHDOG_PID", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = &mut Reap(child).0;
    until(&sock, "READY=1").await;
    // Over ten would-be watchdog intervals, no ping arrives (status refreshes are 5 s apart).
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        sock.recv(&mut buf),
    )
    .await
    {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !m.lines().any(|l| l == "WATCHDOG=1"),
            "ping for another process's watchdog"
        );
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}
