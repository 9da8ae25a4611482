#!/usr/bin/env bash
# Fan-out benchmark: one template from one host to N hosts with
# `xenod replicate`, against the time of one transfer, in one run on loopback.
#
# Usage: benches/fanout.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), SIZE_MIB (template size,
#   default 1024), TARGETS (default 8), TMPDIR (where the work directory goes).
#
# The template is SIZE_MIB of real OS bytes (a tar stream of /usr, cut to
# size) published on daemon A as a disk image (64 KiB blocks), as in
# p2p-throughput.sh.
# 1. One transfer: daemon S, empty, fetches it from A by ticket.
# 2. Fan-out: TARGETS fresh daemons, each allowing A's node id to ask it to
#    pull (config `pull_from`); `xenod replicate` on A asks all at once, and
#    they fetch from A and from each other. Time = wall time of the replicate
#    command (until the last target has the whole stack, verified and
#    fsynced).
# Reported: both times, their ratio (goal <= 2), the chunks A served in the
# fan-out against the chunks the targets stored, and the share the targets
# got from each other.
#
# Every daemon runs on this one machine, so they share its cores and disk:
# the ratio here measures the protocol plus this machine's CPU, not N hosts'
# network. Markdown to stdout; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
SIZE_MIB=${SIZE_MIB:-1024}
TARGETS=${TARGETS:-8}
OUT=""
case ${1:-} in
  --out) OUT=$2 ;;
  --out=*) OUT=${1#--out=} ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

log() { echo "fanout-bench: $*" >&2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-fanout.XXXXXX")
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

# Starts a daemon on loopback; sets DAEMON_NODE and DAEMON_ADDR.
serve() {
  local dir=$1
  mkfifo "$WORK/fifo.$$"
  XENOD_LOG=error "$XENOD" --data-dir "$dir" --json serve --listen 127.0.0.1:0 >"$WORK/fifo.$$" 2>"$dir.log" &
  PIDS+=($!)
  read -r line <"$WORK/fifo.$$"
  rm -f "$WORK/fifo.$$"
  DAEMON_NODE=$(echo "$line" | json 'd["node"]')
  DAEMON_ADDR=$(echo "$line" | json 'd["addr"]')
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }

BYTES=$((SIZE_MIB << 20))
log "making a ${SIZE_MIB} MiB template from /usr"
set +o pipefail
tar -C /usr -cf - lib share bin 2>/dev/null | head -c "$BYTES" >"$WORK/tpl.img"
set -o pipefail
[ "$(stat -c %s "$WORK/tpl.img")" -eq "$BYTES" ] || { log "could not make $SIZE_MIB MiB from /usr"; exit 1; }

log "publishing on A"
"$XENOD" --data-dir "$WORK/a" --json publish --image "$WORK/tpl.img" --name template://bench/tpl/1 >/dev/null
serve "$WORK/a"
A_NODE=$DAEMON_NODE
TICKET=$("$XENOD" --data-dir "$WORK/a" share template://bench/tpl/1 | tail -1)

# --- 1. one transfer ---------------------------------------------------------
serve "$WORK/s"
sync
log "one transfer: S fetches from A"
t0=$(now)
"$XENOD" --data-dir "$WORK/s" --json fetch "$TICKET" >"$WORK/single.json"
t1=$(now)
ONE_SECS=$(echo "$t1 - $t0" | bc -l)
log "one transfer: $(printf %.2f "$ONE_SECS") s"
"$XENOD" --data-dir "$WORK/s" shutdown >/dev/null

# --- 2. fan-out ----------------------------------------------------------------
TO=()
for i in $(seq 1 "$TARGETS"); do
  mkdir -p "$WORK/t$i"
  printf 'pull_from = ["%s"]\n' "$A_NODE" >"$WORK/t$i/config.toml"
  serve "$WORK/t$i"
  TO+=(--to "$DAEMON_ADDR")
done
SERVED0=$("$XENOD" --data-dir "$WORK/a" --json status | json 'd["counters"]["chunks_served"]')
sync
log "fan-out: A replicates to $TARGETS targets"
t0=$(now)
"$XENOD" --data-dir "$WORK/a" --json replicate template://bench/tpl/1 "${TO[@]}" >"$WORK/fanout.json"
t1=$(now)
FAN_SECS=$(echo "$t1 - $t0" | bc -l)
SERVED1=$("$XENOD" --data-dir "$WORK/a" --json status | json 'd["counters"]["chunks_served"]')
A_SERVED=$((SERVED1 - SERVED0))
read -r STORED FROM_PEERS < <(A="$A_NODE" python3 -c '
import json, os, sys
d = json.load(open(sys.argv[1]))
stored = sum(t["report"]["chunks_fetched"] for t in d["targets"])
peers = sum(p["chunks"] for t in d["targets"] for p in t["report"]["providers"] if p["node"] != os.environ["A"])
print(stored, peers)' "$WORK/fanout.json")
RATIO=$(echo "$FAN_SECS / $ONE_SECS" | bc -l)
log "fan-out: $(printf %.2f "$FAN_SECS") s ($(printf %.2f "$RATIO") x one transfer); A served $A_SERVED of $STORED chunks stored, $FROM_PEERS came from other targets"

echo "| measure | value |"
echo "|---|---:|"
echo "| template | $SIZE_MIB MiB |"
echo "| one transfer (A -> S) | $(printf %.2f "$ONE_SECS") s |"
echo "| fan-out to $TARGETS (replicate) | $(printf %.2f "$FAN_SECS") s |"
echo "| ratio (goal <= 2) | $(printf %.2f "$RATIO") |"
echo "| chunks stored by the targets | $STORED |"
echo "| chunks A served | $A_SERVED |"
echo "| chunks the targets got from each other | $FROM_PEERS |"

if [ -n "$OUT" ]; then
  cat >"$OUT" <<JSON
{"size_mib": $SIZE_MIB, "targets": $TARGETS, "one_secs": $ONE_SECS, "fanout_secs": $FAN_SECS,
 "ratio": $RATIO, "chunks_stored": $STORED, "a_served": $A_SERVED, "from_peers": $FROM_PEERS}
JSON
fi
