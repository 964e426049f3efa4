//! Active health checks: a background loop that probes every backend and caches the result.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::config::HealthCheckConfig;
use crate::runtime::periodic::{Cut, Periodic};

use super::Backend;
use crate::runtime::state::AppState;

/// Probes the backends of the configuration in effect every `health_check.interval` until
/// `cancel` fires; a reload changes what is probed and how from the next round on. The
/// request path only reads the cached result, so a slow backend never slows a request.
pub async fn run(state: Arc<AppState>, cancel: CancellationToken) {
    let task = Periodic::new("health probes", cancel);
    loop {
        let current = state.current();
        let cfg = &current.config.health_check;
        if cfg.enabled {
            let probes = current.backends.iter().map(|b| async {
                let result = probe(b, cfg).await;
                if let Err(e) = &result
                    && b.health() != super::Health::Unhealthy
                {
                    tracing::warn!(backend = %b.name, error = %e, "health probe failed");
                }
                b.record_probe(result, cfg.healthy_threshold, cfg.unhealthy_threshold);
            });
            // Each probe has its own timeout; the round's bound is only a backstop.
            let bound = cfg
                .timeout
                .saturating_add(std::time::Duration::from_secs(1));
            if task.step(bound, join_all(probes)).await == Err(Cut::Stopped) {
                return;
            }
        }
        // Disabled: look again after a while, in case a reload turned probing on.
        let pause = if cfg.enabled {
            cfg.interval
        } else {
            IDLE_RECHECK
        };
        drop(current);
        if !task.pause(pause, None).await {
            return;
        }
    }
}

/// How often a disabled prober checks whether a reload enabled it.
const IDLE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

async fn probe(backend: &Backend, cfg: &HealthCheckConfig) -> Result<(), String> {
    let mut request = backend
        .probe_client()
        .get(backend.url(&cfg.path))
        .timeout(cfg.timeout);
    if let Some(key) = backend.api_key() {
        request = request.bearer_auth(key.expose());
    }
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "connection failed".to_owned()
        } else {
            "request failed".to_owned()
        }
    })?;
    let status = response.status();
    // Drain the (small) body so the connection returns to the pool.
    let _ = response.bytes().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}
