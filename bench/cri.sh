#!/usr/bin/env bash
# Usage: bench/cri.sh [ROUNDS]
#   The CRI image service (plugin io.containerd.grpc.v1.cri) of berthd next to the
#   reference containerd 1.6.20's CRI plugin, both driven by the same CRI client
#   (crates/cri/examples/cri_pull.rs, over each daemon's main socket, as the kubelet or
#   crictl), images from a private docker-registry on 127.0.0.1 (plain HTTP through a
#   `registry.config_path` hosts directory). Each daemon first pulls both images once
#   (not measured); then ROUNDS (default 5) rounds, in each for each daemon (the order
#   alternating between rounds):
#     - RemoveImage of `layers` (timed) and `busybox`; then until `ctr -n k8s.io content
#       ls` and `snapshots ls` are empty (the garbage collection done); then sync and
#       the registry's blobs dropped from the page cache;
#     - PullImage of `layers` (5 layers, 141 MB gzip), cold: nothing of it on the daemon;
#     - PullImage of `layers` again, warm: image record, content and snapshots present;
#     - PullImage of `busybox` (1 layer, 1 MB; shares nothing with `layers`), cold;
#     - ImageStatus of `layers` and ListImages: the median of 20 calls each;
#     - the daemon's VmRSS, and its CPU time during the cold pull.
#   Times are measured inside the client around one gRPC call (connected beforehand).
#   Prints every round and a table of medians (min–max over the rounds). After the last
#   round, both daemons' unpacked `layers` trees are checked against layers.expected and
#   their `ctr -n k8s.io` images, content, snapshots and leases are listed (stderr).
#   Both daemons run for the whole benchmark, each with its root, state and socket on its
#   own newly made ext4 (mount_fresh_ext4, FS_SIZE, default 3G), with a journal: on a
#   journal-less ext4, as this host's, creating a file steps one by one over the inodes
#   freed in the last minute (ext4's recently_deleted; up to 6 minutes while their inode
#   table block is dirty), which made a cold pull right after RemoveImage take 5-6 s
#   instead of 0.7 s on either daemon (perf: ~90 % of it there). containerd (CONTAINERD,
#   default containerd in PATH) runs from a generated config with the CRI plugin enabled,
#   in a private mount namespace whose /run is its own (as ../shared/tools/refd.sh).
#   Run as root. Env: BERTHD (default: scripts/build-release), CRI_PULL (the client;
#   default: cargo build -p berth-cri --example cri_pull, dev profile), WORKDIR (default:
#   a private mktemp dir, deleted at the end), REGISTRY_PORT (default: the first free
#   port from 5080), CALLS (default 20: ImageStatus/ListImages calls per round).
set -euo pipefail
export LC_ALL=C

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
ROUNDS=${1:-5}
[[ $# -le 1 && $ROUNDS =~ ^[1-9][0-9]*$ ]] || usage
[[ $(id -u) == 0 ]] || { echo "bench/cri.sh: run as root" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
TOOLS=$REPO/../shared/tools
[[ -d $TOOLS ]] || TOOLS=/work/shared/tools
CALLS=${CALLS:-20}
CONTAINERD=${CONTAINERD:-$(command -v containerd || true)}
for t in ctr skopeo docker-registry jq curl unshare mkfs.ext4; do
  command -v "$t" >/dev/null || { echo "bench/cri.sh: $t not found (scripts/install-deps)" >&2; exit 1; }
done
[[ -x $CONTAINERD ]] || { echo "bench/cri.sh: containerd not found (apt-get install containerd)" >&2; exit 1; }

if [[ -z ${BERTHD:-} ]]; then
  BERTHD=$("$REPO/scripts/build-release" | tail -1)/berthd
fi
if [[ -z ${CRI_PULL:-} ]]; then
  (cd "$REPO" && cargo build -q -p berth-cri --example cri_pull)
  CRI_PULL=${CARGO_TARGET_DIR:-$REPO/target}/debug/examples/cri_pull
fi
OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then WORKDIR=$(mktemp -d /tmp/berth-cribench.XXXXXX); OWN_WORKDIR=1; fi
mkdir -p "$WORKDIR"
export WORKDIR
B=$WORKDIR/berth
R=$WORKDIR/ref
HOSTS=$WORKDIR/hosts
MNT=$WORKDIR/mnt
BPID= CPID= REG_STARTED=0

if [[ -z ${REGISTRY_PORT:-} ]]; then
  for p in $(seq 5080 5199); do
    ss -Hltn "sport = :$p" | grep -q . || { REGISTRY_PORT=$p; break; }
  done
fi
export REGISTRY_ADDR=127.0.0.1:$REGISTRY_PORT
LAYERS=$REGISTRY_ADDR/layers:latest
BUSYBOX=$REGISTRY_ADDR/busybox:latest

stop_pid() {  # PID: SIGTERM, up to 15 s, then SIGKILL
  local pid=$1
  [[ -n $pid && -d /proc/$pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local d m
  mountpoint -q "$MNT" 2>/dev/null && { umount "$MNT" || umount -l "$MNT"; }
  stop_pid "$BPID"; BPID=
  stop_pid "$CPID"; CPID=
  [[ $REG_STARTED == 1 ]] && env IMAGES= "$TOOLS/registry.sh" stop >/dev/null 2>&1
  for d in "$B" "$R"; do
    for m in $(awk -v d="$d/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" || true
    done
    if mountpoint -q "$d"; then umount "$d" 2>/dev/null || umount -l "$d"; fi
  done
  rm -f "$WORKDIR/berth.ext4" "$WORKDIR/ref.ext4"
  [[ $OWN_WORKDIR == 1 ]] && rm -rf --one-file-system "$WORKDIR"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- registry with the fixtures ---------------------------------------------------------
# (registry.sh reads IMAGES as the list of images to push)
env -u IMAGES "$TOOLS/make-images.sh" >/dev/null
if env -u IMAGES "$TOOLS/registry.sh" status 2>/dev/null; then
  echo "bench/cri.sh: a registry of WORKDIR=$WORKDIR runs already; use another WORKDIR" >&2; exit 1
fi
env -u IMAGES "$TOOLS/registry.sh" start >/dev/null
REG_STARTED=1
IMAGES="busybox layers" "$TOOLS/registry.sh" push >/dev/null
for name in "$REGISTRY_ADDR" localhost:"$REGISTRY_PORT"; do
  mkdir -p "$HOSTS/$name"
  echo "server = \"http://$REGISTRY_ADDR\"" >"$HOSTS/$name/hosts.toml"
done

# The CRI section both daemons are given (containerd needs sandbox_image and cni only to
# start; the image service never uses them).
cri_section() {  # DIR
  cat <<CFG
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:1/absent/pause:none"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$1/cni/bin"
    conf_dir = "$1/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$HOSTS"
CFG
}

# --- berthd ------------------------------------------------------------------------------
mount_fresh_ext4 "$B" "$WORKDIR/berth.ext4" "${FS_SIZE:-3G}" journal
write_berthd_config "$B"
cri_section "$B" >>"$B/config.toml"
evict_from_page_cache "$BERTHD"
"$BERTHD" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
BPID=$!
BSOCK=$B/berthd.sock

# --- containerd 1.6 with its CRI plugin ------------------------------------------------
mount_fresh_ext4 "$R" "$WORKDIR/ref.ext4" "${FS_SIZE:-3G}" journal
start_containerd_in_private_run "$R" "$CONTAINERD" "$(cri_section "$R" | sed 's/^/  /')"

wait_for_ctr "$BSOCK" "$CSOCK"
[[ $(readlink -f "/proc/$CPID/exe") == "$(readlink -f "$CONTAINERD")" ]] || { echo "containerd's PID is not $CPID" >&2; exit 1; }
for sock in "$BSOCK" "$CSOCK"; do
  if ! ctr --address "$sock" plugins ls | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" && $NF == "ok" { f = 1 } END { exit !f }'; then
    ctr --address "$sock" plugins ls | grep -E 'cri|PLATFORMS' >&2
    echo "bench/cri.sh: the CRI plugin did not load on $sock" >&2; exit 1
  fi
done

# --- one round -----------------------------------------------------------------------------
cri() { "$CRI_PULL" "$@"; }
k8s() { ctr --address "$1" --namespace k8s.io "${@:2}"; }
median() { sort -g | awk '{ v[NR] = $1 } END { printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / hz) }' "/proc/$1/stat"; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

empty_k8s() {  # SOCKET: waits until no content and no snapshot is left in k8s.io;
  local n i  # prints how many checks that took (1: all gone when RemoveImage returned)
  for i in $(seq 300); do
    n=$(( $(k8s "$1" content ls -q | wc -l) + $(k8s "$1" snapshots --snapshotter overlayfs ls | tail -n +2 | wc -l) ))
    (( n == 0 )) && { echo "$i"; return 0; }
    sleep 0.1
  done
  echo "bench/cri.sh: $1 still has content or snapshots in k8s.io 30 s after RemoveImage:" >&2
  k8s "$1" content ls >&2; k8s "$1" snapshots ls >&2
  return 1
}

clear_images() {  # SOCKET: RemoveImage of both; prints "remove_ms checks"
  local remove checks
  remove=$(cri "$1" "$LAYERS" remove)
  cri "$1" "$BUSYBOX" remove >/dev/null
  checks=$(empty_k8s "$1")
  echo "$remove $checks"
}

measure() {  # SOCKET PID: prints "cold warm busybox status list rss_mib cold_cpu_ms"
  local sock=$1 cold warm bb st ls cpu0 cpu
  sync
  find "$WORKDIR/registry/data" -type f | while read -r f; do evict_from_page_cache "$f"; done
  cpu0=$(cpu_ms "$2")
  cold=$(cri "$sock" "$LAYERS" pull)
  cpu=$(( $(cpu_ms "$2") - cpu0 ))
  warm=$(cri "$sock" "$LAYERS" pull)
  bb=$(cri "$sock" "$BUSYBOX" pull)
  st=$(cri "$sock" "$LAYERS" status "$CALLS" | median)
  ls=$(cri "$sock" "$LAYERS" list "$CALLS" | median)
  echo "$cold $warm $bb $st $ls $(rss_mib "$2") $cpu"
}

# Each daemon pulls both images once first (not measured), so that every round's
# RemoveImage removes them and every daemon's first pull is behind it.
for sock in "$BSOCK" "$CSOCK"; do
  cri "$sock" "$LAYERS" pull >/dev/null
  cri "$sock" "$BUSYBOX" pull >/dev/null
done
echo "bench/cri.sh: $ROUNDS rounds, berthd $BERTHD (pid $BPID), containerd $("$CONTAINERD" --version | awk '{ print $3 }') (pid $CPID), registry $REGISTRY_ADDR; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
START=$(date -u +%Y-%m-%dT%H:%MZ) LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
b_all=() c_all=()
for i in $(seq "$ROUNDS"); do
  bc=$(clear_images "$BSOCK") cc=$(clear_images "$CSOCK")
  if (( i % 2 )); then
    bm=$(measure "$BSOCK" "$BPID"); cm=$(measure "$CSOCK" "$CPID")
  else
    cm=$(measure "$CSOCK" "$CPID"); bm=$(measure "$BSOCK" "$BPID")
  fi
  b="$bm $bc" c="$cm $cc"
  echo "round $i ($( (( i % 2 )) && echo berthd first || echo containerd first)): cold warm busybox status list rss_mib cold_cpu remove checks — berthd: $b | containerd: $c" >&2
  b_all+=("$b"); c_all+=("$c")
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# --- what the pulls left: the unpacked tree, the image records ------------------------------
verify() {  # SOCKET
  local image=$LAYERS result
  mkdir -p "$MNT"
  k8s "$1" images mount "$image" "$MNT" >/dev/null
  result=$(sed "s#cd / #cd $MNT #" "$WORKDIR/images/layers.verify.sh" | sh | diff -q - "$WORKDIR/images/layers.expected" >/dev/null && echo ok || echo FAIL)
  k8s "$1" images unmount --rm "$MNT" >/dev/null
  echo "$result"
}
VB=$(verify "$BSOCK") VC=$(verify "$CSOCK")
for d in berthd:"$BSOCK" containerd:"$CSOCK"; do
  for what in "images ls" "content ls" "snapshots ls" "leases ls"; do
    echo "--- ctr -n k8s.io $what, ${d%%:*}" >&2
    # shellcheck disable=SC2086 # (two words)
    k8s "${d#*:}" $what >&2
  done
done

# --- the table -------------------------------------------------------------------------------
# Three significant digits or more: 1234, 123, 12.3, 1.23, 0.123.
FMT='function f(v) { return sprintf(v == int(v) ? "%d" : v >= 100 ? "%.0f" : v >= 10 ? "%.1f" : v >= 1 ? "%.2f" : "%.3f", v) }'
stat() {  # COLUMN (1-based) VALUES…: median (min–max)
  local col=$1; shift
  printf '%s\n' "$@" | awk -v c="$col" '{ print $c }' | sort -g |
    awk "$FMT"' { v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s (%s–%s)", f(m), f(v[1]), f(v[NR]) }'
}
every() { printf '%s\n' "${@:2}" | awk -v c="$1" "$FMT"' { printf "%s%s", (NR > 1 ? " " : ""), f($c) }'; }
row() {  # LABEL COLUMN
  echo "| $1 | $(stat "$2" "${b_all[@]}") | $(stat "$2" "${c_all[@]}") | $(every "$2" "${b_all[@]}") | $(every "$2" "${c_all[@]}") |"
}
echo
echo "Rounds: $ROUNDS per daemon, order alternating, both daemons running throughout, roots on a fresh ext4 (with a journal) each; overlayfs; $(nproc) CPUs; $START–$(date -u +%H:%MZ); load $LOAD0 at the start, $LOAD1 at the end. Unpacked \`layers\` tree after the last round: berthd $VB, containerd $VC."
echo
echo "| CRI call (ms unless noted) | berthd: median (min–max) | containerd 1.6.20 | berthd, every round | containerd, every round |"
echo "|---|---|---|---|---|"
row "PullImage \`layers\`, cold" 1
row "PullImage \`layers\`, warm (image present)" 2
row "PullImage \`busybox\`, cold" 3
row "ImageStatus \`layers\` (median of $CALLS calls)" 4
row "ListImages, 2 images (median of $CALLS calls)" 5
row "daemon VmRSS after the pulls, MiB" 6
row "daemon CPU time (user + sys) during the cold PullImage \`layers\`" 7
row "RemoveImage \`layers\` (synchronous GC)" 8
row "\`ctr\` checks until k8s.io has no content and no snapshot (1: none left when RemoveImage returned)" 9
