#!/usr/bin/env bash
# Benchmark for `mkt build` (issue: mkt build), whole-process wall times, side by side:
#   mkt build on an up-to-date kernel tree   vs  plain `make` (the same target: all) in the same tree
#   entering the rootfs: mkt build --shell -- -c true  vs  bwrap  vs  unshare + chroot
# Uses a private copy of the fixture kernel tree (tests/fixtures/prepare.sh).
# Usage: tests/bench/build.sh [RUNS]   (default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
rootfs=$cache/rootfs-bookworm
[ -e "$cache/linux/arch/x86/boot/bzImage" ] || { echo "no fixture kernel: run tests/fixtures/prepare.sh" >&2; exit 1; }
command -v hyperfine >/dev/null || apt-get install -y -qq hyperfine >/dev/null
command -v bwrap >/dev/null || apt-get install -y -qq bubblewrap >/dev/null
(cd "$here" && cargo build --release -q)
mkt=$here/target/release/mkt
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cp -a "$cache/linux" "$work/linux"
tree=$work/linux
# objtool's build records absolute paths; point them at the copy so make
# sees the copy as up to date.
# Text files only (.cmd, .d): sed would corrupt the objects' debug info.
grep -rlI --include='.*.cmd' --include='*.d' "$cache/linux" "$tree/tools" 2>/dev/null \
    | xargs -r sed -i "s#$cache/linux/#$tree/#g"
j=$(nproc)
# One build each first, so both start from the same up-to-date state.
"$mkt" -q build --rootfs "$rootfs" -C "$tree" >/dev/null
env PATH=/usr/lib/ccache:$PATH make -s -C "$tree" -j"$j" >/dev/null
hyperfine --warmup 1 --runs "$runs" -N --export-json "$work/out.json" \
  -n "make (host, up to date)" "env PATH=/usr/lib/ccache:$PATH make -s -C $tree -j$j" \
  -n "mkt build (up to date)" "$mkt -q build --rootfs $rootfs -C $tree" \
  -n "enter: mkt build --shell -c true" "$mkt -q build --rootfs $rootfs -C $tree --shell -- -c true" \
  -n "enter: bwrap" "bwrap --bind $rootfs / --proc /proc --dev /dev --unshare-all true" \
  -n "enter: unshare -Urm chroot" "unshare -Urmpf --mount-proc chroot $rootfs true" \
  >/dev/null
python3 - "$work/out.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) for x in json.load(open(sys.argv[1]))["results"]}
print(f"{'command':36} {'median':>9}")
for k, v in r.items():
    print(f"{k:36} {v:8.3f}s")
print(f"mkt build / make (up to date): {r['mkt build (up to date)'] / r['make (host, up to date)']:.2f}x")
PY
