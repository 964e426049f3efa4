//! Model fallbacks: when none of a model's backends can take a request, its fallback
//! models' routes are tried within the same attempt budget; the response header, the
//! ledger row and the metrics say which model answered. Also: the ledger row of a request
//! that waited in the queue says how long.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Gateway, backend, client, metric, metrics_text, mock_with, wait_for_async};
use llm_gateway::Config;
use llm_gateway::mock::{MockBehavior, MockUpstream};
use llm_gateway::testing::{Limits, Outcome, Store, UsageRecord, generate_key};
use serde_json::{Value, json};

/// `big` on b0 (with `b0_extra`), falling back to `small` on b1; keys mode, a fast ledger.
struct Setup {
    gw: Gateway,
    store: Store,
    mocks: [MockUpstream; 2],
    /// A key that may use every model.
    any: String,
    /// A key that may use `big` only.
    big_only: String,
    _dir: tempfile::TempDir,
}

async fn setup(big: MockBehavior, b0_extra: &str, upstream: &str) -> Setup {
    let mocks = [
        mock_with(big).await,
        mock_with(MockBehavior::default()).await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\nstate_dir = {:?}\n[auth]\nmode = \"keys\"\n[ledger]\nflush_interval = \"50ms\"\n\
         [health_check]\nenabled = false\n[upstream]\n{upstream}\n{}{}\
         [[models]]\nname = \"big\"\nroutes = [{{ backend = \"b0\" }}]\nfallbacks = [\"small\"]\n\
         [[models]]\nname = \"small\"\nroutes = [{{ backend = \"b1\" }}]\n",
        dir.path().to_str().unwrap(),
        backend("b0", &mocks[0].base_url(), b0_extra),
        backend("b1", &mocks[1].base_url(), ""),
    );
    let config = Config::from_toml(&toml).unwrap();
    let store = Store::open(&config).await.unwrap();
    let mut keys = Vec::new();
    for models in [None, Some(vec!["big".to_owned()])] {
        let key = generate_key("k", models, Limits::default(), None);
        store.insert_key(&key.row).await.unwrap();
        keys.push(key.secret);
    }
    let [any, big_only]: [String; 2] = keys.try_into().unwrap();
    let gw = Gateway::start(&toml).await;
    Setup {
        gw,
        store,
        mocks,
        any,
        big_only,
        _dir: dir,
    }
}

