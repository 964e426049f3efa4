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
//! | n     | payload (opaque, typically a JSON usage record)         |
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

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Largest payload `append` accepts; a longer length read back is treated as corruption.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
const MAGIC: [u8; 4] = *b"LGW1";
const HEADER_BYTES: usize = 12;
/// Bytes fetched per `pread` while reading a segment.
const READ_CHUNK: usize = 64 * 1024;
/// A batch stops growing once its payloads reach this many bytes.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Sealed segments remembered for the next `sync`; older ones are left to the kernel.
const MAX_UNSYNCED: usize = 16;
/// A fully shipped active segment at least this large is rolled and deleted at commit.
const DRAINED_ROLL_BYTES: u64 = 1 << 20;
const CURSOR_FILE: &str = "cursor";
const LOCK_FILE: &str = "lock";
const CURSOR_TMP: &str = "cursor.tmp";
const SEGMENT_SUFFIX: &str = ".spool";

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
        let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
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

/// One frame as found at an offset.
enum Frame {
    /// A valid record and the offset after it.
    Record(Vec<u8>, u64),
    /// Nothing more at this offset (end of file, or of the published length).
    End,
    /// Bad magic, bad length, CRC mismatch or cut short.
    Bad,
}

/// Reads one segment through a bounded window of positioned reads, up to `limit`.
struct SegmentReader {
    file: File,
    limit: u64,
    base: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    fn new(file: File, limit: u64) -> Self {
        Self {
            file,
            limit,
            base: 0,
            buf: Vec::new(),
        }
    }

    /// Up to `want` bytes at `at`; fewer only where the file or `limit` ends.
    fn bytes_at(&mut self, at: u64, want: usize) -> io::Result<&[u8]> {
        let room = usize::try_from(self.limit.saturating_sub(at)).unwrap_or(usize::MAX);
        let want = want.min(room);
        let window_end = self.base + self.buf.len() as u64;
        if at < self.base || at.saturating_add(want as u64) > window_end {
            self.buf.resize(want.max(READ_CHUNK).min(room), 0);
            let mut filled = 0;
            while filled < self.buf.len() {
                match self
                    .file
                    .read_at(&mut self.buf[filled..], at + filled as u64)
                {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.buf.truncate(filled);
            self.base = at;
        }
        let start = usize::try_from(at - self.base)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        let end = start.saturating_add(want).min(self.buf.len());
        Ok(&self.buf[start..end])
    }

    fn frame_at(&mut self, at: u64) -> io::Result<Frame> {
        let head = self.bytes_at(at, HEADER_BYTES)?;
        if head.is_empty() {
            return Ok(Frame::End);
        }
        if head.len() < HEADER_BYTES || head[..4] != MAGIC {
            return Ok(Frame::Bad);
        }
        let len = le_u32(&head[4..8]) as usize;
        let crc = le_u32(&head[8..12]);
        if len > MAX_RECORD_BYTES {
            return Ok(Frame::Bad);
        }
        let frame = self.bytes_at(at, HEADER_BYTES + len)?;
        if frame.len() < HEADER_BYTES + len || crc32fast::hash(&frame[HEADER_BYTES..]) != crc {
            return Ok(Frame::Bad);
        }
        let next = at + (HEADER_BYTES + len) as u64;
        Ok(Frame::Record(frame[HEADER_BYTES..].to_vec(), next))
    }

    /// Offset of the next frame magic at or after `from`, if any before the end.
    fn find_magic(&mut self, from: u64) -> io::Result<Option<u64>> {
        let mut at = from;
        loop {
            let window = self.bytes_at(at, READ_CHUNK)?;
            if window.len() < MAGIC.len() {
                return Ok(None);
            }
            if let Some(i) = memchr::memmem::find(window, &MAGIC) {
                return Ok(Some(at + i as u64));
            }
            at += (window.len() - (MAGIC.len() - 1)) as u64;
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&b[..4]);
    u32::from_le_bytes(word)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { op, path, source }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, id);
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create", &path))
}

/// The persisted cursor; a missing or unreadable one means "from the first segment".
fn read_cursor(dir: &Path) -> Result<Position, SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let start = Position {
        segment: 0,
        offset: 0,
    };
    let mut text = Vec::new();
    match File::open(&path).and_then(|f| f.take(64).read_to_end(&mut text)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(start),
        Err(e) => return Err(io_err("read", &path)(e)),
    }
    let text = String::from_utf8_lossy(&text);
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset)), None) => Ok(Position { segment, offset }),
        _ => {
            tracing::warn!(path = %path.display(), "unreadable spool cursor; replaying all segments");
            Ok(start)
        }
    }
}

