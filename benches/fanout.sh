#!/usr/bin/env bash
# Fan-out benchmark: one template from one host to N hosts with
# `xenod replicate`, against the time of one transfer, in one run.
#
# Usage: benches/fanout.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), SIZE_MIB (template size,
#   default 1024), TARGETS (default 8), TMPDIR (where the work directory goes),
#   LINK_MBIT (unset: every daemon on loopback; N: one emulated host per
#   daemon with an N Mbit/s link, needs root), STEP_TIMEOUT (seconds one
#   fetch or replicate may take, default 600), KEEP=1 (keep the work
#   directory and its daemon logs, for debugging), XENOD_LOG (daemon log
#   filter, default error).
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
# fan-out against the chunks the targets stored, the share the targets got
# from each other, and the CPU (user + sys) all daemons spent per GiB
# delivered in each phase.
#
# Without LINK_MBIT every daemon shares this machine's loopback, cores and
# disk: the ratio measures the protocol plus this machine's CPU, not N hosts'
# network. With LINK_MBIT=N each daemon runs in its own network namespace
# (xnfo*), joined to one bridge by a veth pair whose two ends are both
# shaped to N Mbit/s, so every host has an N Mbit/s full-duplex link to a
# switch; the bytes A's link sent are reported per phase. The daemons still
# share the cores and the disk. Markdown to stdout; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
SIZE_MIB=${SIZE_MIB:-1024}
TARGETS=${TARGETS:-8}
LINK_MBIT=${LINK_MBIT:-}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
KEEP=${KEEP:-0}
export XENOD_LOG=${XENOD_LOG:-error}
. "$ROOT/benches/lib.sh"
bench_args "$@"

log() { echo "fanout-bench: $*" >&2; }
die() { log "$*"; exit 1; }

if [ -n "$LINK_MBIT" ]; then
  [[ $LINK_MBIT =~ ^[1-9][0-9]*$ ]] || die "LINK_MBIT must be a positive integer (Mbit/s)"
  [ "$(id -u)" -eq 0 ] || die "LINK_MBIT needs root (network namespaces, bridge, tc)"
  # Hosts are numbered into one /24 (A, S, then the targets from .11).
  [ "$TARGETS" -le 200 ] || die "LINK_MBIT supports at most 200 targets"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-fanout.XXXXXX")
PIDS=()
# Names of everything this run adds to the network: "xnfo" + this shell's
# pid in hex, so two runs (or a leftover of a killed one) never share a name
# and every interface name stays within the kernel's 15 characters.
NET=xnfo$(printf %x $$)
NETNS=()
BRIDGE=""
FWD_RULE=""

CLIENT=""

cleanup() {
  set +e
  [ -n "$CLIENT" ] && kill "$CLIENT" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # A daemon stops gracefully on SIGTERM; give them 10 s, then force it, so
  # a namespace is never left with a process in it.
  local i
  for i in $(seq 1 100); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  # Each veth pair is deleted by its bridge-side end (named as its
  # namespace): dropping the namespace alone would free the pair only when
  # the kernel gets round to it. The bridge goes last.
  for ns in "${NETNS[@]}"; do
    ip link del "$ns" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  [ -n "$FWD_RULE" ] && iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null
  [ -n "$BRIDGE" ] && ip link del "$BRIDGE" 2>/dev/null
  if [ "$KEEP" = 1 ]; then
    log "kept $WORK (daemon logs: $WORK/*.log)"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
# A signal ends the run through `exit`, so the EXIT trap runs once and the
# status says which signal it was.
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -x "$XENOD" ]; then
  log "building xenod (release)"
  cargo build --release -p xenod >&2
fi

# bounded CMD...: runs a client command for at most STEP_TIMEOUT seconds, in
# the background so that a signal ends the run at once (bash runs a trap
# only after a foreground command returns; `wait` it interrupts).
bounded() {
  timeout "$STEP_TIMEOUT" "$@" &
  CLIENT=$!
  wait "$CLIENT"
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }

