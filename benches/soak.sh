#!/usr/bin/env bash
# Fault soak: HOSTS daemons, each a separate process in its own network
# namespace with its own shaped link, doing random work for SOAK_SECONDS
# while faults are injected; invariants are checked after every fault and
# at the end.
#
# Links: a rate per host (50-170 Mbit/s, both ways), random loss (0-0.6%,
# iptables' statistic match in the host's namespace) and a delay per host
# (5-33 ms), so round trips between two hosts take 20-66 ms. LINK_DELAY
# says how the delay is made:
#   netem     tc's netem on both ends of the host's link (with its rate);
#   netdelay  tc tbf for the rate, and every packet a host receives waits
#             twice its delay in netdelay (benches/src/bin/netdelay.rs, an
#             NFQUEUE reader fed by iptables; see lib.sh): the same round
#             trips as netem's;
#   none      tc tbf for the rate, no delay;
#   auto      (default) netem where the kernel has it (this machine's does
#             not: "Specified qdisc kind is unknown"), else netdelay where
#             iptables is, else none.
#
# Usage: benches/soak.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), LINK_DELAY (above),
#   NETDELAY (default target/release/netdelay, built when missing),
#   SOAK_SECONDS (default
#   1800), HOSTS (default 5, at most 20), FAULT_EVERY (seconds between
#   faults, default 20), SEED (default: the pid), KEEP=1 (keep the work
#   directory and daemon logs), FAULTS (the kinds to inject, default
#   "kill partition diskfull flip clock"; `clock` needs faketime, which the
#   script installs with apt-get when it can, else it is skipped and said).
#
# Work, one operation at a time, each on a random live host: publish a tree
# under a name (then replicate it to one other host, so every layer lives on
# two), fetch a name published elsewhere, mount a layer with an upper,
# write, commit the upper as a named overlay, gc, replicate.
# Faults, one every FAULT_EVERY seconds, each healed before the next:
#   kill      kill -9 of a daemon at a random point, restarted 2-6 s later
#   partition one host's link drops everything for 8 s
#   diskfull  the last host's data directory (a 384 MiB tmpfs) filled to
#             the last byte for 8 s while work goes on
#   flip      one byte flipped in a random pack of a random host
#   clock     a daemon restarted with its clock 2 hours ahead, for 10 s
# Invariants, after every fault (once healed) and at the end:
#   repair    on every host, `verify --repair` (peers: every other host)
#             and then `verify` is clean
#   complete  every layer published or committed (and replicated) exports,
#             from some host, to the tree it was made from (same digest)
#   mounts    no FUSE mount of this run is left once its operation ended
#   procs     (at the end) no process of this run is left after shutdown
# Reported (markdown to stdout, JSON with --out): operations by kind (done,
# failed: failures while a fault is active are expected and counted, not
# violations), faults by kind, invariant checks and every violation.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
XENOD=${XENOD:-$ROOT/target/release/xenod}
SOAK_SECONDS=${SOAK_SECONDS:-1800}
HOSTS=${HOSTS:-5}
FAULT_EVERY=${FAULT_EVERY:-20}
SEED=${SEED:-$$}
KEEP=${KEEP:-0}
FAULTS=${FAULTS:-kill partition diskfull flip clock}
LINK_DELAY=${LINK_DELAY:-auto}
export XENOD_LOG=${XENOD_LOG:-warn}
# Announce every second, so names and presence settle within a fault's gap.
export XENOD_ANNOUNCE_MS=${XENOD_ANNOUNCE_MS:-1000}
. "$ROOT/benches/lib.sh"
bench_args "$@"

