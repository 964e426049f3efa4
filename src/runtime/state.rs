//! Shared state of a running gateway: the snapshot built from the configuration (models,
//! backends, limits), swapped whole on reload, and what lives across reloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use tokio::sync::Semaphore;

use crate::access::keys::KeyTable;
use crate::config::secret::Secret;
use crate::config::{Config, ConfigError, EndpointSet};
use crate::runtime::metrics::Metrics;
use crate::storage::ledger::Ledger;
use crate::upstream::homes::Homes;
use crate::upstream::queue::Queue;
use crate::upstream::{Backend, Route};

/// A public model and its routes.
#[derive(Debug)]
pub struct Model {
    /// Public name.
    pub name: Arc<str>,
    /// Backends serving it.
    pub routes: Vec<Route>,
    /// The endpoints its backends serve.
    pub endpoints: EndpointSet,
    /// Requests waiting for one of its backends.
    pub queue: Arc<Queue>,
    /// Models tried when none of its backends can take a request, in order.
    pub fallbacks: Vec<Arc<str>>,
    /// Its name as the `x-llm-gateway-model` header value, built once.
    pub header: HeaderValue,
}

/// What a configuration turns into: the part of the state a reload replaces as a whole.
/// A request works with the snapshot it started with until it ends.
#[derive(Debug)]
pub struct Configured {
    /// The configuration in effect.
    pub config: Config,
    /// Models by public name.
    pub models: HashMap<String, Model>,
    /// Public names in config order (for `/v1/models`).
    pub model_order: Vec<Arc<str>>,
    /// All backends in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Load shedding: one permit per proxied request.
    pub limiter: Arc<Semaphore>,
    /// Short hash of the configuration, for the instance registry.
    pub config_hash: String,
}

impl Configured {
    /// Builds backends (with their secrets, from `Config::resolve_secrets`) and the model
    /// table. Backends of `previous` whose settings and secret are unchanged are kept, with
    /// their connection pool, breaker, health and in-flight count; so is the load-shedding
    /// limit when `server.max_concurrent_requests` is unchanged.
    pub fn build(
        config: Config,
        secrets: Vec<Option<Secret>>,
        previous: Option<&Configured>,
    ) -> Result<Self, ConfigError> {
        let mut by_name = HashMap::new();
        let mut backends = Vec::with_capacity(config.backends.len());
        for (i, (cfg, secret)) in config.backends.iter().zip(secrets).enumerate() {
            let kept = previous.and_then(|p| {
                p.backends
                    .iter()
                    .find(|b| {
                        b.built_from(
                            cfg,
                            secret.as_ref(),
                            &config.upstream,
                            &config.circuit_breaker,
                        )
                    })
                    .cloned()
            });
            let backend = match kept {
                Some(b) => b,
                None => Arc::new(
                    Backend::new(
                        cfg,
                        secret,
                        &config.upstream,
                        &config.circuit_breaker,
                        config.server.workers(),
                    )
                    .map_err(|e| ConfigError::Invalid {
                        key: format!("backends[{i}]"),
                        reason: format!("cannot build HTTP client: {e}"),
                    })?,
                ),
            };
            if !config.health_check.enabled {
                // Nothing will probe it again: an old verdict must not keep it out.
                backend.forget_health();
            }
            by_name.insert(cfg.name.clone(), Arc::clone(&backend));
            backends.push(backend);
        }
        // Each model's queue, kept across a reload that leaves its bound alone (its waiters
        // keep their places); then, per backend, the queues of the models it serves.
        let queue_max = config.upstream.queue_max;
        let queues: HashMap<&str, Arc<Queue>> = config
            .models
            .iter()
            .map(|m| {
                let kept = previous
                    .filter(|p| p.config.upstream.queue_max == queue_max)
                    .and_then(|p| p.models.get(&m.name))
                    .map(|old| Arc::clone(&old.queue));
                let queue = kept.unwrap_or_else(|| Arc::new(Queue::new(queue_max)));
                (m.name.as_str(), queue)
            })
            .collect();
        let mut served_by: HashMap<&str, Vec<Arc<Queue>>> = HashMap::new();
        for m in &config.models {
            for r in &m.routes {
                served_by
                    .entry(r.backend.as_str())
                    .or_default()
                    .push(Arc::clone(&queues[m.name.as_str()]));
            }
        }
        let served_by: HashMap<&str, Arc<[Arc<Queue>]>> = served_by
            .into_iter()
            .map(|(b, q)| (b, Arc::from(q)))
            .collect();
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
                        queues: Arc::clone(&served_by[r.backend.as_str()]),
                    })
                })
                .collect();
            let name: Arc<str> = Arc::from(m.name.as_str());
            model_order.push(Arc::clone(&name));
            models.insert(
                m.name.clone(),
                Model {
                    routes,
                    endpoints: m.endpoint_set(),
                    queue: Arc::clone(&queues[m.name.as_str()]),
                    fallbacks: m.fallbacks.iter().map(|f| Arc::from(f.as_str())).collect(),
                    // Validated printable text (UTF-8 goes as obs-text bytes).
                    header: HeaderValue::from_bytes(m.name.as_bytes())
                        .unwrap_or(HeaderValue::from_static("")),
                    name,
                },
            );
        }
        let max = config.server.max_concurrent_requests;
        let limiter = match previous {
            Some(p) if p.config.server.max_concurrent_requests == max => Arc::clone(&p.limiter),
            _ => Arc::new(Semaphore::new(max)),
        };
        Ok(Self {
            config_hash: crate::storage::registry::config_hash(&config),
            config,
            models,
            model_order,
            backends,
            limiter,
        })
    }
}

