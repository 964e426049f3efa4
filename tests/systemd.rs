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

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{chat_body, client, config_for, get_json, get_text, mock_with, with_test_storage};
use llm_gateway::mock::MockBehavior;
use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;

use common::process::{BIN, GatewayProcess, Launch};

/// What systemd provides a service: a `NOTIFY_SOCKET` (a datagram socket read by the
/// test), a state directory, a config file, and a mock upstream behind it.
struct Manager {
    sock: UnixDatagram,
    sock_path: PathBuf,
    config: PathBuf,
    /// The config file's first content.
    toml: String,
    _dir: tempfile::TempDir,
    _up: llm_gateway::mock::MockUpstream,
}

impl Manager {
    async fn new() -> Self {
        let up = mock_with(MockBehavior {
            chunks: 10,
            chunk_interval: Duration::from_millis(100),
            ..MockBehavior::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        let config = dir.path().join("gw.toml");
        let toml = with_test_storage(&config_for(&[&up], ""), &dir.path().join("state"));
        std::fs::write(&config, &toml).unwrap();
        Self {
            sock,
            sock_path,
            config,
            toml,
            _dir: dir,
            _up: up,
        }
    }

    /// `serve` with this manager's `NOTIFY_SOCKET`.
    fn launch(&self) -> Launch {
        Launch::serve(&self.config).env("NOTIFY_SOCKET", self.sock_path.to_str().unwrap())
    }

    /// Starts the gateway on a socket passed to it; `env` entries with an empty value are
    /// removed from the environment.
    fn start(&self, env: &[(&str, &str)]) -> GatewayProcess {
        self.launch().envs(env).spawn()
    }

    /// Starts the gateway the way systemd socket activation does, with these sockets (by
    /// name); `server.listen` is a port the test holds: binding it would fail.
    fn start_activated(
        &self,
        sockets: &[(&std::net::TcpListener, &str)],
        blocked: &std::net::TcpListener,
    ) -> GatewayProcess {
        let launch = self.launch().env(
            "LLM_GATEWAY__SERVER__LISTEN",
            &blocked.local_addr().unwrap().to_string(),
        );
        sockets
            .iter()
            .fold(launch, |l, (socket, name)| l.socket(socket, name))
            .spawn()
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
    let m = Manager::new().await;
    // The gateway binds its own socket here (port 0), as without socket activation.
    let mut g = m
        .launch()
        .binding_itself()
        .env("WATCHDOG_USEC", "200000")
        .spawn();

    let (ready, before) = until(&m.sock, "READY=1").await;
    assert!(before.is_empty(), "nothing before READY: {before:?}");
    assert!(ready.contains("STATUS=serving 1 models"), "{ready}");
    // READY means the listener is bound: it listens now, and the first request after
    // READY is answered.
    g.learn_port();
    let r = client().get(g.at("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // WATCHDOG_USEC = 200 ms: a ping every 100 ms. The median gap between pings is
    // checked, so one stall of a loaded machine does not decide the test; pings at the full
    // interval would give ~200 ms.
    let mut at = Vec::new();
    while at.len() < 8 {
        let msg = next(&m.sock, Duration::from_secs(5)).await;
        if msg.lines().any(|l| l == "WATCHDOG=1") {
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
    let (stopping, _) = until(&m.sock, "STOPPING=1").await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
}

#[tokio::test]
async fn nothing_is_sent_when_the_watchdog_is_meant_for_another_process() {
    let m = Manager::new().await;
    let mut g = m.start(&[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")]);
    until(&m.sock, "READY=1").await;
    // Over ten would-be watchdog intervals, no ping arrives (status refreshes are 5 s apart).
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        m.sock.recv(&mut buf),
    )
    .await
    {
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !msg.lines().any(|l| l == "WATCHDOG=1"),
            "ping for another process's watchdog"
        );
    }
    assert!(g.terminate().success());
}

/// A long watchdog (`WatchdogSec=60s`, systemd's usual range) is pinged at once and then
/// at half its interval: not held back to, or sped up to, the 5 s status refresh.
#[tokio::test]
async fn a_long_watchdog_is_pinged_at_once_and_not_with_each_status_refresh() {
    let m = Manager::new().await;
    let mut g = m.start(&[("WATCHDOG_USEC", "60000000")]);
    until(&m.sock, "READY=1").await;
    let ready_at = Instant::now();
    let mut pings = Vec::new();
    // Until the first status refresh (5 s after start): the pings sent by then.
    loop {
        let msg = next(&m.sock, Duration::from_secs(20)).await;
        if msg.lines().any(|l| l == "WATCHDOG=1") {
            pings.push(ready_at.elapsed());
        }
        if msg.lines().any(|l| l.starts_with("STATUS=serving")) {
            break;
        }
    }
    assert_eq!(pings.len(), 1, "pings before the first refresh: {pings:?}");
    assert!(
        pings[0] < Duration::from_millis(2500),
        "first ping {:?} after READY (expected at once)",
        pings[0]
    );
    assert!(g.terminate().success());
}

#[tokio::test]
async fn passed_sockets_are_served_by_name_and_server_listen_is_not_bound() {
    let m = Manager::new().await;
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blocked = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Metrics first: the names decide, not the order.
    let mut g = m.start_activated(&[(&metrics, "metrics"), (&api, "api")], &blocked);
    until(&m.sock, "READY=1").await;
    let api_port = api.local_addr().unwrap().port();
    let metrics_port = metrics.local_addr().unwrap().port();
    assert_eq!(g.port, metrics_port);
    let get = |port: u16, path: &'static str| async move {
        client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(get(api_port, "/health").await.status(), 200);
    // The API socket does not serve /metrics when a metrics socket was passed.
    assert_eq!(get(api_port, "/metrics").await.status(), 404);
    let text = get(metrics_port, "/metrics").await.text().await.unwrap();
    assert!(text.contains("llm_gateway_build_info"), "{text}");
    assert!(g.terminate().success());
}

// Multi-threaded: the mock upstream must keep answering while a test thread waits for the
// first gateway to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_passed_sockets_refuses_no_connection() {
    let m = Manager::new().await;
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blocked = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/v1/chat/completions",
        api.local_addr().unwrap().port()
    );
    let mut first = m.start_activated(&[(&api, "api")], &blocked);
    until(&m.sock, "READY=1").await;

    // Four clients open a new connection per request, without pause, across the restart.
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ok, stop, url) = (ok.clone(), stop.clone(), url.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut failures = Vec::new();
                while !stop.is_cancelled() {
                    match http.post(&url).json(&chat_body(false)).send().await {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(r) => failures.push(format!("status {}", r.status())),
                        Err(e) => failures.push(format!("{e:?}")),
                    }
                }
                failures
            })
        })
        .collect();
    let served = || ok.load(std::sync::atomic::Ordering::Relaxed);
    common::wait_for(
        "requests before the restart",
        Duration::from_secs(20),
        || served() >= 10,
    )
    .await;
    assert!(tokio::task::block_in_place(|| first.terminate()).success());
    let before = served();
    // Between the two processes, new connections wait in the socket's backlog.
    let _second = m.start_activated(&[(&api, "api")], &blocked);
    common::wait_for(
        "requests after the restart",
        Duration::from_secs(20),
        || served() >= before + 10,
    )
    .await;
    stop.cancel();
    for c in clients {
        let failures = c.await.unwrap();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
    }
}

/// A streamed chat completion that has sent its first chunk.
async fn open_stream(g: &GatewayProcess) -> reqwest::Response {
    let mut r = client()
        .post(g.at("/v1/chat/completions"))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    r
}

/// Reads the rest of a stream; fails unless it ends with `[DONE]`.
async fn finish_stream(mut r: reqwest::Response) {
    let mut rest = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
}

/// One keep-alive HTTP/1.1 connection, to show a reload leaves it open.
struct KeepAlive(tokio::net::TcpStream);

impl KeepAlive {
    async fn open(g: &GatewayProcess) -> Self {
        Self(
            tokio::net::TcpStream::connect(("127.0.0.1", g.port))
                .await
                .unwrap(),
        )
    }

