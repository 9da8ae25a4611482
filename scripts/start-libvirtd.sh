#!/usr/bin/env bash
# Starts libvirt's QEMU driver for xenod on a host without systemd (this
# development machine and CI), after making qemu.conf fit xenod's guests.
# Idempotent: a running, configured libvirtd is left alone and the script
# only checks that `virsh -c qemu:///system list` answers.
#
#   1. qemu.conf: appends one marked block (see XENOD_BLOCK below) unless it
#      is already there. QEMU then runs as root, because xenod's fs-root
#      guests share a tree of root-owned files over virtio-9p in passthrough
#      mode; as libvirt's default user `libvirt-qemu` the guest's writes to
#      those files fail. XENOD_LIBVIRT_QEMU_ROOT=0 skips this (fs-root guests
#      then need accessmode='mapped' and a tree owned by libvirt-qemu).
#   2. virtlogd -d (libvirt's log daemon: serial console and QEMU logs), then
#      libvirtd -d (Debian 12 ships only the monolithic daemon), each only
#      when not running. A libvirtd that was running with the old qemu.conf
#      is restarted by its pid (running guests survive a libvirtd restart).
#   3. waits (at most XENOD_LIBVIRT_TIMEOUT seconds, default 30) until
#      `virsh -c qemu:///system list` works.
#
# Normal hosts with systemd do not need this script for step 2:
#   systemctl enable --now virtlogd.socket libvirtd.socket   # monolithic
#   # or, with the modular daemons (libvirt >= 7 on Fedora/Debian 13):
#   systemctl enable --now virtqemud.socket virtlogd.socket
#   systemctl restart libvirtd   # (or virtqemud) after editing qemu.conf
# and on Xen hosts virtxend.socket (or libvirtd with libxl) instead of QEMU.
#
# Needs root. Exit status 0 when qemu:///system answers.
set -euo pipefail
export LC_ALL=C
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "start-libvirtd: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
# The daemons outlive this script: they must not keep a descriptor it
# inherited (a build lock held through flock(1), a test's pipe), or whoever
# waits on it waits for them. Bash's own copy of the script (255) stays.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" != 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
for tool in libvirtd virtlogd virsh; do
    command -v "$tool" >/dev/null ||
        die "missing $tool: run scripts/install-deps.sh (libvirt-daemon-system, libvirt-clients)"
done

QEMU_CONF=${XENOD_QEMU_CONF:-/etc/libvirt/qemu.conf}
TIMEOUT=${XENOD_LIBVIRT_TIMEOUT:-30}
LIBVIRTD_PIDFILE=/run/libvirtd.pid
VIRTLOGD_PIDFILE=/run/virtlogd.pid
MARK_BEGIN='# >>> xenod (scripts/start-libvirtd.sh) >>>'
MARK_END='# <<< xenod <<<'

# Serialize concurrent callers (tests start this from several processes). The
# daemons must not inherit the lock (9>&- below).
exec 9>/run/xenod-start-libvirtd.lock
flock -w "$TIMEOUT" 9 || die "another start-libvirtd.sh holds the lock"

# The pid in PIDFILE, if that process is alive and is PROG.
running_pid() { # PIDFILE PROG
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" = "$2" ] || return 1
    echo "$pid"
}

# --- 1. qemu.conf --------------------------------------------------------------

changed=
xenod_block() {
    cat <<EOF
$MARK_BEGIN
# QEMU as root: xenod's fs-root guests share root-owned trees over virtio-9p
# with accessmode='passthrough'; as libvirt-qemu their writes would fail.
user = "root"
group = "root"
# Do not remember files' owners in xattrs before relabelling them: on a
# cowfs union that xattr copies each file (the guest's kernel and initrd)
# into the instance's upper layer. With QEMU as root no owner changes.
remember_owner = 0
$MARK_END
EOF
}
if [ "${XENOD_LIBVIRT_QEMU_ROOT:-1}" = 1 ]; then
    # grep finds nothing on a fresh qemu.conf: that is not an error here.
    begin=$(grep -nxF "$MARK_BEGIN" "$QEMU_CONF" | head -1 | cut -d: -f1 || true)
    end=$(grep -nxF "$MARK_END" "$QEMU_CONF" | head -1 | cut -d: -f1 || true)
    have=
    if [ -n "$begin" ] && [ -n "$end" ] && [ "$begin" -lt "$end" ]; then
        have=$(sed -n "${begin},${end}p" "$QEMU_CONF")
    fi
    if [ "$have" != "$(xenod_block)" ]; then
        if [ -n "$have" ]; then
            log "updating xenod's settings in $QEMU_CONF"
            sed -i "${begin},${end}d" "$QEMU_CONF"
        else
            # Settings must not be set twice in qemu.conf; refuse rather than guess.
            if grep -qE '^\s*(user|group|remember_owner)\s*=' "$QEMU_CONF"; then
                die "$QEMU_CONF already sets user/group/remember_owner; remove them or set XENOD_LIBVIRT_QEMU_ROOT=0"
            fi
            log "configuring $QEMU_CONF: QEMU runs as root (9p passthrough of root-owned trees)"
        fi
        xenod_block >>"$QEMU_CONF"
        changed=1
    fi
fi

# --- 2. daemons ------------------------------------------------------------------

if ! running_pid "$VIRTLOGD_PIDFILE" virtlogd >/dev/null; then
    log "starting virtlogd"
    virtlogd -d -p "$VIRTLOGD_PIDFILE" 9>&-
fi

if pid=$(running_pid "$LIBVIRTD_PIDFILE" libvirtd); then
    if [ -n "$changed" ]; then
        log "restarting libvirtd (pid $pid) to read the new qemu.conf"
        kill -TERM "$pid"
        for _ in $(seq $((TIMEOUT * 10))); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        [ ! -d "/proc/$pid" ] || die "libvirtd (pid $pid) did not exit"
        libvirtd -d -p "$LIBVIRTD_PIDFILE" 9>&-
    fi
else
    log "starting libvirtd"
    libvirtd -d -p "$LIBVIRTD_PIDFILE" 9>&-
fi

# --- 3. wait -----------------------------------------------------------------------

deadline=$((SECONDS + TIMEOUT))
until err=$(virsh -c qemu:///system list 2>&1 >/dev/null); do
    [ $SECONDS -lt $deadline ] || die "qemu:///system does not answer after ${TIMEOUT} s: $err"
    sleep 0.1
done
log "qemu:///system answers"
