//! Container IO: the fifos a shim writes a container's stdout/stderr to, read by berthd
//! into the CRI log file (`<RFC3339Nano> stdout|stderr F|P <line>`, containerd's
//! `cri/io` format), or collected for `ExecSync`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// containerd's `maxContainerLogLineSize`... the CRI logger splits longer lines (`P`).
const MAX_LINE: usize = 16 * 1024;

/// The most of each stream `ExecSync` keeps (containerd's `maxStreamSize`): the rest
/// is read and dropped, so a command printing without end cannot exhaust the daemon's
/// memory (CVE-2022-31030).
pub const EXEC_STREAM_LIMIT: usize = 16 << 20;

/// A buffer that keeps the first `limit` bytes written to it.
#[derive(Debug, Default)]
pub struct CappedBuffer {
    pub bytes: Vec<u8>,
    limit: usize,
}

impl CappedBuffer {
    pub fn new(limit: usize) -> Self {
        CappedBuffer {
            bytes: Vec::new(),
            limit,
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&data[..room.min(data.len())]);
    }
}

/// Makes a fifo at `path` (absent parent directories too).
pub fn mkfifo(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A read end of a fifo that a writer (the shim) will open: held open non-blocking at
/// once (so the writer never finds it without reader), then read on a thread from a
/// blocking descriptor until every writer closed it.
pub struct FifoReader {
    path: PathBuf,
    done: std::sync::mpsc::Receiver<()>,
}

impl FifoReader {
    /// Starts reading `path`, handing each chunk to `sink`.
    pub fn start(
        path: &Path,
        mut sink: impl FnMut(&[u8]) + Send + 'static,
    ) -> std::io::Result<FifoReader> {
        let hold = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        let (tx, done) = std::sync::mpsc::channel();
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("cri-fifo".into())
            .spawn(move || {
                let file = std::fs::File::open(&p);
                drop(hold);
                if let Ok(mut file) = file {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match file.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => sink(&buf[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
                let _ = tx.send(());
            })?;
        Ok(FifoReader {
            path: path.to_path_buf(),
            done,
        })
    }

    /// Unblocks a reader whose writer never came (a failed create): opening the write
    /// end once lets its open return, and it then sees end of file.
    pub fn cancel(&self) {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&self.path);
    }

    /// Waits (blocking) until the writer closed, at most `timeout`.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        self.done.recv_timeout(timeout).is_ok()
    }
}

/// Turns a stream's bytes into CRI log lines written to a shared log file.
pub struct LineWriter {
    stream: &'static str,
    file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
    pending: Vec<u8>,
}

impl LineWriter {
    pub fn new(
        stream: &'static str,
        file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
    ) -> Self {
        LineWriter {
            stream,
            file,
            pending: Vec::new(),
        }
    }

    fn emit(&self, line: &[u8], tag: &str) {
        let mut out = Vec::with_capacity(line.len() + 48);
        out.extend_from_slice(berth_core::time::rfc3339_nano(SystemTime::now()).as_bytes());
        out.extend_from_slice(format!(" {} {tag} ", self.stream).as_bytes());
        out.extend_from_slice(line);
        out.push(b'\n');
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(&out);
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.emit(&line, "F");
            } else if self.pending.len() >= MAX_LINE {
                let part: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
                self.emit(&part, "P");
            } else {
                break;
            }
        }
    }

    /// End of stream: what is left is a full line.
    pub fn finish(&mut self) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest, "F");
        }
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Opens (appending, creating its directory) the container's log file.
pub fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Starts copying the container's stdout/stderr fifos into `log` (if any).
/// The log file a container's streams are copied to, shared by both copies; `reopen`
/// swaps it for a new file at the same path (`ReopenContainerLog`, after a rotation).
pub type SharedLog = std::sync::Arc<std::sync::Mutex<std::fs::File>>;

pub fn reopen(log: &SharedLog, path: &Path) -> std::io::Result<()> {
    let file = open_log(path)?;
    *log.lock().unwrap() = file;
    Ok(())
}

pub fn start_logging(
    io_dir: &Path,
    log: Option<&Path>,
) -> std::io::Result<(Vec<FifoReader>, Option<SharedLog>)> {
    let file = match log {
        Some(path) => Some(std::sync::Arc::new(std::sync::Mutex::new(open_log(path)?))),
        None => None,
    };
    let mut readers = Vec::new();
    for stream in ["stdout", "stderr"] {
        let fifo = io_dir.join(stream);
        mkfifo(&fifo)?;
        let mut writer = file.clone().map(|f| LineWriter::new(stream, f));
        let reader = FifoReader::start(&fifo, move |data| {
            if let Some(w) = writer.as_mut() {
                w.feed(data);
            }
        });
        // A trailing partial line goes out when the stream ends: the closure, and with
        // it the writer, is dropped when the thread does (`Drop` finishes the line).
        readers.push(reader?);
    }
    Ok((readers, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_buffers_keep_the_first_bytes_only() {
        let mut b = CappedBuffer::new(10);
        b.write(b"12345678");
        b.write(b"9abcdef");
        b.write(b"more");
        assert_eq!(b.bytes, b"123456789a");
    }

    #[test]
    fn lines_full_and_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = std::sync::Arc::new(std::sync::Mutex::new(open_log(&path).unwrap()));
        let mut w = LineWriter::new("stdout", file);
        w.feed(b"hello\nwor");
        w.feed(b"ld\r\n");
        w.feed(&vec![b'x'; MAX_LINE + 3]);
        w.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].ends_with(" stdout F hello"));
        assert!(lines[1].ends_with(" stdout F world"));
        assert!(lines[2].contains(" stdout P xxx"));
        assert!(lines[3].ends_with(" stdout F xxx"));
    }
}
