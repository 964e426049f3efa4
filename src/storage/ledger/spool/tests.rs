//! Unit tests of the spool: framing, recovery from torn and corrupt frames, trimming,
//! accounting, concurrent appends.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use super::files::SEGMENT_SUFFIX;
use super::frame::{HEADER_BYTES, MAGIC};
use super::*;
use std::path::Path;
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
