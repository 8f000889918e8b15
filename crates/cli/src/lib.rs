//! `berth`, the friendly command line for berthd. It speaks only containerd's public gRPC
//! API over the daemon's unix socket (the stock `ctr` keeps working alongside).
//!
//! Images: `pull`/`push` ([`pull`], [`push`], [`unpack`]), `images`, `rmi`.
//!
//! Containers ([`run`](mod@run), [`spec`], [`stdio`], [`ps`], [`lifecycle`]), all client side as
//! with `ctr`, so the records they make are ordinary containerd containers and tasks:
//!
//! - `run IMAGE [CMD…]` unpacks the image into the snapshotter if needed, prepares an
//!   active snapshot named after the container, builds the OCI spec (containerd's
//!   `WithDefaultSpec` defaults, then the image's Env/Entrypoint/Cmd/WorkingDir/User,
//!   then `-e/-w/-u/--entrypoint`), creates the container and its task and waits.
//!   Stdio goes through fifos under `--fifo-dir` (`/run/berth/fifo`), or a pty with
//!   `-t` (raw mode here, resizes forwarded); berth exits with the container's status;
//!   the task is deleted afterwards, and with `--rm` the container and snapshot too.
//!   `-d` prints the ID and hands the shim `file://<log-dir>/<ns>/<id>.log` for stdout
//!   and stderr (the path is kept in the container label `io.berth.cli.log`).
//! - `exec ID CMD…` runs a process with the container's process spec (user, env, cwd,
//!   capabilities) and exits with its status.
//! - `ps [-a]`, `logs [-f] ID`, `stop [-t SECS] ID…` (stop signal, SIGKILL after the
//!   timeout, task deleted), `rm [-f] ID…` (task, container, snapshot, log).

pub mod client;
pub mod content;
pub mod lifecycle;
pub mod progress;
pub mod ps;
pub mod pull;
pub mod push;
pub mod run;
pub mod spec;
pub mod stdio;
pub mod table;
pub mod unpack;

use berth_api::services::images::v1::{
    CreateImageRequest, DeleteImageRequest, Image, ListImagesRequest, UpdateImageRequest,
};
use berth_api::services::introspection::v1::PluginsRequest;
use berth_api::services::leases::v1::{CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete};
use berth_api::types::Descriptor as ApiDescriptor;
use berth_remotes::auth::StaticCredentials;
use berth_remotes::hosts::{AuthConfig, HostOptions};
use berth_remotes::pull::PullOptions;
use berth_remotes::{Platform, Reference, Resolver, ResolverOptions};
use clap::{CommandFactory, Parser, Subcommand};
use client::{Client, status_message};
use std::sync::Arc;

