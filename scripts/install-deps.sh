#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet, and checks that
# a Rust toolchain new enough for the workspace is on PATH.
set -euo pipefail

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    if [[ $EUID -ne 0 ]]; then
        SUDO=sudo
    else
        SUDO=
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo is not on PATH; install Rust 1.95 with rustup (https://rustup.rs) and try again" >&2
    exit 1
fi
have=$(rustc --version | awk '{print $2}')
if [[ "$(printf '%s\n' 1.95.0 "$have" | sort -V | head -1)" != 1.95.0 ]]; then
    echo "error: rustc $have is older than 1.95, which dcnet needs; run: rustup toolchain install 1.95" >&2
    exit 1
fi
