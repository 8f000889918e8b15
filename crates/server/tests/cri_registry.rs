//! berthd started on the CRI sample config (`tests/fixtures/configs/cri-config.toml`)
//! with its `config_path` swapped for the deprecated `registry.mirrors`/`configs` keys:
//! the daemon converts them into a hosts directory under its state dir and says so; with
//! both forms it refuses to start, as containerd's CRI plugin does.

mod common;

use common::Daemon;
use std::path::PathBuf;

/// The fixture's tables (the daemon's own top-level keys replace its `version`), with
/// `config_path` replaced by `registry`.
fn cri_tables(registry: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/configs/cri-config.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.replace("version = 2\n", "");
    let line = "    config_path = \"/etc/containerd/certs.d\"\n";
    assert!(text.contains(line), "the fixture changed");
    text.replace(line, registry)
}

const MIRRORS: &str = r#"    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example:5000"]
    [plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example:5000".tls]
      insecure_skip_verify = true
"#;

#[test]
fn deprecated_cri_registry_keys_are_converted_at_start() {
    let d = Daemon::start("", &cri_tables(MIRRORS));
    let hosts = d
        .dir
        .path("state/io.containerd.grpc.v1.cri/hosts/docker.io/hosts.toml");
    let text = std::fs::read_to_string(&hosts)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", hosts.display(), d.log()));
    assert!(
        text.contains("[host.\"https://mirror.example:5000\"]"),
        "{text}"
    );
    assert!(text.contains("skip_verify = true"), "{text}");
    let log = d.log();
    assert!(
        log.contains("WARN") && log.contains(&hosts.display().to_string()),
        "the warning names the mapping:\n{log}"
    );
}

#[test]
fn deprecated_cri_registry_keys_and_config_path_refuse_to_start() {
    let registry = format!("    config_path = \"/etc/containerd/certs.d\"\n{MIRRORS}");
    let Err((status, log)) = Daemon::try_start("", &cri_tables(&registry), &[]) else {
        panic!("berthd started with both config_path and mirrors");
    };
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(
        log.contains("`mirrors` cannot be set when `config_path` is provided"),
        "{log}"
    );
}
