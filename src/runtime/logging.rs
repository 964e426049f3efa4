//! Log output set-up: journald (native protocol) or stderr (text or JSON lines), with a log
//! level a reload can change; and, beside it with a filter of its own, the layer that
//! exports the `gen_ai` spans (`telemetry.rs`) when trace export is on.

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use super::telemetry::{self, Telemetry};
use crate::config::{LogFormat, LogOutput, LoggingConfig};

/// `filter` with the exported spans left out: they are for the trace exporter, and would
/// add their fields to every log line inside them.
fn for_logs(filter: EnvFilter) -> EnvFilter {
    match format!("{}=off", telemetry::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Changes the log filter of the running process (a configuration reload).
#[derive(Debug, Clone)]
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it keeps deciding, whatever `logging.level` says.
    from_env: bool,
}

impl LogControl {
    /// Puts `directive` (a `logging.level`) in effect, unless `RUST_LOG` was set at start.
    pub fn set_level(&self, directive: &str) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        self.filter
            .reload(for_logs(filter))
            .map_err(|e| e.to_string())
    }
}

/// Whether `JOURNAL_STREAM` (`<device>:<inode>`, set by systemd for a service whose
/// stderr goes to the journal) names the given stderr.
pub fn journal_stream_matches(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// stderr is connected to journald (systemd's documented check; a redirected stderr, e.g.
/// `2>file` in an ExecStart shell, no longer matches).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    value
        .to_str()
        .is_some_and(|v| journal_stream_matches(v, meta.dev(), meta.ino()))
}

/// Installs the global subscriber for the binary: journald's native protocol (fields
/// upper-cased without a prefix, e.g. `MODEL`, `STATUS`, `REQUEST_ID`; syslog identifier
/// `llm-gateway`) when `logging.output` says so or, on `auto`, when stderr is the
/// journal; otherwise text or JSON lines on stderr. `RUST_LOG`, when set, overrides
/// `logging.level`. The spans of `telemetry` (if it exports) go to it, not to the logs.
pub fn init(logging: &LoggingConfig, telemetry: &Telemetry) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let is_env = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&logging.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(for_logs(filter));
    let wants_journal = match logging.output {
        LogOutput::Journald => true,
        LogOutput::Stderr => false,
        LogOutput::Auto => stderr_is_journal(),
    };
    let (journald, fallback) = if wants_journal {
        match tracing_journald::layer() {
            Ok(layer) => (
                Some(
                    layer
                        .with_syslog_identifier("llm-gateway".to_owned())
                        .with_field_prefix(None),
                ),
                None,
            ),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let stderr = journald.is_none();
    // Colours only for a terminal: not in files, pipes or the journal (the fallback).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (stderr && logging.format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json = (stderr && logging.format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    let export = telemetry.provider().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("llm-gateway"))
            .with_filter(Targets::new().with_target(telemetry::TARGET, LevelFilter::INFO))
    });
    let result = tracing_subscriber::registry()
        .with(
            tracing_subscriber::Layer::and_then(journald, text)
                .and_then(json)
                .with_filter(filter),
        )
        .with(export)
        .try_init();
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
    if let Some(e) = fallback {
        tracing::warn!(error = %e, "cannot write to journald; logging to stderr instead");
    }
    LogControl {
        filter: handle,
        from_env: is_env,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_device_and_inode() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        for bad in ["", "8", "8:", ":1234", "x:1", "8:1234:5"] {
            assert!(!journal_stream_matches(bad, 8, 1234), "{bad:?}");
        }
    }

    #[test]
    fn set_level_changes_what_is_enabled() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("warn"));
        let control = LogControl {
            filter: handle,
            from_env: false,
        };
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::INFO));
            control.set_level("info").unwrap();
            tracing::callsite::rebuild_interest_cache();
            assert!(tracing::enabled!(tracing::Level::INFO));
            assert!(control.set_level("info,[=bad").is_err());
            assert!(
                tracing::enabled!(tracing::Level::INFO),
                "a bad directive changes nothing"
            );
        });
    }

    #[test]
    fn rust_log_keeps_deciding() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("warn"));
        let control = LogControl {
            filter: handle,
            from_env: true,
        };
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            control.set_level("debug").unwrap();
            tracing::callsite::rebuild_interest_cache();
            assert!(!tracing::enabled!(tracing::Level::INFO));
        });
    }
}
