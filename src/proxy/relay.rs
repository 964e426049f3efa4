//! The streamed response body: relays upstream SSE as it arrives, enforces the idle timeout,
//! and reports how the stream ended exactly once (completed, broken, or client gone).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::upstream::client::BodyStream;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::proxy::sse::SseScanner;
use crate::proxy::tokens::Usage;
use crate::storage::database::usage_rows::Outcome;

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Upstream finished the body with `data: [DONE]`.
    Complete,
    /// Upstream closed the body cleanly but without `[DONE]`: passed on as it is (some
    /// server may omit it), counted and logged as incomplete.
    Incomplete,
    /// Upstream connection broke mid-stream.
    UpstreamBroken,
    /// Upstream stayed silent longer than the idle timeout.
    IdleTimeout,
    /// The client went away before the end; the upstream request is dropped with it.
    ClientGone,
}

impl StreamEnd {
    /// How the ledger records it.
    pub fn outcome(self) -> Outcome {
        match self {
            Self::Complete => Outcome::Complete,
            Self::Incomplete => Outcome::StreamIncomplete,
            Self::UpstreamBroken => Outcome::StreamBroken,
            Self::IdleTimeout => Outcome::StreamIdleTimeout,
            Self::ClientGone => Outcome::ClientDisconnected,
        }
    }

    /// Label for metrics and logs, `None` for a normal end.
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Self::Complete => None,
            Self::Incomplete => Some("stream_incomplete"),
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
type OnResponseId = Box<dyn FnOnce(String) + Send>;

/// A response body stream over an upstream SSE body.
pub struct Relay {
    first: Option<Bytes>,
    upstream: BodyStream,
    scanner: SseScanner,
    idle_timeout: Duration,
    /// Fires `idle_timeout` after it was last armed; when it fires, `last_data` decides
    /// whether the stream was idle or the timer is moved on (cheaper than moving it for
    /// every chunk).
    idle: Pin<Box<Sleep>>,
    /// When upstream bytes last arrived.
    last_data: Instant,
    /// How the upstream ended, noticed while a batch was still to be sent.
    deferred: Option<StreamEnd>,
    /// The first batch, gathered by `prime` before the response head went out.
    primed: Option<Option<Result<Bytes, std::io::Error>>>,
    on_end: Option<OnEnd>,
    /// Told the stored response's id as soon as the stream names it.
    on_response_id: Option<OnResponseId>,
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
        upstream: BodyStream,
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
            last_data: Instant::now(),
            deferred: None,
            primed: None,
            on_end: Some(on_end),
            on_response_id: None,
        }
    }

    /// Calls `hook` with the response's id (Responses API) once the stream has named it,
    /// before that event goes out, so a follow-up can never arrive before it is known.
    pub fn on_response_id(mut self, hook: OnResponseId) -> Self {
        self.on_response_id = Some(hook);
        self
    }

    /// Gathers the first batch now, so that it leaves in the same write as the response
    /// head (hyper sends the head alone when the body is not ready at once). Returns
    /// whether the stream has ended with it (its end callback has run).
    pub async fn prime(&mut self) -> bool {
        let first = std::future::poll_fn(|cx| self.poll_batch(cx)).await;
        self.primed = Some(first);
        self.on_end.is_none()
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

    /// Ends the stream: nothing more after a complete one, an error event the client's
    /// SDK will surface after a broken one.
    fn finish_with(&mut self, end: StreamEnd) -> Option<Bytes> {
        self.end(end);
        let message = match end {
            StreamEnd::Complete | StreamEnd::Incomplete | StreamEnd::ClientGone => return None,
            StreamEnd::UpstreamBroken => "The upstream server broke off the stream.",
            StreamEnd::IdleTimeout => "The upstream server stopped sending; stream closed.",
        };
        let code = end.error_kind().unwrap_or("upstream_error");
        let event = format!(
            "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"server_error\",\"param\":null,\"code\":\"{code}\"}}}}\n\n"
        );
        Some(Bytes::from(event))
    }
}

