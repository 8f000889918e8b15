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

/// `caps` as the bounding, permitted and effective sets, with no inheritable and no
/// ambient set (CVE-2022-24769: inherited capabilities survive an execve of a program
/// with file capabilities, ambient ones even reach non-root users). They are cleared
/// explicitly: the builder fills unset sets from oci-spec's `Default`, which puts
/// AUDIT_WRITE, KILL and NET_BIND_SERVICE in all five.
fn capabilities(caps: HashSet<Capability>) -> Result<oci_spec::runtime::LinuxCapabilities> {
    let mut c = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .permitted(caps.clone())
        .effective(caps)
        .build()
        .map_err(err)?;
    c.set_inheritable(None);
    c.set_ambient(None);
    Ok(c)
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
        .capabilities(capabilities(caps)?)
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
        .masked_paths(strings(berth_core::oci::DEFAULT_MASKED_PATHS))
        .readonly_paths(strings(berth_core::oci::DEFAULT_READONLY_PATHS))
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

/// The largest uid or gid a user string or the image's /etc/passwd and /etc/group may
/// give: runc keeps ids in a signed 32-bit int and refuses larger ones, and containerd
/// follows it (it also keeps out `(uid_t)-1`, 4294967295, which the kernel reads as "no
/// change"). Anything larger, or negative, is an invalid argument, never wrapped or
/// truncated (CVE-2024-40635: `4294967296` ended as uid 0, root).
pub const MAX_ID: u32 = i32::MAX as u32;

/// One half of a user string: a number or a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id<'a> {
    Num(u32),
    Name(&'a str),
}

/// Reads one half of `user`: an optional sign followed by digits is a number and must be
/// in `0..=MAX_ID` (an error otherwise, not a name to look up); anything else is a name.
fn parse_id<'a>(s: &'a str, what: &str, user: &str) -> Result<Id<'a>> {
    if s.is_empty() {
        return Err(Error::invalid_argument(format!(
            "user {user:?}: the {what} is empty"
        )));
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Id::Name(s));
    }
    match digits.parse::<u32>() {
        Ok(v) if v <= MAX_ID && !s.starts_with('-') => Ok(Id::Num(v)),
        _ => Err(Error::invalid_argument(format!(
            "user {user:?}: {what} {s} is out of range (0 to {MAX_ID})"
        ))),
    }
}

/// Splits `user` (`uid`, `uid:gid`, `name`, `name:group`, any mix) into its halves.
fn parse_user(user: &str) -> Result<(Id<'_>, Option<Id<'_>>)> {
    let mut parts = user.split(':');
    let u = parse_id(parts.next().unwrap_or_default(), "user", user)?;
    let g = parts
        .next()
        .map(|g| parse_id(g, "group", user))
        .transpose()?;
    if parts.next().is_some() {
        return Err(Error::invalid_argument(format!(
            "user {user:?}: expected USER[:GROUP]"
        )));
    }
    Ok((u, g))
}

/// An id field of the image's /etc/passwd or /etc/group: digits in `0..=MAX_ID`.
fn file_id(field: &str) -> Option<u32> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok().filter(|v| *v <= MAX_ID)
}

/// A line of /etc/passwd (`name:x:uid:gid:gecos:home:shell`) or /etc/group
/// (`name:x:gid:member,member`), split; lines with fewer than `min` fields are skipped.
fn records(text: &str, min: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(move |f| f.len() >= min)
}

/// The id in field `i` of a matching line of the image's `file`, or an error naming it.
fn matched_id(f: &[&str], i: usize, file: &str) -> Result<u32> {
    file_id(f[i]).ok_or_else(|| {
        err(format!(
            "the image's {file} gives {:?} the id {:?}, not a number from 0 to {MAX_ID}",
            f[0], f[i]
        ))
    })
}

/// The user a container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// `process.user.additionalGids`: the primary gid and the groups of the image's
    /// /etc/group that list the user as a member.
    pub additional_gids: Vec<u32>,
}

