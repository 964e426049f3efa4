//! Running a command: the runtime it gets, `serve` until a signal (SIGTERM/SIGINT drain,
//! SIGHUP reloads), and the operator commands' output. `anyhow` is used here, at the edge,
//! and nowhere else.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc::error::TrySendError;

use super::args::{Cli, Command};
use super::{admin, demo};
use crate::config::Config;
use crate::runtime::listeners::Listeners;
use crate::runtime::reload::{LoadConfig, Reload, SetLogLevel};
use crate::runtime::server::serve_with_reload;
use crate::runtime::telemetry::Telemetry;
use crate::runtime::{activation, logging};

/// Runs the command line `std::env::args` gives; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve { config } => load(&config).and_then(|c| {
            // Before the runtime: the exporter has a thread and an HTTP client of its own.
            let telemetry = Telemetry::start(&c.tracing).map_err(anyhow::Error::msg)?;
            let log = logging::init(&c.logging, &telemetry);
            let result = run_serve(c, config, log);
            telemetry.shutdown();
            result
        }),
        Command::Demo { listen } => demo::run(listen),
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
        } => demo::run_mock(listen, chunks, chunk_interval),
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
    let out = control_runtime()?.block_on(command(config))?;
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

/// The runtime of `serve`'s own thread and the operator commands: background tasks and
/// accepting only; requests run on the request workers `serve` starts
/// (`runtime/workers.rs`).
fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A multi-threaded runtime (the demo and the mock upstream); 0 workers: one per CPU.
pub(super) fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
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
    log: logging::LogControl,
) -> anyhow::Result<()> {
    // Before the runtime starts any thread: this edits the environment.
    let passed = activation::take()?;
    control_runtime()?.block_on(async {
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
pub(super) async fn serve_until_signalled(
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

pub(super) async fn next_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
