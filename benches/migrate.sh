#!/usr/bin/env bash
# Migration of a disk-root guest after a known workload, against rsync of
# the same changed upper layer.
#
#   bash benches/migrate.sh    # WORK=/var/tmp/xenod-bench-migrate ROUNDS=1 LEVELS=ppmd SAVES=live
#
# LEVELS: the pre-copy codecs to compare (`migrate --level`: ppmd, the
# default, or zstd levels 1-16); each round runs the workload afresh and
# migrates once per level and save.
# SAVES: "save" (`--save`: the guest paused, then saved), "live" (`--live`,
# the default: the guest's memory saved while it runs) or both.
# XENOD: the binary to measure (default: this tree's target/release/xenod,
# built first), as the other end-to-end benchmarks take it, so two builds
# can be compared side by side.
#
# Daemons on loopback (separate processes and data dirs, one libvirt shared
# through domain prefixes): the source A, and for every move a fresh target
# holding only the template. The template: the fixture guest's busybox
# root plus /data/big (100 MiB random) and /data/f1..f150 (8 KiB random
# each) in a 1 GiB ext4 image, 256 MiB of guest memory. In the guest,
# /cgi-bin/work.cgi runs the workload and syncs:
#
#   a 200 MiB log written (varied lines, as a web server logs)
#   50 files edited in place (100 bytes each, conv=notrunc)
#   1 MiB appended to the 100 MiB file
#   100 files deleted
#
# Then `xenod migrate` A -> B. Reported: bytes on the wire per phase (chunk
# payload, compressed, as the target's fetch counted it), the guest's
# downtime (save on A to answering restore on B), total time, and
# `rsync -aS -z --compress-choice=zstd` of A's changed upper directory to an
# empty rsync daemon module on loopback (Total bytes sent).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/xenod-bench-migrate}
ROUNDS=${ROUNDS:-1}
LEVELS=${LEVELS:-ppmd}
SAVES=${SAVES:-live}
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
log() { echo "migrate-bench: $*" >&2; }

command -v rsync >/dev/null || bash "$ROOT/scripts/install-deps.sh"
if [ -n "${XENOD:-}" ]; then
  X=$XENOD
else
  (cd "$ROOT" && cargo build --release --locked -p xenod >&2)
  X=$ROOT/target/release/xenod
fi
bash "$ROOT/scripts/start-libvirtd.sh" >&2
bash "$ROOT/fixtures/build-guest.sh" "$FIX" >&2

pids=()
cleanup() {
    for d in "$WORK"/a "$WORK"/b*; do
        [ -d "$d" ] && "$X" --data-dir "$d" destroy bench >/dev/null 2>&1 || true
    done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK"

# --- the template ------------------------------------------------------
stage=$WORK/stage
mkdir -p "$stage" "$WORK/tree/boot" "$WORK/tree/disk"
cp -a "$FIX/template/." "$stage/"
cp -a "$FIX/web/." "$stage/"
mkdir -p "$stage/data"
head -c $((100 << 20)) /dev/urandom > "$stage/data/big"
for i in $(seq 1 150); do head -c 8192 /dev/urandom > "$stage/data/f$i"; done
cat > "$stage/srv/www/cgi-bin/work.cgi" <<'EOF'
#!/bin/sh
# The migration benchmark's workload (benches/migrate.sh).
awk 'BEGIN { srand(7); n = 0
  while (n < 209715200) {
    l = sprintf("2026-11-22T07:%02d:%02d.%03d web[%d]: GET /shop/item/%d?ref=%x 200 %d bytes %.1f ms\n",
                int(n / 3e6) % 60, int(n / 5e4) % 60, n % 1000, 4000 + int(rand() * 64),
                int(rand() * 100000), int(rand() * 16777216), int(rand() * 90000), rand() * 40)
    printf "%s", l; n += length(l) } }' > /var/log/web-big.log
i=1; while [ $i -le 50 ]; do
  printf 'edited in place %03d\n' $i | dd of=/data/f$i bs=1 seek=100 conv=notrunc 2>/dev/null
  i=$((i + 1))
done
head -c 1048576 /dev/urandom >> /data/big
i=51; while [ $i -le 150 ]; do rm -f /data/f$i; i=$((i + 1)); done
sync
printf 'Content-Type: text/plain\r\n\r\nworkload done\n'
EOF
chmod 755 "$stage/srv/www/cgi-bin/work.cgi"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$WORK/tree/boot/"
mkfs.ext4 -q -F -d "$stage" -L root "$WORK/tree/disk/root.img" 1024M
cat > "$WORK/spec.json" <<'EOF'
{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img",
 "memory_mib":256,"ports":["0:80"]}
