//! `[storage]` and `[ledger]`: the state directory, the database, and the usage ledger's
//! spool and shipping.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::secret::SecretRef;
use super::{Config, ConfigError, DurationSetting, MAX_RETENTION, fail_if};

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

impl Config {
    /// Checks `[storage]` and `[ledger]`.
    pub(super) fn validate_storage(&self) -> Result<(), ConfigError> {
        let st = &self.storage;
        if let Some(url) = &st.database_url {
            let parsed = url::Url::parse(url)
                .map_err(|e| ConfigError::invalid("storage.database_url", e.to_string()))?;
            fail_if(
                !matches!(parsed.scheme(), "sqlite" | "postgres" | "postgresql"),
                "storage.database_url",
                "must start with sqlite:, postgres: or postgresql:",
            )?;
            fail_if(
                parsed.password().is_some(),
                "storage.database_url",
                "must not carry a password (use storage.database_password)",
            )?;
            // What the driver itself accepts, so a bad URL fails here, not at start.
            let driver = if parsed.scheme() == "sqlite" {
                sqlx::sqlite::SqliteConnectOptions::from_str(url).map(drop)
            } else {
                sqlx::postgres::PgConnectOptions::from_str(url).map(drop)
            };
            driver.map_err(|e| ConfigError::invalid("storage.database_url", e.to_string()))?;
        }
        fail_if(
            st.max_connections == 0,
            "storage.max_connections",
            "must be >= 1",
        )?;
        let l = &self.ledger;
        fail_if(
            l.batch_size == 0 || l.batch_size > 10_000,
            "ledger.batch_size",
            "must be 1-10000",
        )?;
        fail_if(
            l.segment_bytes < 4096,
            "ledger.segment_bytes",
            "must be >= 4096",
        )?;
        fail_if(
            l.spool_max_bytes < l.segment_bytes,
            "ledger.spool_max_bytes",
            "must be >= ledger.segment_bytes",
        )?;
        Ok(())
    }

    pub(super) fn storage_durations(&self) -> Vec<DurationSetting> {
        let st = &self.storage;
        vec![
            DurationSetting::new("storage.connect_timeout", st.connect_timeout, false),
            DurationSetting::new("storage.heartbeat_interval", st.heartbeat_interval, false),
            DurationSetting::new("storage.query_timeout", st.query_timeout, false),
        ]
    }

    pub(super) fn ledger_durations(&self) -> Vec<DurationSetting> {
        vec![DurationSetting::new(
            "ledger.flush_interval",
            self.ledger.flush_interval,
            false,
        )]
    }

    /// `ledger.retention` may be longer than other durations: [`MAX_RETENTION`].
    pub(super) fn validate_retention(&self) -> Result<(), ConfigError> {
        fail_if(
            self.ledger.retention > MAX_RETENTION,
            "ledger.retention",
            "must be at most 100 years",
        )?;
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
}
