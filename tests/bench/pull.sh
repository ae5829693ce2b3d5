#!/usr/bin/env bash
# Benchmark for `mkt rootfs pull` (issue: rootfs store), whole-process wall
# times, side by side, from a local docker-registry on 127.0.0.1:
#   mkt rootfs pull IMAGE   vs   skopeo copy docker://IMAGE oci:DIR + umoci unpack --rootless
# for a busybox-size image (~6 MiB) and a Debian-size one (the fixture rootfs),
# each run from an empty store and blob cache. As root, the timed commands run
# as the unprivileged user ($MKT_TEST_USER, default mkt-ci), as users would.
# Usage: tests/bench/pull.sh [RUNS]   (default 5; MKT_BENCH_OWNERS=xattrs|real picks --owners)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-5}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
rootfs=$cache/rootfs-bookworm
[ -e "$rootfs/.complete" ] || { echo "no fixture rootfs: run tests/fixtures/prepare.sh" >&2; exit 1; }
for p in hyperfine docker-registry skopeo umoci; do
    command -v $p >/dev/null || apt-get install -y -qq "$p" >/dev/null
done
(cd "$here" && cargo build --release -q)
work=$(mktemp -d /tmp/mkt-bench-pull-XXXXXX); chmod 755 "$work"
reg_pid=
trap '[ -n "$reg_pid" ] && kill $reg_pid; rm -rf "$work"' EXIT
install -m 755 "$here/target/release/mkt" "$work/mkt"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# Images: a small tree (bash, libc, /etc) and the whole fixture tree.
mkdir -p "$work/small/usr/bin" "$work/small/usr/lib/x86_64-linux-gnu"
cp -a "$rootfs/etc" "$work/small/"
cp -a "$rootfs/usr/bin/bash" "$work/small/usr/bin/"
cp -a "$rootfs"/usr/lib/x86_64-linux-gnu/libc.so* "$rootfs"/usr/lib/x86_64-linux-gnu/libtinfo.so* \
    "$work/small/usr/lib/x86_64-linux-gnu/"
make_image() { # DIR NAME
    local layout=$work/layout-$2
    umoci init --layout "$layout" >/dev/null
    umoci new --image "$layout:t"
    umoci unpack --image "$layout:t" "$work/bundle-$2" >/dev/null
    cp -a "$1/." "$work/bundle-$2/rootfs/"
    umoci repack --image "$layout:t" "$work/bundle-$2" >/dev/null
    rm -rf "$work/bundle-$2"
    skopeo copy --quiet --dest-tls-verify=false "oci:$layout:t" "docker://127.0.0.1:$port/bench/$2:1"
    rm -rf "$layout"
}
make_image "$work/small" small
make_image "$rootfs" debian
rm -rf "$work/small"

user=
if [ "$(id -u)" = 0 ]; then
    user=${MKT_TEST_USER:-mkt-ci}
    id "$user" >/dev/null
    chown "$user" "$work"
fi
as_user() { if [ -n "$user" ]; then su -s /bin/bash "$user" -c "$1"; else bash -c "$1"; fi; }
u=$work/run
as_user "mkdir -p $u && mkdir -p -m 700 $u/rt"
# Each timed command is a script; each starts from an empty store and cache.
# (a tree with subordinate-id owners is removed by mkt, from its namespace)
cat >"$work/clean.sh" <<EOF
export HOME=$u XDG_DATA_HOME=$u/data XDG_STATE_HOME=$u/state XDG_CONFIG_HOME=$u/cfg XDG_RUNTIME_DIR=$u/rt
for n in small debian; do [ ! -d $u/data/mkt/rootfs/\$n ] || $work/mkt -q rootfs rm \$n; done
chmod -R u+rwX $u/bundle 2>/dev/null; rm -rf $u/data $u/oci $u/bundle; true
EOF
for size in small debian; do
    cat >"$work/mkt-$size.sh" <<EOF
export HOME=$u XDG_DATA_HOME=$u/data XDG_STATE_HOME=$u/state XDG_CONFIG_HOME=$u/cfg XDG_RUNTIME_DIR=$u/rt
exec $work/mkt -q rootfs pull ${MKT_BENCH_OWNERS:+--owners $MKT_BENCH_OWNERS} --name $size 127.0.0.1:$port/bench/$size:1
EOF
    cat >"$work/skopeo-umoci-$size.sh" <<EOF
skopeo copy --quiet --src-tls-verify=false docker://127.0.0.1:$port/bench/$size:1 oci:$u/oci:t
exec umoci unpack --rootless --image $u/oci:t $u/bundle >/dev/null
EOF
done
chmod 755 "$work"/*.sh
as_user "cd $u && hyperfine --runs $runs --export-json $u/out.json --prepare 'sh $work/clean.sh' \
  -n 'mkt pull (small)' 'sh $work/mkt-small.sh' \
  -n 'skopeo+umoci (small)' 'sh $work/skopeo-umoci-small.sh' \
  -n 'mkt pull (debian)' 'sh $work/mkt-debian.sh' \
  -n 'skopeo+umoci (debian)' 'sh $work/skopeo-umoci-debian.sh' >/dev/null"
python3 - "$u/out.json" <<'PY'
import json, statistics, sys
r = {x["command"]: statistics.median(x["times"]) for x in json.load(open(sys.argv[1]))["results"]}
print(f"{'command':24} {'median':>9}")
for k, v in r.items():
    print(f"{k:24} {v:8.3f}s")
for size in ("small", "debian"):
    print(f"mkt / (skopeo+umoci), {size}: {r[f'mkt pull ({size})'] / r[f'skopeo+umoci ({size})']:.2f}x")
PY
