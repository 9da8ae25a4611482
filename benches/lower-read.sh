#!/usr/bin/env bash
# The first read of a big lower file through a writable cowfs mount, cold,
# against the same file read from ext4 on the same disk, side by side.
#
# Usage: benches/lower-read.sh [--rounds N] [--keep DIR] [--content mixed|random]
#
# Environment: XENOD (binary, default target/release/xenod), XENOD_B (a
#   second binary, e.g. main's build before a change: measured in the same
#   rounds as "cowfs-b"), ROUNDS (default 5), TMPDIR (where the work
#   directory goes: it must be on the disk being compared; about 3.5 GB),
#   LOWER_READ_KEEP (a directory to keep the generated file and store in
#   between runs; default: a fresh one, removed at the end).
#
# The file: 1 GiB, written once by a seeded generator (the same bytes every
# run), made like a VM disk image's content: in every 10 MiB, 4 MiB of text
# (log lines with numbers, ids and words: zstd -2 keeps about a quarter),
# 3 MiB of binary-like data (random bytes with masked bits: about 60%
# kept) and 3 MiB of random bytes (incompressible, stored raw); no all-zero
# 64 KiB block, so neither side skips holes. `xenod publish` stores it as a
# disk image: fixed 64 KiB chunks, each zstd-compressed alone or kept raw.
# The ext4 copy is a plain copy of the generated file in the same work
# directory. With `--content random` (or LOWER_READ_CONTENT=random) the
# file is 1 GiB of seeded random bytes instead, every chunk stored raw: the
# cost of reading without decompressing (hashing and copies only).
#
# Each round measures every tool once, in an order rotated per round:
#   ext4     sync; drop caches; dd if=FILE of=/dev/null bs=1M
#   cowfs    the file cache's entries are removed (so this is the file's
#            first read on this host), `xenod mount ID MNT --upper UP`
#            (fresh upper), sync; drop caches; dd if=MNT/vm.img bs=1M;
#            then unmount and wait for the server process to exit (it
#            finishes a materialisation in progress first)
#   cowfs-b  the same with $XENOD_B
#   cowfs-warm  the entries removed, sync; drop caches; `xenod cache warm ID`
#            (what the daemon does when a stack arrives: timed apart, its
#            wall time is the "warm s" column, the cost paid at arrival),
#            then as cowfs: mount with a fresh upper, drop caches, dd. The
#            read is then the first read through a mount on a host that
#            holds the stack, passed through to the cache entry.
# The server's CPU time (user+system, from /proc) is read just before
# unmounting. Medians over rounds, with the spread (min-max) and the load
# average, go to stdout as Markdown; progress to stderr.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"
ROUNDS=${ROUNDS:-5}
KEEP=${LOWER_READ_KEEP:-}
CONTENT=${LOWER_READ_CONTENT:-mixed}
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    --content) CONTENT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "lower-read: unknown argument: $1" >&2; exit 2 ;;
  esac
