#!/usr/bin/env bash
# Usage: bench/snapshots.sh [RUNS]
#   Snapshots and diff (issue 4): unpack of the 5-layer `layers` fixture image through
#   `ctr images import` (client-driven unpack: snapshots Prepare/Commit + diff Apply per
#   layer) and snapshot prepare/remove latency, for berthd next to the reference
#   containerd (../shared/tools/refd.sh) in the same run, both on overlayfs.
#   Per run and daemon: cold state, `import --no-unpack` (ingest only), then `import`
#   again (content present: unpack + image record = "unpack"), a check of the unpacked
#   tree (layers.verify.sh), then N_SNAP (50) `snapshots prepare` on the image's chain
#   and N_SNAP `snapshots rm`. Prints medians (and ranges) over RUNS (default 3).
#   Env: BERTHD (default: cargo build --release), WORKDIR (private dir by default),
#   IMAGES (dir with layers.oci.tar and layers.verify.sh; default: built with
#   ../shared/tools/make-images.sh under WORKDIR), N_SNAP.
set -euo pipefail
export LC_ALL=C

RUNS=${1:-3}
N_SNAP=${N_SNAP:-50}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
TOOLS=$REPO/../shared/tools
REFD=$TOOLS/refd.sh
command -v ctr >/dev/null || { echo "ctr not found (apt-get install containerd)" >&2; exit 1; }

if [[ -z ${BERTHD:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p berth-server --bin berthd)
  BERTHD=${CARGO_TARGET_DIR:-$REPO/target}/release/berthd
fi
OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then WORKDIR=$(mktemp -d /tmp/berth-snapbench.XXXXXX); OWN_WORKDIR=1; fi
export WORKDIR
if [[ -z ${IMAGES:-} ]]; then "$TOOLS/make-images.sh" >/dev/null; IMAGES=$WORKDIR/images; fi
B=$WORKDIR/berth
BPID=
NS=snapbench
MNT=$WORKDIR/mnt

cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && umount "$MNT" || true
  if [[ -n $BPID && -d /proc/$BPID ]]; then kill -TERM "$BPID" 2>/dev/null; wait "$BPID" 2>/dev/null || true; fi
  [[ -x $REFD ]] && "$REFD" stop >/dev/null 2>&1 || true
  if [[ $OWN_WORKDIR == 1 ]]; then
    [[ -x $REFD ]] && "$REFD" clean >/dev/null 2>&1 || true
    for m in $(awk -v d="$WORKDIR" '$5 ~ "^"d { print $5 }' /proc/self/mountinfo | sort -r); do umount -l "$m" || true; done
    rm -rf --one-file-system "$WORKDIR"
  else
    rm -rf --one-file-system "$B"
  fi
}
trap cleanup EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

start_berthd() {
  mkdir -p "$B"
  write_berthd_config "$B"
  "$BERTHD" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
  BPID=$!
  for _ in $(seq 1 500); do ctr --address "$B/berthd.sock" version >/dev/null 2>&1 && return 0; sleep 0.02; done
  cat "$B/log" >&2; return 1
}

# One run against ADDRESS: prints "ingest_ms unpack_ms verified prepare_p50 rm_p50".
one_run() {
  local a=$1 c="ctr --address $1 --namespace $NS"
  # Cold: no image, content or snapshots in the namespace.
  $c images rm $($c images ls -q) >/dev/null 2>&1 || true
  for _ in 1 2 3 4 5 6 7; do
    $c snapshots ls | awk 'NR > 1 { print $1 }' | xargs -r $c snapshots rm >/dev/null 2>&1 || true
  done
  $c content ls -q | xargs -r $c content rm >/dev/null 2>&1 || true
  local t ingest unpack
  t=$(date +%s%N); $c images import --no-unpack --base-name bench/layers "$IMAGES/layers.oci.tar" >/dev/null; ingest=$(ms_since "$t")
  t=$(date +%s%N); $c images import --base-name bench/layers "$IMAGES/layers.oci.tar" >/dev/null; unpack=$(ms_since "$t")
  local image top verified
  image=$($c images ls -q | head -1)
  mkdir -p "$MNT"
  $c images mount "$image" "$MNT" >/dev/null
  verified=$(sed "s#cd / #cd $MNT #" "$IMAGES/layers.verify.sh" | sh | diff -q - "$IMAGES/layers.expected" >/dev/null && echo ok || echo FAIL)
  $c images unmount "$MNT" >/dev/null
  top=$($c snapshots ls | awk 'NR > 1 && $3 == "Committed" { print $1 " " $2 }' | awk '{ n[$1] = 1; p[$2] = 1 } END { for (k in n) if (!(k in p)) print k }' | head -1)
  local i prep=() rm=()
  for i in $(seq 1 "$N_SNAP"); do t=$(date +%s%N); $c snapshots prepare "bench-$i" "$top" >/dev/null; prep+=("$(ms_since "$t")"); done
  for i in $(seq 1 "$N_SNAP"); do t=$(date +%s%N); $c snapshots rm "bench-$i" >/dev/null; rm+=("$(ms_since "$t")"); done
  echo "$ingest $unpack $verified $(printf '%s\n' "${prep[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }') $(printf '%s\n' "${rm[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
}

stats() { sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s (%s–%s)", m, v[1], v[NR] }'; }

declare -A res
run_daemon() {  # label address
  local label=$1 addr=$2 i line
  for i in $(seq 1 "$RUNS"); do
    line=$(one_run "$addr")
    echo "$label run $i: ingest/unpack ms, verified, prepare/rm p50 ms: $line" >&2
    res[$label]+="$line"$'\n'
  done
}

start_berthd
run_daemon berthd "$B/berthd.sock"
kill -TERM "$BPID"; wait "$BPID" 2>/dev/null || true; BPID=
if [[ -x $REFD ]] && command -v containerd >/dev/null; then
  "$REFD" start >/dev/null 2>&1
  run_daemon containerd "$WORKDIR/ref/containerd.sock"
  "$REFD" stop >/dev/null 2>&1 || true
fi

col() { printf '%s' "${res[$1]}" | awk -v k="$2" 'NF { print $k }' | stats; }
echo
echo "Runs: $RUNS per daemon, overlayfs, \`layers\` fixture (5 layers, 141 MB gzip, ~190 MB unpacked); $(nproc) CPUs; $(date -u +%Y-%m-%d)."
echo
echo "| daemon | import --no-unpack (ingest), ms | import with content present (unpack), ms | tree verified | snapshot prepare p50, ms | snapshot rm p50, ms |"
echo "|---|---|---|---|---|---|"
for d in berthd containerd; do
  [[ -n ${res[$d]:-} ]] || continue
  echo "| $d | $(col "$d" 1) | $(col "$d" 2) | $(printf '%s' "${res[$d]}" | awk 'NF { print $3 }' | sort -u | tr '\n' ' ') | $(col "$d" 4) | $(col "$d" 5) |"
done
