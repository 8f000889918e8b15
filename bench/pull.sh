#!/usr/bin/env bash
# Usage: bench/pull.sh [RUNS]
#   Image pull (issue 6): a cold pull (fetch + unpack into overlayfs) of the 5-layer
#   `layers` fixture (141 MB gzip) from a local docker-registry:
#     - `berth pull` (daemon side: berthd's transfer service downloads into its content
#       store and unpacks each layer as soon as it and its parent are there),
#     - `ctr images pull --plain-http` against the reference containerd 1.6.20
#       (../shared/tools/refd.sh),
#   one pull each per run, the order alternating between runs. Cold = each daemon starts
#   from an empty root before every pull (no content, snapshots or metadata).
#   Where the roots live (FS):
#     fresh (default)  before every run each daemon gets a newly made ext4 file system
#                      (a loop-mounted image file on the same disk, FS_SIZE, default 3G,
#                      made like the host's: no journal), as on a new node. Deleting
#                      the previous run's trees on the shared file system made the
#                      next pull wait on ext4's inode allocator, which on a journal-less
#                      ext4 skips recently deleted inodes one by one; that cost
#                      depended on the order of the pulls, not on the daemons.
#     host             the roots are directories on WORKDIR's file system, deleted
#                      together between runs, then `sync` and SETTLE seconds (default
#                      30), so no pull follows a deletion more closely than the other.
#   After each pull the unpacked tree is checked with layers.verify.sh against
#   layers.expected. Prints every run and the medians.
#   Env: BERTH_FLAGS (extra `berth pull` flags, e.g. --local for the client-side
#   pipeline), BERTHD / BERTH (default: cargo build --release), WORKDIR (private dir by
#   default), REGISTRY_ADDR (default 127.0.0.1:5077; a registry started and filled with
#   ../shared/tools/registry.sh unless it answers already).
set -euo pipefail
export LC_ALL=C

