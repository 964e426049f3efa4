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

/// The gateway binary on a free port with a datagram socket as its `NOTIFY_SOCKET`.
struct Notified {
    child: std::process::Child,
    sock: UnixDatagram,
    port: u16,
    _dir: tempfile::TempDir,
    _up: llm_gateway::mock::MockUpstream,
}

impl Notified {
    async fn start(env: &[(&str, &str)]) -> Self {
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
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            sock,
            port,
            _dir: dir,
            _up: up,
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

/// Kills the gateway if a test fails before it stopped it (an orphan would hold the test
/// harness's output pipe open).
impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let mut g = Notified::start(&[("WATCHDOG_USEC", "200000")]).await;

    let (ready, before) = until(&g.sock, "READY=1").await;
    assert!(before.is_empty(), "nothing before READY: {before:?}");
    assert!(ready.contains("STATUS=serving 1 models"), "{ready}");
    // READY means the listener is bound: the first request after it is answered.
    let r = client()
        .get(format!("http://127.0.0.1:{}/health", g.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // WATCHDOG_USEC = 200 ms: a ping every 100 ms. The median gap between pings is
    // checked, so one stall of a loaded machine does not decide the test; pings at the full
    // interval would give ~200 ms.
    let mut at = Vec::new();
    while at.len() < 8 {
        let m = next(&g.sock, Duration::from_secs(5)).await;
        if m.lines().any(|l| l == "WATCHDOG=1") {
            at.push(Instant::now());
        }
    }
    let mut gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(
        median >= Duration::from_millis(60) && median <= Duration::from_millis(160),
        "median watchdog interval {median:?} (expected ~100 ms): {gaps:?}"
    );

    // The socket keeps what was sent until it is read.
    let status = g.terminate();
    assert!(status.success(), "{status}");
    let (stopping, _) = until(&g.sock, "STOPPING=1").await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
}

#[tokio::test]
async fn nothing_is_sent_when_the_watchdog_is_meant_for_another_process() {
    let mut g = Notified::start(&[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")]).await;
    until(&g.sock, "READY=1").await;
    // Over ten would-be watchdog intervals, no ping arrives (status refreshes are 5 s apart).
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        g.sock.recv(&mut buf),
    )
    .await
    {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !m.lines().any(|l| l == "WATCHDOG=1"),
            "ping for another process's watchdog"
        );
    }
    assert!(g.terminate().success());
}
