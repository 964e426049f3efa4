//! The shipper: moves records from the spool into the database in batches, and trims the
//! spool only behind what the database has taken (or has refused for the record's own
//! content, see `StoreError::kind`). Also syncs the spool and applies retention.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use serde_json::value::RawValue;

use super::record::{self, NotARecord};
use super::spool::Batch;
use super::{Ledger, gauge, lock};
use crate::runtime::periodic::{Cut, Periodic};
use crate::storage::database::error::FailureKind;
use crate::storage::database::usage_rows::{Outcome, UsageRecord};
use crate::storage::database::{Store, StoreError, now_ms};

/// Longest pause between shipping attempts while the database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often old rows are deleted when `ledger.retention` is set.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Retention statements per shipper round (each deletes up to a few thousand rows).
const RETENTION_BATCHES_PER_ROUND: u32 = 10;

/// Why a shipping round stopped early; the records stay in the spool for the next one.
#[derive(Debug)]
struct Stalled;

impl Ledger {
    /// Ships complete records from the spool: until a read finds none (`until_empty`), or
    /// until a batch comes back short of `batch_size` (the reader caught up with the
    /// writers), so that under steady load the shipper still gets back to syncing and
    /// retention. Stops at the first failure the database may recover from.
    async fn ship_all(
        self: &Arc<Self>,
        store: &Store,
        until_empty: bool,
        timeout: Duration,
    ) -> Result<(), Stalled> {
        loop {
            self.pending.store(0, Ordering::Relaxed);
            let size = self.config.batch_size;
            let batch = self
                .off_workers(move |l| l.spool.read_batch(None, size))
                .await?
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot read the usage spool");
                    Stalled
                })?;
            self.metrics.corrupt_frames.inc_by(
                self.spool
                    .corrupt_frames()
                    .saturating_sub(self.metrics.corrupt_frames.get()),
            );
            if batch.records.is_empty() {
                // The read may still have moved past corrupt bytes or drained segments:
                // commit that, so their space is freed, but only when it moved (a commit
                // writes and syncs the cursor file).
                if *lock(&self.last_empty_end) != Some(batch.end) {
                    self.commit(batch.end).await?;
                    *lock(&self.last_empty_end) = Some(batch.end);
                }
                self.set_lag_ms(0);
                self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
                return Ok(());
            }
            if let Some(oldest) = batch.records.first().and_then(|r| record::ts_ms(r)) {
                self.set_lag_ms(now_ms() - oldest);
            }
            let (written, unreadable) = insert_batch(store, &batch.records, timeout).await;
            match written {
                Ok(new) => {
                    self.metrics.written.inc_by(new);
                }
                Err(e) if e.kind() == FailureKind::BadRecord => {
                    tracing::warn!(error = %e, "usage batch refused; inserting its records one by one");
                    self.ship_one_by_one(store, &batch, timeout).await?;
                }
                Err(e) => return Err(self.database_failed(&e, batch.records.len())),
            }
            self.db_ok.store(true, Ordering::Relaxed);
            self.commit(batch.end).await?;
            // Counted once the batch is committed, so a retried batch does not count again.
            self.metrics.dropped.inc_by(unreadable);
            self.metrics.spool_bytes.set(gauge(self.spool.bytes()));
            if !until_empty && batch.records.len() < self.config.batch_size {
                return Ok(());
            }
        }
    }

    /// Commits the spool up to `pos` (a cursor write, a rename, maybe unlinks).
    async fn commit(self: &Arc<Self>, pos: super::spool::Position) -> Result<(), Stalled> {
        self.off_workers(move |l| l.spool.commit(pos))
            .await?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot trim the usage spool");
                Stalled
            })
    }

    /// Writes records held in memory back into the spool (off the async workers); whether
    /// none is left.
    async fn rewrite_held(self: &Arc<Self>) -> bool {
        if self.held_records() == 0 {
            return true;
        }
        self.off_workers(Ledger::flush_held).await.unwrap_or(false)
    }

    /// Runs spool file work on tokio's blocking pool, not on an async worker that requests
    /// need.
    async fn off_workers<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Ledger) -> T + Send + 'static,
    ) -> Result<T, Stalled> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&me))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "spool task failed");
                Stalled
            })
    }

    fn database_failed(&self, error: &StoreError, records: usize) -> Stalled {
        self.db_ok.store(false, Ordering::Relaxed);
        self.metrics.write_failures.inc();
        tracing::warn!(error = %error, records, "usage batch not written; kept in the spool");
        Stalled
    }

    /// Inserts a refused batch's records one at a time. One the database refuses for its
    /// content is appended to `rejected.jsonl` (and counted as dropped), and the spool is
    /// committed just past it at once, so it is never set aside twice. Any other failure
    /// stops the round with the rest kept.
    async fn ship_one_by_one(
        self: &Arc<Self>,
        store: &Store,
        batch: &Batch,
        timeout: Duration,
    ) -> Result<(), Stalled> {
        for (raw, end) in batch.records.iter().zip(&batch.ends) {
            let (one, unreadable) = json_array(std::iter::once(raw.as_slice()));
            if unreadable > 0 {
                continue; // counted with the batch
            }
            match bounded(timeout, store.insert_usage_json(&one)).await {
                Ok(n) => {
                    self.metrics.written.inc_by(n);
                }
                Err(e) if e.kind() == FailureKind::BadRecord => {
                    tracing::error!(error = %e, "usage record refused by the database; set aside in rejected.jsonl");
                    self.set_aside(raw).await?;
                    self.metrics.dropped.inc();
                    self.commit(*end).await?;
                }
                Err(e) => return Err(self.database_failed(&e, 1)),
            }
        }
        Ok(())
    }

    /// Appends a refused record to `rejected.jsonl`, off the async workers. When that file
    /// cannot be written either, the record stays in the spool.
    async fn set_aside(&self, raw: &[u8]) -> Result<(), Stalled> {
        let path = self.rejected.clone();
        // A JSON line whatever the spool's layout (one that could not be read would not
        // have reached the database to be refused).
        let mut line = record::to_json(raw).unwrap_or_else(|| raw.to_vec());
        line.push(b'\n');
        let written = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            std::io::Write::write_all(&mut file, &line)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        written.map_err(|e| {
            tracing::error!(error = %e, path = %self.rejected.display(), "cannot keep the refused record; it stays in the spool");
            Stalled
        })
    }

    /// The shipper: ships whenever a batch is full or `flush_interval` passed, backs off
    /// while the database fails, writes held records back into the spool, syncs the spool,
    /// applies retention; each database step is bounded by `query_timeout`. When `stop`
    /// fires it ships what is left until that is done or `hard_stop` fires, and returns;
    /// what could not be shipped stays in the spool for the next start.
    pub async fn run_shipper(
        self: Arc<Self>,
        store: Store,
        query_timeout: Duration,
        stop: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let task = Periodic::new("ledger shipper", stop);
        let mut failures = 0u32;
        let mut last_retention: Option<tokio::time::Instant> = None;
        let mut last_sync = tokio::time::Instant::now();
        loop {
            let wait = if failures == 0 {
                self.config.flush_interval
            } else {
                self.config
                    .flush_interval
                    .saturating_mul(2u32.saturating_pow(failures.min(8)))
                    .min(MAX_BACKOFF)
            };
            let wake = (failures == 0).then_some(&self.wake);
            if !task.pause(wait, wake).await {
                break;
            }
            self.rewrite_held().await;
            match task
                .unless_stopped(self.ship_all(&store, false, query_timeout))
                .await
            {
                Ok(Ok(())) => failures = 0,
                Ok(Err(Stalled)) | Err(Cut::TimedOut) => failures = failures.saturating_add(1),
                Err(Cut::Stopped) => break,
            }
            // Shipping may have made room for what is held.
            self.rewrite_held().await;
            if last_sync.elapsed() >= self.config.flush_interval {
                last_sync = tokio::time::Instant::now();
                self.sync().await;
            }
            if !self.config.retention.is_zero()
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                last_retention = Some(tokio::time::Instant::now());
                let cutoff =
                    now_ms() - i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
                // A bounded amount per round, so a large backlog neither delays shipping
                // nor shutdown; the next round goes on where this one stopped.
                let deleted = task
                    .step(
                        query_timeout,
                        store.delete_usage_before(cutoff, RETENTION_BATCHES_PER_ROUND),
                    )
                    .await;
                match deleted {
                    Ok(Ok((n, done))) => {
                        if n > 0 {
                            tracing::info!(deleted = n, "usage retention applied");
                        }
                        if !done {
                            last_retention = None;
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "usage retention failed"),
                    Err(_) => {}
                }
            }
        }
        // The last flush: until everything is shipped, or the hard stop.
        let drain = Periodic::new("ledger flush", hard_stop);
        let flushed = loop {
            let held_done = self.rewrite_held().await;
            match drain
                .unless_stopped(self.ship_all(&store, true, query_timeout))
                .await
            {
                Ok(Ok(())) if held_done => break true,
                Err(Cut::Stopped) => break false,
                _ => {}
            }
            if !drain.pause(Duration::from_millis(200), None).await {
                break false;
            }
        };
        self.sync().await;
        let held = self.held_records();
        if flushed {
            tracing::info!("usage ledger flushed");
        } else {
            tracing::warn!(
                spool_bytes = self.spool.bytes(),
                "usage ledger not fully flushed; the rest ships at the next start"
            );
        }
        if held > 0 {
            self.metrics.dropped.inc_by(held as u64);
            tracing::error!(
                records = held,
                "usage records the spool never took are lost at exit"
            );
        }
    }

    /// fdatasyncs the spool, off the async workers (it can take milliseconds).
    async fn sync(self: &Arc<Self>) {
        if let Ok(Err(e)) = self.off_workers(|l| l.spool.sync()).await {
            tracing::warn!(error = %e, "cannot sync the usage spool");
        }
    }
}

