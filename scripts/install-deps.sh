#!/usr/bin/env bash
# Installs what dstack needs at run time and in its tests: HAProxy (Debian's
# package, 2.6 or newer). Runs apt-get only when something is missing.
set -euo pipefail

missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v curl >/dev/null 2>&1 || missing+=(curl)  # make demo waits with it
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} with apt-get" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
# The package starts a system-wide HAProxy; sherlock runs its own.
if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
haproxy -v | head -n 1 >&2
