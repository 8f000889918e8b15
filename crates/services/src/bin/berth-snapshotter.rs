//! `berth-snapshotter`: serves Berth's stores over containerd's gRPC APIs on a unix
//! socket, for use as `[proxy_plugins]` of a daemon (Berth or containerd):
//!
//! - `--root DIR [--snapshotter overlayfs|native|btrfs]`: one snapshotter over the
//!   snapshots API (a `type = "snapshot"` proxy);
//! - `--content-root DIR`: a local content store over the content API (a `type =
//!   "content"` proxy); blobs and ingests live under DIR.
//!
//! Both can be served on the same socket. Usage:
//! `berth-snapshotter --address SOCKET [--root DIR [--snapshotter KIND]] [--content-root DIR]`

use berth_core::content::BlobStore;
use berth_core::snapshot::Snapshotter;
use berth_services::proxy::{BackendSnapshotsService, UnscopedContent};
use std::path::PathBuf;
use std::sync::Arc;

fn usage() -> ! {
    eprintln!(
        "usage: berth-snapshotter --address SOCKET [--root DIR [--snapshotter overlayfs|native|btrfs]] [--content-root DIR]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut root = None;
    let mut content_root = None;
    let mut address = None;
    let mut kind = "overlayfs".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--root" => root = args.next().map(PathBuf::from),
            "--content-root" => content_root = args.next().map(PathBuf::from),
            "--address" => address = args.next().map(PathBuf::from),
            "--snapshotter" => kind = args.next().unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let Some(address) = address else { usage() };
    if root.is_none() && content_root.is_none() {
        usage()
    }
    let snapshots = root.map(|root| {
        let snapshotter: Arc<dyn Snapshotter> = match kind.as_str() {
            "overlayfs" => Arc::new(
                berth_snapshots::overlay::Overlay::new(&root, &Default::default())
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            "native" => Arc::new(
                berth_snapshots::native::Native::new(&root)
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            "btrfs" => Arc::new(
                berth_snapshots::btrfs::Btrfs::new(&root)
                    .unwrap_or_else(|e| fail("snapshotter", &e)),
            ),
            _ => usage(),
        };
        BackendSnapshotsService::new(snapshotter).into_server()
    });
    let content = content_root.map(|content_root| {
        let blobs: Arc<dyn BlobStore> = Arc::new(
            berth_content::LocalStore::open(&content_root)
                .unwrap_or_else(|e| fail("content store", &e)),
        );
        berth_services::content::backend_server(Arc::new(UnscopedContent::new(blobs)))
            // The proxying daemon sends chunks of up to 1 MiB; leave room.
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    });
    let router = tonic::transport::Server::builder()
        .add_optional_service(snapshots)
        .add_optional_service(content);
    let _ = std::fs::remove_file(&address);
    let listener = tokio::net::UnixListener::bind(&address).unwrap_or_else(|e| {
        eprintln!("berth-snapshotter: listening on {}: {e}", address.display());
        std::process::exit(1)
    });
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&address);
    if let Err(e) = result {
        eprintln!("berth-snapshotter: {e}");
        std::process::exit(1);
    }
}

fn fail(what: &str, e: &berth_core::Error) -> ! {
    eprintln!("berth-snapshotter: opening the {what}: {e}");
    std::process::exit(1)
}
