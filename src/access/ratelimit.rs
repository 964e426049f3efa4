//! Per-key rate limits: token buckets for requests and tokens per minute, refilled
//! continuously (a key with rpm = 60 regains one request per second, up to 60 at once).
//! Tokens are reserved from an estimate before a request and settled with the real usage
//! after it.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A key's configured limits per minute; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u64>,
}

impl Limits {
    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none()
    }
}

/// One bucket's state as reported in `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketView {
    /// The effective limit per minute.
    pub limit: u64,
    /// Whole units left now.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// What the headers of a response to a limited key say.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Snapshot {
    /// Request bucket, when `rpm` is set.
    pub requests: Option<BucketView>,
    /// Token bucket, when `tpm` is set.
    pub tokens: Option<BucketView>,
}

/// An admitted request: the bucket states for the headers and the tokens reserved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Bucket states after the reservation.
    pub snapshot: Snapshot,
    /// Tokens taken from the bucket (the estimate, capped at the bucket size).
    pub reserved: u64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// A refusal: which limit, how much was asked, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    /// The limit that was hit.
    pub kind: LimitKind,
    /// Its effective value per minute.
    pub limit: u64,
    /// Units the request needed.
    pub requested: u64,
    /// Time until that many units are available.
    pub retry_after: Duration,
    /// Bucket states for the headers.
    pub snapshot: Snapshot,
}

#[derive(Debug)]
struct Buckets {
    requests: f64,
    tokens: f64,
    at: Instant,
}

/// The buckets of one key. Shared by all requests of the key on this instance.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    state: Mutex<Buckets>,
}

/// How far below zero a token bucket may go, in buckets: a request that used far more than
/// it reserved makes the key wait until that much has refilled (up to a day of its limit).
const MAX_DEBT_BUCKETS: f64 = 1440.0;

fn per_sec(limit: f64) -> f64 {
    limit / 60.0
}

/// `secs` as a duration; huge or invalid values become a day (never a panic).
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs)
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(86_400))
}

fn view(level: f64, cap: f64) -> BucketView {
    let missing = (cap - level).max(0.0);
    BucketView {
        limit: cap.floor() as u64,
        remaining: level.max(0.0).floor() as u64,
        reset: seconds(missing / per_sec(cap).max(f64::MIN_POSITIVE)),
    }
}

impl Limiter {
    /// Full buckets for `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::new(Buckets {
                requests: limits.rpm.unwrap_or(0) as f64,
                tokens: limits.tpm.unwrap_or(0) as f64,
                at: Instant::now(),
            }),
        }
    }

    /// The limits this limiter enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes one request and `tokens` (the estimate, at most one full bucket) if both
    /// buckets allow it. `share` is this instance's part of the key's limits (1.0 alone;
    /// 1/n with n live instances). Returns the bucket states and the tokens reserved, which
    /// `settle` must be given back.
    pub fn acquire(&self, tokens: u64, share: f64) -> Result<Grant, Refusal> {
        let now = Instant::now();
        let rpm = self.limits.rpm.map(|l| (l as f64 * share).max(1.0));
        let tpm = self.limits.tpm.map(|l| (l as f64 * share).max(1.0));
        // The buckets are plain numbers, valid whatever a panicking holder left.
        let mut b = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let asked = tokens;
        let tokens = tpm.map_or(0, |cap| tokens.min(cap as u64));
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.at = now;
        if let Some(cap) = rpm {
            b.requests = (b.requests + elapsed * per_sec(cap)).min(cap);
        }
        if let Some(cap) = tpm {
            b.tokens = (b.tokens + elapsed * per_sec(cap)).min(cap);
        }
        let snapshot = |b: &Buckets| Snapshot {
            requests: rpm.map(|cap| view(b.requests, cap)),
            tokens: tpm.map(|cap| view(b.tokens, cap)),
        };
        if let Some(cap) = rpm
            && b.requests < 1.0
        {
            return Err(Refusal {
                kind: LimitKind::Requests,
                limit: cap as u64,
                requested: 1,
                retry_after: seconds((1.0 - b.requests) / per_sec(cap)),
                snapshot: snapshot(&b),
            });
        }
        if let Some(cap) = tpm {
            // `tokens` is capped at the bucket: a request larger than the whole bucket may
            // still run once the bucket is full; otherwise it could never run at all.
            let need = tokens as f64;
            if b.tokens < need {
                return Err(Refusal {
                    kind: LimitKind::Tokens,
                    limit: cap as u64,
                    requested: asked,
                    retry_after: seconds((need - b.tokens) / per_sec(cap)),
                    snapshot: snapshot(&b),
                });
            }
        }
        if rpm.is_some() {
            b.requests -= 1.0;
        }
        if tpm.is_some() {
            b.tokens -= tokens as f64;
        }
        Ok(Grant {
            snapshot: snapshot(&b),
            reserved: tokens,
        })
    }

    /// Corrects a reservation of `estimated` tokens to the `actual` use: the difference is
    /// returned to (or taken from) the bucket, which may go below zero: the debt is kept
    /// (up to `MAX_DEBT_BUCKETS` buckets), so a key cannot exceed its limit by under-
    /// estimating.
    pub fn settle(&self, estimated: u64, actual: u64) {
        let Some(cap) = self.limits.tpm else {
            return;
        };
        let cap = cap as f64;
        let mut b = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        b.tokens =
            (b.tokens + estimated as f64 - actual as f64).clamp(-cap * MAX_DEBT_BUCKETS, cap);
    }
}

