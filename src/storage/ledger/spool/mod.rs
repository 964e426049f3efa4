//! Loss-free write-ahead spool for usage records: the request path appends framed records to
//! local segment files, one shipper reads them in order and trims them after the DB commit.
//!
//! # On-disk layout
//! `dir` holds segment files `{id:020}.spool` (lexical order = numeric order = append order)
//! and `cursor`, the committed read position as ASCII `"<segment> <offset>\n"`, replaced
//! atomically (`cursor.tmp` is written and renamed over it; not synced, as a lost cursor
//! only makes the shipper re-send records, which the database ignores). A segment is a sequence
//! of frames, each written by one `write(2)` on an `O_APPEND` file:
//!
//! | bytes | field                                                   |
//! |-------|---------------------------------------------------------|
//! | 4     | magic `b"LGW1"`                                         |
//! | 4     | payload length, u32 LE, at most [`MAX_RECORD_BYTES`]    |
//! | 4     | CRC-32 (`crc32fast`) of the payload, u32 LE             |
//! | n     | payload (opaque): a usage record (`ledger/record.rs`)   |
//!
//! # Recovery
//! A record is in the page cache once `append` returns, so it survives a kill of the process
//! (`sync` adds power-loss durability about once a second). `open` always starts a new
//! segment, so an old, possibly torn tail is never appended to. Readers skip a bad frame
//! (wrong magic, length over the limit, CRC mismatch, cut short) by scanning forward for the
//! next magic; a bad tail ends its segment and reading goes on with the next one.
//!
//! # Trimming and accounting
//! `bytes` counts every byte appended to (or found at `open` in) segment files that still
//! exist, the active one included; a segment's bytes are released when its file is deleted.
//! `commit(pos)` deletes whole segments before `pos.segment`. When `pos` is exactly the end of
//! the active segment and that holds at least 1 MiB (or `segment_bytes`, if smaller), or the
//! spool is over half full, `commit` also rolls to a fresh segment and deletes the consumed
//! one at once, so a drained spool frees its space even if `segment_bytes` is never reached.
//!
//! # Files
//! `frame.rs` writes and reads frames, `files.rs` names segments and keeps the cursor. This
//! file is the spool itself (open, append, read, commit, roll, sync): its invariants (the
//! published length, the byte accounting, the locks) only hold when seen together, which
//! is why it is longer than most.

mod files;
mod frame;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use files::{
    LOCK_FILE, create_segment, io_err, parse_segment_name, read_cursor, segment_path, write_cursor,
};
use frame::{Frame, SegmentReader};

/// Largest payload `append` accepts; a longer length read back is treated as corruption.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// A batch stops growing once its payloads reach this many bytes.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Sealed segments remembered for the next `sync`; older ones are left to the kernel.
const MAX_UNSYNCED: usize = 16;
/// A fully shipped active segment at least this large is rolled and deleted at commit.
const DRAINED_ROLL_BYTES: u64 = 1 << 20;

/// Where the spool lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory holding the segment files and the cursor (created if missing).
    pub dir: PathBuf,
    /// The active segment is rolled before an append once it holds this many bytes.
    pub segment_bytes: u64,
    /// Upper bound on unshipped bytes across all segments; `append` fails beyond it.
    pub max_bytes: u64,
}

/// A read position: where the next unread record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Segment number (file `{segment:020}.spool`).
    pub segment: u64,
    /// Byte offset inside that segment.
    pub offset: u64,
}

/// Records read by `read_batch`, in append order.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Payloads of complete, checksum-valid records.
    pub records: Vec<Vec<u8>>,
    /// Position just after each record in `records` (same index): committing `ends[i]`
    /// marks records `0..=i` as handled.
    pub ends: Vec<Position>,
    /// Position after the last record (and after any skipped corrupt bytes or drained
    /// segments): commit it once the records are stored, even if `records` is empty.
    pub end: Position,
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file-system operation in the spool directory failed.
    #[error("spool: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Appending would make unshipped bytes exceed `max_bytes`; nothing was written.
    #[error("spool full: unshipped records would exceed {max_bytes} bytes")]
    Full { max_bytes: u64 },
    /// The payload is larger than [`MAX_RECORD_BYTES`]; nothing was written.
    #[error("usage record of {len} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { len: usize },
    /// `commit` was given a position past the end of what has been written.
    #[error("cannot commit spool position {segment}:{offset}: past the written end")]
    BadPosition { segment: u64, offset: u64 },
    /// The configuration cannot work.
    #[error("invalid spool config: {0}")]
    Config(&'static str),
    /// Another process has this spool open (two instances with one state directory).
    #[error(
        "spool {} is in use by another process: give each instance its own storage.state_dir",
        path.display()
    )]
    Locked { path: PathBuf },
}

