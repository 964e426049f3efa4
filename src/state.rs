//! Shared state of a running gateway: models, backends, limits and metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use crate::auth::KeyTable;
use crate::config::{AuthMode, Config, ConfigError, UpstreamConfig};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::{Backend, Route};

/// A public model and its routes.
#[derive(Debug)]
pub struct Model {
    /// Public name.
    pub name: Arc<str>,
    /// Backends serving it.
    pub routes: Vec<Route>,
}

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Models by public name.
    pub models: HashMap<String, Model>,
    /// Public names in config order (for `/v1/models`).
    pub model_order: Vec<Arc<str>>,
    /// All backends in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Load shedding: one permit per proxied request.
    pub limiter: Arc<Semaphore>,
    /// Retry and usage policy.
    pub upstream: UpstreamConfig,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body.
    pub body_read_timeout: std::time::Duration,
    /// Process start, for uptime.
    pub started: Instant,
    /// Unix time of start, for `created` in `/v1/models`.
    pub created_unix: u64,
    /// `keys` or `open`.
    pub auth_mode: AuthMode,
    /// API keys, reloaded in the background.
    pub keys: Arc<KeyTable>,
    /// Usage ledger (spool and shipper state).
    pub ledger: Arc<Ledger>,
    /// This instance's id in the registry and the ledger.
    pub instance_id: Arc<str>,
    /// Database engine (`sqlite`, `postgres`).
    pub db_engine: &'static str,
    /// Outcome of the last database operation of a background task.
    pub db_up: AtomicBool,
    live_instances: AtomicUsize,
    draining: AtomicBool,
}

/// What the gateway keeps about clients and usage, opened before the state is built.
#[derive(Debug)]
pub struct Storage {
    /// API keys.
    pub keys: Arc<KeyTable>,
    /// Usage ledger.
    pub ledger: Arc<Ledger>,
    /// This instance's id.
    pub instance_id: Arc<str>,
    /// Database engine name.
    pub db_engine: &'static str,
    /// The metrics registry (the ledger already holds its part).
    pub metrics: Metrics,
}

impl AppState {
    /// Builds backends (with their secrets, from `Config::resolve_secrets`) and the model
    /// table.
    pub fn new(
        config: &Config,
        secrets: Vec<Option<Secret>>,
        storage: Storage,
    ) -> Result<Self, ConfigError> {
        let mut by_name = HashMap::new();
        let mut backends = Vec::with_capacity(config.backends.len());
        for (i, (cfg, secret)) in config.backends.iter().zip(secrets).enumerate() {
            let backend = Backend::new(cfg, secret, &config.upstream, &config.circuit_breaker)
                .map_err(|e| ConfigError::Invalid {
                    key: format!("backends[{i}]"),
                    reason: format!("cannot build HTTP client: {e}"),
                })?;
            let backend = Arc::new(backend);
            by_name.insert(cfg.name.clone(), Arc::clone(&backend));
            backends.push(backend);
        }
        let mut models = HashMap::new();
        let mut model_order = Vec::new();
        for m in &config.models {
            let routes = m
                .routes
                .iter()
                .filter_map(|r| {
                    by_name.get(&r.backend).map(|b| Route {
                        backend: Arc::clone(b),
                        upstream_model: r.upstream_model.clone(),
                    })
                })
                .collect();
            let name: Arc<str> = Arc::from(m.name.as_str());
            model_order.push(Arc::clone(&name));
            models.insert(m.name.clone(), Model { name, routes });
        }
        Ok(Self {
            models,
            model_order,
            backends,
            metrics: storage.metrics,
            limiter: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            upstream: config.upstream.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            started: Instant::now(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            auth_mode: config.auth.mode,
            keys: storage.keys,
            ledger: storage.ledger,
            instance_id: storage.instance_id,
            db_engine: storage.db_engine,
            db_up: AtomicBool::new(true),
            live_instances: AtomicUsize::new(1),
            draining: AtomicBool::new(false),
        })
    }

    /// This instance's share of each key's rate limits: 1/n with n live instances.
    pub fn limit_share(&self) -> f64 {
        1.0 / self.live_instances.load(Ordering::Relaxed).max(1) as f64
    }

    /// Records how many instances share the database (from the registry).
    pub fn set_live_instances(&self, n: usize) {
        self.live_instances.store(n.max(1), Ordering::Relaxed);
    }

    /// Live instances as last read from the registry.
    pub fn live_instances(&self) -> usize {
        self.live_instances.load(Ordering::Relaxed)
    }

    /// Whether the last database operations of the background tasks (key reload,
    /// heartbeat, ledger shipping) succeeded.
    pub fn database_up(&self) -> bool {
        self.db_up.load(Ordering::Relaxed) && self.ledger.database_ok()
    }

    /// Shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks shutdown as begun (`/ready` turns 503).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}
