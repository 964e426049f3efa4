//! Phase 5, respond: the answer the client gets. A whole body is handed over in slices with
//! the request's slot held until the connection has taken it (`held_body.rs`); a stream is
//! relayed event by event (`relay.rs`, `sse.rs`) and settles its record when it ends. Rate
//! limit headers go on every answer, also on errors.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use std::sync::Arc;

use super::account::Record;
use super::attempt::Reply;
use super::held_body::{Guards, HeldBody};
use super::relay::{Relay, StreamEnd, StreamSummary};
use super::sse::{Dialect, SseScanner};
use super::tokens::{self, Tokens};
use super::{Endpoint, Proxied};
use crate::api::error::{ApiError, rate_limit_headers};
use crate::runtime::state::AppState;
use crate::storage::database::usage_rows::Outcome;
use crate::upstream::homes::Home;

/// Names the model that answered: the one asked for, or the fallback that stood in.
const MODEL_HEADER: &str = "x-llm-gateway-model";

/// The response for a backend's answer; `record` is settled now (whole) or when the
/// stream ends.
pub(crate) async fn answer(
    endpoint: Endpoint,
    proxied: Proxied,
    guards: Guards,
    mut record: Record,
) -> Response {
    let Proxied {
        reply,
        strip_usage,
        prompt_bytes,
        stored,
    } = proxied;
    let home = stored.then(|| home_of(&record)).flatten();
    let served = record.served.take();
    match reply {
        Reply::Full { content_type, body } => {
            if let Some(home) = home {
                remember(&record.state, &body, home);
            }
            let reported = tokens::from_response_body(&body);
            let tokens = Tokens::metered(
                endpoint.metering(),
                reported,
                prompt_bytes,
                Tokens::estimate_from_bytes(body.len()),
            );
            record.finish(200, Some(tokens), None, Outcome::Complete);
            // The permit is released once the connection has taken the body.
            let mut response = Response::new(Body::new(HeldBody::new(body, guards)));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, content_type);
            if let Some(served) = served {
                headers.insert(MODEL_HEADER, served);
            }
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
            let provisional = record.begin_stream(prompt_bytes);
            let state = Arc::clone(&record.state);
            let limits = record.limits;
            let on_end = Box::new(move |summary: StreamSummary| {
                let _guards = guards;
                let tokens = Tokens::metered(
                    endpoint.metering(),
                    summary.usage,
                    prompt_bytes,
                    summary.content_events,
                );
                match summary.end {
                    StreamEnd::Complete => attempt.success(),
                    StreamEnd::ClientGone => {}
                    StreamEnd::Incomplete => record
                        .state
                        .metrics
                        .upstream_error(&attempt.backend().name, "stream_incomplete"),
                    StreamEnd::UpstreamBroken | StreamEnd::IdleTimeout => {
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
            let mut relay = Relay::new(
                first,
                upstream,
                SseScanner::new(strip_usage, Dialect::of(endpoint)),
                idle_timeout,
                on_end,
            );
            if let Some(home) = home {
                relay = relay.on_response_id(Box::new(move |id| state.homes.remember(&id, home)));
            }
            // A stream that is whole within its first batch gets its final record before
            // any byte goes out; a longer one leaves its provisional record first.
            if !relay.prime().await
                && let Some(provisional) = provisional
            {
                provisional.write();
            }
            let mut response = Response::new(Body::from_stream(relay));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            if let Some(served) = served {
                headers.insert(MODEL_HEADER, served);
            }
            if let Some(limits) = &limits {
                rate_limit_headers(headers, limits);
            }
            response
        }
    }
}

/// Where the response the backend stores lives: the backend that answered, the caller's key.
fn home_of(record: &Record) -> Option<Home> {
    Some(Home {
        backend: Arc::clone(record.backend.as_ref()?),
        key: record.key.as_ref().map(|k| Arc::clone(&k.id)),
    })
}

/// Remembers the home of the response whose body is `body` (its top-level `id`).
fn remember(state: &AppState, body: &[u8], home: Home) {
    #[derive(serde::Deserialize)]
    struct Stored<'a> {
        #[serde(borrow, default)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    if let Ok(Stored { id: Some(id) }) = serde_json::from_slice::<Stored<'_>>(body) {
        state.homes.remember(&id, home);
    }
}

/// The response for a request that ends in an error; sheds are not written to the ledger.
pub(crate) fn fail(record: &mut Record, error: ApiError) -> Response {
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