    /// GETs `path` on this connection; returns the body.
    async fn get(&mut self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n");
        self.0.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if buf.len() >= end + 4 + length {
                    return text[end + 4..end + 4 + length].to_owned();
                }
            }
        }
    }
}

async fn model_ids(g: &GatewayProcess) -> Vec<String> {
    let v = get_json(g.at("/v1/models")).await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn sighup_swaps_the_configuration_without_dropping_a_stream_or_a_connection() {
    let m = Manager::new().await;
    let g = m.start(&[]);
    until(&m.sock, "READY=1").await;
    let mut conn = KeepAlive::open(&g).await;
    assert!(conn.get("/v1/models").await.contains("\"id\":\"m\""));
    let stream = open_stream(&g).await;

    // Model "m" becomes "m2"; one key that only applies at start changes too.
    let renamed = m.toml.replace("name = \"m\"", "name = \"m2\"");
    std::fs::write(
        &m.config,
        format!("[server]\nheader_read_timeout = \"7s\"\n{renamed}"),
    )
    .unwrap();
    g.signal(Signal::SIGHUP);
    let (reloading, _) = until(&m.sock, "RELOADING=1").await;
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec.parse::<u64>().unwrap() > 0, "{reloading}");
    let (ready, _) = until(&m.sock, "READY=1").await;
    assert!(
        ready.contains("restart to apply server.header_read_timeout"),
        "{ready}"
    );
    assert!(!ready.contains("FAILED"), "{ready}");

    // The new configuration is in effect for new requests...
    assert_eq!(model_ids(&g).await, ["m2"]);
    let old = client()
        .post(g.at("/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 404);
    // ...the open connection still answers, now from it...
    assert!(conn.get("/v1/models").await.contains("\"id\":\"m2\""));
    // ...and the stream that started before finishes on the old one.
    finish_stream(stream).await;
    let text = get_text(g.at("/metrics")).await;
    assert_eq!(
        common::metric(
            &text,
            "llm_gateway_config_reloads_total{result=\"success\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn an_invalid_configuration_on_sighup_leaves_the_running_one_in_effect() {
    let m = Manager::new().await;
    let g = m.start(&[]);
    until(&m.sock, "READY=1").await;
    let stream = open_stream(&g).await;

    std::fs::write(
        &m.config,
        format!("[upstream]\nmax_attempts = \"three\"\n{}", m.toml),
    )
    .unwrap();
    g.signal(Signal::SIGHUP);
    until(&m.sock, "RELOADING=1").await;
    let (ready, _) = until(&m.sock, "READY=1").await;
    assert!(ready.contains("RELOAD FAILED"), "{ready}");
    assert!(ready.contains("upstream.max_attempts"), "{ready}");

    assert_eq!(model_ids(&g).await, ["m"]);
    finish_stream(stream).await;
    let text = get_text(g.at("/metrics")).await;
    let value = |series: &str| common::metric(&text, series);
    assert_eq!(
        value("llm_gateway_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("llm_gateway_config_last_reload_successful"),
        Some(0.0)
    );
    let health = get_json(g.at("/health")).await;
    let note = health["config"]["last_reload"].as_str().unwrap();
    assert!(note.contains("upstream.max_attempts"), "{note}");

    // Fixed: the next reload applies and clears the failure.
    std::fs::write(&m.config, m.toml.replace("name = \"m\"", "name = \"m2\"")).unwrap();
    g.signal(Signal::SIGHUP);
    until(&m.sock, "RELOADING=1").await;
    let (ready, _) = until(&m.sock, "READY=1").await;
    assert!(!ready.contains("RELOAD"), "{ready}");
    assert_eq!(model_ids(&g).await, ["m2"]);
    let text = get_text(g.at("/metrics")).await;
    assert_eq!(
        common::metric(&text, "llm_gateway_config_last_reload_successful"),
        Some(1.0)
    );
}

/// Series labelled with a model or a backend that a reload removed are forgotten (a
/// dashboard would show them forever, at their last value); the others keep counting.
#[tokio::test]
async fn a_reload_forgets_the_series_of_removed_models_and_backends() {
    let m = Manager::new().await;
    let extra = format!(
        "{}{}",
        common::backend("gone-b", &m._up.base_url(), ""),
        common::model("gone-m", &["gone-b"])
    );
    std::fs::write(&m.config, format!("{}{extra}", m.toml)).unwrap();
    let g = m.start(&[]);
    until(&m.sock, "READY=1").await;
    for model in ["m", "gone-m"] {
        for stream in [false, true] {
            let r = client()
                .post(g.at("/v1/chat/completions"))
                .json(&serde_json::json!({"model": model, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    let before = get_text(g.at("/metrics")).await;
    assert!(before.contains("\"gone-m\""), "{before}");
    assert!(before.contains("\"gone-b\""), "{before}");

    std::fs::write(&m.config, &m.toml).unwrap();
    g.signal(Signal::SIGHUP);
    until(&m.sock, "RELOADING=1").await;
    let (ready, _) = until(&m.sock, "READY=1").await;
    assert!(!ready.contains("RELOAD"), "{ready}");

    let after = get_text(g.at("/metrics")).await;
    let stale: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("\"gone-m\"") || l.contains("\"gone-b\""))
        .collect();
    assert!(stale.is_empty(), "series of removed routes: {stale:#?}");
    let kept = "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"m\",backend=\"b0\",status=\"200\"}";
    assert_eq!(common::metric(&after, kept), Some(2.0), "{after}");
    assert_eq!(
        common::metric(&after, "llm_gateway_backend_up{backend=\"b0\"}"),
        Some(1.0),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_notify_drains_streams_refuses_new_connections_and_keeps_the_ledger() {
    let m = Manager::new().await;
    let mut g = m.start(&[]);
    until(&m.sock, "READY=1").await;
    // A connection with no request yet, accepted before the streams' connections.
    let mut quiet = KeepAlive::open(&g).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open_stream(&g).await);
    }

    g.signal(Signal::SIGTERM);
    let (stopping, _) = until(&m.sock, "STOPPING=1").await;
    assert!(
        stopping.contains("STATUS=draining: 3 requests in flight"),
        "{stopping}"
    );
    // The listener is closed before STOPPING=1 is sent.
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", g.port)).await;
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // The quiet connection still gets its first request answered: not ready, draining.
    let ready = quiet.get("/ready").await;
    assert!(ready.contains("draining"), "{ready}");
    for s in streams {
        finish_stream(s).await;
    }
    let status = tokio::task::block_in_place(|| g.child.wait().unwrap());
    assert_eq!(status.code(), Some(0));

    // Every request is in the ledger after the exit (the drain flushed the spool).
    let out = Command::new(BIN)
        .args(["usage", "--by", "model", "--since", "1h", "--config"])
        .arg(&m.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let requests: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("m "))
        .unwrap_or_else(|| panic!("no row for model m: {text}"))
        .split_whitespace()
        .collect();
    // MODEL REQUESTS ...: the three streams (/ready is not a proxied request).
    assert_eq!(requests[1], "3", "{text}");
}

/// Starts the gateway with stderr on a pipe whose device and inode are in
/// `JOURNAL_STREAM`, the way systemd starts a service with `StandardError=journal`.
/// With `journal_dir`, it runs in a mount namespace (`unshare`) where
/// `/run/systemd/journal` is that directory, so a socket the test binds there is
/// "journald". Returns the service and the pipe's read end.
fn start_journaled(
    m: &Manager,
    journal_dir: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> (GatewayProcess, std::io::PipeReader) {
    use std::os::unix::fs::MetadataExt;
    let (reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::File::from(OwnedFd::from(writer.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let mut launch = m.launch();
    if let Some(dir) = journal_dir {
        launch = launch.wrapped_in(&[
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs none /run/systemd && mkdir /run/systemd/journal && \
             mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
            dir.to_str().unwrap(),
        ]);
    }
    let process = launch
        .env("JOURNAL_STREAM", &format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(writer)
        .envs(env)
        .spawn();
    (process, reader)
}

/// Parses one journald native-protocol datagram: `NAME=value\n`, or `NAME\n`, a 64-bit
/// little-endian length, the value and `\n`.
fn journal_fields(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    while !d.is_empty() {
        let end = d.iter().position(|&b| b == b'\n' || b == b'=').unwrap();
        let name = String::from_utf8_lossy(&d[..end]).into_owned();
        let value;
        if d[end] == b'=' {
            let nl = d[end..].iter().position(|&b| b == b'\n').unwrap() + end;
            value = d[end + 1..nl].to_vec();
            d = &d[nl + 1..];
        } else {
            let len = u64::from_le_bytes(d[end + 1..end + 9].try_into().unwrap()) as usize;
            value = d[end + 9..end + 9 + len].to_vec();
            d = &d[end + 9 + len + 1..];
        }
        fields.insert(name, String::from_utf8_lossy(&value).into_owned());
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stderr_on_the_journal_events_go_to_journald_with_structured_fields() {
    let m = Manager::new().await;
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = UnixDatagram::bind(journal_dir.path().join("socket")).unwrap();
    let (mut g, mut stderr) =
        start_journaled(&m, Some(journal_dir.path()), &[("RUST_LOG", "info")]);
    until(&m.sock, "READY=1").await;
    let r = client()
        .post(g.at("/v1/chat/completions"))
        .header("x-request-id", "journal-test-1")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut buf = vec![0u8; 65536];
    let access = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), journal.recv(&mut buf))
            .await
            .expect("the access event reaches journald")
            .unwrap();
        let fields = journal_fields(&buf[..n]);
        if fields.get("MESSAGE").map(String::as_str) == Some("request finished") {
            break fields;
        }
    };
    let field = |k: &str| access.get(k).map(String::as_str);
    assert_eq!(
        field("SYSLOG_IDENTIFIER"),
        Some("llm-gateway"),
        "{access:?}"
    );
    assert_eq!(field("REQUEST_ID"), Some("journal-test-1"), "{access:?}");
    assert_eq!(field("MODEL"), Some("m"));
    assert_eq!(field("BACKEND"), Some("b0"));
    assert_eq!(field("STATUS"), Some("200"));
    assert!(field("LATENCY_MS").unwrap().parse::<f64>().unwrap() > 0.0);
    // Not also written to stderr.
    assert!(tokio::task::block_in_place(|| g.terminate()).success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(!rest.contains("request finished"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_journald_socket_logs_go_to_stderr_with_a_warning() {
    let m = Manager::new().await;
    let empty = tempfile::tempdir().unwrap();
    let (mut g, mut stderr) = start_journaled(
        &m,
        Some(empty.path()),
        &[("LLM_GATEWAY__LOGGING__OUTPUT", "journald")],
    );
    until(&m.sock, "READY=1").await;
    let r = client().get(g.at("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(tokio::task::block_in_place(|| g.terminate()).success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    assert!(
        text.contains("cannot write to journald; logging to stderr instead"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_log_level() {
    let m = Manager::new().await;
    std::fs::write(
        &m.config,
        format!("[logging]\nlevel = \"warn\"\n{}", m.toml),
    )
    .unwrap();
    let (mut g, mut stderr) = start_journaled(
        &m,
        None,
        &[("RUST_LOG", ""), ("LLM_GATEWAY__LOGGING__OUTPUT", "stderr")],
    );
    until(&m.sock, "READY=1").await;
    let send = |id: &'static str| {
        client()
            .post(g.at("/v1/chat/completions"))
            .header("x-request-id", id)
            .json(&chat_body(false))
            .send()
    };
    assert_eq!(send("logged-at-warn").await.unwrap().status(), 200);
    std::fs::write(
        &m.config,
        format!("[logging]\nlevel = \"info\"\n{}", m.toml),
    )
    .unwrap();
    g.signal(Signal::SIGHUP);
    until(&m.sock, "RELOADING=1").await;
    let (ready, _) = until(&m.sock, "READY=1").await;
    assert!(!ready.contains("RELOAD"), "{ready}");
    assert_eq!(send("logged-at-info").await.unwrap().status(), 200);
    assert!(tokio::task::block_in_place(|| g.terminate()).success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    assert!(!text.contains("logged-at-warn"), "{text}");
    assert!(text.contains("logged-at-info"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "no colour codes off a terminal: {text}"
    );
}
