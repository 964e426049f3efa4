//! The first layer every API request meets: its request id (the client's `x-request-id`
//! if sane, else a fresh UUID, echoed back), the request span with the matched route, and
//! the rules of HTTP itself (`http_rules.rs`).

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// Header carrying the request id in both directions.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request (client's `x-request-id` if sane, else a fresh UUID).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub(crate) HeaderValue);

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Middleware: assigns the request id, opens the request span, refuses a request HTTP
/// itself forbids (`http_rules`), echoes the id back.
pub(crate) async fn request_context(mut request: Request, next: Next) -> Response {
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
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or(""),
        method = %request.method(),
        route = %route,
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    // HTTP's own rules first (here, to keep one layer fewer on every request).
    let mut response = match super::http_rules::check(&request) {
        Ok(()) => next.run(request).instrument(span).await,
        Err(e) => axum::response::IntoResponse::into_response(e),
    };
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}
