//! Prometheus metrics: one registry per gateway instance, labels only from fixed sets
//! (`labels.rs`); series of models and backends a reload removed are dropped (`series.rs`).

mod labels;
mod series;
mod text;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::runtime::state::Configured;
use crate::upstream::{Backend, Health};
use labels::{
    BackendLabels, BuildLabels, FallbackLabels, Label, ModelLabels, ReasonLabels, RequestLabels,
    ResultLabels, TokenLabels, UpstreamErrorLabels,
};
use series::Series;
pub use text::Format;

/// Label value for requests that matched no configured model or reached no backend.
pub const NONE: &str = "none";

/// Why a request was shed (`requests_shed_total{reason}`).
const SHED_REASONS: [&str; 6] = [
    "overloaded",
    "backends_saturated",
    "queue_full",
    "queue_timeout",
    "ledger_full",
    "ledger_unavailable",
];

fn latency_histogram() -> Histogram {
    // 1 ms .. ~17 min (request_timeout defaults to 10 min)
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 21,
    ))
}

/// Why a request was refused with 401/403 (`auth_failures_total{reason}`).
const AUTH_FAILURE_REASONS: [&str; 6] = [
    "missing",
    "invalid",
    "revoked",
    "expired",
    "multiple",
    "model_not_allowed",
];

