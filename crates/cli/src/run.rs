//! `berth run` and `berth exec`, client side like `ctr run`: the image's config is read
//! through the content API, its layers unpacked through the snapshots and diff APIs if
//! they are not yet, an active snapshot prepared on the image's top chain ID, a container
//! record created with an OCI spec built here ([`crate::spec`]), then the task created
//! and started with stdio on fifos this process creates ([`crate::stdio`]) or, with
//! `-d`, on a log file the shim appends to (`file://` stdio URIs, supported by both the
//! stock `containerd-shim-runc-v2` and Berth's shim). The command exits with the
//! container's exit status.

use crate::client::Client;
use crate::spec::{self, Overrides};
use crate::stdio::{self, Fifos, RawTerminal};
use crate::{CliError, grpc};
use berth_api::services::containers::v1::containers_client::ContainersClient;
use berth_api::services::containers::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, GetContainerRequest,
    container::Runtime,
};
use berth_api::services::content::v1::ReadContentRequest;
use berth_api::services::images::v1::GetImageRequest;
use berth_api::services::leases::v1::{CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete};
use berth_api::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_api::services::snapshots::v1::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use berth_api::services::tasks::v1::tasks_client::TasksClient;
use berth_api::services::tasks::v1::{
    CloseIoRequest, CreateTaskRequest, DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest,
    KillRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use berth_api::types::Mount;
use berth_remotes::manifest;
use berth_remotes::{Platform, Reference};
use futures::StreamExt;
use oci_spec::image::{Descriptor, ImageConfiguration};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Channel;

/// The label holding a detached container's log file (read by `berth logs`, removed by
/// `berth rm`).
pub const LOG_LABEL: &str = "io.berth.cli.log";
/// containerd's label for the image's StopSignal (what `berth stop` sends first).
pub const STOP_SIGNAL_LABEL: &str = "io.containerd.image.config.stop-signal";
/// The type URL of an exec's process spec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

static EXIT_CODE: AtomicU8 = AtomicU8::new(0);

/// The exit status `berth` should end with after a successful command (a container's or
/// exec'd process's status for `run` and `exec`, 0 otherwise).
pub fn exit_code() -> u8 {
    EXIT_CODE.load(Ordering::Relaxed)
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Keep stdin open and forward it to the container
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Allocate a pseudo-terminal (the caller's terminal goes into raw mode)
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Delete the task, container and snapshot when the container exits
    #[arg(long, conflicts_with = "detach")]
    pub rm: bool,
    /// Run in the background: print the container ID, output goes to a log (`berth logs`)
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Container ID (default: a random one)
    #[arg(long)]
    pub name: Option<String>,
    /// Hostname inside the container (default: the container ID)
    #[arg(long)]
    pub hostname: Option<String>,
    /// Runtime (shim) to use, e.g. io.containerd.runc.v2 (the stock runc shim) or
    /// io.containerd.berth.v2 (Berth's)
    #[arg(long, default_value = "io.containerd.runc.v2")]
    pub runtime: String,
    /// Set an environment variable (K=V), may be repeated
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Run as UID, UID:GID, USER or USER:GROUP instead of the image's User
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Working directory instead of the image's WorkingDir
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Replace the image's Entrypoint ("" clears it)
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Label the container (K=V), may be repeated
    #[arg(long = "label", short = 'l', value_name = "K=V")]
    pub labels: Vec<String>,
    /// Snapshotter for the container's root file system
    #[arg(long, env = "CONTAINERD_SNAPSHOTTER", default_value = "overlayfs")]
    pub snapshotter: String,
    /// Directory for the stdio fifos shared with the shim
    #[arg(long, env = "BERTH_FIFO_DIR", default_value = "/run/berth/fifo")]
    pub fifo_dir: PathBuf,
    /// Directory for detached containers' logs (DIR/NAMESPACE/ID.log)
    #[arg(long, env = "BERTH_LOG_DIR", default_value = "/var/log/berth")]
    pub log_dir: PathBuf,
    /// Image name as listed by `berth images`
    pub image: String,
    /// Command and arguments (default: the image's Cmd)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and forward it to the process
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Allocate a pseudo-terminal
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Set an environment variable (K=V), may be repeated
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Run as USER[:GROUP] (names or ids, from the container's /etc/passwd and /etc/group)
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Working directory instead of the container's
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Directory for the stdio fifos shared with the shim
    #[arg(long, env = "BERTH_FIFO_DIR", default_value = "/run/berth/fifo")]
    pub fifo_dir: PathBuf,
    /// The container
    pub id: String,
    /// Command and arguments
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub(crate) fn containers(c: &Client) -> ContainersClient<Channel> {
    ContainersClient::new(c.channel())
}
pub(crate) fn tasks(c: &Client) -> TasksClient<Channel> {
    TasksClient::new(c.channel())
}
pub(crate) fn snapshots(c: &Client) -> SnapshotsClient<Channel> {
    SnapshotsClient::new(c.channel())
}

fn internal(what: &str) -> impl Fn(berth_core::Error) -> CliError + '_ {
    move |e| CliError(format!("{what}: {e}"))
}

/// The container record `id`, with a message in words when there is none.
pub(crate) async fn get_container(c: &Client, id: &str) -> Result<Container, CliError> {
    containers(c)
        .get(c.request(GetContainerRequest { id: id.to_string() }))
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::NotFound {
                CliError(format!(
                    "container {id:?}: not found in namespace {:?} (see berth ps -a)",
                    c.namespace
                ))
            } else {
                grpc(&format!("get container {id}"))(s)
            }
        })?
        .into_inner()
        .container
        .ok_or_else(|| CliError(format!("get container {id}: empty reply")))
}

async fn read_blob(c: &Client, d: &Descriptor, limit: u64) -> Result<Vec<u8>, CliError> {
    let digest = d.digest().to_string();
    if d.size() > limit {
        return Err(CliError(format!(
            "{digest}: {} bytes is more than the {limit} accepted",
            d.size()
        )));
    }
    let what = format!("read {digest} from the content store");
    let mut s = c
        .content()
        .read(c.request(ReadContentRequest {
            digest: digest.clone(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(grpc(&what))?
        .into_inner();
    let mut out = Vec::with_capacity(d.size() as usize);
    while let Some(m) = s.next().await {
        out.extend_from_slice(&m.map_err(grpc(&what))?.data);
        if out.len() as u64 > limit {
            return Err(CliError(format!("{digest}: larger than its descriptor")));
        }
    }
    Ok(out)
}

/// An image as `run` needs it: its record, the platform's manifest, config and layers.
pub(crate) struct LocalImage {
    pub name: String,
    pub info: berth_remotes::pull::ImageInfo,
    pub config: ImageConfiguration,
    pub chain_ids: Vec<String>,
}

/// Finds `name` in the images service (as given, then Docker-normalised) and reads the
/// manifest for this machine's platform and the config through the content API.
pub(crate) async fn local_image(c: &Client, name: &str) -> Result<LocalImage, CliError> {
    let mut candidates = vec![name.to_string()];
    if let Ok(r) = Reference::parse_normalized(name) {
        let n = r.to_string();
        if n != name {
            candidates.push(n);
        }
    }
    let mut image = None;
    for n in &candidates {
        match c
            .images()
            .get(c.request(GetImageRequest { name: n.clone() }))
            .await
        {
            Ok(r) => {
                image = r.into_inner().image;
                break;
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(grpc(&format!("get image {n}"))(s)),
        }
    }
    let Some(image) = image else {
        return Err(CliError(format!(
            "image {name:?}: not found in namespace {:?} (berth images lists what there is; berth pull or ctr images import adds one)",
            c.namespace
        )));
    };
    let t = image
        .target
        .clone()
        .ok_or_else(|| CliError(format!("image {name:?} has no target")))?;
    let target: Descriptor = serde_json::from_value(serde_json::json!({
        "mediaType": t.media_type, "digest": t.digest, "size": t.size,
    }))
    .map_err(|e| CliError(format!("image {name:?}: bad target descriptor: {e}")))?;
    let platform = Platform::host();
    let mut desc = target.clone();
    // An index may point to further indexes; a few levels are plenty.
    for _ in 0..4 {
        let mt = desc.media_type().to_string();
        if manifest::is_manifest(&mt) {
            break;
        }
        if !manifest::is_index(&mt) {
            return Err(CliError(format!(
                "image {name:?}: unsupported media type {mt}"
            )));
        }
        let body = read_blob(c, &desc, manifest::MAX_MANIFEST_SIZE).await?;
        let index = manifest::parse_index(&body, name).map_err(internal("image"))?;
        desc = manifest::select_platform(&index, &platform, name).map_err(internal("image"))?;
    }
    let body = read_blob(c, &desc, manifest::MAX_MANIFEST_SIZE).await?;
    let m = manifest::parse_manifest(&body, name).map_err(internal("image"))?;
    let config_body = read_blob(c, m.config(), berth_remotes::pull::MAX_CONFIG_SIZE).await?;
    let config = ImageConfiguration::from_reader(config_body.as_slice())
        .map_err(|e| CliError(format!("image {name:?}: invalid image config: {e}")))?;
    let diff_ids = crate::unpack::diff_ids(&config_body).map_err(internal("image config"))?;
    if diff_ids.len() != m.layers().len() {
        return Err(CliError(format!(
            "image {name:?}: config has {} diff IDs for {} layers",
            diff_ids.len(),
            m.layers().len()
        )));
    }
    let chain_ids = crate::unpack::chain_ids(&diff_ids);
    Ok(LocalImage {
        name: image.name.clone(),
        info: berth_remotes::pull::ImageInfo {
            name: image.name,
            target,
            manifest: desc,
            config: m.config().clone(),
            config_body,
            layers: m.layers().clone(),
        },
        config,
        chain_ids,
    })
}

/// Unpacks the image's layers into `snapshotter` unless its top snapshot exists.
async fn ensure_unpacked(c: &Client, img: &LocalImage, snapshotter: &str) -> Result<(), CliError> {
    use berth_remotes::pull::LayerHook;
    let Some(top) = img.chain_ids.last() else {
        return Err(CliError(format!("image {:?} has no layers", img.name)));
    };
    match snapshots(c)
        .stat(c.request(StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: top.clone(),
        }))
        .await
    {
        Ok(_) => return Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(grpc(&format!("stat snapshot {top} in {snapshotter}"))(s)),
    }
    let u = crate::unpack::Unpacker {
        client: c.clone(),
        snapshotter: snapshotter.to_string(),
        top: Default::default(),
    };
    for (i, layer) in img.info.layers.iter().enumerate() {
        u.layer_ready(i, layer, &img.info)
            .await
            .map_err(internal(&format!("unpack {} into {snapshotter}", img.name)))?;
    }
    u.label_config(&img.info)
        .await
        .map_err(internal("unpack"))?;
    Ok(())
}

/// The most of the image's /etc/passwd or /etc/group read: larger ones are refused (a
/// hostile image must not make `berth run` exhaust memory, GHSA-jpcc-p29g-p8mq). Real
/// ones are a few kilobytes; 4 MiB holds tens of thousands of entries.
pub const USER_FILE_LIMIT: u64 = 4 << 20;

/// Reads `path` (relative, e.g. `etc/passwd`) of the container root `root` for
/// resolving its user, never anything outside it and never blocking:
///
/// - the path is resolved with `openat2(RESOLVE_IN_ROOT)`, so symbolic links (`etc ->
///   /`, `etc/passwd -> /etc/shadow`, `../../x`) and `..` stay inside `root`, as they
///   would for the container's own processes; magic links are refused;
/// - it is opened `O_NONBLOCK | O_NOCTTY` and must be a regular file (a FIFO, device,
///   socket or directory is an error: it must be neither waited for nor read);
/// - it must be at most [`USER_FILE_LIMIT`] bytes.
///
/// A missing file is empty (an image without /etc/group is fine, as for containerd);
/// bytes that are not UTF-8 are replaced (only the lines holding them cannot match).
pub fn read_root_file(root: &Path, path: &str) -> berth_core::Result<String> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fail = |what: String| {
        berth_core::Error::invalid_argument(format!(
            "reading the image's /{path} to resolve the user: {what}"
        ))
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_PATH).bits())
        .open(root)
        .map_err(|e| fail(format!("opening the root {}: {e}", root.display())))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(dir.as_raw_fd(), path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(String::new()),
        Err(e) => return Err(fail(format!("open: {e}"))),
    };
    // SAFETY: openat2 just returned this descriptor, which nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| fail(format!("fstat: {e}")))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(fail(format!("it is {kind}, not a regular file")));
    }
    let too_big = || {
        fail(format!(
            "it is larger than the limit of {USER_FILE_LIMIT} bytes"
        ))
    };
    if meta.len() > USER_FILE_LIMIT {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(USER_FILE_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("read: {e}")))?;
    if bytes.len() as u64 > USER_FILE_LIMIT {
        return Err(too_big());
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The image's /etc/passwd and /etc/group under the container root `root` (see
/// [`read_root_file`]).
pub fn read_user_files(root: &Path) -> berth_core::Result<(String, String)> {
    Ok((
        read_root_file(root, "etc/passwd")?,
        read_root_file(root, "etc/group")?,
    ))
}

/// Mounts the container's prepared root read-only on a temporary directory to read its
/// /etc/passwd and /etc/group ([`read_user_files`]): the user's ids and supplementary
/// groups come from them, whatever the user (containerd reads them for every container).
fn read_users(mounts: &[Mount]) -> Result<(String, String), CliError> {
    use nix::mount::{MntFlags, MsFlags};
    let [m] = mounts else {
        return Err(CliError(format!(
            "reading the image's users needs the root file system as one mount, got {}",
            mounts.len()
        )));
    };
    let dir = tempfile::Builder::new()
        .prefix("berth-users-")
        .tempdir()
        .map_err(|e| CliError(format!("temporary mount point: {e}")))?;
    let mut flags = MsFlags::MS_RDONLY;
    let mut data = vec![];
    let options = read_only_overlay(&m.options);
    for o in &options {
        match o.as_str() {
            "ro" | "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    let fstype = (m.r#type != "bind").then_some(m.r#type.as_str());
    nix::mount::mount(
        Some(m.source.as_str()),
        dir.path(),
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|e| {
        CliError(format!(
            "mounting the root file system to resolve the user: {e}"
        ))
    })?;
    let users = read_user_files(dir.path());
    let _ = nix::mount::umount2(dir.path(), MntFlags::MNT_DETACH);
    Ok(users?)
}

/// An overlay's options without its upper and work directories, the upper one becoming
/// the top lower layer (containerd's `tryReadonlyMounts`): the same files, read-only,
/// and mountable while the container's own overlay uses that upper directory.
fn read_only_overlay(options: &[String]) -> Vec<String> {
    let Some(upper) = options.iter().find_map(|o| o.strip_prefix("upperdir=")) else {
        return options.to_vec();
    };
    options
        .iter()
        .filter(|o| !o.starts_with("upperdir=") && !o.starts_with("workdir="))
        .map(|o| match o.strip_prefix("lowerdir=") {
            Some(lower) => format!("lowerdir={upper}:{lower}"),
            None => o.clone(),
        })
        .collect()
}

fn parse_kv(items: &[String], what: &str) -> Result<HashMap<String, String>, CliError> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError(format!("{what} {kv:?}: expected K=V")))
        })
        .collect()
}

/// The log file of detached container `id`.
pub fn log_path(log_dir: &Path, ns: &str, id: &str) -> PathBuf {
    log_dir.join(ns).join(format!("{id}.log"))
}

/// Removes what `run` created for container `id` when a later step fails.
async fn undo(c: &Client, id: &str, snapshotter: &str, container: bool, task: bool) {
    if task {
        let _ = tasks(c)
            .kill(c.request(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            }))
            .await;
        let _ = tasks(c)
            .delete(c.request(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await;
    }
    if container {
        let _ = containers(c)
            .delete(c.request(DeleteContainerRequest { id: id.to_string() }))
            .await;
    }
    let _ = snapshots(c)
        .remove(c.request(RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: id.to_string(),
        }))
        .await;
}

/// What [`create_container`] has made so far, for cleaning up after an interruption.
#[derive(Default)]
struct Made {
    lease: std::sync::Mutex<Option<String>>,
    /// The container's snapshot was prepared (so a record named `id`, if any, is ours).
    snapshot: std::sync::atomic::AtomicBool,
}

/// Creates the container (snapshot + record) under a lease so the collector cannot take
/// the snapshot between its creation and the record that references it.
async fn create_container(
    c: &Client,
    ns: &str,
    id: &str,
    a: &RunArgs,
    made: &Made,
) -> Result<(Container, Vec<Mount>), CliError> {
    let mut labels = parse_kv(&a.labels, "--label")?;
    for e in &a.env {
        if !e.contains('=') {
            return Err(CliError(format!("--env {e:?}: expected K=V")));
        }
    }
    match containers(c)
        .get(c.request(GetContainerRequest { id: id.to_string() }))
        .await
    {
        Ok(_) => {
            return Err(CliError(format!(
                "container {id:?}: already exists in namespace {ns:?} (choose another --name, or berth rm it)"
            )));
        }
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(grpc(&format!("get container {id}"))(s)),
    }
    let img = local_image(c, &a.image).await?;

    let mut c = c.clone();
    let lease_id = format!("berth-run-{}", uuid::Uuid::new_v4());
    let mut lease_labels = HashMap::new();
    let expire = std::time::SystemTime::now() + Duration::from_secs(3600);
    lease_labels.insert(
        "containerd.io/gc.expire".to_string(),
        berth_core::time::rfc3339(expire),
    );
    c.leases()
        .create(c.request(LeaseCreate {
            id: lease_id.clone(),
            labels: lease_labels,
        }))
        .await
        .map_err(grpc("create lease"))?;
    *made.lease.lock().unwrap() = Some(lease_id.clone());
    c.lease = Some(lease_id.clone());
    let result = async {
        ensure_unpacked(&c, &img, &a.snapshotter).await?;
        let top = img.chain_ids.last().cloned().unwrap_or_default();
        let mounts = snapshots(&c)
            .prepare(c.request(PrepareSnapshotRequest {
                snapshotter: a.snapshotter.clone(),
                key: id.to_string(),
                parent: top,
                labels: Default::default(),
            }))
            .await
            .map_err(grpc(&format!("prepare snapshot {id}")))?
            .into_inner()
            .mounts;
        made.snapshot.store(true, Ordering::SeqCst);
        let built = async {
            let mut spec = spec::default_spec(ns, id).map_err(internal("run"))?;
            let o = Overrides {
                args: a.command.clone(),
                entrypoint: a.entrypoint.as_ref().map(|e| {
                    if e.is_empty() {
                        vec![]
                    } else {
                        vec![e.clone()]
                    }
                }),
                env: a.env.clone(),
                terminal: a.tty,
                console_size: stdio::terminal_size(),
                user: a.user.clone(),
                cwd: a.workdir.clone(),
            };
            // Always read: even a numeric user (or none, which is root) gets the
            // supplementary groups the image's /etc/group gives it (CVE-2023-25173).
            let users = read_users(&mounts)?;
            spec::apply_image(
                &mut spec,
                &img.config,
                &o,
                Some((users.0.as_str(), users.1.as_str())),
            )
            .map_err(internal("run"))?;
            // As with Docker, people see which container they are in.
            // (IDs may be longer than the kernel's 64-byte host names; they are ASCII.)
            spec.set_hostname(Some(
                a.hostname
                    .clone()
                    .unwrap_or_else(|| id.chars().take(63).collect()),
            ));
            if let Some(sig) = img
                .config
                .config()
                .as_ref()
                .and_then(|c| c.stop_signal().clone())
            {
                labels.insert(STOP_SIGNAL_LABEL.to_string(), sig);
            }
            if a.detach {
                labels.insert(
                    LOG_LABEL.to_string(),
                    log_path(&a.log_dir, ns, id).display().to_string(),
                );
            }
            let container = Container {
                id: id.to_string(),
                labels,
                image: img.name.clone(),
                runtime: Some(Runtime {
                    name: a.runtime.clone(),
                    options: None,
                }),
                spec: Some(spec::to_any(&spec).map_err(internal("run"))?),
                snapshotter: a.snapshotter.clone(),
                snapshot_key: id.to_string(),
                ..Default::default()
            };
            let created = containers(&c)
                .create(c.request(CreateContainerRequest {
                    container: Some(container),
                }))
                .await
                .map_err(grpc(&format!("create container {id}")))?
                .into_inner()
                .container
                .unwrap_or_default();
            Ok::<_, CliError>(created)
        }
        .await;
        match built {
            Ok(container) => Ok((container, mounts)),
            Err(e) => {
                let _ = snapshots(&c)
                    .remove(c.request(RemoveSnapshotRequest {
                        snapshotter: a.snapshotter.clone(),
                        key: id.to_string(),
                    }))
                    .await;
                Err(e)
            }
        }
    }
    .await;
    c.lease = None;
    made.lease.lock().unwrap().take();
    let _ = c
        .leases()
        .delete(c.request(LeaseDelete {
            id: lease_id,
            sync: false,
        }))
        .await;
    result
}

/// The stock runc shims, whose console copy has no `file://` support.
fn runc_shim_without_file_console(runtime: &str) -> bool {
    runtime.starts_with("io.containerd.runc.") || runtime == "io.containerd.runtime.v1.linux"
}

/// `berth run`.
pub async fn run(address: &str, ns: &str, a: RunArgs) -> Result<(), CliError> {
    // containerd 1.6's runc shims take a terminal's stdout URI for a fifo path; with a
    // file:// URI their create fails *after* `runc create`, leaving runc's state behind
    // under /run/containerd/runc. Refused before anything is made.
    if a.detach && a.tty && runc_shim_without_file_console(&a.runtime) {
        return Err(CliError(format!(
            "-d with -t: {} (containerd-shim-runc-v2 1.6) cannot log a terminal to a file; use --runtime io.containerd.berth.v2, or drop -t",
            a.runtime
        )));
    }
    if a.detach && a.interactive {
        return Err(CliError(
            "-i with -d: a detached container's stdin cannot be attached to later (berth has no attach yet); -dt keeps a shell alive on its terminal".into(),
        ));
    }
    let c = Client::connect(address, ns).await?;
    let id = a
        .name
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_string());
    // A ^C while unpacking or creating leaves nothing behind: what exists is removed
    // (the lease makes half-unpacked layers collectable).
    let made = Made::default();
    let (_container, mounts) = tokio::select! {
        r = create_container(&c, ns, &id, &a, &made) => r?,
        _ = tokio::signal::ctrl_c() => {
            // Only what this run made: a container of that name that existed before
            // must survive.
            if made.snapshot.load(Ordering::SeqCst) {
                undo(&c, &id, &a.snapshotter, true, false).await;
            }
            let lease = made.lease.lock().unwrap().take();
            if let Some(lease) = lease {
                let _ = c.leases().delete(c.request(LeaseDelete { id: lease, sync: false })).await;
            }
            return Err(CliError(format!("run {id}: interrupted before the container started")));
        }
    };

    if a.detach {
        let log = log_path(&a.log_dir, ns, &id);
        // Other shims may lack file:// for a terminal too: say what to try.
        let tty_hint = if a.tty {
            " (a terminal logged to a file:// URI needs a shim that supports it, as io.containerd.berth.v2 does; or drop -t)"
        } else {
            ""
        };
        let started = async {
            if let Some(dir) = log.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| CliError(format!("creating {}: {e}", dir.display())))?;
            }
            let uri = format!("file://{}", log.display());
            tasks(&c)
                .create(c.request(CreateTaskRequest {
                    container_id: id.clone(),
                    rootfs: mounts,
                    stdout: uri.clone(),
                    stderr: uri,
                    terminal: a.tty,
                    ..Default::default()
                }))
                .await
                .map_err(|s| {
                    CliError(format!(
                        "{}{tty_hint}",
                        grpc(&format!("create task {id}"))(s)
                    ))
                })?;
            tasks(&c)
                .start(c.request(StartRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                }))
                .await
                .map_err(grpc(&format!("start task {id}")))?;
            Ok::<_, CliError>(())
        }
        .await;
        if let Err(e) = started {
            undo(&c, &id, &a.snapshotter, true, true).await;
            return Err(e);
        }
        println!("{id}");
        return Ok(());
    }

    let proc = Proc {
        c: &c,
        id: &id,
        exec_id: "",
    };
    let status = proc
        .attach(
            &a.fifo_dir,
            a.interactive,
            a.tty,
            |(stdin, stdout, stderr)| {
                let c = c.clone();
                let id = id.clone();
                let tty = a.tty;
                async move {
                    tasks(&c)
                        .create(c.request(CreateTaskRequest {
                            container_id: id.clone(),
                            rootfs: mounts,
                            stdin,
                            stdout,
                            stderr,
                            terminal: tty,
                            ..Default::default()
                        }))
                        .await
                        .map(|_| ())
                        .map_err(grpc(&format!("create task {id}")))
                }
            },
        )
        .await;
    let status = match status {
        Ok(s) => s,
        Err((e, created)) => {
            undo(&c, &id, &a.snapshotter, true, created).await;
            return Err(e);
        }
    };
    // The task is done either way: its shim goes (as after `ctr run`); the container
    // stays for `berth ps -a` and `berth rm` unless --rm.
    let _ = tasks(&c)
        .delete(c.request(DeleteTaskRequest {
            container_id: id.clone(),
        }))
        .await;
    if a.rm {
        crate::lifecycle::remove_container(&c, &id)
            .await
            .map_err(|e| CliError(format!("--rm: {e}")))?;
    }
    EXIT_CODE.store(status, Ordering::Relaxed);
    Ok(())
}

