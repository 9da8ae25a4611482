//! What this process's mounts did, for the daemon's metrics: FUSE requests
//! by opcode with their latency (counted in `fuser`), chunk and file cache
//! hits and misses, and lazy fetches (a read that waited for a chunk).
//!
//! The counters are process-wide atomics, as fuser's are: a `xenod mount`
//! process serves one mount, and counting must cost the FUSE path nothing
//! but relaxed adds (no lock, no allocation).
//!
//! A mount serves them on a Unix socket ([`MountOptions::stats`]): each
//! connection gets one snapshot and is closed. The wire is text, one
//! `KEY VALUE...` per line:
//!
//! ```text
//! xenod-mount-stats 1
//! mountpoint /mnt/look                 the rest of the line
//! chunk_cache_hits 12                  and the other counters
//! op read 40 1234567 3 30 7 0 ...      opcode, count, sum (ns), one count per bucket
//! lazy_latency 0 0 0 ...               sum (ns), one count per bucket
//! end
//! ```
//!
//! [`MountOptions::stats`]: crate::MountOptions::stats

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use fuser::{LATENCY_BOUNDS_NS, OpStats};

use crate::error::{Error, Result};

const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

pub(crate) struct Counters {
    pub(crate) chunk_hits: AtomicU64,
    pub(crate) chunk_misses: AtomicU64,
    pub(crate) file_hits: AtomicU64,
    pub(crate) file_misses: AtomicU64,
    lazy_stalls: AtomicU64,
    lazy_failed: AtomicU64,
    lazy_bytes: AtomicU64,
    lazy_sum_ns: AtomicU64,
    lazy_buckets: [AtomicU64; BUCKETS],
    /// Bytes answered to READ and taken by WRITE (what the mount's users
    /// read and wrote through FUSE; passthrough I/O never reaches here).
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
}

pub(crate) static COUNTERS: Counters = Counters {
    chunk_hits: AtomicU64::new(0),
    chunk_misses: AtomicU64::new(0),
    file_hits: AtomicU64::new(0),
    file_misses: AtomicU64::new(0),
    lazy_stalls: AtomicU64::new(0),
    lazy_failed: AtomicU64::new(0),
    lazy_bytes: AtomicU64::new(0),
    lazy_sum_ns: AtomicU64::new(0),
    lazy_buckets: [const { AtomicU64::new(0) }; BUCKETS],
    read_bytes: AtomicU64::new(0),
    written_bytes: AtomicU64::new(0),
};

#[inline]
pub(crate) fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to byte counter `c`.
#[inline]
pub(crate) fn bytes(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// A read waited `took` for a chunk the store lacked; `bytes` arrived (none: it failed).
pub(crate) fn lazy_fetch(took: Duration, bytes: Option<usize>) {
    let c = &COUNTERS;
    count(&c.lazy_stalls);
    match bytes {
        Some(b) => {
            c.lazy_bytes.fetch_add(b as u64, Ordering::Relaxed);
        }
        None => count(&c.lazy_failed),
    }
    let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
    c.lazy_sum_ns.fetch_add(ns, Ordering::Relaxed);
    let b = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
    c.lazy_buckets[b].fetch_add(1, Ordering::Relaxed);
}

/// A mount's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountStats {
    pub mountpoint: String,
    /// FUSE requests by opcode (only those seen).
    pub requests: Vec<OpStats>,
    pub chunk_cache_hits: u64,
    pub chunk_cache_misses: u64,
    /// Opens of lower files eligible for the file cache, found there or not.
    pub file_cache_hits: u64,
    pub file_cache_misses: u64,
    /// Reads that waited for a chunk fetched through the daemon.
    pub lazy_stalls: u64,
    pub lazy_failed: u64,
    pub lazy_bytes: u64,
    pub lazy_sum_ns: u64,
    /// Per bucket of [`LATENCY_BOUNDS_NS`], then the rest.
    pub lazy_buckets: Vec<u64>,
    /// Bytes read and written through FUSE (not through passthrough).
    pub read_bytes: u64,
    pub written_bytes: u64,
}

/// This process's counters, as served for `mountpoint`.
pub fn snapshot(mountpoint: &Path) -> MountStats {
    let c = &COUNTERS;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    MountStats {
        mountpoint: mountpoint.display().to_string(),
        requests: fuser::request_stats(),
        chunk_cache_hits: l(&c.chunk_hits),
        chunk_cache_misses: l(&c.chunk_misses),
        file_cache_hits: l(&c.file_hits),
        file_cache_misses: l(&c.file_misses),
        lazy_stalls: l(&c.lazy_stalls),
        lazy_failed: l(&c.lazy_failed),
        lazy_bytes: l(&c.lazy_bytes),
        lazy_sum_ns: l(&c.lazy_sum_ns),
        lazy_buckets: c.lazy_buckets.iter().map(l).collect(),
        read_bytes: l(&c.read_bytes),
        written_bytes: l(&c.written_bytes),
    }
}

