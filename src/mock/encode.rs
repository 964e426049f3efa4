//! The mock's answers that generate no text: embeddings, rerank, score, pooling,
//! classification, tokenize and detokenize, shaped as vLLM sends them.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::{MockState, begin, prompt_tokens};

/// The mock's vector for every input.
const VECTOR: [f32; 4] = [0.1, 0.2, 0.3, 0.4];

/// How many inputs `field` holds (a string is one).
fn inputs(request: &Value, field: &str) -> usize {
    match request.get(field) {
        Some(Value::Array(a)) => a.len(),
        _ => 1,
    }
}

fn model(request: &Value) -> Value {
    request.get("model").cloned().unwrap_or(Value::Null)
}

/// `usage` as vLLM's pooling endpoints report it, or nothing when the mock is told not to.
fn with_usage(mut answer: Value, send: bool, prompt: u64) -> Response {
    if send {
        answer["usage"] =
            json!({"prompt_tokens":prompt,"total_tokens":prompt,"completion_tokens":0});
    }
    Json(answer).into_response()
}

/// `POST /v1/embeddings`: floats, or base64 of little-endian `f32`s with
/// `encoding_format: "base64"` (the Node SDK's default).
pub(super) async fn embeddings(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (b, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let vector = if base64 {
        let bytes: Vec<u8> = VECTOR.iter().flat_map(|f| f.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(VECTOR)
    };
    let data: Vec<Value> = (0..inputs(&request, "input"))
        .map(|i| json!({"object":"embedding","index":i,"embedding":vector}))
        .collect();
    let mut answer = json!({"object":"list","data":data,"model":model(&request)});
    if b.send_usage {
        let prompt = prompt_tokens(&request);
        answer["usage"] = json!({"prompt_tokens":prompt,"total_tokens":prompt});
    }
    Json(answer).into_response()
}

/// `POST /v1/rerank` (and `/rerank`, `/v2/rerank`): documents by a made-up relevance,
/// best first, `top_n` of them; usage as `total_tokens` only, as vLLM reports it.
pub(super) async fn rerank(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (b, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let documents = request
        .get("documents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let top_n = request
        .get("top_n")
        .and_then(Value::as_u64)
        .map_or(documents.len(), |n| n as usize);
    let mut results: Vec<Value> = documents
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let text = d.as_str().map_or_else(|| d.to_string(), str::to_owned);
            let score = 1.0 / (1.0 + i as f64);
            json!({"index":i,"document":{"text":text},"relevance_score":score})
        })
        .collect();
    results.truncate(top_n);
    let mut answer = json!({"id":"rerank-mock","model":model(&request),"results":results});
    if b.send_usage {
        answer["usage"] = json!({"total_tokens":prompt_tokens(&request)});
    }
    Json(answer).into_response()
}

/// The endpoints that answer one item per input.
#[derive(Debug, Clone, Copy)]
pub(super) enum PerInput {
    /// `POST /v1/score` (and `/score`): one score per `text_2`.
    Score,
    /// `POST /pooling`: the pooled vector of each input.
    Pooling,
    /// `POST /classify`: one label per input.
    Classify,
}

/// Answers `kind` as vLLM does, with its usage.
pub(super) async fn per_input(
    kind: PerInput,
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (b, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (field, id) = match kind {
        PerInput::Score => ("text_2", "score-mock"),
        PerInput::Pooling => ("input", "pool-mock"),
        PerInput::Classify => ("input", "classify-mock"),
    };
    let data: Vec<Value> = (0..inputs(&request, field))
        .map(|i| match kind {
            PerInput::Score => json!({"index":i,"object":"score","score":0.5}),
            PerInput::Pooling => json!({"index":i,"object":"pooling","data":VECTOR}),
            PerInput::Classify => {
                json!({"index":i,"label":"positive","probs":[0.2,0.8],"num_classes":2})
            }
        })
        .collect();
    let answer = json!({"id":id,"object":"list","created":0,"model":model(&request),"data":data});
    with_usage(answer, b.send_usage, prompt_tokens(&request))
}

/// `POST /tokenize`: one token per byte of `prompt` (so that detokenize gives it back).
pub(super) async fn tokenize(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let prompt = request.get("prompt").and_then(Value::as_str).unwrap_or("");
    let tokens: Vec<u8> = prompt.bytes().collect();
    Json(json!({"count":tokens.len(),"max_model_len":4096,"tokens":tokens,"token_strs":null}))
        .into_response()
}

/// `POST /detokenize`: the text of byte tokens.
pub(super) async fn detokenize(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let bytes: Vec<u8> = request
        .get("tokens")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(Value::as_u64)
                .map(|b| b.min(255) as u8)
                .collect()
        })
        .unwrap_or_default();
    Json(json!({"prompt":String::from_utf8_lossy(&bytes)})).into_response()
}
