//! The one layer every request meets: its request id (the client's `x-request-id` if sane,
//! else a fresh UUID, echoed back), the request span with the matched route, the rules of
//! HTTP itself (`http_rules.rs`) and, on the API listener, authentication (`authn.rs`).
//! One layer, not one per job: each `axum` middleware layer costs a boxed future and a
//! service clone per request (docs/benchmarks.md, change 15).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::authn;
use crate::runtime::state::AppState;

/// Header carrying the request id in both directions.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request (client's `x-request-id` if sane, else a fresh UUID).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub(crate) HeaderValue);

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// The API listener's middleware: [`context`] with authentication.
pub(crate) async fn api_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    context(request, next, Some(&state)).await
}

/// The metrics listener's middleware: [`context`] without authentication (`/metrics` is
/// public, anything else is 404).
pub(crate) async fn metrics_request(request: Request, next: Next) -> Response {
    context(request, next, None).await
}

/// Assigns the request id, opens the request span, refuses a request HTTP itself forbids
/// (`http_rules`), authenticates when `auth` is given, echoes the id back.
async fn context(mut request: Request, next: Next, auth: Option<&AppState>) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| acceptable(v))
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = uuid::Uuid::encode_buffer();
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("invalid"))
        });
    let route = request.extensions().get::<MatchedPath>().cloned();
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or(""),
        method = %request.method(),
        route = %route.as_ref().map_or("unmatched", MatchedPath::as_str),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    // HTTP's own rules first, then who is calling (in the span: a refusal's access log
    // line carries the request id).
    let mut response = match super::http_rules::check(&request) {
        Err(e) => axum::response::IntoResponse::into_response(e),
        Ok(()) => match span.in_scope(|| auth.map(|state| authn::authenticate(state, &request))) {
            Some(Err(refusal)) => axum::response::IntoResponse::into_response(refusal),
            caller => {
                if let Some(Ok(Some(caller))) = caller {
                    request.extensions_mut().insert(caller);
                }
                next.run(request).instrument(span).await
            }
        },
    };
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}