impl Setup {
    async fn chat(&self, key: &str, stream: bool) -> reqwest::Response {
        client()
            .post(self.gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(
                &json!({"model":"big","stream":stream,"messages":[{"role":"user","content":"hi"}]}),
            )
            .send()
            .await
            .unwrap()
    }

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

    fn requests(&self, i: usize) -> u64 {
        self.mocks[i].state.requests.load(Ordering::Relaxed)
    }
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_failing_model_is_answered_by_its_fallback_and_every_record_says_so() {
    let s = setup(
        MockBehavior {
            fail_status: Some(503),
            ..MockBehavior::default()
        },
        "",
        "",
    )
    .await;
    let key = s.any.clone();
    for stream in [false, true] {
        let r = s.chat(&key, stream).await;
        assert_eq!(r.status(), 200, "stream {stream}");
        assert_eq!(r.headers()["x-llm-gateway-model"], "small");
        let id = request_id(&r);
        let text = r.text().await.unwrap();
        assert!(text.contains("tok0"), "{text}");
        // The fallback's public name went to its backend (its route names no upstream_model).
        assert_eq!(
            s.mocks[1].state.last_request().unwrap().body["model"],
            "small"
        );
        let row = s.row(&id).await;
        assert_eq!(row.model.as_deref(), Some("big"), "the model asked for");
        assert_eq!(row.fallback.as_deref(), Some("small"));
        assert_eq!(row.backend.as_deref(), Some("b1"));
        assert_eq!(row.status, 200);
    }
    let m = metrics_text(&s.gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_fallbacks_total{model=\"big\",fallback=\"small\"}"
        ),
        Some(2.0),
        "{m}"
    );

    // The model itself, once its backend works again: no fallback anywhere.
    s.mocks[0].set(|b| b.fail_status = None);
    let r = s.chat(&key, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-llm-gateway-model"], "big");
    let row = s.row(&request_id(&r)).await;
    assert_eq!((row.fallback, row.backend.as_deref()), (None, Some("b0")));
}

/// A key allowed only the requested model is not served by the fallback: it gets the
/// requested model's own error, and the fallback's backend is never called.
#[tokio::test]
async fn a_key_is_never_served_by_a_fallback_it_may_not_use() {
    let s = setup(
        MockBehavior {
            fail_status: Some(503),
            ..MockBehavior::default()
        },
        "",
        "",
    )
    .await;
    let key = s.big_only.clone();
    let r = s.chat(&key, false).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_status", "{e}");
    assert_eq!(s.requests(1), 0);
}

/// A model whose backend is full falls back at once when it has no queue.
#[tokio::test]
async fn a_saturated_model_without_a_queue_falls_back_at_once() {
    let s = setup(
        MockBehavior {
            delay: Duration::from_millis(300),
            ..MockBehavior::default()
        },
        "max_concurrency = 1",
        "queue_max = 0",
    )
    .await;
    let key = s.any.clone();
    let holder = {
        let (url, key) = (s.gw.url("/v1/chat/completions"), key.clone());
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model":"big","messages":[{"role":"user","content":"hi"}]}))
                .send()
                .await
                .unwrap()
        })
    };
    wait_for_async("b0 to be busy", Duration::from_secs(10), || async {
        metric(
            &metrics_text(&s.gw).await,
            "llm_gateway_backend_in_flight_requests{backend=\"b0\"}",
        ) == Some(1.0)
    })
    .await;
    let r = s.chat(&key, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-llm-gateway-model"], "small");
    let held = holder.await.unwrap();
    assert_eq!(held.headers()["x-llm-gateway-model"], "big");
    let row = s.row(&request_id(&held)).await;
    assert_eq!(row.queue_us, None, "it did not wait");
}

/// A request that waited in the queue has its wait in its ledger row.
#[tokio::test]
async fn a_queued_request_has_its_wait_in_the_ledger() {
    let s = setup(
        MockBehavior {
            delay: Duration::from_millis(200),
            ..MockBehavior::default()
        },
        "max_concurrency = 1",
        "",
    )
    .await;
    let key = s.any.clone();
    let url = s.gw.url("/v1/chat/completions");
    let send = |key: String| {
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model":"big","messages":[{"role":"user","content":"hi"}]}))
                .send()
                .await
                .unwrap()
        })
    };
    let first = send(key.clone());
    wait_for_async("b0 to be busy", Duration::from_secs(10), || async {
        metric(
            &metrics_text(&s.gw).await,
            "llm_gateway_backend_in_flight_requests{backend=\"b0\"}",
        ) == Some(1.0)
    })
    .await;
    let second = send(key).await.unwrap();
    assert_eq!(
        second.headers()["x-llm-gateway-model"],
        "big",
        "it waited, no fallback"
    );
    let first = first.await.unwrap();
    let waited = s.row(&request_id(&second)).await.queue_us;
    assert!(waited.is_some_and(|us| us > 0), "{waited:?}");
    assert_eq!(s.row(&request_id(&first)).await.queue_us, None);
}

#[test]
fn fallbacks_are_checked_naming_the_key() {
    let base = "[[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                [[models]]\nname = \"m\"\nroutes = [{ backend = \"b\" }]\n";
    for (fallbacks, says) in [("[\"nope\"]", "no model named"), ("[\"m\"]", "itself")] {
        let e = Config::from_toml(&format!("{base}fallbacks = {fallbacks}\n")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("models[0].fallbacks[0]") && text.contains(says),
            "{text}"
        );
    }
}
