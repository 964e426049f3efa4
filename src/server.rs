//! The server: accepts connections on already-bound listeners, serves them, and drains
//! in-flight requests and streams on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::KeyTable;
use crate::config::{Config, ConfigError};
use crate::ledger::Ledger;
use crate::ledger::spool::SpoolError;
use crate::metrics::Metrics;
use crate::stall::WriteStallGuard;
use crate::state::{AppState, Storage};
use crate::store::{Store, StoreError};
use crate::{auth, registry, routes, systemd, upstream};

/// Sockets the gateway serves on, bound by the caller (CLI, tests, or a service manager).
#[derive(Debug)]
pub struct Listeners {
    /// The API (and `/metrics` unless `metrics` is set).
    pub api: TcpListener,
    /// Optional separate listener for `/metrics`.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from `config.server`.
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        let api = TcpListener::bind(config.server.listen).await?;
        let metrics = match config.server.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self { api, metrics })
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration could not be turned into backends.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be opened, migrated or read at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger spool could not be opened.
    #[error("usage spool: {0}")]
    Spool(#[from] SpoolError),
}

/// Opens the database (migrating it), the spool, and the key table, and registers this
/// instance: everything that must work before the first request is accepted.
async fn open_storage(config: &Config) -> Result<(Store, Storage), ServeError> {
    let store = Store::open(config).await?;
    let metrics = Metrics::new();
    let ledger = Ledger::open(
        &config.ledger,
        &config.storage.state_dir(),
        metrics.ledger.clone(),
    )?;
    let keys = Arc::new(KeyTable::default());
    keys.replace(store.list_keys().await?);
    let instance_id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
    registry::register(&store, &instance_id, config).await?;
    tracing::info!(
        database = store.engine(),
        keys = keys.len(),
        auth = ?config.auth.mode,
        spool_bytes = ledger.spool_bytes(),
        instance = %instance_id,
        "storage ready"
    );
    let storage = Storage {
        keys,
        ledger: Arc::new(ledger),
        instance_id,
        db_engine: store.engine(),
        metrics,
    };
    Ok((store, storage))
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
/// streams finish for up to `server.shutdown_timeout`, and returns.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // A missing secret must stop the start before anything is created or migrated.
    let secrets = config.resolve_secrets()?;
    let (store, storage) = open_storage(&config).await?;
    let state = Arc::new(AppState::new(&config, secrets, storage)?);
    // Connections and background tasks are tracked apart: every connection (and with it
    // every request's ledger record) must be gone before the shipper's last flush.
    let tracker = TaskTracker::new();
    let connections = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let stop_ledger = CancellationToken::new();
    tracker.spawn(Arc::clone(&state.ledger).run_shipper(
        store.clone(),
        stop_ledger.clone(),
        config.server.shutdown_timeout,
    ));
    tracker.spawn(auth::refresh(
        Arc::clone(&state),
        store.clone(),
        config.auth.refresh_interval,
        stop_accepting.clone(),
    ));
    tracker.spawn(registry::heartbeat(
        Arc::clone(&state),
        store.clone(),
        registry::config_hash(&config),
        config.storage.heartbeat_interval,
        stop_accepting.clone(),
    ));
    let hard_stop = CancellationToken::new();
    let graceful = GracefulShutdown::new();

    if config.health_check.enabled && !state.backends.is_empty() {
        tracker.spawn(upstream::prober::run(
            state.backends.clone(),
            config.health_check.clone(),
            stop_accepting.clone(),
        ));
    }

    // HTTP/1.1 only: protocol detection (for cleartext HTTP/2) reads the first bytes with no
    // timeout, so a client that connects and sends nothing would be held forever. hyper's
    // header timer covers a silent new connection, slow headers and idle keep-alive alike.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout);
    let conn = ConnCtx {
        builder: &builder,
        graceful: &graceful,
        tracker: &connections,
        hard_stop: &hard_stop,
        nodelay: config.server.tcp_nodelay,
        write_stall_timeout: config.server.write_stall_timeout,
    };

    let api = routes::api(Arc::clone(&state), listeners.metrics.is_none());
    if let Ok(addr) = listeners.api.local_addr() {
        tracing::info!(%addr, models = state.models.len(), backends = state.backends.len(), "listening");
    }
    let accept_api = conn.accept_loop(listeners.api, api);
    // Listeners are bound (by the caller), the configuration is valid and the database is
    // migrated: ready. Then pings and status run until serve returns (the watchdog must
    // keep being fed during a drain).
    systemd::ready(&state);
    let stop_systemd = CancellationToken::new();
    let notifier = TaskTracker::new();
    notifier.spawn(systemd::run(Arc::clone(&state), stop_systemd.clone()));
    let accept_metrics = async {
        match listeners.metrics {
            Some(listener) => {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "metrics listening");
                }
                conn.accept_loop(listener, routes::metrics(Arc::clone(&state)))
                    .await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = accept_api => {}
        () = accept_metrics => {}
    }
    // Listeners are dropped here: new connection attempts are refused from now on.
    state.start_draining();
    systemd::stopping(state.backends.iter().map(|b| b.in_flight()).sum());
    stop_accepting.cancel();
    tracing::info!(
        timeout = ?config.server.shutdown_timeout,
        in_flight = state.backends.iter().map(|b| b.in_flight()).sum::<usize>(),
        "shutting down: finishing in-flight requests"
    );
    let drained = tokio::time::timeout(config.server.shutdown_timeout, graceful.shutdown()).await;
    if drained.is_err() {
        tracing::warn!("shutdown timeout reached: closing remaining connections");
        hard_stop.cancel();
    }
    connections.close();
    connections.wait().await;
    // Every request has finished and written its record: ship what is left.
    stop_ledger.cancel();
    tracker.close();
    tracker.wait().await;
    // The watchdog keeps pinging until everything else has finished.
    stop_systemd.cancel();
    notifier.close();
    notifier.wait().await;
    if let Err(e) = store.mark_stopped(&state.instance_id).await {
        tracing::warn!(error = %e, "cannot mark this instance stopped in the registry");
    }
    store.close().await;
    tracing::info!("shutdown complete");
    Ok(())
}

struct ConnCtx<'a> {
    builder: &'a http1::Builder,
    graceful: &'a GracefulShutdown,
    tracker: &'a TaskTracker,
    hard_stop: &'a CancellationToken,
    nodelay: bool,
    write_stall_timeout: Duration,
}

impl ConnCtx<'_> {
    /// Accepts until dropped; each connection runs as a tracked task.
    async fn accept_loop(&self, listener: TcpListener, app: Router) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.nodelay
                && let Err(e) = stream.set_nodelay(true)
            {
                tracing::debug!(error = %e, %peer, "TCP_NODELAY failed");
            }
            let service = TowerToHyperService::new(app.clone());
            let io = TokioIo::new(WriteStallGuard::new(stream, self.write_stall_timeout));
            let connection = self.builder.serve_connection(io, service);
            let connection = self.graceful.watch(connection);
            let hard_stop = self.hard_stop.clone();
            self.tracker.spawn(async move {
                tokio::select! {
                    result = connection => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                    }
                    () = hard_stop.cancelled() => {}
                }
            });
        }
    }
}
