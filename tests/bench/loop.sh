#!/usr/bin/env bash
# Benchmark for the edit -> build -> boot -> test loop (issue: the loop in
# seconds), whole-process wall times, side by side in one run. Each round
# changes one line of drivers/net/dummy.c (its MODULE_VERSION, so every
# build compiles and the test proves the new module is the one loaded):
#   mkt cold:  mkt build + mkt run --kernel TREE -- sh -c 'sudo modprobe dummy && cat /sys/module/dummy/version'
#   mkt warm:  mkt build + mkt run SETUP --reload -- cat /sys/module/dummy/version
#              (a VM of SETUP already runs from the tree, dummy loaded once)
#   peer:      make -jN (host, ccache on PATH) + vng --run TREE --exec 'modprobe dummy && cat ...'
#              (virtme-ng; it prints nothing under TCG without udev here, so
#              the guest writes the version to a shared file, read after)
# and each loop's build alone (mkt build vs the host's make).
# Every run checks that the guest saw the new version; a wrong result fails.
# Uses the test fixtures (tests/fixtures/prepare.sh). Prints medians and ratios.
# Usage: tests/bench/loop.sh [RUNS]   (default 5)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
rootfs=$cache/rootfs-bookworm
[ -e "$cache/linux/arch/x86/boot/bzImage" ] || { echo "no fixture kernel: run tests/fixtures/prepare.sh" >&2; exit 1; }
command -v hyperfine >/dev/null || apt-get install -y -qq hyperfine >/dev/null
(cd "$here" && cargo build --release -q)
mkt=$here/target/release/mkt
venv=$cache/bench-venv
[ -x "$venv/bin/vng" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q virtme-ng; }
export PATH=$venv/bin:$PATH
work=$(mktemp -d)
vm=
cleanup() {
    [ -n "$vm" ] && { "$mkt" -q stop bench --force >/dev/null 2>&1 || true; wait "$vm" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
# mkt's own state (records, ccache, keys, runtime dir) in the work dir.
export HOME=$work/home XDG_RUNTIME_DIR=$work/run MKT_CONFIG=$work/mkt.toml
mkdir -p "$HOME" && mkdir -m 0700 "$XDG_RUNTIME_DIR"
j=$(nproc)

# Two copies of the fixture tree: one for mkt, one for the peer.
for t in mkt peer; do
    cp -a "$cache/linux" "$work/$t"
    # objtool's build records absolute paths (text files only: .cmd, .d).
    grep -rlI --include='.*.cmd' --include='*.d' "$cache/linux" "$work/$t/tools" 2>/dev/null \
        | xargs -r sed -i "s#$cache/linux/#$work/$t/#g"
    echo 'MODULE_VERSION("bench-0");' >> "$work/$t/drivers/net/dummy.c"
done
sleep 0.2
printf '[setup.bench]\nrootfs = "%s"\nkernel = "%s"\n' "$rootfs" "$work/mkt" > "$MKT_CONFIG"
# The host's make with ccache as mkt has it: on PATH, the command lines alone.
hostmake="env PATH=/usr/lib/ccache:$PATH make -s -j$j"
(cd "$work/peer" && $hostmake >/dev/null)
(cd "$work/mkt" && "$mkt" -q build --rootfs "$rootfs")
# A second build: the first records the tree; files copied just before it
# are not vouched for until a build that starts after them.
(cd "$work/mkt" && "$mkt" -q build --rootfs "$rootfs")

# The warm VM: SETUP bench from the mkt tree, dummy loaded.
"$mkt" -q run bench --init shell </dev/null >/dev/null 2>"$work/vm.log" &
vm=$!
"$mkt" -q ssh bench -- sudo modprobe dummy

# One round's edit: the next version in TREE (its count kept beside it,
# not in it: a new file in the tree is a change too).
cat > "$work/bump" <<'SH'
#!/bin/sh
set -e
n=$(($(cat "$1.n" 2>/dev/null || echo 0) + 1))
echo "$n" > "$1.n"
sed -i "s/MODULE_VERSION(\"bench-[0-9]*\")/MODULE_VERSION(\"bench-$n\")/" "$1/drivers/net/dummy.c"
SH
chmod +x "$work/bump"
# What the guest printed against the version of the last edit of TREE.
cat > "$work/check" <<'SH'
#!/bin/sh
want="bench-$(cat "$1.n")"
[ "$2" = "$want" ] || { echo "got '$2', want '$want'" >&2; exit 1; }
SH
chmod +x "$work/check"
m=$work/mkt p=$work/peer
cold="cd $m && $mkt -q build --rootfs $rootfs && v=\$($mkt -q run --rootfs $rootfs --kernel $m -- sh -c 'sudo modprobe dummy && cat /sys/module/dummy/version') && $work/check $m \"\$v\""
warm="cd $m && $mkt -q build --rootfs $rootfs && v=\$($mkt -q run bench --reload -- cat /sys/module/dummy/version 2>/dev/null) && $work/check $m \"\$v\""
peer="cd $p && $hostmake >/dev/null && rm -f $work/peer-v && { vng --run $p --disable-kvm --force-9p --rwdir=$work --exec 'modprobe dummy && cat /sys/module/dummy/version > $work/peer-v' >/dev/null 2>&1 || true; } && $work/check $p \"\$(cat $work/peer-v)\""
hyperfine --warmup 1 --runs "$runs" --export-json "$work/out.json" \
  -n "mkt cold: build + boot + test" --prepare "$work/bump $m" "$cold" \
  -n "mkt warm: build + reload + test" --prepare "$work/bump $m" "$warm" \
  -n "peer: make + vng boot + test" --prepare "$work/bump $p" "$peer" \
  -n "mkt build (one module changed)" --prepare "$work/bump $m" "cd $m && $mkt -q build --rootfs $rootfs" \
  -n "host make (one module changed)" --prepare "$work/bump $p" "cd $p && $hostmake >/dev/null" \
  >/dev/null
python3 - "$work/out.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) for x in json.load(open(sys.argv[1]))["results"]}
peer = r["peer: make + vng boot + test"]
make = r["host make (one module changed)"]
print(f"{'loop':36} {'median':>9} {'vs peer':>8}")
for k, v in r.items():
    base = make if k.startswith("mkt build") else peer
    ratio = f"{v / base:.2f}x" if k.startswith("mkt") else ""
    print(f"{k:36} {v:8.2f}s {ratio:>8}")
print("goals: cold <= 0.50x, warm <= 0.25x of the peer's loop")
PY
