//! Structured logs with `tracing`, as text (the default) or JSON, on stderr.

use crate::config::{ConfigError, log_level};

/// Installs the global subscriber; `level` and `format` use containerd's names (empty =
/// `info` / `text`).
pub fn init(level: &str, format: &str) -> Result<(), ConfigError> {
    let level = if level.is_empty() {
        tracing::Level::INFO
    } else {
        log_level(level)?
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
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