log() { echo "soak: $*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, tc, tmpfs, FUSE)"
[[ $HOSTS =~ ^[0-9]+$ ]] && [ "$HOSTS" -ge 3 ] && [ "$HOSTS" -le 20 ] || die "HOSTS must be 3..20"
[[ $LINK_DELAY =~ ^(auto|netem|netdelay|none)$ ]] || die "LINK_DELAY must be auto, netem, netdelay or none"
command -v ip >/dev/null && command -v tc >/dev/null || die "needs ip and tc (iproute2)"
[ -x "$XENOD" ] || { log "building xenod (release)"; (cd "$ROOT" && cargo build --release -p xenod >&2); }
RANDOM=$SEED

# The clock fault preloads libfaketime into the daemon itself (not the
# `faketime` wrapper, which would stand between the daemon and its pid).
FAKETIME_LIB=""
if [[ " $FAULTS " == *" clock "* ]]; then
  find_lib() { find /usr/lib -name 'libfaketimeMT.so.1' 2>/dev/null | head -1; }
  FAKETIME_LIB=$(find_lib)
  if [ -z "$FAKETIME_LIB" ]; then
    apt-get install -y -qq faketime >/dev/null 2>&1 || true
    FAKETIME_LIB=$(find_lib)
  fi
  if [ -z "$FAKETIME_LIB" ]; then
    log "libfaketime is not installed and could not be: clock faults skipped"
    FAULTS=${FAULTS//clock/}
  fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-soak.XXXXXX")
NET=xnsk$(printf %x $$)
BRIDGE=${NET}b
NETNS=()
PIDS=()
DELAYS=()
FWD_RULE=""
TMPFS=""
declare -A PID NODE
START=$(date +%s)

cleanup() {
  set +e
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null; done
  sleep 1
  for h in "${!PID[@]}"; do kill -KILL "${PID[$h]}" 2>/dev/null; done
  pkill -KILL -f -- "--data-dir $WORK/" 2>/dev/null
  grep " $WORK/" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m"; done
  for p in "${DELAYS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for ns in "${NETNS[@]}"; do ip link del "$ns" 2>/dev/null; ip netns del "$ns" 2>/dev/null; done
  [ -n "$FWD_RULE" ] && iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null
  ip link del "$BRIDGE" 2>/dev/null
  [ -n "$TMPFS" ] && umount -l "$TMPFS" 2>/dev/null
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# json EXPR: EXPR of the JSON on stdin; fails quietly on no JSON (a
# command that failed printed its error on stderr, into ops.log).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null; }
ip_of() { echo "10.232.0.$((10 + $1))"; }
dir_of() { echo "$WORK/h$1"; }
x() { local h=$1; shift; timeout 90 "$XENOD" --data-dir "$(dir_of "$h")" "$@"; }
xn() { local h=$1; shift; timeout 90 ip netns exec "$NET$h" "$XENOD" --data-dir "$(dir_of "$h")" "$@"; }

# --- counters ------------------------------------------------------------------
declare -A OPS_OK OPS_FAIL FAULT_N
CHECKS=0
VIOLATIONS=()
FAULT_ACTIVE=""
op_done() { if [ "$2" = 0 ]; then OPS_OK[$1]=$((${OPS_OK[$1]:-0} + 1)); else OPS_FAIL[$1]=$((${OPS_FAIL[$1]:-0} + 1)); fi; }
violation() { log "VIOLATION: $*"; VIOLATIONS+=("$(date +%s) $*"); }

# --- emulated hosts --------------------------------------------------------------
ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && command -v iptables >/dev/null; then
  iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT && FWD_RULE=1
fi
IPT=0
command -v iptables >/dev/null && IPT=1
# The kernel's netem, tried on a scratch namespace.
if [ "$LINK_DELAY" = auto ] || [ "$LINK_DELAY" = netem ]; then
  ns=${NET}t
  ip netns add "$ns"; NETNS+=("$ns")
  if tc -n "$ns" qdisc replace dev lo root netem delay 1ms 2>/dev/null; then
    LINK_DELAY=netem
  elif [ "$LINK_DELAY" = netem ]; then
    die "LINK_DELAY=netem, but this kernel has no netem"
  elif [ $IPT = 1 ]; then
    LINK_DELAY=netdelay
  else
    LINK_DELAY=none
  fi
  ip netns del "$ns"
fi
[ "$LINK_DELAY" = netdelay ] && netdelay_prepare
NETEM=0
[ "$LINK_DELAY" = netem ] && NETEM=1
# link HOST [down]: the host's link, both ways: its own rate, loss (and
# delay, with netem; netdelay's is set once, when the host is made);
# `down` cuts it (a partition).
link() {
  local h=$1 ns=$NET$1 rate=$((50 + 40 * ($1 % 4))) loss=$(( ($1 % 3) * 3 ))
  local delay=$((5 + 7 * ($1 % 5)))
  if [ "${2:-}" = down ]; then ip -n "$ns" link set eth0 down; return; fi
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route replace 10.232.0.0/24 dev eth0 2>/dev/null || true
  if [ $NETEM = 1 ]; then
    tc -n "$ns" qdisc replace dev eth0 root netem delay "${delay}ms" rate "${rate}mbit" limit 2000
    tc qdisc replace dev "$ns" root netem delay "${delay}ms" rate "${rate}mbit" limit 2000
  else
    tc -n "$ns" qdisc replace dev eth0 root tbf rate "${rate}mbit" burst 128k latency 20ms
    tc qdisc replace dev "$ns" root tbf rate "${rate}mbit" burst 128k latency 20ms
  fi
  if [ $IPT = 1 ] && [ $loss -gt 0 ]; then
    ip netns exec "$ns" iptables -F OUTPUT
    ip netns exec "$ns" iptables -A OUTPUT -o eth0 -m statistic --mode random --probability "0.00$loss" -j DROP
  fi
}
for h in $(seq 1 "$HOSTS"); do
  ns=$NET$h
  netns_host "$ns" "$(ip_of "$h")"
  link "$h"
  if [ "$LINK_DELAY" = netdelay ]; then netdelay_start "$ns" $((2 * (5 + 7 * (h % 5)))); fi
  mkdir -p "$(dir_of "$h")"
done
# The last host's data lives on a small tmpfs: the disk that fills up.
mkdir -p "$WORK/lists"
TMPFS=$(dir_of "$HOSTS")
mount -t tmpfs -o size=384m soak "$TMPFS"
log "$HOSTS hosts in namespaces $NET*, seed $SEED, ${SOAK_SECONDS}s, faults: $FAULTS (link delay: $LINK_DELAY, loss by iptables: $IPT)"

# serve HOST [faketime offset]: starts (or restarts) the daemon of HOST on port 7000.
serve() {
  local h=$1 fifo=$WORK/fifo.$1 line
  rm -f "$fifo"; mkfifo "$fifo"
  if [ -n "${2:-}" ]; then
    ip netns exec "$NET$h" env LD_PRELOAD="$FAKETIME_LIB" FAKETIME="$2" "$XENOD" --data-dir "$(dir_of "$h")" \
      --json serve --listen "$(ip_of "$h"):7000" >"$fifo" 2>>"$WORK/h$h.log" &
  else
    ip netns exec "$NET$h" "$XENOD" --data-dir "$(dir_of "$h")" --json serve \
      --listen "$(ip_of "$h"):7000" >"$fifo" 2>>"$WORK/h$h.log" &
  fi
  PID[$h]=$!
  if ! read -r -t 60 line <"$fifo"; then
    rm -f "$fifo"; return 1
  fi
  rm -f "$fifo"
  NODE[$h]=$(echo "$line" | json 'd["node"]')
}
alive() { kill -0 "${PID[$1]:-0}" 2>/dev/null; }
stop() {
  kill -KILL "${PID[$1]}" 2>/dev/null || true
  wait "${PID[$1]}" 2>/dev/null || true
  # Whatever else serves this host's data (nothing should), so that a
  # restart never meets "a daemon already serves".
  pkill -KILL -f -- "--data-dir $(dir_of "$1") --json serve" 2>/dev/null || true
}

# Keys first (offline), then each host trusts every other for publisher soak.
for h in $(seq 1 "$HOSTS"); do x "$h" key generate >/dev/null; done
for h in $(seq 1 "$HOSTS"); do serve "$h" || die "host $h did not start: $(tail -3 "$WORK/h$h.log")"; stop "$h"; done
peers_of() { local h=$1 o s=""; for o in $(seq 1 "$HOSTS"); do [ "$o" = "$h" ] || s+="\"${NODE[$o]}@$(ip_of "$o"):7000\", "; done; echo "[${s%, }]"; }
for h in $(seq 1 "$HOSTS"); do
  printf 'peers = %s\npull_from = ["*"]\n' "$(peers_of "$h")" >"$(dir_of "$h")/config.toml"
  for o in $(seq 1 "$HOSTS"); do
    [ "$o" = "$h" ] || x "$h" key trust "$(x "$o" --json key show | json 'd["public_key"]')" --for soak >/dev/null
  done
done
for h in $(seq 1 "$HOSTS"); do serve "$h" || die "host $h did not restart"; done
log "daemons up: ${NODE[*]}"

# --- what was made, to check it later ----------------------------------------------
declare -A DIGEST   # layer id -> digest of the tree it was made from (its
                    # listing, `xenod digest --list`, in $WORK/lists/ID)
declare -A NAMEOF   # layer id -> name
N_LAYERS=0
pick_live() { local h tries=0; while :; do h=$((1 + RANDOM % HOSTS)); alive "$h" && { echo "$h"; return; }; tries=$((tries + 1)); [ $tries -lt 50 ] || return 1; done; }
pick_layer() { local ids=("${!DIGEST[@]}"); [ ${#ids[@]} -gt 0 ] || return 1; echo "${ids[$((RANDOM % ${#ids[@]}))]}"; }

make_tree() {
  local d=$1 i
  mkdir -p "$d/etc" "$d/usr/lib"
  echo "tree $N_LAYERS $RANDOM" >"$d/etc/hostname"
  for i in $(seq 1 $((2 + RANDOM % 6))); do
    # Some files repeat across trees (dedup), some are new.
    head -c $((4096 * (1 + RANDOM % 64))) "/proc/self/exe" >"$d/usr/lib/shared$((RANDOM % 8))" 2>/dev/null || true
    head -c $((1024 * (1 + RANDOM % 512))) /dev/urandom >"$d/usr/lib/f$i"
  done
  ln -sf ../etc/hostname "$d/usr/link"
}

op_publish() {
  local h t id name o
  h=$(pick_live) || return 1
  t=$WORK/tree$N_LAYERS; make_tree "$t"
  name=template://soak/t$N_LAYERS/1
  id=$(x "$h" --json publish "$t" --name "$name" 2>>"$WORK/ops.log" | json 'd["id"]') || return 1
  DIGEST[$id]=$("$XENOD" digest "$t"); NAMEOF[$id]=$name
  "$XENOD" digest --list "$t" >"$WORK/lists/$id"
  N_LAYERS=$((N_LAYERS + 1))
  rm -rf "$t"
  # A second copy elsewhere, so a damaged chunk can be repaired from a peer.
  o=$(( h % HOSTS + 1 ))
  x "$h" replicate "$name" --to "${NODE[$o]}@$(ip_of "$o"):7000" >>"$WORK/ops.log" 2>&1 || return 1
}

op_fetch() {
  local h id
  h=$(pick_live) || return 1; id=$(pick_layer) || return 0
  xn "$h" fetch "${NAMEOF[$id]}" >>"$WORK/ops.log" 2>&1
}

op_commit() {
  local h id mnt up rc=0 cid dg
  h=$(pick_live) || return 1; id=$(pick_layer) || return 0
  xn "$h" fetch "${NAMEOF[$id]}" >>"$WORK/ops.log" 2>&1 || return 1
  mnt=$WORK/mnt$N_LAYERS; up=$WORK/up$N_LAYERS; mkdir -p "$mnt" "$up"
  x "$h" mount "$id" "$mnt" --upper "$up" >>"$WORK/ops.log" 2>&1 || { rmdir "$mnt"; rm -rf "$up"; return 1; }
  { echo "changed $RANDOM" >>"$mnt/etc/hostname" &&
    head -c $((1024 * (1 + RANDOM % 256))) /dev/urandom >"$mnt/new$RANDOM" &&
    rm -f "$mnt/usr/link" && mkdir -p "$mnt/srv/app" && echo ok >"$mnt/srv/app/index"; } || rc=1
  dg=$("$XENOD" digest "$mnt" 2>/dev/null) || rc=1
  "$XENOD" digest --list "$mnt" >"$WORK/lists/new" 2>/dev/null || rc=1
  x "$h" umount "$mnt" >>"$WORK/ops.log" 2>&1 || rc=1
  if [ $rc = 0 ]; then
    local name=template://soak/c$N_LAYERS/1
    cid=$(x "$h" --json commit "$up" --base "$id" --name "$name" 2>>"$WORK/ops.log" | json 'd["id"]') || rc=1
    if [ $rc = 0 ]; then
      DIGEST[$cid]=$dg; NAMEOF[$cid]=$name; N_LAYERS=$((N_LAYERS + 1))
      mv "$WORK/lists/new" "$WORK/lists/$cid"
      local o=$(( h % HOSTS + 1 ))
      x "$h" replicate "$name" --to "${NODE[$o]}@$(ip_of "$o"):7000" >>"$WORK/ops.log" 2>&1 || rc=1
    fi
  fi
  rmdir "$mnt" 2>/dev/null; rm -rf "$up"
  return $rc
}

op_gc() { local h; h=$(pick_live) || return 1; x "$h" gc >>"$WORK/ops.log" 2>&1; }
op_replicate() {
  local h o id
  h=$(pick_live) || return 1; id=$(pick_layer) || return 0
  o=$(( (h + RANDOM % (HOSTS - 1)) % HOSTS + 1 ))
  xn "$h" fetch "${NAMEOF[$id]}" >>"$WORK/ops.log" 2>&1 || return 1
  x "$h" replicate "${NAMEOF[$id]}" --to "${NODE[$o]}@$(ip_of "$o"):7000" >>"$WORK/ops.log" 2>&1
}

one_op() {
  local kind rc=0
  case $((RANDOM % 10)) in
    0|1|2) kind=publish ;; 3|4) kind=fetch ;; 5|6) kind=commit ;; 7) kind=gc ;; *) kind=replicate ;;
  esac
  "op_$kind" || rc=1
  op_done "$kind" $rc
  if grep -q " $WORK/mnt" /proc/mounts; then
    violation "mounts: a FUSE mount is left after $kind: $(grep " $WORK/mnt" /proc/mounts | awk '{print $2}' | tr '\n' ' ')"
    grep " $WORK/mnt" /proc/mounts | awk '{print $2}' | while read -r m; do umount -l "$m"; done
  fi
}

# --- invariants ---------------------------------------------------------------------
check_invariants() {
  local when=$1 h id ok src out diff
  CHECKS=$((CHECKS + 1))
  if [ "$LINK_DELAY" = netdelay ]; then delays_alive; fi
  for h in $(seq 1 "$HOSTS"); do
    alive "$h" || serve "$h" || violation "$when: host $h does not start again: $(tail -2 "$WORK/h$h.log")"
  done
  sleep 2
  for h in $(seq 1 "$HOSTS"); do
    xn "$h" verify --repair >>"$WORK/ops.log" 2>&1 || true
    out=$(x "$h" --json verify 2>&1) || violation "$when: host $h not clean after verify --repair: $(echo "$out" | tail -c 400)"
  done
  # Every layer (a sample of three between faults), from some host that
  # holds it, exports to its tree.
  local ids=()
  if [ "$when" = end ]; then ids=("${!DIGEST[@]}"); else
    for _ in 1 2 3; do id=$(pick_layer) && ids+=("$id"); done
  fi
  for id in "${ids[@]}"; do
    ok=0
    diff=""
    for h in $(seq 1 "$HOSTS"); do
      out=$WORK/export
      rm -rf "$out"
      x "$h" export "$id" "$out" >/dev/null 2>&1 || continue
      if [ "$("$XENOD" digest "$out")" = "${DIGEST[$id]}" ]; then ok=1; break; fi
      diff=" (host $h's export differs: $("$XENOD" digest --list "$out" | diff "$WORK/lists/$id" - | grep '^[<>]' | head -2 | tr '\n' ' '))"
    done
    rm -rf "$WORK/export"
    [ $ok = 1 ] || violation "$when: complete: layer $id (${NAMEOF[$id]}) exports to its tree on no host$diff"
  done
}

# --- faults -----------------------------------------------------------------------------
fault() {
  local kind=$1 h p
  FAULT_N[$kind]=$((${FAULT_N[$kind]:-0} + 1))
  case $kind in
    kill)
      h=$(pick_live) || return
      log "fault: kill -9 host $h"
      # At a random point of a transfer it serves or makes.
      local id bg=""; id=$(pick_layer) || id=""
      if [ -n "$id" ]; then
        xn "$h" fetch "${NAMEOF[$id]}" >>"$WORK/ops.log" 2>&1 &
        bg=$!
        sleep "0.$((RANDOM % 10))"
      fi
      stop "$h"
      [ -z "$bg" ] || wait "$bg" 2>/dev/null || true
      one_op; sleep $((2 + RANDOM % 5)); serve "$h" || violation "kill: host $h does not restart" ;;
    partition)
      h=$((1 + RANDOM % HOSTS)); log "fault: partition host $h"
      link "$h" down; one_op; one_op; sleep 8; link "$h" ;;
    diskfull)
      log "fault: disk of host $HOSTS full"
      fallocate -l "$(df -B1 --output=avail "$TMPFS" | tail -1)" "$TMPFS/filler" 2>/dev/null \
        || dd if=/dev/zero of="$TMPFS/filler" bs=1M status=none 2>/dev/null || true
      one_op; one_op; one_op; sleep 2; rm -f "$TMPFS/filler" ;;
    flip)
      h=$((1 + RANDOM % HOSTS))
      p=$(find "$(dir_of "$h")/packs" -type f -size +1k 2>/dev/null | shuf -n 1 || true)
      [ -n "$p" ] || return
      log "fault: flip a byte in $(basename "$p") of host $h"
      python3 - "$p" <<'PY'
