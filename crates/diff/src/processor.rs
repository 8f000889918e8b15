//! Stream processors (`[stream_processors]` in containerd's config): external programs
//! that turn a blob of one media type into another (e.g. decrypt, or a custom
//! compression) before the layer is applied. The blob is written to the program's
//! stdin, its stdout is the new stream; `STREAM_PROCESSOR_MEDIATYPE` names the input
//! media type, as in containerd.

use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::process::{Child, Command, Stdio};

/// One `[stream_processors."<id>"]` entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct StreamProcessor {
    /// Media types the processor accepts.
    pub accepts: Vec<String>,
    /// The media type it produces.
    pub returns: String,
    pub path: String,
    pub args: Vec<String>,
    /// `KEY=value` entries added to its environment.
    pub env: Vec<String>,
}

/// A running processor: waited for after its output was consumed.
pub struct Running {
    child: Child,
    feeder: std::thread::JoinHandle<std::io::Result<u64>>,
    path: String,
}

impl Running {
    pub fn wait(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::unknown(format!("stream processor {}: {e}", self.path)))?;
        let _ = self.feeder.join();
        if !status.success() {
            return Err(Error::unknown(format!(
                "stream processor {} failed: {status}",
                self.path
            )));
        }
        Ok(())
    }
}

impl StreamProcessor {
    pub fn accepts(&self, media_type: &str) -> bool {
        self.accepts.iter().any(|a| a == media_type)
    }

    /// Starts the processor on `input`; returns its output stream.
    pub fn spawn(
        &self,
        media_type: &str,
        mut input: Box<dyn Read + Send>,
    ) -> Result<(Box<dyn Read + Send>, Running)> {
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.args)
            .env("STREAM_PROCESSOR_MEDIATYPE", media_type)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for kv in &self.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::unknown(format!("starting stream processor {}: {e}", self.path)))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let feeder = std::thread::spawn(move || std::io::copy(&mut input, &mut stdin));
        Ok((
            Box::new(stdout),
            Running {
                child,
                feeder,
                path: self.path.clone(),
            },
        ))
    }
}
