//! The OCI runtime spec of a container started by `berth run`: Linux defaults equivalent
//! to containerd's `oci.WithDefaultSpec` (namespaces, the usual /proc /dev /sys mounts,
//! the default capability set, an `RLIMIT_NOFILE` of 1024, masked and read-only /proc
//! paths, a deny-all device cgroup), then the image configuration (Env, Entrypoint/Cmd,
//! WorkingDir, User) and the command line's overrides on top.
//!
//! `oom_score_adj` is deliberately left unset: lowering it needs `CAP_SYS_RESOURCE`,
//! which runc would then fail on where the daemon lacks it.

use berth_core::{Error, Result};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, Process, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use std::collections::HashSet;

/// The type URL containerd stores a runtime spec under in a container record.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// containerd's default `PATH` for images that set none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the command line asks for on top of the image.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Replaces the image's Cmd (the Entrypoint stays, as with Docker).
    pub args: Vec<String>,
    /// Replaces the image's Entrypoint (`Some(vec![])` clears it).
    pub entrypoint: Option<Vec<String>>,
    /// `K=V` entries replacing or extending the image's Env.
    pub env: Vec<String>,
    pub terminal: bool,
    /// The caller's terminal as (columns, rows): runc sizes the new pty with it, so
    /// that the first thing the process does already sees the right size (a resize
    /// after start would race with it).
    pub console_size: Option<(u32, u32)>,
    /// `uid[:gid]` overriding the image's User.
    pub user: Option<String>,
    pub cwd: Option<String>,
}

fn err(what: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("building the runtime spec: {what}"))
}

/// containerd's default capability set (`oci.defaultUnixCaps`).
fn default_caps() -> HashSet<Capability> {
    use Capability::*;
    [
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
    .into_iter()
    .collect()
}

fn mount(
    dest: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<oci_spec::runtime::Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(err)
}

/// containerd's default Linux spec for container `id` of namespace `ns` (cgroup
/// `/<ns>/<id>`, rootfs `rootfs` in the bundle), running `sh` as root in `/`.
pub fn default_spec(ns: &str, id: &str) -> Result<Spec> {
    let caps = default_caps();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(err)?,
        )
        .args(vec!["sh".to_string()])
        .env(vec![DEFAULT_PATH.to_string()])
        .cwd("/")
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .permitted(caps.clone())
                .effective(caps)
                .build()
                .map_err(err)?,
        )
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(1024u64)
                .soft(1024u64)
                .build()
                .map_err(err)?,
        ])
        .build()
        .map_err(err)?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build().map_err(err))
    .collect::<Result<Vec<_>>>()?;
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let linux = LinuxBuilder::default()
        .masked_paths(strings(&[
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ]))
        .readonly_paths(strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]))
        .cgroups_path(format!("/{ns}/{id}"))
        .resources(
            LinuxResourcesBuilder::default()
                .devices(vec![
                    LinuxDeviceCgroupBuilder::default()
                        .allow(false)
                        .access("rwm")
                        .build()
                        .map_err(err)?,
                ])
                .build()
                .map_err(err)?,
        )
        .namespaces(namespaces)
        .build()
        .map_err(err)?;
    let mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ];
    let mut spec = Spec::default();
    spec.set_version("1.0.2-dev".to_string());
    spec.set_hostname(None);
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .map_err(err)?,
    ));
    spec.set_process(Some(process));
    spec.set_mounts(Some(mounts));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    Ok(spec)
}

/// Sets `KEY=value` in `env`, replacing an entry with the same key.
pub fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split_once('=').map(|(k, _)| k).unwrap_or(entry);
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e) == key)
    {
        Some(e) => *e = entry.to_string(),
        None => env.push(entry.to_string()),
    }
}

/// Parses a numeric `uid[:gid]`; a name (or a missing gid, which is the user's primary
/// group) needs the image's /etc/passwd: see [`resolve_user`].
fn numeric_user(user: &str) -> Option<(u32, Option<u32>)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse().ok()?;
    let gid = match g {
        Some(g) => Some(g.parse().ok()?),
        None => None,
    };
    Some((uid, gid))
}

