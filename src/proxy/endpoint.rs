//! What the gateway does with each proxied endpoint: its upstream path, the parameters it
//! checks besides `model`, whether it streams, and what its usage means.

use serde_json::value::RawValue;

use crate::api::error::ApiError;
pub(crate) use crate::config::Endpoint;

/// What an endpoint's tokens are, for the ledger and the token limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metering {
    /// Prompt and completion tokens (chat, completions, responses).
    Generation,
    /// Input tokens only (embeddings, rerank, score, pooling, classify): the usage's
    /// `prompt_tokens`, else its `total_tokens`.
    Input,
    /// No model work (tokenize, detokenize): no tokens; requests still count.
    Free,
}

/// What a parameter must be.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Array,
    String,
    StringOrArray,
}

impl Shape {
    fn admits(self, first: u8) -> bool {
        match self {
            Self::Array => first == b'[',
            Self::String => first == b'"',
            Self::StringOrArray => first == b'"' || first == b'[',
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Self::Array => "an array",
            Self::String => "a string",
            Self::StringOrArray => "a string or an array",
        }
    }
}

impl Endpoint {
    /// The path on the backend: under its `base_url`, or for vLLM's own endpoints, which
    /// it serves beside `/v1`, under the base URL's root (`upstream::backend::ROOT_PATHS`).
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
            Self::Responses => "/responses",
            Self::Rerank => "/rerank",
            Self::Score => "/score",
            Self::Tokenize => "/tokenize",
            Self::Detokenize => "/detokenize",
            Self::Pooling => "/pooling",
            Self::Classify => "/classify",
        }
    }

    /// The path clients use (`api::routes` adds the aliases vLLM also serves).
    pub(crate) fn route(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Rerank => "/v1/rerank",
            Self::Score => "/v1/score",
            Self::Tokenize => "/tokenize",
            Self::Detokenize => "/detokenize",
            Self::Pooling => "/pooling",
            Self::Classify => "/classify",
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry's GenAI semantic conventions; the endpoint's
    /// own name where they have none).
    pub(crate) fn operation(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Responses => "chat",
            Self::Completions => "text_completion",
            other => other.label(),
        }
    }

    /// The parameters a request must carry besides `model`, and what each must be. Only
    /// what every server of the endpoint requires; the backend checks the rest.
    fn required(self) -> &'static [(&'static str, Shape)] {
        match self {
            Self::ChatCompletions => &[("messages", Shape::Array)],
            Self::Completions => &[("prompt", Shape::StringOrArray)],
            Self::Embeddings | Self::Classify => &[("input", Shape::StringOrArray)],
            Self::Rerank => &[("query", Shape::String), ("documents", Shape::Array)],
            Self::Detokenize => &[("tokens", Shape::Array)],
            Self::Responses | Self::Score | Self::Tokenize | Self::Pooling => &[],
        }
    }

    /// Checks the required parameters; `field` gives a top-level field's raw value.
    pub(crate) fn check<'a>(
        self,
        field: impl Fn(&str) -> Option<&'a RawValue>,
    ) -> Result<(), ApiError> {
        for (param, shape) in self.required() {
            match field(param).and_then(|v| v.get().bytes().next()) {
                None => return Err(ApiError::missing(param)),
                Some(first) if !shape.admits(first) => {
                    return Err(ApiError::invalid_type(param, shape.expected()));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether `stream: true` is accepted.
    pub(crate) fn can_stream(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Completions | Self::Responses
        )
    }

    /// Whether a stream reports usage only when asked (`stream_options.include_usage`);
    /// the Responses API always sends it in its `response.completed` event.
    pub(crate) fn stream_usage_on_request(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }

    /// What its tokens are.
    pub(crate) fn metering(self) -> Metering {
        match self {
            Self::ChatCompletions | Self::Completions | Self::Responses => Metering::Generation,
            Self::Tokenize | Self::Detokenize => Metering::Free,
            Self::Embeddings | Self::Rerank | Self::Score | Self::Pooling | Self::Classify => {
                Metering::Input
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::backend::{PROXIED_PATHS, ROOT_PATHS};

    /// A backend builds a target for exactly the paths listed there: an endpoint whose path
    /// is in neither list would answer every request with a 502.
    #[test]
    fn every_endpoint_has_a_target_on_every_backend() {
        for e in Endpoint::ALL {
            assert!(
                PROXIED_PATHS.contains(&e.path()) || ROOT_PATHS.contains(&e.path()),
                "{e:?}"
            );
            let root = !e.route().starts_with("/v1/");
            assert_eq!(ROOT_PATHS.contains(&e.path()), root, "{e:?}");
        }
    }
}
