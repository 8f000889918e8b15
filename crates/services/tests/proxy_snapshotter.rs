//! A Berth snapshotter served by the standalone `berth-snapshotter` binary and used
//! through the proxy client, as `[proxy_plugins]` do: the metadata layer on top of the
//! proxy, and the walking differ unpacking into the proxied snapshots.

use berth_core::labels::Labels;
use berth_core::snapshot::{Kind, Snapshotter};
use berth_metadata::MetadataStore;
use berth_metadata::snapshots::SnapshotDb;
use berth_services::proxy::{ProxySnapshotter, unix_channel};
use std::sync::Arc;
use std::time::Duration;

/// The proxy server process and its private directory; both go on drop.
struct Server(std::process::Child, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[tokio::test]
async fn proxy_snapshotter_round_trip() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = std::path::PathBuf::from(format!("/tmp/bp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("snap.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_berth-snapshotter"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--address")
        .arg(&socket)
        .args(["--snapshotter", "native"])
        .spawn()
        .unwrap();
    let _server = Server(child, dir.clone());
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxy: Arc<dyn Snapshotter> = Arc::new(ProxySnapshotter::new(
        unix_channel(socket.to_str().unwrap()).unwrap(),
        "proxied",
    ));
    // Backend calls straight through the proxy.
    let m = proxy.prepare("a", "", Labels::new()).await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    std::fs::write(std::path::Path::new(&m[0].source).join("f"), "x").unwrap();
    proxy.commit("A", "a", Labels::new()).await.unwrap();
    assert_eq!(proxy.stat("A").await.unwrap().kind, Kind::Committed);
    let err = proxy.stat("missing").await.unwrap_err();
    assert!(err.is(berth_core::error::ErrorKind::NotFound), "{err}");
    assert_eq!(proxy.walk(&[]).await.unwrap().len(), 1);

    // The namespaced metadata layer over the proxy, as berthd uses it.
    let md = Arc::new(MetadataStore::open(&dir.join("meta.redb")).unwrap());
    let db = SnapshotDb::new("proxied", proxy.clone(), md);
    let ns = db.namespaced("default", None);
    ns.prepare("k", "", Labels::new()).await.unwrap();
    ns.commit("K", "k", Labels::new()).await.unwrap();
    let m = ns.view("v", "K", Labels::new()).await.unwrap();
    assert!(m[0].is_readonly());
    let err = ns.remove("K").await.unwrap_err();
    assert!(err.is(berth_core::error::ErrorKind::FailedPrecondition));
    ns.remove("v").await.unwrap();
    ns.remove("K").await.unwrap();
    // Only the direct snapshot is left in the backend.
    assert_eq!(proxy.walk(&[]).await.unwrap().len(), 1);
    proxy.remove("A").await.unwrap();
}
