//! Phase 4, attempt: choose a backend of the model (`upstream::balancer`), send the request
//! to it, and fail over to another while nothing has reached the client, within
//! `upstream.max_attempts` and `upstream.retry_budget`. As in pingora, a request is tried
//! again only before any byte of the answer was sent; which failures may be retried, and
//! which count against a backend's breaker, is decided here, per failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::Body as _;
use http_body_util::{BodyDataStream, BodyExt, Full};

use super::Endpoint;
use super::account::Record;
use super::read::Parsed;
use crate::api::error::{ApiError, upstream_status_is_clients};
use crate::api::request_context::REQUEST_ID_HEADER;
use crate::api::upstream_error::sanitize_upstream_error;
use crate::runtime::state::{AppState, Configured, Model};
use crate::runtime::telemetry;
use crate::upstream::Attempt;
use crate::upstream::balancer::{self, PickError};
use crate::upstream::client::{BodyStream, Response};
use crate::upstream::homes::Found;

/// Largest upstream error body read (to show its message).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Largest non-streamed upstream answer accepted (embeddings of big batches are large).
const RESPONSE_LIMIT: usize = 64 * 1024 * 1024;

/// A successful upstream answer, before it becomes a response.
pub(crate) enum Reply {
    /// The whole body (non-streaming, or a backend that answered a stream request in one).
    Full {
        content_type: HeaderValue,
        body: Bytes,
    },
    /// A stream whose first bytes arrived; the attempt stays open until it ends.
    Stream {
        first: Bytes,
        upstream: BodyStream,
        attempt: Attempt,
        idle_timeout: Duration,
    },
}

/// Tries the model's backends until one answers, then its fallback models' (those the
/// key may use that serve the endpoint), within one attempt budget. A stored response's
/// follow-up never falls back (its response is on one model's backend).
pub(crate) async fn attempt(
    state: &AppState,
    current: &Configured,
    endpoint: Endpoint,
    model: &Model,
    parsed: &mut Parsed,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let upstream = &current.config.upstream;
    let mut budget = Budget {
        left: upstream.max_attempts,
        ends: record.started + upstream.retry_budget,
        first: true,
    };
    let mut tried = Vec::with_capacity(model.routes.len());
    if let Some(id) = parsed.previous_response.as_deref() {
        pin(state, model, id, record, &mut tried)?;
    }
    let first_error = match try_model(
        state,
        current,
        endpoint,
        model,
        None,
        tried,
        parsed,
        record,
        &mut budget,
    )
    .await
    {
        Ok(reply) => {
            record.served = Some(model.header.clone());
            return Ok(reply);
        }
        Err(Stop::Final(e)) => return Err(shed_counted(state, e)),
        Err(Stop::Exhausted(e)) => e,
    };
    if parsed.previous_response.is_none() {
        for name in &model.fallbacks {
            let Some(fallback) = current.models.get(&**name) else {
                continue;
            };
            // Never a model the key may not use, nor one that does not serve the endpoint.
            let allowed = record.key.as_ref().is_none_or(|k| k.allows(name));
            if !allowed || !fallback.endpoints.contains(endpoint) {
                continue;
            }
            if budget.spent() {
                break;
            }
            state.metrics.fallback(&model.name, &fallback.name);
            let tried = Vec::with_capacity(fallback.routes.len());
            match try_model(
                state,
                current,
                endpoint,
                fallback,
                Some(&fallback.name),
                tried,
                parsed,
                record,
                &mut budget,
            )
            .await
            {
                Ok(reply) => {
                    record.served = Some(fallback.header.clone());
                    record.fallback = Some(Arc::clone(&fallback.name));
                    return Ok(reply);
                }
                Err(Stop::Final(e)) => return Err(shed_counted(state, e)),
                Err(Stop::Exhausted(_)) => {}
            }
        }
    }
    Err(shed_counted(state, first_error))
}

/// The attempts a request has left, across its model and the fallbacks.
struct Budget {
    left: u32,
    ends: Instant,
    /// No attempt made yet: the first may wait in the model's queue.
    first: bool,
}

impl Budget {
    fn spent(&self) -> bool {
        self.left == 0 || (!self.first && Instant::now() >= self.ends)
    }
}

/// Why a model's backends gave no answer.
enum Stop {
    /// None could take it, or every attempt failed before the first byte: a fallback may.
    Exhausted(ApiError),
    /// The answer is final (the request itself is wrong): no fallback either.
    Final(ApiError),
}

