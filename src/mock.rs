//! A mock OpenAI-compatible upstream (NOT a language model) for the demo, the tests and the
//! benchmark. It can stream, delay, fail with any status, break off mid-stream, hang, or
//! leave out usage, and it counts what it saw.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::net::TcpListener;

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
}

/// What the mock saw of the last generation request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
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

    /// The last generation request.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.last_request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The mock's routes.
pub fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        // vLLM's liveness endpoint, which routers in front of it (vllm-router) wait for.
        .route("/health", get(|| async { StatusCode::OK }))
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

fn token_count(b: &MockBehavior, request: &Value) -> usize {
    request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map_or(b.chunks, |n| n.min(4096) as usize)
}

fn prompt_tokens(request: &Value) -> u64 {
    (request.to_string().len() as u64).div_ceil(4)
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(state, headers, body, true).await
}

async fn completions(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, headers, body, false).await
}

async fn generate(state: Arc<MockState>, headers: HeaderMap, body: Bytes, chat: bool) -> Response {
    let (b, request) = match begin(&state, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_owned();
    let n = token_count(&b, &request);
    let prompt = prompt_tokens(&request);
    let usage =
        json!({"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n as u64});
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let mut answer = if chat {
            json!({"id":"chatcmpl-mock","object":"chat.completion","created":0,"model":model,
                "choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}]})
        } else {
            json!({"id":"cmpl-mock","object":"text_completion","created":0,"model":model,
                "choices":[{"index":0,"text":text,"finish_reason":"stop"}]})
        };
        if b.send_usage {
            answer["usage"] = usage;
        }
        return Json(answer).into_response();
    }
    let include_usage = b.send_usage
        && request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
    let chunk = |i: usize, last: bool| -> Bytes {
        let piece = format!("tok{i} ");
        let finish = if last { json!("stop") } else { Value::Null };
        let mut c = if chat {
            json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,
                "choices":[{"index":0,"delta":{"content":piece},"finish_reason":finish}]})
        } else {
            json!({"id":"cmpl-mock","object":"text_completion","created":0,"model":model,
                "choices":[{"index":0,"text":piece,"finish_reason":finish}]})
        };
        if include_usage {
            c["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut events: Vec<Bytes> = (0..n).map(|i| chunk(i, i + 1 == n)).collect();
    if include_usage {
        let u = json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,"choices":[],"usage":usage});
        events.push(Bytes::from(format!("data: {u}\n\n")));
    }
    if b.send_done {
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let body = MockStream {
        events: events.into_iter(),
        sent: 0,
        behavior: b,
        state: Arc::clone(&state),
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

async fn embeddings(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (b, request) = match begin(&state, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let inputs = match request.get("input") {
        Some(Value::Array(a)) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object":"embedding","index":i,"embedding":[0.1,0.2,0.3,0.4]}))
        .collect();
    let prompt = prompt_tokens(&request);
    let mut answer = json!({"object":"list","data":data,"model":request.get("model")});
    if b.send_usage {
        answer["usage"] = json!({"prompt_tokens":prompt,"total_tokens":prompt});
    }
    Json(answer).into_response()
}