/// `berth exec`.
pub async fn exec(address: &str, ns: &str, a: ExecArgs) -> Result<(), CliError> {
    let c = Client::connect(address, ns).await?;
    let container = get_container(&c, &a.id).await?;
    let spec = container
        .spec
        .as_ref()
        .ok_or_else(|| CliError(format!("container {:?} has no spec", a.id)))
        .and_then(|s| spec::from_any(s).map_err(internal("exec")))?;
    for e in &a.env {
        if !e.contains('=') {
            return Err(CliError(format!("--env {e:?}: expected K=V")));
        }
    }
    // As `ctr task exec --user`: the user is resolved against the container's own
    // /etc/passwd and /etc/group, read from its snapshot.
    let users = match &a.user {
        Some(_) => {
            let mounts = snapshots(&c)
                .mounts(c.request(MountsRequest {
                    snapshotter: container.snapshotter.clone(),
                    key: container.snapshot_key.clone(),
                }))
                .await
                .map_err(grpc(&format!(
                    "exec --user: the mounts of snapshot {}",
                    container.snapshot_key
                )))?
                .into_inner()
                .mounts;
            Some(read_users(&mounts)?)
        }
        None => None,
    };
    let process = spec::exec_process(
        &spec,
        &Overrides {
            args: a.command.clone(),
            env: a.env.clone(),
            terminal: a.tty,
            console_size: stdio::terminal_size(),
            user: a.user.clone(),
            cwd: a.workdir.clone(),
            entrypoint: None,
        },
        users.as_ref().map(|(p, g)| (p.as_str(), g.as_str())),
    )
    .map_err(internal("exec"))?;
    let process = prost_types::Any {
        type_url: PROCESS_TYPE_URL.to_string(),
        value: serde_json::to_vec(&process)
            .map_err(|e| CliError(format!("encoding the process spec: {e}")))?,
    };
    let exec_id = format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let proc = Proc {
        c: &c,
        id: &a.id,
        exec_id: &exec_id,
    };
    let status = proc
        .attach(
            &a.fifo_dir,
            a.interactive,
            a.tty,
            |(stdin, stdout, stderr)| {
                let c = c.clone();
                let id = a.id.clone();
                let exec_id = exec_id.clone();
                let tty = a.tty;
                async move {
                    tasks(&c)
                        .exec(c.request(ExecProcessRequest {
                            container_id: id.clone(),
                            stdin,
                            stdout,
                            stderr,
                            terminal: tty,
                            spec: Some(process),
                            exec_id,
                        }))
                        .await
                        .map(|_| ())
                        .map_err(|s| {
                            if s.code() == tonic::Code::NotFound {
                                CliError(format!(
                                    "exec in {id}: the container has no running task ({})",
                                    s.message()
                                ))
                            } else {
                                grpc(&format!("exec in {id}"))(s)
                            }
                        })
                }
            },
        )
        .await;
    let status = match status {
        Ok(s) => s,
        Err((e, created)) => {
            if created {
                let _ = tasks(&c)
                    .delete_process(c.request(DeleteProcessRequest {
                        container_id: a.id.clone(),
                        exec_id: exec_id.clone(),
                    }))
                    .await;
            }
            return Err(e);
        }
    };
    let _ = tasks(&c)
        .delete_process(c.request(DeleteProcessRequest {
            container_id: a.id.clone(),
            exec_id,
        }))
        .await;
    EXIT_CODE.store(status, Ordering::Relaxed);
    Ok(())
}

