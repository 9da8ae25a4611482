#!/usr/bin/env bash
# Builds xenod's Debian package and prints its path on stdout:
#   bash scripts/build-deb.sh          # release build, then the .deb (minutes)
#   bash scripts/build-deb.sh --dev    # from the debug build as it is, fast
#                                      # (the packaging test; not for release)
# The completions and man pages are made by the binary being packaged
# (`xenod generate`), into TARGET/PROFILE/xenod-gen, which the assets in
# xenod/Cargo.toml name. Needs cargo-deb (scripts/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

# Release: the binary stripped, its line tables (for backtraces' file:line)
# in a separate xenod-dbgsym .ddeb beside the .deb.
profile=release dir=release opts=(--dbgsym) out=debian
if [ "${1:-}" = --dev ]; then
  profile=dev dir=debug opts=(--fast) out=debian/dev
fi
command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb is missing: bash scripts/install-deps.sh" >&2; exit 1; }

target=$(cargo metadata --format-version 1 --no-deps --locked | jq -r .target_directory)
if [ "$profile" = release ]; then
  cargo build --release --locked -p xenod >&2
fi
bin=$target/$dir/xenod
[ -x "$bin" ] || { echo "build-deb: no $bin; build it first (cargo build -p xenod)" >&2; exit 1; }

gen=$target/$dir/xenod-gen
rm -rf "$gen"
mkdir -p "$gen/man"
"$bin" generate completions bash >"$gen/xenod.bash"
"$bin" generate completions zsh >"$gen/_xenod"
"$bin" generate completions fish >"$gen/xenod.fish"
"$bin" generate man "$gen/man" >/dev/null
# Compressed as Debian policy asks (cargo-deb compresses only sources outside target/).
gzip -9n "$gen"/man/*.1

# cargo-deb warns that the dev profile is not for releases: that is the point of --dev.
cargo deb -p xenod --no-build --locked --profile "$profile" "${opts[@]}" --output "$target/$out/" | grep '\.deb$'
