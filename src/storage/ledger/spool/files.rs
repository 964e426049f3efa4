//! The spool's files: segment names, creating a segment, and the committed cursor.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::{Position, SpoolError};

pub(super) const LOCK_FILE: &str = "lock";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
pub(super) const SEGMENT_SUFFIX: &str = ".spool";

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { op, path, source }
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SEGMENT_SUFFIX}"))
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub(super) fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, id);
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create", &path))
}

/// The persisted cursor; a missing or unreadable one means "from the first segment".
pub(super) fn read_cursor(dir: &Path) -> Result<Position, SpoolError> {
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

pub(super) fn write_cursor(dir: &Path, pos: Position) -> Result<(), SpoolError> {
    let tmp = dir.join(CURSOR_TMP);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    // Not synced: a cursor lost to a power failure only replays records that were already
    // shipped, and shipping is idempotent.
    file.write_all(format!("{} {}\n", pos.segment, pos.offset).as_bytes())
        .map_err(io_err("write", &tmp))?;
    let path = dir.join(CURSOR_FILE);
    fs::rename(&tmp, &path).map_err(io_err("replace", &path))
}
