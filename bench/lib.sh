# Sourced by the benchmark scripts.

# evict_from_page_cache FILE: drops FILE's pages from the page cache, so the next
# daemon started from it reads its code from disk as after a reboot. The kernel maps
# the 64 KiB around each faulted code page only from pages already cached, so a binary
# that was just written (a fresh build, a copy) shows far more of itself resident.
evict_from_page_cache() {
  sync "$1" 2>/dev/null || sync
  dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true
}

# write_berthd_config DIR [SOCKET]: DIR/config.toml for a private berthd whose root,
# state, opt directory and gRPC socket (default DIR/berthd.sock) all live under DIR.
write_berthd_config() {
  local dir=$1 socket=${2:-$1/berthd.sock}
  cat >"$dir/config.toml" <<CFG
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$socket"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
CFG
}

# mount_fresh_ext4 DIR IMAGE SIZE [journal]: mounts a newly made ext4 (made like this host's,
# without a journal) from the image file IMAGE of SIZE at DIR, so a daemon's root starts on a
# file system with no history (see docs/benchmarks.md on recently freed inodes). `journal`:
# with mkfs.ext4's default journal instead, for benchmarks that delete and recreate many
# files on it (bench/cri.sh): only a journal-less ext4 steps over recently freed inodes.
mount_fresh_ext4() {
  local dir=$1 img=$2 size=$3 features=(-O ^has_journal)
  [[ ${4:-} == journal ]] && features=()
  truncate -s "$size" "$img"
  mkfs.ext4 -q -F "${features[@]}" "$img"
  mkdir -p "$dir"
  mount -o loop "$img" "$dir"
}

# remove_runtime_leftovers NS…: removes what containers of namespace NS leave on the host
# once they are gone: the empty runtime roots /run/berth-runc/NS and
# /run/containerd/runc/NS and the empty cgroup parents /NS in every hierarchy (runc and
# berth-runc remove a container's own directories, not the namespace's).
remove_runtime_leftovers() {
  local ns h
  for ns in "$@"; do
    [[ -n $ns && $ns != */* && $ns != .* ]] || continue
    rmdir "/run/berth-runc/$ns" "/run/containerd/runc/$ns" 2>/dev/null || true
    for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
      [[ -d $h$ns ]] && find "$h$ns" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
  return 0
}

# start_containerd_in_private_run DIR CONTAINERD PLUGIN_SECTIONS: the reference containerd
# 1.6 with root, state, temp, opt, plugin dir and sockets (DIR/containerd.sock,
# DIR/debug.sock) under DIR, and PLUGIN_SECTIONS (TOML text, indented to sit under
# [plugins]) in its config, started in a private mount namespace whose /run is DIR/run:
# 1.6 hard-codes shim sockets, runc's root and /run/netns there. Sets CPID to
# containerd's own PID (setsid and unshare exec) and CSOCK to its socket.
start_containerd_in_private_run() {
  local dir=$1 containerd=$2 sections=$3
  mkdir -p "$dir"/{root,state,tmp,opt,plugins,run/containerd}
  CSOCK=$dir/containerd.sock
  cat >"$dir/config.toml" <<CFG
version = 2
root = "$dir/root"
state = "$dir/state"
temp = "$dir/tmp"
plugin_dir = "$dir/plugins"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "$CSOCK"
[ttrpc]
  address = "$CSOCK.ttrpc"
[debug]
  address = "$dir/debug.sock"
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/opt"
  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = "$dir/run/containerd/runc-v1"
$sections
CFG
  evict_from_page_cache "$containerd"
  setsid unshare --mount --propagation private -- /bin/sh -c 'mount --bind "$1" /run && shift && exec "$@"' \
    sh "$dir/run" env -u XDG_RUNTIME_DIR TMPDIR="$dir/tmp" "$containerd" --config "$dir/config.toml" \
    >"$dir/log" 2>&1 </dev/null &
  CPID=$!
}

# wait_for_ctr SOCKET...: waits (15 s each) until `ctr version` answers on every SOCKET;
# otherwise prints the end of the log beside the socket and exits 1.
wait_for_ctr() {
  local sock
  for sock in "$@"; do
    for _ in $(seq 300); do ctr --address "$sock" version >/dev/null 2>&1 && break; sleep 0.05; done
    ctr --address "$sock" version >/dev/null 2>&1 || { tail -20 "$(dirname "$sock")/log" >&2; exit 1; }
  done
}
