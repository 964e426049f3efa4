//! Configuration reload (SIGHUP, `systemctl reload`): read the configuration and its
//! secrets again, validate, and swap what they build in one step; an invalid new
//! configuration leaves the running one in effect.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::secret::Secret;
use crate::config::{Config, ConfigError};
use crate::runtime::state::{AppState, Configured, ReloadNote};
use crate::runtime::systemd;

/// Reads and validates the configuration (file and environment) again.
pub type LoadConfig = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Applies a new `logging.level`.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What `serve` needs to reload: when, and where the configuration comes from.
pub struct Reload {
    /// One message per reload request (e.g. per SIGHUP). A request made while a reload
    /// is running leads to one more reload after it.
    pub requests: mpsc::Receiver<()>,
    /// Where the configuration comes from.
    pub load: LoadConfig,
    /// Applies `logging.level`; `None` leaves logging alone.
    pub set_log_level: Option<SetLogLevel>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload").finish_non_exhaustive()
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("logging.level: {0}")]
    LogLevel(String),
    #[error("the configuration could not be read: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Keys that only take effect at start (listeners, runtime, storage, log format).
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.server, &new.server);
    [
        (
            "upstream.stored_responses_max",
            running.upstream.stored_responses_max != new.upstream.stored_responses_max,
        ),
        ("server.listen", a.listen != b.listen),
        (
            "server.metrics_listen",
            a.metrics_listen != b.metrics_listen,
        ),
        (
            "server.worker_threads",
            a.worker_threads != b.worker_threads,
        ),
        (
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        (
            "server.write_stall_timeout",
            a.write_stall_timeout != b.write_stall_timeout,
        ),
        ("server.tcp_nodelay", a.tcp_nodelay != b.tcp_nodelay),
        (
            "server.max_connections",
            a.max_connections != b.max_connections,
        ),
        (
            "server.max_header_bytes",
            a.max_header_bytes != b.max_header_bytes,
        ),
        (
            "server.listen_backlog",
            a.listen_backlog != b.listen_backlog,
        ),
        ("storage", running.storage != new.storage),
        ("ledger", running.ledger != new.ledger),
        ("tracing", running.tracing != new.tracing),
        (
            "logging.format",
            running.logging.format != new.logging.format,
        ),
        (
            "logging.output",
            running.logging.output != new.logging.output,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Serves reload requests until `stop`. `started` is the configuration the process
/// started with: keys that only take effect at start are compared against it.
pub async fn run(
    state: Arc<AppState>,
    mut reload: Reload,
    started: Config,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            request = reload.requests.recv() => if request.is_none() { return },
        }
        systemd::reloading();
        tracing::info!("reloading the configuration");
        let note = match apply(&state, &reload, &started).await {
            Ok(restart_needed) if restart_needed.is_empty() => {
                tracing::info!(config = %state.current().config_hash, "configuration reloaded");
                None
            }
            Ok(restart_needed) => {
                tracing::warn!(
                    keys = %restart_needed.join(", "),
                    "configuration reloaded; these keys changed but take effect only at the next restart"
                );
                Some(ReloadNote::RestartNeeded(restart_needed))
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; the previous configuration stays in effect");
                Some(ReloadNote::Failed(e.to_string()))
            }
        };
        state
            .metrics
            .config_reload(!matches!(note, Some(ReloadNote::Failed(_))));
        state.set_reload_note(note);
        systemd::ready(&state);
    }
}

/// Loads, builds and swaps; returns the changed keys that need a restart.
async fn apply(
    state: &AppState,
    reload: &Reload,
    started: &Config,
) -> Result<Vec<&'static str>, ReloadError> {
    // Files (configuration, secrets) are read off the runtime's workers.
    let load = Arc::clone(&reload.load);
    let (config, secrets) = tokio::task::spawn_blocking(
        move || -> Result<(Config, Vec<Option<Secret>>), ConfigError> {
            let config = load()?;
            let secrets = config.resolve_secrets()?;
            Ok((config, secrets))
        },
    )
    .await??;
    let restart_needed = restart_only_changes(started, &config);
    let next = Configured::build(config, secrets, Some(&state.current()))?;
    if let Some(set) = &reload.set_log_level {
        set(&next.config.logging.level).map_err(ReloadError::LogLevel)?;
    }
    let previous = state.replace(next);
    // Requests that started before keep `previous` (and its backends) until they end; the
    // series of what this configuration dropped are forgotten.
    drop(previous);
    let current = state.current();
    state
        .metrics
        .retain_routes(&current.model_order, &current.backends);
    Ok(restart_needed)
}

#[cfg(test)]
mod tests {
    use super::restart_only_changes;
    use crate::config::Config;

    #[test]
    fn only_start_time_keys_are_reported() {
        let routes = "[[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                      [[models]]\nname = \"m\"\nroutes = [{ backend = \"b\" }]\n";
        let a = Config::from_toml(routes).unwrap();
        let b = Config::from_toml(&format!(
            "[server]\nlisten = \"127.0.0.1:9999\"\nmax_body_bytes = 10\n[ledger]\nbatch_size = 7\n\
             [auth]\nmode = \"open\"\n{routes}"
        ))
        .unwrap();
        assert_eq!(restart_only_changes(&a, &b), ["server.listen", "ledger"]);
        assert!(restart_only_changes(&a, &a).is_empty());
    }
}
