#!/usr/bin/env bash
# cowfs against the kernel's overlayfs and fuse-overlayfs, on the same layers,
# side by side in one run.
#
# Usage: benches/cowfs-vs-overlayfs.sh [--out FILE.json] [--rounds N] [--tools LIST] [--only LIST]
#
#   --out FILE     also write every raw number (and the medians) as JSON
#   --rounds N     rounds to run (default: $ROUNDS or 5)
#   --tools LIST   comma-separated subset of: kernel,cowfs,fuse-overlayfs,
#                  cowfs-nopt (cowfs with --no-passthrough, to see what FUSE
#                  passthrough gives), cowfs-dev (cowfs with --no-uring: the
#                  classic /dev/fuse transport instead of FUSE over io_uring),
#                  cowfs-ro (cowfs read-only, no upper: the kernel opens
#                  files itself, see `xenod mount --help`), kernel-ro (the
#                  kernel's overlayfs read-only, no upper); the read-only
#                  tools skip append, create and upper; cowfs-b (cowfs
#                  served by the binary $XENOD_B, e.g. a build before a
#                  change: interleaved with cowfs in the same rounds)
#                  (default: kernel,cowfs,fuse-overlayfs; ratios need kernel)
#   --only LIST    comma-separated subset of the steps below (default: all)
#
# Environment: XENOD (binary, default target/release/xenod: build it with
#   `cargo build --release -p xenod`), XENOD_B (the binary of tool
#   cowfs-b), ROUNDS, XENOD_FIXTURES (fixture cache
#   root), STEP_TIMEOUT (seconds per timed command, default 600), TMPDIR
#   (where the work directory goes; about 4 GB).
#
# Layers (built once per run): the template is Debian bookworm minbase (T1
# of fixtures/build-debian-trees.sh) plus srv/bench/big-1g and big-100m
# (random bytes, seeded); the overlay is T1 + apache2 (O1) diffed against it.
# xenod publishes the template and creates the overlay in a fresh store;
# `xenod export --layer-only` writes each layer to a directory in overlayfs
# format, which the kernel and fuse-overlayfs get as lowerdir=overlay:template.
# Every mount has a fresh, empty upper directory on the same disk.
#
# Steps (cold: `sync; echo 3 > /proc/sys/vm/drop_caches`, then a fresh mount
# for every tool; warm: the same command again on that mount):
#
#   tar        tar -C MNT --exclude=./srv/bench -cf - . | cat >/dev/null, cold and
#              warm (the big files are left to the seqread step)
#   stat       find MNT -printf '%i %n %s %m %U %G %T@ %p\n' | cat >/dev/null
#              (one lstat per entry), cold and warm
#   seqread    dd if=MNT/srv/bench/big-1g bs=1M of=/dev/null, cold and warm
#   append     printf x >> MNT/srv/bench/big-100m (copy-up of a 100 MiB lower
#              file), on a fresh mount after dropping caches
#   create     10,000 files of 1 KiB in a new directory (bash builtins only,
#              so no process is started per file), on a fresh mount
#   upper      10,000 files of 1 KiB in 100 directories at depth 3, made
#              (not timed) on a fresh mount; then unmounted, caches dropped,
#              mounted again on the same upper and timed: find + stat of
#              them (cold lookups of upper files) and rm -rf of them
#
# Each round runs every step for every tool, the tools in an order rotated
# per round; medians are taken over rounds. Times are wall clock of the step
# alone (mounting is not timed). Markdown with medians and the ratio of each
# tool to the kernel goes to stdout, progress to stderr. The machine may be
# shared with other work: compare the ratios of one run, not absolute times.
# Exit status: 0 when every selected tool ran every step; 1 otherwise.
set -euo pipefail
export LC_ALL=C LANG=C

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$ROOT"