/// `insert` for at most `timeout`; running over it is a transient failure (the database
/// stopped answering), so the records stay in the spool.
async fn bounded(
    timeout: Duration,
    insert: impl Future<Output = Result<u64, StoreError>>,
) -> Result<u64, StoreError> {
    tokio::time::timeout(timeout, insert)
        .await
        .unwrap_or(Err(StoreError::TimedOut))
}

/// Inserts spooled records: on SQLite decoded once and bound as columns, on PostgreSQL
/// joined into one JSON array. Returns the result and how many records were unreadable.
async fn insert_batch(
    store: &Store,
    records: &[Vec<u8>],
    timeout: Duration,
) -> (Result<u64, StoreError>, u64) {
    let raw = records.iter().map(Vec::as_slice);
    if store.engine() == "sqlite" {
        match decode_batch(raw) {
            Ok((rows, unreadable)) => (
                bounded(timeout, store.insert_usage(&rows)).await,
                unreadable,
            ),
            Err(e) => (Err(e), 0),
        }
    } else {
        let (array, unreadable) = json_array(raw);
        (
            bounded(timeout, store.insert_usage_json(&array)).await,
            unreadable,
        )
    }
}

/// Records decoded for the database: a binary record's text borrowed from the spool's
/// bytes, a JSON one's (earlier versions) owned.
type Decoded<'a> = Vec<UsageRecord<Cow<'a, str>>>;

