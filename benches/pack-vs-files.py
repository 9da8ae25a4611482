#!/usr/bin/env python3
"""Why the store writes pack files: the cost of one file (and one fsync) per
chunk against one pack synced once, for a minbase-sized publish (about 6000
chunks of 8.5 KB after compression). Usage: benches/pack-vs-files.py [DIR]"""
import os
import shutil
import sys
import tempfile
import time

N, SIZE = 6000, 8500
base = tempfile.mkdtemp(dir=sys.argv[1] if len(sys.argv) > 1 else None)
data = os.urandom(SIZE)


def fsync_dir(p):
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def per_file(sync):
    d = os.path.join(base, f"objects-{sync}")
    for sub in range(256):
        os.makedirs(f"{d}/{sub:02x}")
    t = time.time()
    for i in range(N):
        p = f"{d}/{i % 256:02x}/{i:08x}"
        with open(p + ".tmp", "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(p + ".tmp", p)
    if sync:
        for sub in range(256):
            fsync_dir(f"{d}/{sub:02x}")
    return time.time() - t


def pack():
    t = time.time()
    p = os.path.join(base, "pack")
    with open(p + ".tmp", "wb") as f:
        for _ in range(N):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(p + ".tmp", p)
    fsync_dir(base)
    return time.time() - t


try:
    a, b, c = per_file(True), pack(), per_file(False)
    print(f"{N} chunks of {SIZE} B: file per chunk with fsync {a:.2f} s, "
          f"without fsync {c:.2f} s, one pack synced once {b:.2f} s")
finally:
    shutil.rmtree(base)
