//! Usage ledger: one record per request, appended to a local write-ahead spool on the
//! request path (no database wait) and shipped to the database in batches by one task.

pub mod spool;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{LedgerConfig, SpoolFullPolicy};
use crate::metrics::LedgerMetrics;
use crate::store::usage::UsageRecord;
use crate::store::{Store, now_ms};
use spool::{Position, Spool, SpoolConfig, SpoolError};

/// Room kept free in a `reject`-policy spool so that requests admitted while it filled up
/// can still write their records.
const ADMISSION_MARGIN: u64 = 1 << 20;
/// Longest pause between shipping attempts while the database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often old rows are deleted when `ledger.retention` is set.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Retention statements per shipper round (each deletes up to a few thousand rows).
const RETENTION_BATCHES_PER_ROUND: u32 = 10;

/// The spool and what the request path needs to append to it.
#[derive(Debug)]
pub struct Ledger {
    spool: Spool,
    config: LedgerConfig,
    metrics: LedgerMetrics,
    pending: AtomicUsize,
    wake: Notify,
    db_ok: AtomicBool,
    /// End of the last read that found no records, once committed.
    last_empty_end: Mutex<Option<Position>>,
    /// Where records the database refuses are kept.
    rejected: std::path::PathBuf,
}

impl Ledger {
    /// Opens the spool in `state_dir/spool` (replaying what an earlier run left).
    pub fn open(
        config: &LedgerConfig,
        state_dir: &Path,
        metrics: LedgerMetrics,
    ) -> Result<Self, SpoolError> {
        let spool = Spool::open(SpoolConfig {
            dir: state_dir.join("spool"),
            segment_bytes: config.segment_bytes,
            max_bytes: config.spool_max_bytes,
        })?;
        metrics.spool_bytes.set(gauge(spool.bytes()));
        Ok(Self {
            spool,
            config: config.clone(),
            metrics,
            pending: AtomicUsize::new(0),
            wake: Notify::new(),
            db_ok: AtomicBool::new(true),
            last_empty_end: Mutex::new(None),
            rejected: state_dir.join("rejected.jsonl"),
        })
    }

    /// Whether new requests may be admitted: with `on_full = "reject"`, not while the
    /// spool is (nearly) full.
    pub fn accepting(&self) -> bool {
        self.config.on_full == SpoolFullPolicy::Drop
            || self.spool.bytes() + ADMISSION_MARGIN.min(self.config.spool_max_bytes / 4)
                < self.config.spool_max_bytes
    }

