#!/usr/bin/env bash
# Benchmark for `mkt ci` (issue: mkt ci): what the touched-directories approach costs against
# running sparse over the whole tree the naive way.
#   mkt ci --wait on a commit adding a sparse warning to drivers/net/dummy.c: the first run
#     (scratch checkout, first kernel build) once, then RUNS warm runs (the usual case: the
#     scratch tree is kept between runs) -> median
#   naive: `make -k C=2` (sparse on every file) over the whole fixture kernel tree (the same small
#     VM config), inside the same rootfs (mkt build), once cold (everything compiled too: mkt's
#     ccache is empty there) and once with the objects up to date (sparse alone).
# Needs the fixtures (tests/fixtures/prepare.sh: rootfs with sparse, ci-repo, kernel tree).
# Usage: tests/bench/ci.sh [RUNS]   (default 3; run as a user, or as root: root works too)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-3}
cache=${MKT_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkt-test/v1}
rootfs=$cache/rootfs-bookworm
for f in "$rootfs/usr/bin/sparse" "$cache/ci-repo.git/.complete" "$cache/linux/arch/x86/boot/bzImage"; do
    [ -e "$f" ] || { echo "missing fixture $f: run tests/fixtures/prepare.sh" >&2; exit 1; }
done
(cd "$here" && cargo build --release -q)
mkt=$here/target/release/mkt
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export HOME=$work/home XDG_CACHE_HOME=$work/home/.cache XDG_STATE_HOME=$work/home/.local/state \
    XDG_DATA_HOME=$work/home/.local/share XDG_CONFIG_HOME=$work/home/.config XDG_RUNTIME_DIR=$work/home/run
mkdir -p "$XDG_RUNTIME_DIR"

# The developer's repository: the fixture's objects, drivers/net checked out, one sparse commit.
base=$(git -c safe.directory='*' --git-dir="$cache/ci-repo.git" rev-parse master)
git init -q -b master "$work/linux"
cd "$work/linux"
echo "$cache/ci-repo.git/objects" > .git/objects/info/alternates
git update-ref refs/heads/master "$base"
git sparse-checkout set drivers/net
git checkout -q master
git config user.name bench; git config user.email bench@example.invalid
sed -i 's/^static int numdummies = 1;$/&\n\nstatic int __maybe_unused mkt_ci_peek(int __user *uptr)\n{\n\tint *kptr = uptr;\n\n\treturn *kptr;\n}/' drivers/net/dummy.c
git commit -q -a -s -m 'net: dummy: a sparse warning' -m 'For the benchmark.'

ci() { "$mkt" -q ci --wait --rootfs "$rootfs" --no-smatch --no-clang >/dev/null 2>&1 || [ $? = 1 ]; }
now() { date +%s.%N; }
t0=$(now); ci; t1=$(now)
cold=$(echo "$t1 - $t0" | bc)
warm=()
for _ in $(seq "$runs"); do
    t0=$(now); ci; t1=$(now)
    warm+=("$(echo "$t1 - $t0" | bc)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# Naive: sparse over every file of the whole (built) tree, in the same rootfs.
cp -a "$cache/linux" "$work/tree"
grep -rlI --include='.*.cmd' --include='*.d' "$cache/linux" "$work/tree/tools" 2>/dev/null \
    | xargs -r sed -i "s#$cache/linux.tmp#$work/tree#g; s#$cache/linux/#$work/tree/#g"
files=$(find "$work/tree" -name '*.o' -not -path '*/tools/*' | wc -l)
# First pass: mkt's ccache is empty and the copy was built elsewhere, so make
# recompiles everything (the naive way from a cold tree); second pass: the
# objects are up to date, C=2 still runs sparse on every file.
t0=$(now)
"$mkt" -q build --rootfs "$rootfs" -C "$work/tree" -- -k C=2 >/dev/null 2>&1 || true
t1=$(now)
naive_cold=$(echo "$t1 - $t0" | bc)
t0=$(now)
"$mkt" -q build --rootfs "$rootfs" -C "$work/tree" -- -k C=2 >/dev/null 2>&1 || true
t1=$(now)
naive=$(echo "$t1 - $t0" | bc)
printf '%-58s %9s\n' "what (2 CPUs: $(nproc))" "wall"
printf '%-58s %8.1fs\n' "mkt ci --wait, first run (checkout + first build)" "$cold"
printf '%-58s %8.1fs\n' "mkt ci --wait, warm, median of $runs" "$(median "${warm[@]}")"
printf '%-58s %8.1fs\n' "naive: make C=2, whole tree, cold (compile + sparse)" "$naive_cold"
printf '%-58s %8.1fs\n' "naive: make C=2, whole built tree ($files objects: sparse)" "$naive"
