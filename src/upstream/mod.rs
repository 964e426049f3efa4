//! Where requests go: each backend with its HTTP clients, pools, in-flight count and
//! breaker (`backend.rs`, `client.rs`, `pool.rs`, `breaker.rs`), the balancer that picks one of a model's routes
//! (`balancer.rs`), the fair queue of a saturated model (`queue.rs`), the health prober (`prober.rs`), and which backend holds each stored
//! response (`homes.rs`).
//!
//! May depend on `config/`, on `runtime::workers` (which thread's pool to use) and, for
//! the prober's task, `runtime::{state, periodic}`.

pub(crate) mod backend;
pub(crate) mod balancer;
pub(crate) mod breaker;
pub(crate) mod client;
pub(crate) mod homes;
pub(crate) mod pool;
pub(crate) mod prober;
pub(crate) mod queue;

pub use backend::{Attempt, Backend, Health};

use std::sync::Arc;

/// One way to serve a model: a backend and the model name it knows.
#[derive(Debug, Clone)]
pub struct Route {
    /// Shared backend state (in-flight counts span models).
    pub backend: Arc<Backend>,
    /// Name sent upstream instead of the public one.
    pub upstream_model: Option<String>,
    /// The queues of every model this backend serves: a slot it frees is a turn for them.
    pub queues: Arc<[Arc<queue::Queue>]>,
}
