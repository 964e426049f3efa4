//! One backend: its HTTP clients and pools, in-flight count, breaker and probed health.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Uri};

use crate::config::secret::Secret;
use crate::config::{BackendConfig, BreakerConfig, UpstreamConfig};

use super::breaker::{Admission, Breaker, BreakerState};
use super::client::{self, Tls};
use super::pool::Pool;
use super::queue::Queue;

/// Why a backend's clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The prober's client.
    #[error("{0}")]
    Probe(#[from] reqwest::Error),
    /// The platform's TLS trust store.
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
}

/// Paths (relative to `base_url`) whose URIs are built once at start.
pub const PROXIED_PATHS: [&str; 6] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/rerank",
    "/score",
];

/// Paths vLLM serves beside `/v1` rather than under it: relative to the base URL's root,
/// which is `base_url` without a trailing `/v1` (`http://h:8000/v1` -> `http://h:8000`).
pub const ROOT_PATHS: [&str; 4] = ["/tokenize", "/detokenize", "/pooling", "/classify"];

/// Where one endpoint's requests go, as HTTP/1 needs it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Scheme and authority: what is connected to.
    pub server: Uri,
    /// Path and query: the request line's target.
    pub path: Uri,
    /// The `Host` header.
    pub host: HeaderValue,
}

impl Target {
    /// Parsed through `url` first: it puts hosts in ASCII (IDNA), which `Uri` requires.
    fn parse(url: &str) -> Option<Self> {
        let url = url::Url::parse(url).ok()?;
        let full = Uri::try_from(url.as_str()).ok()?;
        let authority = full.authority()?.clone();
        let server = Uri::builder()
            .scheme(full.scheme()?.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        let path = Uri::from(full.path_and_query()?.clone());
        // Host and port only: never the user info a URL may carry.
        let host = match full.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        Some(Self {
            server,
            path,
            host: HeaderValue::from_str(&host).ok()?,
        })
    }
}

/// Health as last seen by the background prober.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet (or probing disabled): usable.
    Unknown,
    /// Last probes succeeded.
    Healthy,
    /// Probes failed `unhealthy_threshold` times in a row: no traffic.
    Unhealthy,
}

impl Health {
    /// Name used in `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Healthy,
            2 => Self::Unhealthy,
            _ => Self::Unknown,
        }
    }
}

/// Details of the last probe, for `/health`.
#[derive(Debug, Clone, Default)]
pub struct ProbeInfo {
    /// When the last probe finished.
    pub checked_at: Option<Instant>,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
    consecutive_ok: u32,
    consecutive_failed: u32,
}

/// Timeouts applied to requests sent to one backend.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Whole non-streaming request.
    pub request: Duration,
    /// Streaming: until the first body bytes.
    pub first_token: Duration,
    /// Streaming: between two chunks.
    pub stream_idle: Duration,
}

/// A configured backend and everything the request path needs to know about it.
#[derive(Debug)]
pub struct Backend {
    /// Configured name (metric label, log field).
    pub name: Arc<str>,
    base_url: String,
    endpoints: Vec<(&'static str, Target)>,
    api_key: Option<Secret>,
    /// `Bearer <api_key>`, marked sensitive.
    authorization: Option<HeaderValue>,
    /// Relative share of traffic.
    pub weight: u32,
    /// Most requests in flight at once.
    pub max_concurrency: usize,
    /// Per-request deadlines.
    pub timeouts: Timeouts,
    /// The proxy path's connection pools for this backend only: one per request worker,
    /// whose connections are used on that worker's thread, and a last one for any other.
    pools: Box<[Arc<Pool>]>,
    /// The prober's client (off the request path).
    probe_client: reqwest::Client,
    /// Passive circuit breaker.
    pub breaker: Breaker,
    in_flight: AtomicUsize,
    health: AtomicU8,
    probe: Mutex<ProbeInfo>,
    /// What it was built from, so that a reload can keep it when nothing changed.
    origin: Origin,
}

/// Everything a backend is built from.
#[derive(Debug, PartialEq)]
struct Origin {
    cfg: BackendConfig,
    api_key: Option<Secret>,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    breaker: BreakerConfig,
}

impl Backend {
    /// Builds the backend and its connection pools, one for each of `workers` request
    /// workers and one more, and the prober's client.
    pub fn new(
        cfg: &BackendConfig,
        api_key: Option<Secret>,
        upstream: &UpstreamConfig,
        breaker: &BreakerConfig,
        workers: usize,
    ) -> Result<Self, BuildError> {
        let settings = client::Settings {
            connect_timeout: cfg.connect_timeout,
            pool_idle_timeout: upstream.pool_idle_timeout,
            pool_max_idle_per_host: upstream.pool_max_idle_per_host,
        };
        let tls = Tls::platform()?;
        let pools = (0..=workers)
            .map(|_| Arc::new(client::build(settings, &tls)))
            .collect();
        let probe_client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(upstream.pool_idle_timeout)
            .pool_max_idle_per_host(upstream.pool_max_idle_per_host)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base_url = cfg.base_url.trim_end_matches('/').to_owned();
        let root = base_url.strip_suffix("/v1").unwrap_or(&base_url);
        let endpoints = PROXIED_PATHS
            .iter()
            .map(|p| (*p, &*base_url))
            .chain(ROOT_PATHS.iter().map(|p| (*p, root)))
            .filter_map(|(p, base)| Some((p, Target::parse(&format!("{base}{p}"))?)))
            .collect();
        let authorization = api_key.as_ref().and_then(|k| {
            let mut v = HeaderValue::try_from(format!("Bearer {}", k.expose())).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let origin = Origin {
            cfg: cfg.clone(),
            api_key: api_key.clone(),
            pool_idle_timeout: upstream.pool_idle_timeout,
            pool_max_idle_per_host: upstream.pool_max_idle_per_host,
            breaker: breaker.clone(),
        };
        Ok(Self {
            name: Arc::from(cfg.name.as_str()),
            base_url,
            endpoints,
            api_key,
            authorization,
            weight: cfg.weight,
            max_concurrency: cfg.max_concurrency,
            timeouts: Timeouts {
                request: cfg.request_timeout,
                first_token: cfg.first_token_timeout,
                stream_idle: cfg.stream_idle_timeout,
            },
            pools,
            probe_client,
            breaker: Breaker::new(breaker.failure_threshold, breaker.open_duration),
            in_flight: AtomicUsize::new(0),
            health: AtomicU8::new(0),
            probe: Mutex::new(ProbeInfo::default()),
            origin,
        })
    }

    /// Whether this backend was built from exactly these settings and secret.
    pub fn built_from(
        &self,
        cfg: &BackendConfig,
        api_key: Option<&Secret>,
        upstream: &UpstreamConfig,
        breaker: &BreakerConfig,
    ) -> bool {
        let o = &self.origin;
        o.cfg == *cfg
            && o.api_key.as_ref() == api_key
            && o.pool_idle_timeout == upstream.pool_idle_timeout
            && o.pool_max_idle_per_host == upstream.pool_max_idle_per_host
            && o.breaker == *breaker
    }

    /// Back to `Unknown` health (probing was turned off).
    pub fn forget_health(&self) {
        self.health.store(0, Ordering::Relaxed);
    }

    /// Full URL of `path` (which starts with `/`) on this backend.
    pub fn url(&self, path: &str) -> String {
        let mut url = String::with_capacity(self.base_url.len() + path.len());
        url.push_str(&self.base_url);
        url.push_str(path);
        url
    }

    /// Where a proxied endpoint's requests go (built once, not per request); `None` if
    /// the base URL does not make one.
    pub fn endpoint(&self, path: &str) -> Option<&Target> {
        self.endpoints
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, target)| target)
    }

