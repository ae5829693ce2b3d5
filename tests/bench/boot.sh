#!/usr/bin/env bash
# Benchmark for `mkt run` (issue: mkt run), whole-process wall times, side by side:
#   mkt run --kernel TREE -- true      (virtiofs, the default, and 9p)
#   vng --run TREE --exec true         (virtme-ng, the peer, same kernel, TCG)
#   floors: the same kernel with an init that powers off at once (and with none: panic)
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

# Two floors, the same kernel and QEMU machine, no file system, no devices:
# - poweroff: an initramfs whose init powers off at once: all that running
#   `true` must cost (the kernel frees its init memory, ~0.14 s under TCG,
#   execs init, shuts down); the ratio is taken against this one;
# - panic: no init at all, the kernel panics and QEMU exits (the floor of
#   earlier figures; it skips those steps).
q35="qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine q35 -accel tcg -cpu max \
 -smp $(nproc) -m 1024 -kernel $tree/arch/x86/boot/bzImage -serial file:/dev/null"
cat > "$work/init.rs" <<'RS'
extern "C" {
    fn reboot(cmd: i32) -> i32;
}
fn main() {
    // SAFETY: reboot(2) with LINUX_REBOOT_CMD_POWER_OFF takes no pointers.
    unsafe {
        reboot(0x4321fedc_u32 as i32);
    }
}
RS
rustc -O -C target-feature=+crt-static -C panic=abort -C strip=symbols "$work/init.rs" -o "$work/init"
(cd "$work" && echo init | cpio -o -H newc --quiet > floor.cpio)
floor="$q35 -initrd $work/floor.cpio -append 'console=ttyS0 panic=-1 quiet rdinit=/init i8042.noaux 8250.nr_uarts=1'"
panic="$q35 -append 'console=ttyS0 panic=-1 quiet rdinit=/nonexistent i8042.noaux 8250.nr_uarts=1'"

hyperfine --warmup 1 --runs "$runs" -N --export-json "$work/out.json" --ignore-failure \
  -n "mkt run (default: virtiofs)" "$mkt -q run --rootfs $rootfs --kernel $tree -- true" \
  -n "mkt run --fs 9p" "$mkt -q run --fs 9p --rootfs $rootfs --kernel $tree -- true" \
  -n "vng --exec true" "vng --run $tree --disable-kvm --force-9p --exec true" \
  -n "floor: init powers off" "sh -c \"$floor\"" \
  -n "floor: no init, panic" "sh -c \"$panic\"" \
  -n "mkt before QEMU (--dry-run)" "$mkt -q run --dry-run --rootfs $rootfs --kernel $tree -- true" \
  >/dev/null
python3 - "$work/out.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) for x in json.load(open(sys.argv[1]))["results"]}
base = r["floor: init powers off"]
print(f"{'command':32} {'median':>9}  x floor (init powers off)")
for k, v in r.items():
    print(f"{k:32} {v:8.3f}s  {v/base:5.2f}")
PY
