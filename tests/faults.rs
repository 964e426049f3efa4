//! Fault tests of the usage ledger with real processes and a real PostgreSQL server: a
//! database outage under load, SIGKILL of the gateway under load, a torn spool record, and
//! the flush at SIGTERM. Every completed request must be in the ledger exactly once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{GatewayProcess, Launch};
use common::{chat_body, client, metric, mock, pg::PgCluster};
use llm_gateway::Config;
use llm_gateway::mock::MockBehavior;
use llm_gateway::testing::Outcome;
use llm_gateway::testing::Store;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Config: open mode, PostgreSQL at `url`, ledger settings from `ledger`.
fn write_config(dir: &Path, upstream: &str, url: &str, ledger: &str) -> PathBuf {
    let toml = format!(
        "{}\n[storage]\nstate_dir = {:?}\ndatabase_url = {url:?}\nconnect_timeout = \"1s\"\n\
         [auth]\nmode = \"open\"\n[ledger]\n{ledger}\n",
        config_for_url(upstream),
        dir.to_str().unwrap()
    );
    let path = dir.join("gw.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn config_for_url(base_url: &str) -> String {
    format!(
        "[health_check]\nenabled = false\n[[backends]]\nname = \"b0\"\nbase_url = \"{base_url}\"\n\
         [[models]]\nname = \"m\"\nroutes = [{{ backend = \"b0\" }}]\n"
    )
}

/// The gateway binary on a socket passed to it, serving `config`; once `/health` answers.
async fn spawn(config: &Path, env: &[(&str, &str)]) -> GatewayProcess {
    Launch::serve(config)
        .env("RUST_LOG", "error")
        .envs(env)
        .start()
        .await
}

/// Request ids of answers received in full (status 200, whole body read).
#[derive(Default)]
struct Completed {
    ids: Mutex<Vec<String>>,
    failed: AtomicUsize,
}

/// `workers` clients sending requests (every third streamed) until `stop`.
async fn load(url: String, workers: usize, stop: Arc<AtomicBool>, done: Arc<Completed>) {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks = (0..workers).map(|_| {
        let (url, stop, done, next) = (url.clone(), stop.clone(), done.clone(), next.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id = format!("fault-{n}");
                let r = client()
                    .post(format!("{url}/v1/chat/completions"))
                    .header("x-request-id", &id)
                    .json(&chat_body(n % 3 == 0))
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    done.ids.lock().unwrap().push(id);
                } else {
                    done.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    futures_util::future::join_all(tasks).await;
}

impl Completed {
    fn count(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    async fn until(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} requests completed",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A throwaway PostgreSQL database, a mock upstream, and a gateway config in a temp dir.
struct Setup {
    cluster: PgCluster,
    url: String,
    config: PathBuf,
    dir: tempfile::TempDir,
    _up: llm_gateway::mock::MockUpstream,
}

/// The `[ledger]` lines that keep every record in the spool until a restart or drain.
const HOLD_BACK: &str = "flush_interval = \"1h\"\nbatch_size = 10000";

async fn setup(ledger: &str) -> Setup {
    setup_with(ledger, MockBehavior::default()).await
}

async fn setup_with(ledger: &str, upstream: MockBehavior) -> Setup {
    let cluster = PgCluster::start();
    let url = cluster.create_database("ledger");
    let up = common::mock_with(upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &up.base_url(), &url, ledger);
    Setup {
        cluster,
        url,
        config,
        dir,
        _up: up,
    }
}

/// Sends `n` requests one after another with ids `<prefix>-<i>` (odd ones streamed when
/// `streams`), each read to the end; returns the ids.
async fn send_each(url: &str, prefix: &str, n: usize, streams: bool) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .header("x-request-id", &id)
            .json(&chat_body(streams && i % 2 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        ids.push(id);
    }
    ids
}

async fn metrics_of(url: &str) -> String {
    common::get_text(format!("{url}/metrics")).await
}

async fn store_at(url: &str) -> Store {
    let mut c = Config::from_toml(&config_for_url("http://127.0.0.1:1/v1")).unwrap();
    c.storage.database_url = Some(url.to_owned());
    Store::open(&c).await.unwrap()
}

/// Waits until every id in `expected` is in the ledger, then checks none is there twice.
async fn assert_ledger_has_each_once(store: &Store, expected: &[String]) -> HashMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = store.usage_records(0).await.unwrap();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in rows {
            *counts.entry(r.request_id).or_default() += 1;
        }
        let missing = expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .count();
        if missing == 0 {
            for (id, n) in &counts {
                assert_eq!(*n, 1, "request {id} is in the ledger {n} times");
            }
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} completed requests never reached the ledger",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_loses_no_record() {
    // Every field is held for the whole test (a `..` pattern would drop the cluster).
    let Setup {
        cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup("flush_interval = \"50ms\"").await;
    let gw = spawn(&config, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Completed::default());
    let load = tokio::spawn(load(gw.url.clone(), 4, stop.clone(), done.clone()));
    done.until(50).await;
    cluster.stop();
    let at_outage = done.count();
    done.until(at_outage + 200).await;
    // The gateway kept serving and saw the outage.
    let m = metrics_of(&gw.url).await;
    assert!(
        metric(&m, "llm_gateway_ledger_write_failures_total").unwrap() >= 1.0,
        "{m}"
    );
    let h: serde_json::Value = common::get_json(format!("{}/health", gw.url)).await;
    assert_eq!(h["database"]["state"], "down");
    cluster.restart();
    let at_restart = done.count();
    done.until(at_restart + 50).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        done.failed.load(Ordering::Relaxed),
        0,
        "requests failed during the outage"
    );

    let expected = done.ids.lock().unwrap().clone();
    let store = store_at(&url).await;
    let counts = assert_ledger_has_each_once(&store, &expected).await;
    assert_eq!(counts.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_then_restart_loses_no_record() {
    // Nothing is shipped before the kill: every record must come back from the spool.
    let Setup {
        cluster: _cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup(HOLD_BACK).await;
    let mut gw = spawn(&config, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Completed::default());
    let load = tokio::spawn(load(gw.url.clone(), 4, stop.clone(), done.clone()));
    done.until(200).await;
    gw.sigkill();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let expected = done.ids.lock().unwrap().clone();
    let store = store_at(&url).await;
    assert_eq!(
        store.count_usage().await.unwrap(),
        0,
        "nothing shipped before the kill"
    );

    let _gw = spawn(&config, &[("LLM_GATEWAY__LEDGER__FLUSH_INTERVAL", "50ms")]).await;
    assert_ledger_has_each_once(&store, &expected).await;
}

/// Streams cut by a crash of the gateway still leave their rows: each client had a 200 and
/// events when the process was killed; after the restart each stream is in the ledger once,
/// marked `interrupted`, with what was known when its first byte went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_sigkill_leave_interrupted_rows() {
    let Setup {
        cluster: _cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup_with(
        HOLD_BACK,
        MockBehavior {
            chunks: 1000,
            chunk_interval: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .await;
    let mut gw = spawn(&config, &[]).await;
    let mut open = Vec::new();
    for i in 0..8 {
        let id = format!("cut-{i}");
        let r = client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("x-request-id", &id)
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut events = 0;
        while events < 5 {
            let chunk = futures_util::StreamExt::next(&mut body)
                .await
                .unwrap()
                .unwrap();
            events += chunk.windows(6).filter(|w| w == b"data: ").count();
        }
        open.push((id, body));
    }
    gw.sigkill();
    drop(open);

    let _gw = spawn(&config, &[("LLM_GATEWAY__LEDGER__FLUSH_INTERVAL", "50ms")]).await;
    let store = store_at(&url).await;
    let ids: Vec<String> = (0..8).map(|i| format!("cut-{i}")).collect();
    assert_ledger_has_each_once(&store, &ids).await;
    for row in store.usage_records(0).await.unwrap() {
        assert_eq!(row.outcome, Outcome::Interrupted, "{row:?}");
        assert_eq!(row.status, 200);
        assert_eq!(row.model.as_deref(), Some("m"));
        assert_eq!(row.backend.as_deref(), Some("b0"));
        assert!(row.ttft_us.is_some());
        assert!(row.prompt_tokens > 0 && row.estimated, "{row:?}");
        assert_eq!(row.completion_tokens, 0);
    }
}

/// After a `kill -9` and restart in the same state directory, the dead process does not
/// count as a live instance (which would halve every key's limits until it went stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_does_not_count_its_dead_predecessor() {
    let Setup {
        cluster: _cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup("").await;
    let beat = [("LLM_GATEWAY__STORAGE__HEARTBEAT_INTERVAL", "1s")];
    let mut gw = spawn(&config, &beat).await;
    gw.sigkill();
    let gw = spawn(&config, &beat).await;
    let store = store_at(&url).await;
    // Wait for the second heartbeat of the new instance: it counts the live instances while
    // the dead one's last beat is still fresh (three intervals).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = store.list_instances().await.unwrap();
        let newest = &rows[0];
        if newest.heartbeat_at_ms >= newest.started_at_ms + 500 {
            assert!(
                newest.heartbeat_at_ms < rows[1].heartbeat_at_ms + 3000,
                "the dead instance's beat went stale before the check"
            );
            assert!(rows[1].stopped_at_ms.is_some(), "predecessor not retired");
            break;
        }
        assert!(Instant::now() < deadline, "no second heartbeat");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h: serde_json::Value = common::get_json(format!("{}/health", gw.url)).await;
    assert_eq!(h["database"]["live_instances"], 1, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_record_is_skipped_and_the_others_are_kept() {
    let Setup {
        cluster: _cluster,
        url,
        config,
        dir,
        _up,
    } = setup(HOLD_BACK).await;
    let mut gw = spawn(&config, &[]).await;
    let ids = send_each(&gw.url, "torn", 20, false).await;
    gw.sigkill();

    // Cut the newest segment in the middle of its last record.
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    segments.sort();
    let last = segments.last().expect("a spool segment with records");
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let gw = spawn(&config, &[("LLM_GATEWAY__LEDGER__FLUSH_INTERVAL", "50ms")]).await;
    let store = store_at(&url).await;
    let counts = assert_ledger_has_each_once(&store, &ids[..19]).await;
    assert!(
        !counts.contains_key(&ids[19]),
        "the torn record cannot be in the ledger"
    );
    assert_eq!(counts.len(), 19);
    let m = metrics_of(&gw.url).await;
    assert_eq!(
        metric(&m, "llm_gateway_ledger_spool_corrupt_frames_total"),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_ledger_before_exit() {
    let Setup {
        cluster: _cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup(HOLD_BACK).await;
    let mut gw = spawn(&config, &[]).await;
    let ids = send_each(&gw.url, "term", 30, true).await;
    kill(Pid::from_raw(gw.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // No restart: the drain itself must have shipped them.
    let store = store_at(&url).await;
    assert_eq!(store.count_usage().await.unwrap(), 30);
    assert_ledger_has_each_once(&store, &ids).await;
}

/// A PostgreSQL that stops answering (SIGSTOP, connections left open) does not hang the
/// shutdown: at SIGTERM the process exits within `shutdown_timeout` (and a little for the
/// registry), and what it could not ship is shipped by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_database_exits_within_the_bound_and_ships_at_the_next_start() {
    let Setup {
        cluster,
        url,
        config,
        dir: _dir,
        _up,
    } = setup(HOLD_BACK).await;
    let env = [
        ("LLM_GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "2s"),
        ("LLM_GATEWAY__STORAGE__QUERY_TIMEOUT", "1s"),
        ("LLM_GATEWAY__STORAGE__HEARTBEAT_INTERVAL", "200ms"),
        ("LLM_GATEWAY__AUTH__REFRESH_INTERVAL", "200ms"),
    ];
    let mut gw = spawn(&config, &env).await;
    let ids = send_each(&gw.url, "hung", 10, true).await;
    cluster.freeze();
    // Let the heartbeat and key refresh get stuck on the frozen server first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h: serde_json::Value = common::get_json(format!("{}/health", gw.url)).await;
        if h["database"]["state"] == "down" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen database never showed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    kill(Pid::from_raw(gw.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "still running 15 s after SIGTERM with the database hung"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    eprintln!("exit after SIGTERM with the database hung: {took:?}");
    assert!(
        took < Duration::from_millis(4000),
        "exit took {took:?}: shutdown_timeout 2 s, plus at most 1 s for the registry and the \
         pool (and some slack for a loaded machine)"
    );
    cluster.thaw();
    let store = store_at(&url).await;
    let _gw = spawn(&config, &[("LLM_GATEWAY__LEDGER__FLUSH_INTERVAL", "50ms")]).await;
    assert_ledger_has_each_once(&store, &ids).await;
}

/// In-process gateway on `url` with the given extra TOML (auth, ledger).
async fn in_process(
    url: &str,
    extra: &str,
) -> (
    common::Gateway,
    llm_gateway::mock::MockUpstream,
    tempfile::TempDir,
) {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[storage]\nstate_dir = {:?}\ndatabase_url = {url:?}\nconnect_timeout = \"1s\"\n{extra}\n",
        config_for_url(&up.base_url()),
        dir.path().to_str().unwrap()
    );
    (common::Gateway::start(&toml).await, up, dir)
}

async fn post(gw: &common::Gateway, key: Option<&str>) -> reqwest::Response {
    let mut r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(false));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_keep_working_while_the_database_is_down() {
    let cluster = PgCluster::start();
    let url = cluster.create_database("keys");
    let store = store_at(&url).await;
    let key = llm_gateway::testing::generate_key("k", None, Default::default(), None);
    store.insert_key(&key.row).await.unwrap();
    store.close().await;
    let (gw, _up, _dir) =
        in_process(&url, "[auth]\nmode = \"keys\"\nrefresh_interval = \"50ms\"").await;
    assert_eq!(post(&gw, Some(&key.secret)).await.status(), 200);
    cluster.stop();
    // Several reloads fail while the server is down; the last table stays in use.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = common::metrics_text(&gw).await;
        if metric(&m, "llm_gateway_key_refresh_failures_total").unwrap_or(0.0) >= 3.0 {
            break;
        }
        assert!(Instant::now() < deadline, "reloads never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&gw, Some(&key.secret)).await.status(), 200);
    assert_eq!(
        post(&gw, Some("sk-lgw-0000000000000000-00")).await.status(),
        401
    );
    cluster.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_rejects_requests_until_the_database_is_back() {
    let cluster = PgCluster::start();
    let url = cluster.create_database("full");
    let (gw, _up, _dir) = in_process(
        &url,
        "[auth]\nmode = \"open\"\n[ledger]\nflush_interval = \"50ms\"\nsegment_bytes = 4096\nspool_max_bytes = 8192",
    )
    .await;
    cluster.stop();
    let mut served = 0;
    let rejected = loop {
        let r = post(&gw, None).await;
        if r.status() == 503 {
            break r;
        }
        assert_eq!(r.status(), 200);
        served += 1;
        assert!(served < 100, "an 8 KiB spool never filled");
    };
    assert_eq!(rejected.headers()["retry-after"], "1");
    let e: serde_json::Value = rejected.json().await.unwrap();
    assert_eq!(e["error"]["code"], "ledger_full");
    let ready = client().get(gw.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let m = common::metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "llm_gateway_ledger_records_dropped_total"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "llm_gateway_requests_shed_total{reason=\"ledger_full\"}"
        ),
        Some(1.0),
        "{m}"
    );

    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while post(&gw, None).await.status() != 200 {
        assert!(Instant::now() < deadline, "never accepted requests again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every served request is recorded: those from before the spool filled up, and the one
    // accepted after. Refused ones (503) are not.
    let store = store_at(&url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = store.count_usage().await.unwrap();
        if n == served + 1 {
            break;
        }
        assert!(
            n <= served + 1,
            "{n} rows for {} served requests",
            served + 1
        );
        assert!(
            Instant::now() < deadline,
            "{n} rows for {} served requests",
            served + 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
