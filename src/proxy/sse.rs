//! Server-sent events pass-through: forwards complete events as they arrive, reads usage
//! from them, and drops the usage-only chunk the gateway asked for on the client's behalf.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::proxy::Endpoint;
use crate::proxy::tokens::Usage;

/// Which event stream an endpoint sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// Chat and completions chunks: content in `choices`, usage in a chunk of its own,
    /// `data: [DONE]` at the end.
    #[default]
    Chunks,
    /// The Responses API's typed events: content in `*.delta` events, usage in the
    /// `response` of the last one (`response.completed`, `.incomplete` or `.failed`),
    /// which ends the stream; no `[DONE]`.
    Responses,
}

impl Dialect {
    /// The stream `endpoint` sends.
    pub fn of(endpoint: Endpoint) -> Self {
        if endpoint == Endpoint::Responses {
            Self::Responses
        } else {
            Self::Chunks
        }
    }
}

/// Splits a byte stream into SSE events and inspects each one without re-serialising it.
#[derive(Debug, Default)]
pub struct SseScanner {
    buf: BytesMut,
    strip_usage_chunk: bool,
    dialect: Dialect,
    /// Usage seen so far (field-wise maximum).
    pub usage: Option<Usage>,
    /// Data events other than usage-only chunks and `[DONE]`: about one token each.
    pub content_events: u64,
    /// `data: [DONE]` was seen (for the Responses API: its final event).
    pub done: bool,
    /// The response's id, from a Responses stream's first event that names it.
    pub response_id: Option<String>,
    id_seen: bool,
}

impl SseScanner {
    /// A scanner of `dialect`; with `strip_usage_chunk`, chunks carrying usage and no
    /// choices are removed.
    pub fn new(strip_usage_chunk: bool, dialect: Dialect) -> Self {
        Self {
            strip_usage_chunk,
            dialect,
            ..Self::default()
        }
    }

    /// Feeds upstream bytes; returns the complete events to forward (possibly empty).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.buf.is_empty() {
            // Common case: nothing pending. Forward a slice of the chunk itself.
            let (end, keep_all) = self.scan(&chunk);
            if keep_all {
                self.buf.extend_from_slice(&chunk[end..]);
                return chunk.slice(..end);
            }
        }
        self.buf.extend_from_slice(&chunk);
        self.drain_complete()
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    /// Returns whatever is left (an unterminated last event) at end of stream.
    pub fn finish(&mut self) -> Bytes {
        if self.buf.is_empty() {
            return Bytes::new();
        }
        let rest = self.buf.split().freeze();
        if self.inspect(&rest) {
            rest
        } else {
            Bytes::new()
        }
    }

    /// Scans complete events at the start of `data`, recording usage. Returns the end of the
    /// last complete event and whether every event is kept. Only used on the fast path,
    /// which re-scans via `drain_complete` when something must be dropped.
    fn scan(&mut self, data: &[u8]) -> (usize, bool) {
        let mut pos = 0;
        let snapshot = (self.usage, self.content_events, self.done);
        while let Some(len) = event_len(&data[pos..]) {
            if !self.inspect(&data[pos..pos + len]) {
                (self.usage, self.content_events, self.done) = snapshot;
                return (0, false);
            }
            pos += len;
        }
        (pos, true)
    }

    fn drain_complete(&mut self) -> Bytes {
        let data = std::mem::take(&mut self.buf).freeze();
        let mut out: Option<BytesMut> = None;
        let mut pos = 0;
        while let Some(len) = event_len(&data[pos..]) {
            let end = pos + len;
            let keep = self.inspect(&data[pos..end]);
            match (&mut out, keep) {
                (None, true) | (Some(_), false) => {}
                (None, false) => out = Some(BytesMut::from(&data[..pos])),
                (Some(o), true) => o.extend_from_slice(&data[pos..end]),
            }
            pos = end;
        }
        self.buf.extend_from_slice(&data[pos..]);
        match out {
            None => data.slice(..pos),
            Some(o) => o.freeze(),
        }
    }

    /// Looks at one complete event; false means drop it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let Some(data) = data_field(event) else {
            return true; // comments, `event:`-only or empty events pass untouched
        };
        let data = data.as_ref();
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return true;
        }
        if self.dialect == Dialect::Responses {
            self.inspect_typed(data);
            return true;
        }
        if has_usage_object(data) {
            #[derive(Deserialize)]
            struct Chunk {
                #[serde(default)]
                usage: Option<Usage>,
                #[serde(default)]
                choices: Option<Vec<IgnoredAny>>,
            }
            if let Ok(chunk) = serde_json::from_slice::<Chunk>(data)
                && let Some(u) = chunk.usage
            {
                self.usage.get_or_insert_with(Usage::default).merge(u);
                if chunk.choices.is_none_or(|c| c.is_empty()) {
                    return !self.strip_usage_chunk;
                }
            }
        }
        self.content_events += 1;
        true
    }
}

