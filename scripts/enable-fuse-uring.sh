#!/usr/bin/env bash
# Lets FUSE servers take requests over io_uring (Linux 6.14+): sets the fuse
# module's enable_uring parameter, which is off by default. A host setting,
# like qemu.conf for libvirt: mounts made afterwards use it (xenod mount
# --no-uring opts out per mount); mounts made before keep /dev/fuse.
#
# Exit status 0 also when the kernel lacks the transport: xenod then serves
# through /dev/fuse, as before. Needs root to change the setting.
set -euo pipefail
p=/sys/module/fuse/parameters/enable_uring
modprobe fuse 2>/dev/null || true   # fails harmlessly where fuse is built in
if [ ! -e "$p" ]; then
    echo "enable-fuse-uring: this kernel has no FUSE over io_uring ($p missing); FUSE uses /dev/fuse" >&2
    exit 0
fi
if [ "$(cat "$p")" = Y ]; then
    exit 0
fi
if echo Y >"$p" 2>/dev/null; then
    echo "enable-fuse-uring: FUSE over io_uring enabled ($p)" >&2
else
    echo "enable-fuse-uring: could not write $p (not root?); FUSE uses /dev/fuse" >&2
fi
