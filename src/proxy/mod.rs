//! The proxy path: validate an OpenAI request, pick a backend, fail over before the first
//! byte, and relay the answer (whole or streamed) with its token usage.

pub(crate) mod account;
pub(crate) mod held_body;
pub(crate) mod relay;
pub(crate) mod request_body;
pub(crate) mod rewrite;
pub(crate) mod sse;
pub(crate) mod tokens;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::value::RawValue;

use crate::access::ratelimit::LimitKind;
use crate::api::authn::Caller;
use crate::api::error::{
    ApiError, rate_limit_headers, sanitize_upstream_error, upstream_status_is_clients,
};
use crate::proxy::account::Record;
use crate::proxy::held_body::{Guards, HeldBody};
use crate::proxy::relay::{Relay, StreamSummary};
use crate::proxy::rewrite::Rewriter;
use crate::proxy::sse::SseScanner;
use crate::runtime::state::{AppState, Configured, Model};
use crate::runtime::telemetry::{REQUEST_ID_HEADER, RequestId};
use crate::storage::database::usage_rows::Outcome;
use crate::storage::ledger::Refusal;
use crate::upstream::Attempt;
use crate::upstream::balancer::{self, PickError};
use tokens::Tokens;

/// Largest upstream error body read (to show its message).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Largest non-streamed upstream answer accepted (embeddings of big batches are large).
const RESPONSE_LIMIT: usize = 64 * 1024 * 1024;

/// The OpenAI endpoints the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The parameter every request must carry besides `model`, and what it must be.
    fn required(self, value: Option<&RawValue>) -> Result<(), ApiError> {
        let first = value.and_then(|v| v.get().bytes().next());
        let (param, ok, expected) = match self {
            Self::Chat => ("messages", first.map(|b| b == b'['), "an array"),
            Self::Completions => (
                "prompt",
                first.map(|b| b == b'"' || b == b'['),
                "a string or an array",
            ),
            Self::Embeddings => (
                "input",
                first.map(|b| b == b'"' || b == b'['),
                "a string or an array",
            ),
        };
        match ok {
            None => Err(ApiError::missing(param)),
            Some(false) => Err(ApiError::invalid_type(param, expected)),
            Some(true) => Ok(()),
        }
    }

    fn can_stream(self) -> bool {
        self != Self::Embeddings
    }
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, Endpoint::Chat, request).await
}

/// `POST /v1/completions`
pub async fn completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, Endpoint::Completions, request).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, Endpoint::Embeddings, request).await
}

/// A successful upstream answer, before it becomes a response.
enum Reply {
    /// The whole body (non-streaming, or a backend that answered a stream request in one).
    Full {
        content_type: HeaderValue,
        body: Bytes,
    },
    /// A stream whose first bytes arrived; the attempt stays open until it ends.
    Stream {
        first: Bytes,
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        attempt: Attempt,
        idle_timeout: Duration,
    },
}

/// A reply with what the response side needs to know about the request.
struct Proxied {
    reply: Reply,
    /// The usage chunk was requested by the gateway, not the client: remove it.
    strip_usage: bool,
    /// Request body size, for estimating prompt tokens.
    prompt_bytes: usize,
}