/// What an operator should know after a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadNote {
    /// The new configuration was refused (why); the previous one is still in effect.
    Failed(String),
    /// Applied, except for these keys, which take effect at the next restart.
    RestartNeeded(Vec<&'static str>),
}

impl std::fmt::Display for ReloadNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(why) => write!(
                f,
                "RELOAD FAILED, the previous configuration is still in effect: {why}"
            ),
            Self::RestartNeeded(keys) => {
                write!(f, "reloaded; restart to apply {}", keys.join(", "))
            }
        }
    }
}

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState {
    configured: ArcSwap<Configured>,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Process start, for uptime.
    pub started: Instant,
    /// Unix time of start, for `created` in `/v1/models`.
    pub created_unix: u64,
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
    /// Which backend has each stored response (Responses API).
    pub homes: Homes,
    /// What the last configuration reload left to say.
    reload_note: Mutex<Option<ReloadNote>>,
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
    /// The state for the first configuration.
    pub fn new(
        config: Config,
        secrets: Vec<Option<Secret>>,
        storage: Storage,
    ) -> Result<Self, ConfigError> {
        let homes = Homes::new(config.upstream.stored_responses_max);
        let configured = Configured::build(config, secrets, None)?;
        Ok(Self {
            homes,
            configured: ArcSwap::from_pointee(configured),
            metrics: storage.metrics,
            started: Instant::now(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            keys: storage.keys,
            ledger: storage.ledger,
            instance_id: storage.instance_id,
            db_engine: storage.db_engine,
            db_up: AtomicBool::new(true),
            reload_note: Mutex::new(None),
            live_instances: AtomicUsize::new(1),
            draining: AtomicBool::new(false),
        })
    }

    /// The configuration in effect and what was built from it.
    pub fn current(&self) -> Arc<Configured> {
        self.configured.load_full()
    }

    /// Puts a new snapshot in effect for requests that start from now on; returns the
    /// one it replaces.
    pub fn replace(&self, configured: Configured) -> Arc<Configured> {
        self.configured.swap(Arc::new(configured))
    }

    /// Records what the last reload left to say (`None`: it applied everything).
    pub fn set_reload_note(&self, note: Option<ReloadNote>) {
        *self
            .reload_note
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = note;
    }

    /// What the last reload left to say, if anything.
    pub fn reload_note(&self) -> Option<ReloadNote> {
        self.reload_note
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weight: u32, max_concurrent: usize) -> Config {
        Config::from_toml(&format!(
            "[server]\nmax_concurrent_requests = {max_concurrent}\n\
             [[backends]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             [[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:2/v1\"\nweight = {weight}\n\
             [[models]]\nname = \"m\"\nroutes = [{{ backend = \"a\" }}, {{ backend = \"b\" }}]\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_rebuild_keeps_unchanged_backends_and_the_shedding_limit() {
        let first = Configured::build(config(1, 10), vec![None, None], None).unwrap();
        let same = Configured::build(config(1, 10), vec![None, None], Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&first.backends[0], &same.backends[0]));
        assert!(Arc::ptr_eq(&first.backends[1], &same.backends[1]));
        assert!(Arc::ptr_eq(&first.limiter, &same.limiter));

        // b's weight and the limit change: b and the limiter are new, a is kept.
        let changed = Configured::build(config(3, 20), vec![None, None], Some(&first)).unwrap();
        assert!(Arc::ptr_eq(&first.backends[0], &changed.backends[0]));
        assert!(!Arc::ptr_eq(&first.backends[1], &changed.backends[1]));
        assert_eq!(changed.backends[1].weight, 3);
        assert!(!Arc::ptr_eq(&first.limiter, &changed.limiter));
        assert_eq!(changed.limiter.available_permits(), 20);

        // A new secret is a new backend too.
        let file = std::env::temp_dir().join(format!("lgw-state-test-{}", std::process::id()));
        std::fs::write(&file, "k").unwrap();
        let secret = Some(
            crate::config::secret::SecretRef::File(file.clone())
                .resolve()
                .unwrap(),
        );
        std::fs::remove_file(&file).unwrap();
        let keyed = Configured::build(config(1, 10), vec![None, secret], Some(&first)).unwrap();
        assert!(!Arc::ptr_eq(&first.backends[1], &keyed.backends[1]));
    }
}
