#!/usr/bin/env bash
# The dstack walkthrough on one host, on loopback: a directory, three emitter
# instances with their watsons, a transform that consumes emitter, and a
# sherlock in front of it all. Ctrl-C stops every process it started.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release
ex=target/release/examples
state=.demo
DIRECTORY_PORT=${DIRECTORY_PORT:-7575}
SHERLOCK_PORT=${SHERLOCK_PORT:-8000}
ADMIN_PORT=${ADMIN_PORT:-8001}
EMITTER_PORTS=(9001 9002 9003)
TRANSFORM_PORT=9100

for port in "$DIRECTORY_PORT" "$SHERLOCK_PORT" "${EMITTER_PORTS[@]}" "$TRANSFORM_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; stop what holds it (another demo?) and retry" >&2
    exit 1
  fi
done

rm -rf "$state" && mkdir -p "$state/logs"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping the demo..."
  # watsons first, so they deregister; then the rest.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs are in $state/logs/"
}
trap cleanup INT TERM EXIT

start() { # name, command...
  local name=$1; shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  pids+=($!)
}

directory="127.0.0.1:$DIRECTORY_PORT"
start directory "$bin/directory" -n services -a "//127.0.0.1/directory" --listen "$directory" --state-dir "$state/directory"
sleep 0.3

i=1
for port in "${EMITTER_PORTS[@]}"; do
  start "emitter-vm10$i" "$ex/emitter" --listen "127.0.0.1:$port" --name "vm10$i"
  start "watson-vm10$i" "$bin/watson" -d "$directory" //services/emitter "http://127.0.0.1:$port/emitter" 1
  i=$((i + 1))
done

start sherlock "$bin/sherlock" -d "$directory" --listen "127.0.0.1:$SHERLOCK_PORT" --run-dir "$state/sherlock"
start transform "$ex/transform" --listen "127.0.0.1:$TRANSFORM_PORT" --upstream "http://127.0.0.1:$SHERLOCK_PORT/emitter"
start watson-transform "$bin/watson" -d "$directory" //services/transform "http://127.0.0.1:$TRANSFORM_PORT/transform" 1

# Wait until sherlock routes to all three emitters and the transform.
for _ in $(seq 1 100); do
  if curl -fs "http://127.0.0.1:$SHERLOCK_PORT/transform/" >/dev/null 2>&1 &&
     [ "$("$bin/dw" -d "$directory" route list | grep -c '^emitter')" -eq 3 ]; then
    break
  fi
  sleep 0.1
done

cat <<TXT

dstack is running on loopback:
  directory  http://$directory        (status page: curl http://$directory/)
  sherlock   http://127.0.0.1:$SHERLOCK_PORT  (HAProxy, config in $state/sherlock/haproxy.cfg)
  emitter    vm101..vm103 on ports ${EMITTER_PORTS[*]}, each with a watson (period 1 s)
  transform  port $TRANSFORM_PORT, consumes emitter through sherlock

$("$bin/dw" -d "$directory" route list)

Try, in another terminal:
  curl http://localhost:$SHERLOCK_PORT/emitter/        # round robin: run it a few times
  curl http://localhost:$SHERLOCK_PORT/emitter/rest?x=1  # /emitter is replaced by the instance's path
  curl http://localhost:$SHERLOCK_PORT/transform/      # a pipeline: transform -> sherlock -> emitter
  $bin/dw -d $directory route list
  curl -X POST http://127.0.0.1:${EMITTER_PORTS[1]}/health/down   # vm102 fails its check: out in ~2 s
  curl -X POST http://127.0.0.1:${EMITTER_PORTS[1]}/health/up     # and back

Logs: $state/logs/. Ctrl-C stops everything.
TXT

wait