/// Decodes records for the database, skipping any that cannot be read (counted as
/// unreadable) and a stream's provisional record when its final record is in the same
/// batch. JSON that is not a usage record refuses the batch (`Unstorable`): the shipper
/// then ships record by record and sets that one aside.
fn decode_batch<'a>(
    records: impl Iterator<Item = &'a [u8]>,
) -> Result<(Decoded<'a>, u64), StoreError> {
    let mut rows = Vec::new();
    let mut unreadable = 0;
    for raw in records {
        match record::decode_borrowed(raw) {
            Ok(row) => rows.push(row),
            Err(NotARecord::ForeignJson(e)) => return Err(StoreError::Unstorable(e.to_string())),
            Err(NotARecord::Unreadable) => {
                tracing::error!("undecodable usage record skipped");
                unreadable += 1;
            }
        }
    }
    // Most batches hold no provisional record (only streams write one): then there is
    // nothing to leave out and no set of ids to build.
    let provisional: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Interrupted)
        .map(|r| &*r.id)
        .collect();
    if provisional.is_empty() {
        return Ok((rows, unreadable));
    }
    let superseded: std::collections::HashSet<String> = rows
        .iter()
        .filter(|r| r.outcome != Outcome::Interrupted && provisional.contains(&*r.id))
        .map(|r| r.id.to_string())
        .collect();
    rows.retain(|r| r.outcome != Outcome::Interrupted || !superseded.contains(&*r.id));
    Ok((rows, unreadable))
}

