//! Requests served, by opcode, with their latency: what the filesystem's
//! callback took, reply included. Process-wide, as `uring::SERVED` is: a
//! process serves one mount (`xenod mount`), and a reader (its stats
//! socket) needs no handle into the session.
//!
//! Counting costs two clock reads and three relaxed atomic adds per
//! request: no lock, no allocation.
//!
//! A benchmark knob turns it off: `XENOD_FUSE_STATS=0` in the environment
//! when a session starts (read once, then). Requests then skip the timer
//! behind one branch on a flag that never changes, and the counts stay at
//! zero. It is there to measure what counting costs on the same binary
//! (`benches/fuse-counters.sh`), not for production: the metrics need it on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::ll::fuse_abi::fuse_opcode;

/// Upper bounds of the latency buckets, in nanoseconds; a last bucket
/// (+Inf) follows.
pub const LATENCY_BOUNDS_NS: [u64; 12] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
    50_000_000,
    250_000_000,
    1_000_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;
/// Opcodes are below 64 on Linux (CUSE_INIT, 4096, and unknown ones go to
/// the last slot).
const SLOTS: usize = 64;

struct Slot {
    count: AtomicU64,
    sum_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot {
    count: AtomicU64::new(0),
    sum_ns: AtomicU64::new(0),
    buckets: [const { AtomicU64::new(0) }; BUCKETS],
};

static SLOTS_: [Slot; SLOTS] = [SLOT; SLOTS];

/// Whether requests are counted; set once per session start.
static ON: AtomicBool = AtomicBool::new(true);

/// Reads `XENOD_FUSE_STATS` once, as a session starts: `0` turns counting
/// off for this process, anything else (or nothing) leaves it on.
pub(crate) fn configure() {
    let off = std::env::var_os("XENOD_FUSE_STATS").is_some_and(|v| v == "0");
    ON.store(!off, Ordering::Relaxed);
}

/// Whether requests are counted (see [`configure`]).
#[inline]
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Starts timing a request of `opcode`; [`Timer::done`] counts it.
pub(crate) struct Timer {
    slot: usize,
    t0: Instant,
}

impl Timer {
    #[inline]
    pub(crate) fn start(opcode: u32) -> Self {
        Self { slot: (opcode as usize).min(SLOTS - 1), t0: Instant::now() }
    }

    #[inline]
    pub(crate) fn done(self) {
        let ns = self.t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let s = &SLOTS_[self.slot];
        s.count.fetch_add(1, Ordering::Relaxed);
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
        let b = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
        s.buckets[b].fetch_add(1, Ordering::Relaxed);
    }
}

/// One opcode's requests so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpStats {
    /// The opcode's name in lower case, without `FUSE_` (`lookup`, `read`).
    pub op: String,
    /// Requests served.
    pub count: u64,
    /// Total latency, in nanoseconds.
    pub sum_ns: u64,
    /// Requests per latency bucket (not cumulative): one per bound of
    /// [`LATENCY_BOUNDS_NS`], then the rest.
    pub buckets: Vec<u64>,
}

/// The opcodes this process has served, with their counts and latencies.
pub fn request_stats() -> Vec<OpStats> {
    let mut out = Vec::new();
    for (i, s) in SLOTS_.iter().enumerate() {
        let count = s.count.load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        let op = if i == SLOTS - 1 {
            "other".to_owned()
        } else {
            match fuse_opcode::try_from(i as u32) {
                Ok(o) => format!("{o:?}").trim_start_matches("FUSE_").to_ascii_lowercase(),
                Err(_) => format!("op{i}"),
            }
        };
        out.push(OpStats {
            op,
            count,
            sum_ns: s.sum_ns.load(Ordering::Relaxed),
            buckets: s.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        });
    }
    out
}
