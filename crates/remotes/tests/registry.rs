//! The registry client against a real `docker-registry` on 127.0.0.1 (plain HTTP, TLS
//! with a generated CA and client certificates, htpasswd, token auth, mirrors) and
//! against scripted servers for what a real registry never does (lying about sizes or
//! digests, schema 1, redirects to other hosts).

mod common;

use berth_core::error::ErrorKind;
use berth_remotes::client::PushOutcome;
use berth_remotes::hosts::{self, RegistryHost};
use berth_remotes::manifest::{self, OCI_MANIFEST};
use berth_remotes::pull::{self, DirSink, ProgressState, PullOptions};
use berth_remotes::{Platform, Reference};
use common::*;
use std::sync::Arc;

fn opts_for(arch: &str) -> PullOptions {
    PullOptions {
        platform: Platform::parse(&format!("linux/{arch}")).unwrap(),
        ..Default::default()
    }
}

fn small_image(seed: u64) -> TestImage {
    make_image(
        "amd64",
        vec![
            noise(seed, 3000),
            noise(seed + 1, 70_000),
            noise(seed + 2, 10),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_push_then_pull() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/test/app:v1", reg.host())).unwrap();
    let img = small_image(1);
    let outcomes = push_image(&r, &reference, &img, true).await;
    assert!(
        outcomes.iter().all(|o| *o == PushOutcome::Uploaded),
        "{outcomes:?}"
    );
    // A second push finds every blob.
    let outcomes = push_image(&r, &reference, &img, true).await;
    assert!(
        outcomes.iter().all(|o| *o == PushOutcome::Exists),
        "{outcomes:?}"
    );
    // A cross-repository mount.
    let other = Reference::parse(&format!("{}/other/app:v1", reg.host())).unwrap();
    let (d, b) = &img.layers[1];
    let o = r
        .push_blob(&other, d, Arc::new(MemReader(b.clone())), Some("test/app"))
        .await
        .unwrap();
    assert_eq!(o, PushOutcome::Mounted);

    let resolved = r.resolve(&reference).await.unwrap();
    assert_eq!(resolved.descriptor.digest(), img.manifest.0.digest());
    assert_eq!(resolved.descriptor.media_type().to_string(), OCI_MANIFEST);

    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opts = opts_for("amd64");
    opts.progress = Some(tx);
    let info = pull::pull(&r, &reference, &sink, &opts).await.unwrap();
    drop(opts);
    assert_eq!(info.layers.len(), 3);
    for (d, b) in img.layers.iter().chain([&img.config, &img.manifest]) {
        assert_eq!(
            std::fs::read(sink.blob_path(d).unwrap()).unwrap(),
            b.as_ref()
        );
    }
    assert!(files_under(&dir.path().join("ingest")).is_empty());
    let mut done = 0;
    let mut last_offset = std::collections::HashMap::new();
    while let Some(ev) = rx.recv().await {
        if ev.state == ProgressState::Done {
            done += 1;
            assert_eq!(ev.offset, ev.total);
        }
        let prev = last_offset
            .insert(ev.digest.clone(), ev.offset)
            .unwrap_or(0);
        assert!(ev.offset >= prev, "progress went backwards");
    }
    assert_eq!(done, 5, "config, 3 layers, manifest");

    // Pulling again finds everything in the sink.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opts = opts_for("amd64");
    opts.progress = Some(tx);
    pull::pull(&r, &reference, &sink, &opts).await.unwrap();
    drop(opts);
    let mut exists = 0;
    while let Some(ev) = rx.recv().await {
        exists += (ev.state == ProgressState::Exists) as usize;
    }
    assert_eq!(exists, 4);

    // By digest, and unknown tags.
    let by_digest = Reference::parse(&format!(
        "{}/test/app@{}",
        reg.host(),
        img.manifest.0.digest()
    ))
    .unwrap();
    r.resolve(&by_digest).await.unwrap();
    let missing = Reference::parse(&format!("{}/test/app:nope", reg.host())).unwrap();
    let e = r.resolve(&missing).await.unwrap_err();
    assert!(e.is(ErrorKind::NotFound), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload() {
    let reg = Registry::start(RegistryConfig::default());
    let r = berth_remotes::Resolver::new(berth_remotes::ResolverOptions {
        chunk_size: 16 * 1024,
        ..Default::default()
    });
    let reference = Reference::parse(&format!("{}/chunked/app:v1", reg.host())).unwrap();
    let img = make_image("amd64", vec![noise(9, 100_000)]);
    push_image(&r, &reference, &img, true).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    pull::pull(&r, &reference, &sink, &opts_for("amd64"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(sink.blob_path(&img.layers[0].0).unwrap()).unwrap(),
        img.layers[0].1.as_ref()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushed_fixture_image_pulls() {
    if !berth_testkit::have("skopeo") || !berth_testkit::have("umoci") {
        eprintln!("SKIP: skopeo or umoci missing (scripts/install-deps)");
        return;
    }
    let fixtures = berth_testkit::fixtures();
    let reg = Registry::start(RegistryConfig::default());
    let archive = fixtures.join("busybox.oci.tar");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{}/fixtures/busybox:latest", reg.host()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The digest skopeo pushed is the archive's manifest digest.
    let want = berth_testkit::registry::archive_index(&archive)["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let r = resolver(None, &[]);
    let reference =
        Reference::parse_normalized(&format!("{}/fixtures/busybox", reg.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    let info = pull::pull(&r, &reference, &sink, &opts_for("amd64"))
        .await
        .unwrap();
    assert_eq!(info.manifest.digest().to_string(), want);
    assert_eq!(info.layers.len(), 1);
    assert!(sink.blob_path(&info.layers[0]).unwrap().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_list_with_two_platforms() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/multi/app:v1", reg.host())).unwrap();
    let amd = make_image("amd64", vec![noise(20, 5000)]);
    let arm = make_image("arm64", vec![noise(21, 6000), noise(22, 10)]);
    push_image(&r, &reference, &amd, false).await;
    push_image(&r, &reference, &arm, false).await;
    let (idx_desc, idx) = make_index(&[(&amd, "amd64"), (&arm, "arm64")]);
    r.push_manifest(&reference, &idx_desc, idx).await.unwrap();

    let resolved = r.resolve(&reference).await.unwrap();
    assert!(manifest::is_index(
        resolved.descriptor.media_type().as_ref()
    ));
    for (arch, img) in [("arm64", &arm), ("amd64", &amd)] {
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::new(dir.path());
        let info = pull::pull(&r, &reference, &sink, &opts_for(arch))
            .await
            .unwrap();
        assert_eq!(info.manifest.digest(), img.manifest.0.digest(), "{arch}");
        assert_eq!(info.target.digest(), idx_desc.digest());
        assert_eq!(info.layers.len(), img.layers.len());
        assert!(sink.blob_path(&idx_desc).unwrap().exists());
    }
    let dir = tempfile::tempdir().unwrap();
    let e = pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("s390x"),
    )
    .await
    .unwrap_err();
    assert!(e.is(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("linux/amd64, linux/arm64"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_generated_ca_and_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let reg = Registry::start(RegistryConfig {
        tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
        client_ca: Some(pki.ca_pem.clone()),
        ..Default::default()
    });
    let certs = tmp.path().join("certs.d");
    let host = format!("localhost:{}", reg.port);
    let reference = Reference::parse(&format!("{host}/tls/app:v1")).unwrap();
    let img = small_image(30);

    // CA and client certificate from hosts.toml (relative paths, `host_port_` dir name).
    std::fs::create_dir_all(certs.join(hosts::host_directory_name(&host))).unwrap();
    for f in [&pki.ca_pem, &pki.client_cert, &pki.client_key] {
        std::fs::copy(
            f,
            certs
                .join(hosts::host_directory_name(&host))
                .join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    write_hosts_toml(
        &certs,
        &hosts::host_directory_name(&host),
        &format!(
            "server = \"https://{host}\"\nca = \"ca.pem\"\nclient = [[\"client.pem\", \"client-key.pem\"]]\n"
        ),
    );
    let r = resolver(Some(&certs), &[]);
    push_image(&r, &reference, &img, true).await;
    let dir = tempfile::tempdir().unwrap();
    pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();

    // Without the CA the certificate is refused.
    write_hosts_toml(
        &certs,
        &hosts::host_directory_name(&host),
        &format!("server = \"https://{host}\"\nclient = [[\"client.pem\", \"client-key.pem\"]]\n"),
    );
    let r = resolver(Some(&certs), &[]);
    let e = r.resolve(&reference).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // skip_verify accepts it (the client certificate is still needed).
    write_hosts_toml(
        &certs,
        &hosts::host_directory_name(&host),
        &format!(
            "server = \"https://{host}\"\nskip_verify = true\nclient = [[\"client.pem\", \"client-key.pem\"]]\n"
        ),
    );
    let r = resolver(Some(&certs), &[]);
    r.resolve(&reference).await.unwrap();

    // Without a client certificate the registry refuses the handshake.
    write_hosts_toml(
        &certs,
        &hosts::host_directory_name(&host),
        &format!("server = \"https://{host}\"\nca = \"ca.pem\"\n"),
    );
    let r = resolver(Some(&certs), &[]);
    assert!(r.resolve(&reference).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_htpasswd() {
    let reg = Registry::start(RegistryConfig {
        htpasswd: Some(("berth".into(), "s3cret".into())),
        ..Default::default()
    });
    let reference = Reference::parse(&format!("{}/auth/app:v1", reg.host())).unwrap();
    let img = small_image(40);

    // Credentials from a docker config.json.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            reg.host(),
            "YmVydGg6czNjcmV0"
        ),
    )
    .unwrap();
    let r = berth_remotes::Resolver::new(berth_remotes::ResolverOptions {
        credentials: Arc::new(
            berth_remotes::auth::StaticCredentials::from_docker_config(&cfg).unwrap(),
        ),
        ..Default::default()
    });
    push_image(&r, &reference, &img, true).await;
    let dir = tempfile::tempdir().unwrap();
    pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();

    let anonymous = resolver(None, &[]);
    let e = anonymous.resolve(&reference).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let wrong = resolver(None, &[(&reg.host(), "berth", "wrong")]);
    let e = wrong.resolve(&reference).await.unwrap_err();
    assert!(e.to_string().contains("authorization failed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_a_test_token_server() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&tmp.path().join("pki"));
    let tokens = token_server(&pki, "tok", "pw").await;
    let reg = Registry::start(RegistryConfig {
        token: Some((
            format!("http://{}/token", tokens.host()),
            pki.token_cert.clone(),
        )),
        ..Default::default()
    });
    let reference = Reference::parse(&format!("{}/tok/app:v1", reg.host())).unwrap();
    let img = small_image(50);
    let r = resolver(None, &[(&reg.host(), "tok", "pw")]);
    push_image(&r, &reference, &img, true).await;
    let dir = tempfile::tempdir().unwrap();
    pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();
    let reqs = tokens.requests();
    assert!(!reqs.is_empty());
    assert!(
        reqs.iter().any(|q| q
            .path
            .contains("scope=repository%3Atok%2Fapp%3Apull%2Cpush")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .all(|q| q.path.contains(&format!("service={TOKEN_SERVICE}")))
    );
    // Tokens are cached: far fewer token requests than registry requests.
    assert!(reqs.len() <= 4, "{} token requests", reqs.len());

    let bad = resolver(None, &[(&reg.host(), "tok", "nope")]);
    let e = bad.resolve(&reference).await.unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_first_then_fallback_to_server() {
    let mirror = Registry::start(RegistryConfig::default());
    let mut upstream = Registry::start(RegistryConfig::default());
    let img = small_image(60);
    let plain = resolver(None, &[]);
    // The image exists only on the mirror, under the upstream's repository name.
    push_image(
        &plain,
        &Reference::parse(&format!("{}/lib/app:v1", mirror.host())).unwrap(),
        &img,
        true,
    )
    .await;

    let certs = tempfile::tempdir().unwrap();
    let upstream_host = upstream.host();
    write_hosts_toml(
        certs.path(),
        &hosts::host_directory_name(&upstream_host),
        &format!(
            "server = \"http://{upstream_host}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.host()
        ),
    );
    let r = resolver(Some(certs.path()), &[]);
    let hosts = r.hosts(&upstream_host).unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].host, mirror.host());
    let reference = Reference::parse(&format!("{upstream_host}/lib/app:v1")).unwrap();
    upstream.kill();
    let dir = tempfile::tempdir().unwrap();
    pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();

    // Now a dead mirror first: the server answers.
    let upstream2 = Registry::start(RegistryConfig::default());
    push_image(
        &plain,
        &Reference::parse(&format!("{}/lib/app:v1", upstream2.host())).unwrap(),
        &img,
        true,
    )
    .await;
    let dead = free_port();
    let certs2 = tempfile::tempdir().unwrap();
    write_hosts_toml(
        certs2.path(),
        &upstream2.host(),
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://127.0.0.1:{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream2.host()
        ),
    );
    let r = resolver(Some(certs2.path()), &[]);
    let reference = Reference::parse(&format!("{}/lib/app:v1", upstream2.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let info = pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();
    assert_eq!(info.manifest.digest(), img.manifest.0.digest());
    // The dead mirror is tried (with retries) once, then put last for the blobs.
    assert_eq!(
        r.hosts(&upstream2.host()).unwrap()[0].host,
        upstream2.host()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A host without the `resolve` capability is never asked to resolve a tag.
    write_hosts_toml(
        certs2.path(),
        &upstream2.host(),
        &format!(
            "server = \"http://{}\"\ncapabilities = [\"pull\"]\n",
            upstream2.host()
        ),
    );
    let r = resolver(Some(certs2.path()), &[]);
    let e = r.resolve(&reference).await.unwrap_err();
    assert!(e.to_string().contains("resolve capability"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_layer_download_resumes_with_a_range_request() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/big/app:v1", reg.host())).unwrap();
    let img = make_image("amd64", vec![noise(70, 6 << 20)]);
    push_image(&r, &reference, &img, true).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    let layer = img.layers[0].0.clone();

    // Cancel (as a killed daemon would stop) once a part of the layer has arrived.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opts = opts_for("amd64");
    opts.progress = Some(tx);
    opts.max_concurrent_downloads = 1;
    let cancel = opts.cancel.clone();
    let watcher = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if ev.kind == pull::BlobKind::Layer(0) && ev.offset > (1 << 20) {
                cancel.cancel();
                break;
            }
        }
    });
    let e = pull::pull(&r, &reference, &sink, &opts).await.unwrap_err();
    assert!(e.is(ErrorKind::Canceled), "{e}");
    watcher.await.unwrap();
    drop(opts);
    let partial = std::fs::metadata(sink.ingest_path(&layer).unwrap())
        .unwrap()
        .len();
    assert!(partial > 0 && partial < layer.size(), "partial {partial}");
    assert!(!sink.blob_path(&layer).unwrap().exists());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opts = opts_for("amd64");
    opts.progress = Some(tx);
    pull::pull(&r, &reference, &sink, &opts).await.unwrap();
    drop(opts);
    let mut resumed_at = None;
    while let Some(ev) = rx.recv().await {
        if ev.state == ProgressState::Resuming {
            resumed_at = Some(ev.offset);
        }
    }
    assert_eq!(resumed_at, Some(partial));
    assert_eq!(
        std::fs::read(sink.blob_path(&layer).unwrap()).unwrap(),
        img.layers[0].1.as_ref()
    );
}

/// A fake registry serving one image whose layer body is `layer_body` (not necessarily
/// what the manifest says).
async fn lying_registry(
    img: &TestImage,
    layer_body: Vec<u8>,
    cut_after: Option<usize>,
) -> FakeServer {
    let manifest = img.manifest.clone();
    let config = img.config.clone();
    let layer_digest = img.layers[0].0.digest().to_string();
    FakeServer::start(move |req| {
        let p = req.path.as_str();
        if p == "/v2/" {
            return FakeResponse::new(200);
        }
        if p.ends_with("/manifests/v1")
            || p.ends_with(&format!("/manifests/{}", manifest.0.digest()))
        {
            return FakeResponse::new(200)
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", manifest.0.digest().to_string())
                .body(manifest.1.to_vec());
        }
        if p.ends_with(&format!("/blobs/{}", config.0.digest())) {
            return FakeResponse::new(200).body(config.1.to_vec());
        }
        if p.ends_with(&format!("/blobs/{layer_digest}")) {
            let mut r = FakeResponse::new(200).body(layer_body.clone());
            r.cut_after = cut_after;
            return r;
        }
        FakeResponse::new(404)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_registry_fails_clearly_and_leaves_nothing_visible() {
    let img = make_image("amd64", vec![noise(80, 50_000)]);
    let layer = img.layers[0].0.clone();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong digest", noise(81, 50_000), "digest mismatch"),
        (
            "too large",
            noise(80, 60_000),
            "more than the declared size",
        ),
        ("too small", noise(80, 40_000), "size mismatch"),
    ];
    for (name, body, want) in cases {
        let srv = lying_registry(&img, body, None).await;
        let r = resolver(None, &[]);
        let reference = Reference::parse(&format!("{}/lie/app:v1", srv.host())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sink = DirSink::new(dir.path());
        let e = pull::pull(&r, &reference, &sink, &opts_for("amd64"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{name}: {e}");
        assert!(
            e.to_string().contains(&layer.digest().to_string()),
            "{name}: {e}"
        );
        assert!(!sink.blob_path(&layer).unwrap().exists(), "{name}");
        assert!(
            !sink.ingest_path(&layer).unwrap().exists(),
            "{name}: partial data kept"
        );
        assert!(
            !sink.blob_path(&img.manifest.0).unwrap().exists(),
            "{name}: manifest visible"
        );
    }
    // A manifest larger than the limit is refused before it is read.
    let big = vec![b' '; (manifest::MAX_MANIFEST_SIZE + 1) as usize];
    let srv = FakeServer::start(move |req| {
        if req.path == "/v2/" {
            FakeResponse::new(200)
        } else {
            FakeResponse::new(200)
                .header("Content-Type", OCI_MANIFEST)
                .body(big.clone())
        }
    })
    .await;
    let r = resolver(None, &[]);
    let e = r
        .resolve(&Reference::parse(&format!("{}/x/y:v1", srv.host())).unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_drop_mid_layer_is_resumed_within_one_pull() {
    let img = make_image("amd64", vec![noise(90, 200_000)]);
    let body = img.layers[0].1.to_vec();
    let manifest = img.manifest.clone();
    let config = img.config.clone();
    let digest = img.layers[0].0.digest().to_string();
    let srv = FakeServer::start(move |req| {
        let p = req.path.as_str();
        if p.contains("/manifests/") {
            return FakeResponse::new(200)
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", manifest.0.digest().to_string())
                .body(manifest.1.to_vec());
        }
        if p.ends_with(&config.0.digest().to_string()) {
            return FakeResponse::new(200).body(config.1.to_vec());
        }
        if p.ends_with(&digest) {
            if let Some(range) = req.headers.get("range") {
                let from: usize = range
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-')
                    .parse()
                    .unwrap();
                return FakeResponse::new(206)
                    .header(
                        "Content-Range",
                        format!("bytes {from}-{}/{}", body.len() - 1, body.len()),
                    )
                    .body(body[from..].to_vec());
            }
            // Promise everything, send a third, hang up.
            let mut r = FakeResponse::new(200).body(body.clone());
            r.cut_after = Some(body.len() / 3);
            return r;
        }
        FakeResponse::new(404)
    })
    .await;
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/cut/app:v1", srv.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    pull::pull(&r, &reference, &sink, &opts_for("amd64"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(sink.blob_path(&img.layers[0].0).unwrap()).unwrap(),
        img.layers[0].1.as_ref()
    );
    let ranges: Vec<_> = srv
        .requests()
        .into_iter()
        .filter_map(|q| q.headers.get("range").cloned())
        .collect();
    assert_eq!(ranges, vec![format!("bytes={}-", 200_000 / 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_to_other_hosts() {
    let img = make_image("amd64", vec![noise(100, 1000), noise(101, 2000)]);
    // Server B: blob storage the registry redirects to. Server C: a foreign layer URL.
    let l0 = img.layers[0].1.to_vec();
    let storage = FakeServer::start(move |_| FakeResponse::new(200).body(l0.clone())).await;
    let l1 = img.layers[1].1.to_vec();
    let foreign = FakeServer::start(move |_| FakeResponse::new(200).body(l1.clone())).await;
    // The manifest lists layer 1 with a foreign URL.
    let mut m: serde_json::Value = serde_json::from_slice(&img.manifest.1).unwrap();
    m["layers"][1]["urls"] =
        serde_json::json!([format!("http://{}/foreign/layer", foreign.host())]);
    m["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar".into();
    let mbody = serde_json::to_vec(&m).unwrap();
    let mdesc = manifest::descriptor_for(OCI_MANIFEST, &mbody);
    let config = img.config.clone();
    let storage_host = storage.host();
    let d0 = img.layers[0].0.digest().to_string();
    let registry = FakeServer::start(move |req| {
        if req.headers.get("authorization").map(String::as_str) != Some("Basic dTpw") {
            return FakeResponse::new(401).header("WWW-Authenticate", "Basic realm=\"test\"");
        }
        let p = req.path.as_str();
        if p.contains("/manifests/") {
            return FakeResponse::new(200)
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", mdesc.digest().to_string())
                .body(mbody.clone());
        }
        if p.ends_with(&config.0.digest().to_string()) {
            return FakeResponse::new(200).body(config.1.to_vec());
        }
        if p.ends_with(&d0) {
            return FakeResponse::new(307)
                .header("Location", format!("http://{storage_host}/blob?sig=1"));
        }
        FakeResponse::new(404)
    })
    .await;
    let r = resolver(None, &[(&registry.host(), "u", "p")]);
    let reference = Reference::parse(&format!("{}/creds/app:v1", registry.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap();
    assert!(
        registry
            .requests()
            .iter()
            .any(|q| q.headers.contains_key("authorization"))
    );
    assert_eq!(storage.requests().len(), 1);
    assert_eq!(foreign.requests().len(), 1);
    for q in storage.requests().iter().chain(foreign.requests().iter()) {
        assert!(
            !q.headers.contains_key("authorization"),
            "credentials leaked to {}: {q:?}",
            q.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema1_manifests_are_rejected() {
    let srv = FakeServer::start(|req| {
        if req.path == "/v2/" {
            return FakeResponse::new(200);
        }
        FakeResponse::new(200)
            .header("Content-Type", manifest::DOCKER_SCHEMA1_SIGNED)
            .body(r#"{"schemaVersion":1,"name":"old/app","tag":"v1","fsLayers":[],"history":[]}"#)
    })
    .await;
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/old/app:v1", srv.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = pull::pull(
        &r,
        &reference,
        &DirSink::new(dir.path()),
        &opts_for("amd64"),
    )
    .await
    .unwrap_err();
    assert!(e.is(ErrorKind::NotImplemented), "{e}");
    assert!(e.to_string().contains("schema 1"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_transient_server_errors() {
    let img = make_image("amd64", vec![noise(110, 100)]);
    let manifest = img.manifest.clone();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    let srv = FakeServer::start(move |req| {
        if req.path.contains("/manifests/")
            && c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
        {
            return FakeResponse::new(503);
        }
        FakeResponse::new(200)
            .header("Content-Type", OCI_MANIFEST)
            .header("Docker-Content-Digest", manifest.0.digest().to_string())
            .body(manifest.1.to_vec())
    })
    .await;
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/flaky/app:v1", srv.host())).unwrap();
    let resolved = r.resolve(&reference).await.unwrap();
    assert_eq!(resolved.descriptor.digest(), img.manifest.0.digest());
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn hosts_toml_fixtures() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/certs.d");
    let opts = hosts::HostOptions {
        config_path: Some(root.display().to_string()),
        default_scheme: None,
    };
    let h = hosts::configure_hosts(&opts, "docker.io").unwrap();
    let urls: Vec<_> = h.iter().map(RegistryHost::base_url).collect();
    assert_eq!(
        urls,
        vec![
            "http://127.0.0.1:5000/v2",
            "https://registry-1.docker.io/v2",
            "https://registry-1.docker.io/v2"
        ]
    );
    assert!(h[0].capabilities.pull && h[0].capabilities.resolve && !h[0].capabilities.push);
    assert!(h[1].capabilities.push);
    let k = hosts::configure_hosts(&opts, "k8s.gcr.io").unwrap();
    assert_eq!(k.len(), 2);
    assert_eq!(k[0].tls.skip_verify, Some(true));
    assert!(k[0].tls.ca.is_empty(), "an empty ca path is ignored");
    // A registry without a directory uses its defaults.
    let q = hosts::configure_hosts(&opts, "quay.io").unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].base_url(), "https://quay.io/v2");
}

#[test]
fn deprecated_cri_registry_keys_convert_to_hosts_toml() {
    let t: toml::Table = r#"
[mirrors."docker.io"]
  endpoint = ["https://mirror.example:5000", "https://registry-1.docker.io"]
[mirrors."registry.local:5000"]
  endpoint = ["http://registry.local:5000"]
[configs."mirror.example:5000".tls]
  insecure_skip_verify = true
  ca_file = "/etc/ssl/m.pem"
[configs."docker.io".auth]
  auth = "dTpw"
"#
    .parse()
    .unwrap();
    let c = hosts::convert_cri_registry(&t).unwrap();
    assert_eq!(c.warnings.len(), 2);
    let d = &c.hosts_toml["docker.io"];
    let parsed = hosts::parse_hosts_file(std::path::Path::new("/x"), d).unwrap();
    assert_eq!(parsed.len(), 2, "{d}");
    assert_eq!(parsed[0].base_url(), "https://mirror.example:5000/v2");
    assert_eq!(parsed[0].tls.skip_verify, Some(true));
    assert_eq!(
        parsed[0].tls.ca,
        vec![std::path::PathBuf::from("/etc/ssl/m.pem")]
    );
    assert!(!parsed[0].capabilities.push);
    assert_eq!(parsed[1].base_url(), "https://registry-1.docker.io/v2");
    assert_eq!(c.auths["docker.io"].username, "u");
    let l = hosts::parse_hosts_file(
        std::path::Path::new("/x"),
        &c.hosts_toml["registry.local:5000"],
    )
    .unwrap();
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].base_url(), "http://registry.local:5000/v2");
}

struct RecordingHook {
    calls: std::sync::Mutex<Vec<usize>>,
    fail_at: Option<usize>,
}

#[async_trait::async_trait]
impl pull::LayerHook for RecordingHook {
    async fn layer_ready(
        &self,
        index: usize,
        layer: &oci_spec::image::Descriptor,
        image: &pull::ImageInfo,
    ) -> berth_core::Result<()> {
        assert_eq!(image.layers[index].digest(), layer.digest());
        assert!(
            !image.config_body.is_empty(),
            "the config is there from the start"
        );
        // Slow appliers must not reorder anything.
        tokio::time::sleep(std::time::Duration::from_millis(20 * (3 - index as u64))).await;
        self.calls.lock().unwrap().push(index);
        if Some(index) == self.fail_at {
            return Err(berth_core::Error::invalid_argument(format!(
                "apply {index} failed"
            )));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_hook_runs_in_dependency_order_and_its_errors_fail_the_pull() {
    let reg = Registry::start(RegistryConfig::default());
    let r = resolver(None, &[]);
    let reference = Reference::parse(&format!("{}/hook/app:v1", reg.host())).unwrap();
    // Layer 0 is the largest, so later layers finish downloading first.
    let img = make_image(
        "amd64",
        vec![
            noise(300, 3 << 20),
            noise(301, 10),
            noise(302, 20),
            noise(303, 5),
        ],
    );
    push_image(&r, &reference, &img, true).await;
    let hook = Arc::new(RecordingHook {
        calls: Default::default(),
        fail_at: None,
    });
    let mut opts = opts_for("amd64");
    opts.layer_hook = Some(hook.clone());
    let dir = tempfile::tempdir().unwrap();
    pull::pull(&r, &reference, &DirSink::new(dir.path()), &opts)
        .await
        .unwrap();
    assert_eq!(*hook.calls.lock().unwrap(), vec![0, 1, 2, 3]);

    let failing = Arc::new(RecordingHook {
        calls: Default::default(),
        fail_at: Some(1),
    });
    opts.layer_hook = Some(failing.clone());
    let dir = tempfile::tempdir().unwrap();
    let sink = DirSink::new(dir.path());
    let e = pull::pull(&r, &reference, &sink, &opts).await.unwrap_err();
    assert!(e.to_string().contains("apply 1 failed"), "{e}");
    assert_eq!(*failing.calls.lock().unwrap(), vec![0, 1]);
    assert!(!sink.blob_path(&img.manifest.0).unwrap().exists());
}
