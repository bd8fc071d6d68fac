#!/usr/bin/env bash
# Builds the packages of every role from this checkout, release build:
#   target/debian/dstack-{directory,watson,sherlock,dw}_VERSION-1_ARCH.deb   (cargo-deb)
#   target/generate-rpm/dstack-{directory,watson,sherlock,dw}-VERSION-1.ARCH.rpm (cargo-generate-rpm)
# Man pages and completions come from examples/gen-docs.rs (the clap
# definitions) into target/dist; what each package holds is in Cargo.toml's
# [package.metadata.deb.variants.*] and [package.metadata.generate-rpm.variants.*].
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-packaging-deps.sh
cargo build --release --locked --bins --example gen-docs

rm -rf target/dist
mkdir -p target/dist/bin
target/release/examples/gen-docs target/dist >/dev/null
gzip -9n target/dist/man/*.1
# cargo-deb strips its own copies; cargo-generate-rpm packs files as they are.
for bin in directory watson sherlock dw; do
    strip -s -o "target/dist/bin/$bin" "target/release/$bin"
done

rm -f target/debian/dstack-*.deb target/generate-rpm/dstack-*.rpm
for role in directory watson sherlock dw; do
    cargo deb --quiet --no-build --strip --variant "$role" >/dev/null
    cargo generate-rpm --variant "$role"
done
ls -1 target/debian/dstack-*.deb target/generate-rpm/dstack-*.rpm
