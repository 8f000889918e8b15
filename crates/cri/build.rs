//! Generates the Kubernetes CRI `runtime.v1` types and tonic stubs (server and client)
//! from the `proto/v1.proto` that the published `k8s-cri` package ships. Nothing
//! generated is committed and no proto file is copied into this repository; the
//! package's own generated Rust code is not used either.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROTO_PACKAGE: &str = "k8s-cri";
const PROTO_FILE: &str = "v1.proto";

fn main() {
    let proto_dir = locate_proto_dir();
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([PROTO_FILE], [&proto_dir]).unwrap_or_else(|err| {
        panic!(
            "compiling the CRI proto {}: {err:?}",
            proto_dir.join(PROTO_FILE).display()
        )
    });
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Every RPC is written out by hand: the ones not built yet answer Unimplemented
        // with a message saying so, not tonic's generic "Not yet implemented".
        .generate_default_stubs(false)
        .compile_fds(descriptors)
        .expect("generating tonic stubs for the CRI runtime.v1 API");
}

/// Finds `proto/` of the locked `k8s-cri` package through `cargo metadata`, so the build
/// works from a clean registry cache on any machine (as `berth-api` finds containerd's).
fn locate_proto_dir() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.toml");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("running cargo metadata to locate k8s-cri's protos");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("parsing cargo metadata output");
    let packages = metadata["packages"].as_array().expect("packages array");
    let package = packages
        .iter()
        .find(|p| p["name"] == PROTO_PACKAGE)
        .unwrap_or_else(|| panic!("{PROTO_PACKAGE} is not in the lock file"));
    let manifest_path = package["manifest_path"].as_str().expect("manifest_path");
    let proto_dir = Path::new(manifest_path).parent().unwrap().join("proto");
    assert!(
        proto_dir.join(PROTO_FILE).is_file(),
        "{} has no {PROTO_FILE}",
        proto_dir.display()
    );
    proto_dir
}
