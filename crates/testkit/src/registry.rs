//! A private `docker-registry` for tests (plain HTTP on 127.0.0.1, optionally behind
//! htpasswd basic auth), images pushed to it with skopeo, and a two-platform image
//! built from the busybox fixture.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REGISTRY: &str = "/usr/bin/docker-registry";

/// Whether `docker-registry` and skopeo are installed (`scripts/install-deps`).
pub fn have_registry() -> bool {
    Path::new(REGISTRY).exists() && crate::have("skopeo")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` on a free port with private storage; killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
    /// The htpasswd user and password it requires, if any.
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// An open registry.
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    /// A registry requiring `user`/`password` (basic auth through an htpasswd file).
    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user.to_string(), password.to_string())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Registry {
        assert!(
            Path::new(REGISTRY).exists(),
            "docker-registry is not installed (scripts/install-deps)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = &credentials {
            let hash = bcrypt::hash_with_result(password, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoY);
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            conf.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                file.display()
            ));
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, conf).unwrap();
        let mut child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.err")).unwrap())
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "docker-registry exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("registry.err")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            port,
            dir,
            child,
            credentials,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI archive (every platform of an index) with skopeo as `repo`
    /// (`name:tag`); returns the digest of what the archive's `index.json` lists first
    /// (the image's manifest or index).
    pub fn push_oci_archive(&self, archive: &Path, repo: &str) -> String {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some((user, password)) = &self.credentials {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        let out = cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{repo}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        archive_index(archive)["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The stored file of blob `digest` (the filesystem driver's layout).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Whether the registry still holds `digest`.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_file(digest).exists()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `index.json` of an OCI archive.
pub fn archive_index(archive: &Path) -> serde_json::Value {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} has no index.json",
        archive.display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Converts an OCI archive to a `docker save` archive with skopeo, tagged `tags` (the
/// first is the image's name, the others `--additional-tag`s).
pub fn docker_archive(oci: &Path, out: &Path, tags: &[&str]) {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet"]);
    for t in &tags[1..] {
        cmd.arg(format!("--additional-tag={t}"));
    }
    let o = cmd
        .arg(format!("oci-archive:{}", oci.display()))
        .arg(format!("docker-archive:{}:{}", out.display(), tags[0]))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The two-platform image (see [`multi_platform`]).
#[derive(Debug, Clone)]
pub struct MultiPlatform {
    /// The OCI archive: `index.json` lists the image index, named
    /// `import.local/multi:latest`.
    pub archive: PathBuf,
    /// The image index (linux/amd64 then linux/arm64).
    pub index: String,
    /// `(manifest, config, layers)` of linux/amd64: the busybox fixture.
    pub amd64: (String, String, Vec<String>),
    /// `(manifest, config, layers)` of linux/arm64: one small gzipped layer of its own
    /// (`etc/platform` = `arm64`).
    pub arm64: (String, String, Vec<String>),
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A two-platform OCI archive built from the busybox fixture (once per target dir):
/// linux/amd64 is the busybox image, linux/arm64 an image of one small layer of its
/// `tar --create` with fixed owners, times and order: the same bytes on every build.
fn reproducible_tar() -> Command {
    let mut tar = Command::new("tar");
    tar.args([
        "--create",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=2024-01-01T00:00:00Z",
        "--sort=name",
    ]);
    tar
}

/// own, so what a platform filter fetches or keeps shows in which layers are there.
pub fn multi_platform() -> MultiPlatform {
    let fixtures = crate::fixtures();
    let archive = fixtures.join("multi-platform-2.oci.tar");
    let lock = std::fs::File::create(fixtures.join(".multi.lock")).unwrap();
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|guard| {
            let r = build_multi_platform(&fixtures.join("busybox.oci.tar"), &archive);
            drop(guard);
            r
        })
        .map_err(|(_, e)| e)
        .expect("locking the multi-platform fixture")
}

fn build_multi_platform(busybox: &Path, archive: &Path) -> MultiPlatform {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(busybox)
        .arg("-C")
        .arg(&layout));
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let read_json = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(blob(d)).unwrap()).unwrap()
    };
    let put = |data: &[u8]| -> String {
        let d = sha256(data);
        std::fs::write(blob(&d), data).unwrap();
        d
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let amd_desc = index["manifests"][0].clone();
    let amd_manifest = amd_desc["digest"].as_str().unwrap().to_string();
    let amd = read_json(&amd_manifest);
    let amd_config = amd["config"]["digest"].as_str().unwrap().to_string();
    let amd_layers: Vec<String> = amd["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();

    // linux/arm64: one uncompressed layer of its own.
    let root = work.path().join("arm64-root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/platform"), "arm64\n").unwrap();
    let layer_file = work.path().join("arm64.tar");
    run(reproducible_tar()
        .args([
            "--format=pax",
            "--pax-option=delete=atime,delete=ctime",
            "--file",
        ])
        .arg(&layer_file)
        .arg("-C")
        .arg(&root)
        .arg("etc"));
    // Gzipped (reproducibly), so skopeo pushes it as it is.
    let tar = std::fs::read(&layer_file).unwrap();
    let diff_id = sha256(&tar);
    run(Command::new("gzip")
        .args(["-n", "-9", "-f"])
        .arg(&layer_file));
    let layer = std::fs::read(layer_file.with_extension("tar.gz")).unwrap();
    let arm_layer = put(&layer);
    let mut config = read_json(&amd_config);
    config["architecture"] = "arm64".into();
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": [diff_id]});
    config["history"] = serde_json::json!([]);
    let config = serde_json::to_vec(&config).unwrap();
    let arm_config = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": arm_config, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": arm_layer, "size": layer.len()}],
    }))
    .unwrap();
    let arm_manifest = put(&manifest);

    let image_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": amd_desc["mediaType"], "digest": amd_manifest, "size": amd_desc["size"],
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_manifest, "size": manifest.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let index_digest = put(&image_index);
    let top = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest,
            "size": image_index.len(),
            "annotations": {
                "io.containerd.image.name": "import.local/multi:latest",
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .unwrap();
    std::fs::write(layout.join("index.json"), top).unwrap();
    if !archive.exists() {
        let tmp = archive.with_extension("tar.new");
        run(reproducible_tar()
            .arg("--file")
            .arg(&tmp)
            .arg("-C")
            .arg(&layout)
            .args(["oci-layout", "index.json", "blobs"]));
        std::fs::rename(&tmp, archive).unwrap();
    }
    MultiPlatform {
        archive: archive.to_path_buf(),
        index: index_digest,
        amd64: (amd_manifest, amd_config, amd_layers),
        arm64: (arm_manifest, arm_config, vec![arm_layer]),
    }
}