/// One record's part of the JSON array: its JSON text, its id as JSON text, and whether it
/// is a stream's provisional record.
struct JsonItem<'r> {
    json: Cow<'r, [u8]>,
    id: Option<Cow<'r, str>>,
    provisional: bool,
}

/// A record as an item of the JSON array; `None` when it cannot be read. Binary records
/// are re-encoded; JSON ones go as they are, even of another shape (the database refuses
/// those, and they are set aside).
fn json_item(raw: &[u8]) -> Option<JsonItem<'_>> {
    /// The fields read from a JSON record (as their JSON text); the rest is only checked
    /// to be JSON.
    #[derive(serde::Deserialize, Default)]
    struct Key<'r> {
        #[serde(borrow, default)]
        id: Option<&'r RawValue>,
        #[serde(borrow, default)]
        outcome: Option<&'r RawValue>,
    }
    if record::is_binary(raw) {
        let r = record::decode(raw).ok()?;
        return Some(JsonItem {
            json: Cow::Owned(serde_json::to_vec(&r).ok()?),
            id: Some(Cow::Owned(serde_json::to_string(&r.id).ok()?)),
            provisional: r.outcome == Outcome::Interrupted,
        });
    }
    // One parse per record: a syntax error means not JSON; JSON that is not such an object
    // (a data error) goes on without a key.
    let key = match serde_json::from_slice::<Key<'_>>(raw) {
        Ok(key) => key,
        Err(e) if e.is_data() => Key::default(),
        Err(_) => return None,
    };
    Some(JsonItem {
        json: Cow::Borrowed(raw),
        id: key.id.map(|id| Cow::Borrowed(id.get())),
        provisional: key.outcome.map(RawValue::get) == Some("\"interrupted\""),
    })
}

/// Joins records into one JSON array for the database, skipping any that cannot be read
/// (checksummed but written by an incompatible version), and a stream's provisional record
/// when its final record is in the same batch (the database would insert the one only to
/// replace it with the other). Returns the array and how many records were unreadable.
fn json_array<'a>(records: impl Iterator<Item = &'a [u8]>) -> (String, u64) {
    let items: Vec<Option<JsonItem<'a>>> = records.map(json_item).collect();
    let finals: std::collections::HashSet<&str> = items
        .iter()
        .flatten()
        .filter(|i| !i.provisional)
        .filter_map(|i| i.id.as_deref())
        .collect();
    let size = items
        .iter()
        .flatten()
        .map(|i| i.json.len() + 1)
        .sum::<usize>()
        + 2;
    let mut array = Vec::with_capacity(size);
    array.push(b'[');
    let mut skipped = 0;
    for item in &items {
        let Some(item) = item else {
            tracing::error!("undecodable usage record skipped");
            skipped += 1;
            continue;
        };
        if item.provisional && item.id.as_deref().is_some_and(|id| finals.contains(id)) {
            continue;
        }
        if array.len() > 1 {
            array.push(b',');
        }
        array.extend_from_slice(&item.json);
    }
    array.push(b']');
    (String::from_utf8_lossy(&array).into_owned(), skipped)
}

#[cfg(test)]
mod tests {
    use super::{decode_batch, json_array};
    use crate::storage::database::StoreError;
    use crate::storage::database::usage_rows::{Outcome, UsageRecord};

