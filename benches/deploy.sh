#!/usr/bin/env bash
# Deploy-to-answer time with the template cached, broken down by step, and
# resume-to-answer time of a suspended disk-root guest. The guest's own
# boot (QEMU start to its "ready" line) is reported apart, so xenod's own
# overhead is visible. Usage: benches/deploy.sh [ROUNDS]  (needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-${ROUNDS:-3}}
XENOD=${XENOD:-$PWD/target/release/xenod}
[ -x "$XENOD" ] || cargo build --release --locked -p xenod
FIX=${XENOD_FIXTURES:-/var/cache/xenod-fixtures}/guest
bash fixtures/build-guest.sh "$FIX" >/dev/null
bash scripts/start-libvirtd.sh >/dev/null
W=$(mktemp -d)
D=$W/data
x() { "$XENOD" --data-dir "$D" "$@"; }
cleanup() { for n in $(x ps --json 2>/dev/null | jq -r '.instances[].name'); do x destroy "$n" >/dev/null 2>&1 || true; done; rm -rf "$W"; }
trap cleanup EXIT

mkdir -p "$W/t/boot" "$W/disk/boot" "$W/disk/disk"
cp -a "$FIX/template/." "$W/t/"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$W/t/boot/"
cp "$FIX/kernel/vmlinux" "$FIX/kernel/initrd.img" "$W/disk/boot/"
cp "$FIX/disk/root.img" "$W/disk/disk/"
x publish "$W/t" --name template://bench/os/1 >/dev/null
cp -a "$W/t" "$W/web" && cp -a "$FIX/web/." "$W/web/"
x overlay create --base template://bench/os/1 "$W/web" --spec fixtures/guest/web.spec.json --name template://bench/web/1 >/dev/null
echo '{"kernel":"stack:boot/vmlinux","initrd":"stack:boot/initrd.img","root":"disk","disk_image":"disk/root.img","ports":["0:80"]}' > "$W/disk.json"
x publish "$W/disk" --spec "$W/disk.json" --name template://bench/disk/1 >/dev/null

echo "| round | root | resolve+fetch | instance layer | mount | define+start | guest boot | service answers | total | xenod's own |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  for kind in web disk; do
    n="b$kind$r"
    j=$(x deploy "template://bench/$kind/1" --name "$n" --json)
    echo "$j" | jq -r --arg r "$r" --arg k "$kind" '.instances[0].timeline as $t
      | ($t | map({(.step): .seconds}) | add) as $s
      | ($s["resolve"] // 0) as $res
      | ($s["fetch (layers local)"] // 0) as $f
      | "| \($r) | \($k) | \($res + $f | .*1000 | round)ms | \($s["instance layer"]*1000 | round)ms | \($s["mount"]*1000 | round)ms | \($s["define + start"] | .*100 | round / 100)s | \($s["guest booted"] | .*100 | round / 100)s | \($s["service answers"]*1000 | round)ms | \($t | map(.seconds) | add | .*100 | round / 100)s | \($res + $f + $s["instance layer"] + $s["mount"] | .*1000 | round)ms |"'
    if [ "$kind" = disk ]; then
      port=$(echo "$j" | jq -r '.instances[0].port')
      curl -sf "http://127.0.0.1:$port/" >/dev/null
      s=$(date +%s.%N); x suspend "$n" >/dev/null; m=$(date +%s.%N)
      x resume "$n" >/dev/null
      until curl -sf --max-time 2 "http://127.0.0.1:$port/" >/dev/null; do sleep 0.05; done
      e=$(date +%s.%N)
      printf '| %s | disk | suspend %.2fs | resume to answer %.2fs |||||||\n' "$r" "$(echo "$m - $s" | bc)" "$(echo "$e - $m" | bc)"
    fi
    x destroy "$n" >/dev/null
  done
done
echo
echo "xenod's own = resolve + fetch + instance layer + mount; define+start is libvirt starting QEMU;"
echo "guest boot is the kernel and init under $([ -e /sys/module/kvm_pvm ] && echo "QEMU TCG (kvm_pvm host)" || echo "the probed accelerator")."
