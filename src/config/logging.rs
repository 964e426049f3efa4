//! `[logging]`: level, format, output (journald or stderr) and the access log.

use serde::Deserialize;

use super::ConfigError;

/// Log output format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// journald when stderr is connected to it (`JOURNAL_STREAM` matches), else stderr.
    #[default]
    Auto,
    /// Lines on stderr (`format`).
    Stderr,
    /// journald's native protocol, with structured fields.
    Journald,
}

/// `[logging]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `tracing` filter directive, e.g. `info` or `info,llm_gateway=debug`; `RUST_LOG` wins.
    pub level: String,
    /// `text` or `json`, for stderr.
    pub format: LogFormat,
    /// `auto`, `stderr` or `journald`.
    pub output: LogOutput,
    /// Which requests get an access log event: `all`, `errors` or `off`.
    pub access_log: AccessLog,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
            output: LogOutput::Auto,
            access_log: AccessLog::All,
        }
    }
}

/// Which requests are written to the access log (target `llm_gateway::access`, level info).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// Every request (about 550 bytes each).
    #[default]
    All,
    /// Requests answered with a status of 400 or more, and streams that did not complete.
    Errors,
    /// None (metrics and the usage ledger still count every request).
    Off,
}

impl LoggingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| ConfigError::invalid("logging.level", e.to_string()))?;
        Ok(())
    }
}