/// A counter family with a series at 0 for each reason, so that a dashboard or a rule sees
/// 0 rather than nothing before the first event.
fn with_series(reasons: &[&'static str]) -> Family<ReasonLabels, Counter> {
    let family = Family::<ReasonLabels, Counter>::default();
    for &reason in reasons {
        drop(family.get_or_create(&ReasonLabels { reason }));
    }
    family
}

/// Registers `metric` under `name` (prefixed `llm_gateway_`) and hands it back.
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// All metrics of one gateway.
pub struct Metrics {
    registry: Registry,
    requests: Series<RequestLabels, Counter>,
    duration: Series<ModelLabels, Histogram>,
    ttft: Series<ModelLabels, Histogram>,
    tokens: Series<TokenLabels, Counter>,
    upstream_errors: Series<UpstreamErrorLabels, Counter>,
    in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    connections_open: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Times an accept loop stopped at `server.max_connections`.
    pub connection_limit_reached: Counter,
    backend_up: Series<BackendLabels, Gauge>,
    backend_ejected: Series<BackendLabels, Gauge>,
    backend_in_flight: Series<BackendLabels, Gauge>,
    model_backends_available: Series<ModelLabels, Gauge>,
    queue_depth: Series<ModelLabels, Gauge>,
    queue_wait: Series<ModelLabels, Histogram>,
    fallbacks: Series<FallbackLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    rate_limited: Family<ReasonLabels, Counter>,
    shed: Family<ReasonLabels, Counter>,
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
    /// `ledger.spool_max_bytes`.
    pub spool_max_bytes: Gauge,
    /// Age of the oldest unshipped record, in seconds (0 when caught up).
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
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
        let mut root = Registry::default();
        // The standard name (as the Go and Python clients export it), unprefixed: alert
        // rules see restarts in its changes.
        let start: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        root.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            start,
        );
        let r = root.sub_registry_with_prefix("llm_gateway");
        Self {
            requests: add(
                r,
                "requests",
                "Requests answered, by endpoint, model, backend and HTTP status",
                Series::default(),
            ),
            duration: add(
                r,
                "request_duration_seconds",
                "Time from request arrival until the answer is ready (streams: until the last byte), by model",
                Series::new(latency_histogram),
            ),
            ttft: add(
                r,
                "time_to_first_token_seconds",
                "Streaming: time from request arrival to the first upstream bytes, by model",
                Series::new(latency_histogram),
            ),
            tokens: add(
                r,
                "tokens",
                "Tokens by model and kind (prompt, completion); includes estimates",
                Series::default(),
            ),
            upstream_errors: add(
                r,
                "upstream_errors",
                "Failed upstream attempts by backend and kind",
                Series::default(),
            ),
            in_flight: add(
                r,
                "in_flight_requests",
                "Proxied requests being handled now (streams included)",
                Gauge::default(),
            ),
            backend_up: add(
                r,
                "backend_up",
                "1 unless the health prober marked the backend unhealthy",
                Series::default(),
            ),
            backend_ejected: add(
                r,
                "backend_circuit_open",
                "1 while the circuit breaker keeps traffic away from the backend",
                Series::default(),
            ),
            connections_open: add(
                r,
                "connections_open",
                "Open client connections",
                Gauge::default(),
            ),
            connection_limit_reached: add(
                r,
                "connection_limit_reached",
                "Times the gateway stopped accepting connections at server.max_connections (new ones wait in the listen backlog)",
                Counter::default(),
            ),
            backend_in_flight: add(
                r,
                "backend_in_flight_requests",
                "Requests in flight per backend",
                Series::default(),
            ),
            model_backends_available: add(
                r,
                "model_backends_available",
                "Backends of the model that can take traffic now (healthy, circuit not open); 0 means its requests fail",
                Series::default(),
            ),
            queue_depth: add(
                r,
                "queue_depth",
                "Requests waiting for a backend of the model (all its backends at max_concurrency)",
                Series::default(),
            ),
            queue_wait: add(
                r,
                "queue_wait_seconds",
                "Time requests waited in the model's queue, whether they got a backend or timed out",
                Series::new(latency_histogram),
            ),
            fallbacks: add(
                r,
                "fallbacks",
                "Requests sent on to a fallback model because none of the model's backends could take them, by model and fallback",
                Series::default(),
            ),
            auth_failures: add(
                r,
                "auth_failures",
                "Requests refused with 401/403, by reason (missing, invalid, revoked, expired, model_not_allowed)",
                with_series(&AUTH_FAILURE_REASONS),
            ),
            rate_limited: add(
                r,
                "rate_limited",
                "Requests refused with 429 by a key's limit (requests or tokens)",
                with_series(&["requests", "tokens"]),
            ),
            shed: add(
                r,
                "requests_shed",
                "Requests refused with 503 for lack of capacity, by reason: overloaded (server.max_concurrent_requests), backends_saturated (every backend of the model at max_concurrency), ledger_full, ledger_unavailable",
                with_series(&SHED_REASONS),
            ),
            key_refresh_failures: add(
                r,
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
                    r,
                    "config_reloads",
                    "Configuration reloads (SIGHUP), by result; a failed one leaves the previous configuration in effect",
                    reloads,
                )
            },
            config_last_reload_ok: {
                let ok = Gauge::default();
                ok.set(1);
                add(
                    r,
                    "config_last_reload_successful",
                    "1 when the last configuration reload succeeded (or none was attempted), 0 when it failed",
                    ok,
                )
            },
            ledger: LedgerMetrics {
                spooled: add(
                    r,
                    "ledger_records_spooled",
                    "Usage records appended to the local spool",
                    Counter::default(),
                ),
                written: add(
                    r,
                    "ledger_records_written",
                    "Usage records committed to the database",
                    Counter::default(),
                ),
                write_failures: add(
                    r,
                    "ledger_write_failures",
                    "Failed usage batch inserts (the records stay in the spool and are retried)",
                    Counter::default(),
                ),
                dropped: add(
                    r,
                    "ledger_records_dropped",
                    "Usage records lost: the spool full or unwritable with ledger.on_full set to drop, held records at exit, a record refused by the database (set aside in rejected.jsonl), or one unreadable",
                    Counter::default(),
                ),
                corrupt_frames: add(
                    r,
                    "ledger_spool_corrupt_frames",
                    "Damaged or torn spool records skipped",
                    Counter::default(),
                ),
                spool_bytes: add(
                    r,
                    "ledger_spool_bytes",
                    "Bytes in usage spool files not yet deleted: unshipped records, plus shipped ones in segment files not yet rolled and deleted (up to 1 MiB, or ledger.segment_bytes if smaller)",
                    Gauge::default(),
                ),
                spool_max_bytes: add(
                    r,
                    "ledger_spool_max_bytes",
                    "The spool size limit (ledger.spool_max_bytes): at it, ledger.on_full applies",
                    Gauge::default(),
                ),
                lag_seconds: add(
                    r,
                    "ledger_lag_seconds",
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
                root
            },
        }
    }

    /// Counts one answered request.
    pub fn record_request(&self, s: &RequestSample<'_>) {
        let model = Label::of(s.model, &self.none);
        let labels = RequestLabels {
            endpoint: s.endpoint,
            model: model.clone(),
            backend: Label::of(s.backend, &self.none),
            status: s.status,
        };
        self.requests.with(&labels, |c| c.inc());
        if s.model.is_none() {
            return;
        }
        let labels = ModelLabels { model };
        self.duration
            .with(&labels, |h| h.observe(s.duration.as_secs_f64()));
        if let Some(ttft) = s.ttft {
            self.ttft.with(&labels, |h| h.observe(ttft.as_secs_f64()));
        }
        if let Some(t) = s.tokens {
            for (kind, n) in [("prompt", t.prompt), ("completion", t.completion)] {
                let labels = TokenLabels {
                    model: labels.model.clone(),
                    kind,
                };
                self.tokens.with(&labels, |c| c.inc_by(n));
            }
        }
    }

    /// Counts one failed upstream attempt.
    pub fn upstream_error(&self, backend: &Arc<str>, kind: &'static str) {
        let labels = UpstreamErrorLabels {
            backend: Label(Arc::clone(backend)),
            kind,
        };
        self.upstream_errors.with(&labels, |c| c.inc());
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

    /// Counts a request of `model` sent on to `fallback`.
    pub fn fallback(&self, model: &Arc<str>, fallback: &Arc<str>) {
        let labels = FallbackLabels {
            model: Label(Arc::clone(model)),
            fallback: Label(Arc::clone(fallback)),
        };
        self.fallbacks.with(&labels, |c| c.inc());
    }

    /// Records how long a request of `model` waited in its queue.
    pub fn queue_waited(&self, model: &Arc<str>, waited: Duration) {
        let labels = ModelLabels {
            model: Label(Arc::clone(model)),
        };
        self.queue_wait
            .with(&labels, |h| h.observe(waited.as_secs_f64()));
    }

    /// Counts a request shed for lack of capacity (one of `SHED_REASONS`).
    pub fn shed(&self, reason: &'static str) {
        self.shed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a configuration reload and records whether it worked.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.config_last_reload_ok.set(i64::from(ok));
    }

    /// Forgets every series of a model or backend that is not configured any more (after a
    /// reload): they would stay at their last value forever. The `none` label stays.
    pub fn retain_routes(&self, models: &[Arc<str>], backends: &[Arc<Backend>]) {
        let model = |l: &Label| *l.0 == *NONE || models.iter().any(|m| **m == *l.0);
        let backend = |l: &Label| *l.0 == *NONE || backends.iter().any(|b| *b.name == *l.0);
        self.requests
            .retain(|l| model(&l.model) && backend(&l.backend));
        self.duration.retain(|l| model(&l.model));
        self.ttft.retain(|l| model(&l.model));
        self.model_backends_available.retain(|l| model(&l.model));
        self.queue_depth.retain(|l| model(&l.model));
        self.queue_wait.retain(|l| model(&l.model));
        self.fallbacks
            .retain(|l| model(&l.model) && model(&l.fallback));
        self.tokens.retain(|l| model(&l.model));
        self.upstream_errors.retain(|l| backend(&l.backend));
        for gauges in [
            &self.backend_up,
            &self.backend_ejected,
            &self.backend_in_flight,
        ] {
            gauges.retain(|l| backend(&l.backend));
        }
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

    /// The exposition in `format`, with backend and model gauges read fresh.
    pub fn render(&self, current: &Configured, format: Format) -> String {
        let now = std::time::Instant::now();
        for b in &current.backends {
            let labels = BackendLabels {
                backend: Label(Arc::clone(&b.name)),
            };
            self.backend_up.with(&labels, |g| {
                g.set(i64::from(b.health() != Health::Unhealthy))
            });
            let open = b.breaker_state() == crate::upstream::breaker::BreakerState::Open;
            self.backend_ejected
                .with(&labels, |g| g.set(i64::from(open)));
            let in_flight = i64::try_from(b.in_flight()).unwrap_or(i64::MAX);
            self.backend_in_flight.with(&labels, |g| g.set(in_flight));
        }
        for model in current.models.values() {
            let usable = model
                .routes
                .iter()
                .filter(|r| r.backend.is_usable(now))
                .count();
            let labels = ModelLabels {
                model: Label(Arc::clone(&model.name)),
            };
            self.model_backends_available.with(&labels, |g| {
                g.set(i64::try_from(usable).unwrap_or(i64::MAX))
            });
            let waiting = i64::try_from(model.queue.waiting()).unwrap_or(i64::MAX);
            self.queue_depth.with(&labels, |g| g.set(waiting));
        }
        self.render_registry(format)
    }

    fn render_registry(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text004 => text::to_text_004(&out),
        }
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

#[cfg(test)]
mod tests {
    use super::{Format, Metrics};

    /// The formats escape `\\` and `"` in help texts differently (and prometheus-client
    /// escapes nothing there): no help text may hold them, nor a line break.
    #[test]
    fn help_texts_need_no_escaping() {
        let text = Metrics::new().render_registry(Format::OpenMetrics);
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert!(helps.len() >= 10, "{text}");
        assert!(
            text.contains("# HELP llm_gateway_ledger_records_dropped "),
            "{text}"
        );
        for help in helps {
            assert!(!help.contains(['\\', '"']), "{help}");
        }
    }
}
