#!/usr/bin/env bash
# Peer transfer benchmark: xenod daemons against iroh-blobs and rsync, side
# by side in one run on loopback.
#
# Usage: benches/p2p-throughput.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), PROBE (the iroh-blobs
#   probe, default target/release/iroh-blobs-probe; built
#   from benches/iroh-blobs-probe if missing, skipped if that fails),
#   SIZE_MIB (template size, default 1024), XENOD_FIXTURES (Debian trees of
#   fixtures/build-debian-trees.sh, default /var/cache/xenod-fixtures),
#   TMPDIR (where the work directory goes).
#
# 1. Throughput. The template is SIZE_MIB of real OS bytes (a tar stream of
#    /usr, cut to size) published on daemon A as a disk image (64 KiB
#    blocks). Daemon B, empty, fetches it by ticket; MB/s counts plaintext
#    bytes over the fetch's wall time (every chunk decoded, hashed and
#    written to B's packs, fsynced). Then the iroh-blobs probe moves the
#    same file as one raw blob between two processes, each with an
#    iroh-blobs file store (import on the sender is not timed).
# 2. Bytes on the wire for an overlay. Host C holds minbase (T1) and the
#    apache2 overlay (O1 diffed against T1); host D holds only T1 and fetches
#    the overlay by ticket: bytes = every UDP byte of the fetch's QUIC
#    connections (both directions). Against `rsync -aHAX -z
#    --compress-choice=zstd` of O1 onto a copy of T1 through a pipe "remote
#    shell" (so the delta algorithm and compression are used as over ssh):
#    bytes = total sent + received as rsync reports them. Twice on xenod's
#    side: the overlay made at the store's default level and made with
#    `--level 19` (either way C sends its blocks as it keeps them; the
#    publish time at 19 is reported too).
#
# Markdown to stdout; progress to stderr. Needs root for the Debian trees.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
PROBE=${PROBE:-$ROOT/target/release/iroh-blobs-probe}
SIZE_MIB=${SIZE_MIB:-1024}
FIXDIR=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/debian
. "$ROOT/benches/lib.sh"
bench_args "$@"

log() { echo "p2p-bench: $*" >&2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-p2p.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x "$XENOD" ]; then
  log "building xenod (release)"
  cargo build --release -p xenod >&2
fi
if [ ! -x "$PROBE" ]; then
  log "building the iroh-blobs probe (release)"
  cargo build --release --manifest-path benches/iroh-blobs-probe/Cargo.toml \
    --target-dir "$ROOT/target" >&2 || log "probe build failed; iroh-blobs row skipped"
fi


json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }

# --- 1. throughput ---------------------------------------------------------
BYTES=$((SIZE_MIB << 20))
log "making a ${SIZE_MIB} MiB template from /usr"
set +o pipefail
tar -C /usr -cf - lib share bin 2>/dev/null | head -c "$BYTES" >"$WORK/tpl.img"
set -o pipefail
[ "$(stat -c %s "$WORK/tpl.img")" -eq "$BYTES" ] || { log "could not make $SIZE_MIB MiB from /usr"; exit 1; }

