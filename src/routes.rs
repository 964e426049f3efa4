//! Route tables: which path goes to which handler.

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;
use crate::{ops, proxy, telemetry};

/// The API listener's routes; `/metrics` too unless it has its own listener.
pub fn api(state: Arc<AppState>, with_metrics: bool) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(ops::list_models))
        .route("/v1/models/{*model}", get(ops::get_model))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready));
    if with_metrics {
        router = router.route("/metrics", get(ops::metrics));
    }
    finish(router, state)
}

/// The separate metrics listener's routes.
pub fn metrics(state: Arc<AppState>) -> Router {
    finish(Router::new().route("/metrics", get(ops::metrics)), state)
}

fn finish(router: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    router
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn(telemetry::request_context))
        .with_state(state)
}