/// The appending side: the active segment, guarded by `Spool::writer`.
#[derive(Debug)]
struct Writer {
    id: u64,
    file: Arc<File>,
    /// Bytes in the active segment (all accounted in `Spool::bytes`).
    len: u64,
    /// A write failed part-way: roll before the next append.
    broken: bool,
    /// Sealed segments not yet fdatasync'ed, for `sync` (bounded by `MAX_UNSYNCED`).
    unsynced: Vec<Arc<File>>,
    /// A segment file was created since the last `sync` of the directory.
    dir_dirty: bool,
}

/// The spool; share it as `Arc<Spool>` (appends from any thread, one shipper reads/commits).
#[derive(Debug)]
pub struct Spool {
    config: SpoolConfig,
    writer: Mutex<Writer>,
    /// Sealed (no longer appended) segments that still exist: id -> accounted bytes.
    sealed: Mutex<BTreeMap<u64, u64>>,
    /// Published active segment and its readable length (set after each complete write;
    /// on a roll the length is reset before the id changes).
    active_id: AtomicU64,
    active_len: AtomicU64,
    bytes: AtomicU64,
    committed: Mutex<Position>,
    corrupt: AtomicU64,
    /// Furthest corrupt frame counted, so re-reading it does not count it twice.
    corrupt_mark: Mutex<Option<Position>>,
    /// Exclusive lock on `dir/lock`, held while the spool is open: two processes sharing
    /// one spool would ship and delete each other's active segment.
    _lock: File,
}

