#!/usr/bin/env bash
# Lazy deploy with and without a recorded prefetch order, and a deploy of
# the same stack fetched in full first, side by side in one run: the time
# from `xenod deploy` to the fixture guest's service answering, on hosts
# behind an emulated link.
#
# Usage: benches/lazy-prefetch.sh   (needs root, /dev/fuse, QEMU, libvirt)
#
# Environment: XENOD (default target/release/xenod), NETDELAY (default
#   target/release/netdelay, built when missing), LINK_MBIT (each
#   emulated host's link, default 100), DELAY_MS (added to each packet on
#   each host's link, one way, default 20; 0 = none), NOISE_MIB (bytes in the template the
#   guest never reads, ahead of /boot in path order, default 64), ROUNDS
#   (default 2), LEVEL (zstd level the template is published at, default
#   the store's), KEEP=1 (keep the work directory and daemon logs).
#
# The stack: the fixture template with its kernel and initrd (a 66 MB
# uncompressed vmlinux), NOISE_MIB of noise at /a-unused.bin, and the web
# overlay. Hosts, each a network namespace with a LINK_MBIT link (tbf, both
# ways) to one bridge, as in fanout.sh:
#   a  publishes the stack; b fetches it from a (no order yet);
#   r  deploys it lazily from a: the first deploy records the order;
#      a then fetches the stack from r (it holds it all) and gets the order.
# Each round then deploys on three hosts: lazily on an empty one from b (no
# order), lazily on an empty one from a (the order), and on one that first
# fetched the whole stack from a (untimed), so that the deploy finds it
# local: the goal's yardstick. Each deploy runs alone on the machine. The
# guests run under this machine's QEMU (the daemons' peer traffic alone
# crosses the links); reported: time to answer, the reads that stalled or
# waited on the daemon, the chunks prefetched, the medians and the ratios
# to the local deploy.
#
# Each link has its rate (tbf, both ways) and its delay: this kernel has no
# netem (nor any other qdisc that delays), so every packet a host receives
# waits DELAY_MS in `netdelay` (benches/src/bin/netdelay.rs, an NFQUEUE
# client in the host's namespace fed by an iptables PREROUTING rule) before
# it goes on: DELAY_MS one way, twice that for a round trip. The delay is on
# the receiving side because a packet held on its sender's side still counts
# against its socket's send budget (TCP small queues, a UDP socket's send
# buffer), which would cap the link far below its rate.
# Markdown to stdout; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
LINK_MBIT=${LINK_MBIT:-100}
DELAY_MS=${DELAY_MS:-20}
NOISE_MIB=${NOISE_MIB:-64}
ROUNDS=${ROUNDS:-2}
KEEP=${KEEP:-0}
export XENOD_LOG=${XENOD_LOG:-error}

log() { echo "lazy-prefetch: $*" >&2; }
die() { log "$*"; exit 1; }
. "$ROOT/benches/lib.sh"
bench_args "$@"
[ -z "$OUT" ] || die "--out: this script reports in markdown only"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, FUSE, libvirt)"
[[ $LINK_MBIT =~ ^[1-9][0-9]*$ ]] || die "LINK_MBIT must be a positive integer (Mbit/s)"
[[ $DELAY_MS =~ ^[0-9]+$ ]] || die "DELAY_MS must be a whole number of milliseconds"
[ -x "$XENOD" ] || { log "building xenod (release)"; cargo build --release --locked -p xenod >&2; }
[ "$DELAY_MS" -gt 0 ] && netdelay_prepare
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX" >/dev/null
bash scripts/start-libvirtd.sh >/dev/null

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-lazypf.XXXXXX")
NET=xnpf$(printf %x $$)
BRIDGE=${NET}x
NETNS=()
PIDS=()
DELAYS=()
DATAS=()
FWD_RULE=""

