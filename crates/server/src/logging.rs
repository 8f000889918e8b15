//! Structured logs with `tracing`, as text (the default) or JSON, on stderr.

use crate::config::{ConfigError, log_level};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Libraries whose debug output is wire-level noise (HTTP/2 frames): they log at `info`
/// unless the daemon runs at `trace`.
const CHATTY_LIBRARIES: &[&str] = &["h2", "hyper", "hyper_util", "tower", "tonic", "ttrpc"];

/// Installs the global subscriber; `level` and `format` use containerd's names (empty =
/// `info` / `text`).
pub fn init(level: &str, format: &str) -> Result<(), ConfigError> {
    let level = if level.is_empty() {
        tracing::Level::INFO
    } else {
        log_level(level)?
    };
    let mut filter = EnvFilter::new(level.as_str().to_ascii_lowercase());
    if level < tracing::Level::TRACE && level > tracing::Level::INFO {
        for library in CHATTY_LIBRARIES {
            let directive = format!("{library}=info")
                .parse()
                .expect("a valid filter directive");
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = match format {
        "" | "text" => builder.try_init(),
        "json" => builder.json().try_init(),
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
