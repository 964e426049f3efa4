//! Requests about one stored response of the Responses API (`GET` and `DELETE
//! /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`): sent to the backend that has it
//! (`upstream::homes`), for the key that made it. They carry no model and do no model work,
//! so they go through no limits and leave no ledger row; the backend's answer is passed on.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::authn::Caller;
use crate::api::error::{ApiError, upstream_status_is_clients};
use crate::api::request_context::{REQUEST_ID_HEADER, RequestId};
use crate::api::upstream_error::sanitize_upstream_error;
use crate::runtime::state::AppState;
use crate::upstream::homes::Found;

/// Largest answer passed on (a stored response holds its whole output).
const ANSWER_LIMIT: usize = 64 * 1024 * 1024;

/// `GET` or `DELETE /v1/responses/{id}`.
pub(crate) async fn one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let method = request.method().clone();
    forward(&state, &id, method, "", Asker::of(&request))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/responses/{id}/cancel`.
pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    forward(&state, &id, Method::POST, "/cancel", Asker::of(&request))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Who asks: the caller's key id and the request id to pass on.
struct Asker {
    key: Option<Arc<str>>,
    request_id: Option<HeaderValue>,
}

impl Asker {
    fn of(request: &Request) -> Self {
        let extensions = request.extensions();
        Self {
            key: extensions
                .get::<Caller>()
                .and_then(Caller::key)
                .map(|k| Arc::clone(&k.id)),
            request_id: extensions.get::<RequestId>().map(|id| id.0.clone()),
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::ResponseNotFound {
        id: id.to_owned(),
        previous: false,
    }
}

async fn forward(
    state: &AppState,
    id: &str,
    method: Method,
    suffix: &str,
    asker: Asker,
) -> Result<Response, ApiError> {
    let Found::Here(home) = state.homes.find(id, asker.key.as_deref()) else {
        return Err(not_found(id));
    };
    let current = state.current();
    let backend = current
        .backends
        .iter()
        .find(|b| b.name == home)
        .ok_or_else(|| not_found(id))?;
    // The id goes into a path: only what response ids are made of.
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(not_found(id));
    }
    let mut call = backend
        .probe_client()
        .request(
            method.clone(),
            backend.url(&format!("/responses/{id}{suffix}")),
        )
        .timeout(backend.timeouts.request);
    if let Some(authorization) = backend.authorization() {
        call = call.header(header::AUTHORIZATION, authorization.clone());
    }
    if let Some(request_id) = asker.request_id {
        call = call.header(REQUEST_ID_HEADER, request_id);
    }
    let answer = call.send().await.map_err(|e| {
        if e.is_timeout() {
            ApiError::UpstreamTimeout
        } else {
            ApiError::UpstreamUnreachable
        }
    })?;
    let status = answer.status();
    let content_type = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    if answer
        .content_length()
        .is_some_and(|n| n > ANSWER_LIMIT as u64)
    {
        return Err(ApiError::UpstreamInvalid);
    }
    let body = answer
        .bytes()
        .await
        .map_err(|_| ApiError::UpstreamUnreachable)?;
    if body.len() > ANSWER_LIMIT {
        return Err(ApiError::UpstreamInvalid);
    }
    if status == StatusCode::NOT_FOUND {
        // The backend no longer has it (restarted, or deleted behind the gateway's back).
        state.homes.forget(id);
        return Err(not_found(id));
    }
    if !status.is_success() {
        let secrets: Vec<&str> = backend.api_key().map(|k| k.expose()).into_iter().collect();
        let error = ApiError::UpstreamStatus {
            status,
            body: sanitize_upstream_error(&body, &secrets).map(Box::new),
            retry_after: None,
        };
        return Err(
            if upstream_status_is_clients(status) || status.is_server_error() {
                error
            } else {
                ApiError::UpstreamInvalid
            },
        );
    }
    if method == Method::DELETE {
        state.homes.forget(id);
    }
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}
