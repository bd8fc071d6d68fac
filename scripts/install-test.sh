#!/usr/bin/env bash
# The install test (`make install-test`, as root; CI runs it): builds the
# packages (scripts/packages.sh), installs the .deb files with apt-get,
# checks what they installed (HAProxy with sherlock, users, conffiles, man
# pages, completions, units that `systemd-analyze verify` accepts, the stock
# haproxy.service disabled), checks the .rpm files' metadata and
# requirements with rpm -qpi/-qpR, then runs each unit's ExecStart line as
# written in the installed unit, as the unit's user, with the packaged
# config files edited as an operator would (a routes repo in a temp dir,
# loopback ports), and serves one request through sherlock to a local
# instance that watson registered. Each daemon gets a $NOTIFY_SOCKET of the
# test's own, so their READY=1 and WATCHDOG=1 are checked too (PID 1 here
# need not be systemd). It ends every process it started and purges the
# packages, leaving the machine as it found it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test: run as root: it installs and purges packages" >&2
    exit 1
fi

scripts/packages.sh
cargo build --release --locked --example emitter
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

passed=0
failed=0
pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
# check NAME COMMAND...: passes when COMMAND succeeds.
check() {
    local name=$1
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

work=$(mktemp -d /tmp/dstack-install-test.XXXXXX)
chmod 755 "$work"
pids=()
users_before=$(getent passwd | cut -d: -f1 | grep '^dstack-' || true)
haproxy_enabled_before=$(systemctl is-enabled haproxy.service 2>/dev/null || true)

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        # watson deregisters and sherlock stops its HAProxy: a few seconds at most.
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -f /etc/datawire.d/install-test.yaml
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq dstack-directory dstack-watson dstack-sherlock dstack-dw >/dev/null 2>&1 || true
    haproxy_after_purge=$(systemctl is-enabled haproxy.service 2>/dev/null || true)
    if [ -n "${made_dirs:-}" ]; then rm -rf /run/dstack/sherlock /var/lib/dstack/directory; fi
    rmdir /run/dstack /var/lib/dstack /etc/datawire.d /etc/datawire 2>/dev/null || true
    local user
    for user in dstack-directory dstack-watson dstack-sherlock; do
        if ! grep -qx "$user" <<<"$users_before" && getent passwd "$user" >/dev/null; then userdel "$user" 2>/dev/null || true; fi
    done
    case "$haproxy_enabled_before" in
        enabled) systemctl enable haproxy.service >/dev/null 2>&1 || true ;;
        disabled) systemctl disable haproxy.service >/dev/null 2>&1 || true ;;
    esac
    rm -rf "$work"
}
trap cleanup EXIT

# A loopback port below Linux's ephemeral range (32768..), so no port-0 bind
# of a test running alongside takes it, and free now.
free_port() {
    local port
    while :; do
        port=$(shuf -i 20000-32000 -n 1)
        if [ -z "$(ss -Htln "sport = :$port")" ] && ! grep -qx "$port" <<<"${taken:-}"; then
            taken="${taken:-}"$'\n'"$port"
            echo "$port"
            return
        fi
    done
}

# wait_for SECONDS COMMAND...: polls COMMAND every 0.1 s.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

user_exists() { getent passwd "$1" >/dev/null; }

echo "--- the .deb packages"
# The stock haproxy.service is disabled by dstack-sherlock's first install
# when its config is untouched; enable it here so that shows (restored at the end).
stock_cfg=$(dpkg-query -W -f='${Conffiles}\n' haproxy 2>/dev/null | awk '$1 == "/etc/haproxy/haproxy.cfg" { print $2 }')
haproxy_is_stock=no
if [ -n "$stock_cfg" ] && [ "$(md5sum </etc/haproxy/haproxy.cfg | cut -d' ' -f1)" = "$stock_cfg" ]; then
    haproxy_is_stock=yes
    systemctl enable haproxy.service >/dev/null 2>&1 || true
fi
debs=(target/debian/dstack-{directory,watson,sherlock,dw}_"$version"-1_*.deb)
check "apt-get install ${debs[*]}" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]/#/./}"
for pkg in dstack-directory dstack-watson dstack-sherlock dstack-dw; do
    check "$pkg $version is installed" test "$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null)" = "install ok installed $version-1"
done
check "dstack-sherlock depends on haproxy (>= 2.6)" \
    grep -q 'haproxy (>= 2.6)' <(dpkg-query -W -f='${Depends}' dstack-sherlock)
haproxy_version=$(dpkg-query -W -f='${Version}' haproxy 2>/dev/null || true)
check "HAProxy came with sherlock: haproxy $haproxy_version installed, 2.6 or newer" \
    dpkg --compare-versions "${haproxy_version:-0}" ge 2.6
if [ "$haproxy_is_stock" = yes ]; then
    check "the stock haproxy.service was disabled (its config is untouched)" \
        test "$(systemctl is-enabled haproxy.service 2>/dev/null)" = disabled
