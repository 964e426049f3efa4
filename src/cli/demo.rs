//! `llm-gateway demo` and `llm-gateway mock-upstream`: the gateway on the bundled mock
//! upstream, with a throwaway state directory and a demo key; and the mock on its own.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::admin;
use super::run::{next_signal, runtime, serve_until_signalled};
use crate::config::{Config, ConfigError};
use crate::mock::{MockBehavior, MockState};
use crate::runtime::listeners::Listeners;
use crate::runtime::logging;

pub(super) fn run(listen: SocketAddr) -> anyhow::Result<()> {
    runtime(0)?.block_on(async {
        let mock_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind the mock upstream")?;
        let mock_addr = mock_listener.local_addr()?;
        // A fresh directory with a random name, readable by this user only; removed when
        // `state` is dropped, also when the start fails.
        let state = tempfile::Builder::new()
            .prefix("llm-gateway-demo-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("cannot create the demo's state directory")?;
        let state_dir = state.path().to_owned();
        let config = demo_config(listen, mock_addr, &state_dir)?;
        let _log = logging::init(&config.logging, &crate::runtime::telemetry::Telemetry::default());
        let listeners = Listeners::bind(&config).await.with_context(|| {
            format!("cannot bind {listen}; pick another address with --listen (e.g. --listen 127.0.0.1:0 for any free port)")
        })?;
        let bound = listeners.api.local_addr()?;
        let key = admin::demo_key(&config).await?;
        eprintln!(
            "\nDEMO MODE: the gateway on http://{bound} serves model \"demo\" from a bundled MOCK \
             upstream on {mock_addr}\n(it is not a language model). Usage goes to a SQLite ledger in \
             {}, removed at exit.\nA demo API key was created (60 requests/minute). Try:\n\n  \
             curl -s http://{bound}/v1/chat/completions -H 'content-type: application/json' \\\n    \
             -H 'authorization: Bearer {key}' \\\n    \
             -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\nCtrl-C stops it.\n",
            state_dir.display()
        );
        let (mock_stop_tx, mock_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mock = crate::mock::serve(
            mock_listener,
            MockState::new(MockBehavior::default()),
            async {
                let _ = mock_stop_rx.await;
            },
        );
        let gateway = async {
            let result = serve_until_signalled(config, listeners, None).await;
            let _ = mock_stop_tx.send(());
            result
        };
        let (gateway, mock) = tokio::join!(gateway, mock);
        if let Err(e) = state.close() {
            tracing::warn!(error = %e, dir = %state_dir.display(), "cannot remove the demo state");
        }
        mock.context("mock upstream failed")?;
        gateway
    })
}

pub(super) fn run_mock(
    listen: SocketAddr,
    chunks: usize,
    chunk_interval: std::time::Duration,
) -> anyhow::Result<()> {
    runtime(0)?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot bind {listen}"))?;
        eprintln!("mock upstream (not a language model) on http://{listen}/v1");
        let behavior = MockBehavior {
            chunks,
            chunk_interval,
            ..MockBehavior::default()
        };
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        crate::mock::serve(listener, MockState::new(behavior), async move {
            next_signal(&mut term, &mut int).await;
        })
        .await?;
        Ok(())
    })
}

/// The configuration `llm-gateway demo` runs: one model on the bundled mock upstream.
/// Keys are required, as in production; the usage ledger is SQLite in `state_dir`.
fn demo_config(
    listen: SocketAddr,
    mock: SocketAddr,
    state_dir: &Path,
) -> Result<Config, ConfigError> {
    let state_dir = toml::Value::String(state_dir.display().to_string());
    let text = format!(
        r#"
[server]
listen = "{listen}"

[storage]
state_dir = {state_dir}

[[backends]]
name = "mock"
base_url = "http://{mock}/v1"

[[models]]
name = "demo"
routes = [{{ backend = "mock" }}]
"#
    );
    Config::from_toml(&text)
}
