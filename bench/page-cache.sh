# Sourced by the benchmark scripts.
#
# evict_from_page_cache FILE: drops FILE's pages from the page cache, so the next
# daemon started from it reads its code from disk as after a reboot. The kernel maps
# the 64 KiB around each faulted code page only from pages already cached, so a binary
# that was just written (a fresh build, a copy) shows far more of itself resident.
evict_from_page_cache() {
  sync "$1" 2>/dev/null || sync
  dd if="$1" iflag=nocache count=0 status=none 2>/dev/null || true
}
