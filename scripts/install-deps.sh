#!/usr/bin/env bash
# Installs what dstack needs at run time and in its tests: HAProxy (Debian's
# package, 2.6 or newer), git and curl. Runs apt-get only when something is
# missing. Refuses an HAProxy older than 2.6, the oldest sherlock is built
# and tested against (its master CLI and Runtime API), with a clear message
# instead of failures deep in the tests.
set -euo pipefail

# Exits non-zero unless `haproxy -v` reports 2.6 or newer.
check_haproxy() {
    local banner version major minor
    banner=$(haproxy -v 2>&1 | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail
    version=$(printf '%s\n' "$banner" | sed -n 's/^HA-\{0,1\}Proxy version \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
    if [ -z "$version" ]; then
        echo "install-deps: cannot read HAProxy's version from \`haproxy -v\` ($(command -v haproxy)): \"$banner\"; dstack needs HAProxy 2.6 or newer" >&2
        exit 1
    fi
    major=${version%%.*}
    minor=${version#*.}
    if [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 6 ]; }; then
        echo "install-deps: HAProxy $version found at $(command -v haproxy); dstack needs HAProxy 2.6 or newer (Debian 12 and Ubuntu 24.04 ship one; or put a newer haproxy first on the PATH)" >&2
        exit 1
    fi
}

missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v curl >/dev/null 2>&1 || missing+=(curl)  # make demo waits with it
[ -x /usr/bin/chromium ] || missing+=(chromium)    # tests/status_page.rs drives it headless
if [ ${#missing[@]} -eq 0 ]; then
    check_haproxy
    exit 0
fi

echo "installing ${missing[*]} with apt-get" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
# The package starts a system-wide HAProxy; sherlock runs its own.
if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
haproxy -v | sed -n 1p >&2
check_haproxy
