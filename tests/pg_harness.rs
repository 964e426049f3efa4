//! The PostgreSQL test harness (`common::pg`): fresh databases are isolated, an owned cluster
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "tests: panics are failures, and helpers spawn test servers"
)]
//! survives stop/restart and is removed on drop, and the shared cluster is removed when the
//! test process is killed.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pg::{self, PgCluster, fresh_database};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// Set for the child process of `shared_cluster_is_removed_when_the_test_process_is_killed`.
const HELPER_ENV: &str = "LLM_GATEWAY_PG_HARNESS_HELPER";
const HELPER_TEST: &str = "helper_holds_the_shared_cluster_until_killed";

async fn select_one(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT 1")
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn table_exists(conn: &mut PgConnection, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Live processes (not this one) with `needle` in their command line, as `(pid, comm)`: the
/// postmaster (`postgres`, started with `-D <data dir>`) and the cleanup supervisor (`sh`).
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_str().unwrap().as_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (pid != std::process::id() && cmdline.windows(needle.len()).any(|w| w == needle))
                .then(|| (pid, comm.trim().to_owned()))
        })
        .collect()
}

/// The postmaster serving `data`, if one is running.
fn postmaster_of(data: &Path) -> Option<u32> {
    processes_mentioning(data)
        .into_iter()
        .find_map(|(pid, comm)| (comm == "postgres").then_some(pid))
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn urls_have_the_form_sqlx_accepts() {
    let url = pg::socket_url(Path::new("/tmp/llmgw-pg-x"), "some_db");
    assert_eq!(
        url,
        "postgres:///some_db?host=/tmp/llmgw-pg-x&user=postgres"
    );
    let opts = PgConnectOptions::from_str(&url).unwrap();
    assert_eq!(opts.get_socket(), Some(&PathBuf::from("/tmp/llmgw-pg-x")));
    assert_eq!(opts.get_username(), "postgres");
    assert_eq!(opts.get_database(), Some("some_db"));
    // The userinfo-with-empty-host form is rejected by the `url` crate under sqlx.
    let err = PgConnectOptions::from_str("postgres://postgres@/some_db?host=/tmp/llmgw-pg-x")
        .unwrap_err();
    assert!(err.to_string().contains("empty host"), "{err}");
}

#[tokio::test]
async fn fresh_databases_are_distinct_and_isolated() {
    let a = fresh_database();
    let b = fresh_database();
    assert_ne!(a, b);
    let mut ca = pg::connect(&a).await;
    let mut cb = pg::connect(&b).await;
    assert_eq!(select_one(&mut ca).await, 1);
    assert_eq!(select_one(&mut cb).await, 1);
    let name_a: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut ca)
        .await
        .unwrap();
    let name_b: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut cb)
        .await
        .unwrap();
    assert_ne!(name_a, name_b);

    assert!(!table_exists(&mut ca, "only_in_a").await);
    sqlx::query("CREATE TABLE only_in_a (id int)")
        .execute(&mut ca)
        .await
        .unwrap();
    assert!(table_exists(&mut ca, "only_in_a").await);
    assert!(!table_exists(&mut cb, "only_in_a").await);
}

#[tokio::test]
async fn cluster_keeps_data_across_stop_and_restart_and_is_removed_on_drop() {
    let pg = PgCluster::start();
    let url = pg.create_database("app");
    let mut conn = pg::connect(&url).await;
    sqlx::query("CREATE TABLE kv (k text PRIMARY KEY, v int NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO kv VALUES ('answer', 42)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    pg.stop();
    let attempt = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url))
        .await
        .expect("a connection attempt to a stopped server returns");
    assert!(attempt.is_err(), "connected to a stopped server");

    pg.restart();
    let mut conn = pg::connect(&url).await;
    let v: i32 = sqlx::query_scalar("SELECT v FROM kv WHERE k = 'answer'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 42);
    conn.close().await.unwrap();

    let dir = pg.socket_dir().to_owned();
    let data = pg.data_dir().to_owned();
    let pid = pg.postmaster_pid().expect("server is running");
    assert_eq!(postmaster_of(&data), Some(pid));
    drop(pg);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert_eq!(processes_mentioning(&data), [], "processes outlived drop");
}

/// Run by the next test in a child process: holds the shared cluster until killed.
#[test]
#[ignore = "helper process for shared_cluster_is_removed_when_the_test_process_is_killed"]
fn helper_holds_the_shared_cluster_until_killed() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let url = fresh_database();
    let cluster = pg::shared_cluster();
    println!(
        "PG_CLUSTER_DIR={} PID={}",
        cluster.socket_dir().display(),
        cluster.postmaster_pid().unwrap()
    );
    assert!(url.contains(cluster.socket_dir().to_str().unwrap()));
    // Block until the parent kills us (or goes away and closes our stdin).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn shared_cluster_is_removed_when_the_test_process_is_killed() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([HELPER_TEST, "--exact", "--ignored", "--nocapture"])
        .env(HELPER_ENV, "1")
        .env_remove(pg::DATABASE_URL_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("PG_CLUSTER_DIR=") {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    let Ok(line) = line else {
        let _ = child.kill();
        panic!("helper did not report its cluster: {:?}", child.wait());
    };
    let (dir, pid) = line.split_once(" PID=").unwrap();
    let dir = PathBuf::from(dir);
    let pid: u32 = pid.parse().unwrap();
    let data = dir.join("data");
    assert!(dir.is_dir());
    assert_eq!(postmaster_of(&data), Some(pid), "postmaster is running");

    child.kill().unwrap(); // SIGKILL: no destructor, no atexit
    child.wait().unwrap();

    wait_until(
        "the killed process's cluster to be removed",
        Duration::from_secs(30),
        || !dir.exists() && processes_mentioning(&data).is_empty(),
    );
}
