//! `[auth]`: whether clients need an API key, and how the key table is kept fresh.

use std::time::Duration;

use serde::Deserialize;

use super::DurationSetting;

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

impl AuthConfig {
    pub(super) fn durations(&self) -> Vec<DurationSetting> {
        vec![DurationSetting::new(
            "auth.refresh_interval",
            self.refresh_interval,
            false,
        )]
    }
}