fi
for role in directory watson sherlock; do
    check "user dstack-$role exists" user_exists "dstack-$role"
    check "/etc/datawire/$role.yaml is a conffile" \
        grep -q "/etc/datawire/$role.yaml" <(dpkg-query -W -f='${Conffiles}' "dstack-$role")
    check "$role.service is installed, not enabled" \
        test "$(systemctl is-enabled "$role.service" 2>/dev/null)" = disabled
done
check "/etc/datawire.d/ is there for watson's services" test -d /etc/datawire.d
for prog in directory watson sherlock dw; do
    check "$prog: man page, bash, zsh and fish completions" test -f "/usr/share/man/man1/$prog.1.gz" \
        -a -f "/usr/share/bash-completion/completions/$prog" -a -f "/usr/share/zsh/vendor-completions/_$prog" \
        -a -f "/usr/share/fish/vendor_completions.d/$prog.fish"
done
check "dw's subcommands have man pages (dw-apply.1)" test -f /usr/share/man/man1/dw-apply.1.gz
check "the man page documents the flags (sherlock.1: --listen)" grep -q -- 'listen' <(zcat /usr/share/man/man1/sherlock.1.gz)
check "the bash completion knows the flags (sherlock: --run-dir)" grep -q -- '--run-dir' /usr/share/bash-completion/completions/sherlock
units=(/usr/lib/systemd/system/{directory,watson,sherlock}.service)
if out=$(systemd-analyze verify "${units[@]}" 2>&1); then
    pass "systemd-analyze verify accepts ${units[*]}"
else
    fail "systemd-analyze verify ${units[*]}" "$out"
fi
# Exposure 0 is fully sandboxed, 10 not at all (--threshold counts tenths);
# these units score 1.6 to 1.7.
sandboxed() { systemd-analyze security --offline=yes --threshold=25 "$1" >/dev/null 2>&1; }
for unit in "${units[@]}"; do
    check "systemd-analyze security: $(basename "$unit") is sandboxed (exposure 2.5 or less)" sandboxed "$unit"
done

echo "--- the .rpm packages"
for role in directory watson sherlock dw; do
    rpm_file=$(ls target/generate-rpm/dstack-"$role"-"$version"-1.*.rpm)
    info=$(rpm -qpi "$rpm_file" 2>/dev/null)
    check "rpm -qpi $rpm_file: name dstack-$role, version $version" \
        grep -qzE "Name +: dstack-$role.*Version +: $version" <<<"$info"
done
check "rpm -qpR dstack-sherlock: haproxy >= 2.6" \
    grep -qx 'haproxy >= 2.6' <(rpm -qpR target/generate-rpm/dstack-sherlock-"$version"-1.*.rpm 2>/dev/null)
check "rpm -qpc dstack-sherlock: /etc/datawire/sherlock.yaml is a config file" \
    grep -qx /etc/datawire/sherlock.yaml <(rpm -qpc target/generate-rpm/dstack-sherlock-"$version"-1.*.rpm 2>/dev/null)
check "rpm -qpl dstack-sherlock: its unit and its man page" \
    grep -qx /usr/lib/systemd/system/sherlock.service <(rpm -qpl target/generate-rpm/dstack-sherlock-"$version"-1.*.rpm 2>/dev/null)

echo "--- the units' ExecStart lines, with the packaged config files"
directory_port=$(free_port)
sherlock_port=$(free_port)
admin_port=$(free_port)
emitter_port=$(free_port)

# A routes repo, as an operator makes one; the directory's user reads it.
routes=$work/routes
mkdir -p "$routes/routes"
printf 'hello:\n  v1: 100\n' >"$routes/routes/hello.yaml"
git -C "$routes" init -q -b main
git -C "$routes" add routes
git -C "$routes" -c user.name=ops -c user.email=ops@example.com commit -q -m "hello: all to v1"
chown -R dstack-directory: "$routes"

# The edits an operator makes to the packaged files.
sed -i -e "s|^listen: .*|listen: 127.0.0.1:$directory_port|" -e "s|^#repo: .*|repo: $routes|" /etc/datawire/directory.yaml
sed -i -e "s|^directories: .*|directories: [127.0.0.1:$directory_port]|" /etc/datawire/watson.yaml
sed -i -e "s|^directories: .*|directories: [127.0.0.1:$directory_port]|" -e "s|^listen: .*|listen: 127.0.0.1:$sherlock_port|" \
    -e "s|^admin: .*|admin: 127.0.0.1:$admin_port|" /etc/datawire/sherlock.yaml
printf 'name: hello\nurl: http://127.0.0.1:%s/hello\nperiod: 1\n' "$emitter_port" >/etc/datawire.d/install-test.yaml

# What systemd makes before ExecStart: StateDirectory= and RuntimeDirectory=.
install -d -m 0755 /var/lib/dstack /run/dstack
for dir in /run/dstack/sherlock /var/lib/dstack/directory; do
    if [ -e "$dir" ]; then
        echo "install-test: $dir exists already (a packaged daemon, or a root one on its default port?); it is not the test's to remove" >&2
        exit 1
    fi
