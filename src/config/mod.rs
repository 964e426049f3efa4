//! Configuration: the TOML schema with its defaults, environment overrides and validation.
//!
//! Every field is documented in `examples/llm-gateway.toml`; keep the two in step.

pub mod secret;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::config::secret::{Secret, SecretRef};

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

/// `[server]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the API listener.
    pub listen: SocketAddr,
    /// Separate listener for `/metrics`; when unset, `/metrics` is served on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest accepted request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Time a client has to send the request headers (slowloris guard); also how long an
    /// idle keep-alive connection is kept.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole request body after its headers.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Proxied requests handled at once; more are shed with 503 and `Retry-After`.
    pub max_concurrent_requests: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Tokio worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// A response write that makes no progress this long closes the connection (a client
    /// that stops reading must not hold a stream and its backend slot forever).
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// Set `TCP_NODELAY` on accepted sockets (leave on: Nagle stalls streamed responses).
    pub tcp_nodelay: bool,
    /// Open client connections at most (per listener); beyond it new connections wait in
    /// the listen backlog until one closes.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; 431 beyond. Bounds the
    /// buffer each connection may hold while its headers arrive (8 KiB - 1 MiB).
    pub max_header_bytes: usize,
    /// Listen backlog of the sockets the gateway binds itself (not those systemd passes).
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            max_body_bytes: 4 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 0,
            write_stall_timeout: Duration::from_secs(60),
            tcp_nodelay: true,
            max_connections: 4096,
            max_header_bytes: 64 * 1024,
            listen_backlog: 4096,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Backends tried per request (first try included) before giving up.
    pub max_attempts: u32,
    /// No new attempt starts once this much time has passed since the request arrived.
    #[serde(with = "humantime_serde")]
    pub retry_budget: Duration,
    /// Idle pooled connections are closed after this long; keep it under the backends'
    /// keep-alive timeout (uvicorn/vLLM: 5 s).
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per backend.
    pub pool_max_idle_per_host: usize,
    /// Ask streaming backends for `stream_options.include_usage` so token counts are exact;
    /// the extra usage chunk is removed again when the client did not ask for it.
    pub request_stream_usage: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_host: 64,
            request_stream_usage: true,
        }
    }
}

/// `[health_check]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Probe backends in the background.
    pub enabled: bool,
    /// Time between probes of one backend.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A probe slower than this fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Path probed with GET, relative to the backend's `base_url`.
    pub path: String,
    /// Consecutive failed probes that mark a backend unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive good probes that mark it healthy again.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            path: "/models".to_owned(),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

/// `[circuit_breaker]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failed requests that eject a backend.
    pub failure_threshold: u32,
    /// How long an ejected backend gets no traffic before one probe request is let through.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_duration: Duration::from_secs(10),
        }
    }
}

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

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for the SQLite database and the ledger spool. Unset: `$STATE_DIRECTORY`
    /// (systemd's `StateDirectory=`), else `/var/lib/llm-gateway`.
    pub state_dir: Option<PathBuf>,
    /// `sqlite:///path/file.db` or `postgres:///db?host=/run/postgresql` (peer auth over a
    /// unix socket). Unset: SQLite in `state_dir`. Never put a password here.
    pub database_url: Option<String>,
    /// PostgreSQL password, when the server needs one: a secret reference like `api_key`.
    pub database_password: Option<SecretRef>,
    /// Database connections kept by one instance.
    pub max_connections: u32,
    /// Time to connect to the database (at start and when a connection is needed).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often this instance writes its heartbeat to the instance registry.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Longest time one background database step (a key reload, a heartbeat, a ledger
    /// batch) may take before it is cut short and retried later; also PostgreSQL's
    /// `statement_timeout` for the gateway's connections.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            state_dir: None,
            database_url: None,
            database_password: None,
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(10),
            query_timeout: Duration::from_secs(10),
        }
    }
}

impl StorageConfig {
    /// The state directory in effect.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .or_else(|| {
                // systemd may pass several, separated by ':'; the first is ours.
                std::env::var_os("STATE_DIRECTORY").and_then(|v| {
                    v.to_str()
                        .and_then(|s| s.split(':').next())
                        .map(PathBuf::from)
                })
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/llm-gateway"))
    }
}

/// Whether clients must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every API request needs `Authorization: Bearer <key>` of a key in the database.
    #[default]
    Keys,
    /// No authentication: for trusted networks only. Usage is recorded without a key.
    Open,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `keys` (default) or `open`.
    pub mode: AuthMode,
    /// How often the in-memory key table is reloaded from the database: the longest time a
    /// new, revoked or changed key takes to take effect.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Completion tokens a request that sets no `max_tokens`/`max_completion_tokens`
    /// reserves from its key's `tpm` limit up front (settled with the real use after).
    pub reserve_completion_tokens: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Keys,
            refresh_interval: Duration::from_secs(5),
            reserve_completion_tokens: 1024,
        }
    }
}

