//! The transfer and streaming services against a private berthd and a real
//! `docker-registry` on 127.0.0.1, driven by a tonic client shaped exactly like
//! containerd 2.x's `ctr image pull` (2.x's ctr is not available here): a progress stream
//! and an auth stream opened through Streaming with `StreamInit`, then
//! `Transfer(OCIRegistry → ImageStore, options.progress_stream)` (and 2.x's `ctr image
//! import` / `export` over byte streams). Results are checked with the stock `ctr` 1.6
//! (`images ls`, `snapshots ls`, `content ls`, `run --rm`) and against what its own
//! client-side `images pull --plain-http` / `images import` produce from the same
//! registry or archive. Registries (open or behind htpasswd), skopeo pushes, Docker
//! archives and the two-platform image come from `berth_testkit::registry`.

mod common;

use berth_api::any;
use berth_api::services::streaming::v1::StreamInit;
use berth_api::services::streaming::v1::streaming_client::StreamingClient;
use berth_api::services::transfer::v1::transfer_client::TransferClient;
use berth_api::services::transfer::v1::{TransferOptions, TransferRequest};
use berth_api::types::Platform;
use berth_api::types::transfer as tt;
use berth_testkit::Daemon;
use berth_testkit::registry::Registry;
use common::{namespaced, open_stream, send_archive};
use prost_types::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

fn have(tool: &str) -> bool {
    berth_testkit::have(tool) && berth_testkit::registry::have_registry()
}

/// Whether the registry tests must be skipped (and says so).
fn registry_tools_missing() -> bool {
    let missing = !have("skopeo") || !have("umoci");
    if missing {
        eprintln!("SKIP: skopeo, umoci or docker-registry missing (scripts/install-deps)");
    }
    missing
}

async fn channel(socket: PathBuf) -> Channel {
    berth_services::proxy::unix_channel(&socket.to_string_lossy())
        .expect("a channel to berthd's socket")
}

struct Pull {
    result: Result<(), tonic::Status>,
    progress: Vec<tt::Progress>,
    auth_requests: Vec<tt::AuthRequest>,
}

/// How a ctr-2.x-shaped client answers the auth stream: credentials per host (none:
/// an empty refresh token, what 2.x's ctr sends without credentials).
type Answers = HashMap<String, (String, String)>;

/// `ctr image pull --plain-http <reference>` of containerd 2.x, over the wire.
async fn pull_like_ctr2(ch: &Channel, ns: &str, reference: &str) -> Pull {
    let platform = Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
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
    pull_with(ch, ns, reference, destination, "", &Answers::new()).await
}

