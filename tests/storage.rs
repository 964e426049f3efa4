//! Keys, rate limits, the usage ledger and the instance registry, each test run against
//! SQLite and against a real PostgreSQL server (a throwaway cluster, see common::pg).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Gateway, chat_body, client, config_for, health, metric, metrics_text, mock, pg};
use llm_gateway::auth;
use llm_gateway::ratelimit::Limits;
use llm_gateway::store::Store;
use llm_gateway::store::usage::{GroupBy, UsageRecord};
use llm_gateway::{Config, admin};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

/// A `[storage]` section for `db` (state in `dir`) plus fast ledger shipping and key reloads.
fn storage(db: Db, dir: &std::path::Path, auth_mode: &str) -> String {
    let url = match db {
        Db::Sqlite => String::new(),
        Db::Postgres => format!("database_url = {:?}\n", pg::fresh_database()),
    };
    format!(
        "[storage]\nstate_dir = {:?}\n{url}\n[auth]\nmode = \"{auth_mode}\"\nrefresh_interval = \"200ms\"\n\
         [ledger]\nflush_interval = \"50ms\"\n",
        dir.to_str().unwrap()
    )
}

/// A gateway on one mock upstream with storage on `db`, and the store it writes to.
struct Setup {
    gw: Gateway,
    store: Store,
    config: Config,
    _mock: llm_gateway::mock::MockUpstream,
    _dir: tempfile::TempDir,
}

async fn setup(db: Db, auth_mode: &str) -> Setup {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_for(&[&up], &storage(db, dir.path(), auth_mode));
    let config = Config::from_toml(&toml).unwrap();
    let gw = Gateway::start(&toml).await;
    let store = Store::open(&config).await.unwrap();
    Setup {
        gw,
        store,
        config,
        _mock: up,
        _dir: dir,
    }
}

impl Setup {
    async fn key(
        &self,
        models: Option<Vec<String>>,
        limits: Limits,
        expires: Option<i64>,
    ) -> auth::NewKey {
        let key = auth::generate("test", models, limits, expires);
        self.store.insert_key(&key.row).await.unwrap();
        key
    }

    async fn post(&self, key: Option<&str>, body: &Value) -> reqwest::Response {
        let mut r = client()
            .post(self.gw.url("/v1/chat/completions"))
            .json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().await.unwrap()
    }