async fn handle(state: Arc<AppState>, endpoint: Endpoint, request: Request) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or(HeaderValue::from_static("-"));
    // Set by `authn::authenticate`, which every API route is behind.
    let key = request
        .extensions()
        .get::<Caller>()
        .and_then(Caller::key)
        .cloned();
    // This request keeps the configuration it started with, whatever a reload does.
    let current = state.current();
    let mut record = Record::new(
        Arc::clone(&state),
        endpoint,
        request_id,
        key,
        current.config.logging.access_log,
    );
    match state.ledger.admission() {
        Ok(()) => {}
        Err(Refusal::Full) => return fail(&mut record, ApiError::LedgerFull),
        Err(Refusal::Unwritable) => return fail(&mut record, ApiError::LedgerUnavailable),
    }
    let Ok(permit) = Arc::clone(&current.limiter).try_acquire_owned() else {
        return fail(&mut record, ApiError::Overloaded);
    };
    record.ledgered = true;
    let guards = Guards {
        permit,
        in_flight: state.metrics.in_flight(),
    };
    let Proxied {
        reply,
        strip_usage,
        prompt_bytes,
    } = match proxy(&state, &current, endpoint, request, &mut record).await {
        Ok(proxied) => proxied,
        Err(error) => return fail(&mut record, error),
    };
    match reply {
        Reply::Full { content_type, body } => {
            let reported = tokens::from_response_body(&body);
            let tokens = if endpoint == Endpoint::Embeddings {
                // Embeddings produce no completion tokens; only the prompt counts.
                let mut t = Tokens::from_usage(reported, prompt_bytes, 0);
                t.completion = 0;
                t.estimated = reported.and_then(|u| u.prompt_tokens).is_none();
                t
            } else {
                Tokens::from_usage(
                    reported,
                    prompt_bytes,
                    Tokens::estimate_from_bytes(body.len()),
                )
            };
            record.finish(200, Some(tokens), None, Outcome::Complete);
            // The permit is released once the connection has taken the body.
            let mut response = Response::new(Body::new(HeldBody::new(body, guards)));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, content_type);
            if let Some(limits) = &record.limits {
                rate_limit_headers(headers, limits);
            }
            response
        }
        Reply::Stream {
            first,
            upstream,
            mut attempt,
            idle_timeout,
        } => {
            let mut record = record;
            record.begin_stream(prompt_bytes);
            let limits = record.limits;
            let on_end = Box::new(move |summary: StreamSummary| {
                let _guards = guards;
                let tokens =
                    Tokens::from_usage(summary.usage, prompt_bytes, summary.content_events);
                match summary.end {
                    crate::proxy::relay::StreamEnd::Complete => attempt.success(),
                    crate::proxy::relay::StreamEnd::ClientGone => {}
                    crate::proxy::relay::StreamEnd::Incomplete => record
                        .state
                        .metrics
                        .upstream_error(&attempt.backend().name, "stream_incomplete"),
                    crate::proxy::relay::StreamEnd::UpstreamBroken
                    | crate::proxy::relay::StreamEnd::IdleTimeout => {
                        attempt.failure();
                        if let Some(kind) = summary.end.error_kind() {
                            record
                                .state
                                .metrics
                                .upstream_error(&attempt.backend().name, kind);
                        }
                    }
                }
                drop(attempt);
                record.finish(
                    200,
                    Some(tokens),
                    summary.end.error_kind(),
                    summary.end.outcome(),
                );
            });
            let relay = Relay::new(
                first,
                upstream,
                SseScanner::new(strip_usage),
                idle_timeout,
                on_end,
            );
            let mut response = Response::new(Body::from_stream(relay));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            if let Some(limits) = &limits {
                rate_limit_headers(headers, limits);
            }
            response
        }
    }
}

fn fail(record: &mut Record, error: ApiError) -> Response {
    if error.is_shed() {
        record.ledgered = false;
    }
    record.finish(
        error.status().as_u16(),
        None,
        Some(error.kind()),
        Outcome::Complete,
    );
    let mut response = error.into_response();
    if let Some(limits) = &record.limits {
        rate_limit_headers(response.headers_mut(), limits);
    }
    response
}