done
made_dirs=yes
install -d -m 0700 -o dstack-directory -g dstack-directory /var/lib/dstack/directory
install -d -m 0700 -o dstack-sherlock -g dstack-sherlock /run/dstack/sherlock

# A $NOTIFY_SOCKET per daemon; every datagram is appended to ROLE.notify.
notify=$work/notify
install -d -m 0755 "$notify"
python3 - "$notify" directory watson sherlock <<'PY' &
import os, select, socket, sys
folder, roles = sys.argv[1], sys.argv[2:]
socks = {}
for role in roles:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(folder, role + ".sock")
    s.bind(path)
    os.chmod(path, 0o777)
    socks[s] = role
open(os.path.join(folder, "listening"), "w").close()
while True:
    for s in select.select(list(socks), [], [])[0]:
        with open(os.path.join(folder, socks[s] + ".notify"), "a") as log:
            log.write(s.recv(4096).decode() + "\n--\n")
PY
pids+=($!)
wait_for 10 test -e "$notify/listening" || { echo "install-test: the notify socket listener did not start" >&2; exit 1; }

# start ROLE: runs the installed unit's ExecStart line, as written, as its
# User=, with the environment systemd gives a service (and a 2 s watchdog).
start() {
    local role=$1 unit=/usr/lib/systemd/system/$1.service exec user
    exec=$(sed -n 's/^ExecStart=//p' "$unit")
    user=$(sed -n 's/^User=//p' "$unit")
    read -r -a argv <<<"$exec"
    echo "$role: $exec (as $user)"
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" LOGNAME="$user" RUST_LOG=info \
        NOTIFY_SOCKET="$notify/$role.sock" WATCHDOG_USEC=2000000 \
        setpriv --reuid="$user" --regid="$user" --init-groups -- "${argv[@]}" >"$work/$role.log" 2>&1 &
    pids+=($!)
    eval "${role}_pid=$!"
}
ready() { grep -q '^READY=1' "$notify/$1.notify" 2>/dev/null; }
fed() { grep -q '^WATCHDOG=1' "$notify/$1.notify" 2>/dev/null; }

"$repo_root/target/release/examples/emitter" --listen "127.0.0.1:$emitter_port" --name install-test >"$work/emitter.log" 2>&1 &
pids+=($!)

start directory
check "directory: READY=1 once it serves" wait_for 30 ready directory
check "directory: its routes are loaded at READY (commit in the status line)" \
    grep -q '^STATUS=serving on 127.0.0.1:'"$directory_port"'; routes commit [0-9a-f]' "$notify/directory.notify"
check "directory: runs as dstack-directory" test "$(ps -o user= -p "$directory_pid")" = dstack-directory
check "directory: answers /v1/status" curl -fsS -o /dev/null "http://127.0.0.1:$directory_port/v1/status"

start watson
check "watson: READY=1 after its first check" wait_for 30 ready watson
check "watson: its status line counts the live instance" grep -q '^STATUS=first checks done: 1 of 1 instances alive' "$notify/watson.notify"
registered() { curl -fsS "http://127.0.0.1:$directory_port/v1/instances" | grep -q '"service":"hello"'; }
check "watson: registered hello with the directory" wait_for 30 registered

start sherlock
check "sherlock: READY=1 once its HAProxy serves" wait_for 30 ready sherlock
check "sherlock: its HAProxy accepts on 127.0.0.1:$sherlock_port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$sherlock_port"
check "sherlock: runs as dstack-sherlock, and so does its HAProxy" \
    test "$(ps -o user= --ppid "$sherlock_pid" -p "$sherlock_pid" | sort -u | xargs)" = dstack-sherlock
answer() { curl -fsS --max-time 5 "http://127.0.0.1:$sherlock_port/hello/there"; }
answered() { answer | grep -q 'emitter install-test saw /hello/there'; }
if wait_for 30 answered; then
    pass "a request through sherlock reaches the instance watson registered"
else
    fail "a request through sherlock" "$(answer 2>&1 || true)"
fi
for role in directory watson sherlock; do
    check "$role: feeds the watchdog (WATCHDOG=1)" wait_for 10 fed "$role"
    check "$role: still running" kill -0 "$(eval echo "\$${role}_pid")"
done

if [ "$failed" -gt 0 ]; then
    for role in directory watson sherlock; do
        echo "--- $role's log"
        tail -n 30 "$work/$role.log" || true
    done
fi

echo "--- purge"
cleanup
trap - EXIT
for pkg in dstack-directory dstack-watson dstack-sherlock dstack-dw; do
    check "$pkg purged" test -z "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -v not-installed || true)"
done
check "no dstack file is left in /usr/bin or /etc" test ! -e /usr/bin/sherlock -a ! -e /etc/datawire/sherlock.yaml
if [ "$haproxy_is_stock" = yes ]; then
    check "purging dstack-sherlock enabled the stock haproxy.service it had disabled" test "$haproxy_after_purge" = enabled
fi
echo "install-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
