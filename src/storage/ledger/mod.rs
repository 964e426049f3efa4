//! Usage ledger: one record per request, appended to a local write-ahead spool on the
//! request path (no database wait) and shipped to the database in batches by one task
//! (`shipper.rs`). A record leaves the spool only once it is in the database, or once the
//! database has refused that very record (it is then kept in `rejected.jsonl`).
//!
//! When the spool cannot take a record (full, or the disk refuses the write), the record is
//! held in a bounded queue in memory and written again by the shipper; until that succeeds,
//! with `on_full = "reject"`, no new request is admitted (503, `/ready` 503).

mod record;
mod shipper;
pub(crate) mod spool;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::config::{LedgerConfig, SpoolFullPolicy};
use crate::runtime::metrics::LedgerMetrics;
use crate::storage::database::usage_rows::UsageRecord;
use spool::{Position, Spool, SpoolConfig, SpoolError};

/// Room kept free in a `reject`-policy spool so that requests admitted while it filled up
/// can still write their records.
const ADMISSION_MARGIN: u64 = 1 << 20;
/// Most bytes of records held in memory while the spool cannot take them; beyond it a
/// record is lost (and counted as dropped).
const HELD_MAX_BYTES: usize = 8 << 20;
/// Bytes reserved for one encoded record (a typical one takes about 150).
const RECORD_CAPACITY: usize = 256;

/// The spool and what the request path needs to append to it.
#[derive(Debug)]
pub struct Ledger {
    spool: Spool,
    config: LedgerConfig,
    metrics: LedgerMetrics,
    pending: AtomicUsize,
    wake: Notify,
    db_ok: AtomicBool,
    /// Age of the oldest unshipped record as last measured, in ms (for `/health`; the
    /// metric is in seconds).
    lag_ms: AtomicI64,
    /// The last write to the spool failed (full disk, I/O error, read-only directory).
    unwritable: AtomicBool,
    /// Records the spool could not take yet (`reject` policy), oldest first.
    held: Mutex<Held>,
    /// End of the last read that found no records, once committed.
    last_empty_end: Mutex<Option<Position>>,
    /// Where records the database refuses are kept.
    rejected: std::path::PathBuf,
}

/// Why the ledger refuses new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The spool holds `spool_max_bytes` of unshipped records (the database is behind).
    Full,
    /// The last write to the spool failed (full disk, I/O error, read-only directory).
    Unwritable,
}

impl Refusal {
    /// The reason `/ready` gives.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Full => "usage spool full",
            Self::Unwritable => "usage spool unwritable",
        }
    }
}

