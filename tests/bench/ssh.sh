#!/usr/bin/env bash
# Benchmark: time from starting an interactive `mkt run` to the first successful `mkt ssh -- true`
# (issue 13, "fast to a shell and to SSH"), side by side in the same run with:
#   mkt run (interactive, default mode: mkt's init, a shell and the tree's sshd)
#   mkt run --init systemd (the tree's systemd and its ssh.service)
#   mkt run -- true (command mode: the boot the default mode is measured against)
#   floor: the same kernel, no devices, init absent -> panic -> QEMU exits (as boot.sh)
#   vng --ssh --ssh-tcp: virtme-ng's closest equivalent (--root: the same tree over 9p; vsock, its default, is
#   missing here), when installed (boot.sh installs it) and it answers within 120 s
# Fixture kernel tree and rootfs (tests/fixtures/prepare.sh). Prints medians and ratios.
# Usage: tests/bench/ssh.sh [RUNS]   (default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
tree=$cache/linux
rootfs=$cache/rootfs-bookworm
[ -e "$tree/arch/x86/boot/bzImage" ] || { echo "no fixture kernel: run tests/fixtures/prepare.sh" >&2; exit 1; }
(cd "$here" && cargo build --release -q)
work=$(mktemp -d)
# mkt with a fresh HOME: the guest's shell runs the user's startup files from
# the shared home, so a heavy ~/.bashrc would be timed instead of mkt (this
# machine's root has `pyenv init`: 2.9 s per shell under TCG).
mkdir -p "$work/home"
mkt() { HOME=$work/home "$here/target/release/mkt" "$@"; }
mkt=mkt
cleanup() { [ -n "${vm:-}" ] && killtree "$vm"; rm -rf "$work"; }
trap cleanup EXIT
# A private runtime dir: `mkt ssh` with no name finds only this script's VM.
export XDG_RUNTIME_DIR=$work/run
mkdir -m 0700 "$XDG_RUNTIME_DIR"
cd "$work"

now() { date +%s.%N; }
# Ends a process and everything under it, by pid (vng's QEMU is a grandchild).
killtree() { local c; for c in $(pgrep -P "$1"); do killtree "$c"; done; kill "$1" 2>/dev/null || true; }

# Seconds from `mkt run ARGS` (interactive, its console fed by an idle pipe) to the first
# `mkt ssh -- true` that succeeds; the VM is stopped after.
to_ssh() {
  local t0 t1
  t0=$(now)
  (sleep 100000 | "$mkt" -q run --rootfs "$rootfs" --kernel "$tree" "$@" >"$work/console" 2>&1) &
  vm=$!
  until "$mkt" -q ssh -- true </dev/null >/dev/null 2>&1; do
    kill -0 "$vm" 2>/dev/null || { echo "VM ended before SSH answered: $work/console" >&2; tail -5 "$work/console" >&2; return 1; }
    [ "$(echo "$(now) - $t0 > 300" | bc)" = 1 ] && { echo "no SSH in 300 s" >&2; return 1; }
    sleep 0.2
  done
  t1=$(now)
  "$mkt" -q stop --force >/dev/null 2>&1 || true
  pkill -P "$vm" sleep 2>/dev/null || true
  wait "$vm" 2>/dev/null || true
  vm=
  echo "$t1 - $t0" | bc
}

# Seconds a command takes.
timed() {
  local t0
  t0=$(now)
  "$@" >/dev/null 2>&1 </dev/null || true
  echo "$(now) - $t0" | bc
}

floor="qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine q35 -accel tcg -cpu max \
 -smp $(nproc) -m 1024 -kernel $tree/arch/x86/boot/bzImage -serial file:/dev/null \
 -append 'console=ttyS0 panic=-1 quiet rdinit=/nonexistent i8042.noaux 8250.nr_uarts=1'"

vng_ssh=
venv=$cache/bench-venv
if [ -x "$venv/bin/vng" ] && "$venv/bin/vng" --help 2>&1 | grep -q -- '--ssh-tcp'; then
  vng_ssh=$venv/bin/vng   # --ssh-tcp: no vhost-vsock on this host class
  export PATH=$venv/bin:$PATH   # vng runs virtme-run from its venv
else
  echo "vng --ssh: skipped, virtme-ng with --ssh-tcp not installed in $venv (boot.sh installs it)" >&2
fi
# Seconds from `vng --ssh --ssh-tcp` (the host's root, 9p, TCG) to the first `vng --ssh-client` that runs true.
vng_to_ssh() {
  local t0 t1
  t0=$(now)
  (sleep 100000 | "$vng_ssh" --run "$tree" --disable-kvm --force-9p --root "$rootfs" --ssh --ssh-tcp >"$work/vng-console" 2>&1) &
  vm=$!
  until timeout 20 "$vng_ssh" --ssh-client --ssh-tcp --remote-cmd true </dev/null >/dev/null 2>&1; do
    if ! kill -0 "$vm" 2>/dev/null || [ "$(echo "$(now) - $t0 > 120" | bc)" = 1 ]; then
      echo "vng --ssh: no SSH in 120 s (console: $work/vng-console)" >&2; tail -3 "$work/vng-console" >&2
      killtree "$vm"; wait "$vm" 2>/dev/null || true; vm=; return 1
    fi
    sleep 0.2
  done
  t1=$(now)
  killtree "$vm"; wait "$vm" 2>/dev/null || true; vm=
  echo "$t1 - $t0" | bc
}

declare -A times
for i in $(seq "$runs"); do
  times[default]+=" $(to_ssh)"
  times[systemd]+=" $(to_ssh --init systemd)"
  times[command]+=" $(timed "$mkt" -q run --rootfs "$rootfs" --kernel "$tree" -- true)"
  times[floor]+=" $(timed sh -c "$floor")"
  if [ -n "$vng_ssh" ]; then
    if t=$(vng_to_ssh); then times[vng]+=" $t"; else vng_ssh=; fi
  fi
  echo "run $i/$runs: default${times[default]##* } systemd${times[systemd]##* } command${times[command]##* } floor${times[floor]##* }" >&2
done
python3 - "${times[default]}" "${times[systemd]}" "${times[command]}" "${times[floor]}" "${times[vng]:-}" <<'PY'
import statistics, sys
names = ["mkt run -> ssh ok (default)", "mkt run --init systemd -> ssh ok", "mkt run -- true (command)",
         "floor (kernel to init)", "vng --ssh -> ssh ok"]
med = {n: statistics.median(map(float, v.split())) for n, v in zip(names, sys.argv[1:]) if v.split()}
cmd = med[names[2]]
print(f"{'':36} {'median':>9}  x command-mode boot")
for n, v in med.items():
    print(f"{n:36} {v:8.2f}s  {v / cmd:5.2f}")
print(f"goals: default <= 2x command ({med[names[0]] / cmd:.2f}x), systemd <= 20 s ({med[names[1]]:.1f} s)")
PY
