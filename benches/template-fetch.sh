#!/usr/bin/env bash
# Moving real OS trees between two hosts on loopback: xenod daemon to daemon
# against iroh-blobs, rsync and this machine's bound, side by side in one
# run, rounds interleaved.
#
# Usage: benches/template-fetch.sh [--out FILE.json]
#
# Environment: XENOD (default target/release/xenod), PROBE (the iroh-blobs
#   probe; built from benches/iroh-blobs-probe if missing), ROUNDS (default
#   3), XENOD_FIXTURES (the Debian trees of fixtures/build-debian-trees.sh,
#   default /var/cache/xenod-fixtures), TMPDIR (the work directory).
#
# Two jobs, each onto a host that starts empty every round:
#   template  T1 (debootstrap minbase, apt lists included) onto nothing;
#   overlay   O1 (T1 + apache2) onto a host that holds T1 (the template job's
#             result): only what differs moves.
# The movers:
#   xenod       A publishes T1 and the overlay of O1 on it; an empty daemon
#               B fetches each by ticket (every chunk verified, written to
#               packs and fsynced). Wall time of `xenod fetch`.
#   iroh-blobs  the probe imports every regular file of T1 and of O1 as one
#               collection each; an empty store fetches the T1 collection,
#               then the O1 collection (it fetches only the blobs it lacks).
#               The probe's own clock (connect to synced store).
#   rsync       `rsync -aHAX -z --compress-choice=zstd` from an rsync daemon
#               on loopback, T1 into an empty directory, then O1 onto it
#               (the delta algorithm finds what changed). Wall time.
#   bound       `tar -c | zstd -1 | loopback TCP socket | zstd -d | tar -x`
#               of T1, and of the files of O1 that are new or changed
#               against T1. Wall time.
# MB/s divides one figure for every mover: the plaintext the job needs, as
# xenod counts it (distinct file bytes the receiver lacks). Sources are
# read once before the rounds (warm page cache for every mover); rsync and
# tar do not fsync what they write. Markdown to stdout, progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
XENOD=${XENOD:-$ROOT/target/release/xenod}
PROBE=${PROBE:-$ROOT/target/release/iroh-blobs-probe}
ROUNDS=${ROUNDS:-3}
FIXDIR=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/debian
. "$ROOT/benches/lib.sh"
bench_args "$@"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer" >&2; exit 2; }

log() { echo "template-fetch: $*" >&2; }
[ -d "$FIXDIR/T1" ] && [ -d "$FIXDIR/O1" ] || { log "no Debian trees in $FIXDIR: run fixtures/build-debian-trees.sh"; exit 1; }
for tool in rsync zstd tar python3; do
  command -v "$tool" >/dev/null || { log "$tool is missing: scripts/install-deps.sh installs it"; exit 1; }
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xenod-tplfetch.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x "$XENOD" ]; then
  log "building xenod (release)"
  cargo build --release --locked -p xenod >&2
fi
if [ ! -x "$PROBE" ]; then
  log "building the iroh-blobs probe (release)"
  cargo build --release --manifest-path benches/iroh-blobs-probe/Cargo.toml --target-dir "$ROOT/target" >&2 ||
    log "probe build failed: iroh-blobs column skipped"
fi