/// Resolves an image or command-line user (`uid`, `uid:gid`, `name`, `name:group`, any
/// mix) against the image's `/etc/passwd` and `/etc/group` contents (empty when the
/// image has none), like containerd's `WithUser`.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<(u32, u32)> {
    if let Some((uid, Some(gid))) = numeric_user(user) {
        return Ok((uid, gid));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // passwd lines: name:x:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => {
            let primary = entries
                .iter()
                .find(|f| f[2].parse() == Ok(uid))
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(0);
            (uid, primary)
        }
        Err(_) => {
            let f = entries.iter().find(|f| f[0] == u).ok_or_else(|| {
                Error::not_found(format!(
                    "user {u:?}: no such user in the image's /etc/passwd"
                ))
            })?;
            (
                f[2].parse()
                    .map_err(|_| err(format!("bad uid for user {u:?}")))?,
                f[3].parse()
                    .map_err(|_| err(format!("bad gid for user {u:?}")))?,
            )
        }
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "group {g:?}: no such group in the image's /etc/group"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
}

/// Whether `user` can be resolved without reading the image's files.
pub fn user_is_numeric(user: &str) -> bool {
    matches!(numeric_user(user), Some((_, Some(_))))
}

/// Applies the image configuration and the command line's overrides to `spec`.
/// `users` are the image's /etc/passwd and /etc/group, read only when a user needs them.
pub fn apply_image(
    spec: &mut Spec,
    image: &ImageConfiguration,
    o: &Overrides,
    users: Option<(&str, &str)>,
) -> Result<()> {
    let cfg = image.config().clone().unwrap_or_default();
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| err("no process"))?;

    // Env: the image's, with containerd's default PATH when it sets none, then -e.
    let mut env: Vec<String> = cfg.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if o.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".to_string());
    }
    for e in &o.env {
        set_env(&mut env, e);
    }
    process.set_env(Some(env));

    // Entrypoint + Cmd, Docker's way: arguments on the command line replace Cmd only.
    let mut args = o
        .entrypoint
        .clone()
        .unwrap_or_else(|| cfg.entrypoint().clone().unwrap_or_default());
    if o.args.is_empty() {
        // An overridden entrypoint drops the image's Cmd too, as Docker does.
        if o.entrypoint.is_none() {
            args.extend(cfg.cmd().clone().unwrap_or_default());
        }
    } else {
        args.extend(o.args.iter().cloned());
    }
    if args.is_empty() {
        return Err(Error::invalid_argument(
            "no command: the image has neither Entrypoint nor Cmd; give one after the image name",
        ));
    }
    process.set_args(Some(args));

    let cwd = o
        .cwd
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    process.set_cwd(cwd.into());
    process.set_terminal(Some(o.terminal));
    set_console_size(process, o.terminal, o.console_size);

    let user = o
        .user
        .clone()
        .or_else(|| cfg.user().clone().filter(|u| !u.is_empty()));
    if let Some(user) = user {
        let (passwd, group) = users.unwrap_or(("", ""));
        let (uid, gid) = resolve_user(&user, passwd, group)?;
        let u = process.user_mut();
        u.set_uid(uid);
        u.set_gid(gid);
    }
    Ok(())
}

fn set_console_size(p: &mut Process, terminal: bool, size: Option<(u32, u32)>) {
    let size = size.filter(|_| terminal).and_then(|(width, height)| {
        oci_spec::runtime::BoxBuilder::default()
            .width(width)
            .height(height)
            .build()
            .ok()
    });
    p.set_console_size(size);
}

/// The process of an exec in a container whose spec is `spec`: its user, env, cwd,
/// capabilities and limits (what `ctr task exec` starts from), with the args, terminal
/// and `o`'s env, user and cwd applied. The user must be numeric: names would need the
/// container's /etc/passwd, which is inside its running root file system.
pub fn exec_process(spec: &Spec, o: &Overrides) -> Result<Process> {
    let mut p = spec
        .process()
        .clone()
        .ok_or_else(|| err("the container's spec has no process"))?;
    p.set_args(Some(o.args.clone()));
    p.set_terminal(Some(o.terminal));
    set_console_size(&mut p, o.terminal, o.console_size);
    let mut e = p.env().clone().unwrap_or_default();
    if o.terminal && !e.iter().any(|v| v.starts_with("TERM=")) {
        e.push("TERM=xterm".to_string());
    }
    for v in &o.env {
        set_env(&mut e, v);
    }
    p.set_env(Some(e));
    if let Some(user) = &o.user {
        let (uid, gid) = match numeric_user(user) {
            Some((uid, gid)) => (uid, gid.unwrap_or(0)),
            None => {
                return Err(Error::invalid_argument(format!(
                    "exec --user {user:?}: give a numeric UID[:GID] (names are resolved only by run)"
                )));
            }
        };
        let u = p.user_mut();
        u.set_uid(uid);
        u.set_gid(gid);
    }
    if let Some(cwd) = &o.cwd {
        p.set_cwd(cwd.into());
    }
    Ok(p)
}

