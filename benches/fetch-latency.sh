#!/usr/bin/env bash
# Latency of a small fetch between two hosts behind a delayed link: where a
# fetch of a small tree spends its round trips, and what a fetch of a tree
# already held costs.
#
# Usage: benches/fetch-latency.sh   (needs root, iptables)
#
# Environment: XENOD (default target/release/xenod), NETDELAY (default
#   target/release/netdelay, built when missing), DELAY_MS (added to each
#   packet a host receives, default 25: a 50 ms round trip), KIB (random
#   bytes in the tree, default 300), ROUNDS (default 5).
#
# Hosts a and b, each a network namespace on one bridge (no rate limit), each
# delaying what it receives by DELAY_MS with netdelay (see lib.sh). a
# publishes a tree (KIB of random bytes in one file, and a small one) and
# shares it. Each round, b starts with an empty data directory and its
# daemon fetches the tree by ticket (fresh), then fetches it again (held:
# no chunk moves, but with no prefetch order held it asks a for one).
# Reported: the fetch's own clock (`elapsed_ms` of its report) per round
# and the medians, and the fresh fetch's phases from b's debug log
# (connected, roots, manifests, data: milliseconds since the fetch began).
# Markdown to stdout; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
DELAY_MS=${DELAY_MS:-25}
KIB=${KIB:-300}
ROUNDS=${ROUNDS:-5}

log() { echo "fetch-latency: $*" >&2; }
die() { log "$*"; exit 1; }
. "$ROOT/benches/lib.sh"
bench_args "$@"
[ -z "$OUT" ] || die "--out: this script reports in markdown only"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, iptables)"
[[ $DELAY_MS =~ ^[1-9][0-9]*$ ]] || die "DELAY_MS must be a positive whole number of milliseconds"
[[ $KIB =~ ^[1-9][0-9]*$ ]] || die "KIB must be a positive integer"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[ -x "$XENOD" ] || { log "building xenod (release)"; cargo build --release --locked -p xenod >&2; }
netdelay_prepare

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-fetchlat.XXXXXX")
NET=xflt$(printf %x $$)
BRIDGE=${NET}br
PIDS=()
DELAYS=()
NETNS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for ns in "${NETNS[@]}"; do
    ip link del "$ns" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  ip link del "$BRIDGE" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
for h in a b; do
  ns=$NET$h
  netns_host "$ns" "10.234.0.$([ $h = a ] && echo 1 || echo 2)"
  ip -n "$ns" link set eth0 up
  netdelay_start "$ns" "$DELAY_MS"
done

# start H DIR [LOG]: the daemon of DIR in H's namespace; its pid is LAST_PID.
start() {
  local h=$1 dir=$2 line ip
  ip=10.234.0.$([ "$h" = a ] && echo 1 || echo 2)
  rm -f "$WORK/fifo"
  mkfifo "$WORK/fifo"
  ip netns exec "$NET$h" env XENOD_LOG="${3:-error}" "$XENOD" --data-dir "$dir" --json serve \
    --listen "$ip:7000" >"$WORK/fifo" 2>>"$dir.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  read -r -t 60 line <"$WORK/fifo" || die "the daemon of $dir did not start; see $dir.log"
  rm -f "$WORK/fifo"
}

log "a publishes a tree of $KIB KiB"
mkdir -p "$WORK/tree/etc"
echo "fetch-latency" >"$WORK/tree/etc/hostname"
head -c $((KIB * 1024)) /dev/urandom >"$WORK/tree/blob"
"$XENOD" --data-dir "$WORK/a" --json publish "$WORK/tree" --name template://bench/small/1 >/dev/null 2>&1
start a "$WORK/a"
TICKET=$("$XENOD" --data-dir "$WORK/a" share template://bench/small/1 | tail -1)

FRESH="" HELD="" PHASES=()
for r in $(seq 1 "$ROUNDS"); do
  b=$WORK/b$r
  nowarm "$b"
  start b "$b" xenod_peer=debug
  pid=$LAST_PID
  ip netns exec "${NET}b" "$XENOD" --data-dir "$b" --json fetch "$TICKET" >"$b.fresh.json" 2>/dev/null
  ip netns exec "${NET}b" "$XENOD" --data-dir "$b" --json fetch "$TICKET" >"$b.held.json" 2>/dev/null
  f=$(json 'd["elapsed_ms"]' <"$b.fresh.json")
  h=$(json 'd["elapsed_ms"]' <"$b.held.json")
  FRESH+=" $f"
  HELD+=" $h"
  # The fresh fetch's phases: the first fetch's lines of the debug log.
  # (A build before these log lines has none: "-".)
  p=$({ grep -m4 -E ": (connected|roots of|Manifests,|Data,) .*ms=" "$b.log" || true; } |
    sed -E 's/.*ms=([0-9]+).*/\1/' | paste -sd/)
  PHASES+=("${p:--}")
  log "round $r: fresh $f ms (connected/roots/manifests/data at $p ms), held $h ms"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done

echo "Small fetch over a link with ${DELAY_MS} ms each way ($((2 * DELAY_MS)) ms round trip), $KIB KiB tree, $ROUNDS rounds; load $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "| fetch | median | per round (ms) |"
echo "|---|---:|---|"
echo "| fresh (empty host) | $(echo "$FRESH" | median) ms |$FRESH |"
echo "| held (same tree again) | $(echo "$HELD" | median) ms |$HELD |"
echo
echo "Fresh fetch, ms since it began at the end of each phase (connected/roots/manifests/data): ${PHASES[*]}"