log "publishing on A"
"$XENOD" --data-dir "$WORK/a" --json publish --image "$WORK/tpl.img" --name template://bench/tpl/1 >"$WORK/pub.json"
serve "$WORK/a"
TICKET=$("$XENOD" --data-dir "$WORK/a" share template://bench/tpl/1 | tail -1)
nowarm "$WORK/b"
serve "$WORK/b"
sync
log "B fetches from A"
t0=$(now)
"$XENOD" --data-dir "$WORK/b" --json fetch "$TICKET" >"$WORK/fetch.json"
t1=$(now)
X_SECS=$(echo "$t1 - $t0" | bc -l)
X_WIRE=$(json 'd["wire_bytes"]' <"$WORK/fetch.json")
X_UDP=$(json 'd["udp_bytes"]' <"$WORK/fetch.json")
X_MBS=$(echo "$BYTES / $X_SECS / 1000000" | bc -l)
log "xenod: $(printf %.2f "$X_SECS") s, $(printf %.0f "$X_MBS") MB/s, $X_WIRE payload bytes"

B_SECS="" B_MBS=""
if [ -x "$PROBE" ]; then
  log "iroh-blobs: one raw blob"
  mkfifo "$WORK/pfifo"
  "$PROBE" send "$WORK/tpl.img" "$WORK/blobs-a" >"$WORK/pfifo" 2>"$WORK/probe-send.log" &
  PIDS+=($!)
  read -r peer hash <"$WORK/pfifo"
  sync
  "$PROBE" receive "$peer" "$hash" "$WORK/blobs-b" >"$WORK/probe.json" 2>"$WORK/probe-recv.log"
  B_SECS=$(json 'd["secs"]' <"$WORK/probe.json")
  B_MBS=$(echo "$BYTES / $B_SECS / 1000000" | bc -l)
  log "iroh-blobs: $(printf %.2f "$B_SECS") s, $(printf %.0f "$B_MBS") MB/s"
fi

# --- 2. overlay bytes on the wire --------------------------------------------
O_UDP="" O19_UDP="" O19_SECS="" R_BYTES=""
# Overlay on C-side store $1 made with extra args $2; D-side store $3
# fetches it. Sets O_LAST_UDP and O_LAST_PUB (seconds of overlay create).
overlay_fetch() {
  local c=$1 level=$2 d=$3
  "$XENOD" --data-dir "$c" --json publish "$FIXDIR/T1" --name template://bench/minbase/1 >/dev/null
  local t0 t1
  t0=$(now)
  # shellcheck disable=SC2086 # $level is empty or "--level N"
  "$XENOD" --data-dir "$c" --json overlay create --base template://bench/minbase/1 "$FIXDIR/O1" \
    --name template://bench/apache2/1 $level >/dev/null
  t1=$(now)
  O_LAST_PUB=$(echo "$t1 - $t0" | bc -l)
  "$XENOD" --data-dir "$d" --json publish "$FIXDIR/T1" --name template://bench/minbase/1 >/dev/null
  serve "$c"
  local ot
  ot=$("$XENOD" --data-dir "$c" share template://bench/apache2/1 | tail -1)
  "$XENOD" --data-dir "$d" --json fetch "$ot" >"$d.ofetch.json"
  O_LAST_UDP=$(json 'd["udp_bytes"]' <"$d.ofetch.json")
  log "xenod overlay ${level:-(default level)}: made in $(printf %.1f "$O_LAST_PUB") s;" \
    "$(json 'd["chunks_fetched"]' <"$d.ofetch.json") chunks, $(json 'd["wire_bytes"]' <"$d.ofetch.json")" \
    "payload bytes, $O_LAST_UDP UDP bytes"
}
if [ -d "$FIXDIR/T1" ] && [ -d "$FIXDIR/O1" ]; then
  log "overlay: C holds minbase + apache2, D holds minbase"
  overlay_fetch "$WORK/c" "" "$WORK/d"
  O_UDP=$O_LAST_UDP
  overlay_fetch "$WORK/c19" "--level 19" "$WORK/d19"
  O19_UDP=$O_LAST_UDP O19_SECS=$O_LAST_PUB

  cp -a "$FIXDIR/T1" "$WORK/rsync-dest"
  printf '#!/bin/sh\nshift\nexec "$@"\n' >"$WORK/pipe-rsh"
  chmod +x "$WORK/pipe-rsh"
  rsync -aHAX --numeric-ids -z --compress-choice=zstd --stats --rsh="$WORK/pipe-rsh" \
    "$FIXDIR/O1/" "localhost:$WORK/rsync-dest/" >"$WORK/rsync.txt"
  rs=$(awk -F': ' '/^Total bytes sent/ {gsub(",","",$2); print $2}' "$WORK/rsync.txt")
  rr=$(awk -F': ' '/^Total bytes received/ {gsub(",","",$2); print $2}' "$WORK/rsync.txt")
  R_BYTES=$((rs + rr))
  log "rsync: $R_BYTES bytes"
else
  log "no Debian trees in $FIXDIR (fixtures/build-debian-trees.sh); overlay rows skipped"
fi

mb() { [ -n "$1" ] && printf '%.1f' "$(echo "$1 / 1000000" | bc -l)" || echo "-"; }
f1() { [ -n "$1" ] && printf '%.1f' "$1" || echo "-"; }
echo "| measure | xenod | peer | xenod/peer |"
echo "|---|---:|---:|---:|"
ratio() { [ -n "$1" ] && [ -n "$2" ] && printf '%.2f' "$(echo "$1 / $2" | bc -l)" || echo "-"; }
echo "| ${SIZE_MIB} MiB template, daemon to daemon, MB/s (peer: iroh-blobs raw blob) | $(f1 "$X_MBS") | $(f1 "$B_MBS") | $(ratio "$X_MBS" "$B_MBS") |"
echo "| same, seconds | $(f1 "$X_SECS") | $(f1 "$B_SECS") | |"
echo "| same, MB on the wire (xenod: UDP; payload $(mb "$X_WIRE")) | $(mb "$X_UDP") | $(mb "$BYTES") | |"
echo "| apache2 overlay on minbase, MB on the wire (peer: rsync -z zstd) | $(mb "$O_UDP") | $(mb "$R_BYTES") | $(ratio "$O_UDP" "$R_BYTES") |"
echo "| same, overlay made with --level 19 (in $(f1 "$O19_SECS") s) | $(mb "$O19_UDP") | $(mb "$R_BYTES") | $(ratio "$O19_UDP" "$R_BYTES") |"

if [ -n "$OUT" ]; then
  cat >"$OUT" <<EOF
{"size_mib": $SIZE_MIB, "xenod_secs": $X_SECS, "xenod_mbs": $X_MBS, "xenod_payload_bytes": $X_WIRE,
 "xenod_udp_bytes": $X_UDP, "blobs_secs": ${B_SECS:-null}, "blobs_mbs": ${B_MBS:-null},
 "overlay_udp_bytes": ${O_UDP:-null}, "overlay_level19_udp_bytes": ${O19_UDP:-null},
 "overlay_level19_create_secs": ${O19_SECS:-null}, "rsync_bytes": ${R_BYTES:-null}}
EOF
fi
