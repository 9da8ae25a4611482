#!/usr/bin/env bash
# Command 2 of the README: install what is missing, then run every check:
# formatting, clippy (warnings are errors) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
export CARGO_TERM_COLOR=never
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked -- --test-threads=2
