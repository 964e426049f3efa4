//! API errors and the one place they become OpenAI-style JSON responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

pub(crate) use super::upstream_error::UpstreamErrorBody;
use crate::access::keys::AuthFailure;
use crate::access::ratelimit::{LimitKind, Refusal, Snapshot, format_reset};

/// Every way an API request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        code: &'static str,
        message: String,
    },
    #[error("Unsupported Content-Type {0:?}; send application/json.")]
    UnsupportedMediaType(String),
    #[error("The request body was not received in time.")]
    BodyTimeout,
    #[error("The request body could not be read (a broken chunked encoding or connection).")]
    BodyBroken,
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Unknown request URL: {0}.")]
    UnknownPath(String),
    #[error("{}", response_not_found(.id, *.previous))]
    ResponseNotFound { id: String, previous: bool },
    #[error("The model `{model}` is not served on {path} (it serves: {served}).")]
    EndpointNotServed {
        model: String,
        path: &'static str,
        served: String,
    },
    #[error("Send exactly one Host header (RFC 9112, section 3.2).")]
    InvalidHost,
    #[error("Method {0} is not allowed for this URL.")]
    MethodNotAllowed(String),
    #[error("{}", auth_message(*.0))]
    Unauthorized(AuthFailure),
    #[error("This API key may not use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error("{}", rate_limit_message(.0))]
    RateLimited(Refusal),
    #[error("The gateway is handling too many requests; retry shortly.")]
    Overloaded,
    #[error("The gateway cannot record usage right now (its ledger spool is full); retry shortly.")]
    LedgerFull,
    #[error(
        "The gateway cannot record usage right now (its ledger spool cannot be written); retry shortly."
    )]
    LedgerUnavailable,
    #[error("No healthy backend is available for model `{0}`; retry shortly.")]
    NoHealthyBackend(String),
    #[error("All backends for model `{0}` are at their concurrency limit; retry shortly.")]
    BackendsSaturated(String),
    #[error(
        "All backends for model `{0}` are at their concurrency limit and its queue is full; retry shortly."
    )]
    QueueFull(String),
    #[error(
        "All backends for model `{model}` stayed at their concurrency limit for the {seconds} s this request waited; retry shortly."
    )]
    QueueTimeout { model: String, seconds: u64 },
    #[error("The upstream server did not answer in time.")]
    UpstreamTimeout,
    #[error("Could not reach an upstream server for this model.")]
    UpstreamUnreachable,
    #[error("The upstream server returned an invalid response.")]
    UpstreamInvalid,
    /// The upstream answered with an error status; its body is shown when it is safe.
    #[error("The upstream server returned an error (HTTP {status}).")]
    UpstreamStatus {
        status: StatusCode,
        body: Option<Box<UpstreamErrorBody>>,
        retry_after: Option<HeaderValue>,
    },
}

impl ApiError {
    /// A 400 for a parameter with the wrong type or value.
    pub fn invalid_type(param: &'static str, expected: &str) -> Self {
        Self::InvalidParam {
            param,
            code: "invalid_type",
            message: format!("Invalid type for '{param}': expected {expected}."),
        }
    }

    /// A 400 for a required parameter that is absent.
    pub fn missing(param: &'static str) -> Self {
        Self::InvalidParam {
            param,
            code: "missing_required_parameter",
            message: format!("Missing required parameter: '{param}'."),
        }
    }

    /// HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::InvalidParam { .. }
            | Self::BodyBroken
            | Self::InvalidHost => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ModelNotFound(_)
            | Self::UnknownPath(_)
            | Self::EndpointNotServed { .. }
            | Self::ResponseNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::LedgerFull
            | Self::LedgerUnavailable
            | Self::Overloaded
            | Self::NoHealthyBackend(_)
            | Self::BackendsSaturated(_)
            | Self::QueueFull(_)
            | Self::QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnreachable | Self::UpstreamInvalid => StatusCode::BAD_GATEWAY,
            Self::UpstreamStatus { status, .. } => client_status_for_upstream(*status),
        }
    }

    /// Refused by the gateway itself before any backend was tried, for lack of capacity:
    /// such requests are counted in metrics but not written to the usage ledger (under
    /// overload they would be most of it).
    pub fn is_shed(&self) -> bool {
        matches!(
            self,
            Self::Overloaded
                | Self::BackendsSaturated(_)
                | Self::QueueFull(_)
                | Self::QueueTimeout { .. }
                | Self::NoHealthyBackend(_)
                | Self::LedgerFull
                | Self::LedgerUnavailable
        )
    }

    /// Low-cardinality name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidParam { .. } => "invalid_param",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyBroken => "invalid_body",
            Self::ModelNotFound(_) => "model_not_found",
            Self::UnknownPath(_) => "unknown_path",
            Self::EndpointNotServed { .. } => "endpoint_not_served",
            Self::ResponseNotFound { previous: true, .. } => "previous_response_not_found",
            Self::ResponseNotFound {
                previous: false, ..
            } => "response_not_found",
            Self::InvalidHost => "invalid_host_header",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Unauthorized(_) => "unauthorized",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::RateLimited(_) => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::LedgerFull => "ledger_full",
            Self::LedgerUnavailable => "ledger_unavailable",
            Self::NoHealthyBackend(_) => "no_healthy_backend",
            Self::BackendsSaturated(_) => "backends_saturated",
            Self::QueueFull(_) => "queue_full",
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamInvalid => "upstream_invalid",
            Self::UpstreamStatus { .. } => "upstream_status",
        }
    }

    fn error_type(&self) -> &'static str {
        if let Self::RateLimited(r) = self {
            // OpenAI names the exhausted limit here.
            return match r.kind {
                LimitKind::Requests => "requests",
                LimitKind::Tokens => "tokens",
            };
        }
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidParam { param, .. } => Some(param),
            Self::ModelNotFound(_) | Self::ModelNotAllowed(_) | Self::EndpointNotServed { .. } => {
                Some("model")
            }
            Self::ResponseNotFound { previous: true, .. } => Some("previous_response_id"),
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::InvalidParam { code, .. } => code,
            Self::Unauthorized(_) => "invalid_api_key",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::UpstreamStatus { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                "rate_limit_exceeded"
            }
            other => other.kind(),
        }
    }

    fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            Self::Overloaded
            | Self::LedgerFull
            | Self::LedgerUnavailable
            | Self::NoHealthyBackend(_)
            | Self::BackendsSaturated(_)
            | Self::QueueFull(_)
            | Self::QueueTimeout { .. } => Some(HeaderValue::from_static("1")),
            Self::RateLimited(r) => Some(HeaderValue::from(
                r.retry_after.as_secs_f64().ceil().max(1.0) as u64,
            )),
            Self::UpstreamStatus { retry_after, .. } => retry_after.clone(),
            _ => None,
        }
    }
}