/// Most bytes gathered into one write when upstream chunks arrive together.
const MAX_BATCH: usize = 64 * 1024;
/// Longest single SSE event accepted; an upstream that never ends an event is cut off
/// rather than buffered without bound.
const MAX_EVENT: usize = 1024 * 1024;

/// Output gathered in one poll: one chunk is passed on as is, several are joined.
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Batch {
    fn add(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        match (&mut self.first, &mut self.joined) {
            (None, _) => self.first = Some(bytes),
            (Some(first), None) => {
                let mut joined = BytesMut::with_capacity(first.len() + bytes.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(&bytes);
                self.joined = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&bytes),
        }
    }

    fn len(&self) -> usize {
        match (&self.first, &self.joined) {
            (_, Some(j)) => j.len(),
            (Some(f), None) => f.len(),
            (None, None) => 0,
        }
    }

    fn take(self) -> Option<Bytes> {
        match (self.first, self.joined) {
            (_, Some(j)) => Some(j.freeze()),
            (first, None) => first,
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    /// Passes on every event that is ready, joined into one chunk, so a burst of tokens
    /// costs one write to the client instead of one each.
    ///
    /// Reading the upstream body drives its connection in this task (`upstream/pool.rs`),
    /// so whatever the connection has read comes out of one poll: a batch goes out when
    /// the upstream has nothing more ready (or at `MAX_BATCH`). A ready token never waits
    /// for the network.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.primed.take() {
            Some(first) => Poll::Ready(first),
            None => this.poll_batch(cx),
        }
    }
}

impl Relay {
    /// The batching behind `poll_next` (which hands out a primed batch first).
    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let this = self;
        if let Some(end) = this.deferred.take() {
            return Poll::Ready(this.finish_with(end).map(Ok));
        }
        if this.on_end.is_none() {
            return Poll::Ready(None);
        }
        let mut batch = Batch::default();
        let mut got_data = false;
        if let Some(first) = this.first.take() {
            got_data = true;
            batch.add(this.scanner.push(first));
        }
        let end = loop {
            if batch.len() >= MAX_BATCH {
                break None;
            }
            match this.upstream.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    got_data = true;
                    batch.add(this.scanner.push(chunk));
                    if this.scanner.pending_len() > MAX_EVENT {
                        break Some(StreamEnd::UpstreamBroken);
                    }
                }
                Poll::Ready(Some(Err(_))) => break Some(StreamEnd::UpstreamBroken),
                Poll::Ready(None) => {
                    batch.add(this.scanner.finish());
                    break Some(if this.scanner.done {
                        StreamEnd::Complete
                    } else {
                        StreamEnd::Incomplete
                    });
                }
                Poll::Pending => break None,
            }
        };
        if got_data {
            this.last_data = Instant::now();
        }
        if this.on_response_id.is_some()
            && let Some(id) = this.scanner.response_id.take()
            && let Some(hook) = this.on_response_id.take()
        {
            hook(id);
        }
        match (batch.take(), end) {
            (Some(out), end) => {
                if let Some(end) = end {
                    // Account for the stream (usage ledger included) before its last
                    // bytes go out, so a record exists for every answer a client has seen.
                    this.end(end);
                }
                this.deferred = end;
                Poll::Ready(Some(Ok(out)))
            }
            (None, Some(end)) => Poll::Ready(this.finish_with(end).map(Ok)),
            (None, None) => {
                // Waiting on upstream: the idle timer must be registered too.
                while this.idle.as_mut().poll(cx).is_ready() {
                    let deadline = this.last_data + this.idle_timeout;
                    if deadline <= Instant::now() {
                        return Poll::Ready(this.finish_with(StreamEnd::IdleTimeout).map(Ok));
                    }
                    // Data came since the timer was armed: wait out the rest from then.
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(StreamEnd::ClientGone);
    }
}