    /// Appends one record (a single write to the spool file; survives a crash of the
    /// process as soon as this returns).
    pub fn append(&self, record: &UsageRecord) {
        let bytes = match serde_json::to_vec(record) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode usage record");
                self.metrics.dropped.inc();
                return;
            }
        };
        match self.spool.append(&bytes) {
            Ok(()) => {
                self.metrics.spooled.inc();
                self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
                if self.pending.fetch_add(1, Ordering::Relaxed) + 1 >= self.config.batch_size {
                    self.wake.notify_one();
                }
            }
            Err(e) => {
                self.metrics.dropped.inc();
                tracing::error!(error = %e, request_id = %record.request_id, "usage record dropped");
            }
        }
    }

    /// Unshipped bytes in the spool.
    pub fn spool_bytes(&self) -> u64 {
        self.spool.bytes()
    }

    /// Whether the last shipping attempt reached the database.
    pub fn database_ok(&self) -> bool {
        self.db_ok.load(Ordering::Relaxed)
    }

    /// Age of the oldest unshipped record as last measured (ms).
    pub fn lag_ms(&self) -> i64 {
        self.metrics.lag_ms.get()
    }

    /// Ships complete records from the spool: until a read finds none (`until_empty`), or
    /// until a batch comes back short of `batch_size` (the reader caught up with the
    /// writers), so that under steady load the shipper still gets back to syncing and
    /// retention. Returns Err after the first failed insert (the records stay and are
    /// retried).
    async fn ship_all(&self, store: &Store, until_empty: bool) -> Result<(), ()> {
        loop {
            self.pending.store(0, Ordering::Relaxed);
            let batch = match self.spool.read_batch(None, self.config.batch_size) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the usage spool");
                    return Err(());
                }
            };
            self.metrics.corrupt_frames.inc_by(
                self.spool
                    .corrupt_frames()
                    .saturating_sub(self.metrics.corrupt_frames.get()),
            );
            if batch.records.is_empty() {
                // The read may still have moved past corrupt bytes or drained segments:
                // commit that, so their space is freed, but only when it moved (a commit
                // writes and syncs the cursor file).
                let mut last = self
                    .last_empty_end
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if *last != Some(batch.end) {
                    if let Err(e) = self.spool.commit(batch.end) {
                        tracing::error!(error = %e, "cannot trim the usage spool");
                        return Err(());
                    }
                    *last = Some(batch.end);
                }
                self.metrics.lag_ms.set(0);
                self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
                return Ok(());
            }
            // The payloads are the records' JSON: joined into one array and unpacked by the
            // database. Each is only checked to be JSON, not decoded.
            let mut array =
                Vec::with_capacity(batch.records.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
            array.push(b'[');
            let mut shipped = 0usize;
            for raw in &batch.records {
                if serde_json::from_slice::<&serde_json::value::RawValue>(raw).is_err() {
                    // Checksummed but not JSON: written by an incompatible version.
                    tracing::error!("undecodable usage record skipped");
                    self.metrics.dropped.inc();
                    continue;
                }
                if shipped > 0 {
                    array.push(b',');
                }
                array.extend_from_slice(raw);
                shipped += 1;
            }
            array.push(b']');
            if let Some(oldest) = batch
                .records
                .first()
                .and_then(|r| serde_json::from_slice::<TsOnly>(r).ok())
            {
                self.metrics.lag_ms.set((now_ms() - oldest.ts_ms).max(0));
            }
            let array = String::from_utf8_lossy(&array);
            let mut result = store.insert_usage_json(&array).await;
            if result.is_err() && store.ping().await.is_ok() {
                // The database is up but refused the batch: some record in it is bad.
                result = self.insert_one_by_one(store, &batch.records).await;
            }
            match result {
                Ok(new) => {
                    self.db_ok.store(true, Ordering::Relaxed);
                    self.metrics.written.inc_by(new);
                    if let Err(e) = self.spool.commit(batch.end) {
                        tracing::error!(error = %e, "cannot trim the usage spool");
                        return Err(());
                    }
                    self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
                    if !until_empty && batch.records.len() < self.config.batch_size {
                        return Ok(());
                    }
                }
                Err(e) => {
                    self.db_ok.store(false, Ordering::Relaxed);
                    self.metrics.write_failures.inc();
                    tracing::warn!(error = %e, records = shipped, "usage batch not written; kept in the spool");
                    return Err(());
                }
            }
        }
    }

    /// Inserts records one at a time; one the database refuses while it answers is set
    /// aside in `rejected.jsonl` in the state directory (and counted as dropped), so a
    /// single bad record cannot stop the ledger. Err when the database stops answering.
    async fn insert_one_by_one(
        &self,
        store: &Store,
        records: &[Vec<u8>],
    ) -> Result<u64, crate::store::StoreError> {
        let mut new = 0;
        for raw in records {
            let one = format!("[{}]", String::from_utf8_lossy(raw));
            match store.insert_usage_json(&one).await {
                Ok(n) => new += n,
                Err(e) => {
                    store.ping().await?;
                    tracing::error!(error = %e, "usage record refused by the database; set aside");
                    self.metrics.dropped.inc();
                    let line = [raw.as_slice(), b"\n"].concat();
                    let written = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.rejected)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, &line));
                    if let Err(e) = written {
                        tracing::error!(error = %e, path = %self.rejected.display(), "cannot keep the refused record");
                    }
                }
            }
        }
        Ok(new)
    }

    /// The shipper: ships whenever a batch is full or `flush_interval` passed, backs off
    /// while the database fails, syncs the spool, applies retention. When `stop` fires it
    /// ships what is left (for up to `drain_timeout`) and returns; what could not be
    /// shipped stays in the spool for the next start.
    pub async fn run_shipper(
        self: Arc<Self>,
        store: Store,
        stop: CancellationToken,
        drain_timeout: Duration,
    ) {
        let mut failures = 0u32;
        let mut last_retention: Option<tokio::time::Instant> = None;
        let mut last_sync = tokio::time::Instant::now();
        loop {
            let wait = if failures == 0 {
                self.config.flush_interval
            } else {
                (self.config.flush_interval * 2u32.saturating_pow(failures.min(8))).min(MAX_BACKOFF)
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified(), if failures == 0 => {}
                () = tokio::time::sleep(wait) => {}
            }
            match self.ship_all(&store, false).await {
                Ok(()) => failures = 0,
                Err(()) => failures = failures.saturating_add(1),
            }
            if last_sync.elapsed() >= self.config.flush_interval {
                last_sync = tokio::time::Instant::now();
                // fdatasync can take milliseconds: not on a runtime worker.
                let me = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || me.spool.sync()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot sync the usage spool"),
                    Err(e) => tracing::warn!(error = %e, "spool sync task failed"),
                }
            }
            if !self.config.retention.is_zero()
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                last_retention = Some(tokio::time::Instant::now());
                let cutoff =
                    now_ms() - i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
                // A bounded amount per round, so a large backlog neither delays shipping
                // nor shutdown; the next round goes on where this one stopped.
                match store
                    .delete_usage_before(cutoff, RETENTION_BATCHES_PER_ROUND)
                    .await
                {
                    Ok((n, done)) => {
                        if n > 0 {
                            tracing::info!(deleted = n, "usage retention applied");
                        }
                        if !done {
                            last_retention = None;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "usage retention failed"),
                }
            }
        }
        let drained = tokio::time::timeout(drain_timeout, async {
            while self.ship_all(&store, true).await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if let Err(e) = self.spool.sync() {
            tracing::warn!(error = %e, "cannot sync the usage spool");
        }
        match drained {
            Ok(()) => tracing::info!("usage ledger flushed"),
            Err(_) => tracing::warn!(
                spool_bytes = self.spool.bytes(),
                "usage ledger not fully flushed; the rest ships at the next start"
            ),
        }
    }
}

/// The one field read from a spooled record: its time, for the lag gauge.
#[derive(serde::Deserialize)]
struct TsOnly {
    ts_ms: i64,
}

fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
