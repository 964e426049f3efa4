//! `/metrics` and the shipped rules against the real tools: the two formats, `promtool check
//! metrics`, `promtool test rules`, and a real Prometheus (Debian's 2.42) scraping a gateway
//! and evaluating every rule.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::prometheus::{Prometheus, promtool};
use common::{Gateway, backend, client, mock, mock_with, model};
use llm_gateway::mock::{MockBehavior, MockUpstream};
use serde_json::json;

/// What Prometheus 2.42 sends when it scrapes (scrape/scrape.go, `scrapeAcceptHeader`).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const TEXT_004: &str = "text/plain;version=0.0.4";

/// A gateway whose model `m` has a good backend and one that answers 500, and whose model
/// `down` has only the bad one, after plain, streamed, failed-over, failed and
/// unknown-model requests, so that most series exist.
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
        model("m", &["good", "bad"]),
    ) + &model("down", &["bad"]);
    let gw = Gateway::start(&toml).await;
    for (model, stream) in [
        ("m", false),
        ("m", true),
        ("m", false),
        ("m", true),
        ("down", false),
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

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/prometheus")
}

/// Names of the alerts in the shipped rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim_matches('"').to_owned())
        .collect()
}

/// The rules load, and their unit tests (dist/prometheus/llm-gateway.rules.test.yml) pass,
/// with a case that fires and one that stays quiet for every alert.
#[test]
fn the_shipped_rules_pass_promtool_and_their_unit_tests() {
    let dir = rules_dir();
    let (ok, out) = promtool(&["check", "rules", "llm-gateway.rules.yml"], "", &dir);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "llm-gateway.rules.test.yml"], "", &dir);
    assert!(ok, "{out}");
    let rules = std::fs::read_to_string(dir.join("llm-gateway.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("llm-gateway.rules.test.yml")).unwrap();
    let names = alert_names(&rules);
    assert!(names.len() >= 12, "{names:?}");
    for name in names {
        let cases = tests.matches(&format!("alertname: {name}\n")).count();
        let quiet = tests
            .matches(&format!("alertname: {name}\n        exp_alerts: []"))
            .count();
        assert!(
            cases >= 2 && quiet >= 1,
            "{name}: {cases} cases, {quiet} quiet"
        );
    }
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        rest = &rest[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        let next = rest[end..].trim_start();
        // A name followed by a selector, a range or an operator is a metric; one followed by
        // `(` is a function, and words inside `{...}` and `by (...)` are labels.
        if word.starts_with("llm_gateway_") || word == "up" || word == "process_start_time_seconds"
        {
            names.insert(word.to_owned());
        }
        rest = if next.starts_with('{') {
            let close = rest.find('}').unwrap();
            &rest[close + 1..]
        } else {
            &rest[end..]
        };
    }
    names
}

/// An alert's expression without its final comparison with a number: what it watches.
fn watched(expr: &str) -> &str {
    [" == ", " >= ", " > ", " < "]
        .iter()
        .filter_map(|op| expr.rfind(op))
        .max()
        .map_or(expr, |i| &expr[..i])
}

/// A real Prometheus loads the shipped rules and evaluates them against a gateway it
/// scrapes: every rule is healthy, reads only metrics the gateway exports, and what it
/// watches returns series; a healthy gateway fires no alert.
#[tokio::test]
async fn a_real_prometheus_evaluates_every_shipped_rule_against_a_gateway() {
    let (gw, _good, _bad) = gateway_with_traffic().await;
    let rules = rules_dir().join("llm-gateway.rules.yml");
    let prometheus = Prometheus::start(&[gw.addr.to_string()], &[rules]).await;
    prometheus.wait_until_scraped(1).await;
    let (_, text) = scrape(&gw, Some(TEXT_004)).await;
    let mut exported = sample_names(&text);
    exported.insert("up".to_owned());

    let groups = prometheus.api("rules", &[]).await.unwrap()["groups"].clone();
    let rules: Vec<serde_json::Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert!(rules.len() >= 17, "{groups}");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let expr = rule["query"].as_str().unwrap();
        let unknown: Vec<String> = metric_names(expr).difference(&exported).cloned().collect();
        assert!(unknown.is_empty(), "{name} reads {unknown:?}, not exported");
        let signal = if rule["type"] == "alerting" {
            watched(expr)
        } else {
            expr
        };
        prometheus.wait_for_series(name, signal).await;
    }
    // Every rule has been evaluated without error by now.
    let groups = prometheus.api("rules", &[]).await.unwrap()["groups"].clone();
    for rule in groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
    {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    let alerts = prometheus.api("alerts", &[]).await.unwrap();
    let firing: Vec<&serde_json::Value> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(firing.is_empty(), "{firing:#?}");
}

/// The shipped Grafana dashboard, parsed.
fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/llm-gateway.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A dashboard query as Prometheus runs it for the test gateway: the job chosen, every
/// other variable at its "All" value, `$__rate_interval` a minute, and a variable's
/// `label_values(selector, label)` as the series it lists.
fn as_promql(query: &str) -> String {
    let q = query
        .replace("$job", "llm-gateway")
        .replace("$instance", ".*")
        .replace("$model", ".*")
        .replace("$backend", ".*")
        .replace("$__rate_interval", "1m");
    assert!(
        !q.contains('$'),
        "a variable the test does not know: {query}"
    );
    match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.rsplit_once(", "))
    {
        Some((selector, label)) => format!("count by ({label}) ({selector})"),
        None => q,
    }
}