pub const DEFAULT_ADDRESS: &str = "/run/berth/berth.sock";

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "The friendly command line for berthd (containerd's API; the stock ctr works too)",
    propagate_version = true
)]
pub struct Cli {
    /// berthd's gRPC socket
    #[arg(long, short = 'a', global = true, env = "BERTH_ADDRESS", default_value = DEFAULT_ADDRESS)]
    pub address: String,
    /// Namespace to work in
    #[arg(
        long,
        short = 'n',
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the client's and berthd's versions
    Version,
    /// Show berthd's plugins and their status, and what the namespace keeps on disk
    Info,
    /// List images
    #[command(visible_alias = "ls")]
    Images {
        /// Print only image names
        #[arg(long, short)]
        quiet: bool,
        /// containerd filters (e.g. 'name~=busybox')
        filters: Vec<String>,
    },
    /// Remove images (the records; content is collected later by berthd's GC)
    Rmi {
        /// Wait for the garbage collector before returning
        #[arg(long)]
        sync: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Pull an image from a registry into berthd.
    ///
    /// By default berthd pulls (its transfer service, as containerd 2.x's `ctr image
    /// pull`): it resolves the reference, picks the platform's manifest, downloads the
    /// config and layers in parallel with their digests verified into its content store
    /// under a lease, unpacks each layer into the snapshotter as soon as it and its parent
    /// are there (while later layers still download; --no-unpack skips this), then creates
    /// or updates the image record. This command shows the daemon's progress and answers
    /// its credential requests (--user or ~/.docker/config.json). Registry configuration
    /// comes from hosts.toml files (--hosts-dir), read by berthd. With --local the same
    /// pipeline runs client side, through the content, snapshots and diff APIs.
    Pull {
        /// Image reference; Docker-style short names are expanded (busybox →
        /// docker.io/library/busybox:latest)
        reference: String,
        /// Platform to pull (os/arch[/variant]); default: this machine's
        #[arg(long)]
        platform: Option<String>,
        /// Directories with <registry>/hosts.toml (':'-separated)
        #[arg(
            long,
            env = "BERTH_HOSTS_DIR",
            default_value = "/etc/berth/certs.d:/etc/containerd/certs.d"
        )]
        hosts_dir: String,
        /// Use plain HTTP for registries without a hosts.toml
        #[arg(long)]
        plain_http: bool,
        /// Credentials as user:password (otherwise ~/.docker/config.json)
        #[arg(long, short = 'u')]
        user: Option<String>,
        #[arg(long, default_value_t = 3)]
        max_concurrent_downloads: usize,
        /// Snapshotter to unpack into
        #[arg(long, env = "CONTAINERD_SNAPSHOTTER", default_value = "overlayfs")]
        snapshotter: String,
        /// Only fetch the content; do not unpack the layers
        #[arg(long)]
        no_unpack: bool,
        /// Print only the image name when done
        #[arg(long, short, conflicts_with = "json")]
        quiet: bool,
        /// Print progress as JSON lines on stdout
        #[arg(long)]
        json: bool,
        /// Pull client side (this process talks to the registry) instead of through
        /// berthd's transfer service
        #[arg(long)]
        local: bool,
    },
    /// Push an image from berthd to a registry.
    ///
    /// Client side: the image's blobs are read from berthd's content store through the
    /// content API and uploaded by this command (blobs the registry has are skipped,
    /// blobs pulled from another repository of the same registry are mounted), then the
    /// manifests and the tag. Every manifest of an index must be present in berthd.
    Push {
        /// The image's name in berthd
        name: String,
        /// Where to push (default: the name itself)
        target: Option<String>,
        /// Directories with <registry>/hosts.toml (':'-separated)
        #[arg(
            long,
            env = "BERTH_HOSTS_DIR",
            default_value = "/etc/berth/certs.d:/etc/containerd/certs.d"
        )]
        hosts_dir: String,
        /// Use plain HTTP for registries without a hosts.toml
        #[arg(long)]
        plain_http: bool,
        /// Credentials as user:password (otherwise ~/.docker/config.json)
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Print only the pushed digest
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run a command in a new container from an image.
    ///
    /// Client side like `ctr run`: the image's layers are unpacked into the snapshotter if
    /// they are not yet, an active snapshot is prepared for the container, the OCI spec
    /// is built here from containerd's defaults and the image config, then the container
    /// and its task are created. Without -d the command's output comes here and berth
    /// exits with its exit status; with -d the output goes to a log (`berth logs`).
    Run(run::RunArgs),
    /// Run a command in a running container
    Exec(run::ExecArgs),
    /// List containers and their tasks
    Ps(ps::PsArgs),
    /// Print the log of a container started with `run -d`
    Logs(ps::LogsArgs),
    /// Stop containers: their stop signal (SIGTERM), SIGKILL after a timeout
    Stop(lifecycle::StopArgs),
    /// Remove containers: task, record, snapshot and log
    Rm(lifecycle::RmArgs),
    /// Write blobs into berthd's content store and read them back
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
    /// Print a shell completion script
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum ContentCommand {
    /// Write standard input into the content store as ingest REF and commit it; prints
    /// the blob's digest.
    ///
    /// Like `ctr content ingest`, but several 1 MiB Write messages are kept in flight on
    /// the stream instead of waiting for each reply. An ingest of the same REF that was
    /// interrupted is resumed where it stopped. With --expected-digest/--expected-size
    /// the daemon verifies the blob before committing it; on a mismatch nothing is
    /// committed and the ingest is removed.
    Ingest {
        /// The ingest's reference (any name unique among running ingests)
        r#ref: String,
        /// The digest the blob must have (sha256:…)
        #[arg(long)]
        expected_digest: Option<String>,
        /// The size in bytes the blob must have
        #[arg(long)]
        expected_size: Option<i64>,
    },
    /// Write the blob DIGEST to standard output
    Get { digest: String },
}

