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
    /// Run the gateway with a configuration file. Stops on SIGTERM/SIGINT after in-flight
    /// requests finish (up to server.shutdown_timeout); a second signal exits at once.
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