/// A task's init process (`exec_id` empty) or an exec'd process.
struct Proc<'a> {
    c: &'a Client,
    id: &'a str,
    exec_id: &'a str,
}

/// How long to keep draining output after the process exited: background processes
/// of an exec may hold the fifo open forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Proc<'_> {
    async fn kill(&self, signal: u32) {
        let _ = tasks(self.c)
            .kill(self.c.request(KillRequest {
                container_id: self.id.to_string(),
                exec_id: self.exec_id.to_string(),
                signal,
                all: false,
            }))
            .await;
    }

    async fn resize(&self) {
        if let Some((width, height)) = stdio::terminal_size() {
            let _ = tasks(self.c)
                .resize_pty(self.c.request(ResizePtyRequest {
                    container_id: self.id.to_string(),
                    exec_id: self.exec_id.to_string(),
                    width,
                    height,
                }))
                .await;
        }
    }

    /// Creates the fifos and their copiers, calls `create` with the stdio URIs, starts
    /// the process and forwards stdin, signals (without a terminal) and terminal resizes
    /// until it exits. Returns its exit status (clamped to a byte, as a shell sees it);
    /// on failure, also whether `create` had succeeded (so the caller can clean up).
    async fn attach<F, Fut>(
        &self,
        fifo_dir: &Path,
        interactive: bool,
        tty: bool,
        create: F,
    ) -> Result<u8, (CliError, bool)>
    where
        F: FnOnce((String, String, String)) -> Fut,
        Fut: std::future::Future<Output = Result<(), CliError>>,
    {
        let what = if self.exec_id.is_empty() {
            format!("task {}", self.id)
        } else {
            format!("exec {} in {}", self.exec_id, self.id)
        };
        // Handlers first: from the moment the process may run, a ^C must reach it
        // rather than end berth (which would leave it behind, unwatched).
        let sig = |k| signal(k).map_err(|e| (CliError(format!("signal handler: {e}")), false));
        let mut winch = sig(SignalKind::window_change())?;
        let mut int = sig(SignalKind::interrupt())?;
        let mut term = sig(SignalKind::terminate())?;
        let mut hup = sig(SignalKind::hangup())?;
        let fifos = Fifos::create(fifo_dir, self.id, interactive, tty)
            .map_err(|e| (CliError(format!("stdio for {what}: {e}")), false))?;
        // Readers first: the stock shim's write-only opens wait for them.
        let out_done = stdio::copy_out(&fifos.stdout, std::io::stdout());
        let err_done = fifos
            .stderr
            .as_ref()
            .map(|p| stdio::copy_out(p, std::io::stderr()));
        let mut stdin_done = fifos.stdin.as_ref().map(|p| stdio::copy_in(p));
        if let Err(e) = create(fifos.uris()).await {
            fifos.release();
            return Err((e, false));
        }
        let waiter = {
            let c = self.c.clone();
            let req = WaitRequest {
                container_id: self.id.to_string(),
                exec_id: self.exec_id.to_string(),
            };
            tokio::spawn(async move { tasks(&c).wait(c.request(req)).await })
        };
        // Raw mode only when keys go to the container (-it, as Docker does): with -t
        // alone, ^C stays a signal to berth, which forwards it.
        let raw = if tty && interactive {
            RawTerminal::enable()
        } else {
            None
        };
        if let Err(s) = tasks(self.c)
            .start(self.c.request(StartRequest {
                container_id: self.id.to_string(),
                exec_id: self.exec_id.to_string(),
            }))
            .await
        {
            drop(raw);
            fifos.release();
            return Err((grpc(&format!("start {what}"))(s), true));
        }
        if tty {
            self.resize().await;
        }
        let mut waiter = waiter;
        let mut interrupts = 0;
        let reply = loop {
            tokio::select! {
                r = &mut waiter => break r,
                _ = winch.recv(), if tty => self.resize().await,
                // With -it, ^C reaches the pty as a key; signals sent to this process
                // are forwarded either way. A PID 1 that ignores SIGINT (a shell does)
                // would leave people stuck: the third one is a SIGKILL.
                _ = int.recv() => {
                    interrupts += 1;
                    if interrupts >= 3 {
                        eprintln!("berth: third interrupt: killing {what}");
                        self.kill(9).await;
                    } else {
                        self.kill(2).await;
                    }
                }
                _ = term.recv() => self.kill(15).await,
                _ = hup.recv() => self.kill(1).await,
                r = async { stdin_done.as_mut().unwrap().await }, if stdin_done.is_some() => {
                    stdin_done = None;
                    if r.is_ok() {
                        let _ = tasks(self.c)
                            .close_io(self.c.request(CloseIoRequest {
                                container_id: self.id.to_string(),
                                exec_id: self.exec_id.to_string(),
                                stdin: true,
                            }))
                            .await;
                    }
                }
            }
        };
        let status = match reply {
            Ok(Ok(r)) => r.into_inner().exit_status,
            Ok(Err(s)) => {
                drop(raw);
                return Err((grpc(&format!("wait for {what}"))(s), true));
            }
            Err(e) => {
                drop(raw);
                return Err((CliError(format!("wait for {what}: {e}")), true));
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let _ = out_done.await;
            if let Some(e) = err_done {
                let _ = e.await;
            }
        })
        .await;
        drop(raw);
        drop(fifos);
        Ok(status.min(255) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A fake container root `root` and, beside it (outside), a host file whose
    /// contents must never be read through the root.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        host_file: PathBuf,
    }

    const HOST_SECRET: &str = "host-secret:x:0:0::/:/bin/sh\n";

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        let host_file = dir.path().join("outside").join("shadow");
        fs::create_dir_all(host_file.parent().unwrap()).unwrap();
        fs::write(&host_file, HOST_SECRET).unwrap();
        Fixture {
            _dir: dir,
            root,
            host_file,
        }
    }

    /// Reads `f.root`'s user files on another thread: a read that blocks fails the test
    /// after 10 seconds instead of hanging it.
    fn read_within_10s(root: &Path) -> berth_core::Result<(String, String)> {
        let root = root.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_user_files(&root));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("reading the image's user files blocked")
    }

    /// Item 5a (symlinks out of a malicious image's root): absolute and `..` links for
    /// etc/passwd and etc/group resolve inside the container root, as for the
    /// container itself; the host file they name is not read.
    #[test]
    fn user_file_symlinks_resolve_inside_the_root_not_on_the_host() {
        let f = fixture();
        // etc/passwd -> /<absolute host path>: inside the root that path holds a
        // different file, which is the one to read.
        symlink(&f.host_file, f.root.join("etc/passwd")).unwrap();
        let in_root = f.root.join(f.host_file.strip_prefix("/").unwrap());
        fs::create_dir_all(in_root.parent().unwrap()).unwrap();
        fs::write(&in_root, "inside:x:5:5::/:/bin/sh\n").unwrap();
        // etc/group -> ../../../../../../<host path>: `..` stops at the root, so this
        // reaches the same in-root copy.
        let ups = "../".repeat(f.root.components().count() + 2);
        let rel = format!("{ups}{}", f.host_file.strip_prefix("/").unwrap().display());
        symlink(&rel, f.root.join("etc/group")).unwrap();
        // The relative link really names the host file from the host's point of view.
        assert_eq!(
            fs::read_to_string(f.root.join("etc").join(&rel)).unwrap(),
            HOST_SECRET
        );
        let (passwd, group) = read_within_10s(&f.root).unwrap();
        assert_eq!(passwd, "inside:x:5:5::/:/bin/sh\n");
        assert_eq!(group, "inside:x:5:5::/:/bin/sh\n");
        let r = spec::resolve_user(Some("inside"), &passwd, &group).unwrap();
        assert_eq!((r.uid, r.gid), (5, 5));
    }

    /// Item 5a: `etc -> /` makes etc/passwd the root's /passwd, not the host's
    /// /etc/passwd; a path missing in the root reads as empty.
    #[test]
    fn etc_symlinked_to_slash_stays_in_the_root() {
        let f = fixture();
        fs::remove_dir(f.root.join("etc")).unwrap();
        symlink("/", f.root.join("etc")).unwrap();
        fs::write(f.root.join("passwd"), "top:x:7:8::/:/bin/sh\n").unwrap();
        let host_group = fs::read_to_string("/etc/group").unwrap_or_default();
        let (passwd, group) = read_within_10s(&f.root).unwrap();
        assert_eq!(passwd, "top:x:7:8::/:/bin/sh\n");
        assert_eq!(group, "");
        assert!(host_group.is_empty() || group != host_group);
    }

    /// Item 5b: a FIFO (which would block a plain open or read) or a device at
    /// etc/group or etc/passwd is refused at once, as is a directory.
    #[test]
    fn user_files_that_are_fifos_devices_or_directories_are_refused_without_blocking() {
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        let f = fixture();
        fs::write(f.root.join("etc/passwd"), "a:x:1:1::/:/bin/sh\n").unwrap();
        nix::unistd::mkfifo(&f.root.join("etc/group"), Mode::from_bits_truncate(0o644)).unwrap();
        let e = read_within_10s(&f.root).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(e.to_string().contains("/etc/group"), "{e}");

        let f = fixture();
        // The device numbers of /dev/zero: reading it would never end.
        mknod(
            &f.root.join("etc/passwd"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o644),
            makedev(1, 5),
        )
        .unwrap();
        let e = read_within_10s(&f.root).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");

        let f = fixture();
        fs::create_dir(f.root.join("etc/passwd")).unwrap();
        let e = read_within_10s(&f.root).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    /// Item 5c (GHSA-jpcc-p29g-p8mq, memory exhaustion from a crafted image): a user
    /// file larger than USER_FILE_LIMIT is refused with the limit in the error; one
    /// of exactly the limit is read.
    #[test]
    fn user_files_over_the_size_limit_are_refused() {
        let f = fixture();
        let big = fs::File::create(f.root.join("etc/group")).unwrap();
        big.set_len(USER_FILE_LIMIT + 1).unwrap();
        let e = read_within_10s(&f.root).unwrap_err();
        assert!(e.to_string().contains(&USER_FILE_LIMIT.to_string()), "{e}");
        assert!(e.to_string().contains("/etc/group"), "{e}");

        big.set_len(USER_FILE_LIMIT).unwrap();
        let (_, group) = read_within_10s(&f.root).unwrap();
        assert_eq!(group.len() as u64, USER_FILE_LIMIT);
    }

    /// An image without /etc/passwd or /etc/group is fine (as for containerd): the
    /// files read as empty.
    #[test]
    fn missing_user_files_read_as_empty() {
        let f = fixture();
        assert_eq!(
            read_within_10s(&f.root).unwrap(),
            (String::new(), String::new())
        );
        fs::remove_dir(f.root.join("etc")).unwrap();
        assert_eq!(
            read_within_10s(&f.root).unwrap(),
            (String::new(), String::new())
        );
    }

    #[test]
    fn the_upper_directory_becomes_the_top_lower_layer_when_reading_users() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            read_only_overlay(&o(&[
                "index=off",
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ])),
            o(&["index=off", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"])
        );
        // A view (lower layers only) and a bind mount are already read-only views.
        let view = o(&["lowerdir=/s/2/fs:/s/1/fs"]);
        assert_eq!(read_only_overlay(&view), view);
        let bind = o(&["rbind", "rw"]);
        assert_eq!(read_only_overlay(&bind), bind);
    }

    /// `read_users` itself: the root, given as containerd's bind mount, is mounted
    /// read-only on a temporary directory, read with the same rules (an `etc/passwd`
    /// link to the host file stays inside), and unmounted.
    #[test]
    fn read_users_mounts_the_root_and_reads_inside_it() {
        let f = fixture();
        symlink(&f.host_file, f.root.join("etc/passwd")).unwrap();
        fs::write(f.root.join("etc/group"), "wheel:x:10:root\n").unwrap();
        let m = Mount {
            r#type: "bind".into(),
            source: f.root.to_str().unwrap().into(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        let (passwd, group) = read_users(&[m]).unwrap();
        assert_eq!(passwd, "");
        assert_eq!(group, "wheel:x:10:root\n");
        let r = spec::resolve_user(None, &passwd, &group).unwrap();
        assert_eq!(r.additional_gids, [0, 10]);
    }
}
