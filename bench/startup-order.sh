#!/usr/bin/env bash
# Usage: bench/startup-order.sh
#   Regenerates crates/server/startup-order.txt: the functions berthd executes from
#   start-up to its first answered `ctr version`, then those it executes for an image
#   import and the life of containers (create, start, exit, kill, delete, with Berth's
#   shim and with the runc shim), recorded with valgrind's callgrind on an unstripped
#   build of scripts/build-release. scripts/build-release hands the file to the linker
#   (gold's --section-ordering-file), which places those functions next to each other,
#   in that order: start-up code first, then the code of a working node.
#
# Why: the kernel maps the 64 KiB around every code page a process faults on
# ("fault-around"). Berthd's start-up runs ~400 KiB of code spread over its whole
# 7 MB text, so without ordering ~5.6 MiB of the executable end up mapped in an idle
# daemon; with the start-up code packed together far fewer windows are touched. The
# same holds for a daemon that has imported an image and runs containers: the code of
# those paths, packed after the start-up code, maps fewer windows than scattered.
# Symbols are exact (see below); functions renamed since the file was generated are
# simply not ordered. Needs valgrind, ctr, runc,
# the stock containerd-shim-runc-v2 and the fixture image builder's tools; root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/bench/lib.sh"
out=$root/crates/server/startup-order.txt
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
work=$(mktemp -d /tmp/berth-order.XXXXXX)
pid=
cleanup() {
  [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
  for f in "$work"/state/io.containerd.runtime.v2.task/*/*/init.pid; do
    [[ -f $f ]] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  { grep -o " $work/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
  remove_runtime_leftovers order
}
trap cleanup EXIT
# build-release strips its output; the symbols are in cargo's own copy (deps/).
dir=$("$root/scripts/build-release" | tail -1)
berthd=$(ls -t "$dir"/deps/berthd-* | grep -v '\.d$' | head -1)
# berthd looks for shims next to its own binary first.
mkdir -p "$work/bin" "$work/fifo"
cp "$berthd" "$work/bin/berthd"
cp "$dir/containerd-shim-berth-v2" "$dir/berth-runc" "$work/bin/"
image=${IMAGE_TAR:-}
if [[ -z $image ]]; then
  "$root/tests/fixtures/build-images.sh" "$work/fixtures" >/dev/null
  image=$work/fixtures/busybox.oci.tar
fi
write_berthd_config "$work" "$work/b.sock"
c=(ctr --address "$work/b.sock" -n order)
# The image is unpacked by a daemon outside valgrind first: valgrind 3.19 does not know
# openat2, which extraction needs. The recorded daemon's import then finds its layers
# unpacked (the unpacking code itself is left unordered).
"$work/bin/berthd" --config "$work/config.toml" >"$work/log.plain" 2>&1 &
pid=$!
for _ in $(seq 600); do ctr --address "$work/b.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
"${c[@]}" images import "$image" >/dev/null
kill -TERM "$pid"; wait "$pid" || true; pid=
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.out" \
  "$work/bin/berthd" --config "$work/config.toml" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 600); do [[ -S $work/b.sock ]] && break; sleep 0.1; done
ctr --address "$work/b.sock" version >/dev/null
sleep 2
# Dump 1: start-up. The counters restart, so dump 2 holds what the node's work ran.
callgrind_control -d "$pid" >/dev/null
"${c[@]}" images import "$image" >/dev/null
img=import.local/busybox:latest
for rt in io.containerd.berth.v2 io.containerd.runc.v2; do
  "${c[@]}" run --rm --fifo-dir "$work/fifo" --runtime "$rt" "$img" "rm-$rt" true
  "${c[@]}" run -d --null-io --runtime "$rt" "$img" "d-$rt" sleep 600
  "${c[@]}" tasks ls >/dev/null
  "${c[@]}" tasks kill -s SIGKILL "d-$rt"
  for _ in $(seq 100); do "${c[@]}" tasks ls | grep -q "d-$rt.*STOPPED" && break; sleep 0.1; done
  "${c[@]}" tasks rm "d-$rt" >/dev/null
  "${c[@]}" containers rm "d-$rt"
done
sleep 2
callgrind_control -d "$pid" >/dev/null
kill -TERM "$pid"; wait "$pid" || true; pid=
# callgrind names every executed function `fn=(id) name`; keep those that are
# functions of the executable (nm), by their exact symbol. (The legacy-mangling hash
# used to be a wildcard, so that the file survived any rebuild; but it then matched
# every monomorphisation of a generic function, 9,500 functions and 3 MB of code for
# 3,300 executed ones, and the ordered block was mostly code that never runs. The hash
# only changes with the crate's dependencies or build settings, not with code edits;
# functions whose name no longer matches are simply not ordered.)
nm "$berthd" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$work/text"
executed() {
  grep -oE '^c?fn=\([0-9]+\) [^ ]+' "$1" | sed -E "s/^c?fn=\([0-9]+\) //; s/'[0-9]+$//" \
    | awk '!seen[$0]++'
}
# Dumps triggered by callgrind_control get the part number appended.
startup=$work/callgrind.out.1
node=$work/callgrind.out.2
[[ -f $startup && -f $node ]] || { ls "$work" >&2; echo "callgrind dumps missing" >&2; exit 1; }
{ executed "$startup"; executed "$node"; } | awk '!seen[$0]++' >"$work/executed"
awk 'NR==FNR {text[$0]=1; next} ($0 in text) {print}' "$work/text" "$work/executed" \
  | sed -E 's/^/.text./' | awk '!seen[$0]++' >"$out"
echo "$(wc -l <"$out") functions ($(executed "$startup" | wc -l) run at start-up) -> $out"
