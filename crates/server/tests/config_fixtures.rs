//! The containerd-style sample configs in `tests/fixtures/configs/` parse without a warning
//! and every key lands where it belongs.

use berth_server::config::Config;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/configs")
        .join(name)
}

fn raw_table(name: &str) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

#[test]
fn daemon_config_fixture_lands_in_place() {
    let loaded = Config::load(&fixture("daemon-config.toml"), &BTreeMap::new()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let config = loaded.config;
    assert_eq!(config.version, 2);
    assert_eq!(config.root, "/var/lib/mycontainerd");
    assert_eq!(config.state, "/var/run/mycontainerd");
    assert_eq!(config.oom_score, 0);
    assert_eq!(config.cgroup.path, "");

    let stargz = &config.proxy_plugins["stargz"];
    assert_eq!(stargz.r#type, "snapshot");
    assert_eq!(
        stargz.address,
        "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
    );

    let decoder = &config.stream_processors["io.containerd.ocicrypt.decoder.v1.tar.gzip"];
    assert_eq!(
        decoder.accepts,
        ["application/vnd.oci.image.layer.v1.tar+gzip+encrypted"]
    );
    assert_eq!(
        decoder.returns,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(decoder.path, "/usr/local/bin/ctd-decoder");

    let gc = &config.plugins["io.containerd.gc.v1.scheduler"];
    assert_eq!(gc["pause_threshold"].as_float(), Some(0.02));
    assert_eq!(gc["deletion_threshold"].as_integer(), Some(0));
    assert_eq!(gc["mutation_threshold"].as_integer(), Some(100));
    assert_eq!(gc["schedule_delay"].as_str(), Some("0s"));
    assert_eq!(gc["startup_delay"].as_str(), Some("100ms"));
    assert_eq!(
        config.plugins["io.containerd.internal.v1.restart"]["interval"].as_str(),
        Some("10s")
    );
    assert_eq!(
        config.plugins["io.containerd.metadata.v1.bolt"]["content_sharing_policy"].as_str(),
        Some("shared")
    );
    assert_eq!(
        config.plugins["io.containerd.monitor.v1.cgroups"]["no_prometheus"].as_bool(),
        Some(false)
    );
    let linux = &config.plugins["io.containerd.runtime.v1.linux"];
    assert_eq!(linux["shim"].as_str(), Some("containerd-shim"));
    assert_eq!(linux["runtime"].as_str(), Some("runc"));
    assert_eq!(linux["no_shim"].as_bool(), Some(false));
    assert_eq!(
        config.plugins["io.containerd.runtime.v2.task"]["platforms"],
        toml::Value::Array(vec!["linux/amd64".into()])
    );
    assert_eq!(
        config.plugins["io.containerd.service.v1.diff-service"]["default"],
        toml::Value::Array(vec!["walking".into()])
    );

    // Every plugin section of the file is kept exactly.
    let raw = raw_table("daemon-config.toml");
    let raw_plugins = raw["plugins"].as_table().unwrap();
    assert_eq!(raw_plugins.len(), config.plugins.len());
    for (uri, section) in raw_plugins {
        assert_eq!(
            &toml::Value::Table(config.plugins[uri].clone()),
            section,
            "{uri}"
        );
    }
}

#[test]
fn cri_config_fixture_is_kept_as_the_cri_plugins_section() {
    let loaded = Config::load(&fixture("cri-config.toml"), &BTreeMap::new()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let config = loaded.config;
    let cri = &config.plugins["io.containerd.grpc.v1.cri"];
    let raw = raw_table("cri-config.toml");
    assert_eq!(
        &toml::Value::Table(cri.clone()),
        &raw["plugins"]["io.containerd.grpc.v1.cri"],
        "every CRI key lands in the CRI plugin's section"
    );
    // A few deep ones, to be explicit.
    assert_eq!(
        cri["sandbox_image"].as_str(),
        Some("registry.example/pause-amd64:3.0")
    );
    assert_eq!(cri["max_container_log_line_size"].as_integer(), Some(16384));
    let runc = &cri["containerd"]["runtimes"]["runc"];
    assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
    assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(true));
    assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/opt/cni/bin"));
    assert_eq!(
        cri["registry"]["config_path"].as_str(),
        Some("/etc/containerd/certs.d")
    );
    assert_eq!(
        cri["x509_key_pair_streaming"]["tls_cert_file"].as_str(),
        Some("")
    );
    // Nothing else of the daemon changed.
    assert_eq!(config.root, "/var/lib/berth");
    assert_eq!(config.plugins.len(), 1);
}

#[test]
fn fixtures_survive_a_dump_and_reparse() {
    for name in ["daemon-config.toml", "cri-config.toml"] {
        let loaded = Config::load(&fixture(name), &BTreeMap::new()).unwrap();
        let text = loaded.config.to_toml();
        let (again, warnings) = Config::parse(&text, name).unwrap();
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert_eq!(again, loaded.config, "{name}");
    }
}

#[test]
fn berthd_dumps_the_fixtures() {
    for name in ["daemon-config.toml", "cri-config.toml"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_berthd"))
            .arg("--config")
            .arg(fixture(name))
            .args(["config", "dump"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            "",
            "{name}: no warning"
        );
        let text = String::from_utf8(output.stdout).unwrap();
        Config::parse(&text, name).unwrap();
    }
}