/// A failure to report: the message is already in words.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<berth_core::Error> for CliError {
    fn from(e: berth_core::Error) -> Self {
        CliError(e.to_string())
    }
}

impl From<client::ConnectError> for CliError {
    fn from(e: client::ConnectError) -> Self {
        CliError(e.0)
    }
}

fn grpc(what: &str) -> impl Fn(tonic::Status) -> CliError + '_ {
    move |s| CliError(status_message(what, &s))
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "berth", &mut std::io::stdout());
            Ok(())
        }
        Command::Version => {
            println!("Client:\n  Version:  {}", env!("CARGO_PKG_VERSION"));
            let c = Client::connect(&cli.address, &cli.namespace).await?;
            let v = c
                .version()
                .version(c.request(()))
                .await
                .map_err(grpc("version"))?
                .into_inner();
            println!(
                "\nServer:\n  Version:  {}\n  Revision: {}",
                v.version, v.revision
            );
            Ok(())
        }
        Command::Info => info(&cli.address, &cli.namespace).await,
        Command::Content { command } => content_cmd(&cli.address, &cli.namespace, command).await,
        Command::Run(a) => run::run(&cli.address, &cli.namespace, a).await,
        Command::Exec(a) => run::exec(&cli.address, &cli.namespace, a).await,
        Command::Ps(a) => ps::ps(&cli.address, &cli.namespace, a).await,
        Command::Logs(a) => ps::logs(&cli.address, &cli.namespace, a).await,
        Command::Stop(a) => lifecycle::stop(&cli.address, &cli.namespace, a).await,
        Command::Rm(a) => lifecycle::rm(&cli.address, &cli.namespace, a).await,
        Command::Images { quiet, filters } => {
            let c = Client::connect(&cli.address, &cli.namespace).await?;
            let mut imgs = c
                .images()
                .list(c.request(ListImagesRequest { filters }))
                .await
                .map_err(grpc("list images"))?
                .into_inner()
                .images;
            imgs.sort_by(|a, b| a.name.cmp(&b.name));
            if quiet {
                for i in imgs {
                    println!("{}", i.name);
                }
                return Ok(());
            }
            let mut t = table::Table::new(&["REF", "TYPE", "DIGEST", "SIZE", "CREATED"]);
            for i in imgs {
                let target = i.target.unwrap_or_default();
                t.row(vec![
                    i.name,
                    table::short_media_type(&target.media_type),
                    target.digest,
                    table::human_size(target.size as u64),
                    i.created_at
                        .map(|ts| table::ago(ts.seconds))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{}", t.render());
            Ok(())
        }
        Command::Rmi { sync, names } => {
            let c = Client::connect(&cli.address, &cli.namespace).await?;
            let mut failed = vec![];
            for name in names {
                match c
                    .images()
                    .delete(c.request(DeleteImageRequest {
                        name: name.clone(),
                        sync,
                        target: None,
                    }))
                    .await
                {
                    Ok(_) => println!("{name}"),
                    Err(s) => failed.push(status_message(&format!("remove {name}"), &s)),
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(CliError(failed.join("\n")))
            }
        }
        Command::Push {
            name,
            target,
            hosts_dir,
            plain_http,
            user,
            quiet,
        } => {
            let target = Reference::parse_normalized(target.as_deref().unwrap_or(&name))?;
            let client = Client::connect(&cli.address, &cli.namespace).await?;
            let resolver = make_resolver(&target, &hosts_dir, plain_http, user.as_deref())?;
            let started = std::time::Instant::now();
            let (top, report) = push::push(&client, &resolver, &name, &target).await?;
            if quiet {
                println!("{}", top.digest());
            } else {
                for (digest, what) in report {
                    println!("{digest}: {what}");
                }
                println!(
                    "{target}: pushed {} in {:.1}s",
                    top.digest(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Command::Pull {
            reference,
            platform,
            hosts_dir,
            plain_http,
            user,
            max_concurrent_downloads,
            snapshotter,
            no_unpack,
            quiet,
            json,
            local,
        } => {
            let mode = if json {
                progress::Mode::Json
            } else if quiet {
                progress::Mode::Quiet
            } else {
                progress::Mode::Bars
            };
            if !local {
                let reference = Reference::parse_normalized(&reference)?;
                let platform = match platform.as_deref() {
                    Some(p) => Platform::parse(p)?,
                    None => Platform::host(),
                };
                if max_concurrent_downloads != 3 {
                    eprintln!(
                        "berth: --max-concurrent-downloads applies to --local pulls (berthd uses its [plugins.\"io.containerd.transfer.v1.local\"] max_concurrent_downloads)"
                    );
                }
                let client = Client::connect(&cli.address, &cli.namespace).await?;
                let started = std::time::Instant::now();
                let req = pull::daemon::Request {
                    credentials: load_credentials(&reference, user.as_deref())?,
                    reference: reference.clone(),
                    platform,
                    hosts_dir,
                    plain_http,
                    snapshotter: (!no_unpack).then_some(snapshotter),
                };
                let pulled = tokio::select! {
                    r = pull::daemon::pull(&client, req, mode) => r?,
                    _ = tokio::signal::ctrl_c() => {
                        return Err(CliError(format!("pull {reference}: cancelled")));
                    }
                };
                pull::daemon::finish(mode, &reference.to_string(), &pulled, started);
                return Ok(());
            }
            pull_cmd(
                &cli.address,
                &cli.namespace,
                &reference,
                platform.as_deref(),
                &hosts_dir,
                plain_http,
                user.as_deref(),
                max_concurrent_downloads,
                (!no_unpack).then_some(snapshotter),
                mode,
            )
            .await
        }
    }
}

async fn content_cmd(
    address: &str,
    namespace: &str,
    command: ContentCommand,
) -> Result<(), CliError> {
    let c = Client::connect(address, namespace).await?;
    match command {
        ContentCommand::Ingest {
            r#ref,
            expected_digest,
            expected_size,
        } => {
            let input = content::stdin_file()?;
            let done =
                content::ingest(&c, &r#ref, expected_digest.as_deref(), expected_size, input)
                    .await?;
            if done.existed {
                eprintln!("berth: {} exists already", done.digest);
            } else if done.resumed_at > 0 {
                eprintln!(
                    "berth: resumed ingest {ref} at byte {} of {}",
                    done.resumed_at, done.size
                );
            }
            println!("{}", done.digest);
            Ok(())
        }
        ContentCommand::Get { digest } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(content::CHUNK, stdout.lock());
            content::get(&c, &digest, &mut out).await?;
            Ok(())
        }
    }
}

async fn info(address: &str, namespace: &str) -> Result<(), CliError> {
    let c = Client::connect(address, namespace).await?;
    let v = c
        .version()
        .version(c.request(()))
        .await
        .map_err(grpc("version"))?
        .into_inner();
    println!("Server:    berthd {} ({})", v.version, v.revision);
    println!("Socket:    {}", c.address.display());
    if let Ok(s) = c.introspection().server(c.request(())).await {
        let s = s.into_inner();
        println!("UUID:      {}\nPID:       {}", s.uuid, s.pid);
        for d in s.deprecations {
            println!("Deprecated: {} ({})", d.message, d.id);
        }
    }
    let plugins = c
        .introspection()
        .plugins(c.request(PluginsRequest { filters: vec![] }))
        .await
        .map_err(grpc("list plugins"))?
        .into_inner()
        .plugins;
    let ok = plugins.iter().filter(|p| p.init_err.is_none()).count();
    println!(
        "Plugins:   {} loaded, {} failed or skipped\n",
        ok,
        plugins.len() - ok
    );
    let snapshotters: Vec<String> = plugins
        .iter()
        .filter(|p| p.r#type == "io.containerd.snapshotter.v1" && p.init_err.is_none())
        .map(|p| p.id.clone())
        .collect();
    let mut t = table::Table::new(&["TYPE", "ID", "PLATFORMS", "STATUS"]);
    for p in plugins {
        let platforms = p
            .platforms
            .iter()
            .map(|pl| {
                let mut s = format!("{}/{}", pl.os, pl.architecture);
                if !pl.variant.is_empty() {
                    s.push('/');
                    s.push_str(&pl.variant);
                }
                s
            })
            .collect::<Vec<_>>()
            .join(",");
        let status = match &p.init_err {
            None => "ok".to_string(),
            Some(e) if e.message.contains("skip") => format!("skipped: {}", e.message),
            Some(e) => format!("error: {}", e.message),
        };
        t.row(vec![
            p.r#type,
            p.id,
            if platforms.is_empty() {
                "-".into()
            } else {
                platforms
            },
            status,
        ]);
    }
    print!("{}", t.render());
    disk_usage(&c, namespace, &snapshotters).await
}

/// What the namespace keeps on disk: image records, content (the sum of its blobs'
/// sizes) and, per loaded snapshotter, its snapshots' own usage (`Usage` per key, so
/// a layer shared by several images counts once).
async fn disk_usage(c: &Client, namespace: &str, snapshotters: &[String]) -> Result<(), CliError> {
    use berth_api::services::content::v1::ListContentRequest;
    use berth_api::services::snapshots::v1::{ListSnapshotsRequest, UsageRequest};
    use futures::StreamExt;

    let images = c
        .images()
        .list(c.request(ListImagesRequest { filters: vec![] }))
        .await
        .map_err(grpc("list images"))?
        .into_inner()
        .images
        .len();
    let mut stream = c
        .content()
        .list(c.request(ListContentRequest { filters: vec![] }))
        .await
        .map_err(grpc("list content"))?
        .into_inner();
    let (mut blobs, mut content_bytes) = (0usize, 0u64);
    while let Some(page) = stream.next().await {
        for info in page.map_err(grpc("list content"))?.info {
            blobs += 1;
            content_bytes += info.size.max(0) as u64;
        }
    }
    let mut t = table::Table::new(&["WHAT", "COUNT", "SIZE"]);
    t.row(vec!["images".into(), images.to_string(), "-".into()]);
    t.row(vec![
        "content".into(),
        blobs.to_string(),
        table::human_size(content_bytes),
    ]);
    for sn in snapshotters {
        let mut client = run::snapshots(c);
        let mut stream = client
            .list(c.request(ListSnapshotsRequest {
                snapshotter: sn.clone(),
                filters: vec![],
            }))
            .await
            .map_err(grpc("list snapshots"))?
            .into_inner();
        let mut keys = Vec::new();
        while let Some(page) = stream.next().await {
            keys.extend(
                page.map_err(grpc("list snapshots"))?
                    .info
                    .into_iter()
                    .map(|i| i.name),
            );
        }
        let mut bytes = 0u64;
        for key in &keys {
            // A snapshot removed since the listing simply no longer counts.
            if let Ok(u) = client
                .usage(c.request(UsageRequest {
                    snapshotter: sn.clone(),
                    key: key.clone(),
                }))
                .await
            {
                bytes += u.into_inner().size.max(0) as u64;
            }
        }
        t.row(vec![
            format!("snapshots ({sn})"),
            keys.len().to_string(),
            table::human_size(bytes),
        ]);
    }
    println!("\nDisk usage of namespace {namespace:?}:");
    print!("{}", t.render());
    Ok(())
}

pub(crate) fn to_api_descriptor(d: &oci_spec::image::Descriptor) -> ApiDescriptor {
    ApiDescriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: d.size() as i64,
        annotations: d.annotations().clone().unwrap_or_default(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn pull_cmd(
    address: &str,
    namespace: &str,
    reference: &str,
    platform: Option<&str>,
    hosts_dir: &str,
    plain_http: bool,
    user: Option<&str>,
    max_concurrent_downloads: usize,
    snapshotter: Option<String>,
    mode: progress::Mode,
) -> Result<(), CliError> {
    let reference = Reference::parse_normalized(reference)?;
    let platform = match platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let mut client = Client::connect(address, namespace).await?;
    let resolver = make_resolver(&reference, hosts_dir, plain_http, user)?;

    // A lease keeps what is written from the collector until the image record exists.
    let lease_id = format!("berth-pull-{}", uuid::Uuid::new_v4());
    let mut labels = std::collections::HashMap::new();
    let expire = std::time::SystemTime::now() + std::time::Duration::from_secs(24 * 3600);
    labels.insert(
        "containerd.io/gc.expire".to_string(),
        berth_core::time::rfc3339(expire),
    );
    let leased = match client
        .leases()
        .create(client.request(LeaseCreate {
            id: lease_id.clone(),
            labels,
        }))
        .await
    {
        Ok(_) => {
            client.lease = Some(lease_id.clone());
            true
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => false,
        Err(s) => return Err(grpc("create lease")(s)),
    };

    let sink = pull::ContentSink {
        client: client.clone(),
        source: Some((
            reference.distribution_source_label(),
            reference.repository.clone(),
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let unpacker = snapshotter.map(|snapshotter| {
        Arc::new(unpack::Unpacker {
            client: client.clone(),
            snapshotter,
            top: Default::default(),
        })
    });
    let opts = PullOptions {
        platform,
        max_concurrent_downloads: max_concurrent_downloads.max(1),
        progress: Some(tx),
        layer_hook: unpacker
            .clone()
            .map(|u| u as Arc<dyn berth_remotes::pull::LayerHook>),
        ..Default::default()
    };
    let cancel = opts.cancel.clone();
    let display = tokio::spawn(progress::display(rx, mode));
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = berth_remotes::pull::pull(&resolver, &reference, &sink, &opts) => r,
        _ = tokio::signal::ctrl_c() => {
            cancel.cancel();
            Err(berth_core::Error::new(berth_core::error::ErrorKind::Canceled, format!("pull {reference}")))
        }
    };
    drop(opts);
    let _ = display.await;
    let result = match (result, &unpacker) {
        (Ok(image), Some(u)) => u.label_config(&image).await.map(|_| image),
        (r, _) => r,
    };
    let outcome = match result {
        Ok(image) => {
            let name = reference.to_string();
            let img = Image {
                name: name.clone(),
                target: Some(to_api_descriptor(&image.target)),
                ..Default::default()
            };
            let created = client
                .images()
                .create(client.request(CreateImageRequest {
                    image: Some(img.clone()),
                    source_date_epoch: None,
                }))
                .await;
            match created {
                Ok(_) => Ok(image),
                Err(s) if s.code() == tonic::Code::AlreadyExists => client
                    .images()
                    .update(client.request(UpdateImageRequest {
                        image: Some(img),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        source_date_epoch: None,
                    }))
                    .await
                    .map(|_| image)
                    .map_err(grpc("update image")),
                Err(s) => Err(grpc("create image")(s)),
            }
        }
        Err(e) => Err(CliError(e.to_string())),
    };
    if leased {
        client.lease = None;
        let _ = client
            .leases()
            .delete(client.request(LeaseDelete {
                id: lease_id,
                sync: false,
            }))
            .await;
    }
    let image = outcome?;
    progress::finish(mode, &reference.to_string(), &image, started.elapsed());
    Ok(())
}

/// A resolver for `reference`'s registry: hosts.toml from `hosts_dir`, credentials from
/// `--user` or the Docker config.
fn make_resolver(
    reference: &Reference,
    hosts_dir: &str,
    plain_http: bool,
    user: Option<&str>,
) -> Result<Resolver, CliError> {
    let creds = load_credentials(reference, user)?;
    Ok(Resolver::new(ResolverOptions {
        credentials: Arc::new(creds),
        ..ResolverOptions::with_hosts(HostOptions {
            config_path: Some(hosts_dir.to_string()),
            default_scheme: plain_http.then(|| "http".to_string()),
        })
    }))
}

/// Credentials from `--user` (for `reference`'s registry) over the Docker config's.
fn load_credentials(
    reference: &Reference,
    user: Option<&str>,
) -> Result<StaticCredentials, CliError> {
    let mut creds = StaticCredentials::from_default_docker_config().unwrap_or_else(|e| {
        eprintln!("berth: ignoring docker config: {e}");
        StaticCredentials::default()
    });
    if let Some(u) = user {
        let (name, pass) = u
            .split_once(':')
            .ok_or_else(|| CliError("--user expects user:password".into()))?;
        let auth = AuthConfig {
            username: name.into(),
            password: pass.into(),
            identity_token: String::new(),
        };
        creds.insert(&reference.host, auth);
    }
    Ok(creds)
}