RUNS=${1:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
TOOLS=$REPO/../shared/tools
[[ -d $TOOLS ]] || TOOLS=/work/shared/tools
REFD=$TOOLS/refd.sh
command -v ctr >/dev/null || { echo "ctr not found (apt-get install containerd)" >&2; exit 1; }

if [[ -z ${BERTHD:-} || -z ${BERTH:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p berth-server -p berth-cli)
  BERTHD=${CARGO_TARGET_DIR:-$REPO/target}/release/berthd
  BERTH=${CARGO_TARGET_DIR:-$REPO/target}/release/berth
fi
OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then WORKDIR=$(mktemp -d /tmp/berth-pullbench.XXXXXX); OWN_WORKDIR=1; fi
export WORKDIR
export REGISTRY_ADDR=${REGISTRY_ADDR:-127.0.0.1:5077}
PORT=${REGISTRY_ADDR##*:}
IMAGE=localhost:$PORT/layers:latest
OWN_REGISTRY=0
if ! curl -fsS "http://$REGISTRY_ADDR/v2/layers/manifests/latest" -o /dev/null \
     -H 'Accept: application/vnd.oci.image.manifest.v1+json' 2>/dev/null; then
  # (registry.sh reads IMAGES itself, as a list of image names)
  env -u IMAGES "$TOOLS/make-images.sh" >/dev/null
  env -u IMAGES "$TOOLS/registry.sh" start >/dev/null
  env -u IMAGES "$TOOLS/registry.sh" push >/dev/null
  OWN_REGISTRY=1
fi
IMAGES=${IMAGES:-$WORKDIR/images}
[[ -f $IMAGES/layers.verify.sh ]] || env -u IMAGES "$TOOLS/make-images.sh" >/dev/null
B=$WORKDIR/berth
R=$WORKDIR/ref
FS=${FS:-fresh}
[[ $FS == fresh || $FS == host ]] || { echo "FS must be fresh or host" >&2; exit 2; }
BPID=
NS=pullbench
MNT=$WORKDIR/mnt

cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT" || true
  stop_berthd
  "$REFD" stop >/dev/null 2>&1 || true
  drop_fresh_fs
  [[ $OWN_REGISTRY == 1 ]] && env -u IMAGES "$TOOLS/registry.sh" stop >/dev/null 2>&1 || true
  if [[ $OWN_WORKDIR == 1 ]]; then
    "$REFD" clean >/dev/null 2>&1 || true
    for m in $(awk -v d="$WORKDIR" '$5 ~ "^"d { print $5 }' /proc/self/mountinfo | sort -r); do umount -l "$m" || true; done
    rm -rf --one-file-system "$WORKDIR"
  else
    rm -rf --one-file-system "$B"
  fi
}
trap cleanup EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

stop_berthd() {
  if [[ -n $BPID && -d /proc/$BPID ]]; then kill -TERM "$BPID" 2>/dev/null; wait "$BPID" 2>/dev/null || true; fi
  BPID=
  for m in $(awk -v d="$B/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do umount -l "$m" || true; done
  if mountpoint -q "$B"; then rm -rf --one-file-system "${B:?}"/*; else rm -rf --one-file-system "$B"; fi
}

drop_fresh_fs() {  # unmount and delete both daemons' file systems (FS=fresh)
  local d
  for d in "$B" "$R"; do
    if mountpoint -q "$d"; then umount "$d" || umount -l "$d"; fi
  done
  rm -f "$WORKDIR/berth.ext4" "$WORKDIR/ref.ext4"
}

make_fresh_fs() {  # a new ext4 for each daemon's root, made like the host's (no journal)
  local d
  drop_fresh_fs
  for d in "$B" "$R"; do
    mount_fresh_ext4 "$d" "$WORKDIR/$(basename "$d").ext4" "${FS_SIZE:-3G}"
  done
}

kill_berthd() {  # keeps the root (deleted between runs)
  if [[ -n $BPID && -d /proc/$BPID ]]; then kill -TERM "$BPID" 2>/dev/null; wait "$BPID" 2>/dev/null || true; fi
  BPID=
}

start_berthd() {  # from an empty root
  kill_berthd
  mkdir -p "$B"
  write_berthd_config "$B"
  "$BERTHD" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
  BPID=$!
  for _ in $(seq 1 500); do ctr --address "$B/berthd.sock" version >/dev/null 2>&1 && return 0; sleep 0.02; done
  cat "$B/log" >&2; return 1
}

start_refd() {  # on the root left by settle (empty)
  "$REFD" start >/dev/null
}

settle() {  # both roots gone (FS=host: then let the file system forget the deletions)
  stop_berthd
  if [[ $FS == fresh ]]; then
    "$REFD" stop >/dev/null 2>&1 || true
    make_fresh_fs
    sync
    sleep "${SETTLE:-5}"
  else
    "$REFD" clean >/dev/null 2>&1 || true
    sync
    sleep "${SETTLE:-30}"
  fi
}

verify() {  # address
  local c="ctr --address $1 --namespace $NS" image
  image=$($c images ls -q | head -1)
  mkdir -p "$MNT"
  $c images mount "$image" "$MNT" >/dev/null
  sed "s#cd / #cd $MNT #" "$IMAGES/layers.verify.sh" | sh | diff -q - "$IMAGES/layers.expected" >/dev/null && echo ok || echo FAIL
  $c images unmount "$MNT" >/dev/null
}

berth_run() {
  start_berthd
  local t ms
  t=$(date +%s%N)
  "$BERTH" --address "$B/berthd.sock" --namespace "$NS" pull --quiet ${BERTH_FLAGS:-} --hosts-dir /nonexistent "$IMAGE" >/dev/null
  ms=$(ms_since "$t")
  echo "$ms $(verify "$B/berthd.sock")"
  kill_berthd
}

ctr_run() {
  start_refd
  local a=$WORKDIR/ref/containerd.sock t ms
  t=$(date +%s%N)
  ctr --address "$a" --namespace "$NS" images pull --plain-http "$IMAGE" >/dev/null
  ms=$(ms_since "$t")
  echo "$ms $(verify "$a")"
  "$REFD" stop >/dev/null 2>&1 || true
}

stats() { sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s (%s–%s)", m, v[1], v[NR] }'; }

b_all=() c_all=()
for i in $(seq 1 "$RUNS"); do
  settle
  if (( i % 2 )); then b=$(berth_run); c=$(ctr_run); else c=$(ctr_run); b=$(berth_run); fi
  echo "run $i: berth pull $b | ctr images pull $c (ms, tree check)" >&2
  b_all+=("$b"); c_all+=("$c")
done
bm=$(printf '%s\n' "${b_all[@]}" | awk '{ print $1 }' | stats)
cm=$(printf '%s\n' "${c_all[@]}" | awk '{ print $1 }' | stats)
echo
echo "Runs: $RUNS each, order alternating, roots on $([[ $FS == fresh ]] && echo "a fresh ext4 per daemon and run" || echo "the host file system, ${SETTLE:-30} s settle after deletions"); overlayfs; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%dT%H:%MZ)."
echo
echo "| client → daemon | cold pull + unpack, ms: median (min–max) | every run | tree verified |"
echo "|---|---|---|---|"
echo "| \`berth pull${BERTH_FLAGS:+ $BERTH_FLAGS}\` → berthd$([[ -n ${BERTH_FLAGS:-} ]] || echo " (transfer service)") | $bm | $(printf '%s\n' "${b_all[@]}" | awk '{ printf "%s ", $1 }') | $(printf '%s\n' "${b_all[@]}" | awk '{ print $2 }' | sort -u | tr '\n' ' ') |"
echo "| \`ctr images pull --plain-http\` → containerd 1.6.20 | $cm | $(printf '%s\n' "${c_all[@]}" | awk '{ printf "%s ", $1 }') | $(printf '%s\n' "${c_all[@]}" | awk '{ print $2 }' | sort -u | tr '\n' ' ') |"
