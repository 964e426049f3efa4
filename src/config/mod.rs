//! Configuration: the TOML schema with its defaults, environment overrides and validation.
//! One file per section (`server.rs`, `upstream.rs`, `logging.rs`, `storage.rs`, `auth.rs`,
//! `backends.rs`), each with the checks of its own keys; secret references in `secret.rs`.
//! Here: the whole `Config`, loading, the order of the checks, and the bounds every
//! duration shares.
//!
//! Every field is documented in `examples/llm-gateway.toml`; keep the two in step. Depends on
//! nothing else in the crate.

mod auth;
mod backends;
mod endpoints;
mod logging;
pub mod secret;
mod server;
mod storage;
mod telemetry;
mod upstream;

pub use auth::{AuthConfig, AuthMode};
pub use backends::{BackendConfig, ModelConfig, RouteConfig};
pub use endpoints::{Endpoint, EndpointSet};
pub use logging::{AccessLog, LogFormat, LogOutput, LoggingConfig};
pub use server::ServerConfig;
pub use storage::{LedgerConfig, SpoolFullPolicy, StorageConfig};
pub use telemetry::TracingConfig;
pub use upstream::{BreakerConfig, HealthCheckConfig, UpstreamConfig};

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::config::secret::Secret;

/// Prefix of environment variables that override config keys:
/// `LLM_GATEWAY__SERVER__LISTEN` overrides `server.listen`.
pub const ENV_PREFIX: &str = "LLM_GATEWAY__";

/// Why a configuration could not be loaded; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment override could not be parsed into the schema.
    #[error("{}", describe(.0))]
    Parse(Box<figment::Error>),
    /// The file parsed but a value is not acceptable.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// One line per problem: `key.path: what is wrong (where it came from)`. Values found under
/// `api_key` are never echoed: a user who pasted a key there must not see it in logs.
fn describe(error: &figment::Error) -> String {
    let lines: Vec<String> = error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_ascii_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (in {})", m.name))
                .unwrap_or_default();
            let what = if e.path.iter().any(|p| p == "api_key") {
                "must be { credential = \"name\" }, { file = \"/path\" } or { env = \"VAR\" }; \
                 the key itself never goes in the config"
                    .to_owned()
            } else {
                e.kind.to_string()
            };
            if key.is_empty() {
                format!("{what}{source}")
            } else {
                format!("{key}: {what}{source}")
            }
        })
        .collect();
    lines.join("; ")
}

/// `Err(key: reason)` when `bad`: the shape of most checks.
fn fail_if(bad: bool, key: impl Into<String>, reason: &str) -> Result<(), ConfigError> {
    if bad {
        Err(ConfigError::invalid(key, reason))
    } else {
        Ok(())
    }
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, limits and shutdown behaviour.
    #[serde(default)]
    pub server: ServerConfig,
    /// Retry, failover and connection pool policy towards backends.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Active background health checks.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// Passive circuit breaker per backend.
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// Log level and format.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// State directory and database.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Client authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Usage ledger: spool and shipping to the database.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Inference servers the gateway may send requests to.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Public model names and the backends that serve them.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

/// Longest duration any setting may have (one year): deadlines are computed by adding
/// durations to the current time, and this keeps every sum far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest backend weight: ratios beyond a million to one mean nothing for traffic.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Longest `ledger.retention` (100 years).
pub const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration setting: its key, its value, and whether 0 is allowed.
pub(super) struct DurationSetting {
    key: String,
    value: Duration,
    zero_ok: bool,
}

impl DurationSetting {
    fn new(key: impl Into<String>, value: Duration, zero_ok: bool) -> Self {
        Self {
            key: key.into(),
            value,
            zero_ok,
        }
    }
}

impl Config {
    /// Loads `path` (when given), applies `LLM_GATEWAY__*` overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("{}: no such file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// Parses a TOML document (no environment overrides) and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Self = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: references, ranges, uniqueness; section by section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.validate_durations()?;
        self.server.validate_listeners()?;
        self.validate_upstream()?;
        self.validate_storage()?;
        self.logging.validate()?;
        self.tracing.validate()?;
        self.validate_backends_and_models()
    }

    /// Each duration is within its bounds: above 0 where 0 would mean "never" or "spin",
    /// and at most [`MAX_DURATION`] (`ledger.retention`: [`MAX_RETENTION`]), so that no
    /// deadline computed from one can overflow. Each section lists its own durations.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        let all = [
            self.server.durations(),
            self.upstream_durations(),
            self.storage_durations(),
            self.auth.durations(),
            self.ledger_durations(),
            self.backend_durations(),
        ];
        for d in all.iter().flatten() {
            if d.value.is_zero() && !d.zero_ok {
                return Err(ConfigError::invalid(d.key.clone(), "must be > 0"));
            }
            if d.value > MAX_DURATION {
                return Err(ConfigError::invalid(
                    d.key.clone(),
                    "must be at most 365 days",
                ));
            }
        }
        self.validate_retention()
    }

    /// Reads every backend's API key from where its reference points.
    pub fn resolve_secrets(&self) -> Result<Vec<Option<Secret>>, ConfigError> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.api_key
                    .as_ref()
                    .map(|r| {
                        r.resolve().map_err(|reason| {
                            ConfigError::invalid(format!("backends[{i}].api_key"), reason)
                        })
                    })
                    .transpose()
            })
            .collect()
    }
}

/// Where `LoadCredential=` puts files, if the service manager set it.
pub fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::Config;

    /// The key a config with two faults is reported for.
    fn first_fault(extra: &str) -> String {
        let text = format!(
            "{extra}\n[[backends]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             [[models]]\nname = \"m\"\nroutes = [{{ backend = \"b\" }}]\n"
        );
        match Config::from_toml(&text).unwrap_err() {
            super::ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn of_two_faults_the_one_checked_first_is_reported() {
        // Durations are checked in the order of the sections, auth before ledger...
        assert_eq!(
            first_fault("[auth]\nrefresh_interval = \"0s\"\n[ledger]\nflush_interval = \"0s\""),
            "auth.refresh_interval"
        );
        // ...and all of them before the listeners.
        assert_eq!(
            first_fault(
                "[server]\nlisten = \"127.0.0.1:9\"\nmetrics_listen = \"127.0.0.1:9\"\n\
                 shutdown_timeout = \"400d\""
            ),
            "server.shutdown_timeout"
        );
        // A plain server value comes first of all.
        assert_eq!(
            first_fault("[server]\nmax_body_bytes = 0\n[auth]\nrefresh_interval = \"0s\""),
            "server.max_body_bytes"
        );
    }
}
