//! Prometheus metrics: one registry per gateway instance, labels only from fixed sets
//! (`labels.rs`).

mod labels;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::upstream::{Backend, Health};
use labels::{
    BackendLabels, BuildLabels, Label, ModelLabels, ReasonLabels, RequestLabels, ResultLabels,
    TokenLabels, UpstreamErrorLabels,
};

/// Label value for requests that matched no configured model or reached no backend.
pub const NONE: &str = "none";

fn latency_histogram() -> Histogram {
    // 1 ms .. ~17 min (request_timeout defaults to 10 min)
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 21,
    ))
}

/// Registers `metric` under `name` (prefixed `llm_gateway_`) and hands it back.
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// All metrics of one gateway.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    ttft: Family<ModelLabels, Histogram, fn() -> Histogram>,
    tokens: Family<TokenLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    connections_open: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Times an accept loop stopped at `server.max_connections`.
    pub connection_limit_reached: Counter,
    backend_up: Family<BackendLabels, Gauge>,
    backend_ejected: Family<BackendLabels, Gauge>,
    backend_in_flight: Family<BackendLabels, Gauge>,
    auth_failures: Family<ReasonLabels, Counter>,
    rate_limited: Family<ReasonLabels, Counter>,
    /// Failed reloads of the key table from the database.
    pub key_refresh_failures: Counter,
    config_reloads: Family<ResultLabels, Counter>,
    config_last_reload_ok: Gauge,
    /// Usage ledger counters and gauges.
    pub ledger: LedgerMetrics,
    none: Label,
}

/// The usage ledger's metrics; the ledger and its shipper update them.
#[derive(Debug, Clone, Default)]
pub struct LedgerMetrics {
    /// Records appended to the spool.
    pub spooled: Counter,
    /// Records committed to the database (re-shipped duplicates not counted).
    pub written: Counter,
    /// Failed batch inserts.
    pub write_failures: Counter,
    /// Records lost because the spool was full (`on_full = "drop"`) or unwritable.
    pub dropped: Counter,
    /// Damaged spool frames skipped.
    pub corrupt_frames: Counter,
    /// Unshipped bytes in the spool.
    pub spool_bytes: Gauge,
    /// Age of the oldest unshipped record, in milliseconds (0 when caught up).
    pub lag_ms: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// One finished request, as the metrics see it.
#[derive(Debug)]
pub struct RequestSample<'a> {
    pub endpoint: &'static str,
    pub model: Option<&'a Arc<str>>,
    pub backend: Option<&'a Arc<str>>,
    pub status: u16,
    pub duration: Duration,
    pub ttft: Option<Duration>,
    pub tokens: Option<crate::proxy::tokens::Tokens>,
}

