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
use llm_gateway::Config;
use llm_gateway::cli::admin;
use llm_gateway::testing::{GroupBy, Limits, NewKey, Outcome, Store, UsageRecord, generate_key};
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
    ) -> NewKey {
        let key = generate_key("test", models, limits, expires);
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
            Some(llm_gateway::testing::now_ms() + 300),
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
    let tpm_1500 = Limits {
        rpm: None,
        tpm: Some(1500),
    };
    let key = s.key(None, tpm_1500, None).await;
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
    let message = error_of(s.post(Some(&key.secret), &body).await).await["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("Requested 50"),
        "the whole estimate (5000 + the prompt), not the bucket size: {message}"
    );

    // Without max_tokens, a request still reserves auth.reserve_completion_tokens (1024).
    let another = s.key(None, tpm_1500, None).await;
    s.until_accepted(&another.secret).await;
    let r = s.post(Some(&another.secret), &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    let remaining: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining <= 1500 - 1024,
        "remaining {remaining}: nothing reserved for the completion"
    );
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

async fn a_record_the_database_refuses_is_set_aside_and_the_rest_shipped(db: Db) {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    // A spool left by an earlier run: one good record and one the schema refuses.
    {
        let spool = common::spool_in(dir.path());
        let good: UsageRecord = UsageRecord {
            id: "01900000-0000-7000-8000-000000000001".into(),
            request_id: "left-over".into(),
            backend: None,
            instance_id: "old".into(),
            ..usage_record(1, 1)
        };
        spool
            .append(br#"{"id":"01900000-0000-7000-8000-000000000002"}"#)
            .unwrap();
        // As spooled by a version before the ledger had `outcome`.
        let mut old = serde_json::to_value(&good).unwrap();
        old.as_object_mut().unwrap().remove("outcome");
        spool.append(&serde_json::to_vec(&old).unwrap()).unwrap();
    }
    let toml = config_for(&[&up], &storage(db, dir.path(), "open"));
    let config = Config::from_toml(&toml).unwrap();
    let gw = Gateway::start(&toml).await;
    for _ in 0..3 {
        assert_eq!(
            client()
                .post(gw.url("/v1/chat/completions"))
                .json(&chat_body(false))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let store = Store::open(&config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.count_usage().await.unwrap() < 4 {
        assert!(
            Instant::now() < deadline,
            "the ledger is stuck behind the bad record"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = store.usage_records(0).await.unwrap();
    assert_eq!(rows.len(), 4);
    let left_over = rows.iter().find(|r| r.request_id == "left-over").unwrap();
    assert_eq!(left_over.outcome, Outcome::Complete);
    let rejected = std::fs::read_to_string(dir.path().join("rejected.jsonl")).unwrap();
    assert_eq!(
        rejected,
        "{\"id\":\"01900000-0000-7000-8000-000000000002\"}\n"
    );
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_ledger_records_dropped_total"),
        Some(1.0)
    );
}

/// A stream that broke, idled out, ended without `[DONE]` or lost its client is told apart
/// in its ledger row, not only in the log; one that completed says so.
async fn how_a_stream_ended_is_in_its_ledger_row(db: Db) {
    use llm_gateway::mock::MockBehavior;
    let normal = mock().await;
    // Paced so the first chunk reaches the gateway (and the client) before the break.
    let broken = common::mock_with(MockBehavior {
        drop_after: Some(2),
        chunk_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let no_done = common::mock_with(MockBehavior {
        send_done: false,
        ..Default::default()
    })
    .await;
    let idle = common::mock_with(MockBehavior {
        chunk_interval: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let slow = common::mock_with(MockBehavior {
        chunks: 1000,
        chunk_interval: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!(
        "{}\n[health_check]\nenabled = false\n",
        storage(db, dir.path(), "open")
    );
    for (name, up, extra) in [
        ("normal", &normal, ""),
        ("broken", &broken, ""),
        ("no_done", &no_done, ""),
        ("idle", &idle, "stream_idle_timeout = \"300ms\""),
        ("slow", &slow, ""),
    ] {
        toml.push_str(&common::backend(name, &up.base_url(), extra));
        toml.push_str(&common::model(name, &[name]));
    }
    let config = Config::from_toml(&toml).unwrap();
    let gw = Gateway::start(&toml).await;
    let store = Store::open(&config).await.unwrap();
    let stream = |model: &str| {
        let mut body = chat_body(true);
        body["model"] = model.into();
        client()
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
    };
    for model in ["normal", "broken", "no_done", "idle"] {
        let r = stream(model).await.unwrap();
        assert_eq!(r.status(), 200, "{model}");
        r.bytes().await.unwrap();
    }
    let r = stream("slow").await.unwrap();
    let mut body = r.bytes_stream();
    futures_util::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = store.usage_records(0).await.unwrap();
        if rows.len() == 5 && rows.iter().all(|r| r.outcome != Outcome::Interrupted) {
            break rows;
        }
        assert!(Instant::now() < deadline, "rows: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcome = |model: &str| {
        let row = rows
            .iter()
            .find(|r| r.model.as_deref() == Some(model))
            .unwrap();
        assert_eq!(row.status, 200, "{model}: the status sent");
        row.outcome
    };
    assert_eq!(outcome("normal"), Outcome::Complete);
    assert_eq!(outcome("broken"), Outcome::StreamBroken);
    assert_eq!(outcome("no_done"), Outcome::StreamIncomplete);
    assert_eq!(outcome("idle"), Outcome::StreamIdleTimeout);
    assert_eq!(outcome("slow"), Outcome::ClientDisconnected);
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_ledger_records_written_total"),
        Some(5.0),
        "provisional rows are not counted as written records"
    );
}

/// A store of its own on `db`, with the directory it lives in (SQLite) and the mock the
/// configuration names.
async fn bare_store(db: Db) -> (Store, tempfile::TempDir, llm_gateway::mock::MockUpstream) {
    let dir = tempfile::tempdir().unwrap();
    let up = mock().await;
    let config = Config::from_toml(&config_for(&[&up], &storage(db, dir.path(), "open"))).unwrap();
    (Store::open(&config).await.unwrap(), dir, up)
}

/// Usage record number `i`: a complete chat completion of 1 + 1 tokens at `ts_ms` (the
/// odd ones waited in the queue, the even ones were answered by a fallback).
fn usage_record(i: usize, ts_ms: i64) -> UsageRecord {
    UsageRecord {
        id: format!("00000000-0000-7000-8000-{i:012}"),
        request_id: format!("r-{i}"),
        ts_ms,
        key_id: None,
        model: Some("m".into()),
        backend: Some("b0".into()),
        endpoint: "chat_completions".into(),
        status: 200,
        prompt_tokens: 1,
        completion_tokens: 1,
        estimated: false,
        latency_us: 1,
        ttft_us: None,
        client_disconnected: false,
        instance_id: "i".into(),
        outcome: Outcome::Complete,
        queue_us: (!i.is_multiple_of(2)).then_some(i as u64 * 10),
        fallback: i.is_multiple_of(2).then(|| "f".into()),
    }
}

/// A batch holding a stream's provisional record and its final one (same id) leaves the
/// final one, in either order, and counts it once; every field arrives as it was sent.
async fn a_final_record_wins_over_its_provisional_one_in_one_batch(db: Db) {
    let (store, _dir, _up) = bare_store(db).await;
    let record = |i: usize, outcome: Outcome| UsageRecord {
        request_id: format!("r-\"{i}\"-\u{e9}"),
        key_id: Some(format!("k{i}")),
        backend: None,
        prompt_tokens: 7,
        completion_tokens: if outcome == Outcome::Interrupted {
            0
        } else {
            11
        },
        estimated: outcome == Outcome::Interrupted,
        latency_us: 123_456,
        ttft_us: Some(789),
        outcome,
        ..usage_record(i, 1_700_000_000_000 + i as i64)
    };
    let batch = vec![
        record(1, Outcome::Interrupted),
        record(1, Outcome::Complete),
        record(2, Outcome::StreamBroken),
        record(2, Outcome::Interrupted),
    ];
    assert_eq!(store.insert_usage(&batch).await.unwrap(), 2);
    let rows = store.usage_records(0).await.unwrap();
    assert_eq!(
        rows,
        vec![
            record(1, Outcome::Complete),
            record(2, Outcome::StreamBroken)
        ]
    );
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
    retention_deletes_old_rows_in_batches_and_keeps_new_ones,
    a_record_the_database_refuses_is_set_aside_and_the_rest_shipped,
    how_a_stream_ended_is_in_its_ledger_row,
    a_final_record_wins_over_its_provisional_one_in_one_batch,
);

/// `keys create` may run while the service starts: both open and migrate the same fresh
/// database. SQLite's first connections race to switch the new file to WAL, which it refuses
/// at once ("database is locked", no busy wait) to all but one. Before the fix 4 opens of one
/// file failed 2 runs in 20 (once in CI); 8 opens of each of 10 files fail 3 in 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_opens_of_one_database_all_succeed() {
    for (db, rounds) in [(Db::Sqlite, 10), (Db::Postgres, 1)] {
        for round in 0..rounds {
            let dir = tempfile::tempdir().unwrap();
            let up = mock().await;
            let toml = config_for(&[&up], &storage(db, dir.path(), "keys"));
            let config = Config::from_toml(&toml).unwrap();
            let opens = (0..8).map(|_| {
                let config = config.clone();
                tokio::spawn(async move { Store::open(&config).await })
            });
            for result in futures_util::future::join_all(opens).await {
                let store = result
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{db:?}, round {round}: {e}"));
                assert!(store.list_keys().await.unwrap().is_empty());
            }
        }
    }
}

async fn retention_deletes_old_rows_in_batches_and_keeps_new_ones(db: Db) {
    let (store, _dir, _up) = bare_store(db).await;
    let record = usage_record;
    // 12 000 old rows (more than two delete batches) and 10 recent ones.
    for chunk in 0..12 {
        let rows: Vec<UsageRecord> = (0..1000).map(|j| record(chunk * 1000 + j, 1_000)).collect();
        assert_eq!(store.insert_usage(&rows).await.unwrap(), 1000);
    }
    let recent: Vec<UsageRecord> = (0..10).map(|j| record(100_000 + j, 5_000)).collect();
    store.insert_usage(&recent).await.unwrap();
    // Shipping the same records again inserts nothing.
    assert_eq!(store.insert_usage(&recent).await.unwrap(), 0);
    // Two statements of 5000 per call: not done after the first call.
    assert_eq!(
        store.delete_usage_before(2_000, 2).await.unwrap(),
        (10_000, false)
    );
    assert_eq!(
        store.delete_usage_before(2_000, 2).await.unwrap(),
        (2_000, true)
    );
    assert_eq!(store.count_usage().await.unwrap(), 10);
    assert_eq!(
        store.delete_usage_before(2_000, 2).await.unwrap(),
        (0, true)
    );
}

/// Two instances on one PostgreSQL database each enforce half of a key's limits.
#[tokio::test]
async fn instances_sharing_a_database_split_a_keys_limits() {
    let url = pg::fresh_database();
    let up = mock().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let toml = |dir: &std::path::Path| {
        config_for(
            &[&up],
            &format!(
                "[storage]\nstate_dir = {:?}\ndatabase_url = {url:?}\nheartbeat_interval = \"100ms\"\n\
                 [auth]\nmode = \"keys\"\nrefresh_interval = \"100ms\"\n",
                dir.to_str().unwrap()
            ),
        )
    };
    let a = Gateway::start(&toml(dirs[0].path())).await;
    let b = Gateway::start(&toml(dirs[1].path())).await;
    let store = Store::open(&Config::from_toml(&toml(dirs[0].path())).unwrap())
        .await
        .unwrap();
    let key = generate_key(
        "shared",
        None,
        Limits {
            rpm: Some(10),
            tpm: None,
        },
        None,
    );
    store.insert_key(&key.row).await.unwrap();
    for gw in [&a, &b] {
        common::wait_for_async("both instances live", Duration::from_secs(10), || async {
            health(gw).await["database"]["live_instances"] == 2
        })
        .await;
    }
    // Each instance allows 10 / 2 = 5 requests at once.
    for gw in [&a, &b] {
        let mut ok = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(&key.secret)
                .json(&chat_body(false))
                .send()
                .await
                .unwrap();
            match r.status().as_u16() {
                200 => {
                    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "5");
                    ok += 1;
                }
                429 => break,
                401 => assert!(Instant::now() < deadline, "key never loaded"),
                s => panic!("status {s}"),
            }
            assert!(ok <= 5, "more than half the limit on one instance");
        }
        assert_eq!(ok, 5);
    }
}

/// Keys are required unless the config says `mode = "open"`.
#[tokio::test]
async fn keys_are_required_by_default() {
    let up = mock().await;
    let gw = Gateway::start(&config_for(&[&up], "[auth]\nrefresh_interval = \"1s\"\n")).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(health(&gw).await["database"]["auth"], "keys");
    // A refusal still carries the request id, and a wrong method on a known path is
    // refused for the key first (401, not 405): the key check wraps every route.
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "refused-1")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "refused-1");
    let r = client()
        .get(gw.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Every route the router knows is behind the key check, except the public ones; a route
/// added to the table later is walked here too. Unknown paths need a key as well.
#[tokio::test]
async fn every_api_route_but_the_public_ones_needs_a_key() {
    let s = setup(Db::Sqlite, "keys").await;
    let mut walked = 0;
    for (method, path, _) in llm_gateway::testing::api_table(true) {
        let concrete = path.replace("{*model}", "m");
        let r = client()
            .request(method.clone(), s.gw.url(&concrete))
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        if llm_gateway::testing::PUBLIC.contains(&path) {
            assert_ne!(r.status(), 401, "{method} {path} is public");
        } else {
            // vLLM serves these beside /v1, and the gateway on the same paths.
            let vllm = [
                "/rerank",
                "/v2/rerank",
                "/score",
                "/tokenize",
                "/detokenize",
                "/pooling",
                "/classify",
            ];
            assert!(
                path.starts_with("/v1/") || vllm.contains(&path),
                "{path}: a non-/v1 route that is not public"
            );
            assert_eq!(r.status(), 401, "{method} {path} answered without a key");
            assert_eq!(error_of(r).await["code"], "invalid_api_key");
            walked += 1;
        }
    }
    assert!(walked >= 15, "only {walked} protected routes walked");
    for path in ["/v1/unknown", "/v2/models", "/"] {
        let r = client().get(s.gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
}

/// `/v1/models` lists only what the key may use; another model is "not found" for it.
/// Two `Authorization` headers are refused whatever their order.
#[tokio::test]
async fn a_key_sees_only_its_models_and_must_send_one_authorization_header() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}{}",
        config_for(&[&up], &storage(Db::Sqlite, dir.path(), "keys")),
        common::model("other", &["b0"])
    );
    let config = Config::from_toml(&toml).unwrap();
    let gw = Gateway::start(&toml).await;
    let store = Store::open(&config).await.unwrap();
    let limited = generate_key("limited", Some(vec!["m".into()]), Limits::default(), None);
    store.insert_key(&limited.row).await.unwrap();
    let all = generate_key("all", None, Limits::default(), None);
    store.insert_key(&all.row).await.unwrap();
    let models = |key: String| {
        let url = gw.url("/v1/models");
        async move {
            let r = client().get(url).bearer_auth(key).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while models(all.secret.clone()).await.0 != 200 {
        assert!(Instant::now() < deadline, "keys never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&models(all.secret.clone()).await.1), ["m", "other"]);
    let (status, body) = models(limited.secret.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&body), ["m"]);
    let get = |path: &str, key: &str| client().get(gw.url(path)).bearer_auth(key).send();
    assert_eq!(
        get("/v1/models/m", &limited.secret).await.unwrap().status(),
        200
    );
    let r = get("/v1/models/other", &limited.secret).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await["code"], "model_not_found");
    assert_eq!(
        get("/v1/models/other", &all.secret).await.unwrap().status(),
        200
    );

    for (first, second) in [
        (all.secret.as_str(), "sk-lgw-0000000000000000-00"),
        ("sk-lgw-0000000000000000-00", all.secret.as_str()),
    ] {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {first}"))
            .header("authorization", format!("Bearer {second}"))
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            error_of(r).await["message"]
                .as_str()
                .unwrap()
                .contains("exactly one Authorization header")
        );
    }
}

/// Requests the gateway sheds before trying a backend (503 overloaded) are counted in
/// metrics, not written to the ledger: under overload they would be most of it.
#[tokio::test]
async fn shed_requests_are_counted_but_not_in_the_ledger() {
    use llm_gateway::mock::MockBehavior;
    let up = common::mock_with(MockBehavior {
        chunks: 20,
        chunk_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_for(
        &[&up],
        &format!(
            "[server]\nmax_concurrent_requests = 1\n{}",
            storage(Db::Sqlite, dir.path(), "open")
        ),
    );
    let config = Config::from_toml(&toml).unwrap();
    let gw = Gateway::start(&toml).await;
    let store = Store::open(&config).await.unwrap();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    futures_util::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    for _ in 0..3 {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(error_of(r).await["code"], "overloaded");
    }
    while futures_util::StreamExt::next(&mut body).await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = store.usage_records(0).await.unwrap();
        if rows.iter().any(|r| r.outcome == Outcome::Complete) {
            assert_eq!(rows.len(), 1, "{rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the stream's row never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "llm_gateway_requests_total{endpoint=\"chat_completions\",model=\"none\",backend=\"none\",status=\"503\"}"
        ),
        Some(3.0),
        "{m}"
    );
}
