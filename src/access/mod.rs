//! Who may call, and how much: the API key format, its hash and the in-memory key table
//! (`keys.rs`), and per-key rate limits (`ratelimit.rs`).
//!
//! May depend on `storage::database` (the key rows) and, for the task that keeps the key
//! table fresh, `runtime::{state, periodic}`. Of HTTP it knows only the
//! `Authorization: Bearer` value it checks.

pub(crate) mod keys;
pub(crate) mod ratelimit;
