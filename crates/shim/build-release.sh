#!/usr/bin/env bash
# Usage: crates/shim/build-release.sh
#   Builds the deployable containerd-shim-berth-v2: release, statically linked against glibc
#   and not position-independent, optimised for size (opt-level s, fat LTO, one codegen
#   unit). Static linking saves RSS per running shim (no mapped libc.so / ld.so / libgcc_s
#   pages); non-PIE spares the start-up relocation of its data (private dirty pages).
#   --target keeps build scripts and proc-macros dynamic. scripts/build-release builds the
#   same binary together with berthd; this script has a target dir of its own so that the
#   shim's tests do not rebuild berthd.
#   Output: $CARGO_TARGET_DIR (default: <workspace>/target)/shim-static/<triple>/release/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')
target=${CARGO_TARGET_DIR:-$root/target}/shim-static
CARGO_PROFILE_RELEASE_OPT_LEVEL=${CARGO_PROFILE_RELEASE_OPT_LEVEL:-s} \
CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-fat} \
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1} \
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static" \
CARGO_TARGET_DIR=$target \
  cargo build --release -p berth-shim --manifest-path "$here/Cargo.toml" --target "$triple"
echo "$target/$triple/release/containerd-shim-berth-v2"
