#!/usr/bin/env bash
# Does xenod's Debian package install on a clean Debian? Builds the .deb,
# makes a minimal chroot of this machine's Debian release from this
# machine's own apt sources (mmdebstrap; no mirror is named here), installs
# the .deb in it with apt (which pulls libvirt, fuse3 and QEMU), and checks
# there: `xenod --version`, `systemd-analyze verify` of the installed unit
# (its man pages included), the unit enabled, the data dir's config
# created from the packaged example, and `xenod ls` on that data dir.
# Prints the time of each step, the .deb's size and what apt installed.
#
#   bash scripts/check-package.sh          # release build first (minutes)
#   bash scripts/check-package.sh --dev    # package the debug build as it is
#   ... --keep                             # leave the chroot for a look
#
# Not in CI: it fetches and unpacks a few hundred MB of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "check-package: run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

build=() keep=no
for a in "$@"; do
  case $a in
    --dev) build=(--dev) ;;
    --keep) keep=yes ;;
    *) echo "usage: $0 [--dev] [--keep]" >&2; exit 2 ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive
if ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi
. /etc/os-release
suite=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}

# This machine's apt sources and the Acquire:: options they need (a
# snapshot mirror's Release files are past their Valid-Until), as files:
# mmdebstrap copies them into the chroot.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] && grep -qv '^\s*\(#\|$\)' "$f" && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || { echo "check-package: no apt sources in /etc/apt" >&2; exit 1; }
aptopts=()
for f in /etc/apt/apt.conf.d/*; do
  grep -q '^Acquire::' "$f" 2>/dev/null && aptopts+=(--aptopt="$f")
done

work=$(mktemp -d "${TMPDIR:-/var/tmp}/xenod-check-package.XXXXXX")
root=$work/root
cleanup() {
  if [ "$keep" = yes ]; then echo "check-package: chroot kept in $root" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
took() { printf '%.1f s' "$(echo "$(now) - $1" | bc)"; }

t=$(now)
deb=$(bash scripts/build-deb.sh "${build[@]}" | tail -1)
echo "== .deb: $deb, $(stat -c %s "$deb") bytes, built in $(took "$t")"

t=$(now)
mmdebstrap --quiet --variant=apt "${aptopts[@]}" "$suite" "$root" "${sources[@]}"
echo "== chroot ($suite, variant apt): $(dpkg-query --admindir="$root/var/lib/dpkg" -W | wc -l) packages, $(du -sh "$root" | cut -f1), made in $(took "$t")"

# In the chroot, with its own /proc and /dev in a private mount namespace
# (they go when it ends), no service started by package scripts
# (policy-rc.d), and this machine's DNS.
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$deb" "$root/tmp/xenod.deb"
in_root() {
  unshare --mount --fork sh -c 'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && shift && exec chroot "$@"' \
    sh "$root" "$root" "$@"
}
before=$(dpkg-query --admindir="$root/var/lib/dpkg" -W | wc -l)
t=$(now)
# mmdebstrap leaves no package lists behind: fetch them again.
in_root apt-get update -qq >"$work/apt.log" 2>&1 &&
in_root apt-get install -y -qq --no-install-recommends /tmp/xenod.deb >>"$work/apt.log" 2>&1 || {
  tail -30 "$work/apt.log" >&2
  exit 1
}
after=$(dpkg-query --admindir="$root/var/lib/dpkg" -W | wc -l)
echo "== apt-get install ./xenod.deb: $((after - before)) packages in $(took "$t"); chroot now $(du -sh "$root" | cut -f1)"
dpkg-query --admindir="$root/var/lib/dpkg" -W libvirt-daemon-system qemu-system-x86 fuse3 systemd 2>&1 | sed 's/^/   /'

echo "== checks in the chroot"
in_root xenod --version
# The unit's Documentation= man pages are checked too: man-db reads them.
in_root apt-get install -y -qq --no-install-recommends systemd man-db >>"$work/apt.log" 2>&1
in_root systemd-analyze verify /usr/lib/systemd/system/xenod.service
echo "systemd-analyze verify xenod.service: ok"
[ -L "$root/etc/systemd/system/multi-user.target.wants/xenod.service" ]
echo "xenod.service enabled (multi-user.target.wants)"
cmp "$root/usr/share/xenod/config.toml" "$root/var/lib/xenod/config.toml"
echo "/var/lib/xenod/config.toml: the packaged example"
in_root xenod --data-dir /var/lib/xenod --json ls >/dev/null
echo "xenod ls on /var/lib/xenod: ok (the packaged config parses)"
in_root bash -c '. /usr/share/bash-completion/completions/xenod && complete -p xenod' >/dev/null
echo "bash completion loads"
echo "== ok"