/// What happens when the ledger spool reaches `ledger.spool_max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpoolFullPolicy {
    /// New API requests get 503 until the database catches up: nothing is served unrecorded.
    #[default]
    Reject,
    /// Requests are served; their records are dropped and counted in
    /// `llm_gateway_ledger_dropped_total`.
    Drop,
}

/// `[ledger]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Largest size of unshipped records kept in the spool.
    pub spool_max_bytes: u64,
    /// Spool segment file size; shipped segments are deleted whole.
    pub segment_bytes: u64,
    /// `reject` (default) or `drop`, when the spool is full.
    pub on_full: SpoolFullPolicy,
    /// Most records in one multi-row insert.
    pub batch_size: usize,
    /// Longest time a record waits in the spool before a shipping attempt (while the
    /// database is reachable); also how often the spool is synced to disk.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Usage records older than this are deleted in small batches; "0s" keeps them all.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            spool_max_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            on_full: SpoolFullPolicy::Reject,
            batch_size: 500,
            flush_interval: Duration::from_secs(1),
            retention: Duration::ZERO,
        }
    }
}

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

    /// Checks values serde cannot: references, ranges, uniqueness.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_body_bytes == 0 {
            return Err(ConfigError::invalid("server.max_body_bytes", "must be > 0"));
        }
        if s.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrent_requests",
                "must be > 0",
            ));
        }
        if s.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be >= 1",
            ));
        }
        if !(8 * 1024..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(ConfigError::invalid(
                "server.max_header_bytes",
                "must be 8192-1048576",
            ));
        }
        if s.listen_backlog == 0 || s.listen_backlog > 65_535 {
            return Err(ConfigError::invalid(
                "server.listen_backlog",
                "must be 1-65535",
            ));
        }
        self.validate_durations()?;
        if Some(s.listen) == s.metrics_listen && s.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "server.metrics_listen",
                "must differ from server.listen",
            ));
        }
        if self.upstream.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "upstream.max_attempts",
                "must be >= 1",
            ));
        }
        let hc = &self.health_check;
        if hc.enabled {
            if !hc.path.starts_with('/') {
                return Err(ConfigError::invalid(
                    "health_check.path",
                    "must start with '/'",
                ));
            }
            if hc.unhealthy_threshold == 0 || hc.healthy_threshold == 0 {
                return Err(ConfigError::invalid(
                    "health_check.unhealthy_threshold",
                    "thresholds must be >= 1",
                ));
            }
        }
        if self.circuit_breaker.failure_threshold == 0 {
            return Err(ConfigError::invalid(
                "circuit_breaker.failure_threshold",
                "must be >= 1",
            ));
        }
        self.validate_storage()?;
        tracing_subscriber::EnvFilter::try_new(&self.logging.level)
            .map_err(|e| ConfigError::invalid("logging.level", e.to_string()))?;

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
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ConfigError::invalid(
                    key("base_url"),
                    "must be an http:// or https:// URL with a host",
                ));
            }
            if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
                return Err(ConfigError::invalid(
                    key("base_url"),
                    "must not carry a query or credentials (use api_key)",
                ));
            }
            if b.weight == 0 || b.weight > MAX_WEIGHT {
                return Err(ConfigError::invalid(key("weight"), "must be 1-1000000"));
            }
            if b.max_concurrency == 0 {
                return Err(ConfigError::invalid(key("max_concurrency"), "must be >= 1"));
            }
        }
        if self.models.is_empty() {
            return Err(ConfigError::invalid(
                "models",
                "at least one [[models]] entry is required",
            ));
        }
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() || m.name.len() > 256 || m.name.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    format!("models[{i}].name"),
                    "must be 1-256 printable characters",
                ));
            }
            if !model_names.insert(m.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("models[{i}].name"),
                    format!("{:?} is defined twice", m.name),
                ));
            }
            if m.routes.is_empty() {
                return Err(ConfigError::invalid(
                    format!("models[{i}].routes"),
                    "needs at least one route",
                ));
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

    /// Every duration of the configuration: its key, its value, and whether 0 is allowed.
    fn durations(&self) -> Vec<(String, Duration, bool)> {
        let (s, u, hc, st) = (
            &self.server,
            &self.upstream,
            &self.health_check,
            &self.storage,
        );
        let mut all = vec![
            (
                "server.header_read_timeout".to_owned(),
                s.header_read_timeout,
                false,
            ),
            (
                "server.body_read_timeout".to_owned(),
                s.body_read_timeout,
                false,
            ),
            (
                "server.shutdown_timeout".to_owned(),
                s.shutdown_timeout,
                true,
            ),
            (
                "server.write_stall_timeout".to_owned(),
                s.write_stall_timeout,
                false,
            ),
            ("upstream.retry_budget".to_owned(), u.retry_budget, true),
            (
                "upstream.pool_idle_timeout".to_owned(),
                u.pool_idle_timeout,
                true,
            ),
            ("health_check.interval".to_owned(), hc.interval, !hc.enabled),
            ("health_check.timeout".to_owned(), hc.timeout, !hc.enabled),
            (
                "circuit_breaker.open_duration".to_owned(),
                self.circuit_breaker.open_duration,
                true,
            ),
            (
                "storage.connect_timeout".to_owned(),
                st.connect_timeout,
                false,
            ),
            (
                "storage.heartbeat_interval".to_owned(),
                st.heartbeat_interval,
                false,
            ),
            ("storage.query_timeout".to_owned(), st.query_timeout, false),
            (
                "auth.refresh_interval".to_owned(),
                self.auth.refresh_interval,
                false,
            ),
            (
                "ledger.flush_interval".to_owned(),
                self.ledger.flush_interval,
                false,
            ),
        ];
        for (i, b) in self.backends.iter().enumerate() {
            for (field, d) in [
                ("connect_timeout", b.connect_timeout),
                ("request_timeout", b.request_timeout),
                ("first_token_timeout", b.first_token_timeout),
                ("stream_idle_timeout", b.stream_idle_timeout),
            ] {
                all.push((format!("backends[{i}].{field}"), d, false));
            }
        }
        all
    }

    /// Each duration is within its bounds: above 0 where 0 would mean "never" or "spin",
    /// and at most [`MAX_DURATION`] (`ledger.retention`: [`MAX_RETENTION`]), so that no
    /// deadline computed from one can overflow.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        for (key, d, zero_ok) in self.durations() {
            if d.is_zero() && !zero_ok {
                return Err(ConfigError::invalid(key, "must be > 0"));
            }
            if d > MAX_DURATION {
                return Err(ConfigError::invalid(key, "must be at most 365 days"));
            }
        }
        if self.ledger.retention > MAX_RETENTION {
            return Err(ConfigError::invalid(
                "ledger.retention",
                "must be at most 100 years",
            ));
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let st = &self.storage;
        if let Some(url) = &st.database_url {
            let parsed = url::Url::parse(url)
                .map_err(|e| ConfigError::invalid("storage.database_url", e.to_string()))?;
            if !matches!(parsed.scheme(), "sqlite" | "postgres" | "postgresql") {
                return Err(ConfigError::invalid(
                    "storage.database_url",
                    "must start with sqlite:, postgres: or postgresql:",
                ));
            }
            if parsed.password().is_some() {
                return Err(ConfigError::invalid(
                    "storage.database_url",
                    "must not carry a password (use storage.database_password)",
                ));
            }
            // What the driver itself accepts, so a bad URL fails here, not at start.
            let driver = if parsed.scheme() == "sqlite" {
                sqlx::sqlite::SqliteConnectOptions::from_str(url).map(drop)
            } else {
                sqlx::postgres::PgConnectOptions::from_str(url).map(drop)
            };
            driver.map_err(|e| ConfigError::invalid("storage.database_url", e.to_string()))?;
        }
        if st.max_connections == 0 {
            return Err(ConfigError::invalid(
                "storage.max_connections",
                "must be >= 1",
            ));
        }
        let l = &self.ledger;
        if l.batch_size == 0 || l.batch_size > 10_000 {
            return Err(ConfigError::invalid("ledger.batch_size", "must be 1-10000"));
        }
        if l.segment_bytes < 4096 {
            return Err(ConfigError::invalid(
                "ledger.segment_bytes",
                "must be >= 4096",
            ));
        }
        if l.spool_max_bytes < l.segment_bytes {
            return Err(ConfigError::invalid(
                "ledger.spool_max_bytes",
                "must be >= ledger.segment_bytes",
            ));
        }
        Ok(())
    }

    /// The database in effect: `storage.database_url`, or SQLite in the state directory.
    pub fn database_url(&self) -> String {
        self.storage.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.storage.state_dir().join("llm-gateway.db").display()
            )
        })
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

    /// The configuration `llm-gateway demo` runs: one model on the bundled mock upstream.
    /// Keys are required, as in production; the usage ledger is SQLite in `state_dir`.
    pub fn demo(
        listen: SocketAddr,
        mock: SocketAddr,
        state_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let state_dir = toml::Value::String(state_dir.display().to_string());
        let text = format!(
            r#"
[server]
listen = "{listen}"

[storage]
state_dir = {state_dir}

[[backends]]
name = "mock"
base_url = "http://{mock}/v1"

[[models]]
name = "demo"
routes = [{{ backend = "mock" }}]
"#
        );
        Self::from_toml(&text)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Where `LoadCredential=` puts files, if the service manager set it.
pub fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}
