# Shared by the benchmark scripts; sourced after `set -euo pipefail`.

# The command line every end-to-end script takes: `--out FILE` (or
# `--out=FILE`) sets OUT for the JSON results; `-h`/`--help` prints the
# calling script's header comment. Anything else is refused.
bench_args() {
  OUT=""
  case ${1:-} in
    "") ;;
    --out) OUT=${2:?--out needs a file name} ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "$(basename "$0"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
}

# nowarm DIR: the daemon of data directory DIR will not warm its file
# cache after a fetch. A transfer benchmark times the fetch alone; the warm
# would run in the background during the next mover's turn (its cost is
# lower-read.sh's).
nowarm() {
  mkdir -p "$1"
  echo "warm_file_cache = false" >>"$1/config.toml"
}

# serve DIR: starts `$XENOD serve` on loopback for data directory DIR,
# logging to DIR.log, and returns once it listens. Its pid joins the
# caller's PIDS and is LAST_PID; DAEMON_ADDR is its NODE@ADDR. Uses WORK
# for a fifo.
serve() {
  local dir=$1 line
  mkfifo "$WORK/serve.fifo"
  XENOD_LOG=error "$XENOD" --data-dir "$dir" serve --listen 127.0.0.1:0 >"$WORK/serve.fifo" 2>"$dir.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  read -r line <"$WORK/serve.fifo"
  rm -f "$WORK/serve.fifo"
  DAEMON_ADDR=$(echo "$line" | awk '{print $4}')
}

# netns_host NS ADDR: an emulated host: network namespace NS (joins
# NETNS) with its loopback up, and a veth pair whose end inside NS, eth0,
# holds ADDR/24 and whose other end, named NS, is a port of BRIDGE, up.
# eth0 is left down, for the caller to shape and bring up.
netns_host() {
  ip netns add "$1"
  NETNS+=("$1")
  ip -n "$1" link set lo up
  ip link add "$1" type veth peer name eth0 netns "$1"
  ip link set "$1" master "$BRIDGE" up
  ip -n "$1" addr add "$2/24" dev eth0
}

# netdelay_prepare: NETDELAY (benches/src/bin/netdelay.rs; default
# target/release/netdelay, built here when missing) and iptables, which
# feeds it, are there. Uses the caller's ROOT, log and die.
netdelay_prepare() {
  NETDELAY=${NETDELAY:-$ROOT/target/release/netdelay}
  command -v iptables >/dev/null || die "a link delay needs iptables (its NFQUEUE rule feeds netdelay)"
  if [ ! -x "$NETDELAY" ]; then
    log "building netdelay (release)"
    (cd "$ROOT" && cargo build --release --locked -p xenod-benches --bin netdelay >&2)
  fi
}

# netdelay_start NS MS: every packet arriving on NS's eth0 waits MS ms
# before it goes on (netdelay, an NFQUEUE reader in NS, fed by a mangle
# PREROUTING rule). The delay is on receipt: a packet held on its
# sender's side still counts against the sending socket (TCP small
# queues), which caps a TCP stream far below the link. Logs to
# WORK/netdelay.log; the reader's pid joins PIDS and DELAYS.
netdelay_start() {
  local ns=$1 ms=$2
  # The queue's reader first: a rule without one drops what it queues.
  ip netns exec "$ns" "$NETDELAY" --queue 0 --delay-ms "$ms" 2>>"$WORK/netdelay.log" &
  PIDS+=("$!")
  DELAYS+=("$!")
  sleep 0.2
  kill -0 "$!" 2>/dev/null || die "netdelay did not start in $ns; see $WORK/netdelay.log"
  ip netns exec "$ns" iptables -t mangle -A PREROUTING -i eth0 -j NFQUEUE --queue-num 0
}

# delays_alive: every netdelay still runs (else its link has dropped
# everything since it stopped).
delays_alive() {
  local p
  for p in "${DELAYS[@]}"; do kill -0 "$p" 2>/dev/null || die "a netdelay stopped; see $WORK/netdelay.log"; done
}
