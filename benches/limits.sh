#!/usr/bin/env bash
# What limits and accounting cost, side by side in one run (needs root):
#  1. the cowfs write path: a plain writable mount (upper files passed
#     through to the kernel), one without passthrough (every write served
#     by the mount, as in an instance's mount, which tracks changes), and
#     one with an upper quota (every write served and its blocks counted);
#     a sequential write and many small files, interleaved in every round;
#  2. deploy-to-answer of the fixture's web guest, with the daemon
#     accounting, without and with limits (CPU quota and shares, an upper
#     quota), interleaved;
#  3. one accounting sample: `xenod usage` (a sample of every instance,
#     then the report) with a guest running, and the daemon's CPU per call.
# Usage: benches/limits.sh [ROUNDS]   (ROUNDS: 5; WRITE_MIB: 256; FILES: 3000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-${ROUNDS:-5}}
WRITE_MIB=${WRITE_MIB:-256}
FILES=${FILES:-3000}
XENOD=${XENOD:-$PWD/target/release/xenod}
[ -x "$XENOD" ] || cargo build --release --locked -p xenod
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX" >/dev/null
bash scripts/start-libvirtd.sh >/dev/null
W=$(mktemp -d /var/tmp/xenod-limits.XXXXXX)
D=$W/data
mkdir -p "$D"
x() { "$XENOD" --data-dir "$D" "$@"; }
DAEMON=
cleanup() {
  for m in "$W"/mnt-*; do [ -d "$m" ] && x umount "$m" >/dev/null 2>&1 || true; done
  for n in $(x ps --json 2>/dev/null | jq -r '.instances[].name'); do x destroy "$n" >/dev/null 2>&1 || true; done
  [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
range() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f-%.2f", lo, hi}'; }
now() { date +%s.%N; }

mkdir -p "$W/t/boot"
cp -a "$FIX/template/." "$W/t/"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$W/t/boot/"
x publish "$W/t" --name template://bench/os/1 >/dev/null
cp -a "$W/t" "$W/web" && cp -a "$FIX/web/." "$W/web/"
x overlay create --base template://bench/os/1 "$W/web" --spec fixtures/guest/web.spec.json --name template://bench/web/1 >/dev/null

echo "## 1. cowfs write path ($ROUNDS rounds, interleaved; seconds)"
declare -A T
variants=(passthrough no-passthrough quota)
for r in $(seq 1 "$ROUNDS"); do
  for v in "${variants[@]}"; do
    m=$W/mnt-$v u=$W/up-$v
    rm -rf "$m" "$u"; mkdir -p "$m" "$u"
    case $v in
      passthrough) x mount template://bench/os/1 "$m" --upper "$u" >/dev/null ;;
      no-passthrough) x mount template://bench/os/1 "$m" --upper "$u" --no-passthrough >/dev/null ;;
      quota) x mount template://bench/os/1 "$m" --upper "$u" --upper-quota $((4 << 30)) >/dev/null ;;
    esac
    sync; echo 3 > /proc/sys/vm/drop_caches
    s=$(now); dd if=/dev/zero of="$m/big" bs=1M count="$WRITE_MIB" conv=fsync status=none; e=$(now)
    T[$v,seq]+="$(echo "$e - $s" | bc) "
    s=$(now)
    python3 - "$m/small" "$FILES" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
buf = b"x" * 4096
for i in range(n):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(buf)
EOF
    e=$(now)
    T[$v,small]+="$(echo "$e - $s" | bc) "
    x umount "$m" >/dev/null
  done
done
echo "| variant | write ${WRITE_MIB} MiB + fsync | MB/s | create $FILES files of 4 KiB | files/s |"
echo "|---|---:|---:|---:|---:|"
for v in "${variants[@]}"; do
  sq=$(echo "${T[$v,seq]}" | tr ' ' '\n' | grep . | median)
  sm=$(echo "${T[$v,small]}" | tr ' ' '\n' | grep . | median)
  printf '| %s | %.3f (%s) | %.0f | %.3f (%s) | %.0f |\n' "$v" "$sq" "$(echo "${T[$v,seq]}" | tr ' ' '\n' | grep . | range)" \
    "$(echo "$WRITE_MIB * 1.048576 / $sq" | bc -l)" "$sm" "$(echo "${T[$v,small]}" | tr ' ' '\n' | grep . | range)" \
    "$(echo "$FILES / $sm" | bc -l)"
done

echo
echo "## 2. deploy to answer ($ROUNDS rounds, interleaved; seconds)"
printf 'domain_prefix = "benchlim-"\nusage_interval_secs = 10\n' > "$D/config.toml"
"$XENOD" --data-dir "$D" serve >/dev/null 2>&1 &
DAEMON=$!
until [ -S "$D/xenod.sock" ]; do sleep 0.1; done
declare -A DT
dvariants=(no-limits limits)
for r in $(seq 1 "$ROUNDS"); do
  for v in "${dvariants[@]}"; do
    n="l$r-$v"
    extra=()
    [ "$v" = limits ] && extra=(--cpu-quota 100 --cpu-shares 512 --upper-quota 256)
    s=$(now)
    x deploy template://bench/web/1 --name "$n" "${extra[@]}" --json >/dev/null
    e=$(now)
    DT[$v]+="$(echo "$e - $s" | bc) "
    x destroy "$n" >/dev/null
  done
done
echo "| variant | deploy to answer | rounds |"
echo "|---|---:|---|"
for v in "${dvariants[@]}"; do
  printf '| %s | %.2f | %s |\n' "$v" "$(echo "${DT[$v]}" | tr ' ' '\n' | grep . | median)" "${DT[$v]}"
done

echo
echo "## 3. one accounting sample (a guest running)"
x deploy template://bench/web/1 --name lsample --json >/dev/null
cpu() { awk '{print $14 + $15}' "/proc/$DAEMON/stat"; }
c0=$(cpu); ts=()
for i in $(seq 1 20); do s=$(now); x usage --json >/dev/null; e=$(now); ts+=("$(echo "$e - $s" | bc)"); done
c1=$(cpu)
hz=$(getconf CLK_TCK)
printf '`xenod usage` (sample + report), median of 20: %.1f ms; daemon CPU %.1f ms per call\n' \
  "$(printf '%s\n' "${ts[@]}" | median | awk '{print $1 * 1000}')" "$(echo "($c1 - $c0) * 1000 / $hz / 20" | bc -l)"
x destroy lsample >/dev/null
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
