//! Prometheus metrics: one registry per gateway instance, labels only from fixed sets.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::upstream::{Backend, Health};

/// Label value for requests that matched no configured model or reached no backend.
pub const NONE: &str = "none";

/// A label value shared with the configuration: cloning it is a reference count, not an
/// allocation, so recording a request allocates nothing once its series exists.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

impl Label {
    fn of(value: Option<&Arc<str>>, none: &Label) -> Self {
        value.map_or_else(|| none.clone(), |v| Label(Arc::clone(v)))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    model: Label,
    backend: Label,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: Label,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    backend: Label,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~17 min (request_timeout defaults to 10 min)
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 21,
    ))
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
    /// Registers every metric with its help text.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llm_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by endpoint, model, backend and HTTP status",
            requests.clone(),
        );
        let duration: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request arrival until the answer is ready (streams: until the last byte), by model",
            duration.clone(),
        );
        let ttft: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Streaming: time from request arrival to the first upstream bytes, by model",
            ttft.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens by model and kind (prompt, completion); includes estimates",
            tokens.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream attempts by backend and kind",
            upstream_errors.clone(),
        );
        let in_flight = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "in_flight_requests",
            "Proxied requests being handled now (streams included)",
            in_flight.clone(),
        );
        let backend_up = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_up",
            "1 unless the health prober marked the backend unhealthy",
            backend_up.clone(),
        );
        let backend_ejected = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_circuit_open",
            "1 while the circuit breaker keeps traffic away from the backend",
            backend_ejected.clone(),
        );
        let connections_open = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "connections_open",
            "Open client connections",
            connections_open.clone(),
        );
        let connection_limit_reached = Counter::default();
        registry.register(
            "connection_limit_reached",
            "Times the gateway stopped accepting connections at server.max_connections (new ones wait in the listen backlog)",
            connection_limit_reached.clone(),
        );
        let backend_in_flight = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_in_flight_requests",
            "Requests in flight per backend",
            backend_in_flight.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused with 401/403, by reason (missing, invalid, revoked, expired, model_not_allowed)",
            auth_failures.clone(),
        );
        let rate_limited = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a key's limit (requests or tokens)",
            rate_limited.clone(),
        );
        let key_refresh_failures = Counter::default();
        registry.register(
            "key_refresh_failures",
            "Failed reloads of the API key table from the database (the last table stays in use)",
            key_refresh_failures.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        for result in ["success", "failure"] {
            drop(config_reloads.get_or_create(&ResultLabels { result }));
        }
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result; a failed one leaves the previous configuration in effect",
            config_reloads.clone(),
        );
        let config_last_reload_ok = Gauge::default();
        config_last_reload_ok.set(1);
        registry.register(
            "config_last_reload_successful",
            "1 when the last configuration reload succeeded (or none was attempted), 0 when it failed",
            config_last_reload_ok.clone(),
        );
        let ledger = LedgerMetrics::default();
        registry.register(
            "ledger_records_spooled",
            "Usage records appended to the local spool",
            ledger.spooled.clone(),
        );
        registry.register(
            "ledger_records_written",
            "Usage records committed to the database",
            ledger.written.clone(),
        );
        registry.register(
            "ledger_write_failures",
            "Failed usage batch inserts (the records stay in the spool and are retried)",
            ledger.write_failures.clone(),
        );
        registry.register(
            "ledger_records_dropped",
            "Usage records lost: the spool full or unwritable with on_full = \"drop\", held records at exit, a record refused by the database (set aside in rejected.jsonl), or one unreadable",
            ledger.dropped.clone(),
        );
        registry.register(
            "ledger_spool_corrupt_frames",
            "Damaged or torn spool records skipped",
            ledger.corrupt_frames.clone(),
        );
        registry.register(
            "ledger_spool_bytes",
            "Bytes in usage spool files not yet deleted: unshipped records, plus shipped ones in segment files not yet rolled and deleted (up to 1 MiB, or ledger.segment_bytes if smaller)",
            ledger.spool_bytes.clone(),
        );
        registry.register(
            "ledger_lag_milliseconds",
            "Age of the oldest usage record not yet in the database (0 when caught up)",
            ledger.lag_ms.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        Self {
            registry,
            requests,
            duration,
            ttft,
            tokens,
            upstream_errors,
            in_flight,
            connections_open,
            connection_limit_reached,
            backend_up,
            backend_ejected,
            backend_in_flight,
            auth_failures,
            rate_limited,
            key_refresh_failures,
            config_reloads,
            config_last_reload_ok,
            ledger,
            none: Label(Arc::from(NONE)),
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