/// Validates the request and runs the attempts.
async fn proxy(
    state: &AppState,
    current: &Configured,
    endpoint: Endpoint,
    request: Request,
    record: &mut Record,
) -> Result<Proxied, ApiError> {
    let request_id = record.request_id.clone();
    let server = &current.config.server;
    let raw =
        crate::proxy::request_body::read(request, server.max_body_bytes, server.body_read_timeout)
            .await?;
    let head = Head::parse(&raw)?;
    let model_name = match head.model {
        None => return Err(ApiError::missing("model")),
        Some(v) => serde_json::from_str::<String>(v.get())
            .map_err(|_| ApiError::invalid_type("model", "a string"))?,
    };
    let stream = match head.stream.map(RawValue::get) {
        None => false,
        Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::invalid_type("stream", "a boolean")),
    };
    if stream && !endpoint.can_stream() {
        return Err(ApiError::InvalidParam {
            param: "stream",
            code: "unsupported_parameter",
            message: "Streaming is not supported for embeddings.".to_owned(),
        });
    }
    let client_usage = match head.stream_options {
        None => false,
        Some(v) if v.get() == "null" => false,
        // serde would also take an array for the struct below.
        Some(v) if !v.get().starts_with('{') => {
            return Err(ApiError::invalid_type(
                "stream_options",
                "an object with a boolean include_usage",
            ));
        }
        Some(v) => {
            #[derive(serde::Deserialize)]
            struct StreamOptions {
                #[serde(default)]
                include_usage: Option<bool>,
            }
            serde_json::from_str::<StreamOptions>(v.get())
                .map_err(|_| {
                    ApiError::invalid_type(
                        "stream_options",
                        "an object with a boolean include_usage",
                    )
                })?
                .include_usage
                .unwrap_or(false)
        }
    };
    endpoint.required(match endpoint {
        Endpoint::Chat => head.messages,
        Endpoint::Completions => head.prompt,
        Endpoint::Embeddings => head.input,
    })?;
    let model: &Model = current
        .models
        .get(&model_name)
        .ok_or_else(|| ApiError::ModelNotFound(model_name.clone()))?;
    record.model = Some(Arc::clone(&model.name));
    record.stream = stream;
    if let Some(key) = record.key.clone() {
        if !key.allows(&model_name) {
            state.metrics.auth_failure("model_not_allowed");
            return Err(ApiError::ModelNotAllowed(model_name));
        }
        if let Some(limiter) = &key.limiter {
            let completion = match endpoint {
                Endpoint::Embeddings => 0,
                _ => head
                    .max_output_tokens()
                    .unwrap_or(current.config.auth.reserve_completion_tokens),
            };
            let estimate = Tokens::estimate_from_bytes(raw.len()).saturating_add(completion);
            match limiter.acquire(estimate, state.limit_share()) {
                Ok(grant) => {
                    record.limits = Some(grant.snapshot);
                    record.reservation = Some((Arc::clone(limiter), grant.reserved));
                }
                Err(refusal) => {
                    record.limits = Some(refusal.snapshot);
                    state.metrics.rate_limited(match refusal.kind {
                        LimitKind::Requests => "requests",
                        LimitKind::Tokens => "tokens",
                    });
                    return Err(ApiError::RateLimited(refusal));
                }
            }
        }
    }

    let upstream = &current.config.upstream;
    let strip_usage = stream && upstream.request_stream_usage && !client_usage;
    let prompt_bytes = raw.len();
    let mut bodies = Rewriter::new(raw.clone(), head.model, head.stream_options, strip_usage);

    let mut tried = Vec::with_capacity(model.routes.len());
    let mut last_error: Option<ApiError> = None;
    let budget_end = record.started + upstream.retry_budget;
    for n in 0..upstream.max_attempts {
        if n > 0 && Instant::now() >= budget_end {
            break;
        }
        let (index, attempt) = match balancer::pick(&model.routes, &tried) {
            Ok(picked) => picked,
            Err(e) => {
                if last_error.is_none() {
                    last_error = Some(match e {
                        PickError::NoneHealthy => ApiError::NoHealthyBackend(model_name.clone()),
                        PickError::Saturated => ApiError::BackendsSaturated(model_name.clone()),
                    });
                }
                break;
            }
        };
        tried.push(index);
        let route = &model.routes[index];
        record.backend = Some(Arc::clone(&route.backend.name));
        record.attempts += 1;
        let body = bodies.body(route.upstream_model.as_deref());
        let call = Call {
            endpoint,
            stream,
            request_id: &request_id,
            started: record.started,
        };
        match call.send(attempt, body).await {
            Ok((reply, ttft)) => {
                record.ttft = ttft;
                return Ok(Proxied {
                    reply,
                    strip_usage,
                    prompt_bytes,
                });
            }
            Err(failure) => {
                state
                    .metrics
                    .upstream_error(&route.backend.name, failure.kind);
                tracing::warn!(
                    backend = %route.backend.name,
                    kind = failure.kind,
                    retry = failure.retry,
                    "upstream attempt failed"
                );
                if !failure.retry {
                    return Err(failure.error);
                }
                last_error = Some(failure.error);
            }
        }
    }
    Err(last_error.unwrap_or(ApiError::UpstreamUnreachable))
}

/// The request fields the gateway looks at, borrowed from the body; the rest is skipped
/// without being built, so a large body is not blown up into a tree of values.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "crate::proxy::rewrite::present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
}

impl<'a> Head<'a> {
    fn parse(raw: &'a [u8]) -> Result<Self, ApiError> {
        if raw.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::InvalidJson(
                "the body must be a JSON object".to_owned(),
            ));
        }
        serde_json::from_slice(raw).map_err(|e| ApiError::InvalidJson(e.to_string()))
    }

    /// The most completion tokens the request allows, when it sets a bound: reserved from
    /// a token rate limit up front, as OpenAI does.
    fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .and_then(|v| v.get().parse::<u64>().ok())
    }
}

/// Why one attempt failed, and whether another backend may be tried.
struct Failure {
    error: ApiError,
    kind: &'static str,
    retry: bool,
}

impl Failure {
    fn retry(error: ApiError, kind: &'static str) -> Self {
        Self {
            error,
            kind,
            retry: true,
        }
    }
    fn last(error: ApiError, kind: &'static str) -> Self {
        Self {
            error,
            kind,
            retry: false,
        }
    }
}

/// One upstream call's fixed inputs.
struct Call<'a> {
    endpoint: Endpoint,
    stream: bool,
    request_id: &'a HeaderValue,
    started: Instant,
}

