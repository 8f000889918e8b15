//! Thin, safe-ish wrappers over the few libc calls the shim needs.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Writes a line to stderr, which is containerd's shim `log` fifo (or /dev/null). Never panics.
pub fn log(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "berth-shim[{}]: {}", std::process::id(), msg);
}

#[macro_export]
macro_rules! slog {
    ($($t:tt)*) => { $crate::sys::log(format_args!($($t)*)) };
}

pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

pub fn open(path: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let c = cstr(path)?;
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn set_nonblock(fd: RawFd, on: bool) -> io::Result<()> {
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let nfl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, nfl) })?;
    Ok(())
}

pub fn eventfd() -> io::Result<File> {
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn eventfd_signal(f: &File) {
    let one: u64 = 1;
    unsafe { libc::write(f.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

pub fn eventfd_read(f: &File) -> u64 {
    let mut v: u64 = 0;
    unsafe { libc::read(f.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    v
}

/// Polls `fds` for readability; returns indices that are ready (readable, hung up or in error).
pub fn poll_read(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<usize>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(p
            .iter()
            .enumerate()
            .filter(|(_, x)| x.revents != 0)
            .map(|(i, _)| i)
            .collect());
    }
}

/// Receives one file descriptor passed with SCM_RIGHTS over a connected unix socket.
pub fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    loop {
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break;
    }
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const RawFd);
                return Ok(OwnedFd::from_raw_fd(fd));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Err(io::Error::other(
        "no file descriptor received on console socket",
    ))
}

/// `process.consoleSize` (width, height) of a spec or process JSON document.
pub fn console_size(json: &str) -> Option<(u32, u32)> {
    let start = json.find("\"consoleSize\"")?;
    let rest = &json[start..];
    let object = &rest[..rest.find('}')?];
    let number = |key: &str| -> Option<u32> {
        let at = object.find(&format!("\"{key}\""))? + key.len() + 2;
        let value = object[at..].trim_start().strip_prefix(':')?.trim_start();
        let end = value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len());
        value[..end].parse().ok()
    };
    Some((number("width")?, number("height")?))
}

/// Sizes a new pty as the process spec asks (runc does it itself; berth-runc's
/// libcontainer does not, and a 0×0 terminal breaks `stty size` and full-screen tools).
pub fn apply_console_size(master: RawFd, spec: &Path) {
    if let Some((width, height)) = std::fs::read_to_string(spec)
        .ok()
        .and_then(|json| console_size(&json))
    {
        let _ = set_winsize(master, width, height);
    }
}

pub fn set_winsize(fd: RawFd, width: u32, height: u32) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: height as u16,
        ws_col: width as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

pub fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let s = CString::new(src).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let t = cstr(target)?;
    let f = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let d = CString::new(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let dp = if data.is_empty() {
        std::ptr::null()
    } else {
        d.as_ptr() as *const libc::c_void
    };
    let fp = if fstype.is_empty() {
        std::ptr::null()
    } else {
        f.as_ptr()
    };
    cvt(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fp, flags, dp) })?;
    Ok(())
}

/// Unmounts everything stacked on `target` (lazily as a last resort).
pub fn unmount_all(target: &Path) {
    let Ok(t) = cstr(target) else { return };
    for _ in 0..64 {
        if unsafe { libc::umount2(t.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => return,
            Some(libc::EBUSY) => {
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
            }
            _ => return,
        }
    }
}

/// Unmounts everything stacked on `target`, like [`unmount_all`], without making the
/// caller wait for the top file system's shutdown.
///
/// Why: unmounting an overlay syncs its whole upper file system (`syncfs` of the disk
/// holding the snapshots, i.e. everybody's dirty data there), which took 0.3–70 ms per
/// container on this project's test machine while other work wrote to the disk. A task's
/// deletion only needs the rootfs out of the mount table; nothing its caller waits for
/// depends on that sync (durability of a kept snapshot never did: a plain unmount is
/// not a durability promise either). So the top mount is detached while a descriptor
/// still references it, and that last reference is dropped by a short-lived child
/// process, in which the sync still runs.
pub fn unmount_all_in_background(target: &Path) {
    let Ok(t) = cstr(target) else { return };
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            t.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return unmount_all(target);
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let top = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut detached = false;
    for _ in 0..64 {
        // SAFETY: umount2 with a valid C string.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            break;
        }
        detached = true;
    }
    if detached {
        release_in_child(top);
    }
}

/// Drops the last reference `fd` holds (see [`unmount_all_in_background`]) in a forked
/// child; falls back to closing it here.
fn release_in_child(fd: OwnedFd) {
    let Ok((parent_gone, parent_end)) = pipe() else {
        return;
    };
    // SAFETY: the child only calls async-signal-safe functions (close, read, _exit) before
    // exiting, as required after fork in a multi-threaded process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::close(parent_end.as_raw_fd());
            // EOF once the parent closed its copies: only then is the child's the last one.
            let mut byte = 0u8;
            while libc::read(parent_gone.as_raw_fd(), (&raw mut byte).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::close(fd.as_raw_fd());
            libc::_exit(0);
        }
    }
    // The parent (or a failed fork): close our copies; the child, if any, is reaped by the
    // monitor like any process the shim does not know.
    drop(fd);
    drop(parent_end);
}

pub fn now() -> containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

/// Exit status in the shell convention: the code, or 128+signal.
pub fn exit_code(status: libc::c_int) -> u32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u32
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status) as u32
    } else {
        255
    }
}