EOF

# --- hosts: A, and a fresh target B for every move ------------------------
host() {
    mkdir -p "$WORK/$1"
    printf 'domain_prefix = "bench%s-"\n' "$1" > "$WORK/$1/config.toml"
}
serve() {
    "$X" --data-dir "$WORK/$1" --json serve --listen 127.0.0.1:0 > "$WORK/$1.serve" 2> "$WORK/$1.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -s "$WORK/$1.serve" ] && break; sleep 0.1; done
}
host a
ID=$("$X" --data-dir "$WORK/a" --json publish "$WORK/tree" --name template://bench/disk/1 --spec "$WORK/spec.json" | jq -r .id)
serve a
NA=$(jq -r .node "$WORK/a.serve"); AA=$(jq -r .addr "$WORK/a.serve")
# Starts target $1: it holds the template (as a host that ran it before
# would) and nothing of an earlier move. Sets B and AB.
target() {
    B=$WORK/$1
    host "$1"
    serve "$1"
    local nb
    nb=$(jq -r .node "$B.serve"); AB=$(jq -r .addr "$B.serve")
    "$X" --data-dir "$WORK/a" allow "$nb" >/dev/null
    "$X" --data-dir "$B" allow "$NA" >/dev/null
    "$X" --data-dir "$B" fetch "$ID" --from "$AA" >/dev/null
}

# --- rsync daemon on loopback --------------------------------------------
RPORT=18730
cat > "$WORK/rsyncd.conf" <<EOF
port = $RPORT
use chroot = no
pid file = $WORK/rsyncd.pid
[dst]
path = $WORK/rsync-dst
read only = no
uid = root
gid = root
EOF
rsync --daemon --config="$WORK/rsyncd.conf" --no-detach &
pids+=($!)

printf '%-6s %5s %5s %12s %12s %12s %12s %10s %10s %12s\n' round level save prepare pre-copy stop+copy total \
    downtime "total s" "rsync upper"
for r in $(seq "$ROUNDS"); do
for level in $LEVELS; do
for save in $SAVES; do
    "$X" --data-dir "$WORK/a" --json deploy template://bench/disk/1 --name bench > "$WORK/deploy.json"
    port=$(jq -r '.instances[0].port' "$WORK/deploy.json")
    t0=$(date +%s.%N)
    curl -sf --max-time 1200 "http://127.0.0.1:$port/cgi-bin/work.cgi" >/dev/null
    log "round $r: workload took $(echo "$(date +%s.%N) - $t0" | bc) s"
    rm -rf "$WORK/rsync-dst"; mkdir -p "$WORK/rsync-dst"
    rs=$(rsync -aS -z --compress-choice=zstd --stats "$WORK/a/instances/bench/upper/" "rsync://127.0.0.1:$RPORT/dst/" \
        | awk '/^Total bytes sent/ { gsub(",", "", $4); print $4 }')
    target "b$r-$level-$save"
    j=$WORK/migrate-$r-$level-$save.json
    how=--save; [ "$save" = live ] && how=--live
    "$X" --data-dir "$WORK/a" --json migrate bench --to "$AB" --level "$level" "$how" > "$j"
    ph() { jq -r --arg p "$1" '.phases[] | select(.phase == $p) | (.wire_bytes // .fetch.wire_bytes // 0)' "$j"; }
    printf '%-6s %5s %5s %12s %12s %12s %12s %10.2f %10.2f %12s\n' "$r" "$level" "$save" "$(ph prepare)" "$(ph pre-copy)" \
        "$(ph stop-and-copy)" "$(jq -r .wire_bytes "$j")" "$(jq -r .downtime_seconds "$j")" \
        "$(jq -r .total_seconds "$j")" "$rs"
    jq -c '.phases[] | select(.phase == "stop-and-copy") | .upper' "$j" >&2
    port=$(jq -r .port "$j")
    curl -sf --max-time 10 "http://127.0.0.1:$port/" | grep counter >&2
    "$X" --data-dir "$B" destroy bench >/dev/null
done
done
done
log "bytes are chunk payload on the wire (compressed); the total includes the guest's saved state"
