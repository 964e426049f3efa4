//! Phase 6, account: what is settled, counted, logged and written to the usage ledger when
//! a proxied request ends (exactly once, also when the client goes away), and the
//! provisional ledger record a stream leaves when its first byte goes out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;

use crate::access::keys::KeyEntry;
use crate::access::ratelimit::{Limiter, Snapshot};
use crate::config::AccessLog;
use crate::proxy::Endpoint;
use crate::proxy::tokens::Tokens;
use crate::runtime::metrics::RequestSample;
use crate::runtime::state::AppState;
use crate::runtime::telemetry;
use crate::storage::database::now_ms;
use crate::storage::database::usage_rows::{Outcome, UsageRecord};
use crate::storage::ledger::Ledger;

/// Status logged for a client that went away before the answer (nginx's convention).
const CLIENT_CLOSED_REQUEST: u16 = 499;
const I64_MAX: u64 = i64::MAX.unsigned_abs();
/// Token counts above this (2^40) are recorded as this, so that sums over millions of
/// rows stay far from overflowing 64 bits.
const MAX_RECORDED_TOKENS: u64 = 1 << 40;

/// What is counted and logged once a request is over.
pub(crate) struct Record {
    pub(crate) state: Arc<AppState>,
    pub(crate) span: tracing::Span,
    /// The exported span of this request (`runtime/telemetry.rs`), disabled unless trace
    /// export is on.
    pub(crate) trace: tracing::Span,
    pub(crate) endpoint: Endpoint,
    pub(crate) started: Instant,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) backend: Option<Arc<str>>,
    pub(crate) attempts: u32,
    pub(crate) stream: bool,
    pub(crate) ttft: Option<Duration>,
    /// How long it waited in the model's queue for a backend, if it did.
    pub(crate) queued: Option<Duration>,
    /// The model that answered, as the `x-llm-gateway-model` header value.
    pub(crate) served: Option<HeaderValue>,
    /// The fallback model that answered, when the requested one could not.
    pub(crate) fallback: Option<Arc<str>>,
    finished: bool,
    /// Request id as sent to the client and upstream.
    pub(crate) request_id: HeaderValue,
    /// Authenticated (or open mode): the request goes into the usage ledger.
    pub(crate) ledgered: bool,
    /// The ledger id, chosen when a provisional record was written (streams).
    ledger_id: Option<String>,
    /// The client's key (keys mode).
    pub(crate) key: Option<Arc<KeyEntry>>,
    /// Tokens reserved from the key's limiter, settled at the end.
    pub(crate) reservation: Option<(Arc<Limiter>, u64)>,
    /// Rate-limit state for the response headers.
    pub(crate) limits: Option<Snapshot>,
    /// Which requests get an access log event.
    access_log: AccessLog,
}

impl Drop for Record {
    fn drop(&mut self) {
        // The handler future was dropped mid-flight: the client disconnected before any
        // response; the upstream request was cancelled with it.
        self.finish(
            CLIENT_CLOSED_REQUEST,
            None,
            Some("client_disconnected"),
            Outcome::ClientDisconnected,
        );
    }
}

