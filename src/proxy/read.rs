//! Phase 2, read: the body (content type, size and time limits) and the few fields the
//! gateway acts on, checked the way OpenAI checks them. Nothing else of the body is parsed.
//! A body over the limit is still read (and thrown away, up to a bound) before the 413, so a
//! client that writes its whole body before it reads the answer (Node's `fetch`, the
//! `openai` Node SDK) gets the 413 instead of a broken pipe.

use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::value::RawValue;

use super::Endpoint;
use super::rewrite::Rewriter;
use crate::api::error::ApiError;
use crate::config::Config;

/// A request read and checked.
pub(crate) struct Parsed {
    /// The public model name the client asked for.
    pub(crate) model: String,
    pub(crate) stream: bool,
    /// The gateway, not the client, asks the backend for the usage chunk: strip it.
    pub(crate) strip_usage: bool,
    /// The most completion tokens the request allows, when it sets a bound.
    pub(crate) max_output_tokens: Option<u64>,
    /// Body size, for estimating prompt tokens.
    pub(crate) prompt_bytes: usize,
    /// The bodies sent upstream, built from the client's bytes.
    pub(crate) bodies: Rewriter,
    /// Responses API: the stored response this one continues.
    pub(crate) previous_response: Option<String>,
    /// Responses API: the backend keeps the response (`store`, true unless `false`).
    pub(crate) store: bool,
}

/// Reads the body within the server's limits and checks it for `endpoint`.
pub(crate) async fn read(
    request: Request,
    endpoint: Endpoint,
    config: &Config,
) -> Result<Parsed, ApiError> {
    let server = &config.server;
    let raw = read_body(request, server.max_body_bytes, server.body_read_timeout).await?;
    let head = Head::parse(&raw)?;
    let model = match head.model {
        None => return Err(ApiError::missing("model")),
        Some(v) => serde_json::from_str::<String>(v.get())
            .map_err(|_| ApiError::invalid_type("model", "a string"))?,
    };
    let stream = match head.stream.map(RawValue::get) {
        None => false,
        Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::invalid_type("stream", "a boolean")),
    };
    if stream && !endpoint.can_stream() {
        return Err(ApiError::InvalidParam {
            param: "stream",
            code: "unsupported_parameter",
            message: format!("Streaming is not supported on {}.", endpoint.route()),
        });
    }
    endpoint.check(|name| head.field(name))?;
    // Only chat and completions streams carry usage just when asked for it.
    let asks = stream && endpoint.stream_usage_on_request();
    let client_usage = endpoint.stream_usage_on_request() && head.include_usage()?;
    let strip_usage = asks && config.upstream.request_stream_usage && !client_usage;
    let previous_response = match head.previous_response_id {
        Some(v) if endpoint == Endpoint::Responses && v.get() != "null" => Some(
            serde_json::from_str::<String>(v.get())
                .map_err(|_| ApiError::invalid_type("previous_response_id", "a string"))?,
        ),
        _ => None,
    };
    let store = match head.store.map(RawValue::get) {
        None | Some("true" | "null") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::invalid_type("store", "a boolean")),
    };
    Ok(Parsed {
        previous_response,
        store,
        model,
        stream,
        strip_usage,
        max_output_tokens: head.max_output_tokens(),
        prompt_bytes: raw.len(),
        bodies: Rewriter::new(raw.clone(), head.model, head.stream_options, strip_usage),
    })
}

/// The request fields the gateway looks at, borrowed from the body; the rest is skipped
/// without being built, so a large body is not blown up into a tree of values.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "super::rewrite::present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    /// The Responses API's bound.
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    query: Option<&'a RawValue>,
    #[serde(borrow, default)]
    documents: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    store: Option<&'a RawValue>,
}

impl<'a> Head<'a> {
    fn parse(raw: &'a [u8]) -> Result<Self, ApiError> {
        if raw.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::InvalidJson(
                "the body must be a JSON object".to_owned(),
            ));
        }
        serde_json::from_slice(raw).map_err(|e| ApiError::InvalidJson(e.to_string()))
    }

    /// A field `Endpoint::check` asks for (only those it requires are kept).
    fn field(&self, name: &str) -> Option<&'a RawValue> {
        match name {
            "messages" => self.messages,
            "prompt" => self.prompt,
            "input" => self.input,
            "query" => self.query,
            "documents" => self.documents,
            "tokens" => self.tokens,
            _ => None,
        }
    }

    /// Whether the client asked for the usage chunk itself (`stream_options.include_usage`).
    fn include_usage(&self) -> Result<bool, ApiError> {
        Ok(match self.stream_options {
            None => false,
            Some(v) if v.get() == "null" => false,
            // serde would also take an array for the struct below.
            Some(v) if !v.get().starts_with('{') => {
                return Err(ApiError::invalid_type(
                    "stream_options",
                    "an object with a boolean include_usage",
                ));
            }
            Some(v) => {
                #[derive(serde::Deserialize)]
                struct StreamOptions {
                    #[serde(default)]
                    include_usage: Option<bool>,
                }
                serde_json::from_str::<StreamOptions>(v.get())
                    .map_err(|_| {
                        ApiError::invalid_type(
                            "stream_options",
                            "an object with a boolean include_usage",
                        )
                    })?
                    .include_usage
                    .unwrap_or(false)
            }
        })
    }

    /// The most completion tokens the request allows, when it sets a bound: reserved from
    /// a token rate limit up front, as OpenAI does.
    fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_output_tokens)
            .or(self.max_tokens)
            .and_then(|v| v.get().parse::<u64>().ok())
    }
}

/// Bytes past the limit read and discarded before answering 413; a larger body is cut off
/// (the connection closes, and such a client may see a broken pipe instead of the 413).
const DISCARD_MAX: u64 = 16 << 20;

/// Checks the content type, then reads the body: at most `limit` bytes, within `timeout`.
async fn read_body(request: Request, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parameter an endpoint requires is one `Head` reads: a body carrying all of
    /// them passes every endpoint's check, and one without them fails where one is needed.
    #[test]
    fn every_required_parameter_is_read_from_the_body() {
        let full = br#"{"model":"m","messages":[],"prompt":"p","input":"i","query":"q","documents":[],"tokens":[1]}"#;
        let head = Head::parse(full).unwrap();
        let bare = Head::parse(br#"{"model":"m"}"#).unwrap();
        for endpoint in Endpoint::ALL {
            endpoint
                .check(|name| head.field(name))
                .unwrap_or_else(|e| panic!("{endpoint:?}: {e}"));
            let needs = !matches!(
                endpoint,
                Endpoint::Responses | Endpoint::Score | Endpoint::Tokenize | Endpoint::Pooling
            );
            assert_eq!(
                endpoint.check(|name| bare.field(name)).is_err(),
                needs,
                "{endpoint:?}"
            );
        }
    }
}
