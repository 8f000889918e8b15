#!/usr/bin/env bash
# Usage: bench/startup-order.sh
#   Regenerates crates/server/startup-order.txt: the functions berthd executes from
#   start-up to its first answered `ctr version`, recorded with valgrind's callgrind
#   on an unstripped build of scripts/build-release. scripts/build-release hands the
#   file to the linker (gold's --section-ordering-file), which places those functions
#   next to each other.
#
# Why: the kernel maps the 64 KiB around every code page a process faults on
# ("fault-around"). Berthd's start-up runs ~400 KiB of code spread over its whole
# 7 MB text, so without ordering ~5.6 MiB of the executable end up mapped in an idle
# daemon; with the start-up code packed together far fewer windows are touched.
# Symbol hashes are replaced by `*`, so the file stays valid across builds; functions
# renamed since it was generated are simply not ordered. Needs valgrind and ctr; root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/crates/server/startup-order.txt
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
work=$(mktemp -d /tmp/berth-order.XXXXXX)
pid=
cleanup() { [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true; rm -rf --one-file-system "$work"; }
trap cleanup EXIT
# build-release strips its output; the symbols are in cargo's own copy (deps/).
dir=$("$root/scripts/build-release" | tail -1)
berthd=$(ls -t "$dir"/deps/berthd-* | grep -v '\.d$' | head -1)
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.out" \
  "$berthd" --root "$work/root" --state "$work/state" --address "$work/b.sock" \
  >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 600); do [[ -S $work/b.sock ]] && break; sleep 0.1; done
ctr --address "$work/b.sock" version >/dev/null
sleep 2
kill -TERM "$pid"; wait "$pid" || true; pid=
# callgrind names every executed function `fn=(id) name`; keep those that are
# functions of the executable (nm), with the legacy-mangling hash as a wildcard.
nm "$berthd" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$work/text"
grep -oE '^c?fn=\([0-9]+\) [^ ]+' "$work/callgrind.out" | sed -E "s/^c?fn=\([0-9]+\) //; s/'[0-9]+$//" \
  | awk '!seen[$0]++' >"$work/executed"
awk 'NR==FNR {text[$0]=1; next} ($0 in text) {print}' "$work/text" "$work/executed" \
  | sed -E 's/17h[0-9a-f]{16}E$/17h*E/; s/^/.text./' | awk '!seen[$0]++' >"$out"
echo "$(wc -l <"$out") functions -> $out"
