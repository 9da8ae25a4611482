#!/usr/bin/env bash
# What the FUSE request counters cost (vendor/fuser/src/stats.rs: two clock
# reads and three relaxed atomic adds per request), on one binary: the same
# layer mounted twice with cowfs, one mount counting (the default) and one
# started with XENOD_FUSE_STATS=0 (the benchmark knob that turns counting
# off), and a request-heavy workload that never touches the disk, run on
# the two mounts in alternation, many rounds.
#
# Usage: benches/fuse-counters.sh [--rounds N] [--requests N] [--out FILE.tsv]
#
#   --rounds N     rounds (default: $ROUNDS or 101, about 4 minutes; on a
#                  shared host 31 rounds left 0 inside the interval once); each round runs the
#                  workload once on every mount, in an order that alternates
#                  (ON OFF, then OFF ON, ...), so drift in the host's load
#                  falls on both sides
#   --requests N   requests per run (default: $REQUESTS or 200000)
#   --out FILE     also write the raw figures (mount, round, ns/request)
#
# Workload: statx(fd, "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC) on O_PATH
# descriptors of 64 small files of the mounted layer, in turn. The force-sync
# flag makes the kernel ask the filesystem every time (one FUSE_GETATTR per
# call, whatever the attribute timeout), with no path walk and no open; cowfs
# answers from memory. A small C program (built here with cc) times N calls
# with CLOCK_MONOTONIC and prints ns per call, i.e. per request. One warm-up
# run per mount is not recorded.
#
# Environment: XENOD (binary, default target/release/xenod: build it with
#   `cargo build --release -p xenod`), XENOD_B (optional: another binary,
#   e.g. a build from before the knob, mounted a third time with counting
#   on and timed in the same rounds: what the knob itself costs), ROUNDS,
#   REQUESTS, PIN (the CPU the workload runs on, default the last; empty:
#   not pinned. Over io_uring a request is served on the CPU that sends it,
#   so pinning keeps every run on one path), TMPDIR (work directory, a few MB).
#
# Output: markdown on stdout (per mount: median ns/request, quartiles and
# range over the rounds; the ratio of the medians; the median and quartiles
# of the per-round paired difference ON - OFF), progress on stderr. The
# script checks afterwards, through each mount's stats socket, that the
# counting mount counted every request as a getattr and the other none.
# Needs root (mounts) and /dev/fuse.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"

