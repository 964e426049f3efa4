//! The body sent upstream: the client's bytes, with only what a route must change spliced
//! in place (the `model` value, `stream_options.include_usage`). Nothing else is parsed into
//! values or written again, so numbers, string escapes and key order reach the backend as
//! the client sent them. Each distinct body is built once per request, not per attempt.

use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;

/// Where the parts a route may change lie in the client's body.
#[derive(Debug)]
pub(crate) struct Rewriter {
    raw: Bytes,
    /// The `model` value.
    model: Option<Range<usize>>,
    /// What asking for usage in the stream inserts or replaces; `None` when not asked.
    usage: Option<(Range<usize>, &'static str)>,
    /// Bodies built so far, by upstream model name (`None`: the public name kept).
    built: Vec<(Option<String>, Bytes)>,
}

/// Inserted when `stream_options` is absent.
const WHOLE_OPTION: &str = "\"stream_options\":{\"include_usage\":true},";

impl Rewriter {
    /// Prepares the splices for `raw`, a JSON object whose `model` and `stream_options` are
    /// the given borrowed values (from `raw` itself). With `ask_usage`, the body asks for
    /// `stream_options.include_usage`. `stream_options` must be an object or `null`.
    pub(crate) fn new(
        raw: Bytes,
        model: Option<&RawValue>,
        stream_options: Option<&RawValue>,
        ask_usage: bool,
    ) -> Self {
        let model = model.map(|v| span(&raw, v));
        let usage = ask_usage.then(|| usage_splice(&raw, stream_options));
        Self {
            raw,
            model,
            usage,
            built: Vec::new(),
        }
    }

    /// The body for a route sending `upstream_model` (or the public name when `None`).
    pub(crate) fn body(&mut self, upstream_model: Option<&str>) -> Bytes {
        if upstream_model.is_none() && self.usage.is_none() {
            return self.raw.clone();
        }
        if let Some((_, body)) = self
            .built
            .iter()
            .find(|(name, _)| name.as_deref() == upstream_model)
        {
            return body.clone();
        }
        let mut splices: Vec<(Range<usize>, String)> = Vec::with_capacity(2);
        if let (Some(name), Some(range)) = (upstream_model, &self.model) {
            let quoted = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".to_owned());
            splices.push((range.clone(), quoted));
        }
        if let Some((range, text)) = &self.usage {
            splices.push((range.clone(), (*text).to_owned()));
        }
        splices.sort_by_key(|(r, _)| r.start);
        let extra: usize = splices.iter().map(|(_, t)| t.len()).sum();
        let mut out = Vec::with_capacity(self.raw.len() + extra);
        let mut at = 0;
        for (range, text) in splices {
            out.extend_from_slice(&self.raw[at..range.start]);
            out.extend_from_slice(text.as_bytes());
            at = range.end;
        }
        out.extend_from_slice(&self.raw[at..]);
        let body = Bytes::from(out);
        self.built
            .push((upstream_model.map(str::to_owned), body.clone()));
        body
    }
}

/// For a field that may be absent: `Some` whenever it is present, `null` included (a plain
/// `Option<&RawValue>` reads `null` as absent, and the body would get the key twice).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// The byte range of `value` inside `raw` (it borrows from `raw`).
fn span(raw: &[u8], value: &RawValue) -> Range<usize> {
    let start = (value.get().as_ptr() as usize).saturating_sub(raw.as_ptr() as usize);
    let start = start.min(raw.len());
    start..(start + value.get().len()).min(raw.len())
}

/// Where and what to splice so that the body asks for `include_usage: true`.
fn usage_splice(raw: &[u8], stream_options: Option<&RawValue>) -> (Range<usize>, &'static str) {
    let Some(options) = stream_options else {
        // Right after the body's opening brace (the body is a non-empty object: it has
        // `model`, so a comma after the new member is always right).
        let open = raw.iter().position(|&b| b == b'{').map_or(0, |p| p + 1);
        return (open..open, WHOLE_OPTION);
    };
    let range = span(raw, options);
    if options.get() == "null" {
        return (range, "{\"include_usage\":true}");
    }
    #[derive(serde::Deserialize)]
    struct Options<'a> {
        #[serde(borrow, default)]
        include_usage: Option<&'a RawValue>,
    }
    match serde_json::from_str::<Options<'_>>(options.get()) {
        Ok(Options {
            include_usage: Some(v),
        }) => (span(raw, v), "true"),
        _ => {
            let open = range.start + 1;
            let empty = options.get()[1..options.get().len() - 1]
                .trim_ascii()
                .is_empty();
            let text = if empty {
                "\"include_usage\":true"
            } else {
                "\"include_usage\":true,"
            };
            (open..open, text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        model: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "crate::proxy::rewrite::present")]
        stream_options: Option<&'a RawValue>,
    }

    fn rewrite(body: &str, model: Option<&str>, ask_usage: bool) -> serde_json::Value {
        let raw = Bytes::from(body.to_owned());
        let head: Head<'_> = serde_json::from_slice(&raw).unwrap();
        let mut r = Rewriter::new(raw.clone(), head.model, head.stream_options, ask_usage);
        let out = r.body(model);
        assert_eq!(r.body(model), out, "built once");
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn only_the_changed_values_are_touched() {
        let body = r#"{ "model" : "pub", "n": 18446744073709551616, "x": -0, "s": "\u00e9", "stream": true }"#;
        let raw = Bytes::from(body);
        let head: Head<'_> = serde_json::from_slice(&raw).unwrap();
        let mut r = Rewriter::new(raw.clone(), head.model, head.stream_options, true);
        let out = String::from_utf8(r.body(Some("org/M")).to_vec()).unwrap();
        assert_eq!(
            out,
            r#"{"stream_options":{"include_usage":true}, "model" : "org/M", "n": 18446744073709551616, "x": -0, "s": "\u00e9", "stream": true }"#
        );
        let kept = String::from_utf8(r.body(None).to_vec()).unwrap();
        assert!(kept.contains(r#""model" : "pub""#), "{kept}");
        let mut untouched = Rewriter::new(raw.clone(), head.model, head.stream_options, false);
        assert_eq!(
            untouched.body(None),
            raw,
            "nothing to change: the client's bytes"
        );
    }

    #[test]
    fn stream_options_in_every_shape_end_up_asking_for_usage() {
        for (body, keeps) in [
            (r#"{"model":"m"}"#, None),
            (r#"{"model":"m","stream_options":null}"#, None),
            (r#"{"model":"m","stream_options":{}}"#, None),
            (r#"{"model":"m","stream_options":{ }}"#, None),
            (
                r#"{"model":"m","stream_options":{"include_usage":false}}"#,
                None,
            ),
            (
                r#"{"model":"m","stream_options":{"other":1}}"#,
                Some("other"),
            ),
        ] {
            let v = rewrite(body, None, true);
            assert_eq!(v["stream_options"]["include_usage"], true, "{body}");
            assert_eq!(v["model"], "m");
            if let Some(k) = keeps {
                assert_eq!(v["stream_options"][k], 1, "{body}");
            }
        }
        let v = rewrite(r#"{"model":"m"}"#, Some("a\"b"), false);
        assert_eq!(v["model"], "a\"b");
        assert!(v.get("stream_options").is_none());
    }
}
