//! The proxy path's HTTP client: hyper's HTTP/1 connections (pooled by `pool.rs`), opened
//! by hyper-util's connector with TLS from hyper-rustls, and each endpoint's request target
//! and the backend's `Authorization` value built once. reqwest (kept for the prober) parses
//! the URL again in its request and redirect layers on every call: 8 % of the gateway's
//! instructions per request (docs/benchmarks.md, change 8).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyDataStream;
use hyper_util::client::legacy::connect::HttpConnector;

use super::pool::{Pool, UpstreamBody};

/// TCP keep-alive probes on upstream connections: reqwest's defaults, kept from when it
/// carried the proxy path.
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data older than this breaks the connection (reqwest's default too).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// An upstream answer; its body is read as it arrives.
pub type Response = axum::http::Response<UpstreamBody>;
/// An upstream body as a stream of its data frames.
pub type BodyStream = BodyDataStream<UpstreamBody>;

/// What a backend's connections are built with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Idle pooled connections are not reused after this.
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections kept.
    pub pool_max_idle_per_host: usize,
}

/// The TLS settings every upstream client shares: the platform's trust store, as reqwest.
#[derive(Debug)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl Tls {
    /// Loads the platform verifier with rustls' aws-lc-rs provider.
    pub fn platform() -> Result<Self, rustls::Error> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        Ok(Self(Arc::new(config)))
    }
}

/// A new, empty connection pool (HTTP/1 only, plain or TLS by the URI's scheme).
pub fn build(settings: Settings, tls: &Tls) -> Pool {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(KEEPALIVE));
    http.set_keepalive_interval(Some(KEEPALIVE));
    http.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
    http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls.0).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Pool::new(connector, settings)
}
