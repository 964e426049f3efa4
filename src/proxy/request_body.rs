//! Reading a request body: content type, size limit and time limit. A body over the limit
//! is still read (and thrown away, up to a bound) before the 413, so a client that writes
//! its whole body before it reads the answer (Node's `fetch`, the `openai` Node SDK) gets
//! the 413 instead of a broken pipe.

use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::api::error::ApiError;

/// Bytes past the limit read and discarded before answering 413; a larger body is cut off
/// (the connection closes, and such a client may see a broken pipe instead of the 413).
const DISCARD_MAX: u64 = 16 << 20;

/// Checks the content type, then reads the body: at most `limit` bytes, within `timeout`.
pub async fn read(request: Request, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    if let Some(ct) = request.headers().get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(essence.to_owned()));
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = request.into_body();
    let read = async {
        if declared.is_some_and(|n| n > limit as u64) {
            // Known to be too large: read nothing into memory (and only a bounded amount
            // at all) before answering.
            if declared.is_some_and(|n| n <= limit as u64 + DISCARD_MAX) {
                discard(&mut body, DISCARD_MAX).await;
            }
            return Err(ApiError::BodyTooLarge { limit });
        }
        let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| ApiError::BodyBroken)?.into_data() else {
                continue; // trailers
            };
            if buf.len() + data.len() > limit {
                discard(&mut body, DISCARD_MAX).await;
                return Err(ApiError::BodyTooLarge { limit });
            }
            if buf.is_empty() && declared == Some(data.len() as u64) {
                return Ok(data); // the whole body in one frame: no copy
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ApiError::BodyTimeout))
}

/// Reads and drops up to `max` more bytes of `body` (stops early at its end or an error).
async fn discard(body: &mut axum::body::Body, max: u64) {
    let mut seen = 0u64;
    while seen <= max {
        match body.frame().await {
            Some(Ok(frame)) => {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}