cleanup() {
  set +e
  for d in "${DATAS[@]}"; do
    for n in $("$XENOD" --data-dir "$d" ps --json 2>/dev/null | jq -r '.instances[].name'); do
      "$XENOD" --data-dir "$d" destroy "$n" >/dev/null 2>&1
    done
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  for ns in "${NETNS[@]}"; do
    ip link del "$ns" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  [ -n "$FWD_RULE" ] && iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null
  ip link del "$BRIDGE" 2>/dev/null
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
now() { date +%s.%N; }
# The deploy's steps (JSON answer on stdin) as one line on stderr.
steps() { log "$1: $(json '" ".join("%s %.2f" % (s["step"], s["seconds"]) for s in d["instances"][0]["timeline"])')"; }

# --- emulated hosts (see fanout.sh) ---------------------------------------------
NEXT_IP=2
declare -A IP
shape() {
  local burst=$((LINK_MBIT * 625))
  [ "$burst" -ge 65536 ] || burst=65536
  ip ${2:+-n "$2"} link set "$1" up
  tc ${2:+-n "$2"} qdisc replace dev "$1" root tbf rate "${LINK_MBIT}mbit" burst "$burst" latency 20ms
}
add_host() {
  local ns=$NET$1
  IP[$1]=10.232.0.$NEXT_IP
  NEXT_IP=$((NEXT_IP + 1))
  netns_host "$ns" "${IP[$1]}"
  shape eth0 "$ns"
  shape "$ns"
  if [ "$DELAY_MS" -gt 0 ]; then netdelay_start "$ns" "$DELAY_MS"; fi
}
ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && command -v iptables >/dev/null; then
  iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT && FWD_RULE=1
fi

# serve HOST: a data directory and a daemon in HOST's namespace; sets ADDR.
serve() {
  local h=$1 dir=$WORK/$1 fifo=$WORK/fifo.$1 line
  add_host "$h"
  mkdir -p "$dir"
  DATAS+=("$dir")
  printf 'domain_prefix = "pfb-%s-"\n' "$h" >"$dir/config.toml"
  mkfifo "$fifo"
  ip netns exec "$NET$h" "$XENOD" --data-dir "$dir" --json serve --listen "${IP[$h]}:0" >"$fifo" 2>"$dir.log" &
  PIDS+=("$!")
  read -r -t 60 line <"$fifo" || die "daemon $h did not start; see $dir.log"
  rm -f "$fifo"
  ADDR=$(echo "$line" | json 'd["addr"]')
  log "daemon $h: $ADDR"
}
x() { local h=$1; shift; "$XENOD" --data-dir "$WORK/$h" "$@"; }
ticket() { x "$1" --json share "$2" | json 'd["ticket"]'; }

# --- the stack ---------------------------------------------------------------------
mkdir -p "$WORK/t/boot"
cp -a "$FIX/template/." "$WORK/t/"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$WORK/t/boot/"
# base64 of random bytes: NOISE_MIB of text, about 3/4 of it after zstd.
head -c $((NOISE_MIB * 3 << 18)) /dev/urandom | base64 -w 0 >"$WORK/t/a-unused.bin"
cp -a "$WORK/t" "$WORK/web" && cp -a "$FIX/web/." "$WORK/web/"
mkdir -p "$WORK/a"
x a publish "$WORK/t" --name template://bench/lazy/1 ${LEVEL:+--level "$LEVEL"} >/dev/null
TOP=$(x a overlay create --base template://bench/lazy/1 "$WORK/web" --spec fixtures/guest/web.spec.json)
log "stack $TOP"
serve a
serve b
x b --json fetch "$(ticket a "$TOP")" >/dev/null
serve r

# deploy_local HOST REF NAME: a deploy of a stack HOST holds; prints seconds.
deploy_local() {
  local t0 t1 j
  t0=$(now)
  j=$(x "$1" --json deploy "$2" --name "$3") || die "deploy on $1 failed; see $WORK/$1.log"
  t1=$(now)
  echo "$j" >"$WORK/$3.json"
  echo "$j" | steps "$3" || true
  printf '%.2f\n' "$(echo "$t1 - $t0" | bc -l)"
}

# waited HOST: seconds the reads of HOST's one mount spent waiting on the
# daemon (its stats socket: lazy_latency's sum).
waited() {
  python3 - "$WORK/$1/mounts/stats" <<'PY'
import glob, socket, sys
total = 0
for path in glob.glob(sys.argv[1] + "/*.sock"):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    buf = b""
    while (b := s.recv(65536)):
        buf += b
    for line in buf.decode().splitlines():
        if line.startswith("lazy_latency "):
            total += int(line.split()[1])
            # The waits by bucket (10 us .. 1 s, then longer), for the log.
            print("waits by latency bucket:", " ".join(line.split()[2:]), file=sys.stderr)
print("%.2f" % (total / 1e9))
PY
}

# deploy HOST TICKET NAME: a lazy deploy on HOST's fresh daemon; prints
# "seconds stalls waits waited": the reads that waited for a provider (the
# daemon's count), those that waited on the daemon at all (the mount's),
# and the seconds they waited in all.
deploy() {
  local t0 t1 j
  t0=$(now)
  j=$(x "$1" --json deploy "$2" --lazy --name "$3") || die "deploy on $1 failed; see $WORK/$1.log"
  t1=$(now)
  echo "$j" >"$WORK/$3.json"
  echo "$j" | steps "$3" || true
  printf '%.2f %s %s %s\n' "$(echo "$t1 - $t0" | bc -l)" "$(x "$1" --json status | json 'd["lazy"]["stalls"]')" \
    "$(echo "$j" | json 'd["instances"][0]["lazy"]["waits"]')" "$(waited "$1")"
}
wait_fetched() {
  for _ in $(seq 1 600); do
    [ "$(x "$1" --json status | json 'len(d.get("lazy_fetches") or {})')" = 0 ] && return
    sleep 0.5
  done
  die "host $1's background fetch did not end"
}

log "recording on r (from a)"
read -r REC_S REC_ST REC_W _ < <(deploy r "$(ticket a "$TOP")" rec)
x r destroy rec >/dev/null
ENTRIES=$(x r --json prefetch show "$TOP" | json 'd["entries"]')
BYTES=$(x r --json prefetch show "$TOP" | json 'd["bytes"]')
wait_fetched r
x a --json fetch "$(ticket r "$TOP")" | json 'd.get("order_from")' >/dev/null
[ "$(x a --json prefetch show "$TOP" | json 'd["entries"]')" = "$ENTRIES" ] || die "a did not get r's order"
log "order: $ENTRIES chunks, $BYTES bytes; first deploy ${REC_S}s, $REC_ST stalls"

echo "Lazy deploy to answer, empty host, ${LINK_MBIT} Mbit/s link with ${DELAY_MS} ms each way, template + ${NOISE_MIB} MiB unread noise;"
echo "order: $ENTRIES chunks ($(echo "$BYTES / 1048576" | bc -l | xargs printf %.1f) MiB). Recording deploy (no order): ${REC_S} s, $REC_ST stalled reads."
echo
echo "| round | deploy | time to answer | reads stalled (provider) | reads waiting on the daemon | their wait (s) | chunks prefetched |"
echo "|---|---|---:|---:|---:|---:|---:|"
declare -A TIMES
for i in $(seq 1 "$ROUNDS"); do
  for kind in without with local; do
    h=no$i
    from=b
    [ "$kind" = with ] && { h=or$i; from=a; }
    [ "$kind" = local ] && h=lc$i
    serve "$h"
    if [ "$kind" = local ]; then
      x "$h" --json fetch "$(ticket a "$TOP")" >/dev/null
      S=$(deploy_local "$h" "$TOP" "pf$h")
      echo "| $i | after a full fetch | ${S} s | | | | |"
    else
      read -r S ST W WS < <(deploy "$h" "$(ticket $from "$TOP")" "pf$h")
      # The background fetch may still run: prefetched counts once it ends.
      wait_fetched "$h"
      PF=$(x "$h" --json status | json 'd["lazy"]["prefetched"]')
      echo "| $i | lazy, $kind order | ${S} s | $ST | $W | $WS | $PF |"
    fi
    TIMES[$kind]="${TIMES[$kind]:-} $S"
    x "$h" destroy "pf$h" >/dev/null
    x "$h" shutdown >/dev/null || true
  done
  delays_alive
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
MW=$(echo "${TIMES[without]}" | median)
MO=$(echo "${TIMES[with]}" | median)
ML=$(echo "${TIMES[local]}" | median)
echo
echo "Medians: lazy without order ${MW} s, lazy with order ${MO} s, after a full fetch ${ML} s;"
echo "with order / local = $(echo "$MO / $ML" | bc -l | xargs printf %.2f)x, without / local = $(echo "$MW / $ML" | bc -l | xargs printf %.2f)x (goal: with order <= 1.2x)."
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "Reads stalled: chunks the guest's mount asked for that its host's store lacked too (the daemon"
echo "fetched them from the provider at once); reads waiting on the daemon: all the mount asked for"
echo "(also those the background fetch had brought but not yet handed to the mount's view of the store)."
