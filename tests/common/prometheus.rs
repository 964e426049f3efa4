//! The real Prometheus tools from Debian's `prometheus` package (`.ci/run` installs it
//! without starting its service): `promtool`, and a throwaway Prometheus server that
//! scrapes a gateway and answers queries over its HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// `name` on `PATH`, or a failure that says how to get it.
pub fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH: install Debian's prometheus package (.ci/run does)")
        })
}

/// Runs `promtool ARGS` with `stdin`; returns (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: &str, dir: &Path) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A Prometheus server on a free port with its own data directory, scraping `targets`
/// every second; killed (and its directory removed) when dropped, and when the test
/// process dies (`setpriv --pdeathsig`).
pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it with `rule_files` (paths) and waits until it is ready.
    pub async fn start(targets: &[String], rule_files: &[PathBuf]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}\n", p.display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}scrape_configs:\n  - job_name: llm-gateway\n    static_configs:\n      - targets: {targets:?}\n",
            if rules.is_empty() {
                "  []\n".to_owned()
            } else {
                rules.concat()
            }
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // The port is free now; Prometheus binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        let p = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let ready = format!("{}/-/ready", p.url);
        let client = super::client();
        super::wait_for_async("Prometheus ready", Duration::from_secs(30), || async {
            client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        p
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` with `params`; the `data` of a success, or the error text.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let r = super::client()
            .get(format!("{}/api/v1/{path}?{}", self.url, query.join("&")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// The result vector of an instant query of `expr`.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `expr` returns at least one series; fails after 30 s with the last
    /// answer, naming `what`.
    pub async fn wait_for_series(&self, what: &str, expr: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let result = self.query(expr).await;
            if result.as_ref().is_ok_and(|v| !v.is_empty()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {expr} returns {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every target is up (scraped without error).
    pub async fn wait_until_scraped(&self, targets: usize) {
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.query("up == 1").await;
            if up.as_ref().is_ok_and(|v| v.len() == targets) {
                return;
            }
            if let Ok(t) = self.api("targets", &[]).await {
                last = t.to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "targets not up: {last}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `value` as a URL query value: every byte but the unreserved ones percent-encoded.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
