//! `[[backends]]` and `[[models]]`: the inference servers, and the public model names with
//! the routes (backend, upstream model name) that serve them.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::endpoints::{Endpoint, EndpointSet};
use super::secret::SecretRef;
use super::{Config, ConfigError, DurationSetting, MAX_WEIGHT, fail_if};

/// `[[backends]]`: one inference server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used in metrics, logs and `/health`.
    pub name: String,
    /// OpenAI-compatible base URL including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Where the backend's API key comes from: `{ credential = "name" }`,
    /// `{ file = "/path" }` or `{ env = "VAR" }`. Never the key itself.
    #[serde(default)]
    pub api_key: Option<SecretRef>,
    /// Share of traffic relative to the model's other backends.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Requests sent to this backend at once; it is skipped while full.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Time to open a TCP connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Total time for a non-streaming request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Streaming: time until the first body bytes (time to first token).
    #[serde(default = "default_first_token_timeout", with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Streaming: longest silence between two chunks.
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
}

fn default_weight() -> u32 {
    1
}
fn default_max_concurrency() -> usize {
    256
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_first_token_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `[[models]]`: a public model name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name clients put in `model`.
    pub name: String,
    /// Backends serving it (at least one).
    pub routes: Vec<RouteConfig>,
    /// The API endpoints its backends serve (`chat_completions`, `rerank`, ...); every
    /// endpoint when absent. A request to another one is answered 404 by the gateway.
    #[serde(default)]
    pub endpoints: Option<Vec<Endpoint>>,
    /// Models tried, in order, when none of this model's backends can take a request
    /// (their own fallbacks are not followed).
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

impl ModelConfig {
    /// The endpoints its backends serve.
    pub fn endpoint_set(&self) -> EndpointSet {
        self.endpoints
            .as_deref()
            .map_or_else(EndpointSet::all, EndpointSet::from_list)
    }
}

/// `[[models.routes]]`: one backend for a model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name of a `[[backends]]` entry.
    pub backend: String,
    /// Model name sent to this backend instead of the public name.
    #[serde(default)]
    pub upstream_model: Option<String>,
}

impl Config {
    /// Checks `[[backends]]` and `[[models]]`: names, URLs, references between them.
    pub(super) fn validate_backends_and_models(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            if !valid_name(&b.name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{:?}: use 1-64 of [A-Za-z0-9._-]", b.name),
                ));
            }
            if !names.insert(b.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{:?} is used by two backends", b.name),
                ));
            }
            let url = reqwest::Url::parse(&b.base_url)
                .map_err(|e| ConfigError::invalid(key("base_url"), format!("{e}")))?;
            fail_if(
                !matches!(url.scheme(), "http" | "https") || url.host_str().is_none(),
                key("base_url"),
                "must be an http:// or https:// URL with a host",
            )?;
            fail_if(
                url.query().is_some() || !url.username().is_empty() || url.password().is_some(),
                key("base_url"),
                "must not carry a query or credentials (use api_key)",
            )?;
            fail_if(
                b.weight == 0 || b.weight > MAX_WEIGHT,
                key("weight"),
                "must be 1-1000000",
            )?;
            fail_if(
                b.max_concurrency == 0,
                key("max_concurrency"),
                "must be >= 1",
            )?;
        }
        fail_if(
            self.models.is_empty(),
            "models",
            "at least one [[models]] entry is required",
        )?;
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            fail_if(
                m.name.is_empty() || m.name.len() > 256 || m.name.chars().any(char::is_control),
                format!("models[{i}].name"),
                "must be 1-256 printable characters",
            )?;
            if !model_names.insert(m.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("models[{i}].name"),
                    format!("{:?} is defined twice", m.name),
                ));
            }
            fail_if(
                m.routes.is_empty(),
                format!("models[{i}].routes"),
                "needs at least one route",
            )?;
            fail_if(
                m.endpoints.as_ref().is_some_and(Vec::is_empty),
                format!("models[{i}].endpoints"),
                "names no endpoint: leave it out to serve every endpoint",
            )?;
            let mut named = HashSet::new();
            for (j, f) in m.fallbacks.iter().enumerate() {
                let key = format!("models[{i}].fallbacks[{j}]");
                if !self.models.iter().any(|other| other.name == *f) {
                    return Err(ConfigError::invalid(key, format!("no model named {f:?}")));
                }
                fail_if(
                    *f == m.name,
                    key.clone(),
                    "a model cannot fall back to itself",
                )?;
                if !named.insert(f.as_str()) {
                    return Err(ConfigError::invalid(key, format!("{f:?} listed twice")));
                }
            }
            let mut seen = HashSet::new();
            for (j, r) in m.routes.iter().enumerate() {
                let key = format!("models[{i}].routes[{j}].backend");
                if !names.contains(r.backend.as_str()) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("no backend named {:?}", r.backend),
                    ));
                }
                if !seen.insert(r.backend.as_str()) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("backend {:?} listed twice", r.backend),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn backend_durations(&self) -> Vec<DurationSetting> {
        let mut all = Vec::with_capacity(4 * self.backends.len());
        for (i, b) in self.backends.iter().enumerate() {
            for (field, d) in [
                ("connect_timeout", b.connect_timeout),
                ("request_timeout", b.request_timeout),
                ("first_token_timeout", b.first_token_timeout),
                ("stream_idle_timeout", b.stream_idle_timeout),
            ] {
                all.push(DurationSetting::new(
                    format!("backends[{i}].{field}"),
                    d,
                    false,
                ));
            }
        }
        all
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}
