//! The API surface: the route table (`routes.rs`), the request id and span every request
//! gets first (`request_context.rs`, the one layer in front of every route) with the rules
//! of HTTP itself (`http_rules.rs`) and, on the API listener, the key check with its short
//! public allowlist (`authn.rs`), the status endpoints (`/health`, `/ready`, `/metrics`,
//! `/v1/models`: `status.rs`), the one place errors become
//! OpenAI-style JSON (`error.rs`) and what of a backend's error may be shown
//! (`upstream_error.rs`). The proxied endpoints themselves live in `proxy/`.
//!
//! May depend on `access/`, `proxy/` (its handlers), `upstream/` and `storage::database`
//! (what `/health` reports), `runtime::state` and `config/`.

pub(crate) mod authn;
pub(crate) mod error;
pub(crate) mod http_rules;
pub(crate) mod request_context;
pub(crate) mod routes;
pub(crate) mod status;
pub(crate) mod upstream_error;