import os, random, sys
p = sys.argv[1]
n = os.path.getsize(p)
off = random.randrange(64, n) if n > 64 else 0
with open(p, "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5a]))
PY
      ;;
    clock)
      h=$(pick_live) || return
      log "fault: host $h's clock 2 h ahead"
      stop "$h"; serve "$h" "+2h" || violation "clock: host $h does not start with its clock ahead"
      one_op; sleep 10; stop "$h"; serve "$h" || violation "clock: host $h does not restart" ;;
  esac
}

# --- run ------------------------------------------------------------------------------------
read -r -a KINDS <<<"$FAULTS"
[ ${#KINDS[@]} -gt 0 ] || die "no fault kinds to inject"
next_fault=$(( $(date +%s) + FAULT_EVERY ))
while [ $(( $(date +%s) - START )) -lt "$SOAK_SECONDS" ]; do
  one_op
  if [ "$(date +%s)" -ge "$next_fault" ]; then
    kind=${KINDS[$((RANDOM % ${#KINDS[@]}))]}
    fault "$kind"
    check_invariants "after $kind"
    next_fault=$(( $(date +%s) + FAULT_EVERY ))
  fi
done
check_invariants end
# Shut every daemon down; nothing of this run may be left running.
for h in $(seq 1 "$HOSTS"); do x "$h" shutdown >/dev/null 2>&1 || true; done
# A daemon's stop is bounded (goodbyes 1 s each, the endpoint's close 3 s,
# the last usage sample 2 s, work left running 2 s): 15 s is past all.
for _ in $(seq 1 150); do
  pgrep -f -- "--data-dir $WORK/" >/dev/null || break
  sleep 0.1
done
if pgrep -f -- "--data-dir $WORK/" >/dev/null; then
  violation "procs: left running after shutdown: $(pgrep -af -- "--data-dir $WORK/" | head -3 | tr '\n' ';')"
  # What they wait on, for whoever reads the report.
  for pid in $(pgrep -f -- "--data-dir $WORK/"); do
    log "left running: $pid, threads (name: kernel wait):"
    for t in /proc/"$pid"/task/*; do
      log "  $(cat "$t/comm" 2>/dev/null): $(cat "$t/wchan" 2>/dev/null)"
    done
    if command -v gdb >/dev/null; then
      gdb -p "$pid" -batch -ex 'thread apply all bt 12' 2>/dev/null | grep -E '^(Thread|#)' | head -80 >&2 || true
    fi
  done
fi
ELAPSED=$(( $(date +%s) - START ))

# --- report ----------------------------------------------------------------------------------
kv() { local -n m=$1; local k s=""; for k in "${!m[@]}"; do s+="\"$k\": ${m[$k]}, "; done; echo "{${s%, }}"; }
viol_json=$(printf '%s\n' "${VIOLATIONS[@]}" | python3 -c 'import json,sys; print(json.dumps([l.rstrip("\n") for l in sys.stdin if l.strip()]))')
REPORT=$(cat <<EOF
{"seconds": $ELAPSED, "hosts": $HOSTS, "seed": $SEED, "layers": $N_LAYERS,
 "ops_ok": $(kv OPS_OK), "ops_failed": $(kv OPS_FAIL), "faults": $(kv FAULT_N),
 "invariant_checks": $CHECKS, "violations": $viol_json}
EOF
)
[ -n "$OUT" ] && echo "$REPORT" >"$OUT"
echo "$REPORT" | python3 -c '
import json, sys
d = json.load(sys.stdin)
ok, failed, faults = d["ops_ok"], d["ops_failed"], d["faults"]
print("## Soak: %d s, %d hosts, seed %d, %d layers made\n" % (d["seconds"], d["hosts"], d["seed"], d["layers"]))
print("| operation | done | failed |\n|---|---|---|")
for k in sorted(set(ok) | set(failed)):
    print("| %s | %d | %d |" % (k, ok.get(k, 0), failed.get(k, 0)))
print("\n| fault | injected |\n|---|---|")
for k in sorted(faults):
    print("| %s | %d |" % (k, faults[k]))
print("\ninvariant checks: %d, violations: %d" % (d["invariant_checks"], len(d["violations"])))
for v in d["violations"]:
    print("- " + v)
'
echo "soak: violations=${#VIOLATIONS[@]}" >&2
[ ${#VIOLATIONS[@]} -eq 0 ]
