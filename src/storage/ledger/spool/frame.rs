//! The frame format of a segment (see the table in `mod.rs`): writing one, and reading
//! frames back through a bounded window of positioned reads, telling a good record from a
//! torn or damaged one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::MAX_RECORD_BYTES;

pub(super) const MAGIC: [u8; 4] = *b"LGW1";
pub(super) const HEADER_BYTES: usize = 12;
/// Bytes fetched per `pread` while reading a segment.
const READ_CHUNK: usize = 64 * 1024;

/// The frame of a payload of `len` (at most [`MAX_RECORD_BYTES`]) bytes.
pub(super) fn encode(len: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// One frame as found at an offset.
pub(super) enum Frame {
    /// A valid record and the offset after it.
    Record(Vec<u8>, u64),
    /// Nothing more at this offset (end of file, or of the published length).
    End,
    /// Bad magic, bad length, CRC mismatch or cut short.
    Bad,
}

/// Reads one segment through a bounded window of positioned reads, up to `limit`.
pub(super) struct SegmentReader {
    file: File,
    pub(super) limit: u64,
    base: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    pub(super) fn new(file: File, limit: u64) -> Self {
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

    pub(super) fn frame_at(&mut self, at: u64) -> io::Result<Frame> {
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
    pub(super) fn find_magic(&mut self, from: u64) -> io::Result<Option<u64>> {
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
