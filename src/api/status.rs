//! Operational endpoints: `/health`, `/ready`, `/metrics`, `/v1/models`, and JSON 404/405.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use crate::api::authn::Caller;
use crate::api::error::ApiError;
use crate::config::AuthMode;
use crate::runtime::metrics::Format;
use crate::runtime::state::AppState;
use crate::storage::database::now_ms;
use crate::upstream::Health;
use crate::upstream::breaker::BreakerState;

/// `GET /health`: cached state only, never waits on a backend.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let now = Instant::now();
    let current = state.current();
    let mut degraded = state.is_draining();
    let backends: Vec<_> = current
        .backends
        .iter()
        .map(|b| {
            let health = b.health();
            let circuit = b.breaker.state(now);
            degraded |= health == Health::Unhealthy || circuit != BreakerState::Closed;
            let probe = b.probe_info();
            json!({
                "name": &*b.name,
                "health": health.as_str(),
                "circuit": circuit.as_str(),
                "in_flight": b.in_flight(),
                "last_check_ms_ago": probe.checked_at.map(|t| now.duration_since(t).as_millis() as u64),
                "last_error": probe.last_error,
            })
        })
        .collect();
    let db_up = state.database_up();
    degraded |= !db_up;
    let keys_loaded = state.keys.loaded_at_ms();
    let database = json!({
        "engine": state.db_engine,
        "state": if db_up { "up" } else { "down" },
        "auth": match current.config.auth.mode { AuthMode::Keys => "keys", AuthMode::Open => "open" },
        "keys": state.keys.len(),
        "keys_loaded_ms_ago": (keys_loaded > 0).then(|| (now_ms() - keys_loaded).max(0)),
        "live_instances": state.live_instances(),
        "ledger_spool_bytes": state.ledger.spool_bytes(),
        "ledger_lag_ms": state.ledger.lag_ms(),
        "ledger_accepting": state.ledger.accepting(),
        "ledger_spool_writable": state.ledger.spool_writable(),
        "ledger_held_records": state.ledger.held_records(),
    });
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "draining": state.is_draining(),
        "backends": backends,
        "database": database,
        "config": {
            "hash": &current.config_hash,
            "last_reload": state.reload_note().map(|note| note.to_string()),
        },
    }))
    .into_response()
}

/// `GET /ready`: 503 while draining or when no backend can take traffic.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let now = Instant::now();
    let reason = if state.is_draining() {
        Some("draining")
    } else if !state.current().backends.iter().any(|b| b.is_usable(now)) {
        Some("no usable backend")
    } else if let Err(refusal) = state.ledger.admission() {
        // A database outage alone does not make an instance unready (requests are spooled);
        // only a spool that cannot take records with on_full = "reject" does.
        Some(refusal.reason())
    } else {
        None
    };
    match reason {
        None => Json(json!({ "status": "ready" })).into_response(),
        Some(reason) => {
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "not ready", "reason": reason })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// `GET /metrics`: OpenMetrics when the scraper asks for it (Prometheus does), Prometheus
/// text 0.0.4 otherwise.
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.render(&state.current(), format),
    )
        .into_response()
}

fn model_object(state: &AppState, id: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": state.created_unix, "owned_by": "llm-gateway" })
}

/// `GET /v1/models`: the configured public model names the caller may use.
pub async fn list_models(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let data: Vec<_> = state
        .current()
        .model_order
        .iter()
        .filter(|m| caller.allows(m))
        .map(|m| model_object(&state, m))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{model}`: 404 for a model the caller may not use, as for an unknown one.
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(model): Path<String>,
) -> Response {
    match state.current().models.get(&model) {
        Some(m) if caller.allows(&m.name) => Json(model_object(&state, &m.name)).into_response(),
        _ => ApiError::ModelNotFound(model).into_response(),
    }
}

/// Any path without a route.
pub async fn not_found(uri: Uri) -> Response {
    ApiError::UnknownPath(uri.path().to_owned()).into_response()
}

/// A known path with the wrong method.
pub async fn method_not_allowed(method: Method) -> Response {
    ApiError::MethodNotAllowed(method.to_string()).into_response()
}
