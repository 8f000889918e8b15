//! The transfer and streaming services against a private berthd and a real
//! `docker-registry` on 127.0.0.1, driven by a tonic client shaped exactly like
//! containerd 2.x's `ctr image pull` (2.x's ctr is not available here): a progress stream
//! and an auth stream opened through Streaming with `StreamInit`, then
//! `Transfer(OCIRegistry → ImageStore, options.progress_stream)`. Results are checked with
//! the stock `ctr` 1.6 (`images ls`, `snapshots ls`, `run --rm`) and against what
//! `ctr images pull --plain-http` produces from the same registry.

use berth_api::any;
use berth_api::services::streaming::v1::StreamInit;
use berth_api::services::streaming::v1::streaming_client::StreamingClient;
use berth_api::services::transfer::v1::transfer_client::TransferClient;
use berth_api::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_api::types::Platform;
use berth_api::types::transfer as tt;
use berth_testkit::Daemon;
use prost_types::Any;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A `docker-registry` on a free port with private storage; killed on drop.
struct Registry {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.path().join("config.yml");
        std::fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { port, dir, child }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes a fixture OCI archive with skopeo; returns the manifest digest it pushed.
    fn push_fixture(&self, archive: &Path, repo: &str) -> String {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{repo}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let index = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg("index.json")
            .output()
            .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
        index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The stored file of blob `digest` (the filesystem driver's layout).
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    berth_testkit::have(tool) && Path::new("/usr/bin/docker-registry").exists()
}

async fn channel(socket: PathBuf) -> Channel {
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connecting to berthd")
}

fn namespaced<T>(ns: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("containerd-namespace", ns.parse().unwrap());
    request
}

/// A stream opened as 2.x's `streamCreator.Create` does: `StreamInit{id}` first, then
/// the server's acknowledgement.
async fn open_stream(
    ch: &Channel,
    ns: &str,
    id: &str,
) -> (mpsc::Sender<Any>, tonic::Streaming<Any>) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(any::pack(&StreamInit { id: id.into() }))
        .await
        .unwrap();
    let mut inbound = StreamingClient::new(ch.clone())
        .stream(namespaced(
            ns,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .expect("Streaming/Stream")
        .into_inner();
    let ack = inbound.message().await.unwrap().expect("stream ack");
    assert_eq!(ack.type_url, "google.protobuf.Empty");
    (tx, inbound)
}

struct Pull {
    result: Result<(), tonic::Status>,
    progress: Vec<tt::Progress>,
    auth_requests: Vec<tt::AuthRequest>,
}

/// `ctr image pull --plain-http <reference>` of containerd 2.x, over the wire.
async fn pull_like_ctr2(ch: &Channel, ns: &str, reference: &str) -> Pull {
    let progress_id = format!("progress-{}", uuid::Uuid::new_v4());
    let auth_id = format!("creds-{}", uuid::Uuid::new_v4());
    let (_ptx, mut progress) = open_stream(ch, ns, &progress_id).await;
    let (atx, mut auth) = open_stream(ch, ns, &auth_id).await;
    let collected = tokio::spawn(async move {
        let mut out = vec![];
        // Ends when the server closes the stream after the transfer.
        while let Ok(Some(m)) = progress.message().await {
            out.push(any::unpack::<tt::Progress>(&m).expect("a Progress message"));
        }
        out
    });
    let auth_requests = Arc::new(Mutex::new(vec![]));
    let seen = auth_requests.clone();
    tokio::spawn(async move {
        // 2.x's ctr answers with a refresh token, empty without credentials.
        while let Ok(Some(m)) = auth.message().await {
            let req: tt::AuthRequest = any::unpack(&m).expect("an AuthRequest");
            seen.lock().unwrap().push(req);
            let resp = tt::AuthResponse {
                auth_type: tt::AuthType::Refresh as i32,
                ..Default::default()
            };
            if atx.send(any::pack(&resp)).await.is_err() {
                break;
            }
        }
    });
    let platform = Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    };
    let source = tt::OciRegistry {
        reference: reference.into(),
        resolver: Some(tt::RegistryResolver {
            auth_stream: auth_id,
            default_scheme: "http".into(),
            ..Default::default()
        }),
    };
    let destination = tt::ImageStore {
        name: reference.into(),
        platforms: vec![platform.clone()],
        all_metadata: true,
        unpacks: vec![tt::UnpackConfiguration {
            platform: Some(platform),
            snapshotter: "overlayfs".into(),
        }],
        ..Default::default()
    };
    let result = TransferClient::new(ch.clone())
        .transfer(namespaced(
            ns,
            TransferRequest {
                source: Some(any::pack(&source)),
                destination: Some(any::pack(&destination)),
                options: Some(TransferOptions {
                    progress_stream: progress_id,
                }),
            },
        ))
        .await
        .map(|_| ());
    let progress = tokio::time::timeout(Duration::from_secs(20), collected)
        .await
        .expect("the server closes the progress stream after the transfer")
        .unwrap();
    let auth_requests = auth_requests.lock().unwrap().clone();
    Pull {
        result,
        progress,
        auth_requests,
    }
}

/// `(name, digest)` of `ctr images ls` rows.
fn images(d: &Daemon, ns: &str) -> Vec<(String, String)> {
    d.ctr_ok(&["-n", ns, "images", "ls"])
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect()
}

/// Committed snapshot names of `ctr snapshots ls`.
fn committed(d: &Daemon, ns: &str) -> Vec<String> {
    let mut v: Vec<String> = d
        .ctr_ok(&["-n", ns, "snapshots", "--snapshotter", "overlayfs", "ls"])
        .lines()
        .filter(|l| l.contains("Committed"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_transfer_matches_ctr_pull_and_runs() {
    if !have("skopeo") || !have("umoci") {
        eprintln!("SKIP: skopeo, umoci or docker-registry missing (scripts/install-deps)");
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    let digest = reg.push_fixture(&fixtures.join("busybox.oci.tar"), "fixtures/busybox:1");
    let reference = format!("{}/fixtures/busybox:1", reg.host());
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;

    let pull = pull_like_ctr2(&ch, "default", &reference).await;
    assert!(
        pull.result.is_ok(),
        "{:?}\n{}",
        pull.result,
        berth_testkit::tail(&d.log(), 30)
    );
    // Progress as 2.x sends it: the phases, then per-blob events named by ref key.
    let events: Vec<(&str, &str)> = pull
        .progress
        .iter()
        .map(|p| (p.event.as_str(), p.name.as_str()))
        .collect();
    let source = format!("OCI Registry ({reference})");
    assert_eq!(pull.progress[0].event, format!("Resolving from {source}"));
    assert_eq!(
        pull.progress.last().unwrap().event,
        format!("Completed pull from {source}")
    );
    assert!(
        events.contains(&("saved", reference.as_str())),
        "{events:?}"
    );
    let manifest_key = format!("manifest-{digest}");
    let layers: Vec<&tt::Progress> = pull
        .progress
        .iter()
        .filter(|p| p.name.starts_with("layer-sha256:"))
        .collect();
    assert!(!layers.is_empty(), "{events:?}");
    for want in ["waiting", "complete", "extracting", "extracted"] {
        assert!(
            layers.iter().any(|p| p.event == want),
            "no {want} layer event: {events:?}"
        );
    }
    for p in &layers {
        assert_eq!(p.parents, std::slice::from_ref(&manifest_key), "{p:?}");
        assert_eq!(p.desc.as_ref().unwrap().digest, p.name["layer-".len()..]);
    }
    let done = layers.iter().find(|p| p.event == "complete").unwrap();
    assert_eq!(done.progress, done.total);
    // The auth stream was asked about the registry's host.
    assert_eq!(pull.auth_requests.len(), 1, "{:?}", pull.auth_requests);
    assert_eq!(pull.auth_requests[0].host, reg.host());

    // The stock ctr sees the image with the digest ctr 1.6's own pull gives.
    assert!(images(&d, "default").contains(&(reference.clone(), digest.clone())));
    d.ctr_ok(&["namespaces", "create", "reference"]);
    d.ctr_ok(&[
        "-n",
        "reference",
        "images",
        "pull",
        "--plain-http",
        &reference,
    ]);
    assert_eq!(images(&d, "reference"), images(&d, "default"));
    // Unpacked: the same committed chain as ctr's pull.
    let ours = committed(&d, "default");
    assert!(!ours.is_empty());
    assert_eq!(ours, committed(&d, "reference"));
    // No lease left behind.
    let leases = d.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");

    // A second pull finds everything.
    let again = pull_like_ctr2(&ch, "default", &reference).await;
    assert!(again.result.is_ok(), "{:?}", again.result);
    assert!(
        again
            .progress
            .iter()
            .any(|p| p.event == "already exists" && p.name.starts_with("layer-")),
        "{:?}",
        again.progress
    );

    // Push it back under another name (image store → registry); ctr 1.6 pulls the copy
    // with the same digest.
    let copy = format!("{}/fixtures/copy:2", reg.host());
    let push_source = tt::ImageStore {
        name: reference.clone(),
        ..Default::default()
    };
    let push_destination = tt::OciRegistry {
        reference: copy.clone(),
        resolver: Some(tt::RegistryResolver {
            default_scheme: "http".into(),
            ..Default::default()
        }),
    };
    TransferClient::new(ch.clone())
        .transfer(namespaced(
            "default",
            TransferRequest {
                source: Some(any::pack(&push_source)),
                destination: Some(any::pack(&push_destination)),
                options: None,
            },
        ))
        .await
        .expect("push through Transfer");
    d.ctr_ok(&["namespaces", "create", "copy"]);
    d.ctr_ok(&["-n", "copy", "images", "pull", "--plain-http", &copy]);
    assert_eq!(images(&d, "copy"), [(copy.clone(), digest.clone())]);

    // The collector keeps everything the record refers to (content through the
    // manifest's gc.ref labels, the snapshot chain through the config's
    // gc.ref.snapshot.overlayfs): a synchronous collection triggered elsewhere changes
    // nothing in this namespace.
    let content_before = d.ctr_ok(&["content", "ls", "-q"]);
    d.ctr_ok(&["-n", "reference", "images", "rm", "--sync", &reference]);
    assert_eq!(d.ctr_ok(&["content", "ls", "-q"]), content_before);
    assert_eq!(committed(&d, "default"), ours);
    assert!(committed(&d, "reference").is_empty(), "the collection ran");

    // Usable by ctr run.
    if berth_testkit::have("runc") {
        let out = d.ctr_ok(&["run", "--rm", &reference, "transfer-run", "echo", "hello"]);
        assert_eq!(out, "hello\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transfers_fail_as_containerd() {
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;
    let client = TransferClient::new(ch.clone());
    let store = tt::ImageStore {
        name: "example.com/x:1".into(),
        ..Default::default()
    };
    let call = |source: Option<Any>, destination: Option<Any>, progress: &str| {
        let mut client = client.clone();
        let progress = progress.to_string();
        async move {
            client
                .transfer(namespaced(
                    "default",
                    TransferRequest {
                        source,
                        destination,
                        options: Some(TransferOptions {
                            progress_stream: progress,
                        }),
                    },
                ))
                .await
                .unwrap_err()
        }
    };
    // A pair no transferrer handles (tagging, image store → image store, is not built):
    // containerd's Unimplemented and message.
    let e = call(Some(any::pack(&store)), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(
        e.message(),
        "method Transfer not implemented for containerd.types.transfer.ImageStore to containerd.types.transfer.ImageStore"
    );
    // An export to a stream nobody opened.
    let export = any::pack(&tt::ImageExportStream {
        stream: "s".into(),
        ..Default::default()
    });
    let e = call(Some(any::pack(&store)), Some(export), "").await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // An import from a stream nobody opened.
    let import = any::pack(&tt::ImageImportStream {
        stream: "s".into(),
        ..Default::default()
    });
    let e = call(Some(import), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let unknown = Any {
        type_url: "example.com/Unknown".into(),
        value: vec![1, 2, 3],
    };
    let e = call(Some(unknown), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // Undecodable bytes of a known type.
    let broken = Any {
        type_url: "containerd.types.transfer.OCIRegistry".into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let e = call(Some(broken), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = call(None, Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A failed call still ends the client's progress stream.
    let (_keep, mut progress) = open_stream(&ch, "default", "ended").await;
    let e = call(None, Some(any::pack(&store)), "ended").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), progress.message())
        .await
        .expect("the progress stream ends with the call");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // A progress stream nobody opened: NotFound, as containerd's stream manager.
    let registry = any::pack(&tt::OciRegistry {
        reference: "127.0.0.1:1/x:1".into(),
        resolver: None,
    });
    let e = call(Some(registry.clone()), Some(any::pack(&store)), "nope").await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // A bad reference.
    let bad_ref = any::pack(&tt::OciRegistry {
        reference: "UPPER/case".into(),
        resolver: None,
    });
    let e = call(Some(bad_ref), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A stream ID registered twice.
    let (_tx, _rx) = open_stream(&ch, "default", "dup").await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(any::pack(&StreamInit { id: "dup".into() }))
        .await
        .unwrap();
    let mut second = StreamingClient::new(ch.clone())
        .stream(namespaced(
            "default",
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    let e = second.message().await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    if !have("skopeo") {
        return;
    }
    // A missing image on a live registry: NotFound, and no image record.
    let reg = Registry::start();
    let missing = format!("{}/nothing/here:1", reg.host());
    let pull = pull_like_ctr2(&ch, "default", &missing).await;
    let e = pull.result.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(images(&d, "default").is_empty());
    let leases = d.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_lying_about_a_digest_leaves_no_image() {
    if !have("skopeo") || !have("umoci") {
        eprintln!("SKIP: skopeo, umoci or docker-registry missing (scripts/install-deps)");
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    let digest = reg.push_fixture(&fixtures.join("busybox.oci.tar"), "lying/busybox:1");
    let reference = format!("{}/lying/busybox:1", reg.host());
    // The registry now serves other bytes (same length) under the layer's digest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reg.blob_file(&digest)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = reg.blob_file(&layer);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;
    let pull = pull_like_ctr2(&ch, "default", &reference).await;
    let e = pull.result.unwrap_err();
    assert!(
        e.message().contains(&layer) && e.message().contains("digest"),
        "the error names the blob and what is wrong: {e:?}"
    );
    assert!(images(&d, "default").is_empty());
    // Nothing unpacked, nothing leased, the bad blob not in the store.
    assert!(committed(&d, "default").is_empty());
    let leases = d.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
    let content = d.ctr_ok(&["content", "ls", "-q"]);
    assert!(!content.contains(&layer), "{content}");
}

/// A TCP proxy in front of `upstream` that sends the registry's answers slowly (16 KiB
/// per 100 ms), so a pull is still downloading when the client goes away.
async fn slow_proxy(upstream: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_going_away_cancels_the_pull() {
    if !have("skopeo") || !have("umoci") {
        eprintln!("SKIP: skopeo, umoci or docker-registry missing (scripts/install-deps)");
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    reg.push_fixture(&fixtures.join("busybox.oci.tar"), "slow/busybox:1");
    let proxy = slow_proxy(reg.host()).await;
    let reference = format!("{proxy}/slow/busybox:1");
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;

    let (_ptx, mut progress) = open_stream(&ch, "default", "cancel-progress").await;
    let store = tt::ImageStore {
        name: reference.clone(),
        unpacks: vec![tt::UnpackConfiguration {
            platform: None,
            snapshotter: "overlayfs".into(),
        }],
        ..Default::default()
    };
    let source = tt::OciRegistry {
        reference: reference.clone(),
        resolver: Some(tt::RegistryResolver {
            default_scheme: "http".into(),
            ..Default::default()
        }),
    };
    let mut client = TransferClient::new(ch.clone());
    let call = tokio::spawn(async move {
        client
            .transfer(namespaced(
                "default",
                TransferRequest {
                    source: Some(any::pack(&source)),
                    destination: Some(any::pack(&store)),
                    options: Some(TransferOptions {
                        progress_stream: "cancel-progress".into(),
                    }),
                },
            ))
            .await
    });
    // Wait until a layer is being downloaded, then go away.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no layer download started");
        let m = tokio::time::timeout(Duration::from_secs(30), progress.message())
            .await
            .unwrap()
            .unwrap()
            .expect("progress until cancelled");
        let p: tt::Progress = any::unpack(&m).unwrap();
        if p.event == "downloading" && p.name.starts_with("layer-") && p.progress > 0 {
            break;
        }
    }
    assert!(
        d.ctr_ok(&["leases", "ls"]).lines().count() == 2,
        "the pull holds a lease"
    );
    call.abort();
    drop(ch);
    // The daemon stops the pull and drops its lease; no image record is written.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leases = d.ctr_ok(&["leases", "ls"]);
        if leases.lines().count() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lease still there after the client left:\n{leases}\n{}",
            berth_testkit::tail(&d.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(images(&d, "default").is_empty());
    assert!(committed(&d, "default").is_empty());
}

/// `ctr image import <archive>` of containerd 2.x, over the wire: the archive goes over a
/// stream as `Data` messages within the `WindowUpdate`s the server grants (2.x's
/// `SendStream`), the destination is the image store with the date prefix.
async fn import_like_ctr2(
    ch: &Channel,
    ns: &str,
    archive: &Path,
) -> (Result<(), tonic::Status>, Vec<tt::Progress>) {
    let data = std::fs::read(archive).unwrap();
    let import_id = format!("import-{}", uuid::Uuid::new_v4());
    let progress_id = format!("progress-{}", uuid::Uuid::new_v4());
    let (_ptx, mut progress) = open_stream(ch, ns, &progress_id).await;
    let (itx, mut inbound) = open_stream(ch, ns, &import_id).await;
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut window = 0i64;
        while sent < data.len() {
            while window <= 0 {
                let Ok(Some(m)) = inbound.message().await else {
                    return;
                };
                let u: tt::WindowUpdate = any::unpack(&m).expect("a WindowUpdate");
                window += i64::from(u.update);
            }
            let n = (data.len() - sent).min(32 << 10).min(window as usize);
            let chunk = tt::Data {
                data: data[sent..sent + n].to_vec(),
            };
            if itx.send(any::pack(&chunk)).await.is_err() {
                return;
            }
            sent += n;
            window -= n as i64;
        }
        // Dropping the sender closes our side, as 2.x's stream.Close().
        drop(itx);
        while let Ok(Some(_)) = inbound.message().await {}
    });
    let collected = tokio::spawn(async move {
        let mut out = vec![];
        while let Ok(Some(m)) = progress.message().await {
            out.push(any::unpack::<tt::Progress>(&m).unwrap());
        }
        out
    });
    let platform = Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    };
    let destination = tt::ImageStore {
        extra_references: vec![tt::ImageReference {
            name: "import-2026-11-27".into(),
            is_prefix: true,
            allow_overwrite: true,
            ..Default::default()
        }],
        platforms: vec![platform.clone()],
        unpacks: vec![tt::UnpackConfiguration {
            platform: Some(platform),
            snapshotter: "overlayfs".into(),
        }],
        ..Default::default()
    };
    let source = tt::ImageImportStream {
        stream: import_id,
        ..Default::default()
    };
    let result = TransferClient::new(ch.clone())
        .transfer(namespaced(
            ns,
            TransferRequest {
                source: Some(any::pack(&source)),
                destination: Some(any::pack(&destination)),
                options: Some(TransferOptions {
                    progress_stream: progress_id,
                }),
            },
        ))
        .await
        .map(|_| ());
    let progress = tokio::time::timeout(Duration::from_secs(20), collected)
        .await
        .unwrap()
        .unwrap();
    (result, progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_stream_like_ctr2_names_unpacks_and_runs() {
    let fixtures = berth_testkit::fixtures();
    let archive = fixtures.join("busybox.oci.tar");
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;
    let (result, progress) = import_like_ctr2(&ch, "default", &archive).await;
    assert!(
        result.is_ok(),
        "{result:?}\n{}",
        berth_testkit::tail(&d.log(), 30)
    );
    let events: Vec<&str> = progress.iter().map(|p| p.event.as_str()).collect();
    assert_eq!(events.first(), Some(&"Importing"), "{events:?}");
    assert_eq!(events.last(), Some(&"Completed import"), "{events:?}");
    assert!(events.contains(&"extracted"), "{events:?}");
    // Named from the archive's io.containerd.image.name, as 2.x's image store does, with
    // the manifest's digest (what ctr 1.6's own import records too).
    let index = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("index.json")
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let name = "import.local/busybox:latest".to_string();
    assert_eq!(images(&d, "default"), [(name.clone(), digest.clone())]);
    d.ctr_ok(&["namespaces", "create", "reference"]);
    d.ctr_ok(&[
        "-n",
        "reference",
        "images",
        "import",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(images(&d, "reference"), images(&d, "default"));
    let ours = committed(&d, "default");
    assert!(!ours.is_empty());
    assert_eq!(ours, committed(&d, "reference"));
    let leases = d.ctr_ok(&["leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
    if berth_testkit::have("runc") {
        let out = d.ctr_ok(&["run", "--rm", &name, "import-run", "echo", "imported"]);
        assert_eq!(out, "imported\n");
    }

    // Export it again (2.x's `ctr image export`: the client grants windows, the server
    // sends Data): an OCI archive with Docker's manifest.json that ctr 1.6 imports with
    // the same digest.
    let exported = export_like_ctr2(&ch, "default", &name).await;
    let file = d.dir.path().join("exported.tar");
    std::fs::write(&file, &exported).unwrap();
    let listing = Command::new("tar").arg("-tf").arg(&file).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    for entry in [
        "oci-layout",
        "index.json",
        "manifest.json",
        &format!("blobs/sha256/{}", &digest[7..]),
    ] {
        assert!(
            listing.lines().any(|l| l == entry),
            "{entry} missing:\n{listing}"
        );
    }
    d.ctr_ok(&["namespaces", "create", "exported"]);
    d.ctr_ok(&["-n", "exported", "images", "import", file.to_str().unwrap()]);
    assert_eq!(images(&d, "exported"), [(name.clone(), digest.clone())]);
    // A missing image: NotFound, and the client's stream ends.
    let e = export_result(&ch, "default", "example.com/missing:1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A truncated archive fails cleanly: no record, no lease.
    let cut = d.dir.path().join("cut.tar");
    let data = std::fs::read(&archive).unwrap();
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    d.ctr_ok(&["namespaces", "create", "cut"]);
    let (result, _) = import_like_ctr2(&ch, "cut", &cut).await;
    let e = result.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(images(&d, "cut").is_empty());
    let leases = d.ctr_ok(&["-n", "cut", "leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
}

/// `ctr image export` of containerd 2.x over the wire (its `ReceiveStream`: 64 KiB window
/// updates, `Data` messages until the server closes the stream); returns the archive.
async fn export_run(ch: &Channel, ns: &str, name: &str) -> (Result<(), tonic::Status>, Vec<u8>) {
    let id = format!("export-{}", uuid::Uuid::new_v4());
    let (tx, mut inbound) = open_stream(ch, ns, &id).await;
    let received = tokio::spawn(async move {
        const WINDOW: i32 = 64 << 10;
        let mut window = 0i32;
        let mut out = vec![];
        let mut granting = true;
        loop {
            // Once the server finished, our sending side is gone; what it sent is still
            // to be read (2.x's ReceiveStream ignores that EOF too).
            if granting && window < WINDOW {
                let update = any::pack(&tt::WindowUpdate { update: WINDOW });
                if tx.send(update).await.is_ok() {
                    window += WINDOW;
                } else {
                    granting = false;
                }
            }
            match inbound.message().await {
                Ok(Some(m)) => {
                    let d: tt::Data = any::unpack(&m).expect("a Data message");
                    assert!(
                        d.data.len() as i32 <= window,
                        "the server overran the window"
                    );
                    window -= d.data.len() as i32;
                    out.extend_from_slice(&d.data);
                }
                _ => break,
            }
        }
        out
    });
    let source = tt::ImageStore {
        name: name.into(),
        ..Default::default()
    };
    let destination = tt::ImageExportStream {
        stream: id,
        platforms: vec![Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let result = TransferClient::new(ch.clone())
        .transfer(namespaced(
            ns,
            TransferRequest {
                source: Some(any::pack(&source)),
                destination: Some(any::pack(&destination)),
                options: None,
            },
        ))
        .await
        .map(|_| ());
    let data = tokio::time::timeout(Duration::from_secs(20), received)
        .await
        .expect("the server closes the export stream")
        .unwrap();
    (result, data)
}

async fn export_like_ctr2(ch: &Channel, ns: &str, name: &str) -> Vec<u8> {
    let (result, data) = export_run(ch, ns, name).await;
    result.expect("export through Transfer");
    data
}

async fn export_result(ch: &Channel, ns: &str, name: &str) -> Result<(), tonic::Status> {
    export_run(ch, ns, name).await.0
}