impl Record {
    /// A request that has just arrived.
    pub(crate) fn new(
        state: Arc<AppState>,
        endpoint: Endpoint,
        request_id: HeaderValue,
        key: Option<Arc<KeyEntry>>,
        access_log: AccessLog,
    ) -> Self {
        let trace = tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "request",
            otel.name = endpoint.operation(),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            gen_ai.operation.name = endpoint.operation(),
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            server.address = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            error.r#type = tracing::field::Empty,
            llm_gateway.request_id = request_id.to_str().unwrap_or("invalid"),
            llm_gateway.attempts = tracing::field::Empty,
        );
        Self {
            state,
            span: tracing::Span::current(),
            trace,
            endpoint,
            started: Instant::now(),
            model: None,
            backend: None,
            attempts: 0,
            stream: false,
            ttft: None,
            queued: None,
            served: None,
            fallback: None,
            finished: false,
            request_id,
            ledgered: false,
            ledger_id: None,
            key,
            reservation: None,
            limits: None,
            access_log,
        }
    }

    /// The stream's provisional ledger record, to be written as its first bytes go out:
    /// the row that remains (outcome `interrupted`, prompt tokens estimated from
    /// `prompt_bytes`, no completion tokens, latency so far) if the process dies before the
    /// stream ends. The final record has the same id and replaces it. `None` when the
    /// request is not ledgered.
    pub(crate) fn begin_stream(&mut self, prompt_bytes: usize) -> Option<Provisional> {
        if !self.ledgered {
            return None;
        }
        let tokens = Tokens {
            prompt: Tokens::estimate_from_bytes(prompt_bytes),
            completion: 0,
            estimated: true,
        };
        let id = new_ledger_id();
        let record = self
            .usage_record(&id, 200, tokens, Outcome::Interrupted)
            .map(|s| (*s).to_owned());
        self.ledger_id = Some(id);
        Some(Provisional {
            ledger: Arc::clone(&self.state.ledger),
            record,
        })
    }

    /// The record of this request, its text borrowed from the request's state and `id`.
    fn usage_record<'a>(
        &'a self,
        id: &'a str,
        status: u16,
        t: Tokens,
        outcome: Outcome,
    ) -> UsageRecord<&'a str> {
        UsageRecord {
            id,
            // Always visible ASCII (`request_context::acceptable`, or a UUID).
            request_id: self.request_id.to_str().unwrap_or("invalid"),
            ts_ms: now_ms(),
            key_id: self.key.as_ref().map(|k| &*k.id),
            model: self.model.as_deref(),
            backend: self.backend.as_deref(),
            endpoint: self.endpoint.label(),
            status,
            // A backend may report absurd counts; sums over them must not overflow.
            prompt_tokens: t.prompt.min(MAX_RECORDED_TOKENS),
            completion_tokens: t.completion.min(MAX_RECORDED_TOKENS),
            estimated: t.estimated,
            latency_us: micros(self.started.elapsed()),
            ttft_us: self.ttft.map(micros),
            client_disconnected: outcome == Outcome::ClientDisconnected,
            instance_id: &self.state.instance_id,
            outcome,
            queue_us: self.queued.map(micros),
            fallback: self.fallback.as_deref(),
        }
    }

    /// Settles the rate limit, writes the ledger record, counts and logs the request; only
    /// the first call does anything.
    pub(crate) fn finish(
        &mut self,
        status: u16,
        tokens: Option<Tokens>,
        error: Option<&str>,
        outcome: Outcome,
    ) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let duration = self.started.elapsed();
        let t = tokens.unwrap_or_default();
        if let Some((limiter, estimated)) = self.reservation.take() {
            limiter.settle(estimated, t.prompt.saturating_add(t.completion));
        }
        if self.ledgered {
            // Time-ordered, so the primary key index grows at its end instead of touching
            // random pages (and writing their full images to the WAL).
            let mut buf = uuid::Uuid::encode_buffer();
            let id = match &self.ledger_id {
                Some(id) => id.as_str(),
                None => uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf),
            };
            self.state
                .ledger
                .append(&self.usage_record(id, status, t, outcome));
        }
        if !self.trace.is_disabled() {
            self.record_trace(status, tokens, error);
        }
        self.state.metrics.record_request(&RequestSample {
            endpoint: self.endpoint.label(),
            model: self.model.as_ref(),
            backend: self.backend.as_ref(),
            status,
            duration,
            ttft: self.ttft,
            tokens,
        });
        let logged = match self.access_log {
            AccessLog::All => true,
            AccessLog::Errors => status >= 400 || outcome != Outcome::Complete,
            AccessLog::Off => false,
        };
        if !logged {
            return;
        }
        let _entered = self.span.enter();
        tracing::info!(
            target: "llm_gateway::access",
            endpoint = self.endpoint.label(),
            key = self.key.as_ref().map_or("-", |k| &k.id),
            model = self.model.as_deref().unwrap_or("-"),
            backend = self.backend.as_deref().unwrap_or("-"),
            status,
            latency_ms = duration.as_secs_f64() * 1000.0,
            ttft_ms = self.ttft.map(|d| d.as_secs_f64() * 1000.0),
            queued_ms = self.queued.map(|d| d.as_secs_f64() * 1000.0),
            fallback = self.fallback.as_deref(),
            prompt_tokens = t.prompt,
            completion_tokens = t.completion,
            tokens_estimated = t.estimated,
            attempts = self.attempts,
            stream = self.stream,
            client_disconnected = outcome == Outcome::ClientDisconnected,
            outcome = outcome.as_str(),
            error = error.unwrap_or("-"),
            "request finished"
        );
    }

    /// The request's outcome on its exported span, which ends when the record is dropped.
    fn record_trace(&self, status: u16, tokens: Option<Tokens>, error: Option<&str>) {
        let span = &self.trace;
        if let Some(model) = &self.model {
            // The name and gen_ai.request.model were set when the model was known
            // (admit.rs); the gateway answers with the model it was asked for.
            span.record("gen_ai.response.model", &**model);
        }
        if let Some(backend) = &self.backend {
            span.record("server.address", &**backend);
        }
        // Integers as i64: the exporter writes u64 values as text.
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Some(t) = tokens {
            span.record("gen_ai.usage.input_tokens", int(t.prompt));
            span.record("gen_ai.usage.output_tokens", int(t.completion));
        }
        span.record("http.response.status_code", i64::from(status));
        span.record("llm_gateway.attempts", i64::from(self.attempts));
        if let Some(error) = error {
            span.record("error.type", error);
        }
        if status >= 500 || error.is_some() {
            span.record("otel.status_code", "error");
        }
    }
}

/// A new time-ordered ledger id (UUID v7).
fn new_ledger_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(I64_MAX).min(I64_MAX)
}

/// A stream's provisional ledger record (`Record::begin_stream`), not written yet.
#[derive(Debug)]
pub(crate) struct Provisional {
    ledger: Arc<Ledger>,
    record: UsageRecord,
}

impl Provisional {
    /// Spools it: call before the stream's first bytes go out.
    pub(crate) fn write(self) {
        self.ledger.append_begin(&self.record.map(String::as_str));
    }
}