    /// Waits until a key created after the gateway started is in its table.
    async fn until_accepted(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.post(Some(key), &chat_body(false)).await;
            if r.status() == 200 {
                return;
            }
            assert_eq!(r.status(), 401);
            assert!(Instant::now() < deadline, "new key never accepted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the ledger holds `n` rows, then returns them.
    async fn ledger(&self, n: usize) -> Vec<UsageRecord> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.store.usage_records(0).await.unwrap();
            if rows.len() >= n {
                assert_eq!(rows.len(), n, "more ledger rows than requests");
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "ledger has {} of {n} rows",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn error_of(r: reqwest::Response) -> Value {
    let v: Value = r.json().await.unwrap();
    v["error"].clone()
}

async fn keys_are_required_and_checked(db: Db) {
    let s = setup(db, "keys").await;
    let r = s.post(None, &chat_body(false)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let e = error_of(r).await;
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("Authorization"));

    let key = s.key(None, Limits::default(), None).await;
    s.until_accepted(&key.secret).await;
    let mut wrong = key.secret.clone();
    wrong.replace_range(wrong.len() - 4.., "0000");
    let r = s.post(Some(&wrong), &chat_body(false)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_of(r).await["message"], "Incorrect API key provided.");
    let r = s.post(Some("sk-not-ours"), &chat_body(false)).await;
    assert_eq!(r.status(), 401);

    let expired = s
        .key(
            None,
            Limits::default(),
            Some(llm_gateway::store::now_ms() + 300),
        )
        .await;
    s.until_accepted(&expired.secret).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the expiry time pass
    let r = s.post(Some(&expired.secret), &chat_body(false)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_of(r).await["message"], "This API key has expired.");

    // Refusals are counted; only authenticated requests reach the ledger.
    let m = metrics_text(&s.gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_auth_failures_total{reason=\"missing\"}"),
        Some(1.0)
    );
    let rows = s.ledger(2).await;
    assert!(rows.iter().all(|r| r.status == 200));
}

async fn revocation_takes_effect_within_the_refresh_interval(db: Db) {
    let s = setup(db, "keys").await;
    let key = s.key(None, Limits::default(), None).await;
    s.until_accepted(&key.secret).await;
    let revoked_at = Instant::now();
    assert!(s.store.revoke_key(&key.row.id).await.unwrap());
    loop {
        let r = s.post(Some(&key.secret), &chat_body(false)).await;
        if r.status() == 401 {
            assert_eq!(
                error_of(r).await["message"],
                "This API key has been revoked."
            );
            break;
        }
        assert_eq!(r.status(), 200);
        // refresh_interval is 200 ms; allow for a reload in progress and a slow machine.
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "revoked key still accepted after {:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !s.store.revoke_key(&key.row.id).await.unwrap(),
        "revoking twice"
    );
}

async fn a_key_limited_to_models_gets_403_for_others(db: Db) {
    let s = setup(db, "keys").await;
    let key = s
        .key(Some(vec!["other".into()]), Limits::default(), None)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = s.post(Some(&key.secret), &chat_body(false)).await;
        if r.status() != 401 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status(), 403);
    let e = error_of(r).await;
    assert_eq!(e["code"], "model_not_allowed");
    assert_eq!(e["param"], "model");
}

async fn requests_per_minute_are_limited_with_openai_headers(db: Db) {
    let s = setup(db, "keys").await;
    let key = s
        .key(
            None,
            Limits {
                rpm: Some(3),
                tpm: None,
            },
            None,
        )
        .await;
    s.until_accepted(&key.secret).await; // uses one of the three
    let r = s.post(Some(&key.secret), &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "1");
    assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
    r.bytes().await.unwrap();
    assert_eq!(
        s.post(Some(&key.secret), &chat_body(false)).await.status(),
        200
    );
    let r = s.post(Some(&key.secret), &chat_body(false)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let e = error_of(r).await;
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert_eq!(e["type"], "requests");
    // Refused requests are in the ledger too (status 429), with the key.
    let rows = s.ledger(4).await;
    assert_eq!(rows.iter().filter(|r| r.status == 429).count(), 1);
    assert!(
        rows.iter()
            .all(|r| r.key_id.as_deref() == Some(key.row.id.as_str()))
    );
}

async fn token_reservations_are_settled_with_real_usage(db: Db) {
    let s = setup(db, "keys").await;
    // The estimate reserves max_completion_tokens (1000) + the prompt; the mock ignores
    // that field and answers with 8 tokens, so ~40 are really used.
    let key = s
        .key(
            None,
            Limits {
                rpm: None,
                tpm: Some(1500),
            },
            None,
        )
        .await;
    let mut body = chat_body(false);
    body["max_completion_tokens"] = 1000.into();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.post(Some(&key.secret), &body).await;
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Without settling, 1000+ of 1500 would still be reserved and this would be refused.
    let r = s.post(Some(&key.secret), &body).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    body["max_completion_tokens"] = 5000.into();
    let r = s.post(Some(&key.secret), &body).await;
    assert_eq!(
        r.status(),
        429,
        "a request bigger than what is left must wait"
    );
    assert_eq!(error_of(r).await["type"], "tokens");
}

async fn every_request_is_in_the_ledger_once_with_its_figures(db: Db) {
    let s = setup(db, "open").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let stream = i % 2 == 0;
        let r = s.post(None, &chat_body(stream)).await;
        assert_eq!(r.status(), 200);
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
        r.bytes().await.unwrap();
    }
    // A request for an unknown model is recorded with its status.
    let mut bad = chat_body(false);
    bad["model"] = "nope".into();
    assert_eq!(s.post(None, &bad).await.status(), 404);
    let rows = s.ledger(7).await;
    let seen: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    for id in &ids {
        assert!(
            seen.contains(id.as_str()),
            "request {id} missing from the ledger"
        );
    }
    let ok: Vec<&UsageRecord> = rows.iter().filter(|r| r.status == 200).collect();
    assert_eq!(ok.len(), 6);
    for r in &ok {
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.backend.as_deref(), Some("b0"));
        assert_eq!(r.key_id, None, "open mode records no key");
        assert!(r.prompt_tokens > 0 && r.completion_tokens > 0);
        assert!(!r.estimated, "the mock reports usage");
        assert!(r.latency_us > 0);
        assert!(!r.client_disconnected);
    }
    assert_eq!(
        ok.iter().filter(|r| r.ttft_us.is_some()).count(),
        3,
        "streams have a TTFT"
    );
    assert!(rows.iter().any(|r| r.status == 404 && r.model.is_none()));

    let summary = s.store.usage_summary(0, GroupBy::Model).await.unwrap();
    let m = summary.iter().find(|l| l.group == "m").unwrap();
    assert_eq!(m.requests, 6);
    assert_eq!(
        m.prompt_tokens,
        ok.iter().map(|r| r.prompt_tokens as i64).sum::<i64>()
    );
    let text = admin::usage(
        &s.config,
        Duration::from_secs(3600),
        llm_gateway::cli::UsageBy::Model,
    )
    .await
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("m ") && l.contains(" 6 ")),
        "{text}"
    );