    fn record(id: &str, outcome: Outcome) -> Vec<u8> {
        let r: UsageRecord = UsageRecord {
            id: id.into(),
            request_id: "r".into(),
            ts_ms: 1,
            key_id: None,
            model: None,
            backend: None,
            endpoint: "chat_completions".into(),
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 1,
            estimated: false,
            latency_us: 1,
            ttft_us: None,
            client_disconnected: false,
            instance_id: "i".into(),
            outcome,
            queue_us: None,
            fallback: None,
        };
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn a_decoded_batch_keeps_the_rules_of_the_json_one() {
        let batch = [
            record("a", Outcome::Interrupted),
            record("b", Outcome::Interrupted),
            b"not json".to_vec(),
            record("a", Outcome::Complete),
        ];
        let (rows, unreadable) = decode_batch(batch.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(unreadable, 1);
        let kept: Vec<(&str, Outcome)> = rows.iter().map(|r| (&*r.id, r.outcome)).collect();
        assert_eq!(
            kept,
            [("b", Outcome::Interrupted), ("a", Outcome::Complete)]
        );
        // JSON of another shape refuses the batch, to be shipped record by record.
        let other = [record("c", Outcome::Complete), br#"{"id":"d"}"#.to_vec()];
        assert!(matches!(
            decode_batch(other.iter().map(Vec::as_slice)),
            Err(StoreError::Unstorable(_))
        ));
    }

    fn binary(id: &str, outcome: Outcome) -> Vec<u8> {
        let r: UsageRecord = serde_json::from_slice(&record(id, outcome)).unwrap();
        let mut out = Vec::new();
        super::record::encode(&r, &mut out).unwrap();
        out
    }

    #[test]
    fn binary_records_and_json_ones_of_earlier_versions_ship_alike() {
        let batch = [
            record("a", Outcome::Interrupted),
            binary("b", Outcome::Interrupted),
            binary("a", Outcome::Complete),
            vec![1, 0xff],
            binary("c", Outcome::Complete),
        ];
        let (rows, unreadable) = decode_batch(batch.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(unreadable, 1);
        let kept: Vec<(&str, Outcome)> = rows.iter().map(|r| (&*r.id, r.outcome)).collect();
        assert_eq!(
            kept,
            [
                ("b", Outcome::Interrupted),
                ("a", Outcome::Complete),
                ("c", Outcome::Complete)
            ]
        );
        // PostgreSQL gets the same rows as JSON.
        let (array, unreadable) = json_array(batch.iter().map(Vec::as_slice));
        assert_eq!(unreadable, 1);
        let shipped: Vec<UsageRecord> = serde_json::from_str(&array).unwrap();
        let rows: Vec<UsageRecord> = rows.iter().map(|r| r.map(|s| s.to_string())).collect();
        assert_eq!(shipped, rows);
    }

    #[test]
    fn a_provisional_record_is_left_out_when_its_final_one_is_in_the_batch() {
        let records: [&[u8]; 4] = [
            br#"{"id":"a","outcome":"interrupted"}"#,
            br#"{"id":"b","outcome":"interrupted"}"#,
            br#"{"id":"a","outcome":"complete"}"#,
            b"not json",
        ];
        let (array, unreadable) = json_array(records.iter().copied());
        assert_eq!(unreadable, 1);
        assert_eq!(
            array,
            r#"[{"id":"b","outcome":"interrupted"},{"id":"a","outcome":"complete"}]"#
        );
    }

    #[test]
    fn json_of_another_shape_goes_on_and_only_what_is_not_json_is_skipped() {
        let records: [&[u8]; 5] = [
            b"[1,2]",
            br#"{"id":"a"} trailing"#,
            br#"{"id":"a","ts_ms":"#,
            br#"{"id":7,"outcome":null}"#,
            br#""text""#,
        ];
        let (array, unreadable) = json_array(records.iter().copied());
        assert_eq!(unreadable, 2);
        assert_eq!(array, r#"[[1,2],{"id":7,"outcome":null},"text"]"#);
    }
}
