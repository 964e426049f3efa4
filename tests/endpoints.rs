//! The API beyond chat: the Responses API, vLLM's rerank/score/pooling/classify/tokenize
//! endpoints, each routed by `model`, sent to the backend's path for it, and metered into
//! the ledger; a model's endpoint set; and the bundled mock answering like a real server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{Gateway, backend, client, mock, mock_with};
use llm_gateway::Config;
use llm_gateway::mock::{MockBehavior, MockUpstream};
use llm_gateway::testing::{Limits, Outcome, Store, UsageRecord, generate_key};
use serde_json::{Value, json};

/// A gateway with keys and a SQLite ledger in front of one mock, model `m` on it (and
/// `chat-only`, which serves chat alone), and a key that may use everything.
struct Setup {
    gw: Gateway,
    store: Store,
    key: String,
    mock: MockUpstream,
    _dir: tempfile::TempDir,
}

async fn setup(b: MockBehavior) -> Setup {
    let mock = mock_with(b).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\nstate_dir = {:?}\n[auth]\nmode = \"keys\"\n[ledger]\nflush_interval = \"50ms\"\n\
         [health_check]\nenabled = false\n{}\
         [[models]]\nname = \"m\"\nroutes = [{{ backend = \"b0\" }}]\n\
         [[models]]\nname = \"chat-only\"\nroutes = [{{ backend = \"b0\" }}]\nendpoints = [\"chat_completions\"]\n",
        dir.path().to_str().unwrap(),
        backend("b0", &mock.base_url(), ""),
    );
    let config = Config::from_toml(&toml).unwrap();
    let store = Store::open(&config).await.unwrap();
    let key = generate_key("test", None, Limits::default(), None);
    store.insert_key(&key.row).await.unwrap();
    let gw = Gateway::start(&toml).await;
    Setup {
        gw,
        store,
        key: key.secret,
        mock,
        _dir: dir,
    }
}

