//! Checks HTTP itself asks of every request, before routing: an HTTP/1.1 request carries
//! exactly one `Host` header (RFC 9112, section 3.2: otherwise the server answers 400).

use axum::extract::Request;
use axum::http::{Version, header};

use crate::api::error::ApiError;

/// `Err(InvalidHost)` unless the request has one `Host` (none is fine for HTTP/1.0).
pub fn check(request: &Request) -> Result<(), ApiError> {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return Err(ApiError::InvalidHost);
    }
    Ok(())
}
