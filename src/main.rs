//! The `llm-gateway` binary: the library's command line, on mimalloc.

/// mimalloc: the proxy path allocates many small, short-lived buffers; the system
/// allocator spent about 16 % of the instructions per request on them (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    llm_gateway::cli::main()
}
