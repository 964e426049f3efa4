//! Phases 1 and 3, admit: whether the gateway takes the request at all, cheapest check
//! first. Phase 1, before the body is read: room in the usage ledger, and a slot under
//! `server.max_concurrent_requests` (load shedding). Phase 3, once the body is read: the model
//! exists, the caller's key may use it, and its rate limits have room (tokens are reserved
//! up front, as OpenAI does, and settled in `account.rs`).

use std::sync::Arc;

use super::Endpoint;
use super::account::Record;
use super::endpoint::Metering;
use super::held_body::Guards;
use super::read::Parsed;
use super::tokens::Tokens;
use crate::access::ratelimit::LimitKind;
use crate::api::error::ApiError;
use crate::runtime::state::{AppState, Configured, Model};
use crate::storage::ledger::Refusal;

/// Takes the request in, or sheds it: what is held while it runs.
pub(crate) fn take_in(
    state: &AppState,
    current: &Configured,
    record: &mut Record,
) -> Result<Guards, ApiError> {
    match state.ledger.admission() {
        Ok(()) => {}
        Err(Refusal::Full) => {
            state.metrics.shed("ledger_full");
            return Err(ApiError::LedgerFull);
        }
        Err(Refusal::Unwritable) => {
            state.metrics.shed("ledger_unavailable");
            return Err(ApiError::LedgerUnavailable);
        }
    }
    let Ok(permit) = Arc::clone(&current.limiter).try_acquire_owned() else {
        state.metrics.shed("overloaded");
        return Err(ApiError::Overloaded);
    };
    record.ledgered = true;
    Ok(Guards {
        permit,
        in_flight: state.metrics.in_flight(),
    })
}

/// The model the request names, once the caller may use it and its limits allow it.
pub(crate) fn authorize<'c>(
    state: &AppState,
    current: &'c Configured,
    endpoint: Endpoint,
    parsed: &Parsed,
    record: &mut Record,
) -> Result<&'c Model, ApiError> {
    let model: &Model = current
        .models
        .get(&parsed.model)
        .ok_or_else(|| ApiError::ModelNotFound(parsed.model.clone()))?;
    record.model = Some(Arc::clone(&model.name));
    if !record.trace.is_disabled() {
        // Named now: an exported span's name is fixed once its first child starts.
        let name = format!("{} {}", endpoint.operation(), model.name);
        record.trace.record("otel.name", name.as_str());
        record.trace.record("gen_ai.request.model", &*model.name);
    }
    record.stream = parsed.stream;
    let Some(key) = record.key.clone() else {
        served(model, endpoint)?;
        return Ok(model);
    };
    if !key.allows(&parsed.model) {
        state.metrics.auth_failure("model_not_allowed");
        return Err(ApiError::ModelNotAllowed(parsed.model.clone()));
    }
    served(model, endpoint)?;
    let Some(limiter) = &key.limiter else {
        return Ok(model);
    };
    let estimate = match endpoint.metering() {
        Metering::Generation => Tokens::estimate_from_bytes(parsed.prompt_bytes).saturating_add(
            parsed
                .max_output_tokens
                .unwrap_or(current.config.auth.reserve_completion_tokens),
        ),
        Metering::Input => Tokens::estimate_from_bytes(parsed.prompt_bytes),
        Metering::Free => 0,
    };
    match limiter.acquire(estimate, state.limit_share()) {
        Ok(grant) => {
            record.limits = Some(grant.snapshot);
            record.reservation = Some((Arc::clone(limiter), grant.reserved));
            Ok(model)
        }
        Err(refusal) => {
            record.limits = Some(refusal.snapshot);
            state.metrics.rate_limited(match refusal.kind {
                LimitKind::Requests => "requests",
                LimitKind::Tokens => "tokens",
            });
            Err(ApiError::RateLimited(refusal))
        }
    }
}

/// The model's backends serve `endpoint`, or a 404 that says which endpoints they do serve.
fn served(model: &Model, endpoint: Endpoint) -> Result<(), ApiError> {
    if model.endpoints.contains(endpoint) {
        return Ok(());
    }
    let served: Vec<&str> = model.endpoints.iter().map(Endpoint::route).collect();
    Err(ApiError::EndpointNotServed {
        model: model.name.to_string(),
        path: endpoint.route(),
        served: served.join(", "),
    })
}