# --- emulated hosts ------------------------------------------------------------
# host_ip HOST: the address of host a, s or tN on the bridge.
host_ip() {
  case $1 in
    a) echo 10.231.0.2 ;;
    s) echo 10.231.0.3 ;;
    t*) echo "10.231.0.$((10 + ${1#t}))" ;;
  esac
}

# shape DEV [NS]: limit DEV's egress to LINK_MBIT. tbf's burst is 5 ms at
# the rate (at least 64 KiB): smaller buckets cannot keep a link of
# 1 Gbit/s busy between timer wake-ups, and a GSO packet (up to 64 KiB)
# larger than the bucket would be split. The queue holds 20 ms, about what a
# switch port buffers; beyond that packets drop and QUIC's congestion
# control backs off, as on a real link.
shape() {
  local burst=$((LINK_MBIT * 625))
  [ "$burst" -ge 65536 ] || burst=65536
  ip ${2:+-n "$2"} link set "$1" up
  tc ${2:+-n "$2"} qdisc replace dev "$1" root tbf rate "${LINK_MBIT}mbit" burst "$burst" latency 20ms
}

# add_host HOST: a namespace with one veth to the bridge, shaped both ways
# (the end inside is the host's upload, the bridge's end its download).
add_host() {
  local ns=$NET$1
  netns_host "$ns" "$(host_ip "$1")"
  shape eth0 "$ns"
  shape "$ns"
}

# link_bytes HOST tx|rx: bytes the host's link has sent or received so far.
link_bytes() {
  ip netns exec "$NET$1" cat "/sys/class/net/eth0/statistics/${2}_bytes"
}

if [ -n "$LINK_MBIT" ]; then
  BRIDGE=${NET}b
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  # With bridge netfilter on, frames between the emulated hosts pass the
  # root namespace's iptables FORWARD chain: a DROP policy there would cut
  # the links. Accept this bridge's own traffic for the run (removed in the
  # trap); nothing else is touched.
  if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && command -v iptables >/dev/null; then
    iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT && FWD_RULE=1
  fi
  # The bridge has no address: the root namespace never speaks on it, so
  # its routes and a host's own use of 10.231.0.0/24 are untouched.
  HOSTS=(a s)
  for i in $(seq 1 "$TARGETS"); do HOSTS+=("t$i"); done
  for h in "${HOSTS[@]}"; do add_host "$h"; done
  log "emulated hosts: ${#HOSTS[@]} namespaces ${NET}*, bridge $BRIDGE, links ${LINK_MBIT} Mbit/s each way"
  tc -n "${NET}a" qdisc show dev eth0 >&2
fi

# serve DIR HOST: starts the daemon of host HOST (in its namespace with
# LINK_MBIT, else on loopback); sets DAEMON_NODE, DAEMON_ADDR and DAEMON_PID.
# Client commands reach it from here through DIR's Unix socket, which a
# network namespace does not hide.
serve() {
  local dir=$1 host=$2 fifo=$WORK/fifo.$$ line
  mkfifo "$fifo"
  if [ -n "$LINK_MBIT" ]; then
    # `ip netns exec` execs the command, so $! is the daemon itself.
    ip netns exec "$NET$host" "$XENOD" --data-dir "$dir" --json serve --listen "$(host_ip "$host"):0" \
      >"$fifo" 2>"$dir.log" &
  else
    "$XENOD" --data-dir "$dir" --json serve --listen 127.0.0.1:0 >"$fifo" 2>"$dir.log" &
  fi
  DAEMON_PID=$!
  PIDS+=("$DAEMON_PID")
  # The daemon prints one line when its socket accepts; EOF (it died) or
  # 60 s of silence fail the run.
  read -r -t 60 line <"$fifo" || die "daemon $host did not start; see $dir.log: $(tail -3 "$dir.log")"
  rm -f "$fifo"
  DAEMON_NODE=$(echo "$line" | json 'd["node"]')
  DAEMON_ADDR=$(echo "$line" | json 'd["addr"]')
  log "daemon $host: $DAEMON_ADDR (pid $DAEMON_PID)"
  if [ -n "$LINK_MBIT" ]; then
    # Its only address must be its namespace's: a loopback or root address
    # here would mean the bytes could bypass the shaped links.
    [[ $DAEMON_ADDR == *@$(host_ip "$host"):* && $DAEMON_ADDR != *,* ]] \
      || die "daemon $host announces $DAEMON_ADDR, not only $(host_ip "$host")"
  fi
}

