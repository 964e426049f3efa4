//! The usage ledger when the database refuses writes or the disk fills, with real parts: a
//! PostgreSQL server whose trigger refuses inserts, SQLite and the spool on a tmpfs that is
//! really full. A record leaves the spool only once it is in the database or the database
//! refused that record itself; a request is served only when its record can be kept.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::tmpfs::Tmpfs;
use common::{Gateway, chat_body, client, config_for, metric, metrics_text, mock, wait_for_async};
use llm_gateway::Config;
use llm_gateway::testing::Outcome;
use llm_gateway::testing::Store;
use serde_json::Value;

/// A gateway in open mode on one mock upstream, with its state in `state_dir`, the database
/// at `url` (SQLite in the state directory when `None`) and fast shipping.
async fn gateway(
    state_dir: &Path,
    url: Option<&str>,
    ledger: &str,
) -> (Gateway, Store, llm_gateway::mock::MockUpstream) {
    let up = mock().await;
    let url_line = url.map_or(String::new(), |u| format!("database_url = {u:?}\n"));
    let toml = config_for(
        &[&up],
        &format!(
            "[storage]\nstate_dir = {:?}\n{url_line}connect_timeout = \"1s\"\n[auth]\nmode = \"open\"\n\
             [ledger]\nflush_interval = \"20ms\"\n{ledger}\n",
            state_dir.to_str().unwrap()
        ),
    );
    let gw = Gateway::start(&toml).await;
    let store = Store::open(&Config::from_toml(&toml).unwrap())
        .await
        .unwrap();
    (gw, store, up)
}

/// Sends `n` requests with ids `<prefix>-<i>` (even ones streamed), each read to the end;
/// every one must be served.
async fn served(gw: &Gateway, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let r = send(gw, &id, i % 2 == 0).await;
        assert_eq!(r.status(), 200, "{id}");
        r.bytes().await.unwrap();
        ids.push(id);
    }
    ids
}

async fn send(gw: &Gateway, id: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", id)
        .json(&chat_body(stream))
        .send()
        .await
        .unwrap()
}

async fn counter(gw: &Gateway, name: &str) -> f64 {
    metric(&metrics_text(gw).await, name).unwrap_or(0.0)
}

/// Waits until the shipper has failed `more` more times than `since`.
async fn until_write_failures(gw: &Gateway, since: f64, more: f64) {
    wait_for_async("failed ledger writes", Duration::from_secs(20), || async {
        counter(gw, "llm_gateway_ledger_write_failures_total").await >= since + more
    })
    .await;
}

/// Waits until every id is in the ledger, then checks that none is there twice.
async fn assert_each_once(store: &Store, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in store.usage_records(0).await.unwrap() {
            *counts.entry(r.request_id).or_default() += 1;
        }
        let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
        if missing == 0 {
            for (id, n) in &counts {
                assert_eq!(*n, 1, "{id} is in the ledger {n} times");
            }
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} served requests never reached the ledger",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pg_exec(store: &Store, sql: &str) {
    let Store::Postgres(pool) = store else {
        panic!("not PostgreSQL")
    };
    sqlx::raw_sql(sql).execute(pool).await.unwrap();
}

/// A trigger on usage_records that raises `sqlstate` for every row whose request id
/// matches `pattern` (SQL LIKE).
async fn refuse_inserts(store: &Store, sqlstate: &str, pattern: &str) {
    pg_exec(
        store,
        &format!(
            "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.request_id LIKE '{pattern}' THEN \
             RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}'; END IF; \
             RETURN NEW; END $$; \
             CREATE OR REPLACE TRIGGER refuse BEFORE INSERT OR UPDATE ON usage_records \
             FOR EACH ROW EXECUTE FUNCTION refuse();"
        ),
    )
    .await;
}

async fn allow_inserts(store: &Store) {
    pg_exec(store, "DROP TRIGGER refuse ON usage_records").await;
}