/// Small, dependency-free 128-bit hash (two FNV-1a variants) rendered as hex; used for socket names.
pub fn hash_hex(parts: &[&str]) -> String {
    let mut a: u64 = 0xcbf29ce484222325;
    let mut b: u64 = 0x84222325cbf29ce4;
    for p in parts {
        for &c in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
            a = (a ^ c as u64).wrapping_mul(0x100000001b3);
            b = (b ^ (c as u64).rotate_left(5))
                .wrapping_mul(0x100000001b3)
                .rotate_left(7);
        }
    }
    format!("{a:016x}{b:016x}")
}

/// Value of `"key":"value"` in a flat JSON object line (no nesting, common escapes undone).
pub fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let i = line.find(&pat)? + pat.len();
    let rest = line[i..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let h: String = chars.by_ref().take(4).collect();
                    if let Some(ch) = u32::from_str_radix(&h, 16).ok().and_then(char::from_u32) {
                        out.push(ch);
                    }
                }
                o => out.push(o),
            },
            c => out.push(c),
        }
    }
    None
}

pub fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// SIGKILLs the process `pidfd` refers to (never a process that reused its pid).
pub fn kill_through_pidfd(pidfd: &File) {
    // SAFETY: pidfd_send_signal with a descriptor we hold and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Starts `program` with `args`, exactly the environment `env`, stdin/stdout/stderr on
/// /dev/null and `fds` as descriptors 3, 4, … (everything else closed on exec); returns
/// its pid. Never waits for it: the shim's monitor reaps every child, so std's `Command`
/// (which waits for a child whose exec failed, and panics when the monitor got there
/// first) cannot be used. An exec failure comes back through a close-on-exec pipe.
pub fn spawn_with_fds(
    program: &Path,
    args: &[String],
    env: &[String],
    fds: &[RawFd],
) -> io::Result<libc::pid_t> {
    let cstring = |s: &str| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
    };
    let path = cstr(program)?;
    let mut argv_owned = vec![path.clone()];
    for a in args {
        argv_owned.push(cstring(a)?);
    }
    let envp_owned = env
        .iter()
        .map(|e| cstring(e))
        .collect::<io::Result<Vec<_>>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_owned.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    assert!(
        fds.len() <= 8,
        "spawn_with_fds places at most 8 descriptors"
    );
    let devnull = open(Path::new("/dev/null"), libc::O_RDWR, 0)?;
    let (err_r, err_w) = pipe()?;
    // The shim blocks the signals its signalfd reads and ignores SIGPIPE; a blocked mask
    // and ignored signals survive exec, so the child undoes both.
    // SAFETY: sigemptyset initialises the set.
    let mut no_signals: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigemptyset(&mut no_signals) };
    // SAFETY: between fork and exec the child only makes async-signal-safe calls
    // (fcntl, dup2, execve, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            let fail = |fd: RawFd| -> ! {
                let errno = *libc::__errno_location();
                libc::write(fd, (&errno as *const i32).cast(), 4);
                libc::_exit(127)
            };
            let err_fd = err_w.as_raw_fd();
            if libc::sigprocmask(libc::SIG_SETMASK, &no_signals, std::ptr::null_mut()) != 0 {
                fail(err_fd);
            }
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // Out of the way of 0..3+fds first, so placing one cannot clobber another.
            let mut moved = [0 as RawFd; 8];
            for (slot, &fd) in moved.iter_mut().zip(fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                if *slot < 0 {
                    fail(err_fd);
                }
            }
            for target in 0..3 {
                if libc::dup2(devnull.as_raw_fd(), target) < 0 {
                    fail(err_fd);
                }
            }
            for (target, &fd) in (3..).zip(&moved[..fds.len()]) {
                if libc::dup2(fd, target) < 0 {
                    fail(err_fd);
                }
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(err_fd)
        }
    }
    drop(err_w);
    let mut errno = [0u8; 4];
    let mut read = 0;
    loop {
        // SAFETY: reading into a local buffer from a descriptor we own.
        let n = unsafe {
            libc::read(
                err_r.as_raw_fd(),
                errno[read..].as_mut_ptr().cast(),
                4 - read,
            )
        };
        match n {
            0 => break,
            n if n > 0 => {
                read += n as usize;
                if read == 4 {
                    break;
                }
            }
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    if read == 4 {
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_sizes() {
        let spec = r#"{"process":{"terminal":true,"consoleSize":{"height":30,"width":100},"args":["sh"]}}"#;
        assert_eq!(console_size(spec), Some((100, 30)));
        assert_eq!(
            console_size(r#"{"consoleSize": { "width" : 7, "height": 3 }}"#),
            Some((7, 3))
        );
        assert_eq!(console_size(r#"{"process":{"terminal":true}}"#), None);
    }

    #[test]
    fn json_helpers() {
        let l = r#"{"level":"error","msg":"container \"x\" does not exist\n","time":"t"}"#;
        assert_eq!(
            json_str(l, "msg").unwrap(),
            "container \"x\" does not exist\n"
        );
        assert_eq!(json_str(l, "level").unwrap(), "error");
        assert!(json_str(l, "nope").is_none());
        let e = json_escape("a\"b\\c");
        assert_eq!(
            json_str(&format!("{{\"k\":\"{e}\"}}"), "k").unwrap(),
            "a\"b\\c"
        );
    }

    #[test]
    fn codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), 137);
        assert_ne!(hash_hex(&["a", "bc"]), hash_hex(&["ab", "c"]));
        assert_eq!(hash_hex(&["x"]).len(), 32);
    }
}
