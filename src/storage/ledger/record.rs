//! The spool's record format: a usage record as the bytes of one spool frame, and back.
//!
//! A record is a tag byte and a binary encoding (postcard: fields in declaration order,
//! integers as varints). Encoding and decoding it costs a fraction of the JSON that
//! earlier versions spooled (callgrind: the JSON encode and decode were 13 % of the
//! instructions per request, docs/benchmarks.md), and those JSON records (no JSON text
//! starts with the tag byte) are still read, so a spool left by an older version replays.
//!
//! The binary layout is fixed by `UsageRecord`'s field order and `Outcome`'s variant
//! order: changing either needs a new tag (the test `the_binary_layout_is_fixed` fails
//! first). Layout 2 appended `queue_us` and `fallback` (two options) to layout 1; a layout
//! 1 record is read as layout 2 with both absent.

use std::borrow::Cow;

use serde::Deserialize;

use crate::storage::database::usage_rows::UsageRecord;

/// First byte of a record in the binary layout of this version.
const TAG_V2: u8 = 2;
/// First byte of a record in the layout before (no `queue_us`, no `fallback`).
const TAG_V1: u8 = 1;
/// What layout 2 adds to a layout 1 record whose two new fields are absent (`None`, `None`).
const V1_TO_V2: [u8; 2] = [0, 0];

/// Why spooled bytes are not a usage record.
#[derive(Debug)]
pub enum NotARecord {
    /// JSON of another shape: passed on to the database, which refuses it, so that it is
    /// set aside (in `rejected.jsonl`) rather than silently skipped.
    ForeignJson(serde_json::Error),
    /// Bytes this version cannot read (counted, skipped).
    Unreadable,
}

/// Appends `record`'s bytes to `out`.
pub fn encode<S: serde::Serialize>(
    record: &UsageRecord<S>,
    out: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    out.push(TAG_V2);
    let body = postcard::to_extend(record, std::mem::take(out))?;
    *out = body;
    Ok(())
}

/// Whether `raw` is in a binary layout (no JSON text starts with these bytes).
pub fn is_binary(raw: &[u8]) -> bool {
    matches!(raw.first(), Some(&(TAG_V1 | TAG_V2)))
}

/// Reads one spooled record.
pub fn decode(raw: &[u8]) -> Result<UsageRecord, NotARecord> {
    let whole = |bytes: &[u8]| match postcard::take_from_bytes::<UsageRecord>(bytes) {
        Ok((record, [])) => Ok(record),
        _ => Err(NotARecord::Unreadable),
    };
    match raw.first() {
        Some(&TAG_V2) => return whole(&raw[1..]),
        Some(&TAG_V1) => return whole(&[&raw[1..], &V1_TO_V2[..]].concat()),
        _ => {}
    }
    serde_json::from_slice::<UsageRecord>(raw).map_err(|e| {
        if e.is_data() {
            NotARecord::ForeignJson(e)
        } else {
            NotARecord::Unreadable
        }
    })
}

/// Reads one spooled record without copying its text where it can: a binary record's text
/// is borrowed from `raw`, a JSON one's (which may hold escapes) is owned.
pub fn decode_borrowed(raw: &[u8]) -> Result<UsageRecord<Cow<'_, str>>, NotARecord> {
    if raw.first() == Some(&TAG_V2) {
        return match postcard::take_from_bytes::<UsageRecord<&str>>(&raw[1..]) {
            Ok((record, [])) => Ok(record.map(|s| Cow::Borrowed(*s))),
            _ => Err(NotARecord::Unreadable),
        };
    }
    decode(raw).map(|r| r.map(|s| Cow::Owned(s.clone())))
}

/// The record as one JSON object (what `rejected.jsonl` and PostgreSQL take): JSON records
/// as they were spooled, binary ones re-encoded; `None` when unreadable.
pub fn to_json(raw: &[u8]) -> Option<Vec<u8>> {
    match decode(raw) {
        Ok(record) if is_binary(raw) => serde_json::to_vec(&record).ok(),
        Ok(_) | Err(NotARecord::ForeignJson(_)) => Some(raw.to_vec()),
        Err(NotARecord::Unreadable) => None,
    }
}