/// Resolves an image or command-line user against the image's `/etc/passwd` and
/// `/etc/group` contents (empty when the image has none), as containerd's
/// `WithImageConfig` does with `WithUser` then `WithAdditionalGIDs`:
///
/// - `uid:gid` is taken as is; a lone `uid` takes its primary group from the passwd
///   entry with that uid, or 0 when there is none; a `name` must be in /etc/passwd;
///   `:group` names must be in /etc/group;
/// - the supplementary groups (CVE-2023-25173) are those of /etc/group whose member
///   list names the user, except the group named like the user. The name is the first
///   passwd entry with the resolved uid (none: no supplementary groups), or `root` when
///   no user is given at all. The primary gid comes first unless it is already among
///   them.
///
/// Numbers out of `0..=MAX_ID` are invalid arguments (CVE-2024-40635), whether they
/// come from `user` or from the image's files.
pub fn resolve_user(user: Option<&str>, passwd: &str, group: &str) -> Result<ResolvedUser> {
    let by_name = |name: &str| {
        records(passwd, 4)
            .find(|f| f[0] == name)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "user {name:?}: no such user in the image's /etc/passwd"
                ))
            })
            .and_then(|f| Ok((matched_id(&f, 2, "/etc/passwd")?, f)))
    };
    let by_uid = |uid: u32| records(passwd, 4).find(|f| file_id(f[2]) == Some(uid));
    let (uid, gid) = match user {
        None => (0, 0),
        Some(user) => match parse_user(user)? {
            (Id::Num(uid), Some(Id::Num(gid))) => (uid, gid),
            (Id::Num(uid), None) => match by_uid(uid) {
                Some(f) => (uid, matched_id(&f, 3, "/etc/passwd")?),
                None => (uid, 0),
            },
            (Id::Name(name), None) => {
                let (uid, f) = by_name(name)?;
                (uid, matched_id(&f, 3, "/etc/passwd")?)
            }
            (u, Some(g)) => {
                let uid = match u {
                    Id::Num(uid) => uid,
                    Id::Name(name) => by_name(name)?.0,
                };
                let gid = match g {
                    Id::Num(gid) => gid,
                    Id::Name(name) => {
                        let f = records(group, 3).find(|f| f[0] == name).ok_or_else(|| {
                            Error::not_found(format!(
                                "group {name:?}: no such group in the image's /etc/group"
                            ))
                        })?;
                        matched_id(&f, 2, "/etc/group")?
                    }
                };
                (uid, gid)
            }
        },
    };
    let name = match user {
        None => Some("root"),
        Some(_) => by_uid(uid).map(|f| f[0]),
    };
    let mut additional_gids = Vec::new();
    if let Some(name) = name {
        for f in records(group, 4) {
            if f[0] != name && f[3].split(',').any(|m| m == name) {
                additional_gids.push(matched_id(&f, 2, "/etc/group")?);
            }
        }
    }
    if !additional_gids.contains(&gid) {
        additional_gids.insert(0, gid);
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// Applies the image configuration and the command line's overrides to `spec`.
/// `users` are the image's /etc/passwd and /etc/group (`None`: treated as empty files):
/// they give the user's ids and supplementary groups even when no user is set.
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
    let (passwd, group) = users.unwrap_or(("", ""));
    let r = resolve_user(user.as_deref(), passwd, group)?;
    let u = process.user_mut();
    u.set_uid(r.uid);
    u.set_gid(r.gid);
    u.set_additional_gids(Some(r.additional_gids));
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
/// and `o`'s env, user and cwd applied. `users` are the container's /etc/passwd and
/// /etc/group (`None`: treated as empty), which `o.user` is resolved against as
/// `ctr task exec --user` does (a name, or a lone uid's primary group).
pub fn exec_process(spec: &Spec, o: &Overrides, users: Option<(&str, &str)>) -> Result<Process> {
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
        let (passwd, group) = users.unwrap_or(("", ""));
        let r = resolve_user(Some(user), passwd, group)?;
        // As containerd's WithUser: the container user's supplementary groups are not
        // the exec'd user's; only its primary group is kept.
        let u = p.user_mut();
        u.set_uid(r.uid);
        u.set_gid(r.gid);
        u.set_additional_gids(Some(vec![r.gid]));
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
    use berth_core::error::ErrorKind;

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

    fn ids(user: &str, passwd: &str, group: &str) -> (u32, u32) {
        let r = resolve_user(Some(user), passwd, group).unwrap();
        (r.uid, r.gid)
    }

    #[test]
    fn users_resolve_against_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(ids("www", passwd, group), (33, 34));
        assert_eq!(ids("www:staff", passwd, group), (33, 50));
        assert_eq!(ids("33", passwd, group), (33, 34));
        assert_eq!(ids("33:staff", passwd, group), (33, 50));
        assert_eq!(ids("5:6", "", ""), (5, 6));
        assert_eq!(ids("1234", passwd, group), (1234, 0));
        let e = resolve_user(Some("nobody"), passwd, group).unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
        let e = resolve_user(Some("www:nogroup"), passwd, group).unwrap_err();
        assert!(e.to_string().contains("no such group"), "{e}");
        for bad in ["", ":5", "5:", "a:b:c"] {
            let e = resolve_user(Some(bad), passwd, group).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
        }
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          www:x:33:34::/var/www:/bin/false\n\
                          bob:x:1000:1000::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
                         wheel:x:10:root,bob\n\
                         staff:x:50:www,bob\n\
                         www:x:99:www\n\
                         audio:x:29:bob,www\n\
                         bob:x:1000:\n";

    /// The supplementary groups a user gets, with the primary gid.
    fn groups(user: Option<&str>) -> Vec<u32> {
        resolve_user(user, PASSWD, GROUP).unwrap().additional_gids
    }

    /// CVE-2023-25173 (GHSA-hmfx-3pcx-653p): the process gets the supplementary groups
    /// /etc/group gives its user (looked up by the uid's passwd name for numeric
    /// users, `root` when there is no user), after its primary group; a group named
    /// like the user is its own, not a supplementary one.
    #[test]
    fn supplementary_groups_come_from_the_images_etc_group() {
        // By name and by uid alike; "www:x:99:www" is skipped (named like the user).
        assert_eq!(groups(Some("www")), [34, 50, 29]);
        assert_eq!(groups(Some("33")), [34, 50, 29]);
        // An explicit gid is the primary group; the member groups still follow.
        assert_eq!(groups(Some("33:7")), [7, 50, 29]);
        assert_eq!(groups(Some("www:audio")), [50, 29]);
        assert_eq!(groups(Some("bob")), [1000, 10, 50, 29]);
        // No user: root, with the groups listing root.
        assert_eq!(groups(None), [0, 10]);
        assert_eq!(groups(Some("0")), [0, 10]);
        // A uid without a passwd entry has no name, so only its primary group.
        assert_eq!(groups(Some("4242")), [0]);
        assert_eq!(groups(Some("4242:4343")), [4343]);
        // Without the image's files: only the primary group.
        assert_eq!(resolve_user(None, "", "").unwrap().additional_gids, [0]);
    }

    /// CVE-2023-25173: the groups reach the spec's `process.user.additionalGids`, from
    /// the image's User or the command line's, and an exec as another user does not
    /// keep the container user's groups.
    #[test]
    fn spec_carries_the_supplementary_groups() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"Cmd":["sh"],"User":"bob"}}"#,
        );
        let users = Some((PASSWD, GROUP));
        let mut s = default_spec("default", "x").unwrap();
        apply_image(&mut s, &img, &Overrides::default(), users).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(
            v["process"]["user"]["additionalGids"],
            serde_json::json!(groups(Some("bob")))
        );
        let o = Overrides {
            user: Some("33".into()),
            ..Default::default()
        };
        let mut s = default_spec("default", "x").unwrap();
        apply_image(&mut s, &img, &o, users).unwrap();
        let u = s.process().as_ref().unwrap().user();
        assert_eq!(u.uid(), 33);
        assert_eq!(
            u.additional_gids().as_deref(),
            Some(&groups(Some("33"))[..])
        );

        let o = Overrides {
            args: vec!["id".into()],
            user: Some("5:6".into()),
            ..Default::default()
        };
        let p = exec_process(&s, &o, Some((PASSWD, GROUP))).unwrap();
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[6][..]));
    }

    /// User strings that overflowed to root (or would, with a wrapping or truncating
    /// conversion), and the edges of the accepted range.
    const OUT_OF_RANGE: &[&str] = &[
        "4294967296",
        "4294967296:4294967296",
        "-1",
        "-1:-1",
        "2147483648",
        "2147483648:2147483648",
        "4294967295",
        "0:4294967296",
        "4294967296:0",
        "99999999999999999999999",
        "www:4294967296",
        "-0",
    ];

    /// CVE-2024-40635 (GHSA-265r-hfxg-fhmg): a uid or gid beyond a 32-bit signed int,
    /// negative, or `(uid_t)-1` is an invalid argument, not truncated to 0 and not
    /// looked up as a name (the passwd here maps a user named "4294967296" to root).
    #[test]
    fn user_ids_out_of_range_are_invalid_arguments_never_root() {
        let passwd = format!("4294967296:x:0:0::/:/bin/sh\n-1:x:0:0::/:/bin/sh\n{PASSWD}");
        for user in OUT_OF_RANGE {
            let e = resolve_user(Some(user), &passwd, GROUP).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{user:?}: {e}");
            assert!(e.to_string().contains("out of range"), "{user:?}: {e}");
        }
        // The largest accepted id is i32::MAX, taken as is.
        let r = resolve_user(Some("2147483647:2147483647"), &passwd, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (MAX_ID, MAX_ID));
        assert_eq!(MAX_ID as i64, i32::MAX as i64);
    }

    /// CVE-2024-40635: the same through the image's User, `run --user` and `exec --user`.
    #[test]
    fn out_of_range_users_fail_the_spec_for_image_run_and_exec() {
        for user in OUT_OF_RANGE {
            let img = image(&format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},
                    "config":{{"Cmd":["sh"],"User":"{user}"}}}}"#
            ));
            let mut s = default_spec("default", "x").unwrap();
            let e = apply_image(&mut s, &img, &Overrides::default(), Some((PASSWD, GROUP)))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "image {user:?}: {e}");
            let o = Overrides {
                args: vec!["id".into()],
                user: Some(user.to_string()),
                ..Default::default()
            };
            let mut s = default_spec("default", "x").unwrap();
            let e = apply_image(&mut s, &img, &o, Some((PASSWD, GROUP))).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "run {user:?}: {e}");
            let s = default_spec("default", "x").unwrap();
            let e = exec_process(&s, &o, Some((PASSWD, GROUP))).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "exec {user:?}: {e}");
            assert!(e.to_string().contains("out of range"), "exec {user:?}: {e}");
        }
    }

    /// CVE-2024-40635 from the image side: ids in its /etc/passwd or /etc/group that
    /// do not fit are errors, not 0 (a bad primary gid used to become group root).
    #[test]
    fn out_of_range_ids_in_the_images_files_are_errors_not_root() {
        let passwd = "evil:x:4294967296:0::/:/bin/sh\n\
                      bad:x:1000:4294967296::/:/bin/sh\n\
                      neg:x:1001:-1::/:/bin/sh\n\
                      ok:x:1002:1002::/:/bin/sh\n";
        let group = "big:x:4294967296:ok\nbiggrp:x:2147483648:\n";
        for user in [
            "evil",
            "bad",
            "1000",
            "neg",
            "1001",
            "ok",
            "1002",
            "ok:biggrp",
        ] {
            let e = resolve_user(Some(user), passwd, group).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{user:?}: {e}");
        }
        // A line that fails to parse is not taken for uid 0.
        let r = resolve_user(Some("0"), passwd, "").unwrap();
        assert_eq!((r.uid, r.gid, r.additional_gids), (0, 0, vec![0]));
    }

    fn cap_sets(s: &Spec) -> serde_json::Value {
        serde_json::to_value(s).unwrap()["process"]["capabilities"].clone()
    }

    /// CVE-2022-24769 (GHSA-c9cp-9c75-9v8c): no inheritable and no ambient
    /// capabilities, in the default spec and once the image's (non-root) user is set.
    #[test]
    fn no_inheritable_or_ambient_capabilities() {
        let img = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
                "config":{"Cmd":["sh"],"User":"www"}}"#,
        );
        let default = default_spec("default", "x").unwrap();
        let mut with_user = default.clone();
        apply_image(
            &mut with_user,
            &img,
            &Overrides::default(),
            Some((PASSWD, GROUP)),
        )
        .unwrap();
        assert_eq!(with_user.process().as_ref().unwrap().user().uid(), 33);
        for s in [&default, &with_user] {
            let caps = s
                .process()
                .as_ref()
                .unwrap()
                .capabilities()
                .clone()
                .unwrap();
            let empty = |set: &Option<oci_spec::runtime::Capabilities>| {
                set.as_ref().is_none_or(|c| c.is_empty())
            };
            assert!(empty(caps.inheritable()), "{caps:?}");
            assert!(empty(caps.ambient()), "{caps:?}");
            // What runc reads: the JSON, with neither set or empty ones.
            let v = cap_sets(s);
            for set in ["inheritable", "ambient"] {
                assert!(
                    v.get(set)
                        .is_none_or(|a| a.as_array().is_some_and(|a| a.is_empty())),
                    "{set}: {v}"
                );
            }
            // The other sets are containerd's defaults, not emptied along.
            assert_eq!(caps.bounding().as_ref(), Some(&default_caps()));
            assert_eq!(caps.permitted().as_ref(), Some(&default_caps()));
            assert_eq!(caps.effective().as_ref(), Some(&default_caps()));
        }
    }

    /// GHSA-7ww5-4wqc-m92c: the RAPL powercap counters (a power side channel) are
    /// masked by default, along with containerd's other masked paths.
    #[test]
    fn default_spec_masks_powercap() {
        let s = default_spec("default", "x").unwrap();
        let masked = s.linux().as_ref().unwrap().masked_paths().clone().unwrap();
        assert!(
            masked.iter().any(|p| p == "/sys/devices/virtual/powercap"),
            "{masked:?}"
        );
        for p in ["/proc/kcore", "/sys/firmware", "/proc/keys"] {
            assert!(masked.iter().any(|m| m == p), "{p} in {masked:?}");
        }
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
        let p = exec_process(&s, &o, None).unwrap();
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
        let p = exec_process(&s, &o, None).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (5, 0));
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        // Against the container's own files, as `ctr task exec --user`: a name, and a
        // lone uid's primary group; only the primary group is kept.
        let passwd = "root:x:0:0::/root:/bin/sh\nwww:x:33:44::/var/www:/bin/sh\n";
        let group = "www:x:44:\nadm:x:4:www\n";
        let named = Overrides {
            user: Some("www".into()),
            ..o.clone()
        };
        let p = exec_process(&s, &named, Some((passwd, group))).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (33, 44));
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[44][..]));
        let by_uid = Overrides {
            user: Some("33".into()),
            ..o.clone()
        };
        let p = exec_process(&s, &by_uid, Some((passwd, group))).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (33, 44));
        let group_name = Overrides {
            user: Some("root:adm".into()),
            ..o.clone()
        };
        let p = exec_process(&s, &group_name, Some((passwd, group))).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (0, 4));
        let missing = Overrides {
            user: Some("nobody".into()),
            ..o
        };
        let e = exec_process(&s, &missing, Some((passwd, group))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("nobody"), "{e}");
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