done
case $CONTENT in mixed|random) ;; *) echo "lower-read: --content is mixed or random, not $CONTENT" >&2; exit 2 ;; esac
XENOD=${XENOD:-target/release/xenod}
case $XENOD in /*) ;; *) XENOD=$ROOT/$XENOD ;; esac
XENOD_B=${XENOD_B:-}
log() { printf '[lower-read %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (mounts, drop_caches)"
[ -x "$XENOD" ] || die "no xenod at $XENOD"
[ -z "$XENOD_B" ] || [ -x "$XENOD_B" ] || die "no xenod at XENOD_B=$XENOD_B"
for t in dd jq python3 mountpoint awk; do command -v $t >/dev/null || die "missing tool: $t"; done

if [ -n "$KEEP" ]; then
  W=$KEEP
  mkdir -p "$W"
else
  W=$(mktemp -d "${TMPDIR:-/var/tmp}/xenod-lower-read.XXXXXX")
fi
MNT=$W/mnt
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; fi
  rm -rf --one-file-system "$W/upper"
  [ -n "$KEEP" ] || rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
mkdir -p "$MNT" "$W/src" "$W/ext4"
D=$W/store

gen() {  # OUT: the 1 GiB file described above
  python3 - "$1" "$CONTENT" <<'EOF'
import random, sys
MiB = 1 << 20
rng = random.Random(25)
words = [w.encode() for w in ("GET POST PUT session cache request upstream worker accepted closed timeout "
         "retry backend user login logout kernel: systemd[1]: Started Stopped mounted eth0 link up down "
         "audit: type=1400 apparmor=ALLOWED operation=open profile=/usr/sbin/nginx name=/var/www/").split()]
def text(n):
    out, size = [], 0
    while size < n:
        line = b"2026-12-%02d %02d:%02d:%02d.%06d host%d %s[%d]: %s %s %s id=%016x took %d ms\n" % (
            rng.randrange(1, 29), rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.randrange(10**6),
            rng.randrange(16), rng.choice(words), rng.randrange(1, 40000), rng.choice(words), rng.choice(words),
            rng.choice(words), rng.getrandbits(64), rng.randrange(5000))
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]
mask = int.from_bytes(b"\x0f\xff\x00\x3f\x01\xff\x7f\x00" * (MiB // 8), "little")
def binary(n):
    return (int.from_bytes(rng.randbytes(n), "little") & mask).to_bytes(n, "little")
with open(sys.argv[1], "wb") as f:
    for seg in range(1024):
        k = 9 if sys.argv[2] == "random" else seg % 10
        f.write(text(MiB) if k < 4 else binary(MiB) if k < 7 else rng.randbytes(MiB))
EOF
}

if [ -s "$W/content" ] && [ "$(cat "$W/content")" != "$CONTENT" ]; then
  die "$W holds a $(cat "$W/content") file, not $CONTENT: keep another directory"
fi
echo "$CONTENT" >"$W/content"
if [ ! -s "$W/ext4/vm.img" ]; then
  log "generating the 1 GiB file ($CONTENT)"
  gen "$W/ext4/vm.img.tmp"
  mv "$W/ext4/vm.img.tmp" "$W/ext4/vm.img"
fi
[ "$(stat -c %s "$W/ext4/vm.img")" -eq $((1 << 30)) ] || die "$W/ext4/vm.img is not 1 GiB"
if [ ! -s "$W/layer-id" ]; then
  log "publishing"
  rm -rf "$D" "$W/src"/*
  ln "$W/ext4/vm.img" "$W/src/vm.img"
  "$XENOD" --data-dir "$D" --json publish "$W/src" | jq -r .id >"$W/layer-id"
  rm -f "$W/src/vm.img"
fi
ID=$(cat "$W/layer-id")
[[ $ID =~ ^[0-9a-f]{64}$ ]] || die "publishing gave no id: $ID"
log "layer $ID; store: $(du -sm "$D/packs" | cut -f1) MB of packs for 1024 MiB"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
ELAPSED=0
timed_dd() {  # FILE
  local t0 t1
  t0=$EPOCHREALTIME
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$EPOCHREALTIME
  ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')
}
server_pid() {  # the process serving $MNT
  local p
  for p in $(pgrep -f -- " mount .*$MNT" || true); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- " $MNT "; then echo "$p"; return; fi
  done
}
cpu_secs() {  # PID: user+system seconds so far
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

RAW=$W/raw.tsv
: >"$RAW"
run_cowfs() {  # TOOL BINARY ROUND [warm]
  local pid cpu=NA warm=NA t0
  rm -rf --one-file-system "$W/upper" "$D/cache/files"
  mkdir -p "$W/upper"
  if [ "${4:-}" = warm ]; then
    drop_caches
    t0=$EPOCHREALTIME
    "$2" --data-dir "$D" cache warm "$ID" >/dev/null
    warm=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f", b - a}')
  fi
  "$2" --data-dir "$D" mount "$ID" "$MNT" --upper "$W/upper" >/dev/null
  mountpoint -q "$MNT" || die "$1 did not mount"
  pid=$(server_pid)
  drop_caches
  timed_dd "$MNT/vm.img"
  [ -n "$pid" ] && cpu=$(cpu_secs "$pid")
  for _ in $(seq 100); do umount "$MNT" 2>/dev/null && break; sleep 0.1; done
  mountpoint -q "$MNT" && die "cannot unmount $MNT"
  if [ -n "$pid" ]; then
    for _ in $(seq 600); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$3" "$ELAPSED" "$cpu" "$(cut -d' ' -f1 /proc/loadavg)" "$warm" >>"$RAW"
  log "round $3 $1: $ELAPSED s (server CPU $cpu s, warm $warm s)"
}
run_ext4() {  # ROUND
  drop_caches
  timed_dd "$W/ext4/vm.img"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' ext4 "$1" "$ELAPSED" NA "$(cut -d' ' -f1 /proc/loadavg)" NA >>"$RAW"
  log "round $1 ext4: $ELAPSED s"
}

TOOLS=(ext4 cowfs cowfs-warm)
[ -n "$XENOD_B" ] && TOOLS+=(cowfs-b)
for r in $(seq "$ROUNDS"); do
  n=${#TOOLS[@]}
  for i in $(seq 0 $((n - 1))); do
    t=${TOOLS[$(((i + r) % n))]}
    case $t in
      ext4) run_ext4 "$r" ;;
      cowfs) run_cowfs cowfs "$XENOD" "$r" ;;
      cowfs-b) run_cowfs cowfs-b "$XENOD_B" "$r" ;;
      cowfs-warm) run_cowfs cowfs-warm "$XENOD" "$r" warm ;;
    esac
  done
done

cp "$RAW" "$W/raw-last.tsv" 2>/dev/null || true
echo "| tool | median s | min-max s | MB/s | / ext4 | server CPU s | load | warm s (at arrival) |"
echo "|---|---|---|---|---|---|---|---|"
ext4_med=$(awk -F'\t' '$1 == "ext4" {print $3}' "$RAW" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
for t in "${TOOLS[@]}"; do
  awk -F'\t' -v t="$t" -v e="$ext4_med" '
    function med(v, n,   i, j, x) { for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
                                    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }
    $1 == t { n++; s[n] = $3; if ($4 != "NA") { m++; c[m] = $4 }; l[n] = $5; if (n == 1 || $3 < lo) lo = $3; if ($3 > hi) hi = $3
              if ($6 != "NA" && $6 != "") { k++; w[k] = $6; if (k == 1 || $6 < wlo) wlo = $6; if ($6 > whi) whi = $6 } }
    END { ms = med(s, n); printf "| %s | %.3f | %.3f-%.3f | %.0f | %.2fx | %s | %.1f | %s |\n", t, ms, lo, hi, 1073.741824 / ms, ms / e,
          m ? sprintf("%.2f", med(c, m)) : "-", med(l, n), k ? sprintf("%.2f (%.2f-%.2f)", med(w, k), wlo, whi) : "-" }' "$RAW"
done
echo
echo "Per round (s): $(awk -F'\t' '{printf "%s %s=%s; ", $2, $1, $3}' "$RAW")"
