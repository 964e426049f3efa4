//! Who may call, and how much: the API key format, its hash and the in-memory key table
//! (`keys.rs`), and per-key rate limits (`ratelimit.rs`).
//!
//! May depend on `config/` and `storage::database` (the key rows); nothing here knows HTTP.

pub(crate) mod keys;
pub(crate) mod ratelimit;
