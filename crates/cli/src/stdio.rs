//! A process's stdio as the CLI sees it: named fifos in a private directory, the way
//! containerd's `cio` does it, copied to and from this process's own stdio by plain
//! threads (blocking fifo opens and terminal reads cannot be cancelled, and a plain
//! thread never holds up the process's exit), plus the caller's terminal in raw mode and
//! its size for `-t`.
//!
//! The opens rendezvous with the shim: our blocking read-only open of stdout returns once
//! the shim has the fifo open for writing (the stock runc shim opens it write-only and
//! itself waits for a reader; Berth's shim opens it read-write), and EOF comes when the
//! last writer (the shim's copy, the container's processes) is gone.

use nix::sys::stat::Mode;
use nix::sys::termios::{self, SetArg, Termios};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;

/// The fifos of one process, removed (with their directory) on drop.
pub struct Fifos {
    dir: PathBuf,
    pub stdin: Option<PathBuf>,
    pub stdout: PathBuf,
    pub stderr: Option<PathBuf>,
}

impl Fifos {
    /// Creates `base/<id>-<random>/{stdin,stdout,stderr}`; no stdin fifo without
    /// `stdin`, no stderr fifo for a terminal (the pty merges both).
    pub fn create(base: &Path, id: &str, stdin: bool, terminal: bool) -> io::Result<Fifos> {
        std::fs::create_dir_all(base).map_err(|e| ctx(e, "creating", base))?;
        let dir = base.join(format!(
            "{id}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ctx(e, "creating", &dir))?;
        let fifos = Fifos {
            stdin: stdin.then(|| dir.join("stdin")),
            stdout: dir.join("stdout"),
            stderr: (!terminal).then(|| dir.join("stderr")),
            dir,
        };
        for p in fifos.paths() {
            nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600))
                .map_err(|e| ctx(e.into(), "creating fifo", p))?;
        }
        Ok(fifos)
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.stdin
            .iter()
            .chain(std::iter::once(&self.stdout))
            .chain(self.stderr.iter())
    }

    /// The (stdin, stdout, stderr) strings of a task or exec request.
    pub fn uris(&self) -> (String, String, String) {
        let s = |p: Option<&PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
        (
            s(self.stdin.as_ref()),
            s(Some(&self.stdout)),
            s(self.stderr.as_ref()),
        )
    }

    /// Releases copier threads still blocked opening a fifo (the task was never created):
    /// a read-write open never blocks and satisfies both a waiting reader and a waiting
    /// writer; closing it right away gives them EOF / EPIPE.
    pub fn release(&self) {
        for p in self.paths() {
            let _ = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(p);
        }
    }
}

impl Drop for Fifos {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

/// Copies fifo `path` to `out` until EOF; the receiver fires when done.
pub fn copy_out(path: &Path, mut out: impl Write + Send + 'static) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        if let Ok(mut f) = File::open(&path) {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // Flushed chunk by chunk: interactive output must show at once.
                        if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// Copies this process's stdin into fifo `path`; the receiver fires at stdin's EOF (the
/// fifo is then closed, and the caller tells the shim with CloseIO).
pub fn copy_in(path: &Path) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        if let Ok(mut f) = OpenOptions::new().write(true).open(&path) {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if f.write_all(&buf[..n]).is_err() {
                            // The process is gone; don't report EOF to anyone.
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// The caller's terminal in raw mode until dropped (keys, including ^C, go to the
/// container's pty as they are typed).
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; `None` otherwise.
    pub fn enable() -> Option<RawTerminal> {
        let stdin = io::stdin();
        let fd = stdin.as_fd();
        if !nix::unistd::isatty(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap_or(false) {
            return None;
        }
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);

fn winsize_of(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut ws: nix::libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointed-to struct.
    unsafe { tiocgwinsz(fd.as_raw_fd(), &mut ws) }.ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col as u32, ws.ws_row as u32))
}

/// The caller's terminal size as (columns, rows), from stdout or stdin.
pub fn terminal_size() -> Option<(u32, u32)> {
    winsize_of(io::stdout().as_fd()).or_else(|| winsize_of(io::stdin().as_fd()))
}