/// The error, counted as shed when it is one of lack of capacity (once per request,
/// whichever model it was last refused by).
fn shed_counted(state: &AppState, error: ApiError) -> ApiError {
    if matches!(
        error,
        ApiError::BackendsSaturated(_) | ApiError::QueueFull(_) | ApiError::QueueTimeout { .. }
    ) {
        state.metrics.shed(error.kind());
    }
    error
}

/// Tries `model`'s backends (not those in `tried`) while the budget lasts. `public` is
/// the name to send to a route without an `upstream_model` when it is not the one the
/// client sent (a fallback).
#[expect(
    clippy::too_many_arguments,
    reason = "one request's whole context, borrowed"
)]
async fn try_model(
    state: &AppState,
    current: &Configured,
    endpoint: Endpoint,
    model: &Model,
    public: Option<&str>,
    mut tried: Vec<usize>,
    parsed: &mut Parsed,
    record: &mut Record,
    budget: &mut Budget,
) -> Result<Reply, Stop> {
    let request_id = record.request_id.clone();
    let lookup = parsed.previous_response.as_deref().map(str::to_owned);
    let mut last_error: Option<ApiError> = None;
    while !budget.spent() {
        // Only the first attempt waits for a slot: a failover goes where there is room.
        let picked = if budget.first {
            first_pick(current, model, &tried, record).await
        } else {
            balancer::pick(&model.routes, &tried).map_err(|e| refused(model, e))
        };
        let (index, mut attempt) = match picked {
            Ok(picked) => picked,
            Err(e) => {
                if last_error.is_none() {
                    last_error = Some(e);
                }
                break;
            }
        };
        budget.first = false;
        budget.left -= 1;
        tried.push(index);
        let route = &model.routes[index];
        attempt.wake_on_release(Arc::clone(&route.queues));
        record.backend = Some(Arc::clone(&route.backend.name));
        record.attempts += 1;
        let sent_model = route.upstream_model.as_deref().or(public);
        let body = parsed.bodies.body(sent_model);
        let upstream_model = sent_model.unwrap_or(&model.name);
        // One exported span per attempt (telemetry.rs), a child of the request's.
        let trace = tracing::info_span!(
            target: telemetry::TARGET,
            parent: &record.trace,
            "upstream attempt",
            otel.name = %format_args!("{} {upstream_model}", endpoint.operation()),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            gen_ai.operation.name = endpoint.operation(),
            gen_ai.request.model = upstream_model,
            gen_ai.provider.name = "openai",
            server.address = %route.backend.name,
            http.response.status_code = tracing::field::Empty,
            error.r#type = tracing::field::Empty,
            llm_gateway.backend = %route.backend.name,
        );
        let call = Call {
            endpoint,
            lookup: lookup.as_deref(),
            stream: parsed.stream,
            request_id: &request_id,
            started: record.started,
            trace: &trace,
        };
        match call.send(attempt, body).await {
            Ok((reply, ttft)) => {
                record.ttft = ttft;
                if let Some(ttft) = ttft {
                    tracing::event!(
                        target: telemetry::TARGET,
                        parent: &record.trace,
                        tracing::Level::INFO,
                        gen_ai.server.time_to_first_token = ttft.as_secs_f64(),
                        "first token"
                    );
                }
                return Ok(reply);
            }
            Err(failure) => {
                trace.record("error.type", failure.kind);
                trace.record("otel.status_code", "error");
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
                    return Err(Stop::Final(failure.error));
                }
                last_error = Some(failure.error);
            }
        }
    }
    Err(Stop::Exhausted(
        last_error.unwrap_or(ApiError::UpstreamUnreachable),
    ))
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

/// Why no backend could be picked, as the client hears it.
fn refused(model: &Model, e: PickError) -> ApiError {
    match e {
        PickError::NoneHealthy => ApiError::NoHealthyBackend(model.name.to_string()),
        PickError::Saturated => ApiError::BackendsSaturated(model.name.to_string()),
    }
}

