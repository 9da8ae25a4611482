#!/usr/bin/env bash
# What placement's locality buys: a guest deployed from an overlay on a
# template onto the host placement picks, against a host picked at random,
# among eight where two already hold the template; in one run.
#
# Usage: benches/locality.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), TEMPLATE_MIB (OS files
#   from /usr added to the fixture's guest, default 160, like the Debian
#   template's 164 MB), OVERLAY_MIB (the overlay's added files, default 100,
#   like the apache2 overlay's 111 MB), RANDOM_PICKS (default 3), KEEP=1
#   (keep the work directory), XENOD_LOG (default error).
#
# Nine daemons on loopback, one libvirt: P publishes the fixture's disk
# guest as the template (boot files and a disk image with the web service)
# and an overlay of OVERLAY_MIB on it, and asks for every deploy; W1..W8
# (label role=worker) take guests from P. W1 and W2 fetch the template
# first. Then, from P, each a real guest booted with QEMU until its service
# answers, then destroyed:
#   placed:  xenod deploy OVERLAY --place 'label.role=worker'
#   holder:  the other template holder, by --place 'node=W'
#   empty:   RANDOM_PICKS of W3..W8 drawn at random (seeded, distinct)
# A host picked at random among the eight is a holder 2 times in 8 and an
# empty host 6 times: its expected cost is 2/8 holder + 6/8 empty. Each
# host is measured in the state it started in (no host is deployed to twice).
# Reported per deploy: the host, the bytes it fetched, the wall time of the
# command (deploy to answer); then the means. Needs root, /dev/fuse, QEMU.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
OVERLAY_MIB=${OVERLAY_MIB:-100}
TEMPLATE_MIB=${TEMPLATE_MIB:-160}
RANDOM_PICKS=${RANDOM_PICKS:-3}
KEEP=${KEEP:-0}
export XENOD_LOG=${XENOD_LOG:-error}
. "$ROOT/benches/lib.sh"
bench_args "$@"

log() { echo "locality-bench: $*" >&2; }
die() { log "$*"; exit 1; }
[ -x "$XENOD" ] || die "no binary at $XENOD (cargo build --release, or XENOD=path)"
[ "$(id -u)" -eq 0 ] || die "needs root (FUSE mounts, libvirt)"

bash scripts/start-libvirtd.sh >&2
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX" >&2

WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-locality.XXXXXX")
PIDS=()
cleanup() {
  for d in "$WORK"/w*; do
    [ -d "$d/instances" ] || continue
    for i in "$d"/instances/*; do [ -e "$i" ] && "$XENOD" --data-dir "$d" destroy "$(basename "$i")" >/dev/null 2>&1 || true; done
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# start NAME LABELS PEER: a daemon in $WORK/NAME; sets NODE and ADDR.
start() {
  local d=$WORK/$1
  mkdir -p "$d"
  { [ -n "$3" ] && echo "peers = [\"$3\"]"; echo "domain_prefix = \"loc$$-$1-\""; echo "[labels]"; echo "$2"; } >"$d/config.toml"
  XENOD_ANNOUNCE_MS=500 "$XENOD" --data-dir "$d" --json serve --listen 127.0.0.1:0 >"$d/serve.out" 2>"$d/serve.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$d/serve.out" ] && break; sleep 0.1; done
  NODE=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["node"])' <"$d/serve.out")
  ADDR=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["addr"])' <"$d/serve.out")
}
x() { local d=$1; shift; "$XENOD" --data-dir "$WORK/$d" "$@"; }
jq_() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

log "template and overlay"
T=$WORK/tree
mkdir -p "$T/boot" "$T/disk"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$T/boot/"
cp "$FIX/disk/root.img" "$T/disk/root.img"
mkdir -p "$T/usr"
tar -C /usr -cf - bin sbin 2>/dev/null | head -c "$((TEMPLATE_MIB << 20))" | tar -C "$T/usr" -xf - 2>/dev/null || true
echo '{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img","ports":["0:80"]}' >"$WORK/spec.json"
O=$WORK/overlay
# An overlay is given as the whole tree (what is absent becomes a whiteout):
# the template's, plus the application's files.
cp -a "$T" "$O"
mkdir -p "$O/srv"
# Real files, cut to size: what an application overlay adds.
tar -C /usr -cf - lib share 2>/dev/null | head -c "$((OVERLAY_MIB << 20))" | tar -C "$O/srv" -xf - 2>/dev/null || true
start p "role = \"publisher\"" ""
P_NODE=$NODE P_ADDR=$ADDR
x p publish "$T" --name template://bench/os/1 --spec "$WORK/spec.json" >/dev/null 2>&1
x p overlay create --base template://bench/os/1 "$O" --name template://bench/web/1 --spec "$WORK/spec.json" >/dev/null 2>&1
TICKET=$(x p share template://bench/web/1 2>/dev/null)
TTICKET=$(x p share template://bench/os/1 2>/dev/null)
declare -a W
for i in 1 2 3 4 5 6 7 8; do
  start "w$i" "role = \"worker\"" "$P_ADDR"
  W[$i]=$NODE
  x "w$i" allow "$P_NODE" >/dev/null
done
log "W1 and W2 fetch the template"
x w1 fetch "$TTICKET" >/dev/null 2>&1
x w2 fetch "$TTICKET" >/dev/null 2>&1
# Wait until P hears all eight workers, W1 and W2 with their layer.
for _ in $(seq 100); do
  n=$(x p --json hosts --where 'label.role=worker' | jq_ 'len(v["hosts"])')
  h=$(x p --json hosts --where 'label.role=worker && layers>=1' | jq_ 'len(v["hosts"])')
  [ "$n" = 8 ] && [ "$h" = 2 ] && break
  sleep 0.3
done
[ "$n" = 8 ] && [ "$h" = 2 ] || die "P knows $n workers, $h holding the template"

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
# deploy KIND EXPR NAME: one placed deploy from P, timed, then destroyed.
deploy() {
  local t0 t1 out host
  t0=$(date +%s.%N)
  out=$(x p --json deploy "$TICKET" --place "$2" --name "$3" 2>"$WORK/deploy.err") || die "deploy $3: $(cat "$WORK/deploy.err")"
  t1=$(date +%s.%N)
  host=$(echo "$out" | jq_ 'v["instances"][0]["host"]')
  echo "$out" | python3 -c "
import json,sys
v=json.load(sys.stdin); i=v['instances'][0]
print(json.dumps({'kind':'$1','host':i['host'],'fetched_bytes':i['instance']['fetch']['bytes'],'seconds':$t1-$t0}))" >>"$RESULTS"
  for i in 1 2 3 4 5 6 7 8; do
    [ "${W[$i]}" = "$host" ] && x "w$i" destroy "$3" >/dev/null
  done
  tail -1 "$RESULTS" >&2
}
deploy placed 'label.role=worker' loc-placed
PLACED=$(tail -1 "$RESULTS" | jq_ 'v["host"]')
# A random pick is a template holder 2 times in 8, an empty host 6 times:
# measure the holder placement did not take, and RANDOM_PICKS empty hosts
# (distinct, drawn with a fixed seed), each in the state it started in.
for i in 1 2; do
  [ "${W[$i]}" != "$PLACED" ] && deploy holder "node=${W[$i]}" loc-holder
done
RANDOM=42
picked=" "
for r in $(seq "$RANDOM_PICKS"); do
  while :; do pick=$((RANDOM % 6 + 3)); [[ $picked == *" $pick "* ]] || break; done
  picked+="$pick "
  deploy empty "node=${W[$pick]}" "loc-empty$r"
done

python3 - "$RESULTS" "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def mean(k, kind):
    v = [r[k] for r in rows if r["kind"] == kind]
    return sum(v) / len(v)
print("| deploy | host | fetched | deploy to answer |")
print("|---|---|---:|---:|")
for r in rows:
    print(f"| {r['kind']} | {r['host'][:10]} | {r['fetched_bytes']/2**20:.1f} MiB | {r['seconds']:.2f} s |")
print(f"| **placed** | | {mean('fetched_bytes', 'placed')/2**20:.1f} MiB | {mean('seconds', 'placed'):.2f} s |")
rb = 2 / 8 * mean("fetched_bytes", "holder") + 6 / 8 * mean("fetched_bytes", "empty")
rs = 2 / 8 * mean("seconds", "holder") + 6 / 8 * mean("seconds", "empty")
print(f"| **random among 8 (expected: 2/8 holder + 6/8 empty)** | | {rb/2**20:.1f} MiB | {rs:.2f} s |")
if sys.argv[2]:
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
PY
