//! The running process: the server that accepts and drains connections (`server.rs`,
//! `stall.rs`), the shared state rebuilt on reload (`state.rs`, `reload.rs`), socket
//! activation and the systemd notify protocol (`activation.rs`, `systemd.rs`), logging and
//! request spans (`telemetry.rs`), metrics (`metrics.rs`), and the one primitive every
//! background task repeats with (`periodic.rs`).
//!
//! This is where the parts are wired together; it may depend on every other folder.

pub(crate) mod activation;
pub(crate) mod metrics;
pub(crate) mod periodic;
pub(crate) mod reload;
pub(crate) mod server;
pub(crate) mod stall;
pub(crate) mod state;
pub(crate) mod systemd;
pub(crate) mod telemetry;
