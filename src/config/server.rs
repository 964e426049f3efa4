//! `[server]`: the listeners, client-side limits and shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, DurationSetting, fail_if};

/// Most request worker threads (`server.worker_threads`).
const MAX_WORKERS: usize = 1024;

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the API listener.
    pub listen: SocketAddr,
    /// Separate listener for `/metrics`; when unset, `/metrics` is served on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest accepted request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Time a client has to send the request headers (slowloris guard); also how long an
    /// idle keep-alive connection is kept.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole request body after its headers.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Proxied requests handled at once; more are shed with 503 and `Retry-After`.
    pub max_concurrent_requests: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Request worker threads (each a single-threaded runtime serving whole connections);
    /// 0 means one per CPU the process may use.
    pub worker_threads: usize,
    /// A response write that makes no progress this long closes the connection (a client
    /// that stops reading must not hold a stream and its backend slot forever).
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// Set `TCP_NODELAY` on accepted sockets (leave on: Nagle stalls streamed responses).
    pub tcp_nodelay: bool,
    /// Open client connections at most (per listener); beyond it new connections wait in
    /// the listen backlog until one closes.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; 431 beyond. Bounds the
    /// buffer each connection may hold while its headers arrive (8 KiB - 1 MiB).
    pub max_header_bytes: usize,
    /// Listen backlog of the sockets the gateway binds itself (not those systemd passes).
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            max_body_bytes: 4 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 0,
            write_stall_timeout: Duration::from_secs(60),
            tcp_nodelay: true,
            max_connections: 4096,
            max_header_bytes: 64 * 1024,
            listen_backlog: 4096,
        }
    }
}

impl ServerConfig {
    /// Request worker threads in effect: `worker_threads`, or one per CPU this process may
    /// run on when it is 0.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        fail_if(
            s.max_body_bytes == 0,
            "server.max_body_bytes",
            "must be > 0",
        )?;
        fail_if(
            s.max_concurrent_requests == 0,
            "server.max_concurrent_requests",
            "must be > 0",
        )?;
        fail_if(
            s.max_connections == 0,
            "server.max_connections",
            "must be >= 1",
        )?;
        fail_if(
            !(8 * 1024..=1024 * 1024).contains(&s.max_header_bytes),
            "server.max_header_bytes",
            "must be 8192-1048576",
        )?;
        fail_if(
            s.listen_backlog == 0 || s.listen_backlog > 65_535,
            "server.listen_backlog",
            "must be 1-65535",
        )?;
        fail_if(
            s.worker_threads > MAX_WORKERS,
            "server.worker_threads",
            "must be 0 (one per CPU) - 1024",
        )?;
        Ok(())
    }

    /// Checked after every duration (the order in which errors are reported).
    pub(super) fn validate_listeners(&self) -> Result<(), ConfigError> {
        fail_if(
            Some(self.listen) == self.metrics_listen && self.listen.port() != 0,
            "server.metrics_listen",
            "must differ from server.listen",
        )
    }

    pub(super) fn durations(&self) -> Vec<DurationSetting> {
        vec![
            DurationSetting::new(
                "server.header_read_timeout",
                self.header_read_timeout,
                false,
            ),
            DurationSetting::new("server.body_read_timeout", self.body_read_timeout, false),
            DurationSetting::new("server.shutdown_timeout", self.shutdown_timeout, true),
            DurationSetting::new(
                "server.write_stall_timeout",
                self.write_stall_timeout,
                false,
            ),
        ]
    }
}
