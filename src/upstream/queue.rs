//! Fair waiting for a saturated model. When every usable backend of a model is at its
//! `max_concurrency`, a request takes a ticket and waits for a turn instead of failing at
//! once. Turns go round-robin over the keys that wait (one request of each key in turn),
//! so a key with fifty queued requests delays a key with one by at most one request per
//! freed slot. A turn is handed out each time a slot of one of the model's backends is
//! released (`Attempt` drops), and when a request arrives while one has room. A ticket
//! dropped while waiting (the client left) leaves the queue at once; one dropped with its
//! turn unused passes the turn on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A model's waiting requests, by key.
#[derive(Debug)]
pub struct Queue {
    max: usize,
    waiting: AtomicUsize,
    inner: Mutex<Fair>,
}

#[derive(Debug, Default)]
struct Fair {
    /// Keys with waiting requests, in the order of their next turn.
    ring: VecDeque<Arc<str>>,
    /// Each key's waiting requests, oldest first.
    by_key: HashMap<Arc<str>, VecDeque<Arc<Slot>>>,
}

/// One waiting request's place.
#[derive(Debug, Default)]
struct Slot {
    state: AtomicU8,
    notify: Notify,
}

const QUEUED: u8 = 0;
const WOKEN: u8 = 1;
const DONE: u8 = 2;

impl Queue {
    /// A queue of at most `max` waiting requests.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            waiting: AtomicUsize::new(0),
            inner: Mutex::new(Fair::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Fair> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Takes a place for a request of `key` (`""` in open mode), or `None` when the queue
    /// is full.
    pub fn join(self: &Arc<Self>, key: Arc<str>) -> Option<Ticket> {
        let slot = Arc::new(Slot::default());
        let mut fair = self.lock();
        if self.waiting() >= self.max {
            return None;
        }
        let Fair { ring, by_key } = &mut *fair;
        let line = by_key.entry(Arc::clone(&key)).or_default();
        if line.is_empty() {
            ring.push_back(Arc::clone(&key));
        }
        line.push_back(Arc::clone(&slot));
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Some(Ticket {
            queue: Arc::clone(self),
            key,
            slot,
        })
    }

    /// Hands the next turn out: to the oldest request of the key whose turn it is.
    pub fn wake_next(&self) {
        if self.waiting() == 0 {
            return;
        }
        let mut fair = self.lock();
        let Fair { ring, by_key } = &mut *fair;
        while let Some(key) = ring.pop_front() {
            let Some(line) = by_key.get_mut(&key) else {
                continue;
            };
            let Some(slot) = line.pop_front() else {
                by_key.remove(&key);
                continue;
            };
            if line.is_empty() {
                by_key.remove(&key);
            } else {
                ring.push_back(key);
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            slot.state.store(WOKEN, Ordering::Release);
            slot.notify.notify_one();
            return;
        }
    }
}

/// A request's place in a queue; see the module's doc for what dropping it does.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<Queue>,
    key: Arc<str>,
    slot: Arc<Slot>,
}

impl Ticket {
    /// Waits for this request's turn.
    pub async fn turn(&self) {
        self.slot.notify.notified().await;
    }

    /// The turn was taken: the request got a backend.
    pub fn done(self) {
        self.slot.state.store(DONE, Ordering::Release);
    }

    /// The turn came but another request took the freed slot first: back in line, first
    /// of its key and with its key next, since it was its turn.
    pub fn wait_again(&self) {
        let mut fair = self.queue.lock();
        if self.slot.state.load(Ordering::Acquire) != WOKEN {
            return;
        }
        self.slot.state.store(QUEUED, Ordering::Release);
        let Fair { ring, by_key } = &mut *fair;
        by_key
            .entry(Arc::clone(&self.key))
            .or_default()
            .push_front(Arc::clone(&self.slot));
        ring.retain(|k| *k != self.key);
        ring.push_front(Arc::clone(&self.key));
        self.queue.waiting.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match self.slot.state.load(Ordering::Acquire) {
            QUEUED => {
                let mut fair = self.queue.lock();
                // Woken between the load and the lock: pass that turn on below.
                if self.slot.state.load(Ordering::Acquire) == QUEUED {
                    let Fair { ring, by_key } = &mut *fair;
                    if let Some(line) = by_key.get_mut(&self.key) {
                        let before = line.len();
                        line.retain(|s| !Arc::ptr_eq(s, &self.slot));
                        if line.len() != before {
                            self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
                        }
                        if line.is_empty() {
                            by_key.remove(&self.key);
                            ring.retain(|k| *k != self.key);
                        }
                    }
                    return;
                }
                drop(fair);
                self.queue.wake_next();
            }
            WOKEN => self.queue.wake_next(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    /// Turns go round-robin over keys, oldest first within a key.
    #[tokio::test]
    async fn turns_go_round_robin_over_the_keys_that_wait() {
        let q = Arc::new(Queue::new(100));
        let a: Vec<Ticket> = (0..5).map(|_| q.join(key("a")).unwrap()).collect();
        let b = q.join(key("b")).unwrap();
        assert_eq!(q.waiting(), 6);
        q.wake_next();
        a[0].turn().await;
        q.wake_next();
        b.turn().await;
        assert_eq!(q.waiting(), 4);
        q.wake_next();
        a[1].turn().await;
        // A turn lost to another request: first again.
        a[1].wait_again();
        q.wake_next();
        a[1].turn().await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_dropped_ticket_leaves_or_passes_its_turn() {
        let q = Arc::new(Queue::new(2));
        let first = q.join(key("a")).unwrap();
        let second = q.join(key("b")).unwrap();
        assert!(q.join(key("c")).is_none(), "full");
        drop(first);
        assert_eq!(q.waiting(), 1, "left at once");
        let third = q.join(key("c")).unwrap();
        q.wake_next();
        // `second` had the turn and leaves without using it: `third` gets it.
        drop(second);
        third.turn().await;
        third.done();
        assert_eq!(q.waiting(), 0);
        q.wake_next(); // nothing waits: no effect
    }
}
