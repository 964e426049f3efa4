//! What is kept: the database (`database/`: SQLite or PostgreSQL, migrations, rows), the
//! usage ledger (`ledger/`: the write-ahead spool and the shipper that moves it into the
//! database), and this instance's row in the registry with its heartbeat (`registry.rs`).
//!
//! May depend on `config/` and `runtime::{metrics, periodic, state}` (the background tasks);
//! nothing here knows HTTP.

pub(crate) mod database;
pub(crate) mod ledger;
pub(crate) mod registry;
