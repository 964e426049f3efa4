//! A mock OpenAI-compatible upstream (NOT a language model) for the demo, the tests and the
//! benchmark. It can stream, delay, fail with any status, break off mid-stream, hang, or
//! leave out usage, and it counts what it saw. Here: its behaviour and state, the routes,
//! and what every endpoint shares; the answers by kind in `generate.rs` (chat,
//! completions), `responses.rs` (the Responses API) and `encode.rs` (everything that
//! generates no text).

mod encode;
mod generate;
mod responses;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use encode::PerInput;

/// How the mock answers; change it at any time with [`MockUpstream::set`].
#[derive(Debug, Clone)]
pub struct MockBehavior {
    /// Answer every completion request with this status and an OpenAI error body.
    pub fail_status: Option<u16>,
    /// Never answer completion requests.
    pub hang: bool,
    /// Wait this long before the response headers.
    pub delay: Duration,
    /// Streaming: wait this long after the headers before the first chunk.
    pub first_chunk_delay: Duration,
    /// Streaming: pause between chunks.
    pub chunk_interval: Duration,
    /// Content chunks (tokens) per answer unless the request sets `max_tokens`.
    pub chunks: usize,
    /// Streaming: break the connection after this many chunks.
    pub drop_after: Option<usize>,
    /// Report usage (in bodies, and in streams when `include_usage` is asked).
    pub send_usage: bool,
    /// `GET /v1/models` answers 200 (else 503).
    pub healthy: bool,
    /// Streaming: end with `data: [DONE]` (servers do; a cut stream does not).
    pub send_done: bool,
}

impl Default for MockBehavior {
    fn default() -> Self {
        Self {
            fail_status: None,
            hang: false,
            delay: Duration::ZERO,
            first_chunk_delay: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            chunks: 8,
            drop_after: None,
            send_usage: true,
            healthy: true,
            send_done: true,
        }
    }
}

/// Shared state of one mock: behaviour and counters.
#[derive(Debug, Default)]
pub struct MockState {
    behavior: Mutex<MockBehavior>,
    /// Completion/embedding requests received.
    pub requests: AtomicU64,
    /// Health probes received.
    pub probes: AtomicU64,
    /// Streams whose body was dropped before the end (client or gateway went away).
    pub cancelled_streams: AtomicU64,
    /// Streams sent to the end.
    pub completed_streams: AtomicU64,
    last_request: Mutex<Option<SeenRequest>>,
    /// Stored responses (Responses API), oldest first, at most `responses::STORED_MAX`.
    stored: Mutex<VecDeque<(String, Value)>>,
}

/// What the mock saw of the last generation request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// The request's path (and query).
    pub path: String,
    /// The JSON body.
    pub body: Value,
    /// The body's bytes as received.
    pub raw: bytes::Bytes,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `x-request-id` header.
    pub request_id: Option<String>,
    /// The W3C `traceparent` header.
    pub traceparent: Option<String>,
}

impl MockState {
    /// A state with the given behaviour.
    pub fn new(behavior: MockBehavior) -> Arc<Self> {
        Arc::new(Self {
            behavior: Mutex::new(behavior),
            ..Self::default()
        })
    }

