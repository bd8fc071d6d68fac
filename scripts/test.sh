#!/usr/bin/env bash
# Runs every unit and end-to-end test, then prints one closing line with the
# totals ("N passed, N failed"). --no-fail-fast: a failing test binary does
# not stop the others, so the totals count every test. Benchmarks and
# examples are built by `make lint` and `make build`, not run here.
set -uo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
