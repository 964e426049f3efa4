//! The proxied API endpoints by the names the configuration, the ledger and the metrics
//! use, and a model's set of them (`[[models]] endpoints`).

use serde::Deserialize;

/// One proxied API endpoint (what the gateway does with each: `proxy/endpoint.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses` (OpenAI's Responses API)
    Responses,
    /// `POST /v1/rerank`, `/rerank`, `/v2/rerank` (vLLM, Jina/Cohere style)
    Rerank,
    /// `POST /v1/score`, `/score` (vLLM)
    Score,
    /// `POST /tokenize` (vLLM)
    Tokenize,
    /// `POST /detokenize` (vLLM)
    Detokenize,
    /// `POST /pooling` (vLLM)
    Pooling,
    /// `POST /classify` (vLLM)
    Classify,
}

impl Endpoint {
    /// Every endpoint, in the order the docs list them.
    pub const ALL: [Self; 10] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Rerank,
        Self::Score,
        Self::Tokenize,
        Self::Detokenize,
        Self::Pooling,
        Self::Classify,
    ];

    /// The name in the configuration, the ledger's `endpoint` column and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Rerank => "rerank",
            Self::Score => "score",
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::Pooling => "pooling",
            Self::Classify => "classify",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The endpoints a model's backends serve: all of them unless its config names some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSet(u16);

impl EndpointSet {
    /// Every endpoint.
    pub fn all() -> Self {
        Self::from_list(&Endpoint::ALL)
    }

    /// Exactly these.
    pub fn from_list(list: &[Endpoint]) -> Self {
        Self(list.iter().fold(0, |set, e| set | e.bit()))
    }

    /// Whether `endpoint` is in the set.
    pub fn contains(self, endpoint: Endpoint) -> bool {
        self.0 & endpoint.bit() != 0
    }

    /// The endpoints in the set, in `Endpoint::ALL`'s order.
    pub fn iter(self) -> impl Iterator<Item = Endpoint> {
        Endpoint::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_endpoint_and_sets_hold_what_they_were_given() {
        for e in Endpoint::ALL {
            let parsed: Endpoint =
                serde_json::from_value(serde_json::Value::String(e.label().to_owned())).unwrap();
            assert_eq!(parsed, e);
        }
        let set = EndpointSet::from_list(&[Endpoint::Rerank, Endpoint::Score]);
        assert!(set.contains(Endpoint::Rerank) && set.contains(Endpoint::Score));
        assert!(!set.contains(Endpoint::ChatCompletions));
        assert_eq!(set.iter().count(), 2);
        assert_eq!(EndpointSet::all().iter().count(), Endpoint::ALL.len());
    }
}