    /// Current behaviour.
    pub fn behavior(&self) -> MockBehavior {
        self.behavior
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes the behaviour.
    pub fn set(&self, change: impl FnOnce(&mut MockBehavior)) {
        change(
            &mut self
                .behavior
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    /// A stored response by id.
    fn stored(&self, id: &str) -> Option<Value> {
        let stored = self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stored.iter().find(|(i, _)| i == id).map(|(_, v)| v.clone())
    }

    /// Keeps a response, forgetting the oldest past the bound.
    fn store(&self, id: &str, response: Value) {
        let mut stored = self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stored.len() >= responses::STORED_MAX {
            stored.pop_front();
        }
        stored.push_back((id.to_owned(), response));
    }

    /// Forgets a stored response; false if there was none.
    fn forget(&self, id: &str) -> bool {
        let mut stored = self
            .stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = stored.len();
        stored.retain(|(i, _)| i != id);
        stored.len() != before
    }

    /// The last generation request.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.last_request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The handler of an endpoint that answers one item per input.
fn per_input(kind: PerInput) -> axum::routing::MethodRouter<Arc<MockState>> {
    post(move |state, uri, headers, body| encode::per_input(kind, state, uri, headers, body))
}

/// The largest request body the mock reads.
pub const BODY_LIMIT: usize = 64 << 20;

/// The mock's routes.
pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/embeddings", post(encode::embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/rerank", post(encode::rerank))
        .route("/rerank", post(encode::rerank))
        .route("/v2/rerank", post(encode::rerank))
        .route("/v1/score", post(per_input(PerInput::Score)))
        .route("/score", post(per_input(PerInput::Score)))
        .route("/pooling", post(per_input(PerInput::Pooling)))
        .route("/classify", post(per_input(PerInput::Classify)))
        .route("/tokenize", post(encode::tokenize))
        .route("/detokenize", post(encode::detokenize))
        .route("/v1/models", get(models))
        // vLLM's liveness endpoint, which routers in front of it (vllm-router) wait for.
        .route("/health", get(|| async { StatusCode::OK }))
        // Bodies as large as real servers take (axum's default is 2 MB, below the
        // gateway's own default limit of 4 MiB).
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<MockState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A mock running on its own task, stopped when dropped (for tests).
#[derive(Debug)]
pub struct MockUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Behaviour and counters.
    pub state: Arc<MockState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start(behavior: MockBehavior) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = MockState::new(behavior);
        #[expect(
            clippy::disallowed_methods,
            reason = "test helper: the task is aborted when the mock is dropped"
        )]
        let task = tokio::spawn(serve(listener, Arc::clone(&state), std::future::pending()));
        Ok(Self { addr, state, task })
    }

    /// Base URL as a backend's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Changes the behaviour.
    pub fn set(&self, change: impl FnOnce(&mut MockBehavior)) {
        self.state.set(change);
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn models(State(state): State<Arc<MockState>>) -> Response {
    state.probes.fetch_add(1, Ordering::Relaxed);
    if state.behavior().healthy {
        Json(json!({"object":"list","data":[{"id":"mock","object":"model","created":0,"owned_by":"mock"}]}))
            .into_response()
    } else {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

/// Common front part of every generation endpoint: counting, failure modes, delay.
async fn begin(
    state: &MockState,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(MockBehavior, Value), Response> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error":{"message":format!("mock: bad JSON: {e}"),"type":"invalid_request_error","param":null,"code":null}})),
        )
            .into_response()
    })?;
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    *state
        .last_request
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(SeenRequest {
        path: uri.path().to_owned(),
        body: request.clone(),
        raw: bytes::Bytes::copy_from_slice(body),
        authorization: text(header::AUTHORIZATION.as_str()),
        request_id: text("x-request-id"),
        traceparent: text("traceparent"),
    });
    let b = state.behavior();
    if b.hang {
        std::future::pending::<()>().await;
    }
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    if let Some(code) = b.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err((
            status,
            Json(json!({"error":{"message":format!("mock failure {code}"),"type":"server_error","param":null,"code":code}})),
        )
            .into_response());
    }
    Ok((b, request))
}

pub(super) fn token_count(b: &MockBehavior, request: &Value) -> usize {
    request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map_or(b.chunks, |n| n.min(4096) as usize)
}

pub(super) fn prompt_tokens(request: &Value) -> u64 {
    (request.to_string().len() as u64).div_ceil(4)
}

/// An SSE response sending `events` as `b` says (delays, a break after some events),
/// counting how the stream ended.
fn event_stream(events: Vec<Bytes>, b: MockBehavior, state: Arc<MockState>) -> Response {
    let body = MockStream {
        events: events.into_iter(),
        sent: 0,
        behavior: b,
        state,
        finished: false,
    };
    let stream = stream::unfold(body, |mut s| async move {
        let item = s.next_event().await?;
        Some((item, s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

struct MockStream {
    events: std::vec::IntoIter<Bytes>,
    sent: usize,
    behavior: MockBehavior,
    state: Arc<MockState>,
    finished: bool,
}

impl MockStream {
    async fn next_event(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished {
            return None;
        }
        let delay = if self.sent == 0 {
            self.behavior.first_chunk_delay
        } else {
            self.behavior.chunk_interval
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.behavior.drop_after == Some(self.sent) {
            self.finished = true;
            return Some(Err(std::io::Error::other("mock: dropping the stream")));
        }
        match self.events.next() {
            Some(event) => {
                self.sent += 1;
                Some(Ok(event))
            }
            None => {
                self.finished = true;
                self.state.completed_streams.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

impl Drop for MockStream {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancelled_streams.fetch_add(1, Ordering::Relaxed);
        }
    }
}
