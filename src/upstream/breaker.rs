//! Passive circuit breaker: eject a backend after consecutive failures, probe it half-open.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the breaker currently allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Ejected until the cool-down ends.
    Open,
    /// Cool-down over: one probe request decides.
    HalfOpen,
}

impl BreakerState {
    /// Name used in `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Ticket for one request through the breaker; report its outcome or drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// An ordinary request while closed.
    Normal,
    /// The single half-open probe.
    Probe,
}

/// One backend's breaker. Critical sections are a few instructions long.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold,
            open_for,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// State as seen at `now`, without changing it.
    pub fn state(&self, now: Instant) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request could be admitted now (used to pick candidates).
    pub fn would_admit(&self, now: Instant) -> bool {
        match *self.lock() {
            Inner::Closed { .. } => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen { probing } => !probing,
        }
    }

    /// Admits a request, or refuses while open or while the probe is out.
    pub fn admit(&self, now: Instant) -> Option<Admission> {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Some(Admission::Normal),
            Inner::Open { until } if now < until => None,
            Inner::HalfOpen { probing: true } => None,
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                *inner = Inner::HalfOpen { probing: true };
                Some(Admission::Probe)
            }
        }
    }

    /// The request succeeded. While closed this resets the failure count; only the
    /// half-open probe ends an ejection. A request admitted before the breaker opened (a
    /// long stream, say) that succeeds later says nothing about the backend now.
    pub fn on_success(&self, admission: Admission) {
        let mut inner = self.lock();
        match (*inner, admission) {
            (Inner::Closed { .. }, _) | (_, Admission::Probe) => {
                *inner = Inner::Closed { failures: 0 };
            }
            (Inner::Open { .. } | Inner::HalfOpen { .. }, Admission::Normal) => {}
        }
    }

    /// The request failed; returns true when this failure opened the breaker.
    pub fn on_failure(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { failures } if failures + 1 < self.threshold => {
                *inner = Inner::Closed {
                    failures: failures + 1,
                };
                false
            }
            Inner::Open { .. } => false,
            Inner::Closed { .. } | Inner::HalfOpen { .. } => {
                *inner = Inner::Open {
                    until: now + self.open_for,
                };
                true
            }
        }
    }

    /// A probe ended without a verdict (client went away): let another probe through.
    pub fn on_abandoned(&self, admission: Admission) {
        if admission == Admission::Probe {
            let mut inner = self.lock();
            if let Inner::HalfOpen { probing: true } = *inner {
                *inner = Inner::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_success_of_an_older_request_does_not_close_an_open_breaker() {
        let b = Breaker::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        let old = b.admit(t0).unwrap();
        assert!(b.on_failure(t0));
        b.on_success(old);
        assert_eq!(
            b.state(t0),
            BreakerState::Open,
            "a stream started earlier ended well"
        );
        let probe = b.admit(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(probe, Admission::Probe);
        b.on_success(Admission::Normal);
        assert_eq!(
            b.state(t0 + Duration::from_secs(10)),
            BreakerState::HalfOpen
        );
        b.on_success(probe);
        assert_eq!(b.state(t0 + Duration::from_secs(10)), BreakerState::Closed);
    }

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        b.on_success(Admission::Normal);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert!(b.on_failure(t0), "third consecutive failure opens");
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.admit(t0 + Duration::from_secs(9)), None);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(later), Some(Admission::Probe));
        assert_eq!(b.admit(later), None, "only one probe at a time");
        b.on_abandoned(Admission::Probe);
        assert_eq!(b.admit(later), Some(Admission::Probe));
        assert!(b.on_failure(later), "failed probe re-opens");
        assert_eq!(b.state(later), BreakerState::Open);
        let much_later = later + Duration::from_secs(10);
        assert_eq!(b.admit(much_later), Some(Admission::Probe));
        b.on_success(Admission::Probe);
        assert_eq!(b.state(much_later), BreakerState::Closed);
        assert_eq!(b.admit(much_later), Some(Admission::Normal));
    }
}
