//! The CVE-2019-5736 defence: `create` and `exec` put a clone of berth-runc inside the
//! container (libcontainer's init, before it executes the container's program). A
//! process in the container could open that clone's /proc/PID/exe and, once berth-runc
//! has exited, write through it to the host's binary. So those two commands first
//! re-execute berth-runc from a view of itself that cannot be written:
//! - a detached read-only overlayfs of its own directory (as runc 1.2 does; costs a
//!   mount, no copy), or, where that cannot be made,
//! - a sealed in-memory copy (memfd with write, grow and shrink seals, as runc 1.1 does;
//!   copies the ~4 MB binary each time).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Whether the running executable cannot be written through /proc/self/exe: a sealed
/// memfd, or a file on a read-only mount.
pub fn running_from_unwritable_view() -> bool {
    let Ok(exe) = File::open("/proc/self/exe") else {
        return false;
    };
    let seals = unsafe { libc::fcntl(exe.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & SEALS == SEALS {
        return true;
    }
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    unsafe { libc::fstatvfs(exe.as_raw_fd(), &mut vfs) == 0 && vfs.f_flag & libc::ST_RDONLY != 0 }
}

/// Re-executes the program from an unwritable view of itself with the same arguments
/// and environment; returns only when already running from one (or on error). `empty`
/// is an empty directory outside the program's own (overlayfs's second layer).
pub fn reexec_from_unwritable_view(empty: &Path) -> io::Result<()> {
    if running_from_unwritable_view() {
        return Ok(());
    }
    let exe = std::fs::read_link("/proc/self/exe")?;
    let view = match read_only_overlay_view(&exe, empty) {
        Ok(f) => f,
        Err(_) => sealed_copy()?,
    };
    reexec(&view)
}

// The mount API's system calls (the same numbers on every architecture).
const SYS_FSOPEN: libc::c_long = 430;
const SYS_FSCONFIG: libc::c_long = 431;
const SYS_FSMOUNT: libc::c_long = 432;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 1;

fn cvt(r: libc::c_long) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::c_int)
    }
}

/// `exe` opened through an overlayfs made of its directory and `empty`, never attached
/// to any mount tree and read-only: opening it for writing fails with EROFS.
fn read_only_overlay_view(exe: &Path, empty: &Path) -> io::Result<File> {
    let (Some(dir), Some(name)) = (exe.parent(), exe.file_name()) else {
        return Err(io::Error::other("no directory"));
    };
    std::fs::create_dir_all(empty)?;
    let layers = CString::new(
        [
            dir.as_os_str().as_bytes(),
            b":",
            empty.as_os_str().as_bytes(),
        ]
        .concat(),
    )?;
    let fs = cvt(unsafe { libc::syscall(SYS_FSOPEN, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?;
    let fs = unsafe { File::from_raw_fd(fs) };
    let set = |key: &std::ffi::CStr, value: &std::ffi::CStr| {
        cvt(unsafe {
            libc::syscall(
                SYS_FSCONFIG,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
    };
    set(c"lowerdir", &layers)?;
    cvt(unsafe {
        libc::syscall(
            SYS_FSCONFIG,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })?;
    let mnt = cvt(unsafe {
        libc::syscall(
            SYS_FSMOUNT,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_RDONLY,
        )
    })?;
    let mnt = unsafe { File::from_raw_fd(mnt) };
    let name = CString::new(name.as_bytes())?;
    let fd = cvt(unsafe {
        libc::openat(
            mnt.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        ) as libc::c_long
    })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A sealed memfd copy of the running executable.
fn sealed_copy() -> io::Result<File> {
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
    Ok(copy)
}

fn reexec(program: &File) -> io::Result<()> {
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
    let Err(e) = nix::unistd::fexecve(program.as_raw_fd(), &args, &env);
    Err(e.into())
}