/// Encoded records waiting for room in the spool.
#[derive(Debug, Default)]
struct Held {
    records: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// Which kind of spool frame a record is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// The record of a finished request.
    Final,
    /// A stream's provisional record, written as its first byte goes out; the final record
    /// (same id) replaces it in the database.
    Begin,
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
        metrics.spool_max_bytes.set(gauge(config.spool_max_bytes));
        Ok(Self {
            spool,
            config: config.clone(),
            metrics,
            pending: AtomicUsize::new(0),
            wake: Notify::new(),
            db_ok: AtomicBool::new(true),
            lag_ms: AtomicI64::new(0),
            unwritable: AtomicBool::new(false),
            held: Mutex::new(Held::default()),
            last_empty_end: Mutex::new(None),
            rejected: state_dir.join("rejected.jsonl"),
        })
    }

    /// Whether new requests may be admitted: with `on_full = "reject"`, not while the spool
    /// is (nearly) full, cannot be written, or still holds back records it could not take.
    pub fn admission(&self) -> Result<(), Refusal> {
        if self.config.on_full == SpoolFullPolicy::Drop {
            return Ok(());
        }
        if self.unwritable.load(Ordering::Relaxed) {
            return Err(Refusal::Unwritable);
        }
        let margin = ADMISSION_MARGIN.min(self.config.spool_max_bytes / 4);
        if !lock(&self.held).records.is_empty()
            || self.spool.bytes() + margin >= self.config.spool_max_bytes
        {
            return Err(Refusal::Full);
        }
        Ok(())
    }

    /// `admission().is_ok()`.
    pub fn accepting(&self) -> bool {
        self.admission().is_ok()
    }

    /// Whether the last write to the spool succeeded and nothing waits in memory.
    pub fn spool_writable(&self) -> bool {
        !self.unwritable.load(Ordering::Relaxed) && lock(&self.held).records.is_empty()
    }

    /// Records waiting in memory for room in the spool.
    pub fn held_records(&self) -> usize {
        lock(&self.held).records.len()
    }

    /// Appends a finished request's record (a single write to the spool file; it survives a
    /// crash of the process as soon as this returns). When the spool cannot take it: held in
    /// memory and retried (`reject`), or dropped and counted (`drop`).
    pub fn append(&self, record: &UsageRecord<&str>) {
        self.write(record, Frame::Final);
    }

    /// Appends a stream's provisional record when its first byte goes out: if the process
    /// dies before the stream ends, this is the row that remains (outcome `interrupted`).
    /// Best effort: one that cannot be written is not held.
    pub fn append_begin(&self, record: &UsageRecord<&str>) {
        self.write(record, Frame::Begin);
    }

    fn write(&self, record: &UsageRecord<&str>, frame: Frame) {
        let mut bytes = Vec::with_capacity(RECORD_CAPACITY);
        if let Err(e) = record::encode(record, &mut bytes) {
            tracing::error!(error = %e, "cannot encode usage record");
            if frame == Frame::Final {
                self.metrics.dropped.inc();
            }
            return;
        }
        match self.spool.append(&bytes) {
            Ok(()) => {
                self.unwritable.store(false, Ordering::Relaxed);
                if frame == Frame::Final {
                    self.metrics.spooled.inc();
                }
                self.appended();
            }
            Err(e) => {
                if matches!(e, SpoolError::Io { .. }) {
                    self.unwritable.store(true, Ordering::Relaxed);
                }
                match frame {
                    Frame::Begin => {
                        tracing::warn!(error = %e, request_id = %record.request_id, "stream start not recorded in the spool");
                    }
                    Frame::Final => self.hold_or_drop(bytes, &e, record.request_id),
                }
            }
        }
    }

    fn appended(&self) {
        self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
        if self.pending.fetch_add(1, Ordering::Relaxed) + 1 >= self.config.batch_size {
            self.wake.notify_one();
        }
    }

    /// A record the spool refused: kept in memory for the shipper to write again under the
    /// `reject` policy (up to `HELD_MAX_BYTES`), otherwise counted as dropped.
    fn hold_or_drop(&self, bytes: Vec<u8>, error: &SpoolError, request_id: &str) {
        if self.config.on_full == SpoolFullPolicy::Reject {
            let mut held = lock(&self.held);
            if held.bytes + bytes.len() <= HELD_MAX_BYTES {
                held.bytes += bytes.len();
                held.records.push_back(bytes);
                drop(held);
                tracing::warn!(error = %error, request_id, "usage spool cannot take a record; held in memory, new requests refused");
                return;
            }
        }
        self.metrics.dropped.inc();
        tracing::error!(error = %error, request_id, "usage record dropped");
    }

    /// Writes held records to the spool, oldest first, until one fails. Returns whether none
    /// is left.
    fn flush_held(&self) -> bool {
        let mut held = lock(&self.held);
        while let Some(bytes) = held.records.front() {
            if let Err(e) = self.spool.append(bytes) {
                if matches!(e, SpoolError::Io { .. }) {
                    self.unwritable.store(true, Ordering::Relaxed);
                }
                return false;
            }
            self.unwritable.store(false, Ordering::Relaxed);
            self.metrics.spooled.inc();
            if let Some(done) = held.records.pop_front() {
                held.bytes -= done.len();
            }
            self.appended();
        }
        true
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
        self.lag_ms.load(Ordering::Relaxed)
    }

    /// Records the age of the oldest unshipped record (0 when caught up).
    fn set_lag_ms(&self, ms: i64) {
        let ms = ms.max(0);
        self.lag_ms.store(ms, Ordering::Relaxed);
        self.metrics.lag_seconds.set(ms as f64 / 1000.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