fn write_cursor(dir: &Path, pos: Position) -> Result<(), SpoolError> {
    let tmp = dir.join(CURSOR_TMP);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    // Not synced: a cursor lost to a power failure only replays records that were already
    // shipped, and shipping is idempotent.
    file.write_all(format!("{} {}\n", pos.segment, pos.offset).as_bytes())
        .map_err(io_err("write", &tmp))?;
    let path = dir.join(CURSOR_FILE);
    fs::rename(&tmp, &path).map_err(io_err("replace", &path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn open(dir: &Path, segment_bytes: u64, max_bytes: u64) -> Spool {
        Spool::open(SpoolConfig {
            dir: dir.to_path_buf(),
            segment_bytes,
            max_bytes,
        })
        .unwrap()
    }

    fn rec(i: usize) -> Vec<u8> {
        format!("{{\"request\":{i},\"tokens\":{}}}", i * 7).into_bytes()
    }

    /// Reads (without committing) until nothing more comes; returns records and the end.
    fn drain(spool: &Spool, from: Option<Position>, batch: usize) -> (Vec<Vec<u8>>, Position) {
        let mut out = Vec::new();
        let mut pos = from;
        for _ in 0..100_000 {
            let b = spool.read_batch(pos, batch).unwrap();
            assert!(b.records.len() <= batch);
            let done = b.records.is_empty() && Some(b.end) == pos;
            out.extend(b.records);
            if done {
                return (out, b.end);
            }
            pos = Some(b.end);
        }
        panic!("reader never caught up");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(SEGMENT_SUFFIX))
            .collect();
        v.sort();
        v
    }

    /// Bytes in segment files on disk: what `bytes()` must account for.
    fn on_disk(dir: &Path) -> u64 {
        segments(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    #[test]
    fn a_second_open_of_one_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20, 1 << 20);
        let second = Spool::open(SpoolConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 1 << 20,
            max_bytes: 1 << 20,
        });
        assert!(
            matches!(second, Err(SpoolError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        open(dir.path(), 1 << 20, 1 << 20);
    }

    #[test]
    fn spool_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Spool>();
    }

    #[test]
    fn append_read_commit_trims() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 300, 1 << 20);
        let want: Vec<_> = (0..50).map(rec).collect();
        for r in &want {
            spool.append(r).unwrap();
        }
        assert!(segments(dir.path()).len() > 3, "small segments must roll");
        let before = spool.bytes();
        let frames: u64 = want.iter().map(|r| (r.len() + HEADER_BYTES) as u64).sum();
        assert_eq!(before, frames);
        let batch = spool.read_batch(None, 1000).unwrap();
        assert_eq!(batch.records, want);
        spool.commit(batch.end).unwrap();
        assert!(spool.read_batch(None, 1000).unwrap().records.is_empty());
        // Every consumed segment is deleted; the drained active one (under the roll
        // threshold) stays and is what is accounted.
        assert_eq!(spool.bytes(), on_disk(dir.path()));
        assert!(spool.bytes() < 300 + 64, "{}", spool.bytes());
        assert_eq!(
            segments(dir.path()).len(),
            1,
            "only the fresh active segment is left"
        );
        spool.append(b"later").unwrap();
        assert_eq!(
            spool.read_batch(None, 10).unwrap().records,
            vec![b"later".to_vec()]
        );
    }

    #[test]
    fn reopen_replays_only_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20, 1 << 20);
            for i in 0..10 {
                spool.append(&rec(i)).unwrap();
            }
            let first = spool.read_batch(None, 4).unwrap();
            assert_eq!(first.records, (0..4).map(rec).collect::<Vec<_>>());
            spool.commit(first.end).unwrap();
            let ahead = spool.read_batch(Some(first.end), 3).unwrap(); // read, never committed
            assert_eq!(ahead.records, (4..7).map(rec).collect::<Vec<_>>());
        }
        {
            let spool = open(dir.path(), 1 << 20, 1 << 20);
            let (got, end) = drain(&spool, None, 100);
            assert_eq!(got, (4..10).map(rec).collect::<Vec<_>>());
            spool.commit(end).unwrap();
        }
        let spool = open(dir.path(), 1 << 20, 1 << 20);
        assert!(drain(&spool, None, 100).0.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn torn_tail_is_skipped_and_later_records_delivered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20, 1 << 20);
            for i in 0..5 {
                spool.append(&rec(i)).unwrap();
            }
        }
        let seg = segments(dir.path()).pop().unwrap();
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len - 3).unwrap();
        drop(file);

        let spool = open(dir.path(), 1 << 20, 1 << 20);
        spool.append(&rec(100)).unwrap();
        spool.append(&rec(101)).unwrap();
        let (got, _) = drain(&spool, None, 2);
        let want: Vec<_> = [0, 1, 2, 3, 100, 101].into_iter().map(rec).collect();
        assert_eq!(got, want);
        assert_eq!(spool.corrupt_frames(), 1);
        drain(&spool, None, 100); // re-reading does not count it again
        assert_eq!(spool.corrupt_frames(), 1);
    }

    #[test]
    fn corruption_mid_segment_skips_only_the_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20, 1 << 20);
            for i in 0..5 {
                spool.append(&rec(i)).unwrap();
            }
        }
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let start = |i: usize| (0..i).map(|j| rec(j).len() + HEADER_BYTES).sum::<usize>();
        bytes[start(1) + HEADER_BYTES + 2] ^= 0x40; // payload byte of record 1
        bytes[start(3) + 7] = 0x7f; // length field of record 3: far over the limit
        fs::write(&seg, &bytes).unwrap();

        let spool = open(dir.path(), 1 << 20, 1 << 20);
        let (got, _) = drain(&spool, None, 100);
        assert_eq!(got, [0, 2, 4].into_iter().map(rec).collect::<Vec<_>>());
        assert_eq!(spool.corrupt_frames(), 2);
    }

    #[test]
    fn active_segment_is_read_only_up_to_the_published_length() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, 1 << 20);
        spool.append(&rec(0)).unwrap();
        spool.append(&rec(1)).unwrap();
        // What a reader could see mid-append: half of a frame not yet published.
        let active = segments(dir.path()).pop().unwrap();
        let published = fs::metadata(&active).unwrap().len();
        let mut half = OpenOptions::new().append(true).open(&active).unwrap();
        half.write_all(&[MAGIC.as_slice(), &[200, 0, 0, 0, 1, 2]].concat())
            .unwrap();
        let batch = spool.read_batch(None, 100).unwrap();
        assert_eq!(batch.records, vec![rec(0), rec(1)]);
        assert_eq!(
            batch.end,
            Position {
                segment: batch.end.segment,
                offset: published
            }
        );
        assert_eq!(
            spool.corrupt_frames(),
            0,
            "an unpublished frame is not corruption"
        );
    }

    #[test]
    fn full_until_commit_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let frame = (100 + HEADER_BYTES) as u64;
        // segment_bytes larger than max_bytes: only the commit-time roll can free space.
        let spool = open(dir.path(), 1 << 20, frame * 5);
        for _ in 0..5 {
            spool.append(&[7; 100]).unwrap();
        }
        assert!(matches!(
            spool.append(&[7; 100]),
            Err(SpoolError::Full { max_bytes }) if max_bytes == frame * 5
        ));
        assert_eq!(spool.bytes(), frame * 5);
        let batch = spool.read_batch(None, 100).unwrap();
        assert_eq!(batch.records.len(), 5, "the refused record was not written");
        spool.commit(batch.end).unwrap();
        assert_eq!(spool.bytes(), 0);
        for _ in 0..5 {
            spool.append(&[8; 100]).unwrap();
        }
        assert_eq!(drain(&spool, None, 100).0, vec![vec![8; 100]; 5]);
    }

    #[test]
    fn rolling_segments_read_in_small_batches() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 256, 1 << 20);
        for i in 0..300 {
            spool.append(&rec(i)).unwrap();
        }
        assert!(segments(dir.path()).len() >= 20);
        let mut got = Vec::new();
        for _ in 0..1000 {
            let b = spool.read_batch(None, 7).unwrap();
            assert!(b.records.len() <= 7);
            if b.records.is_empty() {
                break;
            }
            got.extend(b.records);
            spool.commit(b.end).unwrap();
        }
        assert_eq!(got, (0..300).map(rec).collect::<Vec<_>>());
        assert_eq!(spool.bytes(), on_disk(dir.path()));
        assert_eq!(segments(dir.path()).len(), 1);
    }

    #[test]
    fn rejects_oversized_records_and_commits_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, 4 << 20);
        let big = vec![0; MAX_RECORD_BYTES + 1];
        assert!(matches!(
            spool.append(&big),
            Err(SpoolError::TooLarge { .. })
        ));
        spool.append(&vec![1; MAX_RECORD_BYTES]).unwrap();
        let end = spool.read_batch(None, 10).unwrap().end;
        let past = Position {
            offset: end.offset + 1,
            ..end
        };
        assert!(matches!(
            spool.commit(past),
            Err(SpoolError::BadPosition { .. })
        ));
        assert_eq!(drain(&spool, None, 10).0.len(), 1);
        let bad = SpoolConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 0,
            max_bytes: 1,
        };
        assert!(matches!(Spool::open(bad), Err(SpoolError::Config(_))));
    }

    #[test]
    fn concurrent_appends_are_read_exactly_once_and_whole() {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 500;
        fn payload(t: usize, i: usize) -> Vec<u8> {
            format!("t{t}-i{i}-{}", "x".repeat((i % 97) * 301)).into_bytes()
        }
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(open(dir.path(), 256 << 10, 256 << 20));
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let spool = Arc::clone(&spool);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        spool.append(&payload(t, i)).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                let mut seen = vec![Vec::new(); THREADS];
                let mut pos = None;
                let deadline = Instant::now() + Duration::from_secs(60);
                while seen.iter().map(Vec::len).sum::<usize>() < THREADS * PER_THREAD {
                    assert!(Instant::now() < deadline, "reader starved");
                    let b = spool.read_batch(pos, 13).unwrap();
                    for r in &b.records {
                        let text = std::str::from_utf8(r).unwrap();
                        let (t, rest) = text[1..].split_once("-i").unwrap();
                        let (t, i) = (t.parse::<usize>().unwrap(), rest.split_once('-').unwrap().0);
                        let i = i.parse::<usize>().unwrap();
                        assert_eq!(r, &payload(t, i), "partial or mangled record");
                        seen[t].push(i);
                    }
                    spool.commit(b.end).unwrap();
                    pos = Some(b.end);
                    if b.records.is_empty() {
                        std::thread::yield_now();
                    }
                }
                seen
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        let seen = reader.join().unwrap();
        for per_thread in &seen {
            assert_eq!(per_thread, &(0..PER_THREAD).collect::<Vec<_>>());
        }
        assert!(spool.read_batch(None, 10).unwrap().records.is_empty());
        assert_eq!(spool.corrupt_frames(), 0);
        assert_eq!(spool.bytes(), on_disk(dir.path()));
        assert!(
            spool.bytes() < 256 << 10,
            "only the drained active segment is left"
        );
    }
}