ROUNDS=${ROUNDS:-101}
REQUESTS=${REQUESTS:-200000}
OUT=""
XENOD=${XENOD:-target/release/xenod}
XENOD_B=${XENOD_B:-}
PIN=${PIN-$(($(nproc) - 1))}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --rounds=*) ROUNDS=${1#--rounds=}; shift ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --requests=*) REQUESTS=${1#--requests=}; shift ;;
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fuse-counters: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "fuse-counters: bad round count: $ROUNDS" >&2; exit 2; }
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || { echo "fuse-counters: bad request count: $REQUESTS" >&2; exit 2; }
case $XENOD in /*) ;; *) XENOD=$ROOT/$XENOD ;; esac
case $XENOD_B in /*|"") ;; *) XENOD_B=$ROOT/$XENOD_B ;; esac
if [ -n "$OUT" ]; then
  case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
fi

log() { printf '[fuse-counters %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (mounts)"
[ -e /dev/fuse ] || die "/dev/fuse is missing"
[ -x "$XENOD" ] || die "xenod binary not found at $XENOD (cargo build --release -p xenod, or set XENOD=...)"
[ -z "$XENOD_B" ] || [ -x "$XENOD_B" ] || die "XENOD_B=$XENOD_B is not an executable"
for t in cc jq python3 mountpoint awk taskset; do command -v "$t" >/dev/null || die "missing tool: $t"; done
# cowfs takes requests over FUSE's io_uring transport where the kernel has it.
bash "$ROOT/scripts/enable-fuse-uring.sh"
URING=$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo absent)

W=$(mktemp -d "${TMPDIR:-/var/tmp}/xenod-fuse-counters.XXXXXX")
MOUNTS=(on off)
[ -z "$XENOD_B" ] || MOUNTS+=(b)
cleanup() {
  local m
  for m in "${MOUNTS[@]}"; do
    if mountpoint -q "$W/$m" 2>/dev/null; then umount "$W/$m" 2>/dev/null || umount -l "$W/$m" 2>/dev/null || true; fi
  done
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# --- the workload -------------------------------------------------------------

cat >"$W/load.c" <<'EOF'
/* load N FILE...: N statx calls with AT_STATX_FORCE_SYNC on O_PATH
   descriptors of FILE..., in turn; prints nanoseconds per call. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: load N FILE...\n"); return 2; }
  long n = atol(argv[1]);
  int nf = argc - 2;
  int *fd = calloc(nf, sizeof *fd);
  for (int i = 0; i < nf; i++) {
    fd[i] = open(argv[2 + i], O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd[i] < 0) { perror(argv[2 + i]); return 1; }
  }
  struct statx sx;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) {
    if (statx(fd[i % nf], "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, &sx) != 0) {
      perror("statx");
      return 1;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
  printf("%.1f\n", ns / n);
  return 0;
}
EOF
cc -O2 -o "$W/load" "$W/load.c" || die "cannot build the workload"

# --- the layer and the mounts -------------------------------------------------

D=$W/store
mkdir -p "$W/src/etc"
for i in $(seq -w 0 63); do printf 'file %s\n' "$i" >"$W/src/etc/f$i"; done
ID=$("$XENOD" --data-dir "$D" --json publish "$W/src" | jq -r .id)
[[ $ID =~ ^[0-9a-f]{64}$ ]] || die "publishing the layer gave no id ($ID)"
rm -rf --one-file-system "$W/src"

for m in "${MOUNTS[@]}"; do
  mkdir -p "$W/$m"
  case $m in
    on) "$XENOD" --data-dir "$D" mount "$ID" "$W/on" >/dev/null ;;
    off) XENOD_FUSE_STATS=0 "$XENOD" --data-dir "$D" mount "$ID" "$W/off" >/dev/null ;;
    b) "$XENOD_B" --data-dir "$D" mount "$ID" "$W/b" >/dev/null ;;
  esac
  mountpoint -q "$W/$m" || die "$m: nothing mounted on $W/$m"
done

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "layer $ID; mounts: ${MOUNTS[*]}; $ROUNDS rounds of $REQUESTS requests; io_uring: $URING; CPU: ${PIN:-any}; load $LOAD0"

RAW=$W/raw.tsv
: >"$RAW"
run() {  # MOUNT -> ns per request
  local files=("$W/$1"/etc/f*)
  [ "${#files[@]}" -eq 64 ] || die "$1: the mount shows ${#files[@]} files, not 64"
  if [ -n "$PIN" ]; then taskset -c "$PIN" "$W/load" "$REQUESTS" "${files[@]}"; else "$W/load" "$REQUESTS" "${files[@]}"; fi
}
for m in "${MOUNTS[@]}"; do run "$m" >/dev/null; done  # warm-up
for ((r = 1; r <= ROUNDS; r++)); do
  order=("${MOUNTS[@]}")
  if ((r % 2 == 0)); then
    order=()
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do order+=("${MOUNTS[i]}"); done
  fi
  line=""
  for m in "${order[@]}"; do
    ns=$(run "$m")
    printf '%s\t%s\t%s\n' "$m" "$r" "$ns" >>"$RAW"
    line+=" $m=$ns"
  done
  log "round $r/$ROUNDS:$line"
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# --- checks: every request reached the filesystem, and the knob worked --------

getattrs() {  # MOUNT -> getattr requests its mount process counted
  python3 - "$D/mounts/stats" "$W/$1" <<'EOF'
import os, socket, sys
d, mnt = sys.argv[1], sys.argv[2]
for name in os.listdir(d):
    if not name.endswith(".sock"):
        continue
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(os.path.join(d, name))
    except OSError:
        continue
    s.settimeout(5)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    lines = data.decode().splitlines()
    if f"mountpoint {mnt}" not in lines:
        continue
    print(sum(int(l.split()[2]) for l in lines if l.startswith("op getattr ")))
    sys.exit(0)
print("none")
EOF
}
want=$(((ROUNDS + 1) * REQUESTS))
on_count=$(getattrs on)
off_count=$(getattrs off)
log "getattr requests counted: on $on_count (at least $want expected), off $off_count (0 expected)"
[[ $on_count =~ ^[0-9]+$ ]] && ((on_count >= want)) || die "the counting mount did not count every request: $on_count"
[ "$off_count" = 0 ] || die "the mount with XENOD_FUSE_STATS=0 counted requests: $off_count"

# --- report -------------------------------------------------------------------

[ -z "$OUT" ] || cp "$RAW" "$OUT"
stats() {  # values on stdin -> "median p25 p75 min max"
  sort -g | awk '{v[NR] = $1}
    function q(p,  h, l) { h = (NR - 1) * p + 1; l = int(h); return l >= NR ? v[NR] : v[l] + (h - l) * (v[l + 1] - v[l]) }
    END { if (NR) printf "%.1f %.1f %.1f %.1f %.1f\n", q(0.5), q(0.25), q(0.75), v[1], v[NR] }'
}
col() { awk -F'\t' -v m="$1" '$1 == m {print $3}' "$RAW"; }
medci() {  # values on stdin -> "lo hi": a 95% confidence interval of the median (order statistics, n/2 -+ 0.98 sqrt(n))
  sort -g | awk '{v[NR] = $1} END { if (NR < 6) { print "- -"; exit }
    l = int(NR / 2 - 0.98 * sqrt(NR)); h = int(NR / 2 + 1 + 0.98 * sqrt(NR) + 0.999); if (l < 1) l = 1; if (h > NR) h = NR
    printf "%.1f %.1f\n", v[l], v[h] }'
}
paired() {  # A B -> per-round A - B
  awk -F'\t' -v a="$1" -v b="$2" '$1 == a {x[$2] = $3} $1 == b {y[$2] = $3} END {for (r in x) if (r in y) print x[r] - y[r]}' "$RAW"
}
label() {
  case $1 in
    on) echo "counters on (default)" ;;
    off) echo "counters off (XENOD_FUSE_STATS=0)" ;;
    b) echo "XENOD_B, counting (no knob)" ;;
  esac
}

echo "statx with AT_STATX_FORCE_SYNC (one FUSE_GETATTR each), $REQUESTS per run, $ROUNDS rounds;"
echo "$(nproc) CPUs, workload on CPU ${PIN:-any}, load $LOAD0 before and $LOAD1 after, FUSE over io_uring: $URING"
echo
echo "| mount | median ns/request | quartiles | range |"
echo "|---|---:|---:|---:|"
declare -A MED=()
for m in "${MOUNTS[@]}"; do
  read -r med p25 p75 lo hi < <(col "$m" | stats)
  MED[$m]=$med
  echo "| $(label "$m") | $med | $p25-$p75 | $lo-$hi |"
done
echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a / b}'; }
read -r dmed d25 d75 dlo dhi < <(paired on off | stats)
read -r clo chi < <(paired on off | medci)
echo "ON / OFF (medians): $(ratio "${MED[on]}" "${MED[off]}");" \
  "paired per round, ON - OFF: median $dmed ns/request (95% confidence interval of the median $clo to $chi;" \
  "quartiles $d25 to $d75, range $dlo to $dhi)"
if [ -n "$XENOD_B" ]; then
  read -r bmed b25 b75 blo bhi < <(paired on b | stats)
  read -r clo chi < <(paired on b | medci)
  echo
  echo "ON / XENOD_B (medians): $(ratio "${MED[on]}" "${MED[b]}");" \
    "paired per round, ON - XENOD_B: median $bmed ns/request (95% confidence interval of the median $clo to $chi;" \
    "quartiles $b25 to $b75, range $blo to $bhi)"
fi
