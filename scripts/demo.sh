#!/usr/bin/env bash
# The dstack walkthrough on one host, on loopback: a directory following a
# routes repo (a fresh git repo made from examples/repo), three emitter
# instances with their watsons, a transform that consumes emitter, a barker
# service with a 90/10 canary (three v1 instances, one v2), and a sherlock in
# front of it all. Ctrl-C stops every process it started, at any moment.
#
# The environment may move it (the tests run it so): DSTACK_BIN (the
# binaries, default target/release), DSTACK_EXAMPLES (default
# $DSTACK_BIN/examples), DEMO_STATE (default .demo), and every port below.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${DSTACK_BIN:-target/release}
ex=${DSTACK_EXAMPLES:-$bin/examples}
state=${DEMO_STATE:-.demo}
DIRECTORY_PORT=${DIRECTORY_PORT:-7575}
SHERLOCK_PORT=${SHERLOCK_PORT:-8000}
ADMIN_PORT=${ADMIN_PORT:-8001}
read -r -a EMITTER_PORTS <<<"${EMITTER_PORTS:-9001 9002 9003}"
TRANSFORM_PORT=${TRANSFORM_PORT:-9100}
read -r -a BARKER_PORTS <<<"${BARKER_PORTS:-9201 9202 9203 9204}"
BARKER_VERSIONS=(v1 v1 v1 v2)

for port in "$DIRECTORY_PORT" "$SHERLOCK_PORT" "${EMITTER_PORTS[@]}" "$TRANSFORM_PORT" "${BARKER_PORTS[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; stop what holds it (another demo?) and retry" >&2
    exit 1
  fi
done

rm -rf "$state" && mkdir -p "$state/logs"
pids=()
# Stops everything and exits: a signal must end the script, not return to
# whatever it was doing (the start-up wait loop ran on for 10 s after a
# Ctrl-C when this only cleaned up). Background processes of a script
# ignore SIGINT, so each gets a SIGTERM.
cleanup() {
  local code=$1
  if [ "$BASHPID" != "$$" ]; then
    # A signal that reaches a subshell (a $(...) of the wait loop) between
    # its fork and its reset of the traps runs this there. Die of that
    # signal, so that the script sees it and stops everything: a subshell
    # that exited normally would make bash take the signal as handled, and
    # the script would go on with its processes stopped.
    trap - INT TERM EXIT
    case $code in 130) kill -INT "$BASHPID" ;; 143) kill -TERM "$BASHPID" ;; esac
    return
  fi
  trap - INT TERM EXIT
  echo
  echo "stopping the demo..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs are in $state/logs/"
  exit "$code"
}
trap 'cleanup 130' INT
trap 'cleanup 143' TERM
trap 'cleanup $?' EXIT

start() { # name, command...
  local name=$1; shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  pids+=($!)
}

# examples/repo is a folder of this repo; the directory needs a git repo of
# its own: a bare "remote" it pulls, and a clone for dw to commit in.
git init -q --bare -b main "$state/routes.git"
git init -q -b main "$state/routes"
cp -R examples/repo/. "$state/routes/"
(
  cd "$state/routes"
  git -c user.name=demo -c user.email=demo@dstack.invalid add -A
  git -c user.name=demo -c user.email=demo@dstack.invalid commit -q -m "Routes from examples/repo: barker canary at 10%"
  git remote add origin "$(cd ../routes.git && pwd)"
  git push -q origin main
  git config user.name "dstack demo"
  git config user.email demo@dstack.invalid
)

directory="127.0.0.1:$DIRECTORY_PORT"
start directory "$bin/directory" -n services -a "//127.0.0.1/directory" --listen "$directory" \
  --state-dir "$state/directory" --repo "$(cd "$state/routes.git" && pwd)" --poll 5s
sleep 0.3