/// A pull shaped like 2.x's ctr into `destination`, with a hosts directory and the
/// auth stream answering `answers`.
async fn pull_with(
    ch: &Channel,
    ns: &str,
    reference: &str,
    destination: tt::ImageStore,
    host_dir: &str,
    answers: &Answers,
) -> Pull {
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
    let answers = answers.clone();
    tokio::spawn(async move {
        // 2.x's ctr answers with credentials for the host, else an empty refresh token.
        while let Ok(Some(m)) = auth.message().await {
            let req: tt::AuthRequest = any::unpack(&m).expect("an AuthRequest");
            let resp = match answers.get(&req.host) {
                Some((user, secret)) => tt::AuthResponse {
                    auth_type: tt::AuthType::Credentials as i32,
                    username: user.clone(),
                    secret: secret.clone(),
                    ..Default::default()
                },
                None => tt::AuthResponse {
                    auth_type: tt::AuthType::Refresh as i32,
                    ..Default::default()
                },
            };
            seen.lock().unwrap().push(req);
            if atx.send(any::pack(&resp)).await.is_err() {
                break;
            }
        }
    });
    let source = tt::OciRegistry {
        reference: reference.into(),
        resolver: Some(tt::RegistryResolver {
            auth_stream: auth_id,
            default_scheme: "http".into(),
            host_dir: host_dir.into(),
            ..Default::default()
        }),
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
    // A namespace of this test's own: the containers it runs leave runtime state and
    // cgroup parents named after it, removed at the end (other tests run at the same time).
    let ns = format!("tr-pull-{}", std::process::id());
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    let digest = reg.push_oci_archive(&fixtures.join("busybox.oci.tar"), "fixtures/busybox:1");
    let reference = format!("{}/fixtures/busybox:1", reg.host());
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;

    let pull = pull_like_ctr2(&ch, &ns, &reference).await;
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
    // An open registry never challenges: the auth stream is not asked (2.x asks when a
    // host challenges, for that host).
    assert!(pull.auth_requests.is_empty(), "{:?}", pull.auth_requests);

    // The stock ctr sees the image with the digest ctr 1.6's own pull gives.
    assert!(images(&d, &ns).contains(&(reference.clone(), digest.clone())));
    d.ctr_ok(&["namespaces", "create", "reference"]);
    d.ctr_ok(&[
        "-n",
        "reference",
        "images",
        "pull",
        "--plain-http",
        &reference,
    ]);
    assert_eq!(images(&d, "reference"), images(&d, &ns));
    // Every blob carries the labels containerd's client-side pull gives it: the
    // distribution source (keyed by the host without its port, as containerd's
    // `url.Hostname()`), `containerd.io/uncompressed` on each unpacked layer, the
    // collector's references.
    let blob_labels = |ns: &str| -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = d
            .ctr_ok(&["-n", ns, "content", "ls"])
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // ctr prints a blob's labels in map order.
                let mut labels: Vec<&str> = f.last().unwrap().split(',').collect();
                labels.sort_unstable();
                (f[0].to_string(), labels.join(","))
            })
            .collect();
        rows.sort();
        rows
    };
    let ours = blob_labels(&ns);
    assert_eq!(ours, blob_labels("reference"));
    assert!(
        ours.iter()
            .any(|(_, l)| l.contains("containerd.io/uncompressed=sha256:")
                && l.contains("containerd.io/distribution.source.127.0.0.1=fixtures/busybox")),
        "{ours:?}"
    );
    // Unpacked: the same committed chain as ctr's pull.
    let ours = committed(&d, &ns);
    assert!(!ours.is_empty());
    assert_eq!(ours, committed(&d, "reference"));
    // No lease left behind.
    let leases = d.ctr_ok(&["-n", &ns, "leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");

    // A second pull finds everything.
    let again = pull_like_ctr2(&ch, &ns, &reference).await;
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
            &ns,
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
    let content_before = d.ctr_ok(&["-n", &ns, "content", "ls", "-q"]);
    d.ctr_ok(&["-n", "reference", "images", "rm", "--sync", &reference]);
    assert_eq!(
        d.ctr_ok(&["-n", &ns, "content", "ls", "-q"]),
        content_before
    );
    assert_eq!(committed(&d, &ns), ours);
    assert!(committed(&d, "reference").is_empty(), "the collection ran");

    // Usable by ctr run.
    if berth_testkit::have("runc") {
        let out = d.ctr_ok(&[
            "-n",
            &ns,
            "run",
            "--rm",
            &reference,
            "transfer-run",
            "echo",
            "hello",
        ]);
        assert_eq!(out, "hello\n");
    }
    berth_testkit::remove_namespace_leftovers(&ns);
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
    // A pair no transferrer handles (registry → registry, in containerd too):
    // containerd's Unimplemented and message.
    let a_registry = any::pack(&tt::OciRegistry {
        reference: "127.0.0.1:1/x:1".into(),
        resolver: None,
    });
    let e = call(Some(a_registry.clone()), Some(a_registry), "").await;
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(
        e.message(),
        "method Transfer not implemented for containerd.types.transfer.OCIRegistry to containerd.types.transfer.OCIRegistry"
    );
    // Tagging an image that does not exist.
    let e = call(Some(any::pack(&store)), Some(any::pack(&store)), "").await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
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
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    let digest = reg.push_oci_archive(&fixtures.join("busybox.oci.tar"), "lying/busybox:1");
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

/// Which way of a [`tcp_proxy`] connection it watches.
#[derive(Clone, Copy)]
enum Watched {
    /// Client → upstream.
    Requests,
    /// Upstream → client.
    Answers,
}

/// A TCP proxy in front of `upstream`. Each chunk (up to 16 KiB) going the `watched`
/// way is appended to `record` if given and waits `delay` before it is passed on; the
/// other way is copied as it comes.
async fn tcp_proxy(
    upstream: String,
    watched: Watched,
    delay: Duration,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let ((mut from, mut to), (mut other_from, mut other_to)) = match watched {
                    Watched::Requests => ((client_read, server_write), (server_read, client_write)),
                    Watched::Answers => ((server_read, client_write), (client_read, server_write)),
                };
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut other_from, &mut other_to).await;
                });
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match from.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(r) = &record {
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy that sends the registry's answers slowly (16 KiB per 100 ms), so a pull is
/// still downloading when the client goes away.
async fn slow_proxy(upstream: String) -> String {
    tcp_proxy(upstream, Watched::Answers, Duration::from_millis(100), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_going_away_cancels_the_pull() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start();
    reg.push_oci_archive(&fixtures.join("busybox.oci.tar"), "slow/busybox:1");
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
    import_with(ch, ns, archive, destination, false).await
}

/// An import of `archive` into `destination` shaped like 2.x's ctr.
async fn import_with(
    ch: &Channel,
    ns: &str,
    archive: &Path,
    destination: tt::ImageStore,
    force_compress: bool,
) -> (Result<(), tonic::Status>, Vec<tt::Progress>) {
    let progress_id = format!("progress-{}", uuid::Uuid::new_v4());
    let (_ptx, mut progress) = open_stream(ch, ns, &progress_id).await;
    let (import_id, _sender) = send_archive(ch, ns, archive).await;
    let collected = tokio::spawn(async move {
        let mut out = vec![];
        while let Ok(Some(m)) = progress.message().await {
            out.push(any::unpack::<tt::Progress>(&m).unwrap());
        }
        out
    });
    let source = tt::ImageImportStream {
        stream: import_id,
        force_compress,
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
    // A namespace of this test's own: the containers it runs leave runtime state and
    // cgroup parents named after it, removed at the end (other tests run at the same time).
    let ns = format!("tr-import-{}", std::process::id());
    let fixtures = berth_testkit::fixtures();
    let archive = fixtures.join("busybox.oci.tar");
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;
    let (result, progress) = import_like_ctr2(&ch, &ns, &archive).await;
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
    assert_eq!(images(&d, &ns), [(name.clone(), digest.clone())]);
    d.ctr_ok(&["namespaces", "create", "reference"]);
    d.ctr_ok(&[
        "-n",
        "reference",
        "images",
        "import",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(images(&d, "reference"), images(&d, &ns));
    let ours = committed(&d, &ns);
    assert!(!ours.is_empty());
    assert_eq!(ours, committed(&d, "reference"));
    let leases = d.ctr_ok(&["-n", &ns, "leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
    if berth_testkit::have("runc") {
        let out = d.ctr_ok(&[
            "-n",
            &ns,
            "run",
            "--rm",
            &name,
            "import-run",
            "echo",
            "imported",
        ]);
        assert_eq!(out, "imported\n");
    }

    // Export it again (2.x's `ctr image export`: the client grants windows, the server
    // sends Data): an OCI archive with Docker's manifest.json that ctr 1.6 imports with
    // the same digest.
    let exported = export_like_ctr2(&ch, &ns, &name).await;
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
    let e = export_result(&ch, &ns, "example.com/missing:1")
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
    berth_testkit::remove_namespace_leftovers(&ns);
}

/// `ctr image export` of containerd 2.x over the wire (its `ReceiveStream`: 64 KiB window
/// updates, `Data` messages until the server closes the stream); returns the archive.
async fn export_run(ch: &Channel, ns: &str, name: &str) -> (Result<(), tonic::Status>, Vec<u8>) {
    let destination = tt::ImageExportStream {
        platforms: vec![Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    export_with(ch, ns, name, destination).await
}

/// An export of image `name` to `destination` (its stream ID filled in here).
async fn export_with(
    ch: &Channel,
    ns: &str,
    name: &str,
    mut destination: tt::ImageExportStream,
) -> (Result<(), tonic::Status>, Vec<u8>) {
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
    destination.stream = id;
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

/// Blob digests of namespace `ns` (`ctr content ls -q`).
fn content(d: &Daemon, ns: &str) -> Vec<String> {
    d.ctr_ok(&["-n", ns, "content", "ls", "-q"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// The labels column of image `name` in `ctr images ls` (`k=v,k=v`).
fn image_labels(d: &Daemon, ns: &str, name: &str) -> String {
    d.ctr_ok(&["-n", ns, "images", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last().map(str::to_string))
        .unwrap_or_else(|| panic!("no image {name} in {ns}"))
}

/// A blob of namespace `ns`, parsed as JSON.
fn blob_json(d: &Daemon, ns: &str, digest: &str) -> serde_json::Value {
    serde_json::from_str(&d.ctr_ok(&["-n", ns, "content", "get", digest])).unwrap()
}

/// Runs a synchronous collection (a `--sync` removal of a temporary tag of `image`).
fn collect_garbage(d: &Daemon, ns: &str, image: &str) {
    d.ctr_ok(&["-n", ns, "images", "tag", image, "gc.local/trigger:1"]);
    d.ctr_ok(&["-n", ns, "images", "rm", "--sync", "gc.local/trigger:1"]);
}

/// The entries of a tar archive, and one entry's bytes.
fn tar_list(file: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tf").arg(file).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn tar_get(file: &Path, entry: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(file)
        .arg(entry)
        .output()
        .unwrap();
    assert!(out.status.success(), "{entry} not in {}", file.display());
    out.stdout
}

fn amd64() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        ..Default::default()
    }
}

fn arm64() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archive_import_matches_ctr_import_and_runs() {
    // A namespace of this test's own: the containers it runs leave runtime state and
    // cgroup parents named after it, removed at the end (other tests run at the same time).
    let ns = format!("tr-docker-{}", std::process::id());
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let d = Daemon::start();
    // `docker save` format (manifest.json, repositories, uncompressed layers, legacy
    // layer directories with symlinks), two tags, one of them short.
    let archive = d.dir.path().join("busybox.docker.tar");
    berth_testkit::registry::docker_archive(
        &fixtures.join("busybox.oci.tar"),
        &archive,
        &["import.local/busybox:latest", "busybox:1"],
    );
    let listing = tar_list(&archive);
    assert!(listing.iter().any(|e| e == "manifest.json"), "{listing:?}");
    assert!(!listing.iter().any(|e| e == "index.json"), "{listing:?}");
    let ch = channel(d.socket.clone()).await;
    let (result, progress) = import_like_ctr2(&ch, &ns, &archive).await;
    assert!(
        result.is_ok(),
        "{result:?}\n{}",
        berth_testkit::tail(&d.log(), 30)
    );
    let events: Vec<(&str, &str)> = progress
        .iter()
        .map(|p| (p.event.as_str(), p.name.as_str()))
        .collect();
    assert!(events.iter().any(|(e, _)| *e == "extracted"), "{events:?}");
    assert!(
        events.contains(&("saved", "docker.io/library/busybox:1")),
        "{events:?}"
    );
    assert!(
        events.contains(&("saved", "import.local/busybox:latest")),
        "{events:?}"
    );

    // ctr 1.6 imports Docker archives client-side with containerd's own importer: the
    // same names, the same manifest digest (a Docker schema 2 manifest made byte for byte
    // as containerd makes it), the same snapshots.
    d.ctr_ok(&["namespaces", "create", "reference"]);
    d.ctr_ok(&[
        "-n",
        "reference",
        "images",
        "import",
        archive.to_str().unwrap(),
    ]);
    let ours = images(&d, &ns);
    assert_eq!(ours.len(), 2, "{ours:?}");
    assert_eq!(ours, images(&d, "reference"));
    assert_eq!(ours[0].0, "docker.io/library/busybox:1");
    assert_eq!(ours[1].0, "import.local/busybox:latest");
    assert_eq!(ours[0].1, ours[1].1);
    let manifest = blob_json(&d, &ns, &ours[0].1);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar"
    );
    let snapshots = committed(&d, &ns);
    assert!(!snapshots.is_empty());
    assert_eq!(snapshots, committed(&d, "reference"));
    let leases = d.ctr_ok(&["-n", &ns, "leases", "ls"]);
    assert_eq!(leases.lines().count(), 1, "{leases}");
    // Only what the images refer to survives a collection (the legacy layer directories'
    // `json` and `VERSION` files, `repositories`, the unnamed index were stored under the
    // lease only).
    collect_garbage(&d, &ns, "import.local/busybox:latest");
    let mut kept = vec![
        ours[0].1.clone(),
        manifest["config"]["digest"].as_str().unwrap().to_string(),
    ];
    for l in manifest["layers"].as_array().unwrap() {
        kept.push(l["digest"].as_str().unwrap().to_string());
    }
    kept.sort();
    assert_eq!(content(&d, &ns), kept);
    if berth_testkit::have("runc") {
        let out = d.ctr_ok(&[
            "-n",
            &ns,
            "run",
            "--rm",
            "docker.io/library/busybox:1",
            "docker-run",
            "echo",
            "from docker",
        ]);
        assert_eq!(out, "from docker\n");
    }

    // An untagged image whose layer is named through a legacy layer directory's symlink
    // (`<id>/layer.tar -> ../<digest>.tar`, as older `docker save` writes): the same
    // manifest, listed without a name, so only a digest reference names it.
    let unpacked = d.dir.path().join("unpacked-docker");
    std::fs::create_dir_all(&unpacked).unwrap();
    assert!(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap()
            .success()
    );
    let link = tar_list(&archive)
        .into_iter()
        .find(|e| e.ends_with("/layer.tar"))
        .expect("a legacy layer directory");
    let mut mj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("manifest.json")).unwrap()).unwrap();
    mj[0]["Layers"] = serde_json::json!([link]);
    mj[0]["RepoTags"] = serde_json::Value::Null;
    std::fs::write(
        unpacked.join("manifest.json"),
        serde_json::to_vec(&mj).unwrap(),
    )
    .unwrap();
    let legacy = d.dir.path().join("legacy.docker.tar");
    assert!(
        Command::new("tar")
            .arg("-cf")
            .arg(&legacy)
            .arg("-C")
            .arg(&unpacked)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    d.ctr_ok(&["namespaces", "create", "legacy"]);
    let digests = tt::ImageStore {
        extra_references: vec![tt::ImageReference {
            name: "import-2026-11-27".into(),
            is_prefix: true,
            allow_overwrite: true,
            add_digest: true,
            skip_named_digest: true,
        }],
        ..Default::default()
    };
    let (r, _) = import_with(&ch, "legacy", &legacy, digests, false).await;
    r.expect("legacy import");
    // The digest prefix names the manifest and (containerd's non-annotation branch) the
    // index made for the archive.
    let legacy_images = images(&d, "legacy");
    assert_eq!(legacy_images.len(), 2, "{legacy_images:?}");
    assert!(legacy_images.contains(&(
        format!("import-2026-11-27@{}", ours[0].1),
        ours[0].1.clone()
    )));
    let (_, made) = legacy_images.iter().find(|(_, t)| *t != ours[0].1).unwrap();
    let made = blob_json(&d, "legacy", made);
    assert_eq!(made["manifests"][0]["digest"], ours[0].1.as_str());
    assert!(made["manifests"][0].get("annotations").is_none(), "{made}");

    // --compress-blobs: the uncompressed layer is gzipped and remembered; a later plain
    // import of the same archive reuses the compressed layer (containerd's
    // `containerd.io/uncompressed` lookup), so both give the same manifest.
    d.ctr_ok(&["namespaces", "create", "gz"]);
    let store = |name: &str| tt::ImageStore {
        name: name.into(),
        ..Default::default()
    };
    let (r, _) = import_with(&ch, "gz", &archive, store("gz.local/compressed:1"), true).await;
    r.expect("import with force_compress");
    let compressed = images(&d, "gz");
    let index = blob_json(&d, "gz", &compressed[0].1);
    let m = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cm = blob_json(&d, "gz", &m);
    assert_eq!(
        cm["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(cm["config"], manifest["config"]);
    assert_ne!(cm["layers"][0]["digest"], manifest["layers"][0]["digest"]);
    let info = d.ctr_ok(&["-n", "gz", "content", "ls"]);
    let uncompressed = format!(
        "containerd.io/uncompressed={}",
        manifest["layers"][0]["digest"].as_str().unwrap()
    );
    assert!(info.contains(&uncompressed), "{info}");
    let (r, _) = import_with(&ch, "gz", &archive, store("gz.local/plain:1"), false).await;
    r.expect("plain import");
    let both = images(&d, "gz");
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[0].1, both[1].1, "the compressed layer was reused");

    // Not an image archive: refused, nothing kept.
    let junk = d.dir.path().join("junk.tar");
    std::fs::write(d.dir.path().join("hello.txt"), "hello").unwrap();
    assert!(
        Command::new("tar")
            .arg("-cf")
            .arg(&junk)
            .arg("-C")
            .arg(d.dir.path())
            .arg("hello.txt")
            .status()
            .unwrap()
            .success()
    );
    d.ctr_ok(&["namespaces", "create", "junk"]);
    let (r, _) = import_like_ctr2(&ch, "junk", &junk).await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("unrecognized image format"), "{e:?}");
    assert!(images(&d, "junk").is_empty());
    berth_testkit::remove_namespace_leftovers(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_names_images_as_containerds_image_store() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let d = Daemon::start_with_config(berth_testkit::NO_STARTUP_GC);
    let archive = d.dir.path().join("busybox.docker.tar");
    // Its index lists the manifest twice: import.local/busybox:latest (ref name
    // `latest`) and docker.io/library/busybox:1 (ref name `1`).
    berth_testkit::registry::docker_archive(
        &fixtures.join("busybox.oci.tar"),
        &archive,
        &["import.local/busybox:latest", "busybox:1"],
    );
    let ch = channel(d.socket.clone()).await;
    let reference =
        |name: &str, prefix: bool, overwrite: bool, digest: bool, skip: bool| tt::ImageReference {
            name: name.into(),
            is_prefix: prefix,
            allow_overwrite: overwrite,
            add_digest: digest,
            skip_named_digest: skip,
        };
    let destination = tt::ImageStore {
        name: "idx.local/all:1".into(),
        labels: [("team".to_string(), "berth".to_string())].into(),
        extra_references: vec![
            // Plain: names the index.
            reference("plain.local/copy:1", false, false, false, false),
            // A prefix without overwrite: only names under it.
            reference("import.local/busybox", true, false, false, false),
            // A digest prefix: its name for the index; for each manifest the name its
            // annotations give under the prefix (none here) or else the digest.
            reference("digests.local/d", true, false, true, false),
            // A prefix that names everything it sees, with the digest only when no
            // name was found (skip_named_digest).
            reference("over.local/x", true, true, true, true),
        ],
        ..Default::default()
    };
    let (r, progress) = import_with(&ch, "default", &archive, destination, false).await;
    r.expect("import");
    let listed = images(&d, "default");
    let digest_of = |name: &str| {
        listed
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no {name}: {listed:?}"))
    };
    let index = digest_of("idx.local/all:1");
    let manifest = digest_of("import.local/busybox:latest");
    assert_ne!(index, manifest);
    let mut want = vec![
        ("idx.local/all:1".to_string(), index.clone()),
        ("plain.local/copy:1".to_string(), index.clone()),
        (format!("digests.local/d@{index}"), index.clone()),
        (format!("over.local/x@{index}"), index.clone()),
        ("import.local/busybox:latest".to_string(), manifest.clone()),
        (format!("digests.local/d@{manifest}"), manifest.clone()),
        ("docker.io/library/busybox:1".to_string(), manifest.clone()),
    ];
    want.sort();
    assert_eq!(listed, want);
    // Every record was reported as saved.
    let mut saved: Vec<String> = progress
        .iter()
        .filter(|p| p.event == "saved")
        .map(|p| p.name.clone())
        .collect();
    saved.sort();
    saved.dedup();
    let mut names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(saved, names);
    // The store's own record carries its labels; the others point back at it and
    // expire at once (containerd's extra-reference labels).
    assert_eq!(image_labels(&d, "default", "idx.local/all:1"), "team=berth");
    for name in ["plain.local/copy:1", "import.local/busybox:latest"] {
        let labels = image_labels(&d, "default", name);
        assert!(labels.contains("team=berth"), "{name}: {labels}");
        assert!(
            labels.contains("containerd.io/gc.bref.image=idx.local/all:1"),
            "{name}: {labels}"
        );
        assert!(
            labels.contains("containerd.io/gc.expire="),
            "{name}: {labels}"
        );
    }
    // The manifest records keep the annotations the index gave their entry.
    let ls = d.ctr_ok(&["-n", "default", "images", "ls"]);
    assert!(
        ls.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{ls}"
    );

    // Importing again replaces the records (same names, same targets).
    let again = tt::ImageStore {
        name: "idx.local/all:1".into(),
        labels: [("team".to_string(), "other".to_string())].into(),
        ..Default::default()
    };
    let (r, _) = import_with(&ch, "default", &archive, again, false).await;
    r.expect("second import");
    assert_eq!(image_labels(&d, "default", "idx.local/all:1"), "team=other");
    assert_eq!(images(&d, "default"), want);

    // An archive nothing names: the import succeeds and records nothing.
    d.ctr_ok(&["namespaces", "create", "unnamed"]);
    let (r, _) = import_with(
        &ch,
        "unnamed",
        &archive,
        tt::ImageStore {
            extra_references: vec![reference("other.local/base", true, false, false, false)],
            ..Default::default()
        },
        false,
    )
    .await;
    r.expect("import naming nothing");
    assert!(images(&d, "unnamed").is_empty());
}

/// An image store pulling `reference` with these filters, unpacking linux/amd64.
fn filtered_store(
    name: &str,
    platforms: Vec<Platform>,
    all_metadata: bool,
    manifest_limit: u32,
) -> tt::ImageStore {
    tt::ImageStore {
        name: name.into(),
        platforms,
        all_metadata,
        manifest_limit,
        unpacks: vec![tt::UnpackConfiguration {
            platform: Some(amd64()),
            snapshotter: "overlayfs".into(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_filters_decide_what_is_pulled_kept_and_unpacked() {
    if registry_tools_missing() {
        return;
    }
    let multi = berth_testkit::registry::multi_platform();
    let reg = Registry::start();
    let index = reg.push_oci_archive(&multi.archive, "multi/app:1");
    let reference = format!("{}/multi/app:1", reg.host());
    let d = Daemon::start_with_config(berth_testkit::NO_STARTUP_GC);
    let ch = channel(d.socket.clone()).await;
    let (amd_m, amd_c, amd_l) = multi.amd64.clone();
    let (arm_m, arm_c, arm_l) = multi.arm64.clone();
    let has = |ns: &str, digests: &[&String]| {
        let c = content(&d, ns);
        digests.iter().map(|x| c.contains(x)).collect::<Vec<bool>>()
    };
    let pull = |ns: &'static str, store: tt::ImageStore| {
        let ch = ch.clone();
        let d = &d;
        let reference = reference.clone();
        async move {
            if ns != "default" {
                d.ctr_ok(&["namespaces", "create", ns]);
            }
            pull_with(&ch, ns, &reference, store, "", &Answers::new()).await
        }
    };

    // platforms=[amd64]: the index and amd64's tree only; amd64 unpacked.
    let p = pull(
        "default",
        filtered_store(&reference, vec![amd64()], false, 0),
    )
    .await;
    assert!(
        p.result.is_ok(),
        "{:?}\n{}",
        p.result,
        berth_testkit::tail(&d.log(), 30)
    );
    assert_eq!(images(&d, "default"), [(reference.clone(), index.clone())]);
    assert_eq!(
        has(
            "default",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true, true, true, true, false, false, false]
    );
    assert_eq!(committed(&d, "default").len(), 1);
    // Every blob's progress names its own manifest as parent.
    for ev in p.progress.iter().filter(|e| e.name.starts_with("layer-")) {
        assert_eq!(ev.parents, [format!("manifest-{amd_m}")], "{ev:?}");
    }

    // all_metadata: arm64's manifest and config too, not its layer.
    let p = pull("meta", filtered_store(&reference, vec![amd64()], true, 0)).await;
    assert!(p.result.is_ok(), "{:?}", p.result);
    assert_eq!(
        has(
            "meta",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true, true, true, true, true, true, false]
    );
    let configs: Vec<&tt::Progress> = p
        .progress
        .iter()
        .filter(|e| e.name == format!("config-{arm_c}"))
        .collect();
    assert!(!configs.is_empty());
    assert!(
        configs
            .iter()
            .all(|e| e.parents == [format!("manifest-{arm_m}")])
    );

    // No platforms: every platform whole; an unpack for linux/amd64 unpacks both images
    // (containerd matches an image against the supported platform by OS only, unless
    // check_platform_supported).
    let p = pull("all", filtered_store(&reference, vec![], false, 0)).await;
    assert!(p.result.is_ok(), "{:?}", p.result);
    assert_eq!(
        has(
            "all",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true; 7]
    );
    assert_eq!(committed(&d, "all").len(), 2);
    let arm_layer_events: Vec<&tt::Progress> = p
        .progress
        .iter()
        .filter(|e| e.name == format!("layer-{}", arm_l[0]))
        .collect();
    assert!(arm_layer_events.iter().any(|e| e.event == "extracted"));
    assert!(
        arm_layer_events
            .iter()
            .all(|e| e.parents == [format!("manifest-{arm_m}")])
    );

    // A manifest limit keeps the preferred platform (the order of `platforms`).
    let p = pull(
        "limit",
        filtered_store(&reference, vec![arm64(), amd64()], false, 1),
    )
    .await;
    assert!(p.result.is_ok(), "{:?}", p.result);
    assert_eq!(
        has(
            "limit",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true, false, false, false, true, true, true]
    );

    // No manifest for the platforms: NotFound, no record.
    let s390x = Platform {
        os: "linux".into(),
        architecture: "s390x".into(),
        ..Default::default()
    };
    let p = pull(
        "none",
        filtered_store(&reference, vec![s390x.clone()], false, 0),
    )
    .await;
    let e = p.result.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(images(&d, "none").is_empty());

    // Import applies the same filter: with platforms=[amd64], arm64's config and layer
    // were stored under the lease only and go with the next collection (its manifest is
    // kept: the index refers to it).
    d.ctr_ok(&["namespaces", "create", "imported"]);
    let store = |platforms: Vec<Platform>, all_metadata: bool| tt::ImageStore {
        extra_references: vec![tt::ImageReference {
            name: "import-2026-11-27".into(),
            is_prefix: true,
            allow_overwrite: true,
            ..Default::default()
        }],
        platforms,
        all_metadata,
        unpacks: vec![tt::UnpackConfiguration {
            platform: Some(amd64()),
            snapshotter: "overlayfs".into(),
        }],
        ..Default::default()
    };
    let (r, _) = import_with(
        &ch,
        "imported",
        &multi.archive,
        store(vec![amd64()], false),
        false,
    )
    .await;
    r.expect("import amd64");
    let name = "import.local/multi:latest";
    assert_eq!(images(&d, "imported"), [(name.to_string(), index.clone())]);
    assert_eq!(committed(&d, "imported").len(), 1);
    collect_garbage(&d, "imported", name);
    assert_eq!(
        has(
            "imported",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true, true, true, true, true, false, false]
    );
    // all_metadata: everything the other manifest refers to is kept, nothing unpacked
    // for it.
    d.ctr_ok(&["namespaces", "create", "imported-meta"]);
    let (r, _) = import_with(
        &ch,
        "imported-meta",
        &multi.archive,
        store(vec![amd64()], true),
        false,
    )
    .await;
    r.expect("import with all_metadata");
    collect_garbage(&d, "imported-meta", name);
    assert_eq!(
        has(
            "imported-meta",
            &[&index, &amd_m, &amd_c, &amd_l[0], &arm_m, &arm_c, &arm_l[0]]
        ),
        [true; 7]
    );
    assert_eq!(committed(&d, "imported-meta").len(), 1);

    // Export of the two-platform image (all content present in "all").
    let export = |platforms: Vec<Platform>, all: bool, skip: bool| {
        let ch = ch.clone();
        let reference = reference.clone();
        let dir = d.dir.path().to_path_buf();
        async move {
            let (r, data) = export_with(
                &ch,
                "all",
                &reference,
                tt::ImageExportStream {
                    platforms,
                    all_platforms: all,
                    skip_compatibility_manifest: skip,
                    ..Default::default()
                },
            )
            .await;
            let file = dir.join(format!("export-{}.tar", uuid::Uuid::new_v4()));
            std::fs::write(&file, data).unwrap();
            (r, file)
        }
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", &digest[7..]);
    // Default (this machine's platform): the index and amd64's tree; manifest.json names
    // amd64's config and layers; entries sorted as containerd writes them.
    let (r, file) = export(vec![], false, false).await;
    r.expect("export");
    let entries = tar_list(&file);
    let mut want = vec![
        "blobs/".to_string(),
        "blobs/sha256/".to_string(),
        blob(&index),
        blob(&amd_m),
        blob(&amd_c),
        blob(&amd_l[0]),
    ];
    want[2..].sort();
    want.extend(["index.json", "manifest.json", "oci-layout"].map(String::from));
    assert_eq!(entries, want);
    let docker: serde_json::Value =
        serde_json::from_slice(&tar_get(&file, "manifest.json")).unwrap();
    assert_eq!(docker[0]["Config"], blob(&amd_c));
    assert_eq!(docker[0]["Layers"][0], blob(&amd_l[0]));
    assert_eq!(docker[0]["RepoTags"][0], reference);
    let idx: serde_json::Value = serde_json::from_slice(&tar_get(&file, "index.json")).unwrap();
    let entry = &idx["manifests"][0];
    assert_eq!(entry["digest"], index.as_str());
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        reference.as_str()
    );
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "1"
    );
    assert_eq!(
        entry["annotations"]["containerd.io/distribution.source.127.0.0.1"],
        "multi/app"
    );
    // ctr 1.6 imports it.
    d.ctr_ok(&["namespaces", "create", "reimported"]);
    d.ctr_ok(&[
        "-n",
        "reimported",
        "images",
        "import",
        file.to_str().unwrap(),
    ]);
    assert_eq!(
        images(&d, "reimported"),
        [(reference.clone(), index.clone())]
    );

    // all_platforms: arm64's tree too; manifest.json still the best match only.
    let (r, file) = export(vec![], true, false).await;
    r.expect("export all platforms");
    let entries = tar_list(&file);
    for digest in [&arm_m, &arm_c, &arm_l[0]] {
        assert!(entries.contains(&blob(digest)), "{entries:?}");
    }
    let docker: serde_json::Value =
        serde_json::from_slice(&tar_get(&file, "manifest.json")).unwrap();
    assert_eq!(docker.as_array().unwrap().len(), 1);
    assert_eq!(docker[0]["Config"], blob(&amd_c));
    // platforms=[arm64], no compatibility manifest.
    let (r, file) = export(vec![arm64()], false, true).await;
    r.expect("export arm64");
    let entries = tar_list(&file);
    assert!(entries.contains(&blob(&arm_l[0])), "{entries:?}");
    assert!(!entries.contains(&blob(&amd_l[0])), "{entries:?}");
    assert!(!entries.iter().any(|e| e == "manifest.json"), "{entries:?}");
    // No manifest for the platform: NotFound, with all_platforms too (as containerd).
    let (r, _) = export(vec![s390x.clone()], false, false).await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
    let (r, _) = export(vec![s390x], true, false).await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
}

/// A proxy recording everything clients send through it.
async fn recording_proxy(upstream: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(vec![]));
    let addr = tcp_proxy(
        upstream,
        Watched::Requests,
        Duration::ZERO,
        Some(seen.clone()),
    )
    .await;
    (addr, seen)
}

fn basic(user: &str, password: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_asked_for_the_host_that_challenges() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let archive = fixtures.join("busybox.oci.tar");
    // The upstream and its mirror, each with its own user, each behind a proxy that
    // records what Berth sends it.
    let upstream = Registry::start_with_htpasswd("berth", "s3cret");
    let mirror = Registry::start_with_htpasswd("mirror", "m1rror");
    let digest = upstream.push_oci_archive(&archive, "auth/busybox:1");
    mirror.push_oci_archive(&archive, "auth/busybox:1");
    let (up, up_seen) = recording_proxy(upstream.host()).await;
    let (mi, mi_seen) = recording_proxy(mirror.host()).await;
    let hosts = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hosts.path().join(&up)).unwrap();
    std::fs::write(
        hosts.path().join(&up).join("hosts.toml"),
        format!(
            "server = \"http://{up}\"\n\n[host.\"http://{mi}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let host_dir = hosts.path().to_str().unwrap().to_string();
    let reference = format!("{up}/auth/busybox:1");
    let d = Daemon::start();
    let ch = channel(d.socket.clone()).await;
    let store = || tt::ImageStore {
        name: reference.clone(),
        platforms: vec![amd64()],
        ..Default::default()
    };
    let upstream_auth = basic("berth", "s3cret");
    let mirror_auth = basic("mirror", "m1rror");
    let answers: Answers = [
        (up.clone(), ("berth".to_string(), "s3cret".to_string())),
        (mi.clone(), ("mirror".to_string(), "m1rror".to_string())),
    ]
    .into();

    // The mirror serves everything: only the mirror is asked about, with its name, once.
    let p = pull_with(&ch, "default", &reference, store(), &host_dir, &answers).await;
    assert!(
        p.result.is_ok(),
        "{:?}\n{}",
        p.result,
        berth_testkit::tail(&d.log(), 30)
    );
    let asked: Vec<&str> = p.auth_requests.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(asked, [mi.as_str()]);
    assert_eq!(p.auth_requests[0].reference, reference);
    assert_eq!(images(&d, "default"), [(reference.clone(), digest.clone())]);
    let to_mirror = String::from_utf8_lossy(&mi_seen.lock().unwrap()).to_string();
    assert!(to_mirror.contains(&mirror_auth));
    assert!(!to_mirror.contains(&upstream_auth));
    assert!(
        up_seen.lock().unwrap().is_empty(),
        "the upstream was not needed"
    );

    // The client has no credentials for the mirror: the mirror refuses, the upstream is
    // tried, challenges and is asked about; the upstream's credentials go to the
    // upstream only.
    d.ctr_ok(&["namespaces", "create", "fallback"]);
    mi_seen.lock().unwrap().clear();
    let upstream_only: Answers = [(up.clone(), ("berth".to_string(), "s3cret".to_string()))].into();
    let p = pull_with(
        &ch,
        "fallback",
        &reference,
        store(),
        &host_dir,
        &upstream_only,
    )
    .await;
    assert!(
        p.result.is_ok(),
        "{:?}\n{}",
        p.result,
        berth_testkit::tail(&d.log(), 30)
    );
    let asked: Vec<&str> = p.auth_requests.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(asked, [mi.as_str(), up.as_str()]);
    assert_eq!(
        images(&d, "fallback"),
        [(reference.clone(), digest.clone())]
    );
    let to_mirror = String::from_utf8_lossy(&mi_seen.lock().unwrap()).to_string();
    assert!(!to_mirror.contains("Authorization"), "{to_mirror}");
    let to_upstream = String::from_utf8_lossy(&up_seen.lock().unwrap()).to_string();
    assert!(to_upstream.contains(&upstream_auth));
    assert!(!to_upstream.contains(&mirror_auth));

    // Wrong credentials everywhere: the pull fails as unauthorized, nothing is recorded.
    d.ctr_ok(&["namespaces", "create", "denied"]);
    let wrong: Answers = [
        (up.clone(), ("berth".to_string(), "nope".to_string())),
        (mi.clone(), ("mirror".to_string(), "nope".to_string())),
    ]
    .into();
    let p = pull_with(&ch, "denied", &reference, store(), &host_dir, &wrong).await;
    assert!(p.result.is_err());
    assert!(images(&d, "denied").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_unpack_configuration_decides_what_is_unpacked() {
    if registry_tools_missing() {
        return;
    }
    let multi = berth_testkit::registry::multi_platform();
    let reg = Registry::start();
    reg.push_oci_archive(&multi.archive, "multi/app:1");
    let reference = format!("{}/multi/app:1", reg.host());
    // containerd's keys: only native on linux/amd64, and platforms checked whole.
    let config = format!(
        "{}[plugins.\"io.containerd.transfer.v1.local\"]\n  check_platform_supported = true\n\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"native\"\n",
        berth_testkit::NO_STARTUP_GC
    );
    let d = Daemon::start_with_config(&config);
    let ch = channel(d.socket.clone()).await;
    let committed_in = |ns: &str, snapshotter: &str| {
        d.ctr_ok(&["-n", ns, "snapshots", "--snapshotter", snapshotter, "ls"])
            .lines()
            .filter(|l| l.contains("Committed"))
            .count()
    };
    let store = |snapshotter: &str| tt::ImageStore {
        name: reference.clone(),
        unpacks: vec![tt::UnpackConfiguration {
            platform: Some(amd64()),
            snapshotter: snapshotter.into(),
        }],
        ..Default::default()
    };
    // overlayfs is not offered: the image is pulled, nothing unpacked.
    let p = pull_with(
        &ch,
        "default",
        &reference,
        store("overlayfs"),
        "",
        &Answers::new(),
    )
    .await;
    assert!(
        p.result.is_ok(),
        "{:?}\n{}",
        p.result,
        berth_testkit::tail(&d.log(), 30)
    );
    assert_eq!(committed_in("default", "overlayfs"), 0);
    assert_eq!(committed_in("default", "native"), 0);
    assert!(!p.progress.iter().any(|e| e.event == "extracted"));
    // No snapshotter asked: the offered one; both platforms pulled, only amd64 unpacked
    // (check_platform_supported).
    d.ctr_ok(&["namespaces", "create", "native"]);
    let p = pull_with(&ch, "native", &reference, store(""), "", &Answers::new()).await;
    assert!(p.result.is_ok(), "{:?}", p.result);
    assert_eq!(committed_in("native", "native"), 1);
    assert_eq!(committed_in("native", "overlayfs"), 0);
    let (_, _, arm_layers) = &multi.arm64;
    assert!(content(&d, "native").contains(&arm_layers[0]));
    assert!(
        !p.progress
            .iter()
            .any(|e| e.event == "extracted" && e.name == format!("layer-{}", arm_layers[0]))
    );
}

/// containerd 2.x's `ctr image tag SRC DST` is `Transfer(ImageStore{SRC} →
/// ImageStore{DST})`: a record of the new name with the same target (an existing one is
/// moved), the destination's labels, and the source untouched.
#[tokio::test(flavor = "multi_thread")]
async fn tag_through_transfer_as_ctr2() {
    let fixtures = berth_testkit::fixtures();
    let d = Daemon::start();
    d.ctr_ok(&[
        "images",
        "import",
        "--no-unpack",
        fixtures.join("busybox.oci.tar").to_str().unwrap(),
    ]);
    let source = "import.local/busybox:latest";
    let before = images(&d, "default");
    let target_of = |listing: &[(String, String)], name: &str| {
        listing
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("no {name} in {listing:?}"))
    };
    let digest = target_of(&before, source);
    let client = TransferClient::new(channel(d.socket.clone()).await);
    let tag = |dst: tt::ImageStore| {
        let mut client = client.clone();
        async move {
            client
                .transfer(namespaced(
                    "default",
                    TransferRequest {
                        source: Some(any::pack(&tt::ImageStore {
                            name: source.into(),
                            ..Default::default()
                        })),
                        destination: Some(any::pack(&dst)),
                        options: None,
                    },
                ))
                .await
        }
    };
    tag(tt::ImageStore {
        name: "example.com/tagged:v1".into(),
        labels: [("team".to_string(), "berth".to_string())].into(),
        ..Default::default()
    })
    .await
    .expect("tag");
    let after = images(&d, "default");
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(target_of(&after, "example.com/tagged:v1"), digest);
    assert_eq!(target_of(&after, source), digest);
    let labels = image_labels(&d, "default", "example.com/tagged:v1");
    assert!(labels.contains("team=berth"), "{labels}");
    // Tagging onto an existing name updates it; nothing else changes.
    tag(tt::ImageStore {
        name: "example.com/tagged:v1".into(),
        ..Default::default()
    })
    .await
    .expect("re-tag");
    assert_eq!(images(&d, "default").len(), 2);
    // The stock ctr 1.6 sees the tag as an ordinary image.
    let check = d.ctr_ok(&["images", "check"]);
    assert!(
        check.lines().filter(|l| l.contains("complete")).count() == 2,
        "{check}"
    );
}
