//! The one way background work repeats: pause, step, pause, ... until stopped. Every pause
//! and every step is raced against the stop token and every step is bounded by a timeout,
//! so no background task can keep shutdown waiting on a database or a backend that stopped
//! answering (a step cut short is simply not finished; each task's step is safe to redo).

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why a step did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The stop token fired.
    Stopped,
    /// The step ran over its timeout (logged).
    TimedOut,
}

/// A background task's pacing and bounds.
#[derive(Debug, Clone)]
pub struct Periodic {
    name: &'static str,
    stop: CancellationToken,
}

impl Periodic {
    /// A task called `name` (in logs) that ends when `stop` fires.
    pub fn new(name: &'static str, stop: CancellationToken) -> Self {
        Self { name, stop }
    }

    /// Waits `pause`, or until `wake` is notified; false once stopped.
    pub async fn pause(&self, pause: Duration, wake: Option<&Notify>) -> bool {
        let woken = async {
            match wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = self.stop.cancelled() => false,
            () = tokio::time::sleep(pause) => true,
            () = woken => true,
        }
    }

    /// Runs `work`, whose own waits are each bounded, unless stopped first.
    pub async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Result<T, Cut> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Err(Cut::Stopped),
            result = work => Ok(result),
        }
    }

    /// Runs `step` for at most `timeout`, unless stopped first.
    pub async fn step<T>(
        &self,
        timeout: Duration,
        step: impl Future<Output = T>,
    ) -> Result<T, Cut> {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Err(Cut::Stopped),
            result = tokio::time::timeout(timeout, step) => result.map_err(|_| {
                tracing::warn!(task = self.name, ?timeout, "background step timed out; cut short");
                Cut::TimedOut
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_that_hangs_is_cut_by_its_timeout_or_the_stop() {
        let stop = CancellationToken::new();
        let p = Periodic::new("test", stop.clone());
        let hang = std::future::pending::<()>();
        assert_eq!(
            p.step(Duration::from_secs(1), hang).await,
            Err(Cut::TimedOut)
        );
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.cancel();
        };
        let (result, ()) = tokio::join!(
            p.step(Duration::from_secs(3600), std::future::pending::<()>()),
            stopper
        );
        assert_eq!(result, Err(Cut::Stopped));
        assert!(!p.pause(Duration::from_secs(3600), None).await);
        assert_eq!(
            p.step(Duration::from_secs(1), async { 7 }).await,
            Err(Cut::Stopped)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_early_when_woken() {
        let p = Periodic::new("test", CancellationToken::new());
        let wake = Notify::new();
        wake.notify_one();
        let started = tokio::time::Instant::now();
        assert!(p.pause(Duration::from_secs(3600), Some(&wake)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(p.step(Duration::from_secs(1), async { 7 }).await, Ok(7));
    }
}
