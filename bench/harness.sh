#!/usr/bin/env bash
# Usage: bench/harness.sh
#   The shared harness (../shared/tools/bench.sh: idle memory, pulls, import, run
#   latency, sleepers, snapshots, ingest, 200 containers) against berthd and the
#   reference containerd 1.6.20 (refd.sh), one after the other in one sitting, and a
#   side-by-side table of both results.
#   Fair placement: each daemon's root lives on its own newly made ext4 (made like the
#   host's, without a journal). On this host's ext4 a directory made right after large
#   deletions lands among recently freed inodes and every file created under it is slow
#   (a pull of the `layers` fixture: ~7.5 s for either daemon, against ~1–2 s), so a
#   daemon whose root was just made would lose to one whose root is older.
#   Run as root. Env: BERTHD (default: scripts/build-release; berth's shim and berth-runc
#   are taken from beside it), WORKDIR (default /tmp/ctrbench, the harness's own),
#   FS_SIZE (default 6G per file system).
set -euo pipefail
export LC_ALL=C
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
TOOLS=$REPO/../shared/tools
[[ -d $TOOLS ]] || TOOLS=/work/shared/tools
export WORKDIR=${WORKDIR:-/tmp/ctrbench}
if [[ -z ${BERTHD:-} ]]; then
  BERTHD=$("$REPO/scripts/build-release" | tail -1)/berthd
fi
BIN=$(dirname "$BERTHD")
B=$WORKDIR/berth
R=$WORKDIR/ref
BPID=

cleanup() {
  if [[ -n $BPID && -d /proc/$BPID ]]; then kill -TERM "$BPID" 2>/dev/null; wait "$BPID" 2>/dev/null || true; fi
  (cd "$TOOLS" && ./refd.sh stop >/dev/null 2>&1 || true)
  (cd "$TOOLS" && ./registry.sh stop >/dev/null 2>&1 || true)
  for d in "$B" "$R"; do
    if mountpoint -q "$d"; then umount "$d" || umount -l "$d"; fi
  done
  rm -f "$WORKDIR/berth.ext4" "$WORKDIR/ref.ext4"
  remove_runtime_leftovers cb-berth
}
trap cleanup EXIT

mkdir -p "$WORKDIR"
for d in "$B" "$R"; do
  if mountpoint -q "$d"; then umount "$d"; fi
  rm -rf "$d"
  mount_fresh_ext4 "$d" "$WORKDIR/$(basename "$d").ext4" "${FS_SIZE:-6G}"
done

cd "$TOOLS"
./make-images.sh >/dev/null
./registry.sh start >/dev/null
./registry.sh push >/dev/null

mkdir -p "$B/bin"
cp "$BERTHD" "$BIN/containerd-shim-berth-v2" "$BIN/berth-runc" "$B/bin/"
write_berthd_config "$B"
"$B/bin/berthd" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
BPID=$!
for _ in $(seq 200); do ctr --address "$B/berthd.sock" version >/dev/null 2>&1 && break; sleep 0.05; done
DAEMON_PID=$BPID ./bench.sh "$B/berthd.sock" - berth >"$WORKDIR/berth.out" 2>&1 || true
kill -TERM "$BPID"; wait "$BPID" 2>/dev/null || true
BPID=

./refd.sh start >/dev/null
./bench.sh "$R/containerd.sock" "$R/pid" ref >"$WORKDIR/ref.out" 2>&1 || true
./refd.sh stop >/dev/null

echo "| metric | berthd | containerd 1.6.20 |"
echo "|---|---|---|"
paste -d'|' <(grep '^| ' "$WORKDIR/results/berth.md" | tail -n +2 | cut -d'|' -f2,3) \
  <(grep '^| ' "$WORKDIR/results/ref.md" | tail -n +2 | cut -d'|' -f3) |
  grep -v '^ metric\|^---' | sed 's/^/|/; s/$/|/'
