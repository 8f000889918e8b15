//! Process I/O.
//!
//! Non-terminal processes get the client's stdout/stderr fifos directly as their own stdout
//! and stderr (opened read-write, so a departed reader never causes EPIPE and no copying
//! thread is needed). Stdin goes through a pipe fed by a small thread, so that CloseIO can
//! deliver EOF. Terminal processes get a pty from runc over `--console-socket`; two small
//! threads copy between the pty master and the fifos.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::monitor::Monitor;
use crate::runc::Stdios;
use crate::sys;

#[derive(Clone, Default, Debug)]
pub struct IoConfig {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The writer feeding a process's stdin, and a wake-up for its copier thread. Closing it
/// (CloseIO, or the process's exit) makes the process see EOF and ends the copier, even
/// when the client never opened its end of the fifo.
pub struct StdinFeed {
    writer: Mutex<Option<File>>,
    wake: File,
}

pub type StdinHolder = Arc<StdinFeed>;

impl StdinFeed {
    fn new(writer: File) -> io::Result<StdinHolder> {
        Ok(Arc::new(StdinFeed {
            writer: Mutex::new(Some(writer)),
            wake: sys::eventfd()?,
        }))
    }

    /// Makes the copier drain what the fifo holds, then close the writer.
    pub fn close(&self) {
        sys::eventfd_signal(&self.wake);
    }

    fn write(&self, data: &[u8]) -> bool {
        let mut g = self.writer.lock().unwrap();
        match g.as_mut() {
            Some(w) => w.write_all(data).is_ok(),
            None => false,
        }
    }

    fn finish(&self) {
        self.writer.lock().unwrap().take();
    }
}

pub struct Prepared {
    pub stdios: Stdios,
    pub console: Option<ConsoleSocket>,
    pub stdin: Option<StdinHolder>,
    cfg: IoConfig,
    logger: Option<BinaryLogger>,
    /// The process and namespace a terminal's `binary://` logger is started for.
    owner: (String, String),
}

pub struct ConsoleSocket {
    listener: UnixListener,
    pub path: PathBuf,
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What stays with a process after it started: the stdin feeder, the pty master and
/// its `binary://` logger.
#[derive(Default)]
pub struct ProcIo {
    pub stdin: Option<StdinHolder>,
    pub console: Option<Arc<File>>,
    logger: Option<BinaryLogger>,
}

impl ProcIo {
    pub fn close_stdin(&self) {
        if let Some(h) = &self.stdin {
            h.close();
        }
    }
}

fn strip_scheme(p: &str) -> &str {
    p.strip_prefix("fifo://").unwrap_or(p)
}

fn open_output(path: &str) -> io::Result<File> {
    if path.is_empty() {
        return sys::open(Path::new("/dev/null"), libc::O_WRONLY, 0);
    }
    if let Some(f) = path.strip_prefix("file://") {
        let p = Path::new(f);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        return sys::open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND, 0o644);
    }
    if path.starts_with("binary://") {
        // Only stdout's URI chooses a logger (as in containerd); it takes both streams.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stderr {path:?} is a binary:// URI but stdout is not"),
        ));
    }
    sys::open(Path::new(strip_scheme(path)), libc::O_RDWR, 0)
}

/// How long a `binary://` logger gets to say it is ready before the create fails
/// (containerd waits forever, and a logger that never answers hangs the create).
const LOGGER_READY_TIMEOUT_MS: i32 = 30_000;
/// How long a logger may keep running after its process is gone (containerd's 12 s).
const LOGGER_EXIT_GRACE_MS: i32 = 12_000;

/// A `binary://` logger, run as containerd's shims run one: the program at the URI's
/// path, the query's keys and values as its arguments (in the query's order), only
/// `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment, the process's stdout on
/// fd 3 and stderr on fd 4, and fd 5 to say it is ready (a byte, or closing it).
/// nerdctl's `run -d` logs this way.
pub struct BinaryLogger {
    /// A pidfd, so that a late kill can never hit a recycled pid (the monitor reaps the
    /// logger like any other child).
    pidfd: File,
}

impl Drop for BinaryLogger {
    /// The process is gone: the logger has its output's EOF, and gets a grace period to
    /// drain and exit before it is killed.
    fn drop(&mut self) {
        let Ok(pidfd) = self.pidfd.try_clone() else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("logger-exit".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                if sys::poll_read(&[pidfd.as_raw_fd()], LOGGER_EXIT_GRACE_MS)
                    .is_ok_and(|ready| ready.is_empty())
                {
                    sys::kill_through_pidfd(&pidfd);
                }
            });
    }
}

/// Decodes `%XX` escapes (and `+` as a space in a query) of a URI component.
fn percent_decode(s: &str, plus_is_space: bool) -> io::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, format!("bad escape in {s:?}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} is not UTF-8")))
}

