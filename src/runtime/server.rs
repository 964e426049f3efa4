//! The server's life: opens storage, builds the shared state, starts the background tasks,
//! the request workers (`workers.rs`) and the accept loops (`connections.rs`) on
//! already-bound listeners (`listeners.rs`), applies reloads, and on shutdown drains
//! in-flight requests and streams within one deadline before the ledger's last flush.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::keys;
use crate::access::keys::KeyTable;
use crate::api::routes;
use crate::config::{Config, ConfigError};
use crate::runtime::connections::ConnCtx;
use crate::runtime::listeners::Listeners;
use crate::runtime::metrics::Metrics;
use crate::runtime::reload::{self, Reload};
use crate::runtime::state::{AppState, Storage};
use crate::runtime::systemd;
use crate::runtime::workers::{WorkerError, Workers};
use crate::storage::database::{Store, StoreError};
use crate::storage::ledger::Ledger;
use crate::storage::ledger::spool::SpoolError;
use crate::storage::registry;
use crate::upstream;

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
    /// The request workers could not start.
    #[error(transparent)]
    Workers(#[from] WorkerError),
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
    serve_with_reload(config, listeners, shutdown, None).await
}

/// `serve`, reloading the configuration whenever `reload` asks for it.
pub async fn serve_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    reload: Option<Reload>,
) -> Result<(), ServeError> {
    // A missing secret must stop the start before anything is created or migrated.
    let secrets = config.resolve_secrets()?;
    let (store, storage) = open_storage(&config).await?;
    let state = Arc::new(AppState::new(config.clone(), secrets, storage)?);
    // Connections and background tasks are tracked apart: every connection (and with it
    // every request's ledger record) must be gone before the shipper's last flush.
    let tracker = TaskTracker::new();
    let connections = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let stop_ledger = CancellationToken::new();
    let stop_background = CancellationToken::new();
    tracker.spawn(Arc::clone(&state.ledger).run_shipper(
        store.clone(),
        config.storage.query_timeout,
        stop_ledger.clone(),
        stop_background.clone(),
    ));
    tracker.spawn(keys::refresh(
        Arc::clone(&state),
        store.clone(),
        stop_accepting.clone(),
    ));
    tracker.spawn(registry::heartbeat(
        Arc::clone(&state),
        store.clone(),
        config.storage.heartbeat_interval,
        stop_accepting.clone(),
    ));
    tracker.spawn(upstream::prober::run(
        Arc::clone(&state),
        stop_accepting.clone(),
    ));
    if let Some(reload) = reload {
        tracker.spawn(reload::run(
            Arc::clone(&state),
            reload,
            config.clone(),
            stop_accepting.clone(),
        ));
    }
    let hard_stop = CancellationToken::new();
    let drain = CancellationToken::new();
    let workers = Workers::start(config.server.workers())?;

    // HTTP/1.1 only: protocol detection (for cleartext HTTP/2) reads the first bytes with no
    // timeout, so a client that connects and sends nothing would be held forever. hyper's
    // header timer covers a silent new connection, slow headers and idle keep-alive alike.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout)
        .max_buf_size(config.server.max_header_bytes);
    let conn = ConnCtx {
        builder: &builder,
        drain: &drain,
        tracker: &connections,
        hard_stop: &hard_stop,
        first_request_grace: config.server.header_read_timeout,
        nodelay: config.server.tcp_nodelay,
        write_stall_timeout: config.server.write_stall_timeout,
        max_connections: config.server.max_connections,
        metrics: &state.metrics,
        workers: &workers,
    };

    let api = routes::api(Arc::clone(&state), listeners.metrics.is_none());
    if let Ok(addr) = listeners.api.local_addr() {
        let current = state.current();
        tracing::info!(%addr, models = current.models.len(), backends = current.backends.len(), workers = workers.count(), "listening");
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
    let in_flight = state.metrics.in_flight_requests();
    systemd::stopping(in_flight);
    stop_accepting.cancel();
    // One deadline for the whole shutdown (the timeout in effect now: a reload may have
    // changed it). Requests get it but a reserve, kept for the ledger's last flush and the
    // registry; what cannot be done by the deadline is left (unshipped records stay in the
    // spool for the next start).
    let shutdown_timeout = state.current().config.server.shutdown_timeout;
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    let requests_deadline = deadline - (shutdown_timeout / 5).min(SHUTDOWN_RESERVE);
    tracing::info!(
        timeout = ?shutdown_timeout,
        in_flight,
        "shutting down: finishing in-flight requests"
    );
    drain.cancel();
    connections.close();
    let drained = tokio::time::timeout_at(requests_deadline, connections.wait()).await;
    if drained.is_err() {
        tracing::warn!("shutdown timeout reached: closing remaining connections");
        hard_stop.cancel();
        connections.wait().await;
    }
    workers.stop().await;
    // Every request has finished and written its record: ship what is left.
    stop_ledger.cancel();
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        // Every background step races this token: they end at once.
        stop_background.cancel();
        tracker.wait().await;
    }
    // The watchdog keeps pinging until everything else has finished.
    stop_systemd.cancel();
    notifier.close();
    notifier.wait().await;
    let last = (deadline.max(tokio::time::Instant::now() + LAST_WORDS))
        .min(tokio::time::Instant::now() + config.storage.query_timeout);
    match tokio::time::timeout_at(last, store.mark_stopped(&state.instance_id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot mark this instance stopped in the registry")
        }
        Err(_) => {
            tracing::warn!("the database did not answer; this instance is not marked stopped")
        }
    }
    if tokio::time::timeout(LAST_WORDS, store.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections not closed cleanly");
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Part of `server.shutdown_timeout` (at most a fifth) kept after in-flight requests for
/// the ledger's last flush and the registry.
const SHUTDOWN_RESERVE: Duration = Duration::from_secs(5);
/// Least time given to marking the instance stopped and closing the database pool, even
/// when the deadline has passed.
const LAST_WORDS: Duration = Duration::from_millis(500);
