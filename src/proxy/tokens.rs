//! Token usage: what upstreams report, merged field-wise, or estimated when they report none.

use serde::Deserialize;

use super::endpoint::Metering;

/// A usage object as OpenAI-compatible servers send it; absent fields stay `None`. The
/// Responses API names the first two `input_tokens` and `output_tokens`; rerank reports
/// only `total_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: Option<u64>,
    #[serde(default)]
    pub total_tokens: Option<u64>,
}

impl Usage {
    /// Field-wise maximum: right for servers that send one final usage object and for those
    /// that send running totals.
    pub fn merge(&mut self, other: Usage) {
        self.prompt_tokens = max_opt(self.prompt_tokens, other.prompt_tokens);
        self.completion_tokens = max_opt(self.completion_tokens, other.completion_tokens);
        self.total_tokens = max_opt(self.total_tokens, other.total_tokens);
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Token counts recorded for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    /// True when at least one figure is the gateway's estimate, not the upstream's count.
    pub estimated: bool,
}

/// Rough bytes per token for English text and JSON; only used when upstream is silent.
const BYTES_PER_TOKEN: u64 = 4;

impl Tokens {
    /// Reported usage where present; otherwise prompt from request size and completion from
    /// `completion_estimate`, flagged as estimated.
    pub fn from_usage(usage: Option<Usage>, prompt_bytes: usize, completion_estimate: u64) -> Self {
        let usage = usage.unwrap_or_default();
        let prompt = usage.prompt_tokens;
        let completion = usage.completion_tokens;
        Self {
            prompt: prompt.unwrap_or((prompt_bytes as u64).div_ceil(BYTES_PER_TOKEN)),
            completion: completion.unwrap_or(completion_estimate),
            estimated: prompt.is_none() || completion.is_none(),
        }
    }

    /// The counts for an endpoint that meters `metering`: reported where present, else
    /// estimated (prompt from the request's size, completion as `completion_estimate`).
    pub(crate) fn metered(
        metering: Metering,
        usage: Option<Usage>,
        prompt_bytes: usize,
        completion_estimate: u64,
    ) -> Self {
        match metering {
            Metering::Generation => Self::from_usage(usage, prompt_bytes, completion_estimate),
            Metering::Input => {
                let reported = usage.and_then(|u| u.prompt_tokens.or(u.total_tokens));
                Self {
                    prompt: reported.unwrap_or((prompt_bytes as u64).div_ceil(BYTES_PER_TOKEN)),
                    completion: 0,
                    estimated: reported.is_none(),
                }
            }
            Metering::Free => Self::default(),
        }
    }

    /// Completion estimate for a non-streamed body without usage.
    pub fn estimate_from_bytes(bytes: usize) -> u64 {
        (bytes as u64).div_ceil(BYTES_PER_TOKEN)
    }
}

/// Extracts `usage` from a complete (non-streamed) JSON response. Servers put it last, so
/// the body is searched backwards for the key and only its object is parsed; a quote
/// inside a JSON string is always escaped, so an unescaped `"usage"` is a key.
pub fn from_response_body(body: &[u8]) -> Option<Usage> {
    let finder = memchr::memmem::FinderRev::new(b"\"usage\"");
    let mut end = body.len();
    while let Some(at) = finder.rfind(&body[..end]) {
        end = at;
        if at > 0 && body[at - 1] == b'\\' {
            continue;
        }
        let rest = body[at + 7..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut de = serde_json::Deserializer::from_slice(value);
        return Option::<Usage>::deserialize(&mut de).ok().flatten();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_takes_fieldwise_max() {
        let mut u = Usage {
            prompt_tokens: Some(10),
            completion_tokens: Some(1),
            total_tokens: None,
        };
        u.merge(Usage {
            prompt_tokens: None,
            completion_tokens: Some(7),
            total_tokens: None,
        });
        assert_eq!(u.prompt_tokens, Some(10));
        assert_eq!(u.completion_tokens, Some(7));
    }

    #[test]
    fn missing_usage_is_estimated_and_flagged() {
        let t = Tokens::from_usage(None, 41, 5);
        assert_eq!((t.prompt, t.completion, t.estimated), (11, 5, true));
        let exact = Tokens::from_usage(
            Some(Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(4),
                total_tokens: None,
            }),
            1000,
            99,
        );
        assert_eq!(
            (exact.prompt, exact.completion, exact.estimated),
            (3, 4, false)
        );
    }

    #[test]
    fn reads_usage_from_body() {
        let u = from_response_body(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#);
        assert_eq!(u.unwrap().completion_tokens, Some(2));
        assert_eq!(from_response_body(br#"{"usage":null}"#), None);
        let quoted = br#"{"choices":[{"text":"say \"usage\": {\"prompt_tokens\": 99}"}],"usage" : {"prompt_tokens":1}}"#;
        assert_eq!(from_response_body(quoted).unwrap().prompt_tokens, Some(1));
        let only_quoted = br#"{"choices":[{"text":"\"usage\": {\"prompt_tokens\": 99}"}]}"#;
        assert_eq!(from_response_body(only_quoted), None);
    }

    #[test]
    fn every_endpoints_usage_is_read_by_its_metering() {
        let responses = from_response_body(
            br#"{"id":"resp_1","output":[],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":13}}"#,
        );
        let t = Tokens::metered(Metering::Generation, responses, 1000, 99);
        assert_eq!((t.prompt, t.completion, t.estimated), (9, 4, false));
        let rerank = from_response_body(br#"{"id":"r","usage":{"total_tokens":21},"results":[]}"#);
        let t = Tokens::metered(Metering::Input, rerank, 1000, 99);
        assert_eq!((t.prompt, t.completion, t.estimated), (21, 0, false));
        let t = Tokens::metered(Metering::Input, None, 40, 99);
        assert_eq!((t.prompt, t.completion, t.estimated), (10, 0, true));
        let t = Tokens::metered(Metering::Free, rerank, 1000, 99);
        assert_eq!((t.prompt, t.completion, t.estimated), (0, 0, false));
    }
}