impl SseScanner {
    /// A Responses API event: counts deltas, takes the usage of the final event.
    fn inspect_typed(&mut self, data: &[u8]) {
        #[derive(Deserialize)]
        struct Event<'a> {
            #[serde(rename = "type", borrow, default)]
            kind: Option<Cow<'a, str>>,
            #[serde(default)]
            response: Option<Inner>,
        }
        #[derive(Deserialize)]
        struct Inner {
            #[serde(default)]
            id: Option<String>,
            #[serde(default)]
            usage: Option<Usage>,
        }
        let Ok(event) = serde_json::from_slice::<Event<'_>>(data) else {
            return;
        };
        let kind = event.kind.as_deref().unwrap_or("");
        if !self.id_seen
            && let Some(id) = event.response.as_ref().and_then(|r| r.id.clone())
        {
            self.id_seen = true;
            self.response_id = Some(id);
        }
        if kind.ends_with(".delta") {
            self.content_events += 1;
        }
        if matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed"
        ) {
            self.done = true;
            if let Some(u) = event.response.and_then(|r| r.usage) {
                self.usage.get_or_insert_with(Usage::default).merge(u);
            }
        }
    }
}

/// Length of the first complete event in `data` including its blank-line terminator
/// (`\n\n`, `\r\n\r\n` or `\r\r`: the spec allows all three line endings).
fn event_len(data: &[u8]) -> Option<usize> {
    for i in memchr::memchr2_iter(b'\n', b'\r', data) {
        match (data[i], data.get(i + 1), data.get(i + 2)) {
            (b'\n', Some(b'\n'), _) => return Some(i + 2),
            (b'\n', Some(b'\r'), Some(b'\n')) => return Some(i + 3),
            (b'\r', Some(b'\r'), _) => return Some(i + 2),
            _ => {}
        }
    }
    None
}

