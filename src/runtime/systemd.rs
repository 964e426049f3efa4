//! systemd integration: the notify protocol (READY, STATUS, RELOADING, STOPPING) and the
//! watchdog.
//! Everything here does nothing when the service manager did not ask for it
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC` unset).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use super::periodic::Periodic;
use super::state::AppState;
use crate::upstream::Health;

/// How often `STATUS=` is refreshed while serving.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// One line for `systemctl status`: backends, database and ledger state.
pub fn status_line(state: &AppState) -> String {
    let current = state.current();
    let healthy = current
        .backends
        .iter()
        .filter(|b| b.health() != Health::Unhealthy)
        .count();
    let db = if state.database_up() {
        "up"
    } else {
        "DOWN (usage is spooled)"
    };
    let reload = state
        .reload_note()
        .map(|note| format!("; {note}"))
        .unwrap_or_default();
    format!(
        "serving {} models; backends healthy {healthy}/{}; database {} {db}; spool {} bytes{reload}",
        current.models.len(),
        current.backends.len(),
        state.db_engine,
        state.ledger.spool_bytes()
    )
}

/// Tells the service manager the gateway is ready: listeners bound, configuration valid,
/// database migrated.
pub fn ready(state: &AppState) {
    let status = status_line(state);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells the service manager a reload has begun (`Type=notify-reload` needs the
/// monotonic time with it); `ready` ends it, whether the reload worked or not.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

/// Tells the service manager the gateway is shutting down.
pub fn stopping(in_flight: i64) {
    let status = format!("draining: {in_flight} requests in flight");
    send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
}

/// Keeps `STATUS=` current, and pings the watchdog at half `WATCHDOG_USEC` when it is set.
/// Both run on the async runtime: when the runtime is wedged, the pings stop and systemd
/// restarts the service. Runs until `stop`.
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(10)));
    let task = Periodic::new("systemd notify", stop);
    let now = tokio::time::Instant::now;
    // The first ping goes out at once; READY already carried a status, so the first
    // refresh is one period later. Each is due again one period after it was sent.
    let mut ping_due = watchdog.map(|_| now());
    let mut status_due = now() + STATUS_EVERY;
    loop {
        let due = ping_due.map_or(status_due, |p| p.min(status_due));
        if !task.pause(due.saturating_duration_since(now()), None).await {
            return;
        }
        if let (Some(every), Some(at)) = (watchdog, ping_due)
            && now() >= at
        {
            send(&[NotifyState::Watchdog]);
            ping_due = Some(now() + every);
        }
        if now() >= status_due {
            if !state.is_draining() {
                let line = status_line(&state);
                send(&[NotifyState::Status(&line)]);
            }
            status_due = now() + STATUS_EVERY;
        }
    }
}
