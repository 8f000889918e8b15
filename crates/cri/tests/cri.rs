//! The CRI plugin against a private berthd and a private `docker-registry` on 127.0.0.1,
//! driven by the generated CRI client over berthd's main unix socket, as the kubelet or
//! crictl would. What the pulls leave behind is checked with the stock `ctr` 1.6 (image
//! records and their labels, unpacked snapshots, `plugins ls`).
//!
//! The registry is reached through a `hosts.toml` directory (`registry.config_path`):
//! plain HTTP for its own `127.0.0.1:<port>` name, and as the `docker.io` host so that a
//! short name (`busybox`) is normalised to `docker.io/library/busybox:latest` and still
//! pulled from the private registry.

use berth_cri::api;
use berth_cri::api::image_service_client::ImageServiceClient;
use berth_cri::api::runtime_service_client::RuntimeServiceClient;
use berth_testkit::Daemon;
use berth_testkit::registry::Registry;
use std::path::Path;
use tonic::Code;
use tonic::transport::Channel;

const TAG: &str = "docker.io/library/busybox:latest";

/// Whether the registry tests must be skipped (and says so).
fn registry_tools_missing() -> bool {
    let missing = !berth_testkit::registry::have_registry();
    if missing {
        eprintln!("SKIP: skopeo or docker-registry missing (scripts/install-deps)");
    }
    missing
}

fn channel(daemon: &Daemon) -> Channel {
    berth_services::proxy::unix_channel(&daemon.socket.to_string_lossy())
        .expect("a channel to berthd's socket")
}

fn spec(image: &str) -> Option<api::ImageSpec> {
    Some(api::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// A hosts directory sending `docker.io` and the registry's own name to the registry
/// over plain HTTP.
fn hosts_dir(dir: &Path, registry: &Registry) {
    let host = registry.host();
    for name in ["docker.io".to_string(), host.clone()] {
        std::fs::create_dir_all(dir.join(&name)).unwrap();
        std::fs::write(
            dir.join(&name).join("hosts.toml"),
            format!("server = \"http://{host}\"\n"),
        )
        .unwrap();
    }
}

/// The CRI section pointing `config_path` at `hosts`.
fn cri_config(hosts: &Path) -> String {
    format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {:?}\n",
        hosts.display()
    )
}

/// `(name, labels)` of every image record in `k8s.io`, from `ctr images ls`.
fn k8s_records(daemon: &Daemon) -> Vec<(String, String)> {
    daemon
        .ctr_ok(&["-n", "k8s.io", "images", "ls"])
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].to_string(),
                fields.last().unwrap_or(&"").to_string(),
            )
        })
        .collect()
}

/// Committed snapshots of `k8s.io` in the overlayfs snapshotter.
fn k8s_committed_snapshots(daemon: &Daemon) -> usize {
    daemon
        .ctr_ok(&[
            "-n",
            "k8s.io",
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "ls",
        ])
        .lines()
        .filter(|l| l.contains("Committed"))
        .count()
}

/// The manifest digest the registry serves for the fixture, and its layer count.
fn fixture_manifest(archive: &Path) -> (String, usize) {
    let index = berth_testkit::registry::archive_index(archive);
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = manifest["layers"].as_array().map_or(0, Vec::len);
    (digest, layers)
}

