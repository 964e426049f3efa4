//! The binary's commands: argument parsing (`args.rs`), running `serve` until a signal
//! (`run.rs`), the demo and the stand-alone mock upstream (`demo.rs`), and the operator
//! commands on the database: migrate, keys, usage, instances (`admin.rs`); `check-config`
//! is in `run.rs`.
//!
//! Uses the library only through what `serve` and the operator commands need.

pub mod admin;
mod args;
mod demo;
mod run;

pub use args::{Cli, Command, KeysAction, UsageBy};
pub use run::main;
