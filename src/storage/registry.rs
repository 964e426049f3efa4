//! Instance registry: this gateway's row (host, version, start, heartbeat, config hash),
//! and how many instances share the database, which divides per-key rate limits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::periodic::{Cut, Periodic};
use crate::runtime::state::AppState;
use crate::storage::database::instances::InstanceRow;
use crate::storage::database::{Store, StoreError, now_ms};

/// Heartbeats missed before an instance no longer counts as live.
const MISSED_BEATS: u32 = 3;

/// Short hash of the configuration as loaded (secret references, never secret values).
pub fn config_hash(config: &Config) -> String {
    let digest = Sha256::digest(format!("{config:?}").as_bytes());
    hex::encode(&digest[..6])
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Records this instance as started, retiring a predecessor that died on this host in the
/// same state directory (call only while holding that directory's spool lock).
pub async fn register(store: &Store, id: &str, config: &Config) -> Result<(), StoreError> {
    let now = now_ms();
    let state_dir = config.storage.state_dir();
    let state_dir = std::fs::canonicalize(&state_dir).unwrap_or(state_dir);
    store
        .register_instance(&InstanceRow {
            id: id.to_owned(),
            host: host_name(),
            pid: i64::from(std::process::id()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_hash: config_hash(config),
            started_at_ms: now,
            heartbeat_at_ms: now,
            stopped_at_ms: None,
            state_dir: Some(state_dir.display().to_string()),
        })
        .await
}

/// Beats every `interval` until `stop` (each beat bounded by `storage.query_timeout`), and
/// keeps `state`'s live-instance count current.
pub async fn heartbeat(
    state: Arc<AppState>,
    store: Store,
    interval: Duration,
    stop: CancellationToken,
) {
    let stale_ms = i64::try_from((interval * MISSED_BEATS).as_millis()).unwrap_or(i64::MAX);
    let task = Periodic::new("registry heartbeat", stop);
    loop {
        let beat = async {
            // The hash of the configuration in effect, which a reload may have changed.
            let config_hash = state.current().config_hash.clone();
            store.heartbeat(&state.instance_id, &config_hash).await?;
            store.live_instances(now_ms() - stale_ms).await
        };
        let timeout = state.current().config.storage.query_timeout;
        match task.step(timeout, beat).await {
            Ok(Ok(n)) => {
                state.set_live_instances(usize::try_from(n).unwrap_or(1));
                state.db_up.store(true, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                state.db_up.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "instance heartbeat failed");
            }
            Err(Cut::TimedOut) => state.db_up.store(false, Ordering::Relaxed),
            Err(Cut::Stopped) => return,
        }
        if !task.pause(interval, None).await {
            return;
        }
    }
}
