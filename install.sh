#!/usr/bin/env bash
# Installs mkt and everything its main job (`mkt run -- uname -a` on the
# default rootfs) needs: the host packages (Debian/Ubuntu via apt, Fedora via
# dnf; with sudo when not root), virtiofsd (Debian 12 has no package: built
# from crates.io, because the default rootfs's kernel has no 9p), the mkt
# binary (cargo install), then `mkt setup` and `mkt doctor`. Idempotent:
# what is there stays.
#
#   ./install.sh              install
#   ./install.sh --dry-run    print the commands it would run, run none
#   ./install.sh --deps-only  the host packages and virtiofsd, not mkt itself (CI)
set -euo pipefail
cd "$(dirname "$0")"

dry_run=""
deps_only=""
for arg in "$@"; do
    case "$arg" in
    --dry-run) dry_run=1 ;;
    --deps-only) deps_only=1 ;;
    *)
        echo "usage: ./install.sh [--dry-run] [--deps-only]" >&2
        exit 2
        ;;
    esac
done

say() { printf 'install.sh: %s\n' "$*" >&2; }
run() {
    if [ -n "$dry_run" ]; then
        printf '%s\n' "$*"
    else
        "$@"
    fi
}

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

# cargo builds mkt and virtiofsd: say how to get it before installing anything.
# (Debian 12's own cargo is too old for mkt's edition 2024.)
if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    say "cargo not found: mkt and virtiofsd are built with Rust's cargo (Rust >= 1.88)."
    say "Install it with rustup, as the user who will run mkt, then run ./install.sh again:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
    say "  . \"\$HOME/.cargo/env\""
    say "(or see https://rustup.rs)"
    exit 1
fi

# The Rust virtiofsd where mkt looks for it (see `mkt doctor`). QEMU's old C
# virtiofsd in /usr/lib/qemu is not one mkt can use.
have_virtiofsd() {
    [ -n "${MKT_VIRTIOFSD:-}" ] && return 0
    command -v virtiofsd >/dev/null && return 0
    local p
    for p in "$HOME/.cargo/bin/virtiofsd" /usr/libexec/virtiofsd /usr/lib/virtiofsd; do
        [ -x "$p" ] && return 0
    done
    return 1
}

need_virtiofsd=""
have_virtiofsd || need_virtiofsd=1

if command -v apt-get >/dev/null; then
    pkgs=(qemu-system-x86 uidmap mmdebstrap debootstrap ccache cpio kmod xz-utils zstd
        openssh-client ca-certificates)
    # virtiofsd's build: a C toolchain for the link, and its -dev libraries.
    [ -z "$need_virtiofsd" ] || pkgs+=(gcc libc6-dev pkg-config libcap-ng-dev libseccomp-dev)
    run $sudo apt-get update -qq
    run $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
elif command -v dnf >/dev/null; then
    run $sudo dnf install -y qemu-system-x86-core shadow-utils mmdebstrap debootstrap ccache cpio \
        kmod xz zstd openssh-clients virtiofsd
    have_virtiofsd && need_virtiofsd=""
else
    say "neither apt-get nor dnf found: install QEMU, newuidmap, mmdebstrap and virtiofsd yourself (see mkt setup)"
fi

if [ -n "$need_virtiofsd" ]; then
    if [ "$(id -u)" = 0 ]; then
        # On every user's PATH, not in root's home.
        run cargo install --locked --root /usr/local virtiofsd
    else
        run cargo install --locked virtiofsd
    fi
fi

[ -z "$deps_only" ] || exit 0
run cargo install --locked --path .

mkt=$(command -v mkt || echo "${CARGO_HOME:-$HOME/.cargo}/bin/mkt")
run "$mkt" setup
# What is still missing (a subordinate id range, KVM), each with its fix.
run "$mkt" doctor || say "mkt doctor reports a required part missing: see its fix: lines above"
if [ -z "$dry_run" ] && ! command -v mkt >/dev/null; then
    say "mkt is installed in $(dirname "$mkt"), which is not on your PATH: add it (. \"\$HOME/.cargo/env\")"
fi
