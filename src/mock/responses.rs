//! The mock's Responses API: `POST /v1/responses`, whole or as typed events, and the
//! stored responses it keeps (`GET`/`DELETE /v1/responses/{id}`, `previous_response_id`),
//! as a server that keeps them in its own memory does (vLLM).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{MockState, begin, event_stream, prompt_tokens};

/// Stored responses kept at most (the oldest goes first).
pub(super) const STORED_MAX: usize = 1024;

fn not_found(id: &str, param: Option<&str>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"error":{"message":format!("Response with id '{id}' not found."),
            "type":"invalid_request_error","param":param,
            "code": if param.is_some() { "previous_response_not_found" } else { "not_found" }}}),
        ),
    )
        .into_response()
}

/// `POST /v1/responses`.
pub(super) async fn create(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (b, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some(previous) = request.get("previous_response_id").and_then(Value::as_str)
        && state.stored(previous).is_none()
    {
        return not_found(previous, Some("previous_response_id"));
    }
    let model = request.get("model").cloned().unwrap_or(Value::Null);
    let n = request
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map_or(b.chunks, |n| n.min(4096) as usize);
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let message = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let input = prompt_tokens(&request);
    let usage = b.send_usage.then(|| {
        json!({"input_tokens":input,"input_tokens_details":{"cached_tokens":0},
            "output_tokens":n,"output_tokens_details":{"reasoning_tokens":0},
            "total_tokens":input + n as u64})
    });
    let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
    let part = |text: &str| json!({"type":"output_text","text":text,"annotations":[]});
    let item = |status: &str, content: Vec<Value>| json!({"type":"message","id":message,"role":"assistant","status":status,"content":content});
    let response = |status: &str, output: Vec<Value>, usage: Option<Value>| {
        json!({"id":id,"object":"response","created_at":0,"model":model,"status":status,
            "output":output,"parallel_tool_calls":true,"tool_choice":"auto","tools":[],
            "previous_response_id":request.get("previous_response_id"),"usage":usage})
    };
    let done = response(
        "completed",
        vec![item("completed", vec![part(&text)])],
        usage,
    );
    if request.get("store").and_then(Value::as_bool) != Some(false) {
        state.store(&id, done.clone());
    }
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(done).into_response();
    }
    let mut seq = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    };
    let ids = json!({"item_id":message,"output_index":0,"content_index":0});
    let mut events = vec![
        event(
            "response.created",
            json!({"response":response("in_progress", vec![], None)}),
        ),
        event(
            "response.in_progress",
            json!({"response":response("in_progress", vec![], None)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index":0,"item":item("in_progress", vec![])}),
        ),
        event("response.content_part.added", {
            let mut d = ids.clone();
            d["part"] = part("");
            d
        }),
    ];
    for i in 0..n {
        let mut d = ids.clone();
        d["delta"] = json!(format!("tok{i} "));
        events.push(event("response.output_text.delta", d));
    }
    let mut d = ids.clone();
    d["text"] = json!(text);
    events.push(event("response.output_text.done", d));
    let mut d = ids;
    d["part"] = part(&text);
    events.push(event("response.content_part.done", d));
    events.push(event(
        "response.output_item.done",
        json!({"output_index":0,"item":item("completed", vec![part(&text)])}),
    ));
    // A cut stream (`send_done: false`) never says it completed.
    if b.send_done {
        events.push(event("response.completed", json!({ "response": done })));
    }
    event_stream(events, b, state)
}

/// `GET /v1/responses/{id}`.
pub(super) async fn get(State(state): State<Arc<MockState>>, Path(id): Path<String>) -> Response {
    match state.stored(&id) {
        Some(response) => Json(response).into_response(),
        None => not_found(&id, None),
    }
}

/// `DELETE /v1/responses/{id}`.
pub(super) async fn delete(
    State(state): State<Arc<MockState>>,
    Path(id): Path<String>,
) -> Response {
    if state.forget(&id) {
        Json(json!({"id":id,"object":"response.deleted","deleted":true})).into_response()
    } else {
        not_found(&id, None)
    }
}