impl Call<'_> {
    /// Sends to the attempt's backend. Nothing reaches the client here, so every failure may
    /// still go to another backend. Returns the reply and, for streams, time to first byte.
    async fn send(
        &self,
        mut attempt: Attempt,
        body: Bytes,
    ) -> Result<(Reply, Option<Duration>), Failure> {
        let backend = Arc::clone(attempt.backend());
        let sent_at = tokio::time::Instant::now();
        let deadline = sent_at
            + if self.stream {
                backend.timeouts.first_token
            } else {
                backend.timeouts.request
            };
        let url = backend
            .endpoint_url(self.endpoint.path())
            .map_err(|_| Failure::last(ApiError::UpstreamInvalid, "bad_url"))?;
        let response = {
            let mut request = backend
                .client
                .post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(REQUEST_ID_HEADER, self.request_id.clone())
                .body(body);
            if self.stream {
                request = request.header(header::ACCEPT, "text/event-stream");
            }
            if let Some(key) = backend.api_key() {
                request = request.bearer_auth(key.expose());
            }
            match tokio::time::timeout_at(deadline, request.send()).await {
                Ok(Ok(response)) => response,
                Err(_) => {
                    attempt.failure();
                    return Err(Failure::retry(ApiError::UpstreamTimeout, "timeout"));
                }
                Ok(Err(e)) if e.is_connect() => {
                    attempt.failure();
                    return Err(Failure::retry(ApiError::UpstreamUnreachable, "connect"));
                }
                // Also a pooled connection the backend closed after taking the request:
                // not sent to it again (it may be working on it); another backend may be
                // tried, as an attempt. A request never written on a reused connection is
                // re-sent by the connection pool itself.
                Ok(Err(_)) => {
                    attempt.failure();
                    return Err(Failure::retry(ApiError::UpstreamUnreachable, "request"));
                }
            }
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let body = read_capped(response, ERROR_BODY_LIMIT, deadline)
                .await
                .unwrap_or_default();
            let secrets: Vec<&str> = backend.api_key().map(|k| k.expose()).into_iter().collect();
            let error = ApiError::UpstreamStatus {
                status,
                body: sanitize_upstream_error(&body, &secrets).map(Box::new),
                retry_after,
            };
            return Err(if status.is_server_error() {
                attempt.failure();
                Failure::retry(error, "status_5xx")
            } else if status == StatusCode::TOO_MANY_REQUESTS {
                // Busy, not broken: try elsewhere without counting towards ejection.
                drop(attempt);
                Failure::retry(error, "status_429")
            } else if upstream_status_is_clients(status) {
                // The request itself is wrong: every backend would say the same.
                attempt.success();
                Failure::last(error, "status_4xx")
            } else {
                // 401/403/404...: this route's key or model name is wrong. Another
                // backend may be set up right, and this one should be ejected.
                attempt.failure();
                Failure::retry(error, "status_4xx_route")
            });
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json"));
        let is_sse = content_type.as_bytes().starts_with(b"text/event-stream");
        if self.stream && is_sse {
            let mut upstream = response.bytes_stream().boxed();
            return match tokio::time::timeout_at(deadline, upstream.next()).await {
                Err(_) => {
                    attempt.failure();
                    Err(Failure::retry(
                        ApiError::UpstreamTimeout,
                        "first_token_timeout",
                    ))
                }
                Ok(None) => {
                    attempt.failure();
                    Err(Failure::retry(ApiError::UpstreamInvalid, "empty_stream"))
                }
                Ok(Some(Err(_))) => {
                    attempt.failure();
                    Err(Failure::retry(
                        ApiError::UpstreamUnreachable,
                        "stream_broken",
                    ))
                }
                Ok(Some(Ok(first))) => {
                    let ttft = self.started.elapsed();
                    let idle_timeout = backend.timeouts.stream_idle;
                    Ok((
                        Reply::Stream {
                            first,
                            upstream,
                            attempt,
                            idle_timeout,
                        },
                        Some(ttft),
                    ))
                }
            };
        }
        let body_deadline = sent_at + backend.timeouts.request;
        match read_capped(response, RESPONSE_LIMIT, body_deadline).await {
            Ok(body) => {
                attempt.success();
                Ok((Reply::Full { content_type, body }, None))
            }
            Err(ReadError::Timeout) => {
                attempt.failure();
                Err(Failure::retry(ApiError::UpstreamTimeout, "timeout"))
            }
            Err(ReadError::TooLarge) => {
                attempt.success();
                Err(Failure::last(
                    ApiError::UpstreamInvalid,
                    "response_too_large",
                ))
            }
            Err(ReadError::Broken) => {
                attempt.failure();
                Err(Failure::retry(ApiError::UpstreamUnreachable, "body_broken"))
            }
        }
    }
}

enum ReadError {
    Timeout,
    TooLarge,
    Broken,
}

/// Reads an upstream body up to `limit` bytes before `deadline`.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(Err(_)) => return Err(ReadError::Broken),
            Ok(Ok(None)) => return Ok(buf.freeze()),
            Ok(Ok(Some(chunk))) => {
                if buf.is_empty() && response.content_length() == Some(chunk.len() as u64) {
                    return Ok(chunk);
                }
                if buf.len() + chunk.len() > limit {
                    return Err(ReadError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}
