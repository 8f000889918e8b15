//! Content, images, leases and GC through the stock `ctr` and the gRPC API against a
//! private `berthd` (issue 3). Needs root and `ctr` (Debian's containerd 1.6, installed by
//! `scripts/install-deps`); `berthd` and the fixture images come from `berth-testkit`.

use berth_api::services::content::v1 as api;
use berth_api::services::content::v1::content_client::ContentClient;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Unreferenced content is garbage: tests that keep some around for a while start the
/// daemon without the start-up collection (deletions still trigger collections).
const NO_STARTUP_GC: &str =
    "[plugins.\"io.containerd.gc.v1.scheduler\"]\n  startup_delay = \"0s\"\n";

struct Daemon {
    dir: PathBuf,
    bin: PathBuf,
    extra: String,
    child: Option<Child>,
}

impl Daemon {
    fn start(bin: &Path, extra: &str) -> Daemon {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/tmp/bct-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Daemon {
            dir,
            bin: bin.to_path_buf(),
            extra: extra.to_string(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let d = self.dir.display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/b.sock\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n{}\n",
            self.extra
        );
        std::fs::write(self.dir.join("config.toml"), config).unwrap();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("berthd.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "berthd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("b.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("berthd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn ctr_in(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}\n--- log ---\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn digests(&self, ns: &str) -> Vec<String> {
        self.ok(&["-n", ns, "content", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn blobs_on_disk(&self) -> usize {
        std::fs::read_dir(
            self.dir
                .join("root/io.containerd.content.v1.content/blobs/sha256"),
        )
        .map(|d| d.count())
        .unwrap_or(0)
    }

    async fn client(&self) -> ContentClient<tonic::transport::Channel> {
        let path = self.socket();
        let channel = berth_services::proxy::unix_channel(&path.to_string_lossy())
            .expect("a channel to berthd's socket");
        ContentClient::new(channel)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn ctr_content_ingest_ls_get_label_rm_active() {
    let bin = berth_testkit::berthd_binary();
    let d = Daemon::start(&bin, NO_STARTUP_GC);
    let data = random(3 << 20, 1);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let o = d.ctr_in(&["content", "ingest", "ref/../one"], &data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.digests("default"), vec![digest.clone()]);
    let o = d.ctr(&["content", "get", &digest]);
    assert_eq!(o.stdout, data);
    d.ok(&["content", "label", &digest, "a=b"]);
    assert!(d.ok(&["content", "ls"]).contains("a=b"));
    assert!(d.ok(&["content", "ls", "labels.a==b"]).contains(&digest));
    assert!(d.ok(&["content", "active"]).lines().count() <= 1);
    // Wrong digest / size: FailedPrecondition, nothing stored.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = d.ctr_in(
        &["content", "ingest", "--expected-digest", &wrong, "bad"],
        b"xyz",
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("failed precondition"),
        "{o:?}"
    );
    let o = d.ctr_in(
        &["content", "ingest", "--expected-size", "5", "bad2"],
        b"xyz",
    );
    assert!(!o.status.success());
    assert_eq!(d.digests("default").len(), 1);
    // Invalid digests are InvalidArgument.
    let o = d.ctr(&["content", "get", "sha256:nothex"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument")
            || String::from_utf8_lossy(&o.stderr).contains("invalid"),
        "{o:?}"
    );
    // Other namespaces do not see it; rm removes the record and GC the blob.
    assert!(d.digests("other").is_empty());
    d.ok(&["content", "rm", &digest]);
    assert!(d.digests("default").is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.blobs_on_disk() > 0 {
        assert!(Instant::now() < deadline, "blob not collected");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctr_images_import_ls_label_export_rm_and_gc() {
    let bin = berth_testkit::berthd_binary();
    let images = berth_testkit::fixtures();
    let d = Daemon::start(&bin, "");
    let busybox = images.join("busybox.oci.tar");
    d.ok(&["images", "import", "--no-unpack", busybox.to_str().unwrap()]);
    d.ok(&[
        "images",
        "import",
        "--no-unpack",
        images.join("layers.oci.tar").to_str().unwrap(),
    ]);
    let names = d.ok(&["images", "ls", "-q"]);
    assert!(names.contains("import.local/busybox:latest"), "{names}");
    assert!(names.contains("import.local/layers:latest"), "{names}");
    let check = d.ctr(&["images", "check"]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("complete"),
        "{check:?}"
    );
    d.ok(&["images", "label", "import.local/busybox:latest", "x=y"]);
    assert!(d.ok(&["images", "ls", "labels.x==y"]).contains("busybox"));
    // Export, import into another namespace, export again: byte-identical.
    let e1 = d.dir.join("e1.tar");
    let e2 = d.dir.join("e2.tar");
    d.ok(&[
        "images",
        "export",
        e1.to_str().unwrap(),
        "import.local/busybox:latest",
    ]);
    d.ok(&[
        "-n",
        "second",
        "images",
        "import",
        "--no-unpack",
        e1.to_str().unwrap(),
    ]);
    d.ok(&[
        "-n",
        "second",
        "images",
        "export",
        e2.to_str().unwrap(),
        "import.local/busybox:latest",
    ]);
    assert_eq!(std::fs::read(&e1).unwrap(), std::fs::read(&e2).unwrap());
    // Every blob reads back with its digest.
    for digest in d.digests("default") {
        let data = d.ctr(&["content", "get", &digest]).stdout;
        assert_eq!(format!("sha256:{}", sha256_hex(&data)), digest);
    }
    // rm --sync waits for the GC: only layers' blobs remain (shared blobs stay while
    // namespace "second" references them).
    let before = d.blobs_on_disk();
    d.ok(&["images", "rm", "--sync", "import.local/layers:latest"]);
    assert!(d.blobs_on_disk() < before);
    d.ok(&[
        "-n",
        "second",
        "images",
        "rm",
        "--sync",
        "import.local/busybox:latest",
    ]);
    d.ok(&["images", "rm", "--sync", "import.local/busybox:latest"]);
    assert_eq!(d.blobs_on_disk(), 0, "{}", d.ok(&["content", "ls"]));
}

#[test]
fn ctr_leases_and_prune() {
    let bin = berth_testkit::berthd_binary();
    // Unreferenced content is collected by the next collection, which the start-up delay
    // or any deletion schedules (as in containerd): the pruning part runs first, on a
    // daemon without the start-up collection, so nothing collects `y` before its label.
    let d = Daemon::start(&bin, NO_STARTUP_GC);
    // prune references: unreferenced content goes, rooted content stays.
    d.ctr_in(&["content", "ingest", "x"], b"prunable");
    d.ctr_in(&["content", "ingest", "y"], b"rooted");
    let rooted = format!("sha256:{}", sha256_hex(b"rooted"));
    d.ok(&["content", "label", &rooted, "containerd.io/gc.root=now"]);
    d.ok(&["content", "prune", "references"]);
    let left = d.digests("default");
    assert!(left.contains(&rooted), "{left:?}");

    d.ok(&["leases", "create", "--id", "l1", "a=b"]);
    let ls = d.ok(&["leases", "ls"]);
    assert!(
        ls.contains("l1") && ls.contains("a=b") && ls.contains("containerd.io/gc.expire"),
        "{ls}"
    );
    let o = d.ctr(&["leases", "create", "--id", "l1"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lease \"l1\": already exists"),
        "{o:?}"
    );
    d.ok(&["leases", "rm", "l1"]);
    assert!(!d.ok(&["leases", "ls"]).contains("l1"));
    let o = d.ctr(&["leases", "rm", "l1"]);
    assert!(!o.status.success());
}

async fn write_msg(
    action: api::WriteAction,
    r#ref: &str,
    offset: i64,
    data: Vec<u8>,
    total: i64,
    expected: &str,
) -> api::WriteContentRequest {
    api::WriteContentRequest {
        action: action as i32,
        r#ref: r#ref.into(),
        total,
        expected: expected.into(),
        offset,
        data: data.into(),
        labels: Default::default(),
    }
}

fn with_ns<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "default".parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumable_ingest_across_restart_and_locked_refs() {
    let bin = berth_testkit::berthd_binary();
    let mut d = Daemon::start(&bin, NO_STARTUP_GC);
    let data = random(1 << 20, 7);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let total = data.len() as i64;
    {
        let mut c = d.client().await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(
            write_msg(
                api::WriteAction::Write,
                "resume",
                0,
                data[..400_000].to_vec(),
                total,
                "",
            )
            .await,
        )
        .await
        .unwrap();
        let mut resp = c
            .write(with_ns(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let r = resp.message().await.unwrap().unwrap();
        assert_eq!(r.offset, 400_000);
        // A second writer of the same ref while this one is open: Unavailable.
        let mut c2 = d.client().await;
        let (tx2, rx2) = tokio::sync::mpsc::channel(4);
        tx2.send(write_msg(api::WriteAction::Stat, "resume", 0, vec![], 0, "").await)
            .await
            .unwrap();
        let err = c2
            .write(with_ns(tokio_stream::wrappers::ReceiverStream::new(rx2)))
            .await
            .expect_err("second writer must fail");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("locked"), "{err:?}");
        drop(tx);
    }
    // Daemon dies (kill -9) and comes back: the ingest resumes at its offset.
    d.restart();
    let mut c = d.client().await;
    let st = c
        .status(with_ns(api::StatusRequest {
            r#ref: "resume".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!((st.offset, st.total), (400_000, total));
    assert!(d.ok(&["content", "active"]).contains("resume"));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(write_msg(api::WriteAction::Stat, "resume", 0, vec![], total, &digest).await)
        .await
        .unwrap();
    let mut resp = c
        .write(with_ns(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    let r = resp.message().await.unwrap().unwrap();
    assert_eq!(r.offset, 400_000);
    tx.send(
        write_msg(
            api::WriteAction::Commit,
            "resume",
            400_000,
            data[400_000..].to_vec(),
            total,
            &digest,
        )
        .await,
    )
    .await
    .unwrap();
    let r = resp.message().await.unwrap().unwrap();
    assert_eq!(r.digest, digest);
    assert_eq!(d.ctr(&["content", "get", &digest]).stdout, data);
    // Writing it again: AlreadyExists.
    let o = d.ctr_in(&["content", "ingest", "again"], &data);
    assert!(o.status.success() || String::from_utf8_lossy(&o.stderr).contains("already exists"));
    // Absurd declared sizes and bad refs are rejected.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(write_msg(api::WriteAction::Stat, "huge", 0, vec![], i64::MAX, "").await)
        .await
        .unwrap();
    let err = c
        .write(with_ns(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect_err("huge total rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

#[test]
fn shared_and_isolated_policies() {
    let bin = berth_testkit::berthd_binary();
    for (policy, shared) in [("shared", true), ("isolated", false)] {
        let extra = format!(
            "[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"{policy}\"\n"
        );
        let d = Daemon::start(&bin, &format!("{extra}{NO_STARTUP_GC}"));
        let data = b"shared between namespaces";
        let digest = format!("sha256:{}", sha256_hex(data));
        d.ctr_in(&["-n", "a", "content", "ingest", "x"], data);
        // A write of the same digest in another namespace with no data: commits at once
        // only under the shared policy.
        // ctr seeks its input to the offset the store reports: under the shared policy
        // that is the end (nothing is uploaded, so 25 bytes of garbage do not matter);
        // under the isolated policy the garbage is uploaded and fails verification.
        let garbage = d.dir.join("garbage");
        std::fs::write(&garbage, [b'x'; 25]).unwrap();
        let o = Command::new("ctr")
            .arg("--address")
            .arg(d.socket())
            .args(["-n", "b", "content", "ingest", "--expected-digest", &digest])
            .args(["--expected-size", "25", "y"])
            .stdin(std::fs::File::open(&garbage).unwrap())
            .output()
            .unwrap();
        assert_eq!(o.status.success(), shared, "{policy}: {o:?}");
        assert_eq!(d.digests("b").contains(&digest), shared, "{policy}");
    }
}

#[test]
fn crash_loop_keeps_store_consistent() {
    let bin = berth_testkit::berthd_binary();
    let images = berth_testkit::fixtures();
    let mut d = Daemon::start(&bin, "");
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for i in 0..iterations {
        // Start work in the background and kill the daemon at a varying moment.
        let mut workers = Vec::new();
        let sock = d.socket();
        let data = random(2 << 20, i as u64);
        let ingest = {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .args(["content", "ingest", &format!("crash-{i}")])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let _ = c.stdin.take().unwrap().write_all(&data);
                let _ = c.wait();
            })
        };
        workers.push(ingest);
        {
            let tar = images.join(if i % 2 == 0 {
                "busybox.oci.tar"
            } else {
                "layers.oci.tar"
            });
            let sock = sock.clone();
            workers.push(std::thread::spawn(move || {
                let _ = Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .args(["images", "import", "--no-unpack", tar.to_str().unwrap()])
                    .output();
                let _ = Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .args(["images", "rm", "import.local/busybox:latest"])
                    .output();
            }));
        }
        std::thread::sleep(Duration::from_millis(50 + (i as u64 * 97) % 900));
        d.restart();
        for w in workers {
            let _ = w.join();
        }
        // Let the collector settle (the worker's `images rm` schedules one), then: every
        // committed blob is intact on disk and reads back with its digest; every image
        // target exists.
        std::thread::sleep(Duration::from_millis(1500));
        for digest in d.digests("default") {
            let on_disk = std::fs::read(
                d.dir
                    .join("root/io.containerd.content.v1.content/blobs/sha256")
                    .join(&digest[7..]),
            )
            .unwrap_or_else(|e| panic!("iteration {i}: record {digest} without blob: {e}"));
            assert_eq!(
                format!("sha256:{}", sha256_hex(&on_disk)),
                digest,
                "iteration {i}"
            );
            let out = d.ctr(&["content", "get", &digest]);
            assert!(out.status.success(), "iteration {i}: {out:?}");
            assert_eq!(out.stdout, on_disk, "iteration {i}");
        }
        for line in d.ok(&["images", "ls"]).lines().skip(1) {
            let target = line.split_whitespace().nth(2).unwrap();
            d.ok(&["content", "get", target]);
        }
    }
}
