//! `/metrics` against the real tools: its two formats, `promtool check metrics`, and a real
//! Prometheus (Debian's 2.42) scraping a gateway.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::collections::BTreeSet;

use common::prometheus::{Prometheus, promtool};
use common::{Gateway, backend, client, mock, mock_with, model};
use llm_gateway::mock::{MockBehavior, MockUpstream};
use serde_json::json;

/// What Prometheus 2.42 sends when it scrapes (scrape/scrape.go, `scrapeAcceptHeader`).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const TEXT_004: &str = "text/plain;version=0.0.4";

/// A gateway whose model `m` has a good backend and one that answers 500, after plain,
/// streamed, failed-over and unknown-model requests, so that most series exist.
async fn gateway_with_traffic() -> (Gateway, MockUpstream, MockUpstream) {
    let good = mock().await;
    let bad = mock_with(MockBehavior {
        fail_status: Some(500),
        ..MockBehavior::default()
    })
    .await;
    let toml = format!(
        "[health_check]\nenabled = false\n{}{}{}",
        backend("good", &good.base_url(), ""),
        backend("bad", &bad.base_url(), ""),
        model("m", &["good", "bad"])
    );
    let gw = Gateway::start(&toml).await;
    for (model, stream) in [
        ("m", false),
        ("m", true),
        ("m", false),
        ("m", true),
        ("x", false),
    ] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": model, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
    }
    (gw, good, bad)
}

async fn scrape(gw: &Gateway, accept: Option<&str>) -> (String, String) {
    let mut request = client().get(gw.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    (content_type, r.text().await.unwrap())
}

/// Sample names (before labels) of an exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn metrics_answer_in_the_format_the_scraper_asks_for() {
    let (gw, _good, _bad) = gateway_with_traffic().await;
    let (om_type, om) = scrape(&gw, Some(PROMETHEUS_ACCEPT)).await;
    assert!(
        om_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{om_type}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE llm_gateway_requests counter\n"), "{om}");

    for accept in [Some(TEXT_004), None] {
        let (text_type, text) = scrape(&gw, accept).await;
        assert!(
            text_type.starts_with("text/plain; version=0.0.4"),
            "{accept:?}: {text_type}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE llm_gateway_requests_total counter\n"),
            "{text}"
        );
        // The same series in both.
        assert_eq!(sample_names(&text), sample_names(&om));
    }
}

/// promtool (2.42) reads the text format 0.0.4 and lints it: help texts, types, base units,
/// counter names. Before, the gateway always answered OpenMetrics, where it found 13
/// problems ("no help text" for every counter, `ledger_lag_milliseconds`).
#[tokio::test]
async fn promtool_finds_nothing_to_fix_in_the_metrics() {
    let (gw, _good, _bad) = gateway_with_traffic().await;
    let (_, text) = scrape(&gw, Some(TEXT_004)).await;
    assert!(
        text.contains("llm_gateway_upstream_errors_total{"),
        "traffic should have made an upstream error: {text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = promtool(&["check", "metrics"], &text, dir.path());
    assert!(ok && out.trim().is_empty(), "promtool: {out}\n{text}");
}

/// A real Prometheus scrapes the gateway (negotiating OpenMetrics) and stores every series
/// the gateway exposes, under the names of the text format.
#[tokio::test]
async fn a_real_prometheus_scrapes_every_series() {
    let (gw, _good, _bad) = gateway_with_traffic().await;
    let prometheus = Prometheus::start(&[gw.addr.to_string()], &[]).await;
    prometheus.wait_until_scraped(1).await;
    let (_, text) = scrape(&gw, Some(TEXT_004)).await;
    let expected = sample_names(&text);
    let stored: BTreeSet<String> = prometheus
        .query("count by (__name__) ({job=\"llm-gateway\",__name__!~\"up|scrape_.+\"})")
        .await
        .unwrap()
        .iter()
        .map(|s| s["metric"]["__name__"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stored, expected, "{}", prometheus.log());
    let requests = prometheus
        .query("sum(llm_gateway_requests_total{model=\"m\",status=\"200\"})")
        .await
        .unwrap();
    assert_eq!(requests[0]["value"][1], "4", "{requests:?}");
}
