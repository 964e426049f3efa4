//! The streamed response body: relays upstream SSE as it arrives, enforces the idle timeout,
//! and reports how the stream ended exactly once (completed, broken, or client gone).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::sse::SseScanner;
use crate::usage::Usage;

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Upstream finished the body.
    Complete,
    /// Upstream connection broke mid-stream.
    UpstreamBroken,
    /// Upstream stayed silent longer than the idle timeout.
    IdleTimeout,
    /// The client went away before the end; the upstream request is dropped with it.
    ClientGone,
}

impl StreamEnd {
    /// Label for metrics and logs, `None` for a normal end.
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Self::Complete => None,
            Self::UpstreamBroken => Some("stream_broken"),
            Self::IdleTimeout => Some("stream_idle_timeout"),
            Self::ClientGone => Some("client_disconnected"),
        }
    }
}

/// What the stream saw, handed to the completion callback.
#[derive(Debug, Clone, Copy)]
pub struct StreamSummary {
    /// How it ended.
    pub end: StreamEnd,
    /// Usage reported upstream, if any.
    pub usage: Option<Usage>,
    /// Content events relayed (an estimate of completion tokens).
    pub content_events: u64,
}

type OnEnd = Box<dyn FnOnce(StreamSummary) + Send>;

/// A response body stream over an upstream SSE body.
pub struct Relay {
    first: Option<Bytes>,
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    scanner: SseScanner,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    on_end: Option<OnEnd>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("scanner", &self.scanner)
            .field("ended", &self.on_end.is_none())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Relays `first` then the rest of `upstream`; `on_end` runs once when the stream ends
    /// or is dropped.
    pub fn new(
        first: Bytes,
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        scanner: SseScanner,
        idle_timeout: Duration,
        on_end: OnEnd,
    ) -> Self {
        Self {
            first: Some(first),
            upstream,
            scanner,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            on_end: Some(on_end),
        }
    }

    fn end(&mut self, end: StreamEnd) {
        if let Some(on_end) = self.on_end.take() {
            on_end(StreamSummary {
                end,
                usage: self.scanner.usage,
                content_events: self.scanner.content_events,
            });
        }
    }

    /// Ends with an error event the client's SDK will surface.
    fn fail(&mut self, end: StreamEnd, message: &str) -> Option<Bytes> {
        self.end(end);
        let code = end.error_kind().unwrap_or("upstream_error");
        let event = format!(
            "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"server_error\",\"param\":null,\"code\":\"{code}\"}}}}\n\n"
        );
        Some(Bytes::from(event))
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.on_end.is_none() {
                return Poll::Ready(None);
            }
            let chunk = if let Some(first) = this.first.take() {
                first
            } else {
                match this.upstream.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(chunk))) => chunk,
                    Poll::Ready(Some(Err(_))) => {
                        let event = this.fail(
                            StreamEnd::UpstreamBroken,
                            "The upstream server broke off the stream.",
                        );
                        return Poll::Ready(event.map(Ok));
                    }
                    Poll::Ready(None) => {
                        let rest = this.scanner.finish();
                        this.end(StreamEnd::Complete);
                        if rest.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    Poll::Pending => {
                        if this.idle.as_mut().poll(cx).is_ready() {
                            let event = this.fail(
                                StreamEnd::IdleTimeout,
                                "The upstream server stopped sending; stream closed.",
                            );
                            return Poll::Ready(event.map(Ok));
                        }
                        return Poll::Pending;
                    }
                }
            };
            this.idle.as_mut().reset(Instant::now() + this.idle_timeout);
            let out = this.scanner.push(chunk);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(out)));
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(StreamEnd::ClientGone);
    }
}