/// The spec as stored in a container record.
pub fn to_any(spec: &Spec) -> Result<prost_types::Any> {
    Ok(prost_types::Any {
        type_url: SPEC_TYPE_URL.to_string(),
        value: serde_json::to_vec(spec).map_err(err)?,
    })
}

/// The spec of a container record.
pub fn from_any(any: &prost_types::Any) -> Result<Spec> {
    serde_json::from_slice(&any.value)
        .map_err(|e| Error::invalid_argument(format!("the container's runtime spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: &str) -> ImageConfiguration {
        ImageConfiguration::from_reader(json.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_follow_containerd() {
        let s = default_spec("ns", "c1").unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
        assert_eq!(v["linux"]["cgroupsPath"], "/ns/c1");
        let mounts: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/run"
            ]
        );
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert!(v["process"].get("oomScoreAdj").is_none());
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
    }

    #[test]
    fn image_config_and_overrides() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"Env":["PATH=/bin","A=1"],"Entrypoint":["/init"],"Cmd":["serve"],
                          "WorkingDir":"/srv","User":"7:8"}}"#,
        );
        let mut s = default_spec("default", "x").unwrap();
        apply_image(&mut s, &img, &Overrides::default(), None).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/init", "serve"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/bin", "A=1"]);
        assert_eq!(p.cwd().to_str(), Some("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (7, 8));

        let o = Overrides {
            args: vec!["echo".into(), "hi".into()],
            env: vec!["A=2".into(), "B=3".into()],
            terminal: true,
            console_size: Some((100, 30)),
            ..Default::default()
        };
        let mut s = default_spec("default", "x").unwrap();
        apply_image(&mut s, &img, &o, None).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v["process"]["consoleSize"],
            serde_json::json!({"height": 30, "width": 100})
        );
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/init", "echo", "hi"]);
        assert_eq!(
            p.env().as_ref().unwrap(),
            &["PATH=/bin", "A=2", "TERM=xterm", "B=3"]
        );
        assert_eq!(p.terminal(), Some(true));
    }

    #[test]
    fn users_resolve_against_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(resolve_user("www", passwd, group).unwrap(), (33, 34));
        assert_eq!(resolve_user("www:staff", passwd, group).unwrap(), (33, 50));
        assert_eq!(resolve_user("33", passwd, group).unwrap(), (33, 34));
        assert_eq!(resolve_user("5:6", "", "").unwrap(), (5, 6));
        let e = resolve_user("nobody", passwd, group).unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
    }

    #[test]
    fn exec_starts_from_the_container_process() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"Env":["A=1"],"Cmd":["sh"],"User":"7:8","WorkingDir":"/srv"}}"#,
        );
        let mut s = default_spec("default", "x").unwrap();
        apply_image(&mut s, &img, &Overrides::default(), None).unwrap();
        let o = Overrides {
            args: vec!["id".into()],
            env: vec!["B=2".into()],
            ..Default::default()
        };
        let p = exec_process(&s, &o).unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["id"]);
        assert_eq!((p.user().uid(), p.user().gid()), (7, 8));
        assert_eq!(p.cwd().to_str(), Some("/srv"));
        assert!(p.env().as_ref().unwrap().contains(&"B=2".to_string()));
        assert_eq!(
            p.capabilities(),
            s.process().as_ref().unwrap().capabilities()
        );
        let o = Overrides {
            args: vec!["id".into()],
            user: Some("5".into()),
            cwd: Some("/tmp".into()),
            ..Default::default()
        };
        let p = exec_process(&s, &o).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (5, 0));
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        let o = Overrides {
            user: Some("www".into()),
            ..o
        };
        let e = exec_process(&s, &o).unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
    }

    #[test]
    fn no_command_is_an_error() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        let mut s = default_spec("default", "x").unwrap();
        let e = apply_image(&mut s, &img, &Overrides::default(), None).unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
    }
}
