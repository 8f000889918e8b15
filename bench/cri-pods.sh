#!/usr/bin/env bash
# Usage: bench/cri-pods.sh [ROUNDS [PODS]]
#   The CRI pod lifecycle the kubelet drives, on berthd and on the reference containerd
#   1.6.20's CRI plugin in one run, both driven by the same client
#   (crates/cri/examples/cri_pods.rs, over each daemon's main socket): ROUNDS (default 10,
#   after one uncounted) rounds of RunPodSandbox, CreateContainer (busybox, `sleep 3600`),
#   StartContainer, ExecSync `true`, StopContainer (timeout 0), RemoveContainer,
#   StopPodSandbox, RemovePodSandbox, each timed; then PODS (default 10) pods of one
#   container started at once, ListPodSandbox/ListContainers/ListContainerStats with them
#   running, the daemon's VmRSS and its shims' RSS/PSS, all torn down at once. berthd
#   first, then containerd; both run for the whole benchmark.
#   Each daemon has its own CNI network (bridge + host-local from /usr/lib/cni: a bridge
#   and a /24 of its own, ipMasq false, IPAM dataDir under WORKDIR), its own cgroup parent
#   for the pods, `restrict_oom_score_adj = true` (this host may not lower oom scores),
#   `sandbox_image` the fixture pause image; the fixture `pause` and `busybox` images
#   (tests/fixtures/build-images.sh) are imported into k8s.io with ctr. Roots and state on
#   a fresh ext4 each (mount_fresh_ext4, journal); containerd in a private mount namespace
#   whose /run is its own (as bench/cri.sh). containerd's CRI runs io.containerd.runc.v2 =
#   containerd-shim-runc-v2 + runc; berthd maps that name to Berth's shim, which runs
#   berth-runc or runc (runc for specs with mount propagation, which CRI containers have).
#   Prints the client's raw output (stderr) and a table of medians (min–max). At the end
#   removes everything it made: processes by PID, mounts, the bridges, cgroups, WORKDIR.
#   Run as root. Env: BERTHD (default: scripts/build-release), CRI_PODS (the client;
#   default: cargo build -p berth-cri --example cri_pods), WORKDIR (default: a private
#   mktemp dir, deleted at the end), CONTAINERD (default: containerd in PATH).
set -euo pipefail
export LC_ALL=C

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
ROUNDS=${1:-10} PODS=${2:-10}
[[ $# -le 2 && $ROUNDS =~ ^[1-9][0-9]*$ && $PODS =~ ^[1-9][0-9]*$ ]] || usage
[[ $(id -u) == 0 ]] || { echo "bench/cri-pods.sh: run as root" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
REPO=$(dirname "$HERE")
CNI_BIN=/usr/lib/cni
CONTAINERD=${CONTAINERD:-$(command -v containerd || true)}
for t in ctr ip unshare mkfs.ext4 umoci; do
  command -v "$t" >/dev/null || { echo "bench/cri-pods.sh: $t not found (scripts/install-deps)" >&2; exit 1; }
done
[[ -x $CONTAINERD ]] || { echo "bench/cri-pods.sh: containerd not found (apt-get install containerd)" >&2; exit 1; }
[[ -x $CNI_BIN/bridge && -x $CNI_BIN/host-local ]] || { echo "bench/cri-pods.sh: no CNI plugins in $CNI_BIN (containernetworking-plugins)" >&2; exit 1; }

if [[ -z ${BERTHD:-} ]]; then
  BERTHD=$("$REPO/scripts/build-release" | tail -1)/berthd
fi
if [[ -z ${CRI_PODS:-} ]]; then
  (cd "$REPO" && cargo build -q -p berth-cri --example cri_pods)
  CRI_PODS=${CARGO_TARGET_DIR:-$REPO/target}/debug/examples/cri_pods
fi
OWN_WORKDIR=0
if [[ -z ${WORKDIR:-} ]]; then WORKDIR=$(mktemp -d /tmp/berth-cripods.XXXXXX); OWN_WORKDIR=1; fi
mkdir -p "$WORKDIR"
B=$WORKDIR/berth
R=$WORKDIR/ref
RAND=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
BPID= CPID=
declare -A BRIDGE CGROUP SUBNET
BRIDGE[b]=bpb$RAND BRIDGE[c]=bpc$RAND
CGROUP[b]=/bpods-$RAND-b CGROUP[c]=/bpods-$RAND-c

# A /24 in 10.200–249.x.0 that no route or address of this host is in.
free_subnet() {
  local s i
  for i in $(seq 50); do
    s=10.$((200 + RANDOM % 50)).$((RANDOM % 256))
    ip -4 route show | grep -q "^$s\." && continue
    ip -4 addr show | grep -q " $s\." && continue
    [[ " ${SUBNET[*]-} " == *" $s "* ]] && continue
    echo "$s"; return 0
  done
  return 1
}
SUBNET[b]=$(free_subnet)
SUBNET[c]=$(free_subnet)

stop_pid() {  # PID: SIGTERM, up to 15 s, then SIGKILL
  local pid=$1
  [[ -n $pid && -d /proc/$pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

cgroup_pids() {  # PARENT: the processes in the cgroup tree PARENT, in every hierarchy
  local h
  for h in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    if [[ -d $h/${1#/} ]]; then find "$h/${1#/}" -name cgroup.procs -exec cat {} + 2>/dev/null; fi
  done | sort -un
}

shim_pids() {  # SOCKET: the shims started for the daemon on SOCKET
  local p
  for p in /proc/[0-9]*; do
    [[ $(tr '\0' ' ' 2>/dev/null <"$p/cmdline") == *" -address $1 "* ]] && echo "${p#/proc/}"
  done
  return 0
}

cleanup() {
  local d m p h k i
  set +e
  # Left-over pods (after a failure): their processes, then the shims, then the daemons.
  for k in b c; do
    for i in $(seq 50); do
      p=$(cgroup_pids "${CGROUP[$k]}")
      [[ -z $p ]] && break
      # shellcheck disable=SC2086
      kill -KILL $p 2>/dev/null || true
      sleep 0.1
    done
  done
  for p in $(shim_pids "$B/berthd.sock") $(shim_pids "$R/containerd.sock"); do stop_pid "$p"; done
  stop_pid "$BPID"; BPID=
  stop_pid "$CPID"; CPID=
  for d in "$B" "$R"; do
    for m in $(awk -v d="$d/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" || true
    done
    if mountpoint -q "$d"; then umount "$d" 2>/dev/null || umount -l "$d"; fi
  done
  for k in b c; do
    ip link show "${BRIDGE[$k]}" >/dev/null 2>&1 && ip link del "${BRIDGE[$k]}"
    for h in /sys/fs/cgroup /sys/fs/cgroup/*/; do
      [[ -d $h/${CGROUP[$k]#/} ]] && find "$h/${CGROUP[$k]#/}" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
  # berthd's shims' runtime roots on the host, when empty (containerd's are in its /run).
  rmdir /run/berth-runc/k8s.io /run/containerd/runc/k8s.io 2>/dev/null || true
  rm -f "$WORKDIR/berth.ext4" "$WORKDIR/ref.ext4"
  [[ $OWN_WORKDIR == 1 ]] && rm -rf --one-file-system "$WORKDIR"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$REPO/tests/fixtures/build-images.sh" "$WORKDIR/fixtures"

# DIR KEY: DIR/net.d with the daemon's bridge network; the CRI section of its config.
cri_section() {
  local dir=$1 k=$2
  mkdir -p "$dir/net.d" "$WORKDIR/logs-$k"
  cat >"$dir/net.d/10-bench.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "berth-bench-$k", "plugins": [{"type": "bridge",
 "bridge": "${BRIDGE[$k]}", "isGateway": false, "ipMasq": false,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "${SUBNET[$k]}.0/24"}]],
          "dataDir": "$WORKDIR/ipam-$k"}}]}
JSON
  cat <<CFG
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "import.local/pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$dir/net.d"
CFG
}

# --- berthd ------------------------------------------------------------------------------
mount_fresh_ext4 "$B" "$WORKDIR/berth.ext4" "${FS_SIZE:-2G}" journal
write_berthd_config "$B"
cri_section "$B" b >>"$B/config.toml"
evict_from_page_cache "$BERTHD"
"$BERTHD" --config "$B/config.toml" >"$B/log" 2>&1 </dev/null &
BPID=$!
BSOCK=$B/berthd.sock

# --- containerd 1.6 with its CRI plugin ------------------------------------------------
mount_fresh_ext4 "$R" "$WORKDIR/ref.ext4" "${FS_SIZE:-2G}" journal
start_containerd_in_private_run "$R" "$CONTAINERD" "$(cri_section "$R" c | sed 's/^/  /')"

wait_for_ctr "$BSOCK" "$CSOCK"
[[ $(readlink -f "/proc/$CPID/exe") == "$(readlink -f "$CONTAINERD")" ]] || { echo "containerd's PID is not $CPID" >&2; exit 1; }
for sock in "$BSOCK" "$CSOCK"; do
  if ! ctr --address "$sock" plugins ls | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" && $NF == "ok" { f = 1 } END { exit !f }'; then
    echo "bench/cri-pods.sh: the CRI plugin did not load on $sock" >&2; exit 1
  fi
  for image in pause busybox; do
    ctr --address "$sock" -n k8s.io images import "$WORKDIR/fixtures/$image.oci.tar" >/dev/null
  done
done

# --- the runs --------------------------------------------------------------------------------
START=$(date -u +%Y-%m-%dT%H:%MZ)
echo "bench/cri-pods.sh: $ROUNDS rounds + $PODS pods at once; berthd $BERTHD (pid $BPID) first, then containerd $("$CONTAINERD" --version | awk '{ print $3 }') (pid $CPID); load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
run() {  # KEY SOCKET PID
  echo "--- cri_pods, $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$CRI_PODS" "$2" "$3" "$WORKDIR/logs-$1" "${CGROUP[$1]}" import.local/busybox:latest "$ROUNDS" "$PODS" \
    | tee "$WORKDIR/out-$1" >&2
}
run b "$BSOCK" "$BPID"
run c "$CSOCK" "$CPID"
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# Which OCI runtime berthd's shims choose (runc or berth-runc): an unmeasured run of one
# round and PODS pods while the runtimes' roots are sampled for berthd's containers (their
# state names a bundle under $B).
"$CRI_PODS" "$BSOCK" "$BPID" "$WORKDIR/logs-b" "${CGROUP[b]}" import.local/busybox:latest 1 "$PODS" >/dev/null &
CHECK=$!
RUNC_MAX=0 BERTH_RUNC_MAX=0
while [[ -d /proc/$CHECK ]]; do
  r=$(grep -lsF "$B/" /run/containerd/runc/k8s.io/*/state.json | wc -l || true)
  b=$(grep -lsF "$B/" /run/berth-runc/k8s.io/*/state.json | wc -l || true)
  (( r > RUNC_MAX )) && RUNC_MAX=$r
  (( b > BERTH_RUNC_MAX )) && BERTH_RUNC_MAX=$b
  sleep 0.05
done
wait "$CHECK"
for k in b c; do  # nothing left: no IP allocated, no pod, no container
  left=$(find "$WORKDIR/ipam-$k" -name '10.*' 2>/dev/null | wc -l)
  (( left == 0 )) || echo "bench/cri-pods.sh: $left IPs still allocated on ${BRIDGE[$k]}" >&2
done
for sock in "$BSOCK" "$CSOCK"; do
  echo "--- ctr -n k8s.io containers ls / tasks ls, $sock" >&2
  ctr --address "$sock" -n k8s.io containers ls -q >&2
  ctr --address "$sock" -n k8s.io tasks ls -q >&2
done

# --- the table -------------------------------------------------------------------------------
FMT='function f(v) { return sprintf(v == int(v) ? "%d" : v >= 100 ? "%.0f" : v >= 10 ? "%.1f" : v >= 1 ? "%.2f" : "%.3f", v) }'
step() {  # KEY STEP: median (min–max)
  awk "$FMT"' $1 == "step" && $2 == s { printf "%s (%s–%s)", f($4), f($6), f($8) }' s="$2" "$WORKDIR/out-$1"
}
value() {  # KEY NAME [DIVISOR]
  awk "$FMT"' $1 == "pods" { for (i = 3; i < NF; i += 2) if ($i == k) printf "%s", f($(i + 1) / d) }' k="$2" d="${3:-1}" "$WORKDIR/out-$1"
}
ratio() {  # STEP
  awk '$1 == "step" && $2 == s { print $4 }' s="$1" "$WORKDIR/out-b" "$WORKDIR/out-c" | paste -sd' ' |
    awk '{ printf "%.2f", $1 / $2 }'
}
echo
echo "$ROUNDS rounds per daemon (after one uncounted), berthd first, both daemons running throughout; roots on a fresh ext4 each; overlayfs; $(nproc) CPUs; $START–$(date -u +%H:%MZ); load $(awk '{ print $1 }' <<<"$LOAD1") at the end."
echo
echo "| CRI call, one pod at a time (ms) | berthd: median (min–max) | containerd 1.6.20 | ratio |"
echo "|---|---|---|---|"
for s in run_pod:RunPodSandbox create:CreateContainer start:StartContainer exec:"ExecSync \`true\`" \
  stop:"StopContainer (timeout 0)" remove:RemoveContainer stop_pod:StopPodSandbox remove_pod:RemovePodSandbox \
  ready_to_running:"pod ready to container running (RunPodSandbox + CreateContainer + StartContainer)" \
  container_gone:"container gone (StopContainer + RemoveContainer)" pod_gone:"pod gone (StopPodSandbox + RemovePodSandbox)" \
  round:"whole round (all eight calls)"; do
  echo "| ${s#*:} | $(step b "${s%%:*}") | $(step c "${s%%:*}") | $(ratio "${s%%:*}") |"
done
echo
echo "| $PODS pods at once | berthd | containerd 1.6.20 |"
echo "|---|---|---|"
for s in start_all_ms:"all $PODS started (wall, ms)" ready_to_running_median:"one pod's ready to running, median (ms)" \
  ready_to_running_max:"… slowest (ms)" list_pods_ms:"ListPodSandbox, $PODS pods (ms, median of 20)" \
  list_containers_ms:"ListContainers, $PODS containers (ms, median of 20)" \
  list_stats_ms:"ListContainerStats, $PODS containers (ms, median of 20)" stop_all_ms:"all $PODS torn down (wall, ms)"; do
  echo "| ${s#*:} | $(value b "${s%%:*}") | $(value c "${s%%:*}") |"
done
for s in rss_before_kib:"daemon VmRSS before (MiB)" rss_running_kib:"daemon VmRSS, $PODS pods running (MiB)" \
  rss_after_kib:"daemon VmRSS after teardown (MiB)" shims_rss_kib:"shims' RSS, summed (MiB)" \
  shims_pss_kib:"shims' PSS, summed (MiB)"; do
  echo "| ${s#*:} | $(value b "${s%%:*}" 1024) | $(value c "${s%%:*}" 1024) |"
done
echo "| shim processes | $(value b shims) | $(value c shims) |"
echo
echo "berthd's containers in the unmeasured check run, the most at once: $RUNC_MAX run by runc, $BERTH_RUNC_MAX by berth-runc (containerd: runc only)."