impl Spool {
    /// Opens (creating `dir` if needed), reads the persisted cursor, accounts the bytes of
    /// existing segments (deleting those wholly before the cursor, and empty ones), and always
    /// starts a new segment file for appending.
    pub fn open(config: SpoolConfig) -> Result<Spool, SpoolError> {
        if config.segment_bytes == 0 || config.max_bytes == 0 {
            return Err(SpoolError::Config(
                "segment_bytes and max_bytes must be positive",
            ));
        }
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        if let Err(e) = lock.try_lock() {
            return Err(match e {
                fs::TryLockError::WouldBlock => SpoolError::Locked { path: lock_path },
                fs::TryLockError::Error(e) => SpoolError::Io {
                    op: "lock",
                    path: lock_path,
                    source: e,
                },
            });
        }
        let committed = read_cursor(&dir)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_segment_name) {
                let len = entry
                    .metadata()
                    .map_err(io_err("stat", &entry.path()))?
                    .len();
                found.push((id, len));
            }
        }
        let mut last = committed.segment;
        let mut sealed = BTreeMap::new();
        for (id, len) in found {
            last = last.max(id);
            if id < committed.segment || len == 0 {
                let path = segment_path(&dir, id);
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            } else {
                sealed.insert(id, len);
            }
        }
        let id = last.saturating_add(1);
        let file = create_segment(&dir, id)?;
        let bytes: u64 = sealed.values().sum();
        tracing::info!(dir = %dir.display(), bytes, segments = sealed.len(), "usage spool opened");
        Ok(Spool {
            writer: Mutex::new(Writer {
                id,
                file: Arc::new(file),
                len: 0,
                broken: false,
                unsynced: Vec::new(),
                dir_dirty: true,
            }),
            sealed: Mutex::new(sealed),
            active_id: AtomicU64::new(id),
            active_len: AtomicU64::new(0),
            bytes: AtomicU64::new(bytes),
            committed: Mutex::new(committed),
            corrupt: AtomicU64::new(0),
            corrupt_mark: Mutex::new(None),
            _lock: lock,
            config,
        })
    }

    /// Appends one record as a single framed `write(2)` on the active segment. Fails with
    /// `Full` (writing nothing) if unshipped bytes plus the frame would exceed `max_bytes`;
    /// rolls to a new segment first when the active one has reached `segment_bytes`.
    pub fn append(&self, payload: &[u8]) -> Result<(), SpoolError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|_| payload.len() <= MAX_RECORD_BYTES)
            .ok_or(SpoolError::TooLarge { len: payload.len() })?;
        let frame = frame::encode(len, payload);
        let frame_len = frame.len() as u64;

        let mut w = lock(&self.writer);
        if self.bytes.load(Ordering::Acquire) + frame_len > self.config.max_bytes {
            return Err(SpoolError::Full {
                max_bytes: self.config.max_bytes,
            });
        }
        if w.broken || w.len >= self.config.segment_bytes {
            self.roll(&mut w)?;
        }
        let written = (&*w.file).write(&frame);
        let n = match written {
            Ok(n) => n,
            // A failed write(2) wrote nothing: the segment is intact and stays active, so a
            // full or failing disk does not make every later attempt create a new file.
            Err(e) => return Err(io_err("write", &segment_path(&self.config.dir, w.id))(e)),
        };
        // Short write: the bytes are on disk (accounted) but never published; the segment
        // is sealed at the next append and readers skip the torn frame.
        w.len += n as u64;
        self.bytes.fetch_add(n as u64, Ordering::AcqRel);
        if n != frame.len() {
            w.broken = true;
            let e = io::Error::new(io::ErrorKind::WriteZero, format!("short write: {n} bytes"));
            return Err(io_err("write", &segment_path(&self.config.dir, w.id))(e));
        }
        self.active_len.store(w.len, Ordering::Release);
        Ok(())
    }

    /// Reads up to `max_records` complete records starting at the committed cursor (or at
    /// `from`, to read ahead of the commit). The active segment is read only up to its
    /// published length, so a concurrent append is never seen half-written; corrupt frames
    /// are skipped and counted. Never waits for the writer.
    pub fn read_batch(
        &self,
        from: Option<Position>,
        max_records: usize,
    ) -> Result<Batch, SpoolError> {
        let mut pos = from.unwrap_or_else(|| *lock(&self.committed));
        let mut records = Vec::with_capacity(max_records.min(4096));
        let mut ends = Vec::with_capacity(max_records.min(4096));
        let mut payload_bytes = 0;
        while records.len() < max_records && payload_bytes < MAX_BATCH_BYTES {
            let (active, active_len) = self.published();
            if pos.segment > active {
                break;
            }
            let is_active = pos.segment == active;
            if !is_active && !lock(&self.sealed).contains_key(&pos.segment) {
                pos = self.next_segment(pos.segment, active);
                continue;
            }
            let path = segment_path(&self.config.dir, pos.segment);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !is_active => {
                    pos = self.next_segment(pos.segment, active);
                    continue;
                }
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            let limit = if is_active { active_len } else { u64::MAX };
            let mut reader = SegmentReader::new(file, limit);
            let (offset, exhausted) = self
                .read_segment(
                    &mut reader,
                    pos,
                    max_records,
                    &mut records,
                    &mut ends,
                    &mut payload_bytes,
                )
                .map_err(io_err("read", &path))?;
            pos.offset = offset;
            if is_active || !exhausted {
                break;
            }
            pos = self.next_segment(pos.segment, active);
        }
        Ok(Batch {
            records,
            ends,
            end: pos,
        })
    }

    /// Persists `pos` as the committed cursor (temp file + rename in `dir`), then deletes
    /// every segment entirely before it (never the active one, except that a fully consumed,
    /// non-empty active segment is first rolled and then deleted). A position before the
    /// committed one is ignored; one past the written end is refused.
    pub fn commit(&self, pos: Position) -> Result<(), SpoolError> {
        let mut committed = lock(&self.committed);
        if pos < *committed {
            return Ok(());
        }
        let (active, active_len) = self.published();
        if pos.segment > active || (pos.segment == active && pos.offset > active_len) {
            return Err(SpoolError::BadPosition {
                segment: pos.segment,
                offset: pos.offset,
            });
        }
        write_cursor(&self.config.dir, pos)?;
        *committed = pos;
        let mut delete_below = pos.segment;
        if pos.segment == active && pos.offset > 0 {
            let mut w = lock(&self.writer);
            // Rolling costs a file create and delete under the writer lock, so a drained
            // segment is only rolled once it is worth reclaiming, or when space is short.
            let worth = pos.offset >= DRAINED_ROLL_BYTES.min(self.config.segment_bytes)
                || self.bytes() > self.config.max_bytes / 2;
            if worth && w.id == pos.segment && w.len == pos.offset && !w.broken {
                match self.roll(&mut w) {
                    Ok(()) => delete_below = pos.segment + 1,
                    Err(e) => tracing::warn!(error = %e, "cannot roll the drained spool segment"),
                }
            }
        }
        drop(committed);
        self.delete_below(delete_below)
    }

    /// Bytes in segment files not yet deleted (what `max_bytes` bounds).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Number of corrupt or torn frames skipped since `open` (each counted once).
    pub fn corrupt_frames(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// fdatasyncs the active segment, segments sealed since the last call, and the directory
    /// if segments were created (power-loss durability; call about once a second).
    pub fn sync(&self) -> Result<(), SpoolError> {
        let (active, sealed, dir_dirty) = {
            let mut w = lock(&self.writer);
            let dirty = std::mem::replace(&mut w.dir_dirty, false);
            (Arc::clone(&w.file), std::mem::take(&mut w.unsynced), dirty)
        };
        let dir = &self.config.dir;
        for file in sealed.iter().chain(std::iter::once(&active)) {
            file.sync_data().map_err(io_err("sync a segment in", dir))?;
        }
        if dir_dirty {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
        }
        Ok(())
    }

    /// The active segment and its published length, read consistently.
    fn published(&self) -> (u64, u64) {
        let mut id = self.active_id.load(Ordering::Acquire);
        for _ in 0..8 {
            let len = self.active_len.load(Ordering::Acquire);
            let again = self.active_id.load(Ordering::Acquire);
            if again == id {
                return (id, len);
            }
            id = again;
        }
        (id, 0) // rolling under our feet: an underestimate is always safe
    }

    /// Start of the first existing segment after `segment` (the active one at the latest).
    fn next_segment(&self, segment: u64, active: u64) -> Position {
        let next = lock(&self.sealed)
            .range(segment.saturating_add(1)..)
            .next()
            .map_or(active, |(&id, _)| id.min(active));
        Position {
            segment: next.max(segment.saturating_add(1)),
            offset: 0,
        }
    }

    /// Seals the active segment and starts the next one. Caller holds the writer lock.
    fn roll(&self, w: &mut Writer) -> Result<(), SpoolError> {
        let id = w.id + 1;
        let file = Arc::new(create_segment(&self.config.dir, id)?);
        lock(&self.sealed).insert(w.id, w.len);
        let old = std::mem::replace(&mut w.file, file);
        if w.unsynced.len() >= MAX_UNSYNCED {
            w.unsynced.remove(0);
        }
        w.unsynced.push(old);
        w.id = id;
        w.len = 0;
        w.broken = false;
        w.dir_dirty = true;
        self.active_len.store(0, Ordering::Release);
        self.active_id.store(id, Ordering::Release);
        Ok(())
    }

    /// Deletes sealed segments numbered below `limit`, releasing their bytes.
    fn delete_below(&self, limit: u64) -> Result<(), SpoolError> {
        let doomed = {
            let mut sealed = lock(&self.sealed);
            let keep = sealed.split_off(&limit);
            std::mem::replace(&mut *sealed, keep)
        };
        let mut first_err = None;
        for (id, size) in doomed {
            let path = segment_path(&self.config.dir, id);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    lock(&self.sealed).insert(id, size); // retried at the next commit
                    first_err.get_or_insert(io_err("remove", &path)(e));
                }
                _ => {
                    let _ = self
                        .bytes
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                            Some(b.saturating_sub(size))
                        });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads frames from `start` into `out`; returns where it stopped and whether the
    /// segment (or the published part of the active one) is exhausted.
    fn read_segment(
        &self,
        reader: &mut SegmentReader,
        start: Position,
        max_records: usize,
        out: &mut Vec<Vec<u8>>,
        ends: &mut Vec<Position>,
        out_bytes: &mut usize,
    ) -> io::Result<(u64, bool)> {
        let mut at = start.offset;
        while out.len() < max_records && *out_bytes < MAX_BATCH_BYTES {
            match reader.frame_at(at)? {
                Frame::Record(payload, next) => {
                    *out_bytes += payload.len();
                    out.push(payload);
                    ends.push(Position {
                        segment: start.segment,
                        offset: next,
                    });
                    at = next;
                }
                Frame::End => return Ok((at, true)),
                Frame::Bad => {
                    self.note_corrupt(Position {
                        segment: start.segment,
                        offset: at,
                    });
                    match reader.find_magic(at + 1)? {
                        Some(next) => at = next,
                        None => return Ok((reader.limit.max(at), true)),
                    }
                }
            }
        }
        Ok((at, false))
    }

    fn note_corrupt(&self, at: Position) {
        let mut mark = lock(&self.corrupt_mark);
        if mark.is_some_and(|m| at <= m) {
            return;
        }
        *mark = Some(at);
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            segment = at.segment,
            offset = at.offset,
            "usage spool: corrupt or torn record frame skipped"
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