    let m = metrics_text(&s.gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_ledger_records_written_total"),
        Some(7.0)
    );
    assert_eq!(
        metric(&m, "llm_gateway_ledger_records_spooled_total"),
        Some(7.0)
    );
}

async fn the_instance_is_registered_and_health_shows_the_database(db: Db) {
    let s = setup(db, "open").await;
    let h = health(&s.gw).await;
    assert_eq!(h["database"]["state"], "up");
    assert_eq!(
        h["database"]["engine"],
        match db {
            Db::Sqlite => "sqlite",
            Db::Postgres => "postgres",
        }
    );
    assert_eq!(h["database"]["auth"], "open");
    let rows = s.store.list_instances().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].pid, i64::from(std::process::id()));
    assert_eq!(rows[0].stopped_at_ms, None);
    let text = admin::instances(&s.config).await.unwrap();
    assert!(text.contains("live"), "{text}");
    s.gw.stop().await;
    let rows = s.store.list_instances().await.unwrap();
    assert!(rows[0].stopped_at_ms.is_some(), "a clean stop is recorded");
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres).await } )*
        }
    };
}

on_both!(
    keys_are_required_and_checked,
    revocation_takes_effect_within_the_refresh_interval,
    a_key_limited_to_models_gets_403_for_others,
    requests_per_minute_are_limited_with_openai_headers,
    token_reservations_are_settled_with_real_usage,
    every_request_is_in_the_ledger_once_with_its_figures,
    the_instance_is_registered_and_health_shows_the_database,
);

/// `keys create` may run while the service starts: both migrate the same fresh database.
#[tokio::test]
async fn concurrent_first_opens_of_one_database_all_succeed() {
    for db in [Db::Sqlite, Db::Postgres] {
        let dir = tempfile::tempdir().unwrap();
        let up = mock().await;
        let toml = config_for(&[&up], &storage(db, dir.path(), "keys"));
        let config = Config::from_toml(&toml).unwrap();
        let opens = (0..4).map(|_| Store::open(&config));
        for result in futures_util::future::join_all(opens).await {
            let store = result.unwrap_or_else(|e| panic!("{db:?}: {e}"));
            assert!(store.list_keys().await.unwrap().is_empty());
        }
    }
}
