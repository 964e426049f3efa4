//! Checks HTTP itself asks of every request, before routing: an HTTP/1.1 request carries
//! exactly one `Host` header (RFC 9112, section 3.2: otherwise the server answers 400).

use axum::extract::Request;
use axum::http::{Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The middleware: 400 `invalid_host_header` unless the request has one `Host`.
pub async fn one_host(request: Request, next: Next) -> Response {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return ApiError::InvalidHost.into_response();
    }
    next.run(request).await
}
