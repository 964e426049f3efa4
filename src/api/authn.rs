//! Authentication, applied once at the router to every request on the API listener: in
//! `keys` mode a request needs one valid key, except on the few paths in [`PUBLIC`], which
//! are public on purpose. A route added later is behind the key check without asking for it.
//! Handlers find who called in the request's extensions ([`Caller`]).

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;

use crate::access::keys::{AuthFailure, KeyEntry};
use crate::api::error::ApiError;
use crate::config::{AccessLog, AuthMode};
use crate::runtime::state::AppState;

/// Paths answered without a key: liveness and readiness probes, and scraping (when
/// `/metrics` is on the API listener at all; see `server.metrics_listen`).
pub const PUBLIC: &[&str] = &["/health", "/ready", "/metrics"];

/// Who sent the request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `auth.mode = "open"`: anyone.
    Open,
    /// The holder of this key.
    Key(Arc<KeyEntry>),
}

impl Caller {
    /// The key, in keys mode.
    pub fn key(&self) -> Option<&Arc<KeyEntry>> {
        match self {
            Self::Open => None,
            Self::Key(k) => Some(k),
        }
    }

    /// Whether the caller may use the model.
    pub fn allows(&self, model: &str) -> bool {
        self.key().is_none_or(|k| k.allows(model))
    }
}

/// Authenticates `request` (run by `request_context::api_request`, the one layer of every
/// API route): who the caller is, or why not (answered 401; the handler never runs). A path in
/// [`PUBLIC`] needs no key (`None`: the handler runs without a [`Caller`]).
pub fn authenticate(state: &AppState, request: &Request) -> Result<Option<Caller>, ApiError> {
    if PUBLIC.contains(&request.uri().path()) {
        return Ok(None);
    }
    match state.current().config.auth.mode {
        AuthMode::Open => Ok(Some(Caller::Open)),
        AuthMode::Keys => {
            let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
            let first = values.next();
            let result = if values.next().is_some() {
                Err(AuthFailure::Multiple)
            } else {
                state.keys.authenticate(first)
            };
            result.map(|key| Some(Caller::Key(key))).map_err(|failure| {
                state.metrics.auth_failure(failure.label());
                let error = ApiError::Unauthorized(failure);
                if state.current().config.logging.access_log != AccessLog::Off {
                    tracing::info!(
                        target: "llm_gateway::access",
                        path = request.uri().path(),
                        status = 401,
                        error = error.kind(),
                        "request refused"
                    );
                }
                error
            })
        }
    }
}
