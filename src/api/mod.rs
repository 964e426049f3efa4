//! The API surface: the route table, the one authentication layer in front of it (with its
//! short public allowlist), the HTTP rules checked before routing, the status endpoints
//! (`/health`, `/ready`, `/metrics`, `/v1/models`) and the one place errors become
//! OpenAI-style JSON. The proxied endpoints themselves live in `proxy/`.
//!
//! May depend on `access/`, `proxy/` (handlers), `runtime::state` and `config/`.

pub(crate) mod authn;
pub(crate) mod error;
pub(crate) mod http_rules;
pub(crate) mod request_context;
pub(crate) mod routes;
pub(crate) mod status;
