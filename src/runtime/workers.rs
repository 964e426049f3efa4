//! Request workers: one single-threaded runtime per thread, each serving whole the
//! connections handed to it, so that a request, its upstream call and that call's pooled
//! connection never pass between threads (no cross-thread wake-up on the request path).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Index of the request worker running on this thread; `None` off the workers (background
/// tasks, tests' own runtimes).
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A thread or its runtime could not be created.
    #[error("cannot start request worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The running workers. Tasks are spawned on them in turn; `stop` ends them (their
/// remaining tasks, such as idle upstream connections, are dropped with their runtime).
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
    done: CancellationToken,
}

impl Workers {
    /// Starts `count` (at least one) worker threads, each with its own current-thread
    /// runtime (I/O and timers enabled).
    pub fn start(count: usize) -> Result<Self, WorkerError> {
        let done = CancellationToken::new();
        let mut workers = Self {
            handles: Vec::with_capacity(count.max(1)),
            threads: Vec::with_capacity(count.max(1)),
            next: AtomicUsize::new(0),
            done: done.clone(),
        };
        for index in 0..count.max(1) {
            let start = |source| WorkerError::Start { index, source };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(start)?;
            let handle = runtime.handle().clone();
            let done = done.clone();
            let thread = std::thread::Builder::new()
                .name(format!("llm-gw-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(index)));
                    runtime.block_on(done.cancelled());
                })
                .map_err(start)?;
            workers.handles.push(handle);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// How many workers run.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The worker to give the next connection to (round robin).
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Ends every worker and waits for its thread. Call once their connections are done.
    pub async fn stop(mut self) {
        self.done.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a request worker panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::error!("could not wait for the request workers");
        }
    }
}

impl Drop for Workers {
    /// Workers not stopped (serve returned early with an error): let their threads end.
    fn drop(&mut self) {
        self.done.cancel();
    }
}
