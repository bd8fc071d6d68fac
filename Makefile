# dstack: two commands for a new user.
#   make demo   installs HAProxy if missing, builds, runs the walkthrough on loopback
#   make test   installs HAProxy if missing, runs every test (unit and end-to-end)

CARGO ?= cargo

.PHONY: all build demo test lint bench chaos deps clean packages install-test

all: build

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --release --bins --examples

demo: deps build
	@scripts/demo.sh

test: deps
	@scripts/test.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .demo

# Exits non-zero when a benchmark section fails or a tool's output cannot be read.
bench: deps
	@command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
	$(CARGO) bench --bench reconcile
	$(CARGO) bench --bench hitless
	$(CARGO) bench --bench fanout
	$(CARGO) bench --bench routing

# The chaos suite (issue 10): every fault under load through sherlock, one table.
# Root for the run dir's tmpfs (fault 14); `cargo bench --bench chaos -- 7 12` plays some.
chaos: deps
	$(CARGO) bench --bench chaos

# Debian and RPM packages of every role (release build): target/debian/*.deb,
# target/generate-rpm/*.rpm. Installs cargo-deb, cargo-generate-rpm and rpm if missing.
packages:
	@scripts/packages.sh

# As root: installs the .deb files, runs each unit's ExecStart with the
# packaged config files, serves a request through sherlock, then purges.
install-test: deps
	@scripts/install-test.sh