impl Metrics {
    /// Registers every metric with its help text, in the order `/metrics` lists them.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("llm_gateway");
        Self {
            requests: add(
                &mut r,
                "requests",
                "Requests answered, by endpoint, model, backend and HTTP status",
                Family::default(),
            ),
            duration: add(
                &mut r,
                "request_duration_seconds",
                "Time from request arrival until the answer is ready (streams: until the last byte), by model",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ),
            ttft: add(
                &mut r,
                "time_to_first_token_seconds",
                "Streaming: time from request arrival to the first upstream bytes, by model",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ),
            tokens: add(
                &mut r,
                "tokens",
                "Tokens by model and kind (prompt, completion); includes estimates",
                Family::default(),
            ),
            upstream_errors: add(
                &mut r,
                "upstream_errors",
                "Failed upstream attempts by backend and kind",
                Family::default(),
            ),
            in_flight: add(
                &mut r,
                "in_flight_requests",
                "Proxied requests being handled now (streams included)",
                Gauge::default(),
            ),
            backend_up: add(
                &mut r,
                "backend_up",
                "1 unless the health prober marked the backend unhealthy",
                Family::default(),
            ),
            backend_ejected: add(
                &mut r,
                "backend_circuit_open",
                "1 while the circuit breaker keeps traffic away from the backend",
                Family::default(),
            ),
            connections_open: add(
                &mut r,
                "connections_open",
                "Open client connections",
                Gauge::default(),
            ),
            connection_limit_reached: add(
                &mut r,
                "connection_limit_reached",
                "Times the gateway stopped accepting connections at server.max_connections (new ones wait in the listen backlog)",
                Counter::default(),
            ),
            backend_in_flight: add(
                &mut r,
                "backend_in_flight_requests",
                "Requests in flight per backend",
                Family::default(),
            ),
            auth_failures: add(
                &mut r,
                "auth_failures",
                "Requests refused with 401/403, by reason (missing, invalid, revoked, expired, model_not_allowed)",
                Family::default(),
            ),
            rate_limited: add(
                &mut r,
                "rate_limited",
                "Requests refused with 429 by a key's limit (requests or tokens)",
                Family::default(),
            ),
            key_refresh_failures: add(
                &mut r,
                "key_refresh_failures",
                "Failed reloads of the API key table from the database (the last table stays in use)",
                Counter::default(),
            ),
            config_reloads: {
                let reloads = Family::<ResultLabels, Counter>::default();
                for result in ["success", "failure"] {
                    drop(reloads.get_or_create(&ResultLabels { result }));
                }
                add(
                    &mut r,
                    "config_reloads",
                    "Configuration reloads (SIGHUP), by result; a failed one leaves the previous configuration in effect",
                    reloads,
                )
            },
            config_last_reload_ok: {
                let ok = Gauge::default();
                ok.set(1);
                add(
                    &mut r,
                    "config_last_reload_successful",
                    "1 when the last configuration reload succeeded (or none was attempted), 0 when it failed",
                    ok,
                )
            },
            ledger: LedgerMetrics {
                spooled: add(
                    &mut r,
                    "ledger_records_spooled",
                    "Usage records appended to the local spool",
                    Counter::default(),
                ),
                written: add(
                    &mut r,
                    "ledger_records_written",
                    "Usage records committed to the database",
                    Counter::default(),
                ),
                write_failures: add(
                    &mut r,
                    "ledger_write_failures",
                    "Failed usage batch inserts (the records stay in the spool and are retried)",
                    Counter::default(),
                ),
                dropped: add(
                    &mut r,
                    "ledger_records_dropped",
                    "Usage records lost: the spool full or unwritable with on_full = \"drop\", held records at exit, a record refused by the database (set aside in rejected.jsonl), or one unreadable",
                    Counter::default(),
                ),
                corrupt_frames: add(
                    &mut r,
                    "ledger_spool_corrupt_frames",
                    "Damaged or torn spool records skipped",
                    Counter::default(),
                ),
                spool_bytes: add(
                    &mut r,
                    "ledger_spool_bytes",
                    "Bytes in usage spool files not yet deleted: unshipped records, plus shipped ones in segment files not yet rolled and deleted (up to 1 MiB, or ledger.segment_bytes if smaller)",
                    Gauge::default(),
                ),
                lag_ms: add(
                    &mut r,
                    "ledger_lag_milliseconds",
                    "Age of the oldest usage record not yet in the database (0 when caught up)",
                    Gauge::default(),
                ),
            },
            none: Label(Arc::from(NONE)),
            registry: {
                let build_info = Family::<BuildLabels, Gauge>::default();
                build_info
                    .get_or_create(&BuildLabels {
                        version: env!("CARGO_PKG_VERSION"),
                    })
                    .set(1);
                r.register("build_info", "Build information", build_info);
                r
            },
        }
    }

    /// Counts one answered request.
    pub fn record_request(&self, s: &RequestSample<'_>) {
        let model = Label::of(s.model, &self.none);
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: s.endpoint,
                model: model.clone(),
                backend: Label::of(s.backend, &self.none),
                status: s.status,
            })
            .inc();
        if s.model.is_none() {
            return;
        }
        let labels = ModelLabels { model };
        self.duration
            .get_or_create(&labels)
            .observe(s.duration.as_secs_f64());
        if let Some(ttft) = s.ttft {
            self.ttft.get_or_create(&labels).observe(ttft.as_secs_f64());
        }
        if let Some(t) = s.tokens {
            for (kind, n) in [("prompt", t.prompt), ("completion", t.completion)] {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: labels.model.clone(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Counts one failed upstream attempt.
    pub fn upstream_error(&self, backend: &Arc<str>, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                backend: Label(Arc::clone(backend)),
                kind,
            })
            .inc();
    }

    /// Counts a request refused for authentication or permission.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a request refused by a rate limit (`requests` or `tokens`).
    pub fn rate_limited(&self, reason: &'static str) {
        self.rate_limited
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a configuration reload and records whether it worked.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.config_last_reload_ok.set(i64::from(ok));
    }

    /// Drops the gauges of backends a reload removed.
    pub fn forget_backend(&self, name: &Arc<str>) {
        let labels = BackendLabels {
            backend: Label(Arc::clone(name)),
        };
        self.backend_up.remove(&labels);
        self.backend_ejected.remove(&labels);
        self.backend_in_flight.remove(&labels);
    }

    /// Proxied requests in flight now.
    pub fn in_flight_requests(&self) -> i64 {
        self.in_flight.get()
    }

    /// A proxied request started; the guard ends it.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// A client connection opened; the guard counts it closed.
    pub fn connection_opened(&self) -> InFlight {
        self.connections_open.inc();
        InFlight(self.connections_open.clone())
    }

    /// Prometheus text exposition, with backend gauges read fresh.
    pub fn render(&self, backends: &[Arc<Backend>]) -> String {
        for b in backends {
            let labels = BackendLabels {
                backend: Label(Arc::clone(&b.name)),
            };
            self.backend_up
                .get_or_create(&labels)
                .set(i64::from(b.health() != Health::Unhealthy));
            self.backend_ejected.get_or_create(&labels).set(i64::from(
                b.breaker_state() == crate::upstream::breaker::BreakerState::Open,
            ));
            self.backend_in_flight
                .get_or_create(&labels)
                .set(i64::try_from(b.in_flight()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements its gauge (in-flight requests, open connections) when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge<i64, std::sync::atomic::AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