/// The program and arguments of a `binary:///path?key=value&…` URI.
fn parse_binary_uri(uri: &str) -> io::Result<(PathBuf, Vec<String>)> {
    let rest = uri.strip_prefix("binary://").expect("a binary:// URI");
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri:?}: {why}"));
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // binary://host/path has a host, which names no program.
    if !path.starts_with('/') {
        return Err(bad("expected binary:///absolute/path"));
    }
    let path = PathBuf::from(percent_decode(path, false)?);
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(k, true)?);
        args.push(percent_decode(v, true)?);
    }
    Ok((path, args))
}

/// Starts the logger of `uri` for process `id` of `namespace`; returns the write ends of
/// its stdout and stderr pipes once it said it is ready.
fn start_binary_logger(
    uri: &str,
    id: &str,
    namespace: &str,
) -> io::Result<(File, File, BinaryLogger)> {
    let (program, args) = parse_binary_uri(uri)?;
    let (out_r, out_w) = sys::pipe()?;
    let (err_r, err_w) = sys::pipe()?;
    let (ready_r, ready_w) = sys::pipe()?;
    let env = [
        format!("CONTAINER_ID={id}"),
        format!("CONTAINER_NAMESPACE={namespace}"),
    ];
    let pid = sys::spawn_with_fds(
        &program,
        &args,
        &env,
        &[out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()],
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("starting logging binary {}: {e}", program.display()),
        )
    })?;
    // SAFETY: pidfd_open on the pid of a child nobody has waited for yet (the monitor
    // may reap it meanwhile; the pidfd then still refers to it until it is reaped, or
    // fails, and the logger just is not killed late).
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let logger = if pidfd >= 0 {
        // SAFETY: a new descriptor owned by nobody else.
        Some(BinaryLogger {
            pidfd: unsafe { File::from_raw_fd(pidfd as i32) },
        })
    } else {
        None
    };
    drop((out_r, err_r, ready_w));
    let kill = |logger: Option<BinaryLogger>| {
        if let Some(l) = &logger {
            sys::kill_through_pidfd(&l.pidfd);
        }
    };
    match sys::poll_read(&[ready_r.as_raw_fd()], LOGGER_READY_TIMEOUT_MS) {
        Ok(ready) if !ready.is_empty() => {}
        Ok(_) => {
            kill(logger);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "logging binary {} did not get ready within {} s",
                    program.display(),
                    LOGGER_READY_TIMEOUT_MS / 1000
                ),
            ));
        }
        Err(e) => {
            kill(logger);
            return Err(e);
        }
    }
    let logger = logger.ok_or_else(|| {
        io::Error::other(format!(
            "logging binary {} exited at once",
            program.display()
        ))
    })?;
    Ok((out_w, err_w, logger))
}