/// The event's data: the `data:` lines joined by `\n` (borrowed when there is one line).
fn data_field(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    // What OpenAI-compatible servers send: one `data:` line, then the blank line. Found
    // with one `memchr2` instead of a split that looks at every byte.
    if let Some(rest) = event.strip_prefix(b"data:") {
        let eol = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        if rest[eol..].iter().all(|&b| b == b'\n' || b == b'\r') {
            let value = &rest[..eol];
            return Some(Cow::Borrowed(value.strip_prefix(b" ").unwrap_or(value)));
        }
    }
    let mut found: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        found = Some(match found {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    found
}

/// True when `data` contains `"usage":` followed by an object (not `null`).
fn has_usage_object(data: &[u8]) -> bool {
    // Built once: building a searcher costs more than searching one event.
    static USAGE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
    USAGE.find_iter(data).any(|at| {
        let rest = &data[at + 7..];
        let rest = rest.trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|r| r.trim_ascii_start().starts_with(b"{"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(strip: bool, pieces: &[&[u8]]) -> (String, SseScanner) {
        let mut s = SseScanner::new(strip, Dialect::Chunks);
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(p)));
        }
        out.extend_from_slice(&s.finish());
        (String::from_utf8(out).unwrap(), s)
    }

    #[test]
    fn passes_events_and_strips_usage_chunk() {
        let all = format!("{CHUNK}{CHUNK}{USAGE}{DONE}");
        let (out, s) = run(true, &[all.as_bytes()]);
        assert_eq!(out, format!("{CHUNK}{CHUNK}{DONE}"));
        assert_eq!(s.usage.unwrap().completion_tokens, Some(2));
        assert_eq!(s.content_events, 2);
        assert!(s.done);
        let (kept, _) = run(false, &[all.as_bytes()]);
        assert_eq!(kept, all);
    }

    #[test]
    fn handles_events_split_at_every_byte() {
        let all = format!("{CHUNK}{USAGE}{CHUNK}{DONE}");
        let pieces: Vec<&[u8]> = all.as_bytes().chunks(1).collect();
        let (out, s) = run(true, &pieces);
        assert_eq!(out, format!("{CHUNK}{CHUNK}{DONE}"));
        assert_eq!(s.usage.unwrap().prompt_tokens, Some(3));
    }

    #[test]
    fn crlf_events_and_unterminated_tail() {
        let all = "data: {\"choices\":[{}]}\r\n\r\ndata: [DONE]";
        let (out, s) = run(true, &[all.as_bytes()]);
        assert_eq!(out, all);
        assert!(s.done);
        assert_eq!(s.content_events, 1);
    }

    #[test]
    fn cr_only_line_endings_split_events() {
        let all = "data: {\"choices\":[{}]}\r\rdata: {\"choices\":[],\"usage\":{\"completion_tokens\":1}}\r\rdata: [DONE]\r\r";
        let (out, s) = run(true, &[all.as_bytes()]);
        assert_eq!(out, "data: {\"choices\":[{}]}\r\rdata: [DONE]\r\r");
        assert_eq!(s.content_events, 1);
        assert!(s.done);
    }

    #[test]
    fn data_of_several_lines_is_joined_and_other_fields_are_ignored() {
        let one = b"data: [DONE]\n\n";
        assert_eq!(data_field(one).as_deref(), Some(&b"[DONE]"[..]));
        let two = b"event: x\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n";
        assert_eq!(data_field(two).as_deref(), Some(&b"{\"a\":\n1}"[..]));
        let lead = b"data:x\nid: 7\n\n";
        assert_eq!(data_field(lead).as_deref(), Some(&b"x"[..]));
        assert_eq!(data_field(b": comment\n\n"), None);
        // A usage chunk sent over two data lines is still read.
        let mut s = SseScanner::new(true, Dialect::Chunks);
        let split = "data: {\"choices\":[],\ndata: \"usage\":{\"completion_tokens\":4}}\n\n";
        assert_eq!(s.push(Bytes::from(split)), Bytes::new());
        assert_eq!(s.usage.unwrap().completion_tokens, Some(4));
    }

    #[test]
    fn a_responses_stream_ends_with_its_completed_event_and_its_usage() {
        let events = [
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"b\"}\n\n",
            "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"ab\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"total_tokens\":7}}}\n\n",
        ];
        let mut s = SseScanner::new(false, Dialect::Responses);
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            out.extend_from_slice(&s.push(Bytes::from_static(e.as_bytes())));
            assert_eq!(s.done, i == events.len() - 1, "after event {i}");
        }
        assert_eq!(out, events.concat().into_bytes(), "every event passed on");
        assert_eq!(s.content_events, 2);
        assert_eq!(s.response_id.as_deref(), Some("resp_1"));
        let usage = s.usage.unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(5), Some(2))
        );
    }

    #[test]
    fn usage_null_is_not_parsed_as_usage() {
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(has_usage_object(br#"{"usage" : {"a":1}}"#));
    }
}
