//! Client connections: the accept loop with its connection limit, which hands each
//! connection to a request worker (`workers.rs`), and serving one connection (HTTP/1 via
//! hyper, writes guarded against stalled readers by `stall.rs`) until it ends, is drained
//! after its current request, or is cut off.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::Metrics;
use super::stall::WriteStallGuard;
use super::workers::Workers;

/// At most one "connection limit reached" warning per this interval (each time counts in
/// `connection_limit_reached_total`).
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

pub(super) struct ConnCtx<'a> {
    pub(super) builder: &'a http1::Builder,
    /// Cancelled when shutdown begins: connections finish their request and close.
    pub(super) drain: &'a CancellationToken,
    pub(super) tracker: &'a TaskTracker,
    pub(super) hard_stop: &'a CancellationToken,
    /// How long a connection accepted just before shutdown may take to send its first
    /// request.
    pub(super) first_request_grace: Duration,
    pub(super) nodelay: bool,
    pub(super) write_stall_timeout: Duration,
    /// Open connections per listener at most.
    pub(super) max_connections: usize,
    pub(super) metrics: &'a Metrics,
    /// Where connections are served.
    pub(super) workers: &'a Workers,
}

impl ConnCtx<'_> {
    /// Accepts until dropped; each connection runs as a tracked task on the next request
    /// worker. At
    /// `max_connections` open connections it stops accepting (new ones wait in the
    /// backlog) until one closes.
    pub(super) async fn accept_loop(&self, listener: TcpListener, app: Router) {
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
            // The socket moves to the worker's own reactor, so its readiness wakes that
            // thread and no other.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "cannot hand over the connection");
                    continue;
                }
            };
            let app = app.clone();
            let builder = self.builder.clone();
            let open = self.metrics.connection_opened();
            let (drain, hard_stop) = (self.drain.clone(), self.hard_stop.clone());
            let (grace, stall) = (self.first_request_grace, self.write_stall_timeout);
            let connection = async move {
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, %peer, "cannot adopt the connection");
                        return;
                    }
                };
                // Marks the connection's first request, so that a drain does not close a
                // connection whose request is still on its way.
                let first = CancellationToken::new();
                let service = {
                    let (inner, first) = (TowerToHyperService::new(app), first.clone());
                    hyper::service::service_fn(move |request| {
                        first.cancel();
                        inner.call(request)
                    })
                };
                let io = TokioIo::new(WriteStallGuard::new(stream, stall));
                let connection = builder.serve_connection(io, service);
                serve_connection(connection, first, drain, hard_stop, grace, peer).await;
                drop((slot, open));
            };
            self.tracker.spawn_on(connection, self.workers.next());
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