/// Copies the stdin fifo into the feed's writer until EOF or until the feed is closed.
/// The fifo is opened without blocking (a client may never open its end) and polled
/// together with the feed's wake-up eventfd.
fn spawn_stdin_copier(fifo: String, feed: StdinHolder) -> io::Result<()> {
    let f = sys::open(
        Path::new(strip_scheme(&fifo)),
        libc::O_RDONLY | libc::O_NONBLOCK,
        0,
    );
    std::thread::Builder::new()
        .name("stdin".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let Ok(mut f) = f else {
                feed.finish();
                return;
            };
            let mut buf = vec![0u8; 8192];
            let mut closing = false;
            loop {
                let ready = if closing {
                    vec![0]
                } else {
                    match sys::poll_read(&[f.as_raw_fd(), feed.wake.as_raw_fd()], -1) {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                };
                if ready.contains(&1) {
                    // Closed: drain what is already in the fifo, then stop.
                    closing = true;
                }
                match f.read(&mut buf) {
                    // EOF: the client's writer came and went (poll reports nothing before
                    // a writer ever connects), or, when closing, there is no writer.
                    Ok(0) => break,
                    Ok(n) => {
                        if !feed.write(&buf[..n]) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if closing {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            feed.finish();
        })?;
    Ok(())
}

/// Prepares the I/O of process `id` of `namespace`, about to be created; `console_path`
/// is where a console socket goes if the process wants a terminal.
pub fn prepare(
    cfg: &IoConfig,
    console_path: &Path,
    id: &str,
    namespace: &str,
) -> io::Result<Prepared> {
    let owner = (id.to_string(), namespace.to_string());
    if cfg.terminal {
        let _ = std::fs::remove_file(console_path);
        let listener = UnixListener::bind(console_path)?;
        listener.set_nonblocking(true)?;
        let null = || sys::open(Path::new("/dev/null"), libc::O_RDWR, 0);
        return Ok(Prepared {
            stdios: Stdios {
                stdin: Some(null()?),
                stdout: Some(null()?),
                stderr: Some(null()?),
            },
            console: Some(ConsoleSocket {
                listener,
                path: console_path.to_path_buf(),
            }),
            stdin: None,
            cfg: cfg.clone(),
            logger: None,
            owner,
        });
    }
    let mut logger = None;
    let mut stdios = if cfg.stdout.starts_with("binary://") {
        let (out, err, l) = start_binary_logger(&cfg.stdout, id, namespace)?;
        logger = Some(l);
        Stdios {
            stdout: Some(out),
            stderr: Some(err),
            stdin: None,
        }
    } else {
        Stdios {
            stdout: Some(open_output(&cfg.stdout)?),
            stderr: Some(open_output(&cfg.stderr)?),
            stdin: None,
        }
    };
    let mut holder = None;
    if !cfg.stdin.is_empty() {
        let (r, w) = sys::pipe()?;
        stdios.stdin = Some(r);
        holder = Some(StdinFeed::new(w)?);
    } else {
        stdios.stdin = Some(sys::open(Path::new("/dev/null"), libc::O_RDONLY, 0)?);
    }
    Ok(Prepared {
        stdios,
        console: None,
        stdin: holder,
        cfg: cfg.clone(),
        logger,
        owner,
    })
}

impl Prepared {
    /// Takes the stdio to hand to the runtime process.
    pub fn take_stdios(&mut self) -> Stdios {
        std::mem::take(&mut self.stdios)
    }

    /// After the runtime was spawned (pid `runtime_pid`): receives the pty master if a
    /// terminal was asked for. Returns the runtime's wait status if it exited meanwhile.
    pub fn receive_console(
        &mut self,
        mon: &Monitor,
        runtime_pid: i32,
    ) -> io::Result<(Option<File>, Option<i32>)> {
        let Some(cs) = &self.console else {
            return Ok((None, None));
        };
        let lfd = cs.listener.as_raw_fd();
        let mut exited = None;
        loop {
            let ready = sys::poll_read(&[lfd], 100)?;
            if !ready.is_empty() {
                match cs.listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false)?;
                        let fd = sys::recv_fd(conn.as_raw_fd())?;
                        return Ok((Some(unsafe { File::from_raw_fd(fd.into_raw_fd()) }), exited));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if exited.is_some() {
                // The runtime is gone and nothing is pending on the socket.
                return Ok((None, exited));
            }
            exited = mon.try_wait(runtime_pid);
        }
    }

    /// Starts the copying for a started process and returns what it keeps.
    pub fn finish(mut self, master: Option<File>) -> io::Result<ProcIo> {
        self.console = None;
        let Some(master) = master else {
            if let (Some(h), false) = (&self.stdin, self.cfg.stdin.is_empty()) {
                spawn_stdin_copier(self.cfg.stdin.clone(), h.clone())?;
            }
            return Ok(ProcIo {
                stdin: self.stdin,
                console: None,
                logger: self.logger,
            });
        };
        let master = Arc::new(master);
        let mut pio = ProcIo {
            stdin: None,
            console: Some(master.clone()),
            logger: None,
        };
        // A terminal's output goes to the logger's stdout; its stderr stays empty.
        let mut to_logger = None;
        if self.cfg.stdout.starts_with("binary://") {
            let (id, namespace) = &self.owner;
            let (out, _stderr, logger) = start_binary_logger(&self.cfg.stdout, id, namespace)?;
            to_logger = Some(out);
            pio.logger = Some(logger);
        }
        if !self.cfg.stdin.is_empty() {
            let h = StdinFeed::new(master.try_clone()?)?;
            spawn_stdin_copier(self.cfg.stdin.clone(), h.clone())?;
            pio.stdin = Some(h);
        }
        let out = self.cfg.stdout.clone();
        let mut reader = master.try_clone()?;
        std::thread::Builder::new()
            .name("pty-out".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut w = if let Some(logger_stdout) = to_logger {
                    Some(logger_stdout)
                } else if out.is_empty() {
                    None
                } else if out.starts_with("file://") {
                    open_output(&out).ok()
                } else {
                    // Blocks until the client has the reading end open (it has, for ctr).
                    sys::open(Path::new(strip_scheme(&out)), libc::O_WRONLY, 0).ok()
                };
                let mut buf = vec![0u8; 8192];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if let Some(f) = w.as_mut()
                                && f.write_all(&buf[..n]).is_err()
                            {
                                w = None;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break, // EIO: every slave fd is closed
                    }
                }
            })?;
        Ok(pio)
    }

    /// Undoes a prepare whose process never started: unblocks the stdin copier if any.
    pub fn abort(self) {
        if let Some(h) = &self.stdin {
            h.finish();
        }
    }
}
