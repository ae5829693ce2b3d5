#!/usr/bin/env bash
# Mutation testing of mkt's pure cores with their unit tests (issue 14); a
# tool for developers, not part of CI (the default files take about an hour on 2 cores).
#
# cargo-mutants changes one thing at a time in the code (a return value, an
# operator, a deleted statement), rebuilds, and runs the unit tests: a mutant
# the tests do not notice ("missed") is behaviour no test pins down. Each
# missed mutant must get a test, or a line in tests/mutants-equivalent.txt
# saying why the change cannot be observed (a regex matching cargo-mutants'
# description of it, then `#` and the reason).
#
# Usage: tests/mutants.sh [--iterate] [FILE...]   (default: the files below)
#   --iterate  skip mutants caught by the previous run (mutants.out in the worktree)
# Runs in its own git worktree of HEAD (target/mutants-tree, reusing a copy of
# target/ for the first build), so the checkout you work in is never mutated.
# Cost on the 2-core machine (debug build, `cargo test --lib`): ~5 s per
# mutant idle, ~1,300 mutants in the default files: ~2 h; src/vm/vfio.rs alone
# (61 mutants) ~5 min. Results: target/mutants-tree/mutants.out/{caught,missed,unviable,timeout}.txt
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants

iterate=()
if [ "${1:-}" = --iterate ]; then iterate=(--iterate); shift; fi
files=("$@")
if [ ${#files[@]} = 0 ]; then
  files=(src/rootfs/unpack/{mod,entry,meta,limits,whiteout,remove}.rs src/oci/{manifest,resolve,reference,blobs}.rs src/config/{mod,values,paths}.rs
         src/ci/findings.rs src/ci/scope.rs src/vm/vfio.rs src/vm/qemu/args.rs src/guest/mod.rs src/guest/plan.rs
         src/sandbox/plan.rs src/sandbox/idmap.rs src/build/fast.rs)
fi

tree=$here/target/mutants-tree
if [ ! -e "$tree/.git" ]; then
  git worktree add -q --detach "$tree" HEAD
  # The first build reuses the checkout's compiled dependencies.
  [ -d "$here/target/debug" ] && mkdir -p "$tree/target" && cp -a "$here/target/debug" "$tree/target/"
else
  git -C "$tree" checkout -q --detach "$(git rev-parse HEAD)"
fi

args=()
for f in "${files[@]}"; do args+=(-f "$f"); done
# One --exclude-re per equivalent mutant (comments and blank lines skipped).
while IFS= read -r line; do
  re=${line%%#*}
  re=${re%"${re##*[![:space:]]}"}
  [ -n "$re" ] && args+=(--exclude-re "$re")
done < "$here/tests/mutants-equivalent.txt"

# The two slow unit tests (3 s and 2 s, most of the test phase) run only
# when their own file is mutated.
skips=()
for slow in rootfs::tests::a_deep_tree_is_removed_with_few_open_files=src/rootfs/mod.rs \
            host::kvm::tests::spinning_test_guest_times_out=src/host/kvm.rs; do
  [[ " ${files[*]} " == *" ${slow#*=} "* ]] || skips+=(--skip "${slow%%=*}")
done
[ ${#skips[@]} = 0 ] || skips=(--cargo-test-arg=-- "${skips[@]/#/--cargo-test-arg=}")

# Never run: with `&&` made `||`, list_dir returns `.` and `..`, and
# remove_at then climbs out of the test's temp dir deleting every file in the
# directories it enters (it emptied the top of /tmp once). Its tests catch it,
# but only after the damage. Temp dirs live in the worktree all the same.
args+=(--exclude-re 'src/rootfs/unpack/remove\.rs:.*replace && with \|\| in list_dir$')
mkdir -p "$tree/target/tmp"
export TMPDIR=$tree/target/tmp

cd "$tree"
# In place: one build tree, no copy per job (2 cores; the default copy would
# rebuild every dependency first). Unit tests only: the cores are pure; and
# only the library's test binary is built (--cargo-arg applies to the build
# as well: building every integration test too tripled each mutant's time).
nice -n 10 cargo mutants --in-place --no-shuffle --test-tool cargo --cargo-arg=--lib \
  "${skips[@]}" "${iterate[@]}" "${args[@]}" || status=$?
echo "results: $tree/mutants.out (missed.txt lists what no test noticed)" >&2
for k in caught missed unviable timeout; do
  printf '%-9s %s\n' "$k" "$(wc -l < "$tree/mutants.out/$k.txt" 2>/dev/null || echo 0)"
done
# cargo-mutants exits 2 when some mutant was missed, 3 on a timeout.
exit "${status:-0}"
