//! The running process: the server's life from start to drain (`server.rs`), its sockets
//! (`listeners.rs`), connections (`connections.rs`, `stall.rs`) and the request workers
//! that serve them (`workers.rs`), the shared state rebuilt on reload (`state.rs`,
//! `reload.rs`), socket activation and the systemd notify protocol (`activation.rs`,
//! `systemd.rs`), log output (`logging.rs`), metrics (`metrics/`), trace export
//! (`telemetry.rs`), and the one primitive
//! every background task repeats with (`periodic.rs`).
//!
//! This is where the parts are wired together; it may depend on every other folder.

pub(crate) mod activation;
mod connections;
pub(crate) mod listeners;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod periodic;
pub(crate) mod reload;
pub(crate) mod server;
pub(crate) mod stall;
pub(crate) mod state;
pub(crate) mod systemd;
pub(crate) mod telemetry;
pub(crate) mod workers;
