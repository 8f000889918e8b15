//! The loopback interface of a container's new network namespace.
//!
//! runc brings `lo` up in every network namespace it creates (its spec conversion adds a
//! "loopback" network), so `127.0.0.1` works in a container from its first instruction.
//! libcontainer leaves `lo` down; berth-runc brings it up after `create`, while the
//! init still waits for `start`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Whether the spec asks for a new network namespace (one without a path to join).
pub fn creates_network_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|namespaces| {
            namespaces.iter().any(|ns| {
                ns.typ() == LinuxNamespaceType::Network
                    && ns.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
            })
        })
}

/// Sets `lo` up in the network namespace of process `pid`.
pub fn bring_up_loopback(pid: i32) -> Result<(), String> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("opening the network namespace of {pid}: {e}"))?;
    // setns moves only the calling thread: a thread of its own leaves the rest of
    // berth-runc where it was.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering the network namespace of {pid}: {e}"))?;
                set_up("lo")
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Adds IFF_UP to interface `name` of the calling thread's network namespace.
fn set_up(name: &str) -> Result<(), String> {
    let fail = |what: &str| format!("{what} {name}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("a socket to configure"));
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives the calls.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(fail("reading the flags of"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(fail("bringing up"));
        }
    }
    Ok(())
}
