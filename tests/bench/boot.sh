#!/usr/bin/env bash
# Benchmark for `mkt run` (issue: mkt run), whole-process wall times, side by side:
#   mkt run --kernel TREE -- true      (9p, the default, and virtiofs)
#   vng --run TREE --exec true         (virtme-ng, the peer, same kernel, TCG)
#   floor: the same kernel with an initramfs whose init is absent -> panic -> QEMU exits
#   mkt's own time before QEMU starts  (mkt run --dry-run: resolve, probe, generate, initramfs)
# Uses the test fixtures (tests/fixtures/prepare.sh). Prints medians and ratios.
# Usage: tests/bench/boot.sh [RUNS]   (default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
tree=$cache/linux
rootfs=$cache/rootfs-bookworm
[ -e "$tree/arch/x86/boot/bzImage" ] || { echo "no fixture kernel: run tests/fixtures/prepare.sh" >&2; exit 1; }
command -v hyperfine >/dev/null || apt-get install -y -qq hyperfine >/dev/null
(cd "$here" && cargo build --release -q)
mkt=$here/target/release/mkt
venv=$cache/bench-venv
[ -x "$venv/bin/vng" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q virtme-ng; }
export PATH=$venv/bin:$PATH
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"

# The floor: kernel to (missing) init under the same QEMU machine, no fs, no devices.
floor="qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine q35 -accel tcg -cpu max \
 -smp $(nproc) -m 1024 -kernel $tree/arch/x86/boot/bzImage -serial file:/dev/null \
 -append 'console=ttyS0 panic=-1 quiet rdinit=/nonexistent i8042.noaux 8250.nr_uarts=1'"

hyperfine --warmup 1 --runs "$runs" -N --export-json "$work/out.json" --ignore-failure \
  -n "mkt run (9p)" "$mkt -q run --rootfs $rootfs --kernel $tree -- true" \
  -n "mkt run (virtiofs)" "$mkt -q run --fs virtiofs --rootfs $rootfs --kernel $tree -- true" \
  -n "vng --exec true" "vng --run $tree --disable-kvm --force-9p --exec true" \
  -n "floor (kernel to init)" "sh -c \"$floor\"" \
  -n "mkt before QEMU (--dry-run)" "$mkt -q run --dry-run --rootfs $rootfs --kernel $tree -- true" \
  >/dev/null
python3 - "$work/out.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) for x in json.load(open(sys.argv[1]))["results"]}
base = r["mkt run (9p)"]
print(f"{'command':32} {'median':>9}  ratio to mkt run (9p)")
for k, v in r.items():
    print(f"{k:32} {v:8.3f}s  {v/base:5.2f}")
PY