fn response_not_found(id: &str, previous: bool) -> String {
    let which = if previous {
        "Previous response"
    } else {
        "Response"
    };
    format!("{which} with id '{id}' not found.")
}

fn auth_message(failure: AuthFailure) -> &'static str {
    match failure {
        AuthFailure::Missing => {
            "You didn't provide an API key. Send it in an Authorization header using Bearer \
             auth (Authorization: Bearer YOUR_KEY)."
        }
        AuthFailure::Invalid => "Incorrect API key provided.",
        AuthFailure::Revoked => "This API key has been revoked.",
        AuthFailure::Expired => "This API key has expired.",
        AuthFailure::Multiple => "Send exactly one Authorization header.",
    }
}

fn rate_limit_message(r: &Refusal) -> String {
    let what = match r.kind {
        LimitKind::Requests => "requests per min (RPM)",
        LimitKind::Tokens => "tokens per min (TPM)",
    };
    format!(
        "Rate limit reached for {what}: Limit {}, Requested {}. Please try again in {}.",
        r.limit,
        r.requested,
        format_reset(r.retry_after)
    )
}

/// `x-ratelimit-*` headers as OpenAI sends them, for the limits a key has.
pub fn rate_limit_headers(headers: &mut axum::http::HeaderMap, s: &Snapshot) {
    use axum::http::HeaderName;
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    for ([limit, remaining, reset], bucket) in NAMES.into_iter().zip([s.requests, s.tokens]) {
        let Some(b) = bucket else { continue };
        headers.insert(limit, HeaderValue::from(b.limit));
        headers.insert(remaining, HeaderValue::from(b.remaining));
        if let Ok(v) = HeaderValue::try_from(format_reset(b.reset)) {
            headers.insert(reset, v);
        }
    }
}

/// Upstream 4xx that describe the client's request pass through; anything that describes
/// the gateway's own relation to the backend (auth, routing, server errors) is a 502.
fn client_status_for_upstream(status: StatusCode) -> StatusCode {
    if upstream_status_is_clients(status) || status == StatusCode::TOO_MANY_REQUESTS {
        status
    } else {
        StatusCode::BAD_GATEWAY
    }
}

/// Upstream statuses that describe the client's own request (so another backend would
/// answer the same): passed on, never retried.
pub fn upstream_status_is_clients(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 422)
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let own_message = self.to_string();
        let body = match &self {
            // A 502: the gateway's own type and code (`upstream_status`), the backend's
            // message (cleaned) when it sent one.
            Self::UpstreamStatus {
                body: Some(upstream),
                ..
            } if status == StatusCode::BAD_GATEWAY => Body {
                message: &upstream.message,
                kind: self.error_type(),
                param: None,
                code: Some(self.code()),
            },
            // The client's own mistake (400/413/422) or the backend's 429: passed on.
            Self::UpstreamStatus {
                body: Some(upstream),
                ..
            } => Body {
                message: &upstream.message,
                kind: upstream.kind.as_deref().unwrap_or(self.error_type()),
                param: upstream.param.as_deref(),
                code: upstream.code.as_deref().or(Some(self.code())),
            },
            _ => Body {
                message: &own_message,
                kind: self.error_type(),
                param: self.param(),
                code: Some(self.code()),
            },
        };
        let json = serde_json::to_vec(&Envelope { error: body }).unwrap_or_default();
        let mut response = (status, Bytes::from(json)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, v);
        }
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may not have been read: the connection cannot be reused.
            Self::BodyTooLarge { .. } | Self::BodyTimeout | Self::BodyBroken => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::RateLimited(r) => rate_limit_headers(headers, &r.snapshot),
            _ => {}
        }
        response
    }
}