i=1
for port in "${EMITTER_PORTS[@]}"; do
  start "emitter-vm10$i" "$ex/emitter" --listen "127.0.0.1:$port" --name "vm10$i"
  start "watson-vm10$i" "$bin/watson" -d "$directory" //services/emitter "http://127.0.0.1:$port/emitter" 1
  i=$((i + 1))
done

for n in 0 1 2 3; do
  port=${BARKER_PORTS[$n]}
  version=${BARKER_VERSIONS[$n]}
  start "barker-$n" "$ex/emitter" --listen "127.0.0.1:$port" --name "barker-$version-$n"
  start "watson-barker-$n" "$bin/watson" -d "$directory" //services/barker "http://127.0.0.1:$port/barker" 1 --version "$version"
done

start sherlock "$bin/sherlock" -d "$directory" --listen "127.0.0.1:$SHERLOCK_PORT" --run-dir "$state/sherlock"
start transform "$ex/transform" --listen "127.0.0.1:$TRANSFORM_PORT" --upstream "http://127.0.0.1:$SHERLOCK_PORT/emitter"
start watson-transform "$bin/watson" -d "$directory" //services/transform "http://127.0.0.1:$TRANSFORM_PORT/transform" 1

# Wait until sherlock routes to all three emitters and the transform. In
# the background, waited for with `wait`: a Ctrl-C ends `wait` at once and
# runs the trap, whereas bash runs no trap after a foreground command that
# caught the signal itself (as dw does), and the script would go on.
ready() {
  for _ in $(seq 1 100); do
    if curl -fs "http://127.0.0.1:$SHERLOCK_PORT/transform/" >/dev/null 2>&1 &&
       [ "$("$bin/dw" -d "$directory" route list | grep -c '^emitter')" -eq 3 ] &&
       [ "$("$bin/dw" -d "$directory" route list | grep -c '^barker.*yes')" -eq 4 ]; then
      break
    fi
    sleep 0.1
  done
  "$bin/dw" -d "$directory" route list >"$state/routes.txt" 2>&1
}
ready &
pids+=($!)
wait $!

cat <<TXT

dstack is running on loopback:
  directory  http://$directory        (status page: curl http://$directory/)
  sherlock   http://127.0.0.1:$SHERLOCK_PORT  (HAProxy, config in $state/sherlock/haproxy.cfg)
  emitter    vm101..vm103 on ports ${EMITTER_PORTS[*]}, each with a watson (period 1 s)
  transform  port $TRANSFORM_PORT, consumes emitter through sherlock

$(cat "$state/routes.txt")

Try, in another terminal:
  curl http://localhost:$SHERLOCK_PORT/emitter/        # round robin: run it a few times
  curl http://localhost:$SHERLOCK_PORT/emitter/rest?x=1  # /emitter is replaced by the instance's path
  curl http://localhost:$SHERLOCK_PORT/transform/      # a pipeline: transform -> sherlock -> emitter
  $bin/dw -d $directory route list
  curl -X POST http://127.0.0.1:${EMITTER_PORTS[1]}/health/down   # vm102 fails its check: out in ~2 s
  curl -X POST http://127.0.0.1:${EMITTER_PORTS[1]}/health/up     # and back

The barker canary (routes in git: $state/routes/routes/barker.yaml, v1 90 / v2 10):
  for i in \$(seq 100); do curl -s http://localhost:$SHERLOCK_PORT/barker/; done | cut -d' ' -f2 | cut -d- -f2 | sort | uniq -c
Move it with dw, from the routes clone (PATH=\$PWD/$bin:\$PATH):
  cd $state/routes
  dw route set barker v1=50 v2=50     # edits routes/barker.yaml, comments kept
  dw plan                             # routes, traffic now -> after, haproxy.cfg diff
  dw apply                            # commit, push, wait for every sherlock
  dw rollback                         # git revert of that commit, pushed and applied
  dw status

Logs: $state/logs/. Ctrl-C stops everything.
TXT

wait
