//! The OpenAI endpoints the gateway proxies: their upstream path, metric label, and the
//! parameter each requires besides `model`.

use serde_json::value::RawValue;

use crate::api::error::ApiError;

/// The OpenAI endpoints the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// Metric label.
    /// `gen_ai.operation.name` (OpenTelemetry's GenAI semantic conventions).
    pub(crate) fn operation(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The parameter every request must carry besides `model`, and what it must be.
    pub(crate) fn required(self, value: Option<&RawValue>) -> Result<(), ApiError> {
        let first = value.and_then(|v| v.get().bytes().next());
        let (param, ok, expected) = match self {
            Self::Chat => ("messages", first.map(|b| b == b'['), "an array"),
            Self::Completions => (
                "prompt",
                first.map(|b| b == b'"' || b == b'['),
                "a string or an array",
            ),
            Self::Embeddings => (
                "input",
                first.map(|b| b == b'"' || b == b'['),
                "a string or an array",
            ),
        };
        match ok {
            None => Err(ApiError::missing(param)),
            Some(false) => Err(ApiError::invalid_type(param, expected)),
            Some(true) => Ok(()),
        }
    }

    pub(crate) fn can_stream(self) -> bool {
        self != Self::Embeddings
    }
}
