//! The CVE-2019-5736 defence: `create` and `exec` put a clone of berth-runc inside the
//! container (libcontainer's init, before it executes the container's program). A
//! process in the container could open that clone's /proc/PID/exe and, once berth-runc
//! has exited, write through it to the host's binary. So those two commands first
//! re-execute berth-runc from a sealed in-memory copy (memfd with write, grow and shrink
//! seals, as runc 1.1 does): /proc/PID/exe then names the copy, which cannot be changed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;

const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Whether the running executable is already a sealed copy.
pub fn running_from_sealed_copy() -> bool {
    let Ok(exe) = File::open("/proc/self/exe") else {
        return false;
    };
    let seals = unsafe { libc::fcntl(exe.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & SEALS == SEALS
}

/// Re-executes the program from a sealed memfd copy with the same arguments and
/// environment; returns only when already running from one (or on error).
pub fn reexec_from_sealed_copy() -> io::Result<()> {
    if running_from_sealed_copy() {
        return Ok(());
    }
    let mut exe = File::open("/proc/self/exe")?;
    let fd = unsafe {
        libc::memfd_create(
            c"berth-runc".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut copy = unsafe { File::from_raw_fd(fd) };
    io::copy(&mut exe, &mut copy)?;
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv)
        })
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    unsafe { libc::fexecve(copy.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
    Err(io::Error::last_os_error())
}
