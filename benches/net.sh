#!/usr/bin/env bash
# Environments' networks against host port forwards, side by side in one
# run: two fixture guests on one environment, each on its own daemon (two
# daemons on this machine, each with its own loopback underlay address and
# VXLAN port, as the tests run them), then the time until a migrated guest
# answers its peer again.
#
# Usage: benches/net.sh   (needs root, /dev/fuse, QEMU, libvirt)
#
# Environment: XENOD (default target/release/xenod), MIB (bytes pulled per
#   throughput round, default 16), ROUNDS (default 3), N (requests per
#   latency round, default 20), KEEP=1 (keep the work directory and logs).
#
# What is measured, each ROUNDS times:
#   throughput  g1 (host A) pulls MIB MiB from g2 (host B) over the
#               environment (in-guest nc, timed in the guest); the same MiB
#               from g2 through its host port forward (curl on the host:
#               the only way port forwards reach a guest, as guests on
#               user-mode networking with restrict=on cannot reach the
#               host's forwards, nor each other, at all)
#   latency     ICMP round trip g1 -> g2 over the environment (ping, 20
#               pings 0.2 s apart, average); N sequential HTTP requests of
#               a small page of g2 (its net.cgi's usage line): by g1 over
#               the environment, and by the host through g2's forward
#   migration   g2 pings g1 every 0.1 s while g1 migrates A -> B and back:
#               the longest run of lost pings against the migration's
#               downtime (the guest stopped), and the time from the
#               command's return to g2's first page from g1
# Markdown to stdout; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
MIB=${MIB:-16}
ROUNDS=${ROUNDS:-3}
N=${N:-20}
KEEP=${KEEP:-0}
export XENOD_LOG=${XENOD_LOG:-error}

