//! Structured logs with `tracing`, as text (the default) or JSON, on stderr.

use crate::config::{ConfigError, log_level};
use std::io::IsTerminal;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Libraries whose debug output is wire-level noise (HTTP/2 frames): they log at `info`
/// unless the daemon runs at `trace`.
const CHATTY_LIBRARIES: &[&str] = &["h2", "hyper", "hyper_util", "tower", "tonic", "ttrpc"];

/// Installs the global subscriber; `level` and `format` use containerd's names (empty =
/// `info` / `text`).
///
/// The filter is a plain per-target level table (`Targets`), not an `EnvFilter`: parsing
/// EnvFilter directives compiles regular expressions at start-up, which kept the regex
/// compiler's code and heap resident in an otherwise idle daemon, and berthd never read
/// `RUST_LOG` anyway.
pub fn init(level: &str, format: &str) -> Result<(), ConfigError> {
    let level = if level.is_empty() {
        tracing::Level::INFO
    } else {
        log_level(level)?
    };
    let mut filter = Targets::new().with_default(level);
    if level < tracing::Level::TRACE && level > tracing::Level::INFO {
        for library in CHATTY_LIBRARIES {
            filter = filter.with_target(*library, tracing::Level::INFO);
        }
    }
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = match format {
        "" | "text" => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
        "json" => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .try_init(),
        other => {
            return Err(ConfigError::from_message(format!(
                "unknown log format {other:?} (expected \"text\" or \"json\")"
            )));
        }
    };
    // A subscriber already installed (tests running the daemon in-process) is fine.
    let _ = installed;
    Ok(())
}