ROUNDS=${ROUNDS:-5}
TOOLS=kernel,cowfs,fuse-overlayfs
ONLY=tar,stat,seqread,append,create,upper
OUT=""
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
XENOD=${XENOD:-target/release/xenod}
FIXDIR=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/debian

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --rounds=*) ROUNDS=${1#--rounds=}; shift ;;
    --tools) TOOLS=$2; shift 2 ;;
    --tools=*) TOOLS=${1#--tools=}; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cowfs-vs-overlayfs: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "cowfs-vs-overlayfs: bad round count: $ROUNDS" >&2; exit 2; }
case $XENOD in /*) ;; *) XENOD=$ROOT/$XENOD ;; esac
XENOD_B=${XENOD_B:-}
case $XENOD_B in /*|"") ;; *) XENOD_B=$ROOT/$XENOD_B ;; esac
if [ -n "$OUT" ]; then
  case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
fi

log() { printf '[cowfs-vs-overlayfs %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

declare -A WANT=() STEP=() FAILED=()
IFS=, read -r -a _sel <<<"$TOOLS"
for t in "${_sel[@]}"; do
  case $t in
    kernel|cowfs|cowfs-nopt|cowfs-dev|cowfs-ro|kernel-ro|fuse-overlayfs|cowfs-b) WANT[$t]=1 ;;
    *) echo "cowfs-vs-overlayfs: unknown tool: $t (kernel,cowfs,cowfs-nopt,cowfs-dev,cowfs-ro,kernel-ro,fuse-overlayfs,cowfs-b)" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a _sel <<<"$ONLY"
for s in "${_sel[@]}"; do
  case $s in
    tar|stat|seqread|append|create|upper) STEP[$s]=1 ;;
    *) echo "cowfs-vs-overlayfs: unknown step: $s (tar,stat,seqread,append,create,upper)" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (mounts, drop_caches)"
[ -e /dev/fuse ] || die "/dev/fuse is missing: cowfs and fuse-overlayfs cannot mount"
[ -x "$XENOD" ] || die "xenod binary not found at $XENOD (cargo build --release -p xenod, or set XENOD=...)"
[ -z "${WANT[cowfs-b]:-}" ] || [ -x "$XENOD_B" ] || die "tool cowfs-b needs XENOD_B=path of a xenod binary"
need() { command -v "$1" >/dev/null || die "missing tool: $1 (see scripts/install-deps.sh)"; }
need timeout; need tar; need find; need awk; need dd; need jq; need mountpoint
[ -z "${WANT[fuse-overlayfs]:-}" ] || need fuse-overlayfs
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
# cowfs takes requests over FUSE's io_uring transport where the kernel has it.
bash "$ROOT/scripts/enable-fuse-uring.sh"
URING=$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo absent)
if [ -n "${WANT[kernel]:-}${WANT[kernel-ro]:-}" ] && ! grep -qw overlay /proc/filesystems; then
  die "the kernel has no overlay filesystem"
fi

# --- fixtures, layers, work directory ---------------------------------------

log "fixtures: $FIXDIR"
"$ROOT/fixtures/build-debian-trees.sh" "$FIXDIR" >&2
T1=$FIXDIR/T1 O1=$FIXDIR/O1

W=$(mktemp -d "${TMPDIR:-/var/tmp}/xenod-cowfs-bench.XXXXXX")
MNT=$W/mnt
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; fi
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
RAW=$W/raw.tsv
: >"$RAW"
D=$W/store
mkdir -p "$MNT" "$W/src"

# Seeded random bytes: the same files every run.
seeded() {  # SEED BYTES; openssl is stopped by SIGPIPE once head has enough
  { openssl enc -aes-256-ctr -nosalt -pass pass:"$1" -pbkdf2 </dev/zero 2>/dev/null || true; } | head -c "$2"
}
need openssl

log "building the layers in $W"
cp -al "$T1" "$W/src/base"
mkdir -p "$W/src/base/srv/bench"
seeded xenod-bench-1g $((1 << 30)) >"$W/src/base/srv/bench/big-1g"
seeded xenod-bench-100m $((100 << 20)) >"$W/src/base/srv/bench/big-100m"
cp -al "$O1" "$W/src/over"
mkdir -p "$W/src/over/srv/bench"
ln "$W/src/base/srv/bench/big-1g" "$W/src/base/srv/bench/big-100m" "$W/src/over/srv/bench/"
BASE=$("$XENOD" --data-dir "$D" --json publish "$W/src/base" | jq -r .id)
OVER=$("$XENOD" --data-dir "$D" --json overlay create --base "$BASE" "$W/src/over" | jq -r .id)
[[ $BASE =~ ^[0-9a-f]{64}$ && $OVER =~ ^[0-9a-f]{64}$ ]] || die "publishing the layers gave no ids ($BASE, $OVER)"
"$XENOD" --data-dir "$D" export --layer-only "$BASE" "$W/lower-base" >&2
"$XENOD" --data-dir "$D" export --layer-only "$OVER" "$W/lower-over" >&2
rm -rf --one-file-system "$W/src"
LOWER=$W/lower-over:$W/lower-base
ENTRIES=$(find "$W/lower-base" "$W/lower-over" | wc -l)
log "template $BASE, overlay $OVER ($ENTRIES entries in the exported layers)"

# --- mounts -----------------------------------------------------------------

fresh_upper() {
  rm -rf --one-file-system "$W/upper" "$W/work"
  mkdir -p "$W/upper" "$W/work"
}

do_mount() {  # TOOL [keep: mount on the upper left by the last mount]
  [ "${2:-}" = keep ] || fresh_upper
  case $1 in
    kernel) mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$W/upper,workdir=$W/work" "$MNT" ;;
    fuse-overlayfs) fuse-overlayfs -o "lowerdir=$LOWER,upperdir=$W/upper,workdir=$W/work" "$MNT" ;;
    cowfs) "$XENOD" --data-dir "$D" mount "$OVER" "$MNT" --upper "$W/upper" >/dev/null ;;
    cowfs-b) "$XENOD_B" --data-dir "$D" mount "$OVER" "$MNT" --upper "$W/upper" >/dev/null ;;
    cowfs-nopt) "$XENOD" --data-dir "$D" mount "$OVER" "$MNT" --upper "$W/upper" --no-passthrough >/dev/null ;;
    cowfs-dev) "$XENOD" --data-dir "$D" mount "$OVER" "$MNT" --upper "$W/upper" --no-uring >/dev/null ;;
    cowfs-ro) "$XENOD" --data-dir "$D" mount "$OVER" "$MNT" >/dev/null ;;
    kernel-ro) mount -t overlay overlay -o "ro,lowerdir=$LOWER" "$MNT" ;;
  esac
  mountpoint -q "$MNT" || die "$1 did not mount on $MNT"
}

do_umount() {
  local i
  for i in $(seq 50); do
    mountpoint -q "$MNT" || return 0
    umount "$MNT" 2>/dev/null && return 0
    sleep 0.1
  done
  die "cannot unmount $MNT"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

ELAPSED=0
timed() {  # FUNCTION ; runs an exported shell function; sets ELAPSED (seconds)
  local t0 t1 rc=0
  t0=$EPOCHREALTIME
  timeout "$STEP_TIMEOUT" bash -c "$1" || rc=$?
  t1=$EPOCHREALTIME
  ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", b - a}')
  return "$rc"
}
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }  # tool metric round value

op_tar() { bash -c 'set -o pipefail; tar -C "$1" --exclude=./srv/bench -cf - . | cat >/dev/null' _ "$MNT"; }
op_stat() { bash -c "set -o pipefail; find \"\$1\" -printf '%i %n %s %m %U %G %T@ %p\n' | cat >/dev/null" _ "$MNT"; }
op_seqread() { dd if="$MNT/srv/bench/big-1g" of=/dev/null bs=1M status=none; }
op_append() { bash -c 'printf x >>"$1"' _ "$MNT/srv/bench/big-100m"; }
op_create() {
  bash -c 'set -e; mkdir "$1"; kb=$(printf "%1024s" ""); for ((i = 0; i < 10000; i++)); do printf "%s" "$kb" >"$1/f$i"; done' _ "$MNT/bench-create"
}

op_mktree() {
  bash -c 'set -e; kb=$(printf "%1024s" ""); for ((d = 0; d < 100; d++)); do
    mkdir -p "$1/a/b/d$d"; for ((i = 0; i < 100; i++)); do printf "%s" "$kb" >"$1/a/b/d$d/f$i"; done; done' _ "$MNT/bench-upper"
}
op_ustat() { bash -c "set -o pipefail; find \"\$1\" -printf '%i %n %s %m %U %G %T@ %p\n' | cat >/dev/null" _ "$MNT/bench-upper"; }
op_unlink() { rm -rf "$MNT/bench-upper"; }

export MNT
export -f op_tar op_stat op_seqread op_append op_create op_mktree op_ustat op_unlink

# Checks that a step did what it should, so a broken mount cannot post a fast time.
check() {  # STEP TOOL
  case $1 in
    seqread) [ "$(stat -c %s "$MNT/srv/bench/big-1g")" -eq $((1 << 30)) ] ;;
    append) [ "$(stat -c %s "$MNT/srv/bench/big-100m")" -eq $(((100 << 20) + 1)) ] &&
              [ "$(tail -c 1 "$MNT/srv/bench/big-100m")" = x ] ;;
    create) [ "$(find "$MNT/bench-create" -type f -size 1k | wc -l)" -eq 10000 ] ;;
    upper) [ ! -e "$MNT/bench-upper" ] && [ -z "$(find "$W/upper" -path "$W/upper/.xenod" -prune -o -name 'f*' -print)" ] ;;
    *) [ -e "$MNT/usr/sbin/apache2" ] && [ -e "$MNT/etc/debian_version" ] ;;
  esac || { log "$2: $1 left the tree in a wrong state"; return 1; }
}

run_step() {  # STEP TOOL ROUND
  local s=$1 t=$2 r=$3
  case $s:$t in append:*-ro|create:*-ro|upper:*-ro) return 0 ;; esac  # read-only mounts
  do_umount
  drop_caches
  do_mount "$t"
  if [ "$s" = upper ]; then
    if ! timed op_mktree; then log "$t: making the upper tree failed"; return 1; fi
    do_umount
    drop_caches
    do_mount "$t" keep
    [ "$(find "$MNT/bench-upper" -type f | wc -l)" -eq 10000 ] || { log "$t: the upper tree is not there again"; return 1; }
    do_umount
    drop_caches
    do_mount "$t" keep
    if ! timed op_ustat; then log "$t: find + stat of the upper tree failed"; return 1; fi
    record "$t" upper_stat "$r" "$ELAPSED"
    if ! timed op_unlink; then log "$t: rm -rf of the upper tree failed"; return 1; fi
    record "$t" unlink "$r" "$ELAPSED"
    check "$s" "$t"
    return
  fi
  if ! timed "op_$s"; then log "$t: $s failed"; return 1; fi
  case $s in
    tar|stat|seqread)
      record "$t" "${s}_cold" "$r" "$ELAPSED"
      if ! timed "op_$s"; then log "$t: $s (warm) failed"; return 1; fi
      record "$t" "${s}_warm" "$r" "$ELAPSED" ;;
    *) record "$t" "$s" "$r" "$ELAPSED" ;;
  esac
  check "$s" "$t"
}

ORDER=(kernel cowfs fuse-overlayfs cowfs-nopt cowfs-dev cowfs-ro kernel-ro cowfs-b)
STEPS=(tar stat seqread append create upper)
for ((r = 1; r <= ROUNDS; r++)); do
  for s in "${STEPS[@]}"; do
    [ -n "${STEP[$s]:-}" ] || continue
    for ((i = 0; i < ${#ORDER[@]}; i++)); do
      t=${ORDER[(i + r - 1) % ${#ORDER[@]}]}
      [ -n "${WANT[$t]:-}" ] && [ -z "${FAILED[$t]:-}" ] || continue
      log "round $r/$ROUNDS: $s on $t"
      if ! run_step "$s" "$t" "$r"; then
        FAILED[$t]=1
        log "$t failed in round $r; skipping it from now on"
      fi
    done
  done
done
do_umount

# --- report -----------------------------------------------------------------

med() {  # TOOL METRIC -> median of the recorded values, empty if none
  awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $2 == m {print $4}' "$RAW" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) exit; if (NR % 2) printf "%.12g\n", v[(NR + 1) / 2]; else printf "%.12g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
sec() { [ -n "$1" ] && awk -v v="$1" 'BEGIN {printf "%.3f", v}' || printf -- '-'; }
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else printf "-"}'; else printf -- '-'; fi; }
goal() {  # METRIC -> the goal for cowfs / kernel
  case $1 in
    seqread_*) echo 1.05 ;;
    tar_cold|stat_cold) echo 1.5 ;;
    tar_warm|stat_warm) echo 1.3 ;;
    append|create|upper_stat|unlink) echo 2 ;;
  esac
}
label() {
  case $1 in
    tar_cold) echo "tar of the tree, cold" ;;
    tar_warm) echo "tar of the tree, warm" ;;
    stat_cold) echo "find + stat, cold" ;;
    stat_warm) echo "find + stat, warm" ;;
    seqread_cold) echo "read 1 GiB file, cold" ;;
    seqread_warm) echo "read 1 GiB file, warm" ;;
    append) echo "append 1 byte to 100 MiB lower file" ;;
    create) echo "create 10,000 files of 1 KiB" ;;
    upper_stat) echo "find + stat of 10,000 upper files, cold" ;;
    unlink) echo "rm -rf of 10,000 upper files" ;;
  esac
}

{
  echo "## cowfs vs overlayfs (median of $ROUNDS rounds, seconds)"
  echo
  echo "Layers: template = Debian bookworm minbase + a 1 GiB and a 100 MiB random file; overlay = + apache2;"
  echo "$ENTRIES entries in the exported layers. Host: $(nproc) CPUs, $(uname -r), $(fuse-overlayfs --version 2>/dev/null | grep -m1 fuse-overlayfs || echo 'fuse-overlayfs ?'); FUSE over io_uring (fuse.enable_uring): $URING."
  for t in "${!FAILED[@]}"; do echo; echo "**$t FAILED; its numbers are partial or missing (see stderr).**"; done
  echo
  # Optional cowfs variants, each with its own columns.
  EXTRA=()
  for t in cowfs-nopt cowfs-dev cowfs-ro kernel-ro cowfs-b; do [ -z "${WANT[$t]:-}" ] || EXTRA+=("$t"); done
  xname() {
    case $1 in
      cowfs-nopt) echo "cowfs, no passthrough" ;;
      cowfs-dev) echo "cowfs, /dev/fuse" ;;
      cowfs-ro) echo "cowfs read-only" ;;
      kernel-ro) echo "kernel read-only" ;;
      cowfs-b) echo "cowfs-b ($(basename "$XENOD_B"))" ;;
    esac
  }
  h="| step | kernel | cowfs | fuse-overlayfs |"; sep="|---|---:|---:|---:|"
  for t in "${EXTRA[@]}"; do h+=" $(xname "$t") |"; sep+="---:|"; done
  h+=" cowfs / kernel | fuse-overlayfs / kernel |"; sep+="---:|---:|"
  for t in "${EXTRA[@]}"; do h+=" $(xname "$t") / kernel |"; sep+="---:|"; done
  echo "$h goal (cowfs / kernel) | met |"
  echo "$sep---:|---|"
  for m in tar_cold tar_warm stat_cold stat_warm seqread_cold seqread_warm append create upper_stat unlink; do
    k=$(med kernel "$m"); c=$(med cowfs "$m"); f=$(med fuse-overlayfs "$m")
    [ -n "$k$c$f" ] || continue
    g=$(goal "$m")
    met=$(awk -v k="$k" -v c="$c" -v f="$f" -v g="$g" 'BEGIN {
      if (k == "" || c == "") { print "-"; exit }
      ok = (c / k <= g); s = ok ? "yes" : "NO";
      if (f != "") s = s (c < f ? ", beats fuse-overlayfs" : ", NOT better than fuse-overlayfs");
      print s }')
    row="| $(label "$m") | $(sec "$k") | $(sec "$c") | $(sec "$f") |"
    for t in "${EXTRA[@]}"; do row+=" $(sec "$(med "$t" "$m")") |"; done
    row+=" $(ratio "$c" "$k") | $(ratio "$f" "$k") |"
    for t in "${EXTRA[@]}"; do row+=" $(ratio "$(med "$t" "$m")" "$k") |"; done
    echo "$row <= ${g}x | $met |"
  done
}

if [ -n "$OUT" ]; then
  {
    printf '{"rounds":%s,"date":"%s","host":{"cpus":%s,"kernel":"%s"},"failed":[%s],"results":[' \
      "$ROUNDS" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$(uname -r)" \
      "$(for t in "${!FAILED[@]}"; do printf '"%s"\n' "$t"; done | paste -sd, -)"
    first=1
    while IFS=$'\t' read -r tool metric; do
      raw=$(awk -F'\t' -v t="$tool" -v m="$metric" '$1 == t && $2 == m {print $4}' "$RAW" | paste -sd, -)
      [ $first -eq 1 ] || printf ','
      first=0
      printf '{"tool":"%s","metric":"%s","unit":"s","values":[%s],"median":%s}' \
        "$tool" "$metric" "$raw" "$(med "$tool" "$metric")"
    done < <(cut -f1,2 "$RAW" | sort -u)
    printf ']}\n'
  } >"$OUT.tmp"
  mv -f "$OUT.tmp" "$OUT"
  log "raw numbers: $OUT"
fi

[ ${#FAILED[@]} -eq 0 ]