impl MountStats {
    fn encode(&self, w: &mut impl Write) -> std::io::Result<()> {
        let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
        writeln!(w, "xenod-mount-stats 1")?;
        writeln!(w, "mountpoint {}", self.mountpoint.replace('\n', "?"))?;
        for (k, v) in [
            ("chunk_cache_hits", self.chunk_cache_hits),
            ("chunk_cache_misses", self.chunk_cache_misses),
            ("file_cache_hits", self.file_cache_hits),
            ("file_cache_misses", self.file_cache_misses),
            ("lazy_stalls", self.lazy_stalls),
            ("lazy_failed", self.lazy_failed),
            ("lazy_bytes", self.lazy_bytes),
            ("read_bytes", self.read_bytes),
            ("written_bytes", self.written_bytes),
        ] {
            writeln!(w, "{k} {v}")?;
        }
        for o in &self.requests {
            writeln!(w, "op {} {} {} {}", o.op, o.count, o.sum_ns, join(&o.buckets))?;
        }
        writeln!(w, "lazy_latency {} {}", self.lazy_sum_ns, join(&self.lazy_buckets))?;
        writeln!(w, "end")
    }

    fn decode(r: impl BufRead) -> std::result::Result<Self, String> {
        let mut s = MountStats::default();
        let mut lines = r.lines();
        match lines.next() {
            Some(Ok(l)) if l == "xenod-mount-stats 1" => {}
            other => return Err(format!("not a stats answer: {other:?}")),
        }
        let nums = |it: std::str::SplitWhitespace<'_>| -> std::result::Result<Vec<u64>, String> {
            it.map(|x| x.parse::<u64>().map_err(|e| format!("{x:?}: {e}"))).collect()
        };
        for l in lines {
            let l = l.map_err(|e| e.to_string())?;
            let (k, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            match k {
                "end" => return Ok(s),
                "mountpoint" => s.mountpoint = rest.to_owned(),
                "op" => {
                    let mut it = rest.split_whitespace();
                    let op = it.next().ok_or("op without a name")?.to_owned();
                    let v = nums(it)?;
                    if v.len() != 2 + BUCKETS {
                        return Err(format!("op {op}: {} numbers", v.len()));
                    }
                    s.requests.push(OpStats { op, count: v[0], sum_ns: v[1], buckets: v[2..].to_vec() });
                }
                "lazy_latency" => {
                    let v = nums(rest.split_whitespace())?;
                    if v.len() != 1 + BUCKETS {
                        return Err(format!("lazy_latency: {} numbers", v.len()));
                    }
                    s.lazy_sum_ns = v[0];
                    s.lazy_buckets = v[1..].to_vec();
                }
                _ => {
                    let v: u64 = rest.trim().parse().map_err(|e| format!("{k}: {e}"))?;
                    match k {
                        "chunk_cache_hits" => s.chunk_cache_hits = v,
                        "chunk_cache_misses" => s.chunk_cache_misses = v,
                        "file_cache_hits" => s.file_cache_hits = v,
                        "file_cache_misses" => s.file_cache_misses = v,
                        "lazy_stalls" => s.lazy_stalls = v,
                        "lazy_failed" => s.lazy_failed = v,
                        "lazy_bytes" => s.lazy_bytes = v,
                        "read_bytes" => s.read_bytes = v,
                        "written_bytes" => s.written_bytes = v,
                        _ => {} // a newer mount's counter: skipped
                    }
                }
            }
        }
        Err("the answer was cut short".into())
    }
}

/// Serves snapshots for `mountpoint` on the Unix socket `path` (a stale
/// file there is replaced) from a background thread.
pub(crate) fn serve_stats(path: &Path, mountpoint: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(Error::io("binding the stats socket", path))?;
    let mnt: PathBuf = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("cowfs-stats".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let mut w = std::io::BufWriter::new(s);
                if let Err(e) = snapshot(&mnt).encode(&mut w).and_then(|()| w.flush()) {
                    tracing::debug!("stats socket: {e}");
                }
            }
        })
        .map_err(Error::io("starting the stats server for", path))?;
    Ok(())
}

/// Asks the mount serving stats on `socket` for a snapshot. An error of
/// kind `ConnectionRefused` or `NotFound` means no mount serves there.
pub fn read_stats(socket: &Path, timeout: Duration) -> std::io::Result<MountStats> {
    let t0 = Instant::now();
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    let r = MountStats::decode(BufReader::new(s)).map_err(std::io::Error::other);
    tracing::trace!(socket = %socket.display(), took = ?t0.elapsed(), "read mount stats");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip() {
        let mut s = snapshot(Path::new("/mnt/a b"));
        s.requests.push(OpStats { op: "read".into(), count: 3, sum_ns: 99, buckets: vec![1; BUCKETS] });
        s.chunk_cache_misses = 7;
        s.written_bytes = 1 << 40;
        let mut buf = Vec::new();
        s.encode(&mut buf).unwrap();
        assert_eq!(MountStats::decode(&buf[..]).unwrap(), s);
        assert!(MountStats::decode(&buf[..buf.len() - 4]).is_err(), "a cut answer is an error");
    }
}
