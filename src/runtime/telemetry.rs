//! OpenTelemetry trace export (`[tracing]`, off by default): the OTLP/HTTP exporter behind a
//! bounded batch processor on a thread of its own (never on the request path), and W3C
//! `traceparent` read from the client and written to the backend. The spans themselves are
//! the gateway's `tracing` spans of target [`TARGET`] (`proxy/mod.rs`, `proxy/attempt.rs`);
//! they carry model names, token counts and addresses, never prompts or completions.

use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TracingConfig;

/// The `tracing` target of the spans that are exported (and kept out of the logs).
pub const TARGET: &str = "gen_ai";

/// Spans waiting for export at most; more are dropped (and counted by the SDK).
const MAX_QUEUE: usize = 4096;

/// The running exporter, or nothing when export is off.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<(SdkTracerProvider, Duration)>,
}

impl Telemetry {
    /// Starts the exporter `config` asks for (none without `otlp_endpoint`).
    pub fn start(config: &TracingConfig) -> Result<Self, String> {
        let Some(url) = config.traces_url() else {
            return Ok(Self::default());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint {url}: {e}"))?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE)
            .with_max_export_batch_size(512)
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batches)
                    .build(),
            )
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Self {
            provider: Some((provider, config.export_timeout)),
        })
    }

    /// The provider, for the layer that feeds it.
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref().map(|(p, _)| p)
    }

    /// Exports what is queued and stops, waiting at most the export timeout.
    pub fn shutdown(self) {
        if let Some((provider, timeout)) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(timeout)
        {
            eprintln!("trace export: shutdown: {e}");
        }
    }
}

/// Makes `span` the child of the client's `traceparent`, if it sent one and `span` is
/// exported.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !span.is_disabled() && headers.contains_key("traceparent") {
        let cx =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        // Fails only when the span is not exported: not the case here.
        let _ = span.set_parent(cx);
    }
}

/// Writes `span`'s `traceparent` (and `tracestate`) into a request to a backend.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(
        &span.context(),
        &mut opentelemetry_http::HeaderInjector(headers),
    );
}