async fn status_of(images: &mut ImageServiceClient<Channel>, image: &str) -> Option<api::Image> {
    images
        .image_status(api::ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .unwrap_or_else(|s| panic!("ImageStatus {image}: {s}"))
        .into_inner()
        .image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_fsinfo_and_remove_like_containerd() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let archive = fixtures.join("busybox.oci.tar");
    let (manifest_digest, layers) = fixture_manifest(&archive);
    let registry = Registry::start();
    registry.push_oci_archive(&archive, "library/busybox:latest");
    registry.push_oci_archive(&archive, "fixtures/busybox:1");
    let hosts = tempfile::tempdir().unwrap();
    hosts_dir(hosts.path(), &registry);
    let daemon = Daemon::start_with_config(&cri_config(hosts.path()));
    let mut images = ImageServiceClient::new(channel(&daemon));

    // A short name, normalised as docker does, pulled through the docker.io hosts.toml.
    let pulled = images
        .pull_image(api::PullImageRequest {
            image: spec("busybox"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("PullImage busybox: {s}\n{}", daemon.log()))
        .into_inner();
    let id = pulled.image_ref;
    assert!(
        id.starts_with("sha256:") && id.len() == 71,
        "image_ref {id:?}"
    );

    // containerd's three records, each managed by the CRI, and the unpacked layers.
    let digest_ref = format!("docker.io/library/busybox@{manifest_digest}");
    let mut records = k8s_records(&daemon);
    records.sort();
    let mut expected = vec![TAG.to_string(), digest_ref.clone(), id.clone()];
    expected.sort();
    assert_eq!(
        records.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        expected
    );
    for (name, labels) in &records {
        assert_eq!(labels, "io.cri-containerd.image=managed", "{name}");
    }
    assert_eq!(k8s_committed_snapshots(&daemon), layers);

    // The same content under the registry's own name (plain HTTP through its hosts.toml)
    // is the same image: one ID, two tags, two repo digests.
    let by_host = format!("{}/fixtures/busybox:1", registry.host());
    let second = images
        .pull_image(api::PullImageRequest {
            image: spec(&by_host),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("PullImage {by_host}: {s}"))
        .into_inner();
    assert_eq!(second.image_ref, id);
    let listed = images
        .list_images(api::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let image = &listed[0];
    assert_eq!(image.id, id);
    assert_eq!(image.repo_tags, [by_host.clone(), TAG.to_string()]);
    assert_eq!(
        image.repo_digests,
        [
            format!("{}/fixtures/busybox@{manifest_digest}", registry.host()),
            digest_ref.clone()
        ]
    );
    assert!(image.size > 0);
    assert!(!image.pinned);

    // The filter takes any form ImageStatus takes.
    for (filter, count) in [("busybox", 1), (by_host.as_str(), 1), ("absent:1", 0)] {
        let filtered = images
            .list_images(api::ListImagesRequest {
                filter: Some(api::ImageFilter {
                    image: spec(filter),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .images;
        assert_eq!(filtered.len(), count, "filter {filter}: {filtered:?}");
    }

    // Status by tag (short and full), digest reference, full ID and ID prefixes.
    let hex = &id["sha256:".len()..];
    for name in [
        "busybox",
        TAG,
        digest_ref.as_str(),
        id.as_str(),
        &hex[..12],
        &format!("sha256:{}", &hex[..12]),
    ] {
        let found = status_of(&mut images, name)
            .await
            .unwrap_or_else(|| panic!("no status for {name}"));
        assert_eq!(&found, image, "{name}");
    }
    let verbose = images
        .image_status(api::ImageStatusRequest {
            image: spec("busybox"),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    assert!(
        info["chainID"].as_str().unwrap().starts_with("sha256:"),
        "{info}"
    );
    assert_eq!(info["imageSpec"]["rootfs"]["type"], "layers", "{info}");
    // Unknown images are no error, only an empty answer.
    for unknown in ["absent:1", "sha256:0000", "0000000000"] {
        assert!(status_of(&mut images, unknown).await.is_none(), "{unknown}");
    }

    // The image filesystem is the snapshotter's root, holding the unpacked layers.
    let fs = images
        .image_fs_info(api::ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert_eq!(
        usage.fs_id.as_ref().unwrap().mountpoint,
        daemon
            .root
            .join("io.containerd.snapshotter.v1.overlayfs")
            .display()
            .to_string()
    );
    assert!(usage.used_bytes.unwrap().value > 0, "{usage:?}");
    assert!(usage.inodes_used.unwrap().value > 0, "{usage:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!((now - usage.timestamp).abs() < 60_000_000_000, "{usage:?}");

    // Removing by one name removes every record of the image; the collection has run
    // when the call returns, so the snapshots are gone too.
    images
        .remove_image(api::RemoveImageRequest {
            image: spec(&by_host),
        })
        .await
        .unwrap();
    assert!(status_of(&mut images, &id).await.is_none());
    assert!(k8s_records(&daemon).is_empty());
    assert_eq!(k8s_committed_snapshots(&daemon), 0);
    // Removing what is not there is fine.
    images
        .remove_image(api::RemoveImageRequest {
            image: spec("busybox"),
        })
        .await
        .unwrap();

    // A digest reference records no tag: only itself and the image ID.
    let pinned = images
        .pull_image(api::PullImageRequest {
            image: spec(&format!("busybox@{manifest_digest}")),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("PullImage by digest: {s}"))
        .into_inner();
    assert_eq!(pinned.image_ref, id);
    let mut names: Vec<String> = k8s_records(&daemon).into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, [digest_ref.clone(), id.clone()]);
    let found = status_of(&mut images, &digest_ref).await.unwrap();
    assert!(found.repo_tags.is_empty(), "{found:?}");
    assert_eq!(found.repo_digests, std::slice::from_ref(&digest_ref));
    images
        .remove_image(api::RemoveImageRequest { image: spec(&id) })
        .await
        .unwrap();
    assert!(k8s_records(&daemon).is_empty());

    // Bad references are the client's fault; registry errors say what the registry said.
    for bad in ["UPPER/case", "busybox@sha256:12", ""] {
        let err = images
            .pull_image(api::PullImageRequest {
                image: spec(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }
    let missing = format!("{}/fixtures/absent:1", registry.host());
    let err = images
        .pull_image(api::PullImageRequest {
            image: spec(&missing),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with(&format!("failed to pull and unpack image {missing:?}")),
        "{err}"
    );
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_registry_with_basic_auth_uses_the_request_or_configured_auth() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let registry = Registry::start_with_htpasswd("kube", "s3cret");
    registry.push_oci_archive(&fixtures.join("busybox.oci.tar"), "private/busybox:1");
    let hosts = tempfile::tempdir().unwrap();
    hosts_dir(hosts.path(), &registry);
    let daemon = Daemon::start_with_config(&cri_config(hosts.path()));
    let mut images = ImageServiceClient::new(channel(&daemon));
    let reference = format!("{}/private/busybox:1", registry.host());
    let puller = images.clone();
    let pull = |auth: Option<api::AuthConfig>| {
        let mut images = puller.clone();
        let reference = reference.clone();
        async move {
            images
                .pull_image(api::PullImageRequest {
                    image: spec(&reference),
                    auth,
                    ..Default::default()
                })
                .await
        }
    };
    let basic = |user: &str, password: &str| api::AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    };

    for (what, auth) in [
        ("no auth", None),
        ("a wrong password", Some(basic("kube", "wrong"))),
        (
            "auth for another server",
            Some(api::AuthConfig {
                server_address: "https://elsewhere.example".into(),
                ..basic("kube", "s3cret")
            }),
        ),
    ] {
        let err = pull(auth).await.unwrap_err();
        // What the registry answered, after what the CRI was doing.
        assert!(
            err.message().starts_with("failed to pull and unpack image")
                && err.message().contains("401 Unauthorized"),
            "{what}: {err}"
        );
        assert!(k8s_records(&daemon).is_empty(), "{what}");
    }

    let id = pull(Some(basic("kube", "s3cret")))
        .await
        .unwrap_or_else(|s| panic!("PullImage with username/password: {s}"))
        .into_inner()
        .image_ref;
    assert!(status_of(&mut images, &reference).await.is_some());
    images
        .remove_image(api::RemoveImageRequest { image: spec(&id) })
        .await
        .unwrap();
    assert!(status_of(&mut images, &reference).await.is_none());

    // The docker-config form: base64 of user:password, for this server only.
    use base64::Engine;
    let encoded = api::AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode("kube:s3cret"),
        server_address: format!("http://{}", registry.host()),
        ..Default::default()
    };
    let again = pull(Some(encoded))
        .await
        .unwrap_or_else(|s| panic!("PullImage with auth: {s}"))
        .into_inner()
        .image_ref;
    assert_eq!(again, id);
    drop(daemon);

    // Without auth in the request, the config's `registry.configs.<host>.auth` is used.
    let configured = format!(
        "{}[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{:?}.auth]\n  username = \"kube\"\n  password = \"s3cret\"\n",
        cri_config(hosts.path()),
        registry.host()
    );
    let daemon = Daemon::start_with_config(&configured);
    let pulled = ImageServiceClient::new(channel(&daemon))
        .pull_image(api::PullImageRequest {
            image: spec(&reference),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("PullImage with configured auth: {s}\n{}", daemon.log()))
        .into_inner();
    assert_eq!(pulled.image_ref, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprecated_registry_mirrors_are_honoured() {
    if registry_tools_missing() {
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let registry = Registry::start();
    registry.push_oci_archive(&fixtures.join("busybox.oci.tar"), "library/busybox:latest");
    // containerd 1.6's older form, which berthd turns into a hosts directory at start.
    let daemon = Daemon::start_with_config(&format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"http://{}\"]\n",
        registry.host()
    ));
    let pulled = ImageServiceClient::new(channel(&daemon))
        .pull_image(api::PullImageRequest {
            image: spec("busybox:latest"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("PullImage through a mirror: {s}\n{}", daemon.log()));
    assert!(pulled.into_inner().image_ref.starts_with("sha256:"));
    assert!(k8s_records(&daemon).iter().any(|(name, _)| name == TAG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_status_and_an_empty_image_service_and_nothing_it_cannot_do() {
    // No CNI configuration (an empty private conf_dir): the network is not ready.
    let net_d = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_config(&format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  conf_dir = {:?}\n",
        net_d.path().display()
    ));
    let mut runtime = RuntimeServiceClient::new(channel(&daemon));
    let version = runtime
        .version(api::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.version, "0.1.0");
    assert_eq!(version.runtime_name, "containerd");
    assert!(version.runtime_version.ends_with("+berth"), "{version:?}");
    assert_eq!(version.runtime_api_version, "v1");

    let status = runtime
        .status(api::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conditions = status.status.unwrap().conditions;
    let condition = |t: &str| conditions.iter().find(|c| c.r#type == t).unwrap().clone();
    assert!(condition("RuntimeReady").status);
    let network = condition("NetworkReady");
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network
            .message
            .starts_with("Network plugin returns error: cni plugin not initialized"),
        "{network:?}"
    );
    let config: serde_json::Value = serde_json::from_str(&status.info["config"]).unwrap();
    assert_eq!(config["containerd"]["snapshotter"], "overlayfs");

    let err = runtime.exec(api::ExecRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().starts_with("Exec is not built yet in berthd"),
        "{err}"
    );
    let err = runtime
        .get_container_events(api::GetEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");

    // The image service on a daemon that has no k8s.io namespace yet.
    let mut images = ImageServiceClient::new(channel(&daemon));
    let listed = images
        .list_images(api::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.images.is_empty());
    assert!(status_of(&mut images, "busybox").await.is_none());
    images
        .remove_image(api::RemoveImageRequest {
            image: spec("busybox"),
        })
        .await
        .unwrap();
    let fs = images
        .image_fs_info(api::ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fs.image_filesystems[0].used_bytes.unwrap().value, 0);

    // The plugin is listed as containerd lists its CRI plugin.
    let listing = daemon.ctr_ok(&["plugins", "ls", "id==cri"]);
    let row: Vec<&str> = listing.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "io.containerd.grpc.v1", "{listing}");
    assert_eq!(row[1], "cri", "{listing}");
    assert_eq!(row.last(), Some(&"ok"), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_or_misconfigured_plugin_leaves_the_daemon_serving() {
    // Disabled: not loaded, not listed, and its services are not routed. The key is a
    // top-level one, so it goes before the generated config's tables.
    let mut daemon = Daemon::prepare("");
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{config}"),
    )
    .unwrap();
    daemon
        .spawn()
        .unwrap_or_else(|log| panic!("berthd did not start:\n{log}"));
    let listing = daemon.ctr_ok(&["plugins", "ls"]);
    assert!(
        !listing
            .lines()
            .any(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri ")),
        "{listing}"
    );
    let err = RuntimeServiceClient::new(channel(&daemon))
        .version(api::VersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    drop(daemon);

    // A snapshotter that does not exist: the plugin's failure is recorded, the daemon
    // serves everything else.
    let daemon = Daemon::start_with_config(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"no-such-snapshotter\"\n",
    );
    let listing = daemon.ctr_ok(&["plugins", "ls", "id==cri"]);
    assert!(
        listing
            .lines()
            .nth(1)
            .unwrap()
            .trim_end()
            .ends_with("error"),
        "{listing}"
    );
    daemon.ctr_ok(&["version"]);
}
