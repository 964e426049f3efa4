//! llm-gateway: an authenticated, metered, observable OpenAI-compatible front door to
//! self-hosted inference servers. `serve` runs it on listeners the caller has bound.

pub(crate) mod accounting;
pub mod activation;
pub mod admin;
pub mod auth;
pub mod authn;
pub mod cli;
pub mod config;
pub mod error;
pub(crate) mod held_body;
pub(crate) mod http_rules;
pub mod ledger;
pub mod metrics;
pub mod mock;
pub mod ops;
pub mod periodic;
pub mod proxy;
pub mod ratelimit;
pub mod registry;
pub mod relay;
pub mod reload;
pub(crate) mod request_body;
pub(crate) mod rewrite;
pub mod routes;
pub mod secret;
pub mod server;
pub mod sse;
pub mod stall;
pub mod state;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod upstream;
pub mod usage;

pub use config::Config;
pub use server::{Listeners, ServeError, serve, serve_with_reload};
