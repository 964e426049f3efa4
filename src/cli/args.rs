//! Command-line interface: subcommands and their options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// OpenAI-compatible gateway for self-hosted LLM servers (vLLM, Ollama, llama.cpp, ...).
///
/// Routes each model to one or more backends, streams answers, fails over, and exposes
/// /health, /ready and Prometheus /metrics. Configuration is one TOML file (see
/// examples/llm-gateway.toml); any key can be overridden by an environment variable
/// LLM_GATEWAY__SECTION__KEY, e.g. LLM_GATEWAY__SERVER__LISTEN=0.0.0.0:8080.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway with a configuration file. SIGHUP reloads it (an invalid file keeps
    /// the running one). Stops on SIGTERM/SIGINT after in-flight requests finish (up to
    /// server.shutdown_timeout); a second signal exits at once. Sockets passed by systemd
    /// (LISTEN_FDS) are used instead of server.listen.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file (with environment overrides) and exit: status 0 when
    /// valid, 1 with a message naming the bad key otherwise. Does not read secrets.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// DEMO: start the bundled mock upstream (not a language model: it answers "tok0 tok1 ...")
    /// and the gateway in front of it, serving the model "demo". No config file needed.
    Demo {
        /// Address of the gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Apply the embedded database migrations and exit (`serve` also does this at start).
    Migrate {
        /// Configuration file (TOML); its [storage] section names the database.
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Manage client API keys in the database the service uses. Run it as the service's
    /// user (for example `sudo -u llm-gateway llm-gateway keys list`), so it reaches the same
    /// SQLite file or PostgreSQL role. A running gateway picks up changes within
    /// auth.refresh_interval.
    Keys {
        /// Configuration file (TOML).
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG", global = true)]
        config: Option<PathBuf>,
        /// What to do with keys.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Print a usage summary from the ledger.
    Usage {
        /// Configuration file (TOML).
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Period to summarise, back from now, e.g. 1h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Group by API key or by model.
        #[arg(long, value_enum, default_value_t = UsageBy::Key)]
        by: UsageBy,
    },
    /// List gateway instances registered in the database, with their heartbeats.
    Instances {
        /// Configuration file (TOML).
        #[arg(long, short, env = "LLM_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Run only the bundled mock OpenAI-compatible upstream (for benchmarks and experiments).
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Tokens per answer when the request has no max_tokens.
        #[arg(long, default_value_t = 8)]
        chunks: usize,
        /// Pause between streamed chunks, e.g. 20ms.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        chunk_interval: Duration,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key and print its secret once (only a hash is stored).
    Create {
        /// Who or what the key is for.
        #[arg(long)]
        name: String,
        /// Models the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute (default: unlimited).
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute, prompt and completion together (default: unlimited).
        #[arg(long)]
        tpm: Option<u64>,
        /// Expiry: a duration from now (30d, 12h) or a UTC time (2027-01-31T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by its id (as `keys list` shows it); effective within
    /// auth.refresh_interval on running gateways.
    Revoke {
        /// Key id.
        id: String,
    },
}

/// Grouping of `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageBy {
    /// Per API key.
    Key,
    /// Per model.
    Model,
}
