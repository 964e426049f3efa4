//! llm-gateway: an authenticated, metered, observable OpenAI-compatible front door to
//! self-hosted inference servers. `serve` runs it on listeners the caller has bound.
//!
//! The tree is the map (docs/architecture.md has the picture):
//!
//! - `api/`: what a client meets first: the route table, authentication, the HTTP rules,
//!   the status endpoints and the one wire format of errors.
//! - `proxy/`: the request path as phases, in the order a request meets them: admit, read,
//!   authorize, attempt with failover, respond (whole or streamed), account.
//! - `access/`: who may call: API keys and their rate limits.
//! - `upstream/`: where requests go: backends, the balancer, breakers, the health prober.
//! - `storage/`: what is kept: the database, the usage ledger (spool and shipper), the
//!   instance registry.
//! - `runtime/`: the running process: server and connections, shared state and reload,
//!   socket activation, systemd, logging, metrics, background tasks.
//! - `config/`: the configuration schema by section, its validation, secrets.
//! - `cli/`: the binary's commands (serve, demo, operator commands); `mock`: the bundled
//!   mock upstream.

mod access;
mod api;
pub mod cli;
pub mod config;
pub mod mock;
mod proxy;
mod runtime;
mod storage;
mod upstream;

pub use config::Config;
pub use runtime::listeners::Listeners;
pub use runtime::server::{ServeError, serve, serve_with_reload};

/// What the integration tests reach beyond `serve`: the pieces whose behaviour they check
/// from outside (records in the database, the spool on disk, the route table).
pub mod testing {
    pub use crate::access::keys::{NewKey, generate as generate_key};
    pub use crate::access::ratelimit::Limits;
    pub use crate::api::authn::PUBLIC;
    pub use crate::api::routes::api_table;
    pub use crate::runtime::reload::{LoadConfig, Reload, SetLogLevel};
    pub use crate::storage::database::usage_rows::{GroupBy, Outcome, UsageRecord};
    pub use crate::storage::database::{Store, now_ms};
    pub use crate::storage::ledger::spool::{Spool, SpoolConfig};
}