/// Disk full (53100), read-only replica (25006), revoked permission (42501), statement
/// timeout (57014), lock timeout (55P03): the database is there but cannot take the rows
/// now. None of them may cost a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_inserts_for_a_while_loses_no_record() {
    let cluster = common::pg::PgCluster::start();
    let url = cluster.create_database("refuses");
    let dir = tempfile::tempdir().unwrap();
    let (gw, store, _up) = gateway(dir.path(), Some(&url), "").await;
    let mut ids = Vec::new();
    for code in ["53100", "25006", "42501", "57014", "55P03"] {
        refuse_inserts(&store, code, "%").await;
        let failures = counter(&gw, "llm_gateway_ledger_write_failures_total").await;
        ids.extend(served(&gw, code, 4).await);
        until_write_failures(&gw, failures, 2.0).await;
    }
    assert_eq!(store.count_usage().await.unwrap(), 0);
    assert!(
        !dir.path().join("rejected.jsonl").exists(),
        "a record was set aside while the database refused everything"
    );
    let h = common::health(&gw).await;
    assert_eq!(h["database"]["state"], "down", "{h}");
    allow_inserts(&store).await;
    assert_each_once(&store, &ids).await;
    assert_eq!(
        counter(&gw, "llm_gateway_ledger_records_dropped_total").await,
        0.0
    );
}

/// A batch holds a record the schema refuses and one the database cannot take for now: the
/// bad one is set aside exactly once, the other waits and arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_is_set_aside_once_while_the_database_refuses_the_rest() {
    let cluster = common::pg::PgCluster::start();
    let url = cluster.create_database("once");
    let dir = tempfile::tempdir().unwrap();
    {
        // Left by an earlier run: a record missing its required fields.
        let spool = common::spool_in(dir.path());
        spool
            .append(br#"{"id":"01900000-0000-7000-8000-000000000002"}"#)
            .unwrap();
    }
    // Refuse the good records before the gateway's first shipping round can see them.
    let store = {
        let up = mock().await;
        let mut c = Config::from_toml(&config_for(&[&up], "")).unwrap();
        c.storage.database_url = Some(url.clone());
        Store::open(&c).await.unwrap()
    };
    refuse_inserts(&store, "53100", "later-%").await;
    let (gw, store, _up) = gateway(dir.path(), Some(&url), "").await;
    let ids = served(&gw, "later", 3).await;
    let failures = counter(&gw, "llm_gateway_ledger_write_failures_total").await;
    until_write_failures(&gw, failures, 3.0).await;
    allow_inserts(&store).await;
    assert_each_once(&store, &ids).await;
    let rejected = std::fs::read_to_string(dir.path().join("rejected.jsonl")).unwrap();
    assert_eq!(
        rejected,
        "{\"id\":\"01900000-0000-7000-8000-000000000002\"}\n"
    );
    assert_eq!(
        counter(&gw, "llm_gateway_ledger_records_dropped_total").await,
        1.0
    );
}

/// SQLite on a full disk (SQLITE_FULL): the records wait in the spool, not in rejected.jsonl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_disk_keeps_every_record_until_there_is_room() {
    let disk = Tmpfs::mount(4 << 20);
    let url = format!("sqlite://{}", disk.path().join("ledger.db").display());
    let state = tempfile::tempdir().unwrap();
    let (gw, store, _up) = gateway(state.path(), Some(&url), "").await;
    let mut ids = served(&gw, "before", 2).await;
    assert_each_once(&store, &ids).await;
    disk.fill();
    let failures = counter(&gw, "llm_gateway_ledger_write_failures_total").await;
    let during = served(&gw, "during", 20).await;
    until_write_failures(&gw, failures, 2.0).await;
    assert!(!state.path().join("rejected.jsonl").exists());
    disk.free();
    ids.extend(during);
    assert_each_once(&store, &ids).await;
    assert_eq!(
        counter(&gw, "llm_gateway_ledger_records_dropped_total").await,
        0.0
    );
}