/// Every query of the dashboard and of its variables parses, reads only metrics the
/// gateway exports, and returns series from a real Prometheus scraping a gateway after
/// some traffic; the panels use the `${datasource}` variable.
#[tokio::test]
async fn every_dashboard_query_returns_series_from_a_real_prometheus() {
    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().unwrap() >= 39,
        "{}",
        dash["schemaVersion"]
    );
    let variables = dash["templating"]["list"].as_array().unwrap();
    let names: Vec<&str> = variables
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for wanted in ["datasource", "job", "instance", "model", "backend"] {
        assert!(
            names.contains(&wanted),
            "{wanted} variable missing: {names:?}"
        );
    }
    let mut queries: Vec<(String, String)> = variables
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = format!("variable {}", v["name"]);
            (name, v["definition"].as_str().unwrap().to_owned())
        })
        .collect();
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            let name = format!("{} {}", panel["title"], t["refId"]);
            queries.push((name, t["expr"].as_str().unwrap().to_owned()));
        }
    }
    assert!(queries.len() >= 30, "{}", queries.len());

    let (gw, _good, _bad) = gateway_with_traffic().await;
    let prometheus = Prometheus::start(&[gw.addr.to_string()], &[]).await;
    prometheus.wait_until_scraped(1).await;
    let (_, text) = scrape(&gw, Some(TEXT_004)).await;
    let mut exported = sample_names(&text);
    exported.insert("up".to_owned());
    for (name, query) in &queries {
        let promql = as_promql(query);
        let unknown: Vec<String> = metric_names(&promql)
            .difference(&exported)
            .cloned()
            .collect();
        assert!(unknown.is_empty(), "{name} reads {unknown:?}, not exported");
        prometheus.wait_for_series(name, &promql).await;
    }
}

#[test]
fn metric_names_and_watched_parts_are_read_from_expressions() {
    let expr = "sum by (job, instance, model) (rate(llm_gateway_requests_total{job=\"x\",status=~\"5..\"}[5m])) / sum by (job) (rate(llm_gateway_tokens_total[5m])) > 0.05";
    assert_eq!(
        metric_names(expr).into_iter().collect::<Vec<_>>(),
        ["llm_gateway_requests_total", "llm_gateway_tokens_total"]
    );
    assert_eq!(watched("up{job=\"x\"} == 0"), "up{job=\"x\"}");
    assert_eq!(watched("a - b < 1"), "a - b");
}
