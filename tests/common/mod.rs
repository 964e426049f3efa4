//! Test support: a gateway on port 0 in this process, the gateway binary as a child
//! process (`process.rs`), mock upstreams, the Prometheus tools (`prometheus.rs`), and
//! waiting helpers.
#![allow(dead_code, reason = "each test crate uses a subset")]
pub mod pg;
pub mod process;
pub mod prometheus;
pub mod tmpfs;

use std::net::SocketAddr;
use std::time::Duration;

use llm_gateway::mock::{MockBehavior, MockUpstream};
use llm_gateway::{Config, Listeners, ServeError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A gateway serving on 127.0.0.1:0 until stopped or dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The state directory (SQLite database and spool) unless the config names one.
    pub state_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Gateway {
    /// Starts a gateway from a TOML config (its listen addresses are replaced by port 0).
    pub async fn start(toml: &str) -> Self {
        Self::start_with(toml, false).await
    }

    /// Like `start`, optionally with a separate metrics listener.
    /// Without `[storage]` the gateway gets a fresh state directory (SQLite); without
    /// `[auth]` it runs in open mode.
    pub async fn start_with(toml: &str, metrics_listener: bool) -> Self {
        let state_dir = tempfile::tempdir().unwrap();
        let toml = with_test_storage(toml, state_dir.path());
        let config = Config::from_toml(&toml).expect("test config is valid");
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = if metrics_listener {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let addr = api.local_addr().unwrap();
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(llm_gateway::serve(
            config,
            Listeners { api, metrics },
            async {
                let _ = rx.await;
            },
        ));
        let mut gw = Self {
            addr,
            metrics_addr,
            state_dir,
            stop: Some(tx),
            task: Some(task),
        };
        gw.until_serving().await;
        gw
    }

    /// Waits until `/health` answers; fails with serve's error if it ended instead.
    async fn until_serving(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if client().get(self.url("/health")).send().await.is_ok() {
                return;
            }
            if self.task.as_ref().is_some_and(JoinHandle::is_finished) {
                let result = self.task.take().unwrap().await.unwrap();
                panic!("gateway did not start: {result:?}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway never served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown; returns the serve task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), ServeError>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("gateway already stopped")
    }

    /// Shuts down and waits for `serve` to return.
    pub async fn stop(mut self) {
        let task = self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("gateway stops")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Adds a `[storage]` in `dir` and open-mode `[auth]` where the config has none.
pub fn with_test_storage(toml: &str, dir: &std::path::Path) -> String {
    let mut toml = toml.to_owned();
    if !toml.contains("[storage]") {
        toml.push_str(&format!(
            "\n[storage]\nstate_dir = {:?}\n",
            dir.to_str().unwrap()
        ));
    }
    if !toml.contains("[auth]") {
        toml.push_str("\n[auth]\nmode = \"open\"\n");
    }
    toml
}

/// Reads one HTTP/1.1 request (headers and Content-Length body) from `s`; false on EOF.
pub async fn read_http_request(s: &mut tokio::net::TcpStream) -> bool {
    read_http_request_head(s).await.is_some()
}

/// Reads one HTTP/1 request (head and `content-length` body); returns its head, `None`
/// when the connection ends first.
pub async fn read_http_request_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(s, &mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::io::AsyncReadExt::read_exact(s, &mut body)
        .await
        .ok()?;
    Some(head)
}

/// A mock upstream with default behaviour.
pub async fn mock() -> MockUpstream {
    MockUpstream::start(MockBehavior::default()).await.unwrap()
}

/// A mock upstream with the given behaviour.
pub async fn mock_with(b: MockBehavior) -> MockUpstream {
    MockUpstream::start(b).await.unwrap()
}

/// `[[backends]]` entries for `(name, base_url, extra TOML lines)`.
pub fn backend(name: &str, base_url: &str, extra: &str) -> String {
    format!("[[backends]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\n{extra}\n")
}

/// A model routed to the named backends.
pub fn model(name: &str, backends: &[&str]) -> String {
    let routes: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ backend = \"{b}\" }}"))
        .collect();
    format!(
        "[[models]]\nname = \"{name}\"\nroutes = [{}]\n",
        routes.join(", ")
    )
}

/// Config with one model "m" on the given mocks (backends named b0, b1, ...).
/// Health checks off unless `extra` turns them on.
pub fn config_for(mocks: &[&MockUpstream], extra: &str) -> String {
    let mut s = String::from(extra);
    s.push_str("\n[health_check]\nenabled = false\n");
    let names: Vec<String> = (0..mocks.len()).map(|i| format!("b{i}")).collect();
    for (i, m) in mocks.iter().enumerate() {
        s.push_str(&backend(&names[i], &m.base_url(), ""));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    s.push_str(&model("m", &refs));
    s
}

thread_local! {
    /// Building a client loads the system's root certificates (~tens of ms); each test
    /// runs on its own thread with its own runtime, so one client per thread is safe.
    static CLIENT: reqwest::Client = reqwest::Client::builder().no_proxy().build().unwrap();
}

/// The test's HTTP client (pooled connections are reused within a test).
pub fn client() -> reqwest::Client {
    CLIENT.with(Clone::clone)
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "m",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

/// Polls `cond` until true, failing after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the async `cond` until true, failing after `limit`.
pub async fn wait_for_async<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a metric sample value from Prometheus text (`name{labels} value`).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// POSTs the standard chat body (streaming or not) to the gateway.
pub async fn chat(gw: &Gateway, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(stream))
        .send()
        .await
        .unwrap()
}

/// `GET url` as JSON.
pub async fn get_json(url: String) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET url` as text.
pub async fn get_text(url: String) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `GET /health` as JSON.
pub async fn health(gw: &Gateway) -> serde_json::Value {
    get_json(gw.url("/health")).await
}

/// `GET /metrics` as text.
pub async fn metrics_text(gw: &Gateway) -> String {
    get_text(gw.url("/metrics")).await
}

/// The usage spool of state directory `dir`, opened as an earlier run would have left it
/// (the gateway must not be running on it).
pub fn spool_in(dir: &std::path::Path) -> llm_gateway::testing::Spool {
    llm_gateway::testing::Spool::open(llm_gateway::testing::SpoolConfig {
        dir: dir.join("spool"),
        segment_bytes: 1 << 20,
        max_bytes: 1 << 30,
    })
    .unwrap()
}
