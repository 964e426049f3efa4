//! The sockets the gateway serves on: bound from the configuration, or passed by the
//! service manager (socket activation, `activation.rs`).

use tokio::net::TcpListener;

use super::activation::Passed;
use crate::config::Config;

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
