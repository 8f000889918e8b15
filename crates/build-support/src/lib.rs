//! For Berth's build scripts, which generate gRPC types from the `.proto` files that
//! published packages ship (containerd's API from `containerd-client`, the CRI from
//! `k8s-cri`) instead of copying them into the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory `subdir` of the locked package `package`, as Cargo unpacked it into its
/// registry cache, found through `cargo metadata` for the crate whose build script runs
/// (so the build works from a clean cache on any machine). The package must be a
/// dependency of that crate (a `cfg(any())` one is enough: it is locked and
/// downloaded, never compiled). Panics with what is missing, as a build script should.
pub fn package_dir(package: &str, subdir: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set");
    let manifest = Path::new(&manifest_dir).join("Cargo.toml");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("running cargo metadata to locate {package}: {e}"));
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("parsing cargo metadata output");
    let manifest_path = metadata["packages"]
        .as_array()
        .expect("cargo metadata lists packages")
        .iter()
        .find(|p| p["name"] == package)
        .unwrap_or_else(|| panic!("{package} is not in the lock file"))["manifest_path"]
        .as_str()
        .expect("a package has a manifest_path")
        .to_string();
    let dir = Path::new(&manifest_path)
        .parent()
        .expect("a manifest is in a directory")
        .join(subdir);
    assert!(dir.is_dir(), "{} does not exist", dir.display());
    dir
}
