#!/usr/bin/env bash
# Command 1 of the README: install what is missing, build xenod, build the
# fixture guest template from Debian packages, publish it as a named
# template, describe the web service as an overlay on it (with its deploy
# spec), deploy a guest from the overlay through libvirt and show its
# service answering.
set -euo pipefail
cd "$(dirname "$0")/.."
# Mounts, libvirt and packages need root: ask for it when not root (a root
# shell on a fresh machine has no sudo, and needs none).
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "demo.sh: run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

bash scripts/install-deps.sh
cargo build --release --locked -p xenod
XENOD=$PWD/target/release/xenod
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX"
bash scripts/start-libvirtd.sh
bash scripts/enable-fuse-uring.sh

DATA=${XENOD_DEMO_DATA:-/tmp/xenod-demo}
# A run with KEEP=1 left its guest running, with the guest's FUSE mount inside
# DATA: destroy it (which unmounts) before the data directory is cleared, and
# lazily unmount whatever a killed run left behind, so rm never walks into a
# live mount.
if [ -d "$DATA" ]; then
  "$XENOD" --data-dir "$DATA" destroy demo-web >/dev/null 2>&1 || true
  awk -v d="$DATA/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
fi
rm -rf "$DATA" && mkdir -p "$DATA"
x() { echo "+ xenod $*" >&2; "$XENOD" --data-dir "$DATA" "$@"; }

x key generate >/dev/null
echo "== publish the template (kernel, initrd, busybox root)"
TREE=$DATA/work/template
mkdir -p "$TREE" && cp -a "$FIX/template/." "$TREE/" && mkdir -p "$TREE/boot" && cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$TREE/boot/"
x publish "$TREE" --name template://xenod/busybox/1

echo "== the web service as an overlay: only what differs is stored"
WEB=$DATA/work/web
cp -a "$TREE" "$WEB" && cp -a "$FIX/web/." "$WEB/"
x overlay create --base template://xenod/busybox/1 "$WEB" --name template://demo/web/1 --spec fixtures/guest/web.spec.json

echo "== export the stack and compare it with the tree it came from"
x export template://demo/web/1 "$DATA/work/exported"
a=$(x digest "$WEB"); b=$(x digest "$DATA/work/exported")
echo "source tree digest   $a"
echo "exported tree digest $b"
[ "$a" = "$b" ] || { echo "MISMATCH" >&2; exit 1; }
echo "== what the store holds"
x ls
x verify
du -sh "$DATA/packs"

echo "== deploy the overlay: mount its stack with a private upper, boot, wait for the service"
trap '"$XENOD" --data-dir "$DATA" destroy demo-web >/dev/null 2>&1 || true' EXIT
x deploy template://demo/web/1 --name demo-web
PORT=$("$XENOD" --data-dir "$DATA" ps --json | jq -r '.instances[] | select(.name=="demo-web") | .ports[0]' | cut -d: -f1)
echo "== the guest's service, twice (its counter lives in the instance's upper layer)"
curl -sf "http://127.0.0.1:$PORT/"
curl -sf "http://127.0.0.1:$PORT/" | grep counter=
x ps
echo "(set KEEP=1 to leave the guest running)"
if [ "${KEEP:-0}" = 1 ]; then trap - EXIT; fi
