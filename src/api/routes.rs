//! Route tables: which path goes to which handler, and which layers wrap them.

use std::sync::Arc;

use axum::Router;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post};

use crate::api::{request_context, status};
use crate::proxy::{self, Endpoint};
use crate::runtime::state::AppState;

/// One route: method, path, handler.
pub type RouteEntry = (Method, &'static str, MethodRouter<Arc<AppState>>);

/// Further paths vLLM serves an endpoint on.
const ALIASES: [(&str, Endpoint); 3] = [
    ("/rerank", Endpoint::Rerank),
    ("/v2/rerank", Endpoint::Rerank),
    ("/score", Endpoint::Score),
];

/// Every route of the API listener (`/metrics` too unless it has its own listener). Each
/// one is behind `authn::authenticate` (in `request_context::api_request`) unless its path
/// is in `authn::PUBLIC`.
pub fn api_table(with_metrics: bool) -> Vec<RouteEntry> {
    let proxied = Endpoint::ALL
        .iter()
        .map(|e| (e.route(), *e))
        .chain(ALIASES)
        .map(|(path, e)| (Method::POST, path, proxy::handler(e)));
    let mut table: Vec<RouteEntry> = proxied.collect();
    table.extend([
        (Method::GET, "/v1/responses/{id}", get(proxy::stored::one)),
        (
            Method::DELETE,
            "/v1/responses/{id}",
            delete(proxy::stored::one),
        ),
        (
            Method::POST,
            "/v1/responses/{id}/cancel",
            post(proxy::stored::cancel),
        ),
        (Method::GET, "/v1/models", get(status::list_models)),
        (Method::GET, "/v1/models/{*model}", get(status::get_model)),
        (Method::GET, "/health", get(status::health)),
        (Method::GET, "/ready", get(status::ready)),
    ]);
    if with_metrics {
        table.push((Method::GET, "/metrics", get(status::metrics)));
    }
    table
}

/// The API listener's router.
pub fn api(state: Arc<AppState>, with_metrics: bool) -> Router {
    let router = api_table(with_metrics)
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .fallback(status::not_found)
        .method_not_allowed_fallback(status::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            request_context::api_request,
        ));
    router.with_state(state)
}

/// The separate metrics listener's routes.
pub fn metrics(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/metrics", get(status::metrics))
        .fallback(status::not_found)
        .method_not_allowed_fallback(status::method_not_allowed)
        .layer(axum::middleware::from_fn(request_context::metrics_request));
    router.with_state(state)
}
