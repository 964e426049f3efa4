//! `[upstream]`, `[health_check]`, `[circuit_breaker]`: how the gateway treats its backends
//! as a group (failover, pooling, probing, ejection).

use std::time::Duration;

use serde::Deserialize;

use super::{Config, ConfigError, DurationSetting, fail_if};

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Backends tried per request (first try included) before giving up.
    pub max_attempts: u32,
    /// No new attempt starts once this much time has passed since the request arrived.
    #[serde(with = "humantime_serde")]
    pub retry_budget: Duration,
    /// Idle pooled connections are not reused after this long (the next request closes
    /// them); keep it under the backends' keep-alive timeout (uvicorn/vLLM: 5 s).
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per backend.
    pub pool_max_idle_per_host: usize,
    /// Ask streaming backends for `stream_options.include_usage` so token counts are exact;
    /// the extra usage chunk is removed again when the client did not ask for it.
    pub request_stream_usage: bool,
    /// Stored responses (Responses API) whose backend and key the gateway remembers, so
    /// that follow-ups and `GET`/`DELETE /v1/responses/{id}` reach the backend that has
    /// them; the oldest is forgotten first. 0: none.
    pub stored_responses_max: usize,
    /// Requests of one model that may wait for a backend when all of its backends are at
    /// `max_concurrency` (turns go round-robin over keys); 0: none wait, 503 at once.
    pub queue_max: usize,
    /// The longest a request waits in the queue before a 503.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_host: 64,
            request_stream_usage: true,
            stored_responses_max: 100_000,
            queue_max: 1024,
            queue_timeout: Duration::from_secs(30),
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

impl Config {
    /// Checks `[upstream]`, `[health_check]` and `[circuit_breaker]`.
    pub(super) fn validate_upstream(&self) -> Result<(), ConfigError> {
        fail_if(
            self.upstream.max_attempts == 0,
            "upstream.max_attempts",
            "must be >= 1",
        )?;
        fail_if(
            self.upstream.queue_max > 1_000_000,
            "upstream.queue_max",
            "must be <= 1000000",
        )?;
        fail_if(
            self.upstream.stored_responses_max > 10_000_000,
            "upstream.stored_responses_max",
            "must be <= 10000000 (about 100 bytes each)",
        )?;
        let hc = &self.health_check;
        if hc.enabled {
            fail_if(
                !hc.path.starts_with('/'),
                "health_check.path",
                "must start with '/'",
            )?;
            fail_if(
                hc.unhealthy_threshold == 0 || hc.healthy_threshold == 0,
                "health_check.unhealthy_threshold",
                "thresholds must be >= 1",
            )?;
        }
        fail_if(
            self.circuit_breaker.failure_threshold == 0,
            "circuit_breaker.failure_threshold",
            "must be >= 1",
        )?;
        Ok(())
    }

    pub(super) fn upstream_durations(&self) -> Vec<DurationSetting> {
        let (u, hc) = (&self.upstream, &self.health_check);
        vec![
            DurationSetting::new("upstream.retry_budget", u.retry_budget, true),
            DurationSetting::new("upstream.pool_idle_timeout", u.pool_idle_timeout, true),
            DurationSetting::new("upstream.queue_timeout", u.queue_timeout, u.queue_max == 0),
            DurationSetting::new("health_check.interval", hc.interval, !hc.enabled),
            DurationSetting::new("health_check.timeout", hc.timeout, !hc.enabled),
            DurationSetting::new(
                "circuit_breaker.open_duration",
                self.circuit_breaker.open_duration,
                true,
            ),
        ]
    }
}
