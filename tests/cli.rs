//! The real `llm-gateway` binary: commands, config errors, env overrides, credentials and
//! signals.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use llm_gateway::mock::MockBehavior;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::process::{BIN, GatewayProcess, Launch};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A file in its own temporary directory, removed when dropped; derefs to its path.
struct TempFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

fn temp_file(name: &str, content: &str) -> TempFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    TempFile { _dir: dir, path }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_and_help_document_the_commands() {
    let v = run(&["--version"], &[]);
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("llm-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let h = run(&["--help"], &[]);
    let text = String::from_utf8_lossy(&h.stdout);
    for word in [
        "serve",
        "check-config",
        "demo",
        "mock-upstream",
        "migrate",
        "keys",
        "usage",
        "instances",
        "LLM_GATEWAY__",
    ] {
        assert!(text.contains(word), "--help mentions {word}: {text}");
    }
    let h = run(&["serve", "--help"], &[]);
    assert!(String::from_utf8_lossy(&h.stdout).contains("--config"));
}

#[test]
fn example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/llm-gateway.toml");
    let o = run(&["check-config", "--config", example], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (3 models, 3 backends)"));
}

#[test]
fn check_config_names_the_bad_key() {
    let valid = "[[backends]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\n[[models]]\nname = \"m\"\nroutes = [{ backend = \"a\" }]\n";
    let cases: &[(&str, &str)] = &[
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n",
            "server.bogus: unknown field",
        ),
        ("[server]\nlisten = \"not an address\"\n", "server.listen"),
        (
            "[upstream]\nretry_budget = \"ten seconds\"\n",
            "upstream.retry_budget",
        ),
        (
            "[upstream]\nmax_attempts = 0\n",
            "upstream.max_attempts: must be >= 1",
        ),
        ("[logging]\nformat = \"xml\"\n", "logging.format"),
        (
            "[[backends]]\nname = \"b\"\nbase_url = \"ftp://x\"\n",
            "backends[0].base_url",
        ),
        (
            "[[backends]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n",
            "backends[1].name: \"a\" is used by two backends",
        ),
        (
            "[[backends]]\nname = \"b\"\nbase_url = \"http://x/v1\"\napi_key = \"sk-LEAK\"\n",
            "backends.0.api_key: must be",
        ),
        (
            "[[models]]\nname = \"n\"\nroutes = [{ backend = \"nope\" }]\n",
            "models[0].routes[0].backend: no backend named \"nope\"",
        ),
        (
            "[storage]\ndatabase_url = \"mysql://db/x\"\n",
            "storage.database_url: must start with sqlite:, postgres: or postgresql:",
        ),
        (
            "[storage]\ndatabase_url = \"postgres://u:sk-LEAK@db/x\"\n",
            "storage.database_url: must not carry a password",
        ),
        ("[auth]\nmode = \"none\"\n", "auth.mode"),
        (
            "[ledger]\nbatch_size = 0\n",
            "ledger.batch_size: must be 1-10000",
        ),
        ("[ledger]\non_full = \"ignore\"\n", "ledger.on_full"),
        // Durations so large that a deadline computed from them would overflow.
        (
            "[server]\nshutdown_timeout = \"100000years\"\n",
            "server.shutdown_timeout: must be at most 365 days",
        ),
        (
            "[ledger]\nflush_interval = \"400days\"\n",
            "ledger.flush_interval: must be at most 365 days",
        ),
        (
            "[circuit_breaker]\nopen_duration = \"1000years\"\n",
            "circuit_breaker.open_duration: must be at most 365 days",
        ),
        (
            "[[backends]]\nname = \"b\"\nbase_url = \"http://x/v1\"\nstream_idle_timeout = \"9999years\"\n",
            "backends[0].stream_idle_timeout: must be at most 365 days",
        ),
        (
            "[server]\nmax_header_bytes = 100\n",
            "server.max_header_bytes: must be 8192-1048576",
        ),
        (
            "[[backends]]\nname = \"b\"\nbase_url = \"http://x/v1\"\nweight = 4294967295\n",
            "backends[0].weight: must be 1-1000000",
        ),
        (
            "[server]\nmax_connections = 0\n",
            "server.max_connections: must be >= 1",
        ),
    ];
    for (extra, expected) in cases {
        let path = temp_file("c.toml", &format!("{extra}\n{valid}"));
        let o = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(1), "{extra}");
        let err = stderr(&o);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert!(
            !err.contains("sk-LEAK"),
            "a secret pasted into the config is not echoed"
        );
    }
    let path = temp_file("c.toml", "[server]\nlisten = \"127.0.0.1:1\"\n");
    let o = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(stderr(&o).contains("models: at least one [[models]] entry is required"));
    let o = run(&["check-config", "--config", "/nonexistent.toml"], &[]);
    assert!(stderr(&o).contains("no such file"));
}

