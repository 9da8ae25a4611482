#!/usr/bin/env bash
# Installs the system packages xenod builds, tests and benchmarks with, when
# they are missing. Idempotent; safe to run on every invocation.
set -euo pipefail

PKGS=(
  pkg-config libvirt-dev          # build: virt crate links libvirt
  fuse3 fuse-overlayfs            # cowfs tests and benchmarks
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
  qemu-system-x86 qemu-utils      # guests (TCG where KVM is unusable)
  busybox-static e2fsprogs cpio kmod   # fixture guest images
  zstd rsync debootstrap ostree casync openssl # benchmarks and their peers
  iproute2 curl jq libxml2-utils  # xmllint: virt-xml-validate needs it
  nftables                        # per-guest network byte counters (accounting)
  systemd                         # systemd-analyze verify: the packaged unit's test
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian package (scripts/build-deb.sh, xenod/tests/packaging.rs). Pinned:
# cargo-deb means to refuse, some day, the dev profile the test packages from.
CARGO_DEB=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB"; then
  echo "install-deps: installing cargo-deb $CARGO_DEB" >&2
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB"
fi