fn segment_files(state_dir: &Path) -> usize {
    std::fs::read_dir(state_dir.join("spool"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "spool")
        })
        .count()
}

/// The state directory fills up (`on_full = "reject"`): the request whose record could not
/// be written is still kept (held in memory), later ones get 503 `ledger_unavailable`,
/// `/ready` is 503; once there is room again, every served request is in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_refuses_requests_and_keeps_what_it_served() {
    let state = Tmpfs::mount(2 << 20);
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("ledger.db").display());
    let (gw, store, _up) = gateway(state.path(), Some(&url), "").await;
    let mut ids = served(&gw, "before", 3).await;
    assert_each_once(&store, &ids).await;
    let segments_before = segment_files(state.path());
    state.fill();
    let mut refused = None;
    for i in 0..200 {
        let id = format!("full-{i}");
        let r = send(&gw, &id, i % 2 == 0).await;
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        ids.push(id);
    }
    let refused = refused.expect("a full state directory never refused a request");
    assert_eq!(refused.headers()["retry-after"], "1");
    let e: Value = refused.json().await.unwrap();
    assert_eq!(e["error"]["code"], "ledger_unavailable", "{e}");
    let ready = client().get(gw.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["reason"], "usage spool unwritable");
    let h = common::health(&gw).await;
    assert_eq!(h["database"]["ledger_accepting"], false, "{h}");
    assert_eq!(h["database"]["ledger_spool_writable"], false, "{h}");
    // More refused requests do not create a segment file each.
    for i in 0..20 {
        assert_eq!(
            send(&gw, &format!("refused-{i}"), false).await.status(),
            503
        );
    }
    assert!(
        segment_files(state.path()) <= segments_before + 1,
        "{} segment files after the disk filled (from {segments_before})",
        segment_files(state.path())
    );

    state.free();
    wait_for_async("ready again", Duration::from_secs(20), || async {
        client()
            .get(gw.url("/ready"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    ids.extend(served(&gw, "after", 2).await);
    assert_each_once(&store, &ids).await;
    let rows = store.usage_records(0).await.unwrap();
    assert_eq!(
        rows.len(),
        ids.len(),
        "refused requests are not in the ledger"
    );
    assert_eq!(
        counter(&gw, "llm_gateway_ledger_records_dropped_total").await,
        0.0
    );
}

/// With `on_full = "drop"` a full state directory costs records, but each one is counted,
/// and serving goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_full_drop_a_full_state_directory_counts_every_lost_record() {
    let state = Tmpfs::mount(2 << 20);
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("ledger.db").display());
    let (gw, store, _up) = gateway(state.path(), Some(&url), "on_full = \"drop\"").await;
    let before = served(&gw, "before", 2).await;
    assert_each_once(&store, &before).await;
    state.fill();
    served(&gw, "full", 30).await;
    let h = common::health(&gw).await;
    assert_eq!(h["database"]["ledger_spool_writable"], false, "{h}");
    assert_eq!(h["database"]["ledger_accepting"], true, "{h}");
    let spooled = counter(&gw, "llm_gateway_ledger_records_spooled_total").await;
    let dropped = counter(&gw, "llm_gateway_ledger_records_dropped_total").await;
    assert!(dropped >= 1.0, "nothing counted as dropped");
    assert_eq!(
        spooled + dropped,
        32.0,
        "every record is spooled or counted"
    );
    assert!(segment_files(state.path()) <= 3);
    state.free();
    let mut all = before;
    all.extend(served(&gw, "after", 2).await);
    assert_each_once(&store, &all).await;
    wait_for_async(
        "every spooled record shipped",
        Duration::from_secs(20),
        // A stream whose final record was lost may have left its provisional row.
        || async {
            let rows = store.usage_records(0).await.unwrap();
            let finals = rows.iter().filter(|r| r.outcome != Outcome::Interrupted);
            finals.count() as f64 == spooled + 2.0
        },
    )
    .await;
}