impl Setup {
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        client()
            .post(self.gw.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The ledger's row for the request that got `request_id`, once it is shipped.
    async fn row(&self, request_id: &str) -> UsageRecord {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.store.usage_records(0).await.unwrap();
            if let Some(r) = rows.into_iter().find(|r| r.request_id == request_id)
                && r.outcome != Outcome::Interrupted
            {
                return r;
            }
            assert!(Instant::now() < deadline, "no ledger row for {request_id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// What the mock reports as prompt tokens for a body (a quarter of its compact JSON).
fn mock_prompt_tokens(body: &Value) -> u64 {
    (body.to_string().len() as u64).div_ceil(4)
}

/// Each endpoint: the path a client uses, a body, the path the backend must see, the
/// ledger's name for it, and whether its usage counts tokens (tokenize does no model work).
#[tokio::test]
async fn every_endpoint_reaches_its_path_on_the_backend_and_is_metered() {
    let s = setup(MockBehavior::default()).await;
    let cases: Vec<(&str, Value, &str, &str, bool)> = vec![
        (
            "/v1/responses",
            json!({"model":"m","input":"Say hi"}),
            "/v1/responses",
            "responses",
            true,
        ),
        (
            "/v1/rerank",
            json!({"model":"m","query":"q","documents":["a","b","c"],"top_n":2}),
            "/v1/rerank",
            "rerank",
            true,
        ),
        (
            "/rerank",
            json!({"model":"m","query":"q","documents":["a"]}),
            "/v1/rerank",
            "rerank",
            true,
        ),
        (
            "/v2/rerank",
            json!({"model":"m","query":"q","documents":["a"]}),
            "/v1/rerank",
            "rerank",
            true,
        ),
        (
            "/v1/score",
            json!({"model":"m","text_1":"a","text_2":["b","c"]}),
            "/v1/score",
            "score",
            true,
        ),
        (
            "/score",
            json!({"model":"m","text_1":"a","text_2":"b"}),
            "/v1/score",
            "score",
            true,
        ),
        (
            "/pooling",
            json!({"model":"m","input":"x"}),
            "/pooling",
            "pooling",
            true,
        ),
        (
            "/classify",
            json!({"model":"m","input":["x","y"]}),
            "/classify",
            "classify",
            true,
        ),
        (
            "/tokenize",
            json!({"model":"m","prompt":"héllo"}),
            "/tokenize",
            "tokenize",
            false,
        ),
        (
            "/detokenize",
            json!({"model":"m","tokens":[104,105]}),
            "/detokenize",
            "detokenize",
            false,
        ),
    ];
    for (path, body, upstream_path, label, metered) in cases {
        let r = s.post(path, &body).await;
        assert_eq!(r.status(), 200, "{path}");
        let id = request_id(&r);
        let answer: Value = r.json().await.unwrap();
        let seen = s.mock.state.last_request().unwrap();
        assert_eq!(seen.path, upstream_path, "{path}");
        assert_eq!(
            seen.body, body,
            "{path}: the body reaches the backend as sent"
        );
        let row = s.row(&id).await;
        assert_eq!(row.endpoint, label, "{path}");
        assert_eq!(row.model.as_deref(), Some("m"));
        assert_eq!(row.status, 200);
        assert!(!row.estimated, "{path}: the backend reported usage");
        if metered {
            assert_eq!(row.prompt_tokens, mock_prompt_tokens(&body), "{path}");
        } else {
            assert_eq!((row.prompt_tokens, row.completion_tokens), (0, 0), "{path}");
        }
        match label {
            "responses" => {
                assert_eq!(row.completion_tokens, 8);
                assert_eq!(answer["object"], "response");
                assert_eq!(
                    answer["output"][0]["content"][0]["type"], "output_text",
                    "{answer}"
                );
            }
            "rerank" => {
                assert_eq!(row.completion_tokens, 0);
                let n = body["documents"].as_array().unwrap().len().min(2);
                assert_eq!(answer["results"].as_array().unwrap().len(), n);
            }
            "tokenize" => assert_eq!(answer["count"], "héllo".len()),
            "detokenize" => assert_eq!(answer["prompt"], "hi"),
            _ => assert_eq!(row.completion_tokens, 0, "{path}"),
        }
    }
}

/// A Responses stream: every event relayed unchanged, ended by `response.completed`
/// (there is no `[DONE]`), usage from that event; a stream cut before it is recorded as
/// incomplete, and one without usage is estimated from its deltas.
#[tokio::test]
async fn a_responses_stream_is_relayed_event_by_event_and_metered() {
    let s = setup(MockBehavior::default()).await;
    let body = json!({"model":"m","input":"Say hi","stream":true,"max_output_tokens":5});
    let r = s.post("/v1/responses", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let id = request_id(&r);
    let text = r.text().await.unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "response.output_text.delta")
            .count(),
        5
    );
    assert!(!text.contains("[DONE]"), "nothing added to the stream");
    let row = s.row(&id).await;
    assert_eq!(row.outcome, Outcome::Complete);
    assert_eq!(row.endpoint, "responses");
    assert_eq!(row.completion_tokens, 5);
    assert_eq!(row.prompt_tokens, mock_prompt_tokens(&body));
    assert!(!row.estimated);
    assert!(row.ttft_us.is_some());

    s.mock.set(|b| b.send_done = false);
    let r = s.post("/v1/responses", &body).await;
    let id = request_id(&r);
    let text = r.text().await.unwrap();
    assert!(!text.contains("response.completed"));
    let row = s.row(&id).await;
    assert_eq!(row.outcome, Outcome::StreamIncomplete);
    assert!(row.estimated, "no usage without the completed event");
    assert_eq!(row.completion_tokens, 5, "estimated as one token per delta");
}

/// A model whose backends serve chat only answers 404 on another endpoint, naming what it
/// does serve, without calling the backend; chat still works.
#[tokio::test]
async fn a_model_answers_only_on_the_endpoints_it_serves() {
    let s = setup(MockBehavior::default()).await;
    let r = s
        .post(
            "/v1/rerank",
            &json!({"model":"chat-only","query":"q","documents":["a"]}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "endpoint_not_served", "{e}");
    assert_eq!(e["error"]["param"], "model");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/v1/rerank") && message.contains("/v1/chat/completions"),
        "{message}"
    );
    assert_eq!(
        s.mock
            .state
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model":"chat-only","messages":[{"role":"user","content":"hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

/// Bad requests on the new endpoints: OpenAI-style 400s naming the parameter.
#[tokio::test]
async fn bad_requests_on_the_new_endpoints_are_refused_naming_the_parameter() {
    let s = setup(MockBehavior::default()).await;
    for (path, body, param, code) in [
        (
            "/v1/rerank",
            json!({"model":"m","documents":["a"]}),
            "query",
            "missing_required_parameter",
        ),
        (
            "/v1/rerank",
            json!({"model":"m","query":"q","documents":"a"}),
            "documents",
            "invalid_type",
        ),
        (
            "/v1/rerank",
            json!({"model":"m","query":"q","documents":["a"],"stream":true}),
            "stream",
            "unsupported_parameter",
        ),
        (
            "/detokenize",
            json!({"model":"m","tokens":"1 2"}),
            "tokens",
            "invalid_type",
        ),
        (
            "/v1/responses",
            json!({"input":"hi"}),
            "model",
            "missing_required_parameter",
        ),
    ] {
        let r = s.post(path, &body).await;
        assert_eq!(r.status(), 400, "{path} {body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{path} {body}: {e}");
        assert_eq!(e["error"]["code"], code, "{path} {body}: {e}");
    }
}

/// `endpoints` is checked when the configuration loads, naming the key.
#[test]
fn a_models_endpoint_list_is_checked_naming_the_key() {
    let base = "[[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                [[models]]\nname = \"m\"\nroutes = [{ backend = \"b\" }]\n";
    let empty = Config::from_toml(&format!("{base}endpoints = []\n")).unwrap_err();
    assert!(empty.to_string().contains("models[0].endpoints"), "{empty}");
    let unknown = Config::from_toml(&format!("{base}endpoints = [\"chat\"]\n")).unwrap_err();
    let text = unknown.to_string();
    assert!(
        text.contains("models.0.endpoints") && text.contains("chat_completions"),
        "{text}"
    );
}

/// The bundled mock answers as real servers do where real clients noticed it did not:
/// the first chunk of a streamed choice carries its role, `n` gives `n` choices,
/// base64 embeddings decode to the vector, and it takes bodies up to the gateway's limit.
#[tokio::test]
async fn the_mock_answers_like_a_real_server() {
    let s = setup(MockBehavior::default()).await;
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model":"m","n":2,"messages":[{"role":"user","content":"hi"}]}),
        )
        .await;
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["choices"].as_array().unwrap().len(), 2);
    assert_eq!(answer["usage"]["completion_tokens"], 16);

    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}),
        )
        .await;
    let text = r.text().await.unwrap();
    let first: Value =
        serde_json::from_str(text.lines().next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{first}");

    for format in ["float", "base64"] {
        let r = s
            .post(
                "/v1/embeddings",
                &json!({"model":"m","input":"x","encoding_format":format}),
            )
            .await;
        let answer: Value = r.json().await.unwrap();
        let e = &answer["data"][0]["embedding"];
        let vector: Vec<f32> = match e.as_str() {
            None => e
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        };
        assert_eq!(vector, [0.1, 0.2, 0.3, 0.4], "{format}");
        assert_eq!(e.is_string(), format == "base64");
    }

    // Just under the gateway's default body limit (4 MiB): axum's default of 2 MB in the
    // mock refused this.
    let big = "x".repeat(4 * 1024 * 1024 - 100);
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model":"m","messages":[{"role":"user","content":big}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let direct = mock().await;
    let r = client()
        .post(format!("{}/embeddings", direct.base_url()))
        .json(&json!({"model":"m","input":"x".repeat(8 << 20)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Two backends, each keeping its own stored responses (as vLLM does), and two keys.
struct TwoHomes {
    gw: Gateway,
    mocks: [MockUpstream; 2],
    keys: [String; 2],
    _dir: tempfile::TempDir,
}

async fn two_homes() -> TwoHomes {
    let mocks = [mock().await, mock().await];
    let dir = tempfile::tempdir().unwrap();
    // b0 is picked first almost always: a search for an unknown id meets its 404 first.
    let toml = format!(
        "[storage]\nstate_dir = {:?}\n[auth]\nmode = \"keys\"\n[health_check]\nenabled = false\n\
         {}{}[[models]]\nname = \"m\"\nroutes = [{{ backend = \"b0\" }}, {{ backend = \"b1\" }}]\n",
        dir.path().to_str().unwrap(),
        backend("b0", &mocks[0].base_url(), "weight = 1000"),
        backend("b1", &mocks[1].base_url(), "weight = 1"),
    );
    let config = Config::from_toml(&toml).unwrap();
    let store = Store::open(&config).await.unwrap();
    let mut keys = Vec::new();
    for name in ["k1", "k2"] {
        let key = generate_key(name, None, Limits::default(), None);
        store.insert_key(&key.row).await.unwrap();
        keys.push(key.secret);
    }
    let gw = Gateway::start(&toml).await;
    TwoHomes {
        gw,
        mocks,
        keys: keys.try_into().unwrap(),
        _dir: dir,
    }
}

impl TwoHomes {
    fn requests(&self) -> [u64; 2] {
        self.mocks
            .each_ref()
            .map(|m| m.state.requests.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn call(
        &self,
        key: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = client()
            .request(method, self.gw.url(path))
            .bearer_auth(&self.keys[key]);
        if let Some(body) = body {
            r = r.json(&body);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a stored response with `key` (streamed or not); returns its id and the
    /// index of the backend that made it.
    async fn create(&self, key: usize, stream: bool) -> (String, usize) {
        let before = self.requests();
        let body = json!({"model":"m","input":"hi","stream":stream});
        let r = client()
            .post(self.gw.url("/v1/responses"))
            .bearer_auth(&self.keys[key])
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = if stream {
            let text = r.text().await.unwrap();
            let created = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            let v: Value = serde_json::from_str(created).unwrap();
            v["response"]["id"].as_str().unwrap().to_owned()
        } else {
            let v: Value = r.json().await.unwrap();
            v["id"].as_str().unwrap().to_owned()
        };
        // b0 is asked first: when b1 was asked as well, b0 failed and b1 answered.
        let after = self.requests();
        let home = (0..2).rev().find(|i| after[*i] > before[*i]).unwrap();
        (id, home)
    }
}

/// A follow-up (`previous_response_id`) and GET/DELETE of a stored response reach the
/// backend that has it, only for the key that made it; the gateway forgets a deleted one.
#[tokio::test]
async fn a_stored_response_is_reached_on_its_own_backend_by_its_own_key() {
    let s = two_homes().await;
    // Until both backends hold one (b1 is picked rarely: make it hold one directly).
    let mut made = Vec::new();
    for stream in [false, true] {
        made.push(s.create(0, stream).await);
    }
    s.mocks[0].set(|b| b.fail_status = Some(503));
    made.push(s.create(0, false).await);
    made.push(s.create(0, true).await);
    s.mocks[0].set(|b| b.fail_status = None);
    assert!(made.iter().any(|(_, home)| *home == 0));
    assert!(made.iter().any(|(_, home)| *home == 1));
    for (id, home) in &made {
        let before = s.requests();
        let (status, answer) = s
            .call(
                0,
                reqwest::Method::POST,
                "/v1/responses",
                Some(json!({"model":"m","input":"more","previous_response_id":id})),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["previous_response_id"], json!(id));
        let after = s.requests();
        assert_eq!(after[*home], before[*home] + 1, "sent to its home");
        assert_eq!(after[1 - home], before[1 - home], "and nowhere else");

        let path = format!("/v1/responses/{id}");
        let (status, answer) = s.call(0, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["id"], json!(id));

        // The other key is told it does not exist, and no backend is asked.
        let before = s.requests();
        let (status, answer) = s.call(1, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 404);
        assert_eq!(answer["error"]["code"], "response_not_found");
        let (status, answer) = s
            .call(
                1,
                reqwest::Method::POST,
                "/v1/responses",
                Some(json!({"model":"m","input":"x","previous_response_id":id})),
            )
            .await;
        assert_eq!(status, 404);
        assert_eq!(answer["error"]["code"], "previous_response_not_found");
        assert_eq!(answer["error"]["param"], "previous_response_id");
        assert_eq!(s.requests(), before);
    }
    let (id, _) = &made[0];
    let path = format!("/v1/responses/{id}");
    let (status, answer) = s.call(0, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(
        (status, &answer["deleted"]),
        (200, &json!(true)),
        "{answer}"
    );
    let before = s.requests();
    let (status, _) = s.call(0, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 404);
    assert_eq!(s.requests(), before, "forgotten: no backend asked");
}

/// A follow-up of a response the gateway does not know (made before a restart, here made
/// behind its back on b1) is searched for: b0's 404 sends it on to b1, and those 404s do
/// not count against b0's circuit. One no backend has is a 404 for the client.
#[tokio::test]
async fn a_follow_up_of_an_unknown_response_finds_its_backend_without_ejecting_others() {
    let s = two_homes().await;
    for _ in 0..8 {
        let r = client()
            .post(format!("{}/responses", s.mocks[1].base_url()))
            .json(&json!({"model":"m","input":"hi"}))
            .send()
            .await
            .unwrap();
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, answer) = s
            .call(
                0,
                reqwest::Method::POST,
                "/v1/responses",
                Some(json!({"model":"m","input":"more","previous_response_id":id})),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    let metrics = common::metrics_text(&s.gw).await;
    let searched = common::metric(
        &metrics,
        "llm_gateway_upstream_errors_total{backend=\"b0\",kind=\"response_not_found\"}",
    )
    .unwrap_or(0.0);
    assert!(searched >= 5.0, "b0 was asked first: {searched}");
    let health = common::health(&s.gw).await;
    let b0 = health["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "b0")
        .unwrap();
    assert_eq!(b0["circuit"], "closed", "{health}");

    let (status, answer) = s
        .call(
            0,
            reqwest::Method::POST,
            "/v1/responses",
            Some(json!({"model":"m","input":"x","previous_response_id":"resp_nowhere"})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "previous_response_not_found");
}
