#!/usr/bin/env bash
# Usage: bench/runtime.sh [ROUNDS]
#   Container latency and memory of berthd next to the reference containerd
#   (../shared/tools/refd.sh), both running at the same time, in one sitting:
#   - `ctr run --rm IMG true`: ROUNDS (default 6) rounds; each round does RUN_BATCH (5)
#     runs on every target in turn (berthd + runc shim, berthd + Berth's shim, and
#     containerd + runc shim), so load changes hit all of them alike; p50/p90 over all runs.
#   - 10 detached `sleep` containers (--null-io) per target: the daemon's VmRSS with them
#     running, and the total VmRSS of their shims.
#   Run as root; needs ctr, runc, containerd. Env: BERTHD and SHIM (default: build them
#   with scripts/build-release), WORKDIR (default: a private directory under /tmp),
#   BERTH_RUNC (the berth-runc Berth's shim runs by default; default: next to SHIM; "none":
#   runc), EXTRA_RUNTIMES (e.g. "runc" or "crun": also berthd + Berth's shim with
#   BinaryName=runc/crun), IMAGE_TAR
#   (default: tests/fixtures/build-images.sh's busybox), RUN_BATCH, N_SLEEP.
set -euo pipefail
export LC_ALL=C

ROUNDS=${1:-6}
RUN_BATCH=${RUN_BATCH:-5}
N_SLEEP=${N_SLEEP:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
REFD=$REPO/../shared/tools/refd.sh
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || { sed -n '2,13p' "$0" >&2; exit 2; }

if [[ -z ${BERTHD:-} ]]; then
  bindir=$("$REPO/scripts/build-release" | tail -1)
  BERTHD=$bindir/berthd
  SHIM=${SHIM:-$bindir/containerd-shim-berth-v2}
fi
SHIM=${SHIM:-$(dirname "$BERTHD")/containerd-shim-berth-v2}
[[ -x $BERTHD && -x $SHIM ]] || { echo "berthd/shim not found ($BERTHD, $SHIM)" >&2; exit 1; }

OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then
  WORKDIR=$(mktemp -d /tmp/berth-rtbench.XXXXXX)
  OWN_WORKDIR=1
fi
export WORKDIR
B=$WORKDIR/berth
FIFO=$WORKDIR/fifo
BPID=
mkdir -p "$B/bin" "$FIFO"
# berthd looks for shims next to its own binary first.
cp "$BERTHD" "$B/bin/berthd"
cp "$SHIM" "$B/bin/containerd-shim-berth-v2"
# Berth's shim runs berth-runc (found next to the shim) unless BERTH_RUNC=none.
BERTH_RUNC=${BERTH_RUNC:-$(dirname "$SHIM")/berth-runc}
[[ $BERTH_RUNC == none ]] || cp "$BERTH_RUNC" "$B/bin/berth-runc"

cleanup() {
  for ns in rt; do
    for a in "$B/berthd.sock"; do
      [[ -S $a ]] || continue
      for c in $(ctr --address "$a" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr --address "$a" -n "$ns" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      done
    done
  done
  if [[ -n $BPID && -d /proc/$BPID ]]; then
    kill -TERM "$BPID" 2>/dev/null || true
    sleep 1
    kill -KILL "$BPID" 2>/dev/null || true
  fi
  # Shims and containers berthd left (their bundles are under $B/state).
  for f in "$B"/state/io.containerd.runtime.v2.task/*/*/init.pid; do
    [[ -f $f ]] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/cwd" 2>/dev/null) == "$B"/state/* ]] && kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
  sleep 0.5
  # `|| true`: with pipefail, grep finding no mount failed the pipeline, and set -e then
  # ended the cleanup before the reference containerd was stopped.
  { grep -o " $B/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  "$REFD" stop >/dev/null 2>&1 || true
  remove_runtime_leftovers rt
  if [[ $OWN_WORKDIR == 1 ]]; then
    "$REFD" clean >/dev/null 2>&1 || true
    rm -rf --one-file-system "$WORKDIR"
  else
    rm -rf --one-file-system "$B"
  fi
}
trap cleanup EXIT

IMAGE_TAR=${IMAGE_TAR:-}
if [[ -z $IMAGE_TAR ]]; then
  IMAGE_TAR=$WORKDIR/fixtures/busybox.oci.tar
  "$REPO/tests/fixtures/build-images.sh" "$WORKDIR/fixtures" >/dev/null
fi
IMG=import.local/busybox:latest

write_berthd_config "$B"
# Both daemons start with their executables out of the page cache, as in startup.sh.
for exe in "$B/bin/berthd" "$B/bin/containerd-shim-berth-v2" "$(command -v "${CONTAINERD_BIN:-containerd}")"; do
  evict_from_page_cache "$exe"
done
"$B/bin/berthd" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
BPID=$!
"$REFD" start >/dev/null
RPID=$(cat "$WORKDIR/ref/pid")
BADDR=$B/berthd.sock
RADDR=$WORKDIR/ref/containerd.sock
for _ in $(seq 200); do ctr --address "$BADDR" version >/dev/null 2>&1 && break; sleep 0.05; done

for a in "$BADDR" "$RADDR"; do
  ctr --address "$a" -n rt images import "$IMAGE_TAR" >/dev/null
done

# Targets: label, address, extra ctr run flags.
# io.containerd.runc.v2 is what unchanged clients ask for: berthd serves it with Berth's
# shim by default; the stock runc shim is named by its path.
targets=("berthd+runc-shim|$BADDR|--runtime $(command -v containerd-shim-runc-v2)"
         "berthd+default-runtime|$BADDR|--runtime io.containerd.runc.v2"
         "berthd+berth-shim|$BADDR|--runtime io.containerd.berth.v2"
         "containerd+runc-shim|$RADDR|--runtime io.containerd.runc.v2")
# Berth's shim reads BinaryName from runtimeoptions.v1.Options, which is what ctr sends for
# a non-runc runtime given --runtime-config-path.
for rt in ${EXTRA_RUNTIMES:-}; do
  printf 'BinaryName = "%s"\n' "$rt" >"$WORKDIR/$rt.toml"
  targets+=("berthd+berth-shim+$rt|$BADDR|--runtime io.containerd.berth.v2 --runtime-config-path $WORKDIR/$rt.toml")
done

declare -A lat
now_us() { echo "${EPOCHREALTIME/./}"; }
run_once() {  # address, flags, id
  local t0 t1
  t0=$(now_us)
  # shellcheck disable=SC2086
  ctr --address "$1" -n rt run --rm --fifo-dir "$FIFO" $2 "$IMG" "$3" true </dev/null >/dev/null
  t1=$(now_us)
  echo $(( (t1 - t0) / 1000 ))
}

for t in "${targets[@]}"; do  # warm-up
  IFS='|' read -r label addr flags <<<"$t"
  run_once "$addr" "$flags" warm >/dev/null
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    IFS='|' read -r label addr flags <<<"$t"
    for i in $(seq 1 "$RUN_BATCH"); do
      lat[$label]+="$(run_once "$addr" "$flags" "r$r-$i") "
    done
  done
  echo "round $r/$ROUNDS done" >&2
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

pct() {  # pct P numbers...
  local p=$1; shift
  printf '%s\n' "$@" | sort -n | awk -v p="$p" '{ v[NR] = $1 } END { i = int((NR - 1) * p / 100 + 0.5) + 1; print v[i] }'
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
declare -A daemon_rss shim_rss idle_rss
sleepers() {  # label, address, flags, daemon pid
  local label=$1 addr=$2 flags=$3 pid=$4 i total=0 n=0 p pp
  idle_rss[$label]=$(rss_kib "$pid")
  for i in $(seq 1 "$N_SLEEP"); do
    # shellcheck disable=SC2086
    ctr --address "$addr" -n rt run -d --null-io $flags "$IMG" "sleep-$i" sleep 3600 </dev/null >/dev/null
  done
  sleep 2
  daemon_rss[$label]=$(rss_kib "$pid")
  for p in $(ctr --address "$addr" -n rt tasks ls | awk 'NR > 1 && $1 ~ /^sleep-/ { print $2 }'); do
    pp=$(awk '/^PPid:/ { print $2 }' "/proc/$p/status")
    total=$((total + $(rss_kib "$pp"))); n=$((n + 1))
  done
  shim_rss[$label]="$n $total"
  for i in $(seq 1 "$N_SLEEP"); do
    ctr --address "$addr" -n rt tasks kill -s SIGKILL "sleep-$i" >/dev/null 2>&1 || true
  done
  sleep 1
  for i in $(seq 1 "$N_SLEEP"); do
    ctr --address "$addr" -n rt tasks rm "sleep-$i" >/dev/null 2>&1 || true
    ctr --address "$addr" -n rt containers rm "sleep-$i" >/dev/null 2>&1 || true
  done
}
for t in "${targets[@]}"; do
  IFS='|' read -r label addr flags <<<"$t"
  if [[ $addr == "$BADDR" ]]; then pid=$BPID; else pid=$RPID; fi
  sleepers "$label" "$addr" "$flags" "$pid"
done

echo
echo "$ROUNDS rounds x $RUN_BATCH runs per target; $(nproc) CPUs; load average $load_before (start) / $load_after (end); $(date -u '+%Y-%m-%d %H:%M UTC')."
echo
echo "| target | run --rm true p50 / p90 / min (ms) | daemon RSS idle → with $N_SLEEP sleepers (MiB) | shims: count, total RSS (MiB) |"
echo "|---|---|---|---|"
for t in "${targets[@]}"; do
  IFS='|' read -r label addr flags <<<"$t"
  # shellcheck disable=SC2086
  set -- ${lat[$label]}
  read -r n total <<<"${shim_rss[$label]}"
  awk -v l="$label" -v p50="$(pct 50 "$@")" -v p90="$(pct 90 "$@")" -v mn="$(pct 0 "$@")" \
      -v i="${idle_rss[$label]}" -v d="${daemon_rss[$label]}" -v n="$n" -v s="$total" \
      'BEGIN { printf "| %s | %d / %d / %d | %.1f → %.1f | %d, %.1f |\n", l, p50, p90, mn, i / 1024, d / 1024, n, s / 1024 }'
done
