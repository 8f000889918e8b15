#!/usr/bin/env bash
# Usage: bench/ingest.sh [RUNS]
#   Content ingest throughput (issue 3): one MiB-random file of INGEST_MB MiB (default
#   256), per run, on the same file system:
#     - dd if=FILE of=… bs=1M conv=fsync (the disk's speed for the same bytes),
#     - `ctr content ingest` → berthd and → the reference containerd 1.6.20
#       (../shared/tools/refd.sh),
#     - `berth content ingest` (pipelined: several Write messages in flight) → berthd and
#       → containerd (the same client against both shows the daemons' difference),
#     - `ctr content ingest` → discard_content (crates/services/examples): a server that
#       receives the bytes and neither stores nor hashes them, so the time is what ctr
#       and the socket alone cost, the floor for any daemon,
#   RUNS times (default 5), the order rotating between runs so load changes hit every
#   target alike. Every ingest passes --expected-digest/--expected-size; its first 16
#   bytes are a counter, so no two ingests write the same blob; `sync` precedes every
#   timed step.
#   Prints every run, then per target: median wall time, MB/s (10^6 bytes/s), % of dd's
#   MB/s, and the median CPU time (user+sys) of the daemon and of the client per ingest.
#   Run as root; needs ctr and containerd. Env: BERTHD (default: scripts/build-release),
#   BERTH (default: cargo build --release -p berth-cli), BASELINE_BERTHD (another berthd
#   binary, e.g. an older build: adds `ctr content ingest` → it as a target), WORKDIR
#   (default: a private directory under /tmp, on the file system dd writes to),
#   INGEST_MB.
set -euo pipefail
export LC_ALL=C

RUNS=${1:-5}
MB=${INGEST_MB:-256}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
TOOLS=$REPO/../shared/tools
[[ -d $TOOLS ]] || TOOLS=/work/shared/tools
REFD=$TOOLS/refd.sh
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || { sed -n '2,20p' "$0" >&2; exit 2; }
command -v ctr >/dev/null || { echo "ctr not found (apt-get install containerd)" >&2; exit 1; }

if [[ -z ${BERTHD:-} ]]; then
  BERTHD=$("$REPO/scripts/build-release" | tail -1)/berthd
fi
if [[ -z ${BERTH:-} ]]; then
  (cd "$REPO" && cargo build --release -q --locked -p berth-cli)
  BERTH=${CARGO_TARGET_DIR:-$REPO/target}/release/berth
fi
[[ -x $BERTHD && -x $BERTH ]] || { echo "berthd/berth not found ($BERTHD, $BERTH)" >&2; exit 1; }
(cd "$REPO" && cargo build --release -q --locked -p berth-services --example discard_content)
DISCARD=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/discard_content

OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then
  WORKDIR=$(mktemp -d /tmp/berth-ingestbench.XXXXXX)
  OWN_WORKDIR=1
fi
export WORKDIR
NS=ingestbench
BLOB=$WORKDIR/blob
declare -A PIDS=() ADDRS=()

cleanup() {
  local name
  for name in "${!PIDS[@]}"; do
    [[ $name == containerd ]] && continue
    local pid=${PIDS[$name]}
    if [[ -d /proc/$pid ]]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  done
  "$REFD" stop >/dev/null 2>&1 || true
  if [[ $OWN_WORKDIR == 1 ]]; then
    "$REFD" clean >/dev/null 2>&1 || true
    rm -rf --one-file-system "$WORKDIR"
  else
    rm -rf --one-file-system "$WORKDIR/daemons" "$BLOB" "$WORKDIR/dd.out"
  fi
}
trap cleanup EXIT

start_berthd() {  # name, binary
  local d=$WORKDIR/daemons/$1
  mkdir -p "$d"
  write_berthd_config "$d"
  printf '[ttrpc]\n  address = "%s"\n' "$d/berthd.sock.ttrpc" >>"$d/config.toml"
  "$2" --config "$d/config.toml" >"$d/log" 2>&1 </dev/null &
  PIDS[$1]=$!
  ADDRS[$1]=$d/berthd.sock
  for _ in $(seq 1 500); do ctr --address "${ADDRS[$1]}" version >/dev/null 2>&1 && return 0; sleep 0.02; done
  cat "$d/log" >&2; return 1
}

start_berthd berthd "$BERTHD"
mkdir -p "$WORKDIR/daemons/discard"
"$DISCARD" "$WORKDIR/daemons/discard/s.sock" >"$WORKDIR/daemons/discard/log" 2>&1 </dev/null &
PIDS[discard]=$!
ADDRS[discard]=$WORKDIR/daemons/discard/s.sock
for _ in $(seq 1 500); do [[ -S ${ADDRS[discard]} ]] && break; sleep 0.02; done
[[ -n ${BASELINE_BERTHD:-} ]] && start_berthd baseline "$BASELINE_BERTHD"
"$REFD" start >/dev/null
PIDS[containerd]=$(cat "$WORKDIR/ref/pid")
ADDRS[containerd]=$WORKDIR/ref/containerd.sock

head -c $((MB << 20)) /dev/urandom >"$BLOB"
SIZE=$(stat -c %s "$BLOB")
echo 0 >"$WORKDIR/counter"  # (measure runs in a subshell)
cat "$BLOB" >/dev/null  # every reader finds it in the page cache

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
now_ns() { date +%s%N; }
TCK=$(getconf CLK_TCK)

