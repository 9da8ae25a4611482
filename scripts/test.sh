#!/usr/bin/env bash
# Command 2 of the README: install what is missing, then run every check:
# formatting, clippy (warnings are errors) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# FUSE mounts, libvirt guests and packages need root: ask for it when not
# root (a root shell on a fresh machine has no sudo, and needs none).
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "test.sh: run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

bash scripts/install-deps.sh
# cowfs serves over FUSE's io_uring transport where the kernel has it.
bash scripts/enable-fuse-uring.sh
export CARGO_TERM_COLOR=never
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
# One clean build: incremental caches would only add to the disk it takes.
export CARGO_INCREMENTAL=0

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
echo "target dir: $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1), disk free: $(df -h --output=avail . | tail -1)"
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