# cpu_ticks PID...: user + sys clock ticks the processes have used so far
# (every thread; fields 14 and 15 of /proc/PID/stat, counted after the
# command name, which may hold spaces).
cpu_ticks() {
  local p sum=0 f
  for p in "$@"; do
    read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat")
    sum=$((sum + f[11] + f[12]))
  done
  echo "$sum"
}
HZ=$(getconf CLK_TCK)

# ticket_addrs TICKET: the providers' addresses the ticket carries (the
# ticket is base32 of postcard: layer [u8;32], name Option<String>,
# providers [{node [u8;32], addrs [SocketAddr]}]).
ticket_addrs() {
  python3 - "$1" <<'PY'
import base64, sys
t = sys.argv[1].strip()[len("xenod1"):].upper()
b = base64.b32decode(t + "=" * (-len(t) % 8))
i = 32
def varint():
    global i
    v = s = 0
    while True:
        x = b[i]; i += 1
        v |= (x & 0x7f) << s; s += 7
        if x < 0x80:
            return v
if b[i]:
    i += 1; n = varint(); i += n
else:
    i += 1
out = []
for _ in range(varint()):
    i += 32
    for _ in range(varint()):
        if varint() == 0:
            ip = ".".join(str(x) for x in b[i:i + 4]); i += 4
        else:
            ip = "[" + ":".join("%x" % int.from_bytes(b[i + k:i + k + 2], "big") for k in range(0, 16, 2)) + "]"; i += 16
        out.append("%s:%d" % (ip, varint()))
print(" ".join(out))
PY
}

BYTES=$((SIZE_MIB << 20))
GIB=$(echo "$SIZE_MIB / 1024" | bc -l)
log "making a ${SIZE_MIB} MiB template from /usr"
set +o pipefail
tar -C /usr -cf - lib share bin 2>/dev/null | head -c "$BYTES" >"$WORK/tpl.img"
set -o pipefail
[ "$(stat -c %s "$WORK/tpl.img")" -eq "$BYTES" ] || die "could not make $SIZE_MIB MiB from /usr"