# One timed step: prints "wall_ms daemon_cpu_ms client_cpu_ms".
measure() {  # target
  local target=$1 daemon client addr t0 t1 c0 c1 ccpu
  case $target in
    dd) daemon= ;;
    *) client=${target%%>*}; daemon=${target#*>}; addr=${ADDRS[$daemon]} ;;
  esac
  if [[ -n $daemon ]]; then
    # New bytes for every ingest (a counter in the first 16 bytes): a blob still in the
    # store commits without data.
    COUNTER=$(( $(cat "$WORKDIR/counter") + 1 ))
    echo "$COUNTER" >"$WORKDIR/counter"
    printf '%016x' "$COUNTER" | dd of="$BLOB" bs=16 count=1 conv=notrunc status=none
    DIGEST=sha256:$(sha256sum "$BLOB" | cut -d' ' -f1)
  fi
  sync
  c0=0; [[ -n $daemon ]] && c0=$(cpu_ticks "${PIDS[$daemon]}")
  t0=$(now_ns)
  case $target in
    dd) /usr/bin/time -f '%U %S' -o "$WORKDIR/time" \
          dd if="$BLOB" of="$WORKDIR/dd.out" bs=1M conv=fsync status=none ;;
    ctr\>*) /usr/bin/time -f '%U %S' -o "$WORKDIR/time" \
          ctr --address "$addr" -n "$NS" content ingest --expected-size "$SIZE" \
            --expected-digest "$DIGEST" "bench-$COUNTER" <"$BLOB" ;;
    berth\>*) /usr/bin/time -f '%U %S' -o "$WORKDIR/time" \
          "$BERTH" --address "$addr" -n "$NS" content ingest --expected-size "$SIZE" \
            --expected-digest "$DIGEST" "bench-$COUNTER" <"$BLOB" >/dev/null ;;
  esac
  t1=$(now_ns)
  c1=0; [[ -n $daemon ]] && c1=$(cpu_ticks "${PIDS[$daemon]}")
  ccpu=$(awk '{ printf "%d", ($1 + $2) * 1000 }' "$WORKDIR/time")
  echo "$(( (t1 - t0) / 1000000 )) $(( (c1 - c0) * 1000 / TCK )) $ccpu"
  # Untimed: the blob is there; its record goes (the file stays until a collection).
  if [[ $daemon == discard ]]; then
    :
  elif [[ -n $daemon ]]; then
    [[ $(ctr --address "$addr" -n "$NS" content ls -q) == *"$DIGEST"* ]] \
      || { echo "$target: $DIGEST not in the store after the ingest" >&2; exit 1; }
    ctr --address "$addr" -n "$NS" content rm "$DIGEST" >/dev/null
  else
    rm -f "$WORKDIR/dd.out"
  fi
}

targets=(dd "ctr>berthd" "ctr>containerd" "berth>berthd" "berth>containerd" "ctr>discard")
[[ -n ${BASELINE_BERTHD:-} ]] && targets+=("ctr>baseline")
declare -A results=()
for t in "${targets[@]}"; do measure "$t" >/dev/null; done  # warm-up
for i in $(seq 1 "$RUNS"); do
  n=${#targets[@]}
  line="run $i:"
  for k in $(seq 0 $((n - 1))); do
    t=${targets[$(( (k + i) % n ))]}
    r=$(measure "$t")
    results[$t]+="$r"$'\n'
    line+=" $t ${r%% *} ms;"
  done
  echo "$line" >&2
done

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { printf '%s' "${results[$1]}" | awk -v c="$2" 'NF { print $c }' | median; }
dd_ms=$(col dd 1)
dd_mbps=$(awk -v b="$SIZE" -v m="$dd_ms" 'BEGIN { printf "%.0f", b / 1e6 / (m / 1000) }')

echo
echo "$RUNS runs, order rotating; $MB MiB from /dev/urandom, page-cached; $(df --output=source,fstype "$WORKDIR" | tail -1); $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%dT%H:%MZ)."
echo
echo "| target | median ms (all runs) | MB/s | % of dd | daemon CPU ms / ingest | client CPU ms |"
echo "|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
  ms=$(col "$t" 1)
  all=$(printf '%s' "${results[$t]}" | awk 'NF { printf "%s%s", sep, $1; sep = " " }')
  mbps=$(awk -v b="$SIZE" -v m="$ms" 'BEGIN { printf "%.0f", b / 1e6 / (m / 1000) }')
  pct=$(awk -v a="$dd_ms" -v m="$ms" 'BEGIN { printf "%.0f", 100 * a / m }')
  case $t in
    dd) label="dd bs=1M conv=fsync"; dcpu="—" ;;
    *\>discard) label="\`ctr content ingest\` → discard_content (stores and hashes nothing)"; dcpu=$(col "$t" 2) ;;
    *) label="\`${t%%>*} content ingest\` → ${t#*>}"; dcpu=$(col "$t" 2) ;;
  esac
  [[ $t == *containerd ]] && label+=" 1.6.20"
  echo "| $label | $ms ($all) | $mbps | $pct % | $dcpu | $(col "$t" 3) |"
done
echo
echo "dd median: $dd_ms ms = $dd_mbps MB/s."
