//! `berth-snapshotter`: serves one of Berth's snapshotters over containerd's snapshots
//! gRPC API on a unix socket, for use as a `[proxy_plugins]` snapshotter.
//!
//! Usage: `berth-snapshotter --root DIR --address SOCKET [--snapshotter overlayfs|native|btrfs]`

use berth_core::snapshot::Snapshotter;
use berth_services::proxy::BackendSnapshotsService;
use std::path::PathBuf;
use std::sync::Arc;

fn usage() -> ! {
    eprintln!(
        "usage: berth-snapshotter --root DIR --address SOCKET [--snapshotter overlayfs|native|btrfs]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut root = None;
    let mut address = None;
    let mut kind = "overlayfs".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--root" => root = args.next().map(PathBuf::from),
            "--address" => address = args.next().map(PathBuf::from),
            "--snapshotter" => kind = args.next().unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let (Some(root), Some(address)) = (root, address) else {
        usage()
    };
    let snapshotter: Arc<dyn Snapshotter> = match kind.as_str() {
        "overlayfs" => Arc::new(
            berth_snapshots::overlay::Overlay::new(&root, &Default::default())
                .unwrap_or_else(|e| fail(&e)),
        ),
        "native" => {
            Arc::new(berth_snapshots::native::Native::new(&root).unwrap_or_else(|e| fail(&e)))
        }
        "btrfs" => Arc::new(berth_snapshots::btrfs::Btrfs::new(&root).unwrap_or_else(|e| fail(&e))),
        _ => usage(),
    };
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
    let result = tonic::transport::Server::builder()
        .add_service(BackendSnapshotsService::new(snapshotter).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&address);
    if let Err(e) = result {
        eprintln!("berth-snapshotter: {e}");
        std::process::exit(1);
    }
}

fn fail(e: &berth_core::Error) -> ! {
    eprintln!("berth-snapshotter: {e}");
    std::process::exit(1)
}
