//! The mock's chat and text completions, whole or streamed.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{MockState, begin, event_stream, prompt_tokens, token_count};

pub(super) async fn chat(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, uri, headers, body, true).await
}

pub(super) async fn completions(
    State(state): State<Arc<MockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, uri, headers, body, false).await
}

async fn generate(
    state: Arc<MockState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    chat: bool,
) -> Response {
    let (b, request) = match begin(&state, &uri, &headers, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_owned();
    let n = token_count(&b, &request);
    let prompt = prompt_tokens(&request);
    // `n` choices, each of `n` tokens (as OpenAI counts them: completion tokens of all).
    let choices = request
        .get("n")
        .and_then(Value::as_u64)
        .map_or(1, |c| c.clamp(1, 16) as usize);
    let completion = (n * choices) as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion});
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let choices: Vec<Value> = (0..choices)
            .map(|c| {
                if chat {
                    json!({"index":c,"message":{"role":"assistant","content":text},"finish_reason":"stop"})
                } else {
                    json!({"index":c,"text":text,"finish_reason":"stop"})
                }
            })
            .collect();
        let mut answer = if chat {
            json!({"id":"chatcmpl-mock","object":"chat.completion","created":0,"model":model,"choices":choices})
        } else {
            json!({"id":"cmpl-mock","object":"text_completion","created":0,"model":model,"choices":choices})
        };
        if b.send_usage {
            answer["usage"] = usage;
        }
        return Json(answer).into_response();
    }
    let include_usage = b.send_usage
        && request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
    let chunk = |i: usize, c: usize, last: bool| -> Bytes {
        let piece = format!("tok{i} ");
        let finish = if last { json!("stop") } else { Value::Null };
        // As servers do, the first chunk of a choice says whose message it is.
        let delta = if i == 0 {
            json!({"role":"assistant","content":piece})
        } else {
            json!({"content":piece})
        };
        let mut c = if chat {
            json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,
                "choices":[{"index":c,"delta":delta,"finish_reason":finish}]})
        } else {
            json!({"id":"cmpl-mock","object":"text_completion","created":0,"model":model,
                "choices":[{"index":c,"text":piece,"finish_reason":finish}]})
        };
        if include_usage {
            c["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut events: Vec<Bytes> = (0..n)
        .flat_map(|i| (0..choices).map(move |c| (i, c)))
        .map(|(i, c)| chunk(i, c, i + 1 == n))
        .collect();
    if include_usage {
        let u = json!({"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,"model":model,"choices":[],"usage":usage});
        events.push(Bytes::from(format!("data: {u}\n\n")));
    }
    if b.send_done {
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    event_stream(events, b, state)
}