now() { date +%s.%N; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

# --- the providers ------------------------------------------------------------
log "A publishes T1 and the overlay of O1 on it"
"$XENOD" --data-dir "$WORK/a" --json publish "$FIXDIR/T1" --name template://bench/minbase/1 >/dev/null 2>&1
"$XENOD" --data-dir "$WORK/a" --json overlay create --base template://bench/minbase/1 "$FIXDIR/O1" \
  --name template://bench/apache2/1 >/dev/null 2>&1
serve "$WORK/a"
T_TICKET=$("$XENOD" --data-dir "$WORK/a" share template://bench/minbase/1 2>/dev/null | tail -1)
O_TICKET=$("$XENOD" --data-dir "$WORK/a" share template://bench/apache2/1 2>/dev/null | tail -1)

BLOBS=0
if [ -x "$PROBE" ]; then
  log "iroh-blobs: importing T1 and O1 as collections"
  mkfifo "$WORK/pfifo"
  "$PROBE" send-dirs "$WORK/blobs-a" "$FIXDIR/T1" "$FIXDIR/O1" >"$WORK/pfifo" 2>"$WORK/probe-send.log" &
  PIDS+=($!)
  read -r B_PEER B_T B_O <"$WORK/pfifo"
  rm -f "$WORK/pfifo"
  BLOBS=1
fi

RPORT=$(free_port)
cat >"$WORK/rsyncd.conf" <<EOF
use chroot = no
[t1]
  path = $FIXDIR/T1
  read only = yes
  uid = root
  gid = root
[o1]
  path = $FIXDIR/O1
  read only = yes
  uid = root
  gid = root
EOF
rsync --daemon --no-detach --address=127.0.0.1 --port="$RPORT" --config="$WORK/rsyncd.conf" \
  --log-file="$WORK/rsyncd.log" &
PIDS+=($!)

# The files of O1 that are new or changed against T1, for the bound.
python3 - "$FIXDIR/T1" "$FIXDIR/O1" >"$WORK/o1-changed" <<'EOF'
import os, stat, sys
t1, o1 = sys.argv[1], sys.argv[2]
for top, dirs, files in os.walk(o1):
    for name in dirs + files:
        p = os.path.join(top, name)
        rel = os.path.relpath(p, o1)
        a = os.lstat(p)
        try:
            b = os.lstat(os.path.join(t1, rel))
        except FileNotFoundError:
            b = None
        if stat.S_ISDIR(a.st_mode):
            if b is None:
                sys.stdout.write("./" + rel + "\0")
            continue
        if b is None or (a.st_mode, a.st_size, a.st_mtime_ns) != (b.st_mode, b.st_size, b.st_mtime_ns):
            sys.stdout.write("./" + rel + "\0")
EOF

# One run of the bound: `tar "$@"` through zstd -1 and a loopback socket
# into `tar -x` in $1. The server says its port once it listens.
bound() {
  local dest=$1 port sink
  shift
  mkdir -p "$dest"
  rm -f "$WORK/bready"
  mkfifo "$WORK/bready"
  python3 -c '
import socket, shutil, sys
s = socket.socket()
s.bind(("127.0.0.1", 0)); s.listen(1)
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % s.getsockname()[1])
s.settimeout(60)
c, _ = s.accept()
shutil.copyfileobj(c.makefile("rb"), sys.stdout.buffer, 1 << 20)
' "$WORK/bready" | { zstd -dq | tar -x -C "$dest"; } &
  sink=$!
  read -r port <"$WORK/bready"
  tar "$@" | zstd -1 -q >"/dev/tcp/127.0.0.1/$port"
  wait "$sink"
}

log "warming the page cache (sources and A's packs)"
tar -C "$FIXDIR" -cf - T1 O1 >/dev/null
cat "$WORK"/a/packs/* >/dev/null 2>&1 || true

# --- rounds ---------------------------------------------------------------------
declare -A SECS
T_BYTES="" O_BYTES=""
add() { SECS[$1]="${SECS[$1]:-} $2"; }
for r in $(seq 1 "$ROUNDS"); do
  log "round $r of $ROUNDS"
  b="$WORK/b$r"
  nowarm "$b"
  serve "$b"
  bpid=$LAST_PID
  t0=$(now); "$XENOD" --data-dir "$b" --json fetch "$T_TICKET" >"$b.t.json" 2>/dev/null; t1=$(now)
  add xenod_t "$(echo "$t1 - $t0" | bc -l)"
  t0=$(now); "$XENOD" --data-dir "$b" --json fetch "$O_TICKET" >"$b.o.json" 2>/dev/null; t1=$(now)
  add xenod_o "$(echo "$t1 - $t0" | bc -l)"
  T_BYTES=$(json 'd["bytes"]' <"$b.t.json")
  O_BYTES=$(json 'd["bytes"]' <"$b.o.json")
  kill "$bpid"; wait "$bpid" 2>/dev/null || true
  rm -rf "$b"

  if [ "$BLOBS" = 1 ]; then
    "$PROBE" receive "$B_PEER" "$B_T" "$WORK/blobs-b$r" collection >"$WORK/bt.json" 2>>"$WORK/probe-recv.log"
    add blobs_t "$(json 'd["secs"]' <"$WORK/bt.json")"
    "$PROBE" receive "$B_PEER" "$B_O" "$WORK/blobs-b$r" collection >"$WORK/bo.json" 2>>"$WORK/probe-recv.log"
    add blobs_o "$(json 'd["secs"]' <"$WORK/bo.json")"
    rm -rf "$WORK/blobs-b$r"
  fi

  d="$WORK/rsync-$r"
  mkdir -p "$d"
  t0=$(now); rsync -aHAX --numeric-ids -z --compress-choice=zstd "rsync://127.0.0.1:$RPORT/t1/" "$d/"; t1=$(now)
  add rsync_t "$(echo "$t1 - $t0" | bc -l)"
  t0=$(now); rsync -aHAX --numeric-ids -z --compress-choice=zstd "rsync://127.0.0.1:$RPORT/o1/" "$d/"; t1=$(now)
  add rsync_o "$(echo "$t1 - $t0" | bc -l)"
  rm -rf "$d"

  d="$WORK/bound-$r"
  t0=$(now); bound "$d" -C "$FIXDIR/T1" -cf - .; t1=$(now)
  add bound_t "$(echo "$t1 - $t0" | bc -l)"
  t0=$(now); bound "$d" --null --no-recursion -C "$FIXDIR/O1" -cf - -T "$WORK/o1-changed"; t1=$(now)
  add bound_o "$(echo "$t1 - $t0" | bc -l)"
  rm -rf "$d"
done

# --- report -----------------------------------------------------------------------
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print ""; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
med() { echo "${SECS[$1]:-}" | median; }
mbs() { [ -n "$2" ] && printf '%.0f' "$(echo "$1 / $2 / 1000000" | bc -l)" || echo "-"; }
cell() { [ -n "$2" ] && printf '%.2f s (%s MB/s)' "$2" "$(mbs "$1" "$2")" || echo "-"; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && printf '%.2f' "$(echo "$2 / $1" | bc -l)" || echo "-"; }
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
echo "Median of $ROUNDS interleaved rounds; MB/s of the plaintext each job needs; load $LOAD."
echo
echo "| job | plaintext | xenod | iroh-blobs | rsync -z zstd | tar, zstd -1, socket | xenod speed-up vs iroh-blobs / rsync |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for j in t o; do
  bytes=$T_BYTES name="template: Debian minbase onto an empty host"
  [ "$j" = o ] && bytes=$O_BYTES name="overlay: apache2 onto a host holding the template"
  x=$(med "xenod_$j") bl=$(med "blobs_$j") rs=$(med "rsync_$j") bo=$(med "bound_$j")
  echo "| $name | $(printf '%.1f' "$(echo "$bytes / 1000000" | bc -l)") MB | $(cell "$bytes" "$x") | $(cell "$bytes" "$bl") |" \
    "$(cell "$bytes" "$rs") | $(cell "$bytes" "$bo") | $(ratio "$x" "$bl") / $(ratio "$x" "$rs") |"
done
echo
for k in xenod_t blobs_t rsync_t bound_t xenod_o blobs_o rsync_o bound_o; do
  echo "- $k seconds:${SECS[$k]:- -}"
done

if [ -n "$OUT" ]; then
  {
    echo "{\"rounds\": $ROUNDS, \"template_bytes\": $T_BYTES, \"overlay_bytes\": $O_BYTES, \"load\": \"$LOAD\", \"seconds\": {"
    sep=""
    for k in "${!SECS[@]}"; do
      echo "$sep \"$k\": [$(echo "${SECS[$k]}" | xargs | tr ' ' ',')]"
      sep=","
    done
    echo "}}"
  } >"$OUT"
fi
