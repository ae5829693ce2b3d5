#!/usr/bin/env bash
# Installs mkt: the host packages it uses (Debian/Ubuntu via apt, Fedora via
# dnf; with sudo when not root), the binary (cargo install), then `mkt setup`.
set -euo pipefail
cd "$(dirname "$0")"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if command -v apt-get >/dev/null; then
    $sudo apt-get install -y qemu-system-x86 uidmap ccache cpio debootstrap mmdebstrap
elif command -v dnf >/dev/null; then
    $sudo dnf install -y qemu-system-x86-core shadow-utils ccache cpio debootstrap mmdebstrap virtiofsd
else
    echo "install.sh: neither apt-get nor dnf found; install QEMU yourself (see mkt setup)" >&2
fi
cargo install --locked --path .
mkt setup