/// Go-style duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64().ceil() as u64;
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_bucket_refuses_the_request_over_the_limit() {
        let l = Limiter::new(Limits {
            rpm: Some(3),
            tpm: None,
        });
        for _ in 0..3 {
            assert!(l.acquire(0, 1.0).is_ok());
        }
        let refusal = l.acquire(0, 1.0).unwrap_err();
        assert_eq!(refusal.kind, LimitKind::Requests);
        // One request comes back every 20 s at 3 rpm.
        assert!(refusal.retry_after <= Duration::from_secs(20));
        assert!(refusal.retry_after > Duration::from_secs(19));
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let l = Limiter::new(Limits {
            rpm: None,
            tpm: Some(1000),
        });
        let s = l.acquire(600, 1.0).unwrap().snapshot;
        assert_eq!(s.tokens.unwrap().remaining, 400);
        assert_eq!(l.acquire(600, 1.0).unwrap_err().kind, LimitKind::Tokens);
        // The first request used only 100 tokens: 500 come back.
        l.settle(600, 100);
        assert!(l.acquire(600, 1.0).is_ok());
    }

    #[test]
    fn share_divides_the_limit() {
        let l = Limiter::new(Limits {
            rpm: Some(10),
            tpm: None,
        });
        let s = l.acquire(0, 0.5).unwrap().snapshot;
        assert_eq!(s.requests.unwrap().limit, 5);
    }

    #[test]
    fn an_absurd_estimate_reserves_one_bucket_and_cannot_break_the_limiter() {
        let l = Limiter::new(Limits {
            rpm: None,
            tpm: Some(10),
        });
        let g = l.acquire(u64::MAX, 1.0).unwrap();
        assert_eq!(g.reserved, 10);
        let r = l.acquire(1, 1.0).unwrap_err();
        assert!(r.retry_after <= Duration::from_secs(60));
        l.settle(g.reserved, u64::MAX);
        let r = l.acquire(1, 1.0).unwrap_err();
        assert!(
            r.retry_after <= Duration::from_secs(86_400),
            "{:?}",
            r.retry_after
        );
    }

    #[test]
    fn a_request_that_used_far_more_than_it_reserved_leaves_its_debt() {
        let l = Limiter::new(Limits {
            rpm: None,
            tpm: Some(1000),
        });
        let g = l.acquire(10, 1.0).unwrap();
        // 100x the limit in one request: the key owes 99 minutes of its limit.
        l.settle(g.reserved, 100_000);
        let r = l.acquire(1, 1.0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
        assert!(
            r.retry_after > Duration::from_secs(98 * 60),
            "{:?}",
            r.retry_after
        );
    }

    #[test]
    fn a_refusal_states_the_whole_estimate() {
        let l = Limiter::new(Limits {
            rpm: None,
            tpm: Some(100),
        });
        l.acquire(100, 1.0).unwrap();
        assert_eq!(l.acquire(5000, 1.0).unwrap_err().requested, 5000);
    }

    #[test]
    fn reset_format_matches_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
