//! The proxy path's upstream connections: a few idle HTTP/1 connections kept per backend
//! and request worker, each driven by the task of the request that uses it. (hyper-util's
//! pooled client runs every connection as a task of its own: each upstream chunk then took
//! a pass of that task and one of the client's connection task, docs/benchmarks.md.)

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::client::Settings;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
/// The connection's own state machine, which reads and writes the socket when polled.
type Driver = Pin<Box<http1::Connection<Io, Full<Bytes>>>>;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum Error {
    /// No connection could be opened (TCP, TLS or the HTTP/1 handshake).
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed while the request was sent or its answer read.
    Request(hyper::Error),
}

impl Error {
    /// The backend could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Request(e) => write!(f, "request: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// One HTTP/1 connection: the handle requests go in by, and the connection itself, which
/// makes progress only while someone polls it.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended (closed, or failed): dropping it fails what
    /// it still held, so a request queued on it learns that it was never sent.
    driver: Option<Driver>,
    idle_since: Instant,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("ended", &self.driver.is_none())
            .finish()
    }
}

impl Conn {
    /// Lets the connection read and write what it can; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = self.driver.as_mut()
            && driver.as_mut().poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// Whether it can take a request now, after one more look at the socket, where the
    /// end of the last answer, or the backend closing it, may be waiting.
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

/// The idle connections of one backend on one request worker.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    settings: Settings,
    /// Most recently used last.
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .field("idle", &lock(&self.idle).len())
            .finish()
    }
}

impl Pool {
    /// An empty pool connecting with `connector`.
    pub fn new(connector: HttpsConnector<HttpConnector>, settings: Settings) -> Self {
        Self {
            connector,
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection, or on a new one
    /// to `target` (scheme and authority). A request that a reused connection never wrote
    /// (the backend had closed it) is sent again on another; one it wrote is not.
    pub async fn request(
        self: &Arc<Self>,
        target: &Uri,
        mut request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<UpstreamBody>, Error> {
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(conn) => (conn, true),
                None => (self.connect(target).await?, false),
            };
            let mut answer = std::pin::pin!(conn.sender.try_send_request(request));
            let result = std::future::poll_fn(|cx| {
                conn.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(response) => {
                    return Ok(response.map(|body| UpstreamBody {
                        body,
                        conn: Some(conn),
                        pool: Arc::clone(self),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(Error::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request; older ones past
    /// the idle timeout are closed.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut idle = lock(&self.idle);
                let conn = idle.pop()?;
                if conn.idle_since.elapsed() >= self.settings.pool_idle_timeout {
                    idle.clear(); // the rest are older still
                    return None;
                }
                conn
            };
            if std::future::poll_fn(|cx| Poll::Ready(conn.ready(cx))).await {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection whose last answer was read to the end, if it can take another.
    fn checkin(&self, mut conn: Conn, cx: &mut Context<'_>) {
        if !conn.ready(cx) {
            return;
        }
        conn.idle_since = Instant::now();
        let mut idle = lock(&self.idle);
        idle.push(conn);
        if idle.len() > self.settings.pool_max_idle_per_host {
            idle.remove(0);
        }
    }

    async fn connect(&self, target: &Uri) -> Result<Conn, Error> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(target.clone())
            .await
            .map_err(Error::Connect)?;
        let (sender, driver) = http1::handshake(io)
            .await
            .map_err(|e| Error::Connect(Box::new(e)))?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            idle_since: Instant::now(),
        })
    }
}

/// An upstream answer's body. Reading it drives the connection; once it has been read to
/// the end the connection goes back to its pool, and dropped earlier it is closed (so the
/// backend stops working on an answer nobody reads).
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

/// Looks at the connection this many times while the body has nothing: hyper's
/// connection hands over one chunk per poll and needs a second one to report the end.
const DRIVE_ROUNDS: usize = 3;

impl UpstreamBody {
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.take() {
            self.pool.checkin(conn, cx);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        for _ in 0..=DRIVE_ROUNDS {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(None) => {
                    this.release(cx);
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(frame)) => {
                    if frame.is_ok() && this.body.is_end_stream() {
                        this.release(cx);
                    }
                    return Poll::Ready(Some(frame));
                }
                Poll::Pending => {}
            }
            // Once the connection has ended, the body learns it on the next poll.
            match this.conn.as_mut() {
                Some(conn) => {
                    conn.drive(cx);
                }
                None => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
