//! The monitor: one thread that reaps every child (the shim is a subreaper) and watches
//! cgroup OOM eventfds. Exits of commands the shim runs itself (runc) go back to the caller
//! waiting in [`Monitor::wait`]; every other exit (container processes) and every OOM is
//! sent to the main thread as a [`Msg`].

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::sys;

pub enum Msg {
    Exit {
        pid: i32,
        status: i32,
    },
    Oom {
        container_id: String,
    },
    /// An event to forward to the daemon (see `events`).
    Event {
        topic: &'static str,
        any: containerd_shim_protos::protobuf::well_known_types::any::Any,
    },
    Shutdown,
}

struct OomWatch {
    /// An eventfd (cgroup v1) or an inotify fd on memory.events (cgroup v2).
    efd: File,
    _ctl: Option<File>,
    container_id: String,
    cgroup_dir: PathBuf,
    /// cgroup v2: the last `oom_kill` count seen in memory.events.
    v2_count: Option<u64>,
}

fn v2_oom_kills(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Inner {
    waiting: HashSet<i32>,
    done: HashMap<i32, i32>,
    oom: Vec<OomWatch>,
}

pub struct Monitor {
    inner: Mutex<Inner>,
    cv: Condvar,
    wake: File,
}

/// Blocks SIGCHLD in the calling thread (call before any other thread exists, so that every
/// thread inherits the mask and the signalfd sees all SIGCHLDs).
pub fn block_sigchld() -> io::Result<libc::sigset_t> {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        sys::cvt(libc::pthread_sigmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        Ok(set)
    }
}

impl Monitor {
    pub fn start(tx: Sender<Msg>) -> io::Result<Arc<Monitor>> {
        let set = block_sigchld()?;
        let sfd =
            sys::cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        let sfd = unsafe { File::from_raw_fd(sfd) };
        let m = Arc::new(Monitor {
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
            wake: sys::eventfd()?,
        });
        let m2 = m.clone();
        std::thread::Builder::new()
            .name("monitor".into())
            .stack_size(64 * 1024)
            .spawn(move || m2.run(sfd, tx))?;
        Ok(m)
    }

    fn run(&self, sfd: File, tx: Sender<Msg>) {
        loop {
            let (fds, ids): (Vec<RawFd>, Vec<usize>) = {
                let g = self.inner.lock().unwrap();
                let mut fds = vec![sfd.as_raw_fd(), self.wake.as_raw_fd()];
                let mut ids = vec![usize::MAX, usize::MAX];
                for (i, w) in g.oom.iter().enumerate() {
                    fds.push(w.efd.as_raw_fd());
                    ids.push(i);
                }
                (fds, ids)
            };
            // A periodic reap as a safety net against a lost wakeup.
            let ready = sys::poll_read(&fds, 5000).unwrap_or_default();
            if ready.contains(&1) {
                sys::eventfd_read(&self.wake);
            }
            if ready.contains(&0) {
                let mut buf = [0u8; 128 * 8];
                while unsafe {
                    libc::read(
                        sfd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                    )
                } > 0
                {}
            }
            self.reap(&tx);
            let ooms: Vec<usize> = ready.iter().filter(|&&i| i >= 2).map(|&i| ids[i]).collect();
            if !ooms.is_empty() {
                let mut g = self.inner.lock().unwrap();
                let mut gone = Vec::new();
                for i in ooms {
                    let Some(w) = g.oom.get_mut(i) else { continue };
                    if w.v2_count.is_some() {
                        let mut buf = [0u8; 4096];
                        unsafe {
                            libc::read(
                                w.efd.as_raw_fd(),
                                buf.as_mut_ptr() as *mut libc::c_void,
                                buf.len(),
                            )
                        };
                    } else {
                        sys::eventfd_read(&w.efd);
                    }
                    if !w.cgroup_dir.exists() {
                        gone.push(i);
                        continue;
                    }
                    let fire = match w.v2_count {
                        Some(last) => {
                            let now = v2_oom_kills(&w.cgroup_dir);
                            w.v2_count = Some(now);
                            now > last
                        }
                        None => true,
                    };
                    if fire {
                        let _ = tx.send(Msg::Oom {
                            container_id: w.container_id.clone(),
                        });
                    }
                }
                gone.sort_unstable();
                for i in gone.into_iter().rev() {
                    g.oom.remove(i);
                }
            }
        }
    }

    fn reap(&self, tx: &Sender<Msg>) {
        loop {
            let mut status = 0;
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let mut g = self.inner.lock().unwrap();
            if g.waiting.remove(&pid) {
                g.done.insert(pid, status);
                self.cv.notify_all();
            } else {
                drop(g);
                let _ = tx.send(Msg::Exit { pid, status });
            }
        }
    }

    /// Spawns `cmd`, registering its pid so that its exit comes back to [`Monitor::wait`].
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let mut g = self.inner.lock().unwrap();
        let child = cmd.spawn()?;
        g.waiting.insert(child.id() as i32);
        Ok(child)
    }

    /// Waits for the exit status (raw wait status) of a pid spawned with [`Monitor::spawn`].
    pub fn wait(&self, pid: i32) -> i32 {
        let mut g = self.inner.lock().unwrap();
        loop {
            if let Some(s) = g.done.remove(&pid) {
                return s;
            }
            let (ng, _) = self.cv.wait_timeout(g, Duration::from_millis(500)).unwrap();
            g = ng;
            if !g.done.contains_key(&pid) {
                // Safety net: wake the monitor in case a SIGCHLD was coalesced away.
                sys::eventfd_signal(&self.wake);
            }
        }
    }

    /// Non-blocking variant of [`Monitor::wait`].
    pub fn try_wait(&self, pid: i32) -> Option<i32> {
        self.inner.lock().unwrap().done.remove(&pid)
    }

    /// Watches a cgroup v1 memory controller directory for OOM notifications.
    pub fn watch_oom_v1(&self, container_id: &str, memcg: PathBuf) -> io::Result<()> {
        let ctl = File::open(memcg.join("memory.oom_control"))?;
        let efd = sys::eventfd()?;
        std::fs::write(
            memcg.join("cgroup.event_control"),
            format!("{} {}", efd.as_raw_fd(), ctl.as_raw_fd()),
        )?;
        self.add_watch(OomWatch {
            efd,
            _ctl: Some(ctl),
            container_id: container_id.into(),
            cgroup_dir: memcg,
            v2_count: None,
        });
        Ok(())
    }

    /// Watches a cgroup v2 directory's memory.events for new `oom_kill`s.
    pub fn watch_oom_v2(&self, container_id: &str, dir: PathBuf) -> io::Result<()> {
        let events = dir.join("memory.events");
        if !events.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no memory controller in the cgroup",
            ));
        }
        let fd = sys::cvt(unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) })?;
        let efd = unsafe { File::from_raw_fd(fd) };
        let c = sys::cstr(&events)?;
        sys::cvt(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY) })?;
        let count = v2_oom_kills(&dir);
        self.add_watch(OomWatch {
            efd,
            _ctl: None,
            container_id: container_id.into(),
            cgroup_dir: dir,
            v2_count: Some(count),
        });
        Ok(())
    }

    fn add_watch(&self, w: OomWatch) {
        self.inner.lock().unwrap().oom.push(w);
        sys::eventfd_signal(&self.wake);
    }
}
