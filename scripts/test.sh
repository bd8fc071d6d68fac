#!/usr/bin/env bash
# Runs every unit and end-to-end test, then the walkthrough, resilience,
# dw, GitOps, hitless, directory, directory-fault, several-directory, regression,
# status-page and observability tests again with tokens and
# TLS on (DSTACK_TEST_SECURE=1: every Cluster serves TLS, has an auth file,
# and gives each program its own token and the CA; a test that starts a
# program by hand takes them from its Cluster), and prints one closing line
# with the totals of both passes ("N passed, N failed"). --no-fail-fast: a
# failing test binary does not stop the others, so the totals count every
# test. Benchmarks and examples are built by `make lint` and `make build`,
# not run here.
set -uo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "--- again with tokens and TLS on"
DSTACK_TEST_SECURE=1 cargo test --no-fail-fast --test walkthrough --test resilience --test dw --test dw_git \
    --test gitops --test hitless --test directory --test directory_faults --test multi_directory --test regressions \
    --test status_page --test observability "$@" 2>&1 | tee -a "$log"
secure=${PIPESTATUS[0]}
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
[ "$status" -eq 0 ] && exit "$secure"
exit "$status"
