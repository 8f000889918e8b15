#!/usr/bin/env bash
# Usage: bench/startup.sh [RUNS]
#   Start-up time (spawn -> first answered `ctr version`) and idle RSS of berthd, next to
#   the reference containerd started with ../shared/tools/refd.sh in the same run.
#   Each daemon is started RUNS times (default 5) from scratch; the table shows the
#   median and the range. Run as root; needs ctr (Debian's containerd package).
#   Env: BERTHD (default: the deployable build of scripts/build-release), IDLE_SECONDS (2),
#   WORKDIR (default: a private directory under /tmp, removed at the end).
set -euo pipefail
export LC_ALL=C

RUNS=${1:-5}
IDLE_SECONDS=${IDLE_SECONDS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
REFD=$REPO/../shared/tools/refd.sh
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || { sed -n '2,8p' "$0" >&2; exit 2; }
command -v ctr >/dev/null || { echo "ctr not found (apt-get install containerd)" >&2; exit 1; }

if [[ -z ${BERTHD:-} ]]; then
  BERTHD=$("$REPO/scripts/build-release" | tail -1)/berthd
fi
[[ -x $BERTHD ]] || { echo "berthd not found at $BERTHD" >&2; exit 1; }

OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then
  WORKDIR=$(mktemp -d /tmp/berth-bench.XXXXXX)
  OWN_WORKDIR=1
fi
export WORKDIR
B=$WORKDIR/berth
BPID=

cleanup() {
  if [[ -n $BPID && -d /proc/$BPID ]]; then kill -KILL "$BPID" 2>/dev/null || true; fi
  if [[ -x $REFD ]]; then "$REFD" stop >/dev/null 2>&1 || true; fi
  if [[ $OWN_WORKDIR == 1 ]]; then
    if [[ -x $REFD ]]; then "$REFD" clean >/dev/null 2>&1 || true; fi
    rm -rf --one-file-system "$WORKDIR"
  else
    rm -rf --one-file-system "$B"
  fi
}
trap cleanup EXIT

now_ns() { date +%s%N; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Polls `ctr version` until it answers; prints the milliseconds since $1 (ns). Both
# daemons create their gRPC socket last, so the (cheap) wait for the socket file comes
# first: a `ctr` aimed at a missing socket waits out its whole connect timeout.
wait_answer_ms() {
  local start=$1 address=$2
  for _ in $(seq 1 6000); do
    [[ -S $address ]] && break
    sleep 0.002
  done
  for _ in $(seq 1 3000); do
    if ctr --address "$address" --connect-timeout 1s version >/dev/null 2>&1; then
      echo $(( ($(now_ns) - start) / 1000000 ))
      return 0
    fi
    sleep 0.005
  done
  return 1
}

# Like refd.sh, the root (metadata, content) survives between runs and the state does
# not; the first run creates the root.
berth_once() {
  rm -rf "$B/state"; mkdir -p "$B"
  write_berthd_config "$B"
  evict_from_page_cache "$BERTHD"
  local start; start=$(now_ns)
  "$BERTHD" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
  BPID=$!
  local ms; ms=$(wait_answer_ms "$start" "$B/berthd.sock") || { cat "$B/log" >&2; return 1; }
  sleep "$IDLE_SECONDS"
  local rss; rss=$(rss_kib "$BPID")
  kill -TERM "$BPID"; wait "$BPID" 2>/dev/null || true; BPID=
  echo "$ms $rss"
}

ref_once() {
  local address=$WORKDIR/ref/containerd.sock
  "$REFD" stop >/dev/null 2>&1 || true
  evict_from_page_cache "$(command -v "${CONTAINERD_BIN:-containerd}")"
  local start; start=$(now_ns)
  "$REFD" start >/dev/null 2>&1 &
  local starter=$!
  local ms; ms=$(wait_answer_ms "$start" "$address") || { wait "$starter" || true; return 1; }
  wait "$starter" || true
  sleep "$IDLE_SECONDS"
  local rss; rss=$(rss_kib "$(cat "$WORKDIR/ref/pid")")
  "$REFD" stop >/dev/null 2>&1 || true
  echo "$ms $rss"
}

# Prints "median min max" of the numbers on stdin.
stats() { sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'; }

declare -a berth_ms berth_rss ref_ms ref_rss
for i in $(seq 1 "$RUNS"); do
  read -r ms rss < <(berth_once); berth_ms+=("$ms"); berth_rss+=("$rss")
  echo "run $i berthd: ${ms} ms, ${rss} KiB" >&2
  if [[ -x $REFD ]] && command -v containerd >/dev/null; then
    if out=$(ref_once); then
      read -r ms rss <<<"$out"; ref_ms+=("$ms"); ref_rss+=("$rss")
      echo "run $i containerd: ${ms} ms, ${rss} KiB" >&2
    fi
  fi
done

row() {  # name, ms array name, rss array name
  local -n msv=$2 rssv=$3
  [[ ${#msv[@]} -gt 0 ]] || { echo "| $1 | n/a | n/a |"; return; }
  read -r mm mlo mhi < <(printf '%s\n' "${msv[@]}" | stats)
  read -r rm rlo rhi < <(printf '%s\n' "${rssv[@]}" | stats)
  awk -v n="$1" -v mm="$mm" -v mlo="$mlo" -v mhi="$mhi" -v rm="$rm" -v rlo="$rlo" -v rhi="$rhi" \
    'BEGIN { printf "| %s | %s (%s–%s) | %.1f (%.1f–%.1f) |\n", n, mm, mlo, mhi, rm / 1024, rlo / 1024, rhi / 1024 }'
}

echo
echo "Runs: $RUNS each, idle RSS read ${IDLE_SECONDS}s after the first answered \`ctr version\`; $(nproc) CPUs; $(date -u +%Y-%m-%d)."
echo
echo "| daemon | start-up to first \`ctr version\`, ms: median (min–max) | idle RSS, MiB: median (min–max) |"
echo "|---|---|---|"
row "berthd $("$BERTHD" --version | awk '{print $2}')" berth_ms berth_rss
row "containerd $(containerd --version 2>/dev/null | awk '{print $3}')" ref_ms ref_rss
