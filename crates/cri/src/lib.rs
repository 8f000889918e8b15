//! Kubernetes' Container Runtime Interface: the plugin `io.containerd.grpc.v1.cri`,
//! served on berthd's main gRPC socket as containerd 1.6's CRI plugin is.
//!
//! Built so far:
//! - `runtime.v1.ImageService` in full ([`image_service`]): pulls through the
//!   daemon-side transfer (`berth-transfer`, the same pipeline as `ctr transfer`) with
//!   unpack into the configured snapshotter, the records containerd's CRI writes (tag,
//!   repo digest and image ID, labelled `io.cri-containerd.image=managed`), the image
//!   view of every record of namespace `k8s.io` ([`images`]), removal with a synchronous
//!   collection, and the image filesystem's usage;
//! - `runtime.v1.RuntimeService`: `Version`, `Status` (network ready once a CNI config
//!   loads), pod sandboxes ([`sandbox`]: network namespace and CNI ([`cni`]), the pause
//!   container), containers ([`container`]: specs ([`spec`]), start/stop/remove, status,
//!   CRI log files ([`io`]) and `ReopenContainerLog`, `ExecSync`,
//!   `UpdateContainerResources`, `OOMKilled` from `/tasks/oom`, stats ([`stats`])),
//!   `UpdateRuntimeConfig`
//!   (`conf_template`), all kept in container records of `k8s.io` and status files
//!   ([`store`]) so a restart finds them again. Streaming (`Exec`, `Attach`,
//!   `PortForward`), pod sandbox stats and metrics, container events and checkpoints
//!   answer `Unimplemented`.
//!
//! The types and stubs ([`api`]) are generated at build time from the `v1.proto` the
//! `k8s-cri` package ships (see `build.rs`).

pub mod api {
    //! The CRI `runtime.v1` messages, server and client stubs.
    #![allow(clippy::all)]
    tonic::include_proto!("runtime.v1");
}

pub mod auth;
pub mod cni;
pub mod config;
pub mod container;
pub mod image_service;
pub mod images;
pub mod io;
pub mod reference;
pub mod runtime_service;
pub mod sandbox;
pub mod spec;
pub mod stats;
pub mod store;

use berth_core::events::Exchange;
use berth_core::runtime::Runtime;
use berth_metadata::MetadataStore;
use berth_metadata::snapshots::Snapshotters;
use berth_plugin::{GrpcService, InitContext, Instance, Registration, grpc_instance, types};
use berth_services::images::ImagesService;
use berth_transfer::LocalTransfer;
use config::CriConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The containerd namespace the CRI keeps everything in.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// containerd's label marking an image record as written by the CRI plugin.
pub const MANAGED_LABEL: &str = "io.cri-containerd.image";
pub const MANAGED_LABEL_VALUE: &str = "managed";

/// The plugin's gRPC services (image and runtime) over the daemon's stores.
#[derive(Clone)]
pub struct CriService {
    inner: Arc<Inner>,
}

struct Inner {
    transfer: Arc<LocalTransfer>,
    /// Berth's own images service: records created and removed through it publish
    /// containerd's events, and a synchronous delete waits for the collection.
    images: ImagesService,
    view: Arc<images::ImageView>,
    snapshotters: Snapshotters,
    config: CriConfig,
    events: Exchange,
    /// containerd's `imageFSPath`: `{root}/io.containerd.snapshotter.v1.<snapshotter>`.
    image_fs_path: PathBuf,
    md: Arc<MetadataStore>,
    runtime: Arc<dyn Runtime>,
    /// `{root}/io.containerd.grpc.v1.cri`: sandbox files, container status files.
    root: PathBuf,
    /// `{state}/io.containerd.grpc.v1.cri`: network namespaces, shm mounts, fifos.
    state: PathBuf,
    /// One lifecycle change at a time per sandbox or container.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Reserved names → IDs (containerd's registrar).
    names: std::sync::Mutex<HashMap<String, String>>,
    /// Serialises status file updates.
    status_lock: std::sync::Mutex<()>,
    /// The log files of running containers (for `ReopenContainerLog`).
    logs: std::sync::Mutex<HashMap<String, io::SharedLog>>,
}

/// A Berth error as the gRPC status containerd would send.
pub(crate) fn to_status(e: berth_core::Error) -> tonic::Status {
    berth_services::status(e)
}

impl GrpcService for CriService {
    fn register(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        limits: berth_plugin::MessageLimits,
    ) {
        routes.add_service(
            api::image_service_server::ImageServiceServer::new(self.clone())
                .max_decoding_message_size(limits.max_recv)
                .max_encoding_message_size(limits.max_send),
        );
        routes.add_service(
            api::runtime_service_server::RuntimeServiceServer::new(self.clone())
                .max_decoding_message_size(limits.max_recv)
                .max_encoding_message_size(limits.max_send),
        );
    }
}

/// `io.containerd.grpc.v1.cri`.
pub fn registration() -> Registration {
    Registration::new(types::GRPC, "cri", |ctx: InitContext| async move {
        let config = CriConfig::from_section(&ctx.config)?;
        let md: Arc<MetadataStore> = ctx.get(types::METADATA)?;
        let content = md.content_store().ok_or_else(|| {
            berth_core::Error::failed_precondition(
                "no content store is attached to the metadata store",
            )
        })?;
        let transfer: Arc<LocalTransfer> = ctx.get_by_id(types::TRANSFER, "local")?;
        let images: ImagesService = ctx.get_by_id(types::SERVICE, "images-service")?;
        let snapshotters: Snapshotters = ctx.get_by_id(types::SERVICE, "snapshots-service")?;
        // The snapshotter must exist now: a typo should show in `ctr plugins ls`, not at
        // the first pull.
        snapshotters
            .get(&config.containerd.snapshotter)
            .map_err(|e| {
                e.context("[plugins.\"io.containerd.grpc.v1.cri\".containerd] snapshotter")
            })?;
        let image_fs_path = ctx.daemon.root.join(format!(
            "{}.{}",
            types::SNAPSHOT,
            config.containerd.snapshotter
        ));
        let runtime: Arc<dyn Runtime> = ctx.get(types::RUNTIME_V2)?;
        let service = CriService {
            inner: Arc::new(Inner {
                transfer,
                images,
                view: Arc::new(images::ImageView::new(md.clone(), content, K8S_NAMESPACE)),
                snapshotters,
                config,
                events: ctx.events.clone(),
                image_fs_path,
                md,
                runtime,
                root: ctx.root.clone(),
                state: ctx.state.clone(),
                locks: Default::default(),
                names: Default::default(),
                status_lock: Default::default(),
                logs: Default::default(),
            }),
        };
        // Containers that were running when the daemon stopped: waiters and logs back.
        service.watch_oom(&ctx.events);
        let recovering = service.clone();
        tokio::spawn(async move { recovering.recover().await });
        Ok::<Instance, _>(grpc_instance(Arc::new(service)))
    })
    .requires(&[
        types::METADATA,
        types::SERVICE,
        types::TRANSFER,
        types::RUNTIME_V2,
    ])
    .with_config::<CriConfig>()
}
