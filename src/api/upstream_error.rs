//! What of a backend's error body may reach the client: OpenAI's four fields and nothing
//! else, with the backend's credentials and anything key-like scrubbed from the message.

use serde::Serialize;

/// An error from an upstream that is safe to show the client: only OpenAI's four fields,
/// with the backend's credentials scrubbed from the message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Extracts a showable error from an upstream error body: `{"error": {...}}` (OpenAI,
/// vLLM) or `{"error": "text"}` (llama.cpp, Ollama), with `secrets` replaced and the
/// message capped. Anything else yields `None` and the client gets the gateway's message.
pub fn sanitize_upstream_error(body: &[u8], secrets: &[&str]) -> Option<UpstreamErrorBody> {
    #[derive(serde::Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    #[expect(
        clippy::large_enum_variant,
        reason = "parsed once per upstream error, never stored"
    )]
    enum Inner {
        Object {
            message: String,
            #[serde(rename = "type", default)]
            kind: Option<serde_json::Value>,
            #[serde(default)]
            param: Option<serde_json::Value>,
            #[serde(default)]
            code: Option<serde_json::Value>,
        },
        Text(String),
    }
    fn text(v: Option<serde_json::Value>) -> Option<String> {
        match v? {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    const MAX: usize = 1024;
    let outer: Outer = serde_json::from_slice(body).ok()?;
    let (message, kind, param, code) = match outer.error {
        Inner::Object {
            message,
            kind,
            param,
            code,
        } => (message, text(kind), text(param), text(code)),
        Inner::Text(message) => (message, None, None, None),
    };
    let scrub = |mut s: String| {
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            s = s.replace(secret, "[redacted]");
        }
        if s.contains("Bearer ") {
            return "[redacted]".to_owned();
        }
        s = redact_key_like(&s);
        if s.len() > MAX {
            let mut cut = MAX;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        s
    };
    Some(UpstreamErrorBody {
        message: scrub(message),
        kind: kind.map(scrub),
        param: param.map(scrub),
        code: code.map(scrub),
    })
}

/// Replaces words that look like API keys (`sk-` and at least 16 more key characters).
fn redact_key_like(s: &str) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("sk-") {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_key_char(c));
        let tail = &rest[at + 3..];
        let len = tail.find(|c| !is_key_char(c)).unwrap_or(tail.len());
        out.push_str(&rest[..at]);
        if starts_word && len >= 16 {
            out.push_str("[redacted]");
        } else {
            out.push_str(&rest[at..at + 3 + len]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shaped_error_passes_with_secret_scrubbed() {
        let body = br#"{"error":{"message":"bad key k-123 for you","type":"invalid_request_error","param":null,"code":400,"extra":"x"}}"#;
        let e = sanitize_upstream_error(body, &["k-123"]).unwrap();
        assert_eq!(e.message, "bad key [redacted] for you");
        assert_eq!(e.code.as_deref(), Some("400"));
        assert_eq!(e.param, None);
    }

    #[test]
    fn bearer_tokens_are_never_echoed() {
        let body = br#"{"error":"header was Bearer abc"}"#;
        let e = sanitize_upstream_error(body, &[]).unwrap();
        assert_eq!(e.message, "[redacted]");
    }

    #[test]
    fn key_like_words_are_redacted_but_ordinary_words_stay() {
        let body = br#"{"error":"bad key sk-abcdefghijklmnop1234 for task-sk-1 on disk-sk-x"}"#;
        let e = sanitize_upstream_error(body, &[]).unwrap();
        assert_eq!(e.message, "bad key [redacted] for task-sk-1 on disk-sk-x");
    }

    #[test]
    fn non_openai_bodies_are_dropped() {
        assert!(sanitize_upstream_error(b"<html>oops</html>", &[]).is_none());
        assert!(sanitize_upstream_error(br#"{"detail":"x"}"#, &[]).is_none());
    }

    #[test]
    fn long_messages_are_capped() {
        let long = "é".repeat(2000);
        let body = format!(r#"{{"error":{{"message":"{long}"}}}}"#);
        let e = sanitize_upstream_error(body.as_bytes(), &[]).unwrap();
        assert!(e.message.len() <= 1024);
    }
}