log "publishing on A"
"$XENOD" --data-dir "$WORK/a" --json publish --image "$WORK/tpl.img" --name template://bench/tpl/1 >/dev/null
serve "$WORK/a" a
A_NODE=$DAEMON_NODE
A_PID=$DAEMON_PID
TICKET=$("$XENOD" --data-dir "$WORK/a" --json share template://bench/tpl/1 | json 'd["ticket"]')
TICKET_ADDRS=$(ticket_addrs "$TICKET")
log "ticket providers: $TICKET_ADDRS"
if [ -n "$LINK_MBIT" ]; then
  [[ $TICKET_ADDRS == "$(host_ip a)":* && $TICKET_ADDRS != *" "* ]] \
    || die "the ticket names $TICKET_ADDRS, not A's namespace address"
fi

# --- 1. one transfer ---------------------------------------------------------
serve "$WORK/s" s
S_PID=$DAEMON_PID
sync
log "one transfer: S fetches from A"
[ -z "$LINK_MBIT" ] || { atx0=$(link_bytes a tx); srx0=$(link_bytes s rx); }
c0=$(cpu_ticks "$A_PID" "$S_PID")
t0=$(now)
bounded "$XENOD" --data-dir "$WORK/s" --json fetch "$TICKET" >"$WORK/single.json" \
  || die "fetch failed or took over $STEP_TIMEOUT s; see $WORK/s.log and $WORK/a.log"
t1=$(now)
c1=$(cpu_ticks "$A_PID" "$S_PID")
ONE_SECS=$(echo "$t1 - $t0" | bc -l)
ONE_CPU=$(echo "($c1 - $c0) / $HZ" | bc -l)
ONE_CPU_GIB=$(echo "$ONE_CPU / $GIB" | bc -l)
log "one transfer: $(printf %.2f "$ONE_SECS") s, daemons' CPU $(printf %.1f "$ONE_CPU") s"
ONE_A_TX=null ONE_S_RX=null
if [ -n "$LINK_MBIT" ]; then
  ONE_A_TX=$(($(link_bytes a tx) - atx0))
  ONE_S_RX=$(($(link_bytes s rx) - srx0))
  # The template compresses to no less than a twentieth on the wire; less
  # than that through A's veth means the bytes went another way.
  [ "$ONE_A_TX" -ge $((BYTES / 20)) ] || die "A's link sent only $ONE_A_TX bytes for the transfer"
  log "one transfer: A's link sent $ONE_A_TX bytes ($(echo "$ONE_A_TX * 8 / $ONE_SECS / 1000000" | bc) Mbit/s), S's link received $ONE_S_RX"
fi
"$XENOD" --data-dir "$WORK/s" shutdown >/dev/null
# Once S has exited its pid may be reused: the trap must not signal it then.
for i in $(seq 1 100); do kill -0 "$S_PID" 2>/dev/null || break; sleep 0.1; done
if ! kill -0 "$S_PID" 2>/dev/null; then
  KEEP_PIDS=()
  for p in "${PIDS[@]}"; do [ "$p" = "$S_PID" ] || KEEP_PIDS+=("$p"); done
  PIDS=("${KEEP_PIDS[@]}")
fi

# --- 2. fan-out ----------------------------------------------------------------
TO=()
T_PIDS=()
for i in $(seq 1 "$TARGETS"); do
  mkdir -p "$WORK/t$i"
  printf 'pull_from = ["%s"]\n' "$A_NODE" >"$WORK/t$i/config.toml"
  serve "$WORK/t$i" "t$i"
  T_PIDS+=("$DAEMON_PID")
  TO+=(--to "$DAEMON_ADDR")
done
SERVED0=$("$XENOD" --data-dir "$WORK/a" --json status | json 'd["counters"]["chunks_served"]')
sync
log "fan-out: A replicates to $TARGETS targets"
if [ -n "$LINK_MBIT" ]; then
  atx0=$(link_bytes a tx)
  trx0=0
  for i in $(seq 1 "$TARGETS"); do trx0=$((trx0 + $(link_bytes "t$i" rx))); done
fi
c0=$(cpu_ticks "$A_PID" "${T_PIDS[@]}")
t0=$(now)
bounded "$XENOD" --data-dir "$WORK/a" --json replicate template://bench/tpl/1 "${TO[@]}" \
  >"$WORK/fanout.json" || die "replicate failed or took over $STEP_TIMEOUT s; see $WORK/*.log"
t1=$(now)
c1=$(cpu_ticks "$A_PID" "${T_PIDS[@]}")
FAN_SECS=$(echo "$t1 - $t0" | bc -l)
FAN_CPU=$(echo "($c1 - $c0) / $HZ" | bc -l)
FAN_CPU_GIB=$(echo "$FAN_CPU / ($GIB * $TARGETS)" | bc -l)
FAN_A_TX=null FAN_T_RX=null
if [ -n "$LINK_MBIT" ]; then
  FAN_A_TX=$(($(link_bytes a tx) - atx0))
  FAN_T_RX=-$trx0
  for i in $(seq 1 "$TARGETS"); do FAN_T_RX=$((FAN_T_RX + $(link_bytes "t$i" rx))); done
fi
SERVED1=$("$XENOD" --data-dir "$WORK/a" --json status | json 'd["counters"]["chunks_served"]')
A_SERVED=$((SERVED1 - SERVED0))
read -r STORED FROM_PEERS < <(A="$A_NODE" python3 -c '
import json, os, sys
d = json.load(open(sys.argv[1]))
stored = sum(t["report"]["chunks_fetched"] for t in d["targets"])
peers = sum(p["chunks"] for t in d["targets"] for p in t["report"]["providers"] if p["node"] != os.environ["A"])
print(stored, peers)' "$WORK/fanout.json")
RATIO=$(echo "$FAN_SECS / $ONE_SECS" | bc -l)
log "fan-out: $(printf %.2f "$FAN_SECS") s ($(printf %.2f "$RATIO") x one transfer); A served $A_SERVED of $STORED chunks stored, $FROM_PEERS came from other targets; daemons' CPU $(printf %.1f "$FAN_CPU") s"
[ -z "$LINK_MBIT" ] || log "fan-out: A's link sent $FAN_A_TX bytes ($(echo "$FAN_A_TX / $ONE_A_TX" | bc -l | xargs printf %.2f) x one transfer's), the targets' links received $FAN_T_RX"

gb() { echo "$1 / 1000000000" | bc -l | xargs printf %.2f; }
echo "| measure | value |"
echo "|---|---:|"
echo "| template | $SIZE_MIB MiB |"
echo "| links | $([ -n "$LINK_MBIT" ] && echo "$LINK_MBIT Mbit/s per host, each way" || echo "loopback, unshaped") |"
echo "| one transfer (A -> S) | $(printf %.2f "$ONE_SECS") s |"
echo "| fan-out to $TARGETS (replicate) | $(printf %.2f "$FAN_SECS") s |"
echo "| ratio (goal <= 2) | $(printf %.2f "$RATIO") |"
echo "| chunks stored by the targets | $STORED |"
echo "| chunks A served | $A_SERVED |"
echo "| chunks the targets got from each other | $FROM_PEERS |"
echo "| daemons' CPU per GiB delivered, one transfer | $(printf %.2f "$ONE_CPU_GIB") s |"
echo "| daemons' CPU per GiB delivered, fan-out | $(printf %.2f "$FAN_CPU_GIB") s |"
if [ -n "$LINK_MBIT" ]; then
  echo "| A's link sent, one transfer | $(gb "$ONE_A_TX") GB |"
  echo "| A's link sent, fan-out | $(gb "$FAN_A_TX") GB ($(echo "$FAN_A_TX / $ONE_A_TX" | bc -l | xargs printf %.2f) x one transfer) |"
  echo "| the targets' links received, fan-out | $(gb "$FAN_T_RX") GB |"
fi

if [ -n "$OUT" ]; then
  # bc prints ".5" for 0.5, which JSON does not accept.
  for v in ONE_SECS FAN_SECS RATIO ONE_CPU FAN_CPU ONE_CPU_GIB FAN_CPU_GIB; do
    printf -v "$v" %.4f "${!v}"
  done
  cat >"$OUT" <<JSON
{"size_mib": $SIZE_MIB, "targets": $TARGETS, "link_mbit": ${LINK_MBIT:-null},
 "one_secs": $ONE_SECS, "fanout_secs": $FAN_SECS, "ratio": $RATIO,
 "chunks_stored": $STORED, "a_served": $A_SERVED, "from_peers": $FROM_PEERS,
 "one_cpu_secs": $ONE_CPU, "fanout_cpu_secs": $FAN_CPU,
 "one_cpu_secs_per_gib": $ONE_CPU_GIB, "fanout_cpu_secs_per_gib": $FAN_CPU_GIB,
 "one_a_link_tx_bytes": $ONE_A_TX, "one_s_link_rx_bytes": $ONE_S_RX,
 "fanout_a_link_tx_bytes": $FAN_A_TX, "fanout_targets_link_rx_bytes": $FAN_T_RX}
JSON
fi