#[test]
fn environment_overrides_are_applied_and_checked() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/llm-gateway.toml");
    let o = run(
        &["check-config", "--config", example],
        &[("LLM_GATEWAY__SERVER__MAX_BODY_BYTES", "0")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("server.max_body_bytes: must be > 0"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &["check-config", "--config", example],
        &[("LLM_GATEWAY__UPSTREAM__MAX_ATTEMPTS", "many")],
    );
    assert!(
        stderr(&o).contains("upstream.max_attempts"),
        "{}",
        stderr(&o)
    );
}

/// The gateway process with its config file and state directory (removed when dropped).
struct Proc {
    process: GatewayProcess,
    _config: TempFile,
    _state: tempfile::TempDir,
}

impl std::ops::Deref for Proc {
    type Target = GatewayProcess;
    fn deref(&self) -> &GatewayProcess {
        &self.process
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut GatewayProcess {
        &mut self.process
    }
}

/// Runs `llm-gateway serve` on a socket passed to it, with stderr piped, and returns once
/// `/health` answers.
async fn spawn_gateway(config: &str, env: &[(&str, &str)]) -> Proc {
    spawn_gateway_with(config, env, |l| l).await
}

/// [`spawn_gateway`] with more set on the launch.
async fn spawn_gateway_with(
    config: &str,
    env: &[(&str, &str)],
    more: impl FnOnce(Launch) -> Launch,
) -> Proc {
    let state = tempfile::tempdir().unwrap();
    let path = temp_file("gw.toml", &common::with_test_storage(config, state.path()));
    let process = more(Launch::serve(&path))
        .envs(env)
        .stderr(Stdio::piped())
        .start()
        .await;
    Proc {
        process,
        _config: path,
        _state: state,
    }
}

/// A non-streamed chat completion through the gateway process, without a key.
async fn plain_chat(gw: &Proc) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
}

/// Starts a streamed chat completion through the gateway process.
async fn start_stream(
    gw: &Proc,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + use<> {
    client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap()
        .bytes_stream()
}

fn gateway_config(base_url: &str, backend_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[health_check]\nenabled = false\n{}{}",
        backend("b", base_url, backend_extra),
        model("m", &["b"])
    )
}

#[tokio::test]
async fn serve_reads_credentials_and_env_overrides() {
    let up = mock().await;
    let creds = temp_file("upstream-key", "sk-from-credential\n");
    // The config says listen = 127.0.0.1:1; LLM_GATEWAY__SERVER__LISTEN (127.0.0.1:0)
    // overrides it, and the gateway binds that itself.
    let gw = spawn_gateway_with(
        &gateway_config(
            &up.base_url(),
            "api_key = { credential = \"upstream-key\" }",
        ),
        &[(
            "CREDENTIALS_DIRECTORY",
            creds.parent().unwrap().to_str().unwrap(),
        )],
        Launch::binding_itself,
    )
    .await;
    assert_ne!(gw.port, 1, "LLM_GATEWAY__SERVER__LISTEN not applied");
    let r = plain_chat(&gw).await;
    assert_eq!(r.status(), 200);
    let auth = up.state.last_request().unwrap().authorization;
    assert_eq!(auth.as_deref(), Some("Bearer sk-from-credential"));
}

#[test]
fn serve_fails_clearly_when_a_credential_is_missing() {
    let path = temp_file(
        "gw.toml",
        &gateway_config("http://127.0.0.1:9/v1", "api_key = { credential = \"k\" }"),
    );
    let o = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("backends[0].api_key: credential \"k\": $CREDENTIALS_DIRECTORY is not set"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn sigterm_drains_streams_then_exits_zero() {
    let up = mock_with(MockBehavior {
        chunks: 20,
        chunk_interval: Duration::from_millis(25),
        ..Default::default()
    })
    .await;
    let mut gw = spawn_gateway(&gateway_config(&up.base_url(), ""), &[]).await;
    let mut body = std::pin::pin!(start_stream(&gw).await);
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    kill(Pid::from_raw(gw.child.id() as i32), Signal::SIGTERM).unwrap();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream completed: {text}"
    );
    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(up.state.completed_streams.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let up = mock_with(MockBehavior {
        chunks: 1000,
        chunk_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let mut gw = spawn_gateway(&gateway_config(&up.base_url(), ""), &[]).await;
    let mut body = std::pin::pin!(start_stream(&gw).await);
    body.next().await.unwrap().unwrap();
    let pid = Pid::from_raw(gw.child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    // Still draining: the 100 s stream keeps flowing.
    body.next().await.unwrap().unwrap();
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "first signal drains, does not exit"
    );
    kill(pid, Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            let s = gw.child.wait().unwrap();
            std::mem::forget(gw);
            s
        }),
    )
    .await
    .expect("second signal exits without waiting for the stream")
    .unwrap();
    assert_eq!(status.code(), Some(1));
}

/// SIGTERMs the gateway and waits for it; its exit status and output.
async fn sigterm_and_collect(mut gw: Proc) -> Output {
    kill(Pid::from_raw(gw.child.id() as i32), Signal::SIGTERM).unwrap();
    tokio::task::spawn_blocking(move || {
        let child = std::mem::replace(&mut gw.child, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn one_structured_log_event_per_request_without_prompts_or_keys() {
    let up = mock().await;
    let gw = spawn_gateway(
        &gateway_config(&up.base_url(), ""),
        &[
            ("LLM_GATEWAY__LOGGING__FORMAT", "json"),
            ("RUST_LOG", "info"),
        ],
    )
    .await;
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "SECRET-PROMPT-MARKER"}],
    });
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("authorization", "Bearer sk-CLIENT-KEY-MARKER")
        .header("x-request-id", "log-test-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let output = sigterm_and_collect(gw).await;
    assert!(output.status.success());
    let log = String::from_utf8(output.stderr).unwrap();
    assert!(
        !log.contains("SECRET-PROMPT-MARKER"),
        "prompt logged: {log}"
    );
    assert!(
        !log.contains("CLIENT-KEY-MARKER"),
        "authorization logged: {log}"
    );
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|e: &serde_json::Value| e["message"] == "request finished")
        .collect();
    assert_eq!(events.len(), 1, "{log}");
    let e = &events[0];
    assert_eq!(e["span"]["request_id"], "log-test-1", "{e}");
    assert_eq!(e["model"], "m");
    assert_eq!(e["backend"], "b");
    assert_eq!(e["status"], 200);
    assert_eq!(e["completion_tokens"], 8);
    assert_eq!(e["tokens_estimated"], false);
    assert!(e["latency_ms"].as_f64().unwrap() > 0.0);
}

/// `logging.access_log = "errors"` logs only what went wrong; "off" logs no request.
#[tokio::test]
async fn the_access_log_can_keep_only_errors_or_nothing() {
    let up = mock().await;
    for (setting, expected) in [("errors", vec![404]), ("off", vec![])] {
        let gw = spawn_gateway(
            &gateway_config(&up.base_url(), ""),
            &[
                ("LLM_GATEWAY__LOGGING__FORMAT", "json"),
                ("LLM_GATEWAY__LOGGING__ACCESS_LOG", setting),
                ("RUST_LOG", "info"),
            ],
        )
        .await;
        for model in ["m", "m", "nope"] {
            let r = client()
                .post(format!("{}/v1/chat/completions", gw.url))
                .json(&serde_json::json!({"model": model, "messages": []}))
                .send()
                .await
                .unwrap();
            r.bytes().await.unwrap();
        }
        let output = sigterm_and_collect(gw).await;
        let log = String::from_utf8(output.stderr).unwrap();
        let statuses: Vec<u64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["message"] == "request finished")
            .map(|e| e["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, expected, "access_log = {setting}: {log}");
    }
}

/// The operator commands against one SQLite state directory, as an operator runs them.
#[test]
fn keys_usage_instances_and_migrate_commands() {
    let state = tempfile::tempdir().unwrap();
    let config = temp_file(
        "gw.toml",
        &format!(
            "{}\n[storage]\nstate_dir = {:?}\n",
            gateway_config("http://127.0.0.1:1/v1", ""),
            state.path().to_str().unwrap()
        ),
    );
    let cfg = config.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = run(args, &[]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(ok(&["migrate", "--config", cfg]).contains("sqlite: migrated"));

    let created = ok(&[
        "keys",
        "create",
        "--config",
        cfg,
        "--name",
        "team-a",
        "--models",
        "m",
        "--rpm",
        "60",
        "--expires",
        "30d",
    ]);
    let secret = created.lines().next().unwrap();
    assert!(secret.starts_with("sk-lgw-"), "{created}");
    let id = &secret["sk-lgw-".len()..][..16];
    // The secret is never stored or listed.
    let list = ok(&["keys", "list", "--config", cfg]);
    assert!(
        list.contains(id) && list.contains("team-a") && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(secret));
    let tail = secret.rsplit('-').next().unwrap();
    for file in ["llm-gateway.db", "llm-gateway.db-wal"] {
        let bytes = std::fs::read(state.path().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(tail.len()).any(|w| w == tail.as_bytes()),
            "secret stored in clear in {file}"
        );
    }
    // Positive control: the search above does find what is stored, the hash.
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
    let stored = ["llm-gateway.db", "llm-gateway.db-wal"].iter().any(|f| {
        let bytes = std::fs::read(state.path().join(f)).unwrap_or_default();
        bytes.windows(hash.len()).any(|w| w == hash.as_bytes())
    });
    assert!(stored, "the key's hash is in the database");

    assert!(ok(&["keys", "revoke", "--config", cfg, id]).contains("revoked"));
    assert!(ok(&["keys", "list", "--config", cfg]).contains("revoked"));
    let again = run(&["keys", "revoke", "--config", cfg, id], &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("no active key"));

    for (args, expected) in [
        (
            vec!["--models", "unknown"],
            "--models: \"unknown\" is not a model",
        ),
        (vec!["--expires", "yesterday"], "--expires \"yesterday\""),
        (vec!["--rpm", "0"], "--rpm and --tpm must be >= 1"),
    ] {
        let mut a = vec!["keys", "create", "--config", cfg, "--name", "x"];
        a.extend(args);
        let o = run(&a, &[]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(expected), "{}", stderr(&o));
    }

    let usage = ok(&["usage", "--config", cfg, "--since", "1h", "--by", "model"]);
    assert!(
        usage.contains("MODEL") && usage.contains("REQUESTS"),
        "{usage}"
    );
    let instances = ok(&["instances", "--config", cfg]);
    assert!(instances.starts_with("ID"), "{instances}");
}

#[tokio::test]
async fn a_key_created_by_the_command_is_accepted_by_the_running_service() {
    let up = mock().await;
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[storage]\nstate_dir = {:?}\n[auth]\nmode = \"keys\"\nrefresh_interval = \"100ms\"\n",
        gateway_config(&up.base_url(), ""),
        state.path().to_str().unwrap()
    );
    let gw = spawn_gateway(&config, &[]).await;
    let r = plain_chat(&gw).await;
    assert_eq!(r.status(), 401);
    let path = temp_file("gw.toml", &config);
    let o = run(
        &[
            "keys",
            "create",
            "--config",
            path.to_str().unwrap(),
            "--name",
            "n",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let secret = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&secret)
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 401);
        assert!(tokio::time::Instant::now() < deadline, "key never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The demo on port 0 says which port it bound, keeps its state in a private directory with
/// a random name, and removes it at exit; on a taken port it says how to pick another and
/// leaves nothing behind.
#[tokio::test]
async fn the_demo_binds_any_port_keeps_its_state_private_and_cleans_up() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Ctrl-C stops it") {
            break;
        }
    }
    let url = banner
        .split("the gateway on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in the banner: {banner}"))
        .to_owned();
    assert!(!url.ends_with(":0"), "the banner shows port 0: {banner}");
    let key = banner
        .split("Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap()
        .to_owned();
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{banner}");
    let dirs: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("llm-gateway-demo-"), "{name}");
    assert_ne!(
        name,
        format!("llm-gateway-demo-{}", child.id()),
        "predictable name"
    );
    let mode = std::fs::metadata(&dirs[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "demo state readable by others: {mode:o}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!dirs[0].exists(), "demo state left behind");

    // The port is taken now (by this listener): a clear error, nothing left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--listen"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "state left behind"
    );
}

#[tokio::test]
/// `server.worker_threads` is the number of request worker threads (each with its own
/// runtime), and requests are served on them.
async fn worker_threads_sets_the_number_of_request_workers() {
    let up = mock().await;
    let config = format!(
        "[server]\nworker_threads = 3\n[health_check]\nenabled = false\n{}{}",
        backend("b", &up.base_url(), ""),
        model("m", &["b"])
    );
    let gw = spawn_gateway(&config, &[]).await;
    let r = plain_chat(&gw).await;
    assert_eq!(r.status(), 200);
    let tasks = format!("/proc/{}/task", gw.child.id());
    let mut workers: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("llm-gw-worker-"))
        .collect();
    workers.sort();
    assert_eq!(
        workers,
        ["llm-gw-worker-0", "llm-gw-worker-1", "llm-gw-worker-2"],
        "threads of the gateway"
    );
}

/// A TLS front for `upstream` on 127.0.0.1 with a certificate for that address, issued by a
/// fresh CA. Returns the port and the CA certificate (PEM).
async fn tls_front(upstream: std::net::SocketAddr) -> (u16, String, tokio::task::JoinHandle<()>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                // A handshake the client aborts (untrusted certificate) just ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, ca.pem(), task)
}

#[tokio::test]
async fn an_https_backend_is_reached_over_tls_verified_against_the_trust_store() {
    let up = mock().await;
    let (port, ca_pem, front) = tls_front(up.addr).await;
    let config = gateway_config(&format!("https://127.0.0.1:{port}/v1"), "");
    let ca = temp_file("ca.pem", &ca_pem);

    // SSL_CERT_FILE adds the CA to the platform's trust store (as for reqwest).
    let gw = spawn_gateway(&config, &[("SSL_CERT_FILE", ca.to_str().unwrap())]).await;
    let r = plain_chat(&gw).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(up.state.requests.load(Ordering::Relaxed), 1);
    let mut body = std::pin::pin!(start_stream(&gw).await);
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream over TLS: {text}"
    );
    drop(gw);

    // Without it the certificate is not trusted: no request reaches the backend.
    let gw = spawn_gateway(&config, &[]).await;
    let r = plain_chat(&gw).await;
    assert_eq!(r.status(), 502);
    assert_eq!(up.state.requests.load(Ordering::Relaxed), 2);
    front.abort();
}