    /// The proxy path's connection pool for this thread: the request worker's own, or the
    /// shared last one off the workers.
    pub fn pool(&self) -> &Arc<Pool> {
        let last = self.pools.len() - 1;
        let i = crate::runtime::workers::current().map_or(last, |w| w.min(last));
        &self.pools[i]
    }

    /// The prober's client.
    pub fn probe_client(&self) -> &reqwest::Client {
        &self.probe_client
    }

    /// The API key to send, if any.
    pub fn api_key(&self) -> Option<&Secret> {
        self.api_key.as_ref()
    }

    /// The `Authorization` header to send, if the backend has a key.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Health from the prober's cache.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Last probe details.
    pub fn probe_info(&self) -> ProbeInfo {
        self.probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Breaker state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state(Instant::now())
    }

    /// Could take traffic now, capacity aside.
    pub fn is_usable(&self, now: Instant) -> bool {
        self.health() != Health::Unhealthy && self.breaker.would_admit(now)
    }

    /// Has room for one more request.
    pub fn has_capacity(&self) -> bool {
        self.in_flight() < self.max_concurrency
    }

    /// Claims a slot and a breaker admission, or `None` when full or ejected.
    pub fn try_start(self: &Arc<Self>, now: Instant) -> Option<Attempt> {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_concurrency {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match self.breaker.admit(now) {
            Some(admission) => Some(Attempt {
                backend: Arc::clone(self),
                admission,
                settled: false,
                queues: None,
            }),
            None => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Records one probe result and updates health past the thresholds.
    pub fn record_probe(
        &self,
        result: Result<(), String>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) {
        let mut info = self
            .probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        info.checked_at = Some(Instant::now());
        match result {
            Ok(()) => {
                info.consecutive_ok = info.consecutive_ok.saturating_add(1);
                info.consecutive_failed = 0;
                info.last_error = None;
                if info.consecutive_ok >= healthy_after || self.health() == Health::Unknown {
                    self.health.store(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                info.consecutive_failed = info.consecutive_failed.saturating_add(1);
                info.consecutive_ok = 0;
                info.last_error = Some(e);
                if info.consecutive_failed >= unhealthy_after {
                    self.health.store(2, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One request's claim on a backend: its in-flight slot and breaker admission.
/// Report `success` or `failure`; dropping it unsettled counts as neither.
#[derive(Debug)]
pub struct Attempt {
    backend: Arc<Backend>,
    admission: Admission,
    settled: bool,
    /// Queues given a turn when the slot is released.
    queues: Option<Arc<[Arc<Queue>]>>,
}

impl Attempt {
    /// The backend this attempt goes to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// When the slot is released, each of `queues` gets a turn.
    pub fn wake_on_release(&mut self, queues: Arc<[Arc<Queue>]>) {
        self.queues = Some(queues);
    }

    /// The backend did its job.
    pub fn success(&mut self) {
        if !self.settled {
            self.settled = true;
            self.backend.breaker.on_success(self.admission);
        }
    }

    /// The backend failed; counts towards ejection.
    pub fn failure(&mut self) {
        if !self.settled {
            self.settled = true;
            if self.backend.breaker.on_failure(Instant::now()) {
                tracing::warn!(backend = %self.backend.name, "circuit opened: backend ejected");
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.backend.breaker.on_abandoned(self.admission);
        }
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
        for queue in self.queues.iter().flat_map(|q| q.iter()) {
            queue.wake_next();
        }
    }
}
