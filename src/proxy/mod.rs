//! The request path for the proxied endpoints, as phases in the order a request meets
//! them (in the spirit of pingora's request phases):
//!
//! 1. `admit.rs` ([`admit::take_in`]): room in the ledger and a slot under the in-flight
//!    limit, before the body is read;
//! 2. `read.rs`: the body within its limits, the fields the gateway acts on checked;
//! 3. `admit.rs` ([`admit::authorize`]): the model exists, the key may use it, its rate
//!    limits have room;
//! 4. `attempt.rs`: a backend chosen, the request sent with the body `rewrite.rs` builds,
//!    failover while nothing has reached the client;
//! 5. `respond.rs`: the answer, whole (`held_body.rs`) or streamed (`relay.rs` over
//!    `sse.rs`, which reads usage from the events);
//! 6. `account.rs`: once it is over, exactly once: metrics, access log, rate-limit
//!    settlement with the counted tokens (`tokens.rs`), the ledger record.
//!
//! `stored.rs` is apart from the phases: requests about one stored response, sent to the
//! backend that has it.
//!
//! Authentication happened before all this, in `api::authn` (which leaves the caller in
//! the request). May depend on `access/`, `upstream/`, `storage/` (the ledger and its record
//! type), `runtime::{state, metrics}`, `config/` and `api/` (errors, the caller, the request
//! id).

pub(crate) mod account;
mod admit;
mod attempt;
mod endpoint;
mod held_body;
mod read;
mod relay;
mod respond;
mod rewrite;
mod sse;
pub(crate) mod stored;
pub(crate) mod tokens;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{MethodRouter, post};

use crate::api::authn::Caller;
use crate::api::error::ApiError;
use crate::api::request_context::RequestId;
use crate::runtime::state::{AppState, Configured};
use crate::runtime::telemetry;
use account::Record;
use attempt::Reply;
pub(crate) use endpoint::Endpoint;

/// The handler of a proxied endpoint (`POST` on its paths).
pub(crate) fn handler(endpoint: Endpoint) -> MethodRouter<Arc<AppState>> {
    post(
        move |State(state): State<Arc<AppState>>, request: Request| {
            handle(state, endpoint, request)
        },
    )
}

/// A reply with what the response side needs to know about the request.
struct Proxied {
    reply: Reply,
    /// The usage chunk was requested by the gateway, not the client: remove it.
    strip_usage: bool,
    /// Request body size, for estimating prompt tokens.
    prompt_bytes: usize,
    /// The backend stores the response (Responses API): remember where.
    stored: bool,
}

/// One request through the phases.
async fn handle(state: Arc<AppState>, endpoint: Endpoint, request: Request) -> Response {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or(HeaderValue::from_static("-"));
    // Set by `request_context::api_request` (from `authn::authenticate`), which every API
    // route is behind.
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
    telemetry::continue_trace(&record.trace, request.headers());
    let guards = match admit::take_in(&state, &current, &mut record) {
        Ok(guards) => guards,
        Err(error) => return respond::fail(&mut record, error),
    };
    match proxy(&state, &current, endpoint, request, &mut record).await {
        Ok(proxied) => respond::answer(endpoint, proxied, guards, record).await,
        Err(error) => respond::fail(&mut record, error),
    }
}

/// Phases 2 to 4: read, authorize, attempt.
async fn proxy(
    state: &AppState,
    current: &Configured,
    endpoint: Endpoint,
    request: Request,
    record: &mut Record,
) -> Result<Proxied, ApiError> {
    let mut parsed = read::read(request, endpoint, &current.config).await?;
    let model = admit::authorize(state, current, endpoint, &parsed, record)?;
    let reply = attempt::attempt(state, current, endpoint, model, &mut parsed, record).await?;
    Ok(Proxied {
        reply,
        strip_usage: parsed.strip_usage,
        prompt_bytes: parsed.prompt_bytes,
        stored: endpoint == Endpoint::Responses && parsed.store,
    })
}
