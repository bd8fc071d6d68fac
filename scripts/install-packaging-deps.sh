#!/usr/bin/env bash
# Installs what `make packages` and `make install-test` need, and only that
# (so `make test` does not pay for it): cargo-deb and cargo-generate-rpm
# (with cargo install, versions pinned), Debian's rpm (rpm -qpi/-qpR of the
# .rpm files) and systemd (systemd-analyze verify, systemd-sysusers).
# Installs only what is missing.
set -euo pipefail

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "installing cargo-deb with cargo install" >&2
    cargo install --locked --quiet cargo-deb --version '~3.8'
fi
if ! command -v cargo-generate-rpm >/dev/null 2>&1; then
    echo "installing cargo-generate-rpm with cargo install" >&2
    cargo install --locked --quiet cargo-generate-rpm --version '~0.21'
fi

missing=()
command -v rpm >/dev/null 2>&1 || missing+=(rpm)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
