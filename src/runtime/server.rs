//! The server: accepts connections on already-bound listeners, serves them, and drains
//! in-flight requests and streams on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::keys;
use crate::access::keys::KeyTable;
use crate::api::routes;
use crate::config::{Config, ConfigError};
use crate::runtime::activation::Passed;
use crate::runtime::metrics::Metrics;
use crate::runtime::reload::{self, Reload};
use crate::runtime::stall::WriteStallGuard;
use crate::runtime::state::{AppState, Storage};
use crate::runtime::systemd;
use crate::storage::database::{Store, StoreError};
use crate::storage::ledger::Ledger;
use crate::storage::ledger::spool::SpoolError;
use crate::storage::registry;
use crate::upstream;

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
        let backlog = config.server.listen_backlog;
        let api = bind(config.server.listen, backlog)?;
        let metrics = match config.server.metrics_listen {
            Some(addr) => Some(bind(addr, backlog)?),
            None => None,
        };
        Ok(Self { api, metrics })
    }

    /// Uses the sockets the service manager passed; `/metrics` without a passed socket of
    /// its own is bound from `server.metrics_listen` when set. Needs the async runtime.
    pub async fn from_passed(passed: Passed, config: &Config) -> std::io::Result<Self> {
        let adopt = |l: std::net::TcpListener| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        };
        let api = adopt(passed.api)?;
        let metrics = match (passed.metrics, config.server.metrics_listen) {
            (Some(l), _) => Some(adopt(l)?),
            (None, Some(addr)) => Some(bind(addr, config.server.listen_backlog)?),
            (None, None) => None,
        };
        tracing::info!(
            api = %api.local_addr()?,
            metrics = ?metrics.as_ref().and_then(|m| m.local_addr().ok()),
            "using the sockets passed by the service manager (server.listen is not bound)"
        );
        Ok(Self { api, metrics })
    }
}

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with
/// `backlog` (the kernel caps it at `net.core.somaxconn`).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
    };

    let api = routes::api(Arc::clone(&state), listeners.metrics.is_none());
    if let Ok(addr) = listeners.api.local_addr() {
        let current = state.current();
        tracing::info!(%addr, models = current.models.len(), backends = current.backends.len(), "listening");
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

/// At most one "connection limit reached" warning per this interval (each time counts in
/// `connection_limit_reached_total`).
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

struct ConnCtx<'a> {
    builder: &'a http1::Builder,
    /// Cancelled when shutdown begins: connections finish their request and close.
    drain: &'a CancellationToken,
    tracker: &'a TaskTracker,
    hard_stop: &'a CancellationToken,
    /// How long a connection accepted just before shutdown may take to send its first
    /// request.
    first_request_grace: Duration,
    nodelay: bool,
    write_stall_timeout: Duration,
    /// Open connections per listener at most.
    max_connections: usize,
    metrics: &'a crate::runtime::metrics::Metrics,
}

impl ConnCtx<'_> {
    /// Accepts until dropped; each connection runs as a tracked task. At
    /// `max_connections` open connections it stops accepting (new ones wait in the
    /// backlog) until one closes.
    async fn accept_loop(&self, listener: TcpListener, app: Router) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            let slot = match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    self.metrics.connection_limit_reached.inc();
                    if warned.is_none_or(|t| t.elapsed() >= LIMIT_WARNING_EVERY) {
                        warned = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            max_connections = self.max_connections,
                            "connection limit reached (server.max_connections): not accepting until a connection closes"
                        );
                    }
                    match Arc::clone(&slots).acquire_owned().await {
                        Ok(slot) => slot,
                        Err(_) => return,
                    }
                }
            };
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
            // Marks the connection's first request, so that a drain does not close a
            // connection whose request is still on its way.
            let first = CancellationToken::new();
            let service = {
                let (inner, first) = (TowerToHyperService::new(app.clone()), first.clone());
                hyper::service::service_fn(move |request| {
                    first.cancel();
                    inner.call(request)
                })
            };
            let io = TokioIo::new(WriteStallGuard::new(stream, self.write_stall_timeout));
            let connection = self.builder.serve_connection(io, service);
            let open = self.metrics.connection_opened();
            let served = serve_connection(
                connection,
                first,
                self.drain.clone(),
                self.hard_stop.clone(),
                self.first_request_grace,
                peer,
            );
            self.tracker.spawn(async move {
                served.await;
                drop((slot, open));
            });
        }
    }
}

/// Serves one connection until it ends, the drain closes it after its current request,
/// or the hard stop cuts it off.
///
/// hyper's graceful shutdown closes a connection on which it has read nothing yet, which
/// includes one accepted just before the drain whose request is still in the socket
/// buffer: that client would see its connection closed for a request it already sent
/// (tests/systemd.rs, restart with passed sockets). So, as Go's `net/http` does, such a
/// connection gets up to `grace` (the header read timeout) to start its first request
/// before the graceful close.
async fn serve_connection<C>(
    connection: C,
    first: CancellationToken,
    drain: CancellationToken,
    hard_stop: CancellationToken,
    grace: Duration,
    peer: std::net::SocketAddr,
) where
    C: GracefulConnection,
{
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = hard_stop.cancelled() => None,
        () = async {
            drain.cancelled().await;
            let _ = tokio::time::timeout(grace, first.cancelled()).await;
        } => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => Some(result),
                () = hard_stop.cancelled() => None,
            }
        }
    };
    if let Some(Err(e)) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// A served connection that can be told to finish its current request and close (hyper's
/// `http1::Connection`, whose service type cannot be named here).
trait GracefulConnection: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}
