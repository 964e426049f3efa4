//! The `llm-gateway` binary: parses the command line and runs the library.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use llm_gateway::cli::{Cli, Command};
use llm_gateway::mock::{MockBehavior, MockState};
use llm_gateway::reload::{LoadConfig, Reload, SetLogLevel};
use llm_gateway::{Config, Listeners, activation, admin, serve_with_reload, telemetry};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc::error::TrySendError;

/// mimalloc: the proxy path allocates many small, short-lived buffers; the system
/// allocator spent about 16 % of the instructions per request on them (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve { config } => load(&config).and_then(|c| {
            let log = telemetry::init(&c.logging);
            run_serve(c, config, log)
        }),
        Command::Demo { listen } => run_demo(listen),
        Command::Migrate { config } => admin(&config, |c| async move { admin::migrate(&c).await }),
        Command::Keys { config, action } => match config {
            Some(config) => admin(&config, |c| async move { admin::keys(&c, action).await }),
            None => Err(anyhow::anyhow!(
                "keys: --config (or LLM_GATEWAY_CONFIG) is required"
            )),
        },
        Command::Usage { config, since, by } => {
            admin(
                &config,
                |c| async move { admin::usage(&c, since, by).await },
            )
        }
        Command::Instances { config } => {
            admin(&config, |c| async move { admin::instances(&c).await })
        }
        Command::MockUpstream {
            listen,
            chunks,
            chunk_interval,
        } => run_mock(listen, chunks, chunk_interval),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(Some(path)).with_context(|| format!("invalid configuration {}", path.display()))
}

/// Runs an operator command on a small runtime and prints its output.
fn admin<F, Fut>(path: &Path, command: F) -> anyhow::Result<()>
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<String, admin::AdminError>>,
{
    let config = load(path)?;
    let out = runtime(1)?.block_on(command(config))?;
    print!("{out}");
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    println!(
        "{}: ok ({} models, {} backends)",
        path.display(),
        config.models.len(),
        config.backends.len()
    );
    Ok(())
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_serve(
    config: Config,
    path: std::path::PathBuf,
    log: telemetry::LogControl,
) -> anyhow::Result<()> {
    // Before the runtime starts any thread: this edits the environment.
    let passed = activation::take()?;
    runtime(config.server.worker_threads)?.block_on(async {
        let listeners = match passed {
            Some(passed) => Listeners::from_passed(passed, &config)
                .await
                .context("cannot use the passed sockets")?,
            None => Listeners::bind(&config)
                .await
                .context("cannot bind listener")?,
        };
        let load: LoadConfig = std::sync::Arc::new(move || Config::load(Some(&path)));
        let set_log_level: SetLogLevel = Box::new(move |level: &str| log.set_level(level));
        serve_until_signalled(config, listeners, Some((load, set_log_level))).await
    })
}

/// Serves until SIGTERM/SIGINT, then drains; a second signal exits at once. SIGHUP
/// reloads the configuration from `reload`'s source and applies its log level (without
/// one, SIGHUP is ignored).
async fn serve_until_signalled(
    config: Config,
    listeners: Listeners,
    reload: Option<(LoadConfig, SetLogLevel)>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // One pending request is enough: signals during a reload lead to one more reload.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let reload = reload.map(|(load, set_log_level)| Reload {
        requests: reload_rx,
        load,
        set_log_level: Some(set_log_level),
    });
    let server = serve_with_reload(
        config,
        listeners,
        async {
            let _ = stop_rx.await;
        },
        reload,
    );
    tokio::pin!(server);
    loop {
        tokio::select! {
            result = &mut server => return Ok(result?),
            () = next_signal(&mut term, &mut int) => break,
            _ = hup.recv() => {
                if let Err(TrySendError::Closed(())) = reload_tx.try_send(()) {
                    tracing::warn!("SIGHUP ignored: no configuration file to reload");
                }
            }
        }
    }
    tracing::info!("signal received: draining (send it again to exit at once)");
    let _ = stop_tx.send(());
    loop {
        tokio::select! {
            result = &mut server => return Ok(result?),
            () = next_signal(&mut term, &mut int) => {
                tracing::warn!("second signal: exiting without waiting");
                std::process::exit(1);
            }
            _ = hup.recv() => tracing::warn!("SIGHUP ignored: shutting down"),
        }
    }
}

async fn next_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn run_demo(listen: std::net::SocketAddr) -> anyhow::Result<()> {
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
        let config = Config::demo(listen, mock_addr, &state_dir)?;
        let _log = telemetry::init(&config.logging);
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
        let mock = llm_gateway::mock::serve(
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

fn run_mock(
    listen: std::net::SocketAddr,
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
        llm_gateway::mock::serve(listener, MockState::new(behavior), async move {
            next_signal(&mut term, &mut int).await;
        })
        .await?;
        Ok(())
    })
}