log() { echo "net-bench: $*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (devices, FUSE, libvirt)"
[ -x "$XENOD" ] || { log "building xenod (release)"; cargo build --release --locked -p xenod >&2; }
command -v jq >/dev/null || die "needs jq"
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX" >/dev/null
bash scripts/start-libvirtd.sh >/dev/null

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-netbench.XXXXXX")
TAG=$(printf %x $$)
U=127.$((100 + $$ % 100)).$(( ($$ / 100) % 250 ))
PORT0=$((43000 + ($$ % 5000) * 2))
PIDS=()

x() { local d=$1; shift; "$XENOD" --data-dir "$WORK/$d" "$@"; }

cleanup() {
  set +e
  for d in a b; do
    for n in $(x "$d" --json ps 2>/dev/null | jq -r '.instances[].name'); do x "$d" destroy "$n" >/dev/null 2>&1; done
  done
  for d in a b; do x "$d" net rm bench >/dev/null 2>&1; done
  for d in a b; do x "$d" shutdown >/dev/null 2>&1; done
  sleep 1
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Two daemons: A, and B joining through it.
start() { # NAME INDEX EXTRA-CONFIG
  mkdir -p "$WORK/$1"
  printf 'net_underlay = "%s.%d"\nnet_vxlan_port = %d\ndomain_prefix = "nb%s%s-"\n%s' \
    "$U" "$(( $2 + 1 ))" "$(( PORT0 + $2 ))" "$TAG" "$1" "$3" > "$WORK/$1/config.toml"
  XENOD_ANNOUNCE_MS=500 "$XENOD" --data-dir "$WORK/$1" --json serve --listen 127.0.0.1:0 \
    > "$WORK/$1.ready" 2> "$WORK/$1.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$WORK/$1.ready" ] && break; sleep 0.1; done
  [ -s "$WORK/$1.ready" ] || die "daemon $1 did not start: $(cat "$WORK/$1.log")"
}
start a 0 ""
A_ADDR=$(jq -r .addr "$WORK/a.ready"); A_NODE=$(jq -r .node "$WORK/a.ready")
start b 1 "peers = [\"$A_ADDR\"]"$'\n'
B_ADDR=$(jq -r .addr "$WORK/b.ready"); B_NODE=$(jq -r .node "$WORK/b.ready")
x a allow "$B_NODE" >/dev/null; x b allow "$A_NODE" >/dev/null

mkdir -p "$WORK/tree/boot" "$WORK/tree/disk"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$WORK/tree/boot/"
cp "$FIX/disk/root.img" "$WORK/tree/disk/"
echo '{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img","ports":["0:80"]}' \
  > "$WORK/spec.json"
for d in a b; do x "$d" publish "$WORK/tree" --name template://t/disk/1 --spec "$WORK/spec.json" >/dev/null 2>&1; done
x a net create bench >/dev/null
for _ in $(seq 100); do x b --json net ls | jq -e '.envs[] | select(.name == "bench")' >/dev/null && break; sleep 0.2; done

log "deploying g1 on A and g2 on B"
P1=$(x a --json deploy template://t/disk/1 --name "g1-$TAG" --net bench | jq -r '.instances[0].port')
P2=$(x b --json deploy template://t/disk/1 --name "g2-$TAG" --net bench | jq -r '.instances[0].port')
ip_of() { x a --json net ls | jq -r --arg n "$1" '.envs[] | select(.name == "bench") | .addresses[] | select(.instance == $n) | .ip'; }
IP1=$(ip_of "g1-$TAG"); IP2=$(ip_of "g2-$TAG")
[ -n "$IP1" ] && [ -n "$IP2" ] || die "no addresses: $(x a net ls)"
cgi() { curl -s --max-time "${3:-120}" "http://127.0.0.1:$1/cgi-bin/net.cgi?$2"; }
log "g1 $IP1 (port $P1), g2 $IP2 (port $P2)"
cgi "$P1" "get=http://$IP2/" | grep -q "instance=g2-$TAG" || die "g1 does not reach g2"

echo "## Environments against port forwards ($(date -u +%F), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg))"
echo
echo "Two fixture guests (QEMU TCG, 256 MiB, 1 vCPU) on two daemons of this machine; MTU 1450 on the environment."
echo
echo "| round | env: g1 <- g2, MiB/s | forward: host <- g2, MiB/s | env ping g1 -> g2, ms | env HTTP g1 -> g2, ms/request | forward HTTP host -> g2, ms/request |"
echo "|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  e=$(cgi "$P1" "pull=http://$IP2/cgi-bin/net.cgi?zero=$MIB" 300)
  eb=$(sed -n 's/.*bytes=\([0-9]*\).*/\1/p' <<<"$e"); ems=$(sed -n 's/.*ms=\([0-9]*\).*/\1/p' <<<"$e")
  env_tp=$(awk -v b="$eb" -v m="$ems" 'BEGIN { printf "%.1f", b / 1048576 / (m / 1000) }')
  f=$(curl -s -o /dev/null -w '%{size_download} %{time_total}' "http://127.0.0.1:$P2/cgi-bin/net.cgi?zero=$MIB")
  fwd_tp=$(awk -v b="${f% *}" -v s="${f#* }" 'BEGIN { printf "%.1f", b / 1048576 / s }')
  ping=$(cgi "$P1" "ping=$IP2" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
  p20=$(cgi "$P1" "pingrun=$IP2&n=20" 60 | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
  g=$(cgi "$P1" "getn=http://$IP2/cgi-bin/net.cgi&n=$N" 300)
  env_http=$(awk -v m="$(sed -n 's/.*ms=\([0-9]*\).*/\1/p' <<<"$g")" -v n="$N" 'BEGIN { printf "%.1f", m / n }')
  t0=$(date +%s%N)
  for _ in $(seq "$N"); do curl -s -o /dev/null "http://127.0.0.1:$P2/cgi-bin/net.cgi"; done
  fwd_http=$(awk -v t="$(( $(date +%s%N) - t0 ))" -v n="$N" 'BEGIN { printf "%.1f", t / 1e6 / n }')
  log "round $r: env $env_tp MiB/s, forward $fwd_tp MiB/s, ping ${p20:-$ping} ms, HTTP $env_http / $fwd_http ms"
  echo "| $r | $env_tp | $fwd_tp | ${p20:-$ping} | $env_http | $fwd_http |"
done
echo

echo "| migration | command, s | downtime, s | longest ping gap (0.1 s apart), s | gap - downtime, s | first page after the command, s |"
echo "|---|---|---|---|---|---|"
from=a; to_addr=$B_ADDR
for leg in "A -> B" "B -> A"; do
  cgi "$P2" "pingrun=$IP1&n=600" 150 > "$WORK/ping.out" &
  pinger=$!
  sleep 3
  t0=$(date +%s%N)
  m=$(x "$from" --json migrate "g1-$TAG" --to "$to_addr")
  took=$(awk -v t="$(( $(date +%s%N) - t0 ))" 'BEGIN { printf "%.2f", t / 1e9 }')
  t1=$(date +%s%N)
  until cgi "$P2" "get=http://$IP1/" 15 | grep -q "instance=g1-$TAG"; do sleep 0.05; done
  again=$(awk -v t="$(( $(date +%s%N) - t1 ))" 'BEGIN { printf "%.2f", t / 1e9 }')
  wait "$pinger" || true
  gap=$(grep -o 'seq=[0-9]*' "$WORK/ping.out" | cut -d= -f2 |
        awk 'NR > 1 && $1 - p - 1 > g { g = $1 - p - 1 } { p = $1 } END { printf "%.1f", g / 10 }')
  down=$(jq -r '.downtime_seconds' <<<"$m")
  log "$leg: $took s, downtime $down s, ping gap $gap s, page after $again s"
  printf '| %s | %s | %.2f | %s | %.2f | %s |\n' "$leg" "$took" "$down" "$gap" "$(awk -v g="$gap" -v d="$down" 'BEGIN { print g - d }')" "$again"
  if [ "$from" = a ]; then from=b; to_addr=$A_ADDR; else from=a; to_addr=$B_ADDR; fi
done