/// When the record's request finished (Unix ms), if it can be read.
pub fn ts_ms(raw: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct TsOnly {
        ts_ms: i64,
    }
    if is_binary(raw) {
        return decode(raw).ok().map(|r| r.ts_ms);
    }
    serde_json::from_slice::<TsOnly>(raw).ok().map(|t| t.ts_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::database::usage_rows::Outcome;

    fn sample() -> UsageRecord {
        UsageRecord {
            id: "01900000-0000-7000-8000-000000000001".into(),
            request_id: "req-\"1\"".into(),
            ts_ms: 1_700_000_000_123,
            key_id: Some("k1".into()),
            model: Some("m".into()),
            backend: None,
            endpoint: "chat_completions".into(),
            status: 200,
            prompt_tokens: 3,
            completion_tokens: 300,
            estimated: false,
            latency_us: 1234,
            ttft_us: Some(56),
            client_disconnected: true,
            instance_id: "i".into(),
            outcome: Outcome::Interrupted,
            queue_us: Some(300),
            fallback: Some("f".into()),
        }
    }

    fn encoded(r: &UsageRecord) -> Vec<u8> {
        let mut out = Vec::new();
        encode(r, &mut out).unwrap();
        out
    }

    #[test]
    fn a_record_comes_back_as_it_was_written() {
        let r = sample();
        let raw = encoded(&r);
        assert_eq!(raw[0], TAG_V2);
        assert_eq!(decode(&raw).unwrap(), r);
        assert_eq!(ts_ms(&raw), Some(r.ts_ms));
        let json: UsageRecord = serde_json::from_slice(&to_json(&raw).unwrap()).unwrap();
        assert_eq!(json, r);
    }

    #[test]
    fn a_borrowed_record_is_spooled_as_its_owned_form() {
        // The request path encodes `UsageRecord<&str>`; older code and the tests decode
        // `UsageRecord`, the shipper `decode_borrowed`.
        let r = sample();
        let mut borrowed = Vec::new();
        encode(&r.map(String::as_str), &mut borrowed).unwrap();
        assert_eq!(borrowed, encoded(&r));
        assert_eq!(r.map(String::as_str).map(|s| (*s).to_owned()), r);
        // And read back borrowed (binary) or owned (JSON), the same record either way.
        let back = decode_borrowed(&borrowed).unwrap();
        assert!(matches!(back.id, Cow::Borrowed(_)));
        assert_eq!(back.map(|s| s.to_string()), r);
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_borrowed(&json).unwrap().map(|s| s.to_string()), r);
        assert!(matches!(
            decode_borrowed(&borrowed[..5]),
            Err(NotARecord::Unreadable)
        ));
    }

    #[test]
    fn json_records_of_earlier_versions_are_read() {
        let r = sample();
        let old = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode(&old).unwrap(), r);
        assert_eq!(ts_ms(&old), Some(r.ts_ms));
        assert_eq!(to_json(&old).unwrap(), old);
        // Written before the outcome column existed.
        let older = br#"{"id":"a","request_id":"r","ts_ms":5,"key_id":null,"model":null,"backend":null,"endpoint":"embeddings","status":200,"prompt_tokens":1,"completion_tokens":0,"estimated":true,"latency_us":9,"ttft_us":null,"client_disconnected":false,"instance_id":"i"}"#;
        assert_eq!(decode(older).unwrap().outcome, Outcome::Complete);
    }

    #[test]
    fn what_is_not_a_record_is_told_apart() {
        let foreign = br#"{"id":"d"}"#;
        assert!(matches!(decode(foreign), Err(NotARecord::ForeignJson(_))));
        assert_eq!(to_json(foreign).unwrap(), foreign);
        assert!(matches!(decode(b"[1,2]"), Err(NotARecord::ForeignJson(_))));
        assert!(matches!(decode(b"not json"), Err(NotARecord::Unreadable)));
        assert!(matches!(decode(b"{not json"), Err(NotARecord::Unreadable)));
        assert!(matches!(decode(b""), Err(NotARecord::Unreadable)));
        let mut cut = encoded(&sample());
        cut.pop();
        assert!(matches!(decode(&cut), Err(NotARecord::Unreadable)));
        let mut long = encoded(&sample());
        long.push(0);
        assert!(matches!(decode(&long), Err(NotARecord::Unreadable)));
        assert_eq!(to_json(&long), None);
        assert_eq!(ts_ms(b"not json"), None);
    }

    #[test]
    fn the_binary_layout_is_fixed() {
        // Records already spooled must stay readable: a change here needs a new tag.
        // Tag, then each field in order: strings as length + bytes, integers as varints
        // (ts_ms zigzag-encoded), options as 0 / 1 + value, the outcome as its variant index.
        let v1: &[u8] = &V1_SAMPLE;
        let mut expected = vec![TAG_V2];
        expected.extend_from_slice(&v1[1..]);
        expected.extend_from_slice(&[1, 0xac, 0x02, 1, 1, b'f']);
        assert_eq!(encoded(&sample()), expected);
    }

    #[test]
    fn records_of_layout_1_are_read_without_queue_and_fallback() {
        let old = decode(&V1_SAMPLE).unwrap();
        let mut want = sample();
        want.queue_us = None;
        want.fallback = None;
        assert_eq!(old, want);
        let borrowed = decode_borrowed(&V1_SAMPLE).unwrap();
        assert_eq!(borrowed.map(|s| s.to_string()), want);
        assert_eq!(ts_ms(&V1_SAMPLE), Some(want.ts_ms));
        let json: UsageRecord = serde_json::from_slice(&to_json(&V1_SAMPLE).unwrap()).unwrap();
        assert_eq!(json, want);
    }

    /// `sample()` as layout 1 spooled it (without its two newer fields).
    const V1_SAMPLE: [u8; 91] = [
        1, 36, b'0', b'1', b'9', b'0', b'0', b'0', b'0', b'0', b'-', b'0', b'0', b'0', b'0', b'-',
        b'7', b'0', b'0', b'0', b'-', b'8', b'0', b'0', b'0', b'-', b'0', b'0', b'0', b'0', b'0',
        b'0', b'0', b'0', b'0', b'0', b'0', b'1', 7, b'r', b'e', b'q', b'-', b'"', b'1', b'"',
        0xf6, 0xa1, 0xab, 0xfe, 0xf9, 0x62, 1, 2, b'k', b'1', 1, 1, b'm', 0, 16, b'c', b'h', b'a',
        b't', b'_', b'c', b'o', b'm', b'p', b'l', b'e', b't', b'i', b'o', b'n', b's', 0xc8, 0x01,
        3, 0xac, 0x02, 0, 0xd2, 0x09, 1, 56, 1, 1, b'i', 5,
    ];
}
