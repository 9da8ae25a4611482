#!/usr/bin/env bash
# Command 1 of the README: install what is missing, build xenod, build the
# fixture guest template from Debian packages, publish it as a named
# template, describe the web service as an overlay on it, export the stack
# and show what was stored.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --release --locked -p xenod
XENOD=$PWD/target/release/xenod
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX"

DATA=${XENOD_DEMO_DATA:-/tmp/xenod-demo}
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
x overlay create --base template://xenod/busybox/1 "$WEB" --name template://demo/web/1

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
