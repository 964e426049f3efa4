//! Fair sharing of a saturated model: requests wait in a bounded queue instead of failing
//! at once, turns go round-robin over keys, and the queue's limits answer 503 with
//! `Retry-After`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    Gateway, backend, chat_body, client, metric, metrics_text, mock_with, wait_for_async,
};
use llm_gateway::Config;
use llm_gateway::mock::{MockBehavior, MockUpstream};
use llm_gateway::testing::{Limits, Store, generate_key};
use serde_json::Value;

/// A gateway with keys in front of one mock whose backend takes `concurrency` requests at
/// once, with `queue` as `[upstream]` lines; returns it with two keys.
async fn gateway(
    mock: &MockUpstream,
    concurrency: usize,
    queue: &str,
) -> (Gateway, [String; 2], tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\nstate_dir = {:?}\n[auth]\nmode = \"keys\"\n[health_check]\nenabled = false\n\
         [upstream]\n{queue}\n{}[[models]]\nname = \"m\"\nroutes = [{{ backend = \"b0\" }}]\n",
        dir.path().to_str().unwrap(),
        backend(
            "b0",
            &mock.base_url(),
            &format!("max_concurrency = {concurrency}")
        ),
    );
    let config = Config::from_toml(&toml).unwrap();
    let store = Store::open(&config).await.unwrap();
    let mut keys = Vec::new();
    for name in ["flood", "single"] {
        let key = generate_key(name, None, Limits::default(), None);
        store.insert_key(&key.row).await.unwrap();
        keys.push(key.secret);
    }
    let gw = Gateway::start(&toml).await;
    (gw, keys.try_into().unwrap(), dir)
}

async fn post(gw_url: String, key: String) -> reqwest::Response {
    client()
        .post(gw_url)
        .bearer_auth(key)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
}

async fn gauge(gw: &Gateway, name: &str) -> f64 {
    metric(&metrics_text(gw).await, name).unwrap_or(0.0)
}

/// One key floods a model whose backend takes 2 requests at once with 50 requests; a second
/// key's single request is answered after a few of them, not after the flood.
#[tokio::test]
async fn one_keys_flood_does_not_hold_up_another_keys_request() {
    let mock = mock_with(MockBehavior {
        delay: Duration::from_millis(40),
        ..MockBehavior::default()
    })
    .await;
    let (gw, [flood, single], _dir) = gateway(&mock, 2, "queue_timeout = \"60s\"").await;
    let url = gw.url("/v1/chat/completions");
    let done = Arc::new(AtomicUsize::new(0));
    let mut flooding = Vec::new();
    for _ in 0..50 {
        let (url, key, done) = (url.clone(), flood.clone(), Arc::clone(&done));
        flooding.push(tokio::spawn(async move {
            let r = post(url, key).await;
            done.fetch_add(1, Ordering::SeqCst);
            r.status().as_u16()
        }));
    }
    let depth = "llm_gateway_queue_depth{model=\"m\"}";
    wait_for_async("the flood to queue up", Duration::from_secs(20), || async {
        gauge(&gw, depth).await >= 40.0
    })
    .await;
    let before = done.load(Ordering::SeqCst);
    let r = post(url.clone(), single).await;
    assert_eq!(r.status(), 200);
    let after = done.load(Ordering::SeqCst);
    // Round-robin: the single request gets the turn after at most one flood request per
    // freed slot; first come, first served it would wait for the 40 queued before it.
    assert!(
        after - before <= 6,
        "{} flood requests finished while the single one waited",
        after - before
    );
    for task in flooding {
        assert_eq!(task.await.unwrap(), 200, "every queued request is served");
    }
    let text = metrics_text(&gw).await;
    let waited = metric(&text, "llm_gateway_queue_wait_seconds_count{model=\"m\"}").unwrap();
    assert!(waited >= 40.0, "{waited}");
    assert_eq!(metric(&text, depth), Some(0.0));
}

/// With every slot taken and the queue full, a request is refused at once; a queued one
/// that waits past `queue_timeout` is refused then; both with `Retry-After`. A client that
/// leaves while queued leaves the queue.
#[tokio::test]
async fn the_queue_is_bounded_in_size_and_in_time() {
    let mock = mock_with(MockBehavior {
        hang: true,
        ..MockBehavior::default()
    })
    .await;
    let (gw, [a, b], _dir) = gateway(&mock, 1, "queue_max = 2\nqueue_timeout = \"60s\"").await;
    let url = gw.url("/v1/chat/completions");
    let holder = tokio::spawn(post(url.clone(), a.clone()));
    wait_for_async("the slot to be taken", Duration::from_secs(10), || async {
        gauge(
            &gw,
            "llm_gateway_backend_in_flight_requests{backend=\"b0\"}",
        )
        .await
            >= 1.0
    })
    .await;
    let queued: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post(url.clone(), b.clone())))
        .collect();
    let depth = "llm_gateway_queue_depth{model=\"m\"}";
    wait_for_async("two to wait", Duration::from_secs(10), || async {
        gauge(&gw, depth).await >= 2.0
    })
    .await;
    let r = post(url.clone(), b.clone()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "queue_full", "{e}");
    assert_eq!(
        gauge(&gw, depth).await,
        2.0,
        "refused while the others still wait"
    );

    // Clients that leave while queued leave the queue (long before its 60 s).
    for task in queued {
        task.abort();
    }
    wait_for_async("the queue to empty", Duration::from_secs(10), || async {
        gauge(&gw, depth).await == 0.0
    })
    .await;
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "llm_gateway_requests_shed_total{reason=\"queue_full\"}"
        ),
        Some(1.0)
    );
    holder.abort();
}

#[tokio::test]
async fn a_request_that_waits_past_the_queue_timeout_gets_503_with_retry_after() {
    let mock = mock_with(MockBehavior {
        hang: true,
        ..MockBehavior::default()
    })
    .await;
    let (gw, [a, b], _dir) = gateway(&mock, 1, "queue_timeout = \"300ms\"").await;
    let url = gw.url("/v1/chat/completions");
    let holder = tokio::spawn(post(url.clone(), a));
    wait_for_async("the slot to be taken", Duration::from_secs(10), || async {
        gauge(
            &gw,
            "llm_gateway_backend_in_flight_requests{backend=\"b0\"}",
        )
        .await
            >= 1.0
    })
    .await;
    let r = post(url, b).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "queue_timeout", "{e}");
    let text = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &text,
            "llm_gateway_requests_shed_total{reason=\"queue_timeout\"}"
        ),
        Some(1.0)
    );
    let waited = metric(&text, "llm_gateway_queue_wait_seconds_sum{model=\"m\"}").unwrap();
    assert!(waited >= 0.3, "waited {waited} s");
    holder.abort();
}