/// A backend for the first attempt. When every usable backend is at `max_concurrency`, or
/// others already wait (no overtaking them), the request waits for its turn in the
/// model's queue (`upstream::queue`), up to `upstream.queue_timeout`.
async fn first_pick(
    current: &Configured,
    model: &Model,
    tried: &[usize],
    record: &mut Record,
) -> Result<(usize, Attempt), ApiError> {
    let upstream = &current.config.upstream;
    if upstream.queue_max == 0 {
        return balancer::pick(&model.routes, tried).map_err(|e| refused(model, e));
    }
    if model.queue.waiting() == 0 {
        match balancer::pick(&model.routes, tried) {
            Err(PickError::Saturated) => {}
            other => return other.map_err(|e| refused(model, e)),
        }
    }
    let key = record
        .key
        .as_ref()
        .map_or_else(|| Arc::from(""), |k| Arc::clone(&k.id));
    let Some(ticket) = model.queue.join(key) else {
        return Err(ApiError::QueueFull(model.name.to_string()));
    };
    let joined = Instant::now();
    // Room that came back without a slot being released (a circuit closing, a backend
    // coming back healthy) is found by the next request that arrives.
    if model
        .routes
        .iter()
        .any(|r| r.backend.is_usable(joined) && r.backend.has_capacity())
    {
        model.queue.wake_next();
    }
    let deadline = tokio::time::Instant::now() + upstream.queue_timeout;
    loop {
        if tokio::time::timeout_at(deadline, ticket.turn())
            .await
            .is_err()
        {
            record
                .state
                .metrics
                .queue_waited(&model.name, joined.elapsed());
            return Err(ApiError::QueueTimeout {
                model: model.name.to_string(),
                seconds: upstream.queue_timeout.as_secs(),
            });
        }
        match balancer::pick(&model.routes, tried) {
            Ok(picked) => {
                ticket.done();
                let waited = joined.elapsed();
                record.state.metrics.queue_waited(&model.name, waited);
                record.queued = Some(waited);
                return Ok(picked);
            }
            // The freed slot went to another model's request: wait for the next one.
            Err(PickError::Saturated) => ticket.wait_again(),
            Err(e) => return Err(refused(model, e)),
        }
    }
}

/// A follow-up of a stored response goes to the backend that has it: every other route
/// counts as tried. One the caller's key did not make is not found; one the gateway does
/// not remember (or whose backend no longer serves the model) goes to any backend, where a
/// 404 means "not here" and the next one is tried.
fn pin(
    state: &AppState,
    model: &Model,
    id: &str,
    record: &Record,
    tried: &mut Vec<usize>,
) -> Result<(), ApiError> {
    let key = record.key.as_ref().map(|k| &*k.id);
    match state.homes.find(id, key) {
        Found::NotYours => Err(ApiError::ResponseNotFound {
            id: id.to_owned(),
            previous: true,
        }),
        Found::Unknown => Ok(()),
        Found::Here(home) => {
            if model.routes.iter().any(|r| r.backend.name == home) {
                tried.extend(
                    (0..model.routes.len()).filter(|i| model.routes[*i].backend.name != home),
                );
            }
            Ok(())
        }
    }
}

/// One upstream call's fixed inputs.
struct Call<'a> {
    endpoint: Endpoint,
    /// The stored response the request needs: a 404 means this backend does not have it.
    lookup: Option<&'a str>,
    stream: bool,
    request_id: &'a HeaderValue,
    started: Instant,
    /// The attempt's exported span: its `traceparent` goes to the backend.
    trace: &'a tracing::Span,
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
        let target = backend
            .endpoint(self.endpoint.path())
            .ok_or_else(|| Failure::last(ApiError::UpstreamInvalid, "bad_url"))?;
        let response = {
            let mut request = Request::new(Full::new(body));
            *request.method_mut() = Method::POST;
            *request.uri_mut() = target.path.clone();
            let headers = request.headers_mut();
            headers.insert(header::HOST, target.host.clone());
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(REQUEST_ID_HEADER, self.request_id.clone());
            if !self.trace.is_disabled() {
                telemetry::inject(self.trace, headers);
            }
            if self.stream {
                headers.insert(
                    header::ACCEPT,
                    HeaderValue::from_static("text/event-stream"),
                );
            }
            if let Some(authorization) = backend.authorization() {
                headers.insert(header::AUTHORIZATION, authorization.clone());
            }
            let sent = backend.pool().request(&target.server, request);
            match tokio::time::timeout_at(deadline, sent).await {
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
                // sent again by the pool itself.
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
            if let Some(id) = self.lookup
                && status == StatusCode::NOT_FOUND
            {
                // Not broken, just not where the response is: try another backend.
                drop(attempt);
                return Err(Failure::retry(
                    ApiError::ResponseNotFound {
                        id: id.to_owned(),
                        previous: true,
                    },
                    "response_not_found",
                ));
            }
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
            let mut upstream = BodyDataStream::new(response.into_body());
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
    response: Response,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ReadError> {
    let mut body = response.into_body();
    let length = body.size_hint().exact();
    if length.is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(Some(Err(_))) => return Err(ReadError::Broken),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if buf.is_empty() && length == Some(chunk.len() as u64) {
            return Ok(chunk);
        }
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
}
