//! Requests served, by opcode, with their latency: what the filesystem's
//! callback took, reply included. Process-wide, as `uring::SERVED` is: a
//! process serves one mount (`xenod mount`), and a reader (its stats
//! socket) needs no handle into the session.
//!
//! Counting costs two reads of the CPU's time-stamp counter and two plain
//! (unlocked) stores into counters only the serving thread writes: no
//! lock, no allocation, no cache line shared with another thread.
//!
//! - **Per-thread shards.** Every thread that serves requests owns a
//!   [`Shard`] (its counters for every opcode, cache-line aligned), taken
//!   from a global list the first time it counts a request (the one
//!   allocation, 7 KiB, off the per-request path) and handed back when the
//!   thread exits, for the next thread to take over. As only its owner
//!   writes a shard, an add is a load and a store, not a locked
//!   read-modify-write, and no line bounces between the FUSE threads;
//!   [`request_stats`] sums the shards. Memory: one shard per thread that
//!   ever counted at the same time as the others (the FUSE threads: one per
//!   io_uring queue, i.e. per possible CPU, and the `/dev/fuse` ones).
//! - **The count is the buckets' sum**, so a request is two adds (its
//!   latency to `sum_ns`, one to its bucket), and a snapshot's count always
//!   agrees with its buckets.
//! - **The clock.** On x86_64 where Linux itself keeps time with the TSC
//!   (clocksource `tsc`: invariant and synchronised across CPUs, checked
//!   by the kernel), a request is timed with two `rdtsc` (about 18 ns each
//!   in a KVM guest, where `Instant::now`, the vDSO's
//!   `clock_gettime(CLOCK_MONOTONIC)`, takes about 37 ns), converted to
//!   nanoseconds with a multiplier measured against `Instant` once per
//!   process (5 ms at the first session start). Elsewhere it falls back to
//!   `Instant`.
//!
//! A benchmark knob turns it off: `XENOD_FUSE_STATS=0` in the environment
//! when a session starts (read once, then). Requests then skip the timer
//! behind one branch on a flag that never changes, and the counts stay at
//! zero. It is there to measure what counting costs on the same binary
//! (`benches/fuse-counters.sh`), not for production: the metrics need it on.

use std::cell::Cell;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

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

/// One opcode's requests on one thread (112 bytes: a slot's `sum_ns` and
/// first bucket, where fast requests go, always share a cache line).
struct Slot {
    sum_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// One thread's counters. Aligned so that no two shards share a line
/// (nor the pair of lines the spatial prefetcher fetches together).
#[repr(align(128))]
struct Shard {
    slots: [Slot; SLOTS],
    /// Whether a live thread owns (writes) this shard.
    owned: AtomicBool,
    /// The next shard in [`SHARDS`] (never changes once pushed).
    next: *const Shard,
}

// SAFETY: `next` is written once, before the shard is published with a
// release store, and only read after; the rest is atomics.
unsafe impl Sync for Shard {}

/// Every shard ever taken, newest first. Shards are never freed: a thread
/// that exits hands its shard to the next thread that needs one.
static SHARDS: AtomicPtr<Shard> = AtomicPtr::new(ptr::null_mut());

/// Whether requests are counted; set once per session start.
static ON: AtomicBool = AtomicBool::new(true);

/// Reads `XENOD_FUSE_STATS` once, as a session starts: `0` turns counting
/// off for this process, anything else (or nothing) leaves it on. Sets up
/// the clock (once per process).
pub(crate) fn configure() {
    let off = std::env::var_os("XENOD_FUSE_STATS").is_some_and(|v| v == "0");
    if !off {
        clock::init();
    }
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
    t0: u64,
}

impl Timer {
    #[inline]
    pub(crate) fn start(opcode: u32) -> Self {
        Self { slot: (opcode as usize).min(SLOTS - 1), t0: clock::now() }
    }

    #[inline]
    pub(crate) fn done(self) {
        let ns = clock::since(self.t0);
        let b = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
        match MINE.try_with(Mine::get) {
            Ok(shard) => {
                // Only this thread writes its shard: no locked add needed.
                let s = &shard.slots[self.slot];
                add_owned(&s.sum_ns, ns);
                add_owned(&s.buckets[b], 1);
            }
            // A thread whose thread-locals are being torn down has no
            // shard any more; it counts into the shared one.
            Err(_) => {
                let s = &shared().slots[self.slot];
                s.sum_ns.fetch_add(ns, Ordering::Relaxed);
                s.buckets[b].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Adds `n` to a counter only this thread writes (readers may load it at
/// any time and see either value).
#[inline]
fn add_owned(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// This thread's shard: taken at its first request, given back at exit.
struct Mine(Cell<Option<&'static Shard>>);

impl Mine {
    #[inline]
    fn get(&self) -> &'static Shard {
        match self.0.get() {
            Some(s) => s,
            None => {
                let s = take_shard();
                self.0.set(Some(s));
                s
            }
        }
    }
}

impl Drop for Mine {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // Release: the next owner's plain adds start from our last ones.
            s.owned.store(false, Ordering::Release);
        }
    }
}

thread_local! {
    static MINE: Mine = const { Mine(Cell::new(None)) };
}

/// A shard for this thread: one a thread that exited gave back, or a new
/// one.
#[cold]
fn take_shard() -> &'static Shard {
    for s in shards() {
        // Acquire: our plain adds start from the last owner's last ones.
        if s.owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            return s;
        }
    }
    let s: &'static mut Shard = Box::leak(Box::new(Shard {
        slots: [const { Slot { sum_ns: AtomicU64::new(0), buckets: [const { AtomicU64::new(0) }; BUCKETS] } }; SLOTS],
        owned: AtomicBool::new(true),
        next: ptr::null(),
    }));
    let mut head = SHARDS.load(Ordering::Relaxed);
    loop {
        s.next = head;
        match SHARDS.compare_exchange_weak(head, ptr::from_mut(s), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return s,
            Err(h) => head = h,
        }
    }
}

/// The shard threads without one of their own count into, with locked
/// adds (a thread past its thread-locals' teardown).
fn shared() -> &'static Shard {
    static SHARED: OnceLock<&'static Shard> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Marked owned for good: never handed to a thread for plain adds.
        take_shard()
    })
}

/// Every shard, for a snapshot.
fn shards() -> impl Iterator<Item = &'static Shard> {
    let mut p = SHARDS.load(Ordering::Acquire).cast_const();
    std::iter::from_fn(move || {
        // SAFETY: shards in the list are leaked boxes, never freed.
        let s = unsafe { p.as_ref() }?;
        p = s.next;
        Some(s)
    })
}

/// Where a request's time comes from: the TSC where Linux trusts it,
/// `Instant` elsewhere. Both give a `u64` at the start ([`now`]) and the
/// nanoseconds since at the end ([`since`]).
mod clock {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Nanoseconds per TSC tick, in 32.32 fixed point; 0: `Instant`.
    static MULT: AtomicU64 = AtomicU64::new(0);
    /// What `Instant` readings count from.
    static EPOCH: OnceLock<Instant> = OnceLock::new();

    /// Chooses the clock, once per process.
    pub(super) fn init() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let _ = EPOCH.get_or_init(Instant::now);
            if let Some(m) = tsc_mult() {
                MULT.store(m, Ordering::Relaxed);
            }
        });
    }

    #[inline]
    pub(super) fn now() -> u64 {
        if MULT.load(Ordering::Relaxed) != 0 { tsc() } else { epoch_ns() }
    }

    #[inline]
    pub(super) fn since(t0: u64) -> u64 {
        let m = MULT.load(Ordering::Relaxed);
        if m != 0 {
            // A thread that moved to a CPU whose TSC reads a little behind
            // the first one's gets 0, not 2^64.
            let ticks = tsc().saturating_sub(t0);
            ((u128::from(ticks) * u128::from(m)) >> 32).min(u128::from(u64::MAX)) as u64
        } else {
            epoch_ns().saturating_sub(t0)
        }
    }

    fn epoch_ns() -> u64 {
        let e = *EPOCH.get_or_init(Instant::now);
        e.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unused_unsafe)]
    fn tsc() -> u64 {
        // No fence: a few instructions of reordering are nothing against
        // buckets of 10 us and up.
        // SAFETY: rdtsc has no preconditions (every x86_64 CPU has it).
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    fn tsc() -> u64 {
        unreachable!("MULT stays 0 off x86_64")
    }

    /// The TSC's multiplier, if Linux keeps time with it (so it is
    /// invariant and in step across CPUs), measured against `Instant`.
    #[cfg(target_arch = "x86_64")]
    fn tsc_mult() -> Option<u64> {
        let src = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").ok()?;
        if src.trim() != "tsc" {
            return None;
        }
        // A reading of both clocks, the TSC read on either side of
        // `Instant` (retried if something ran in between).
        let pair = || {
            (0..100).find_map(|_| {
                let a = tsc();
                let i = Instant::now();
                let b = tsc();
                (b.wrapping_sub(a) < 20_000).then(|| (a / 2 + b / 2, i))
            })
        };
        let (c0, i0) = pair()?;
        std::thread::sleep(Duration::from_millis(5));
        let (c1, i1) = pair()?;
        let ticks = c1.checked_sub(c0).filter(|&t| t > 0)?;
        let ns = i1.duration_since(i0).as_nanos();
        // A TSC between 100 MHz and 100 GHz, or none of it.
        let m = u64::try_from((ns << 32) / u128::from(ticks)).ok()?;
        ((1u64 << 32) / 100..=(10u64 << 32)).contains(&m).then_some(m)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn tsc_mult() -> Option<u64> {
        None
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

/// The opcodes this process has served, with their counts and latencies:
/// every thread's shard, summed. Requests being counted while it runs may
/// or may not be in it; `count` is the sum of `buckets`.
pub fn request_stats() -> Vec<OpStats> {
    let mut sums = [[0u64; BUCKETS + 1]; SLOTS];
    for shard in shards() {
        for (sum, s) in sums.iter_mut().zip(&shard.slots) {
            sum[0] = sum[0].wrapping_add(s.sum_ns.load(Ordering::Relaxed));
            for (t, b) in sum[1..].iter_mut().zip(&s.buckets) {
                *t = t.wrapping_add(b.load(Ordering::Relaxed));
            }
        }
    }
    let mut out = Vec::new();
    for (i, sum) in sums.iter().enumerate() {
        let count = sum[1..].iter().fold(0u64, |a, &b| a.wrapping_add(b));
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
        out.push(OpStats { op, count, sum_ns: sum[0], buckets: sum[1..].to_vec() });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn getattr() -> Option<OpStats> {
        request_stats().into_iter().find(|s| s.op == "getattr")
    }

    #[test]
    fn threads_count_into_their_shards_and_the_snapshot_sums_them() {
        configure();
        let before = getattr().map_or(0, |s| s.count);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        Timer::start(fuse_opcode::FUSE_GETATTR as u32).done();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Threads that exited gave their shards back; new ones take them over.
        std::thread::spawn(|| Timer::start(fuse_opcode::FUSE_GETATTR as u32).done()).join().unwrap();
        let s = getattr().unwrap();
        assert!(s.count >= before + 4001, "{s:?}");
        assert_eq!(s.count, s.buckets.iter().sum::<u64>());
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS_NS.len() + 1);
        // At most one per thread counting at once (the 4, and another test's).
        assert!(shards().count() <= 6, "{} shards", shards().count());
    }

    #[test]
    fn the_clock_measures_nanoseconds() {
        clock::init();
        let t0 = clock::now();
        let i0 = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = clock::since(t0);
        let want = i0.elapsed().as_nanos() as u64;
        // Within 2% (and the few microseconds between the two reads).
        assert!(ns.abs_diff(want) < want / 50 + 10_000, "{ns} ns, Instant says {want}");
    }

    #[test]
    fn odd_opcodes_go_to_the_last_slot() {
        configure();
        Timer::start(4096).done();
        assert!(request_stats().iter().any(|s| s.op == "other" && s.count >= 1));
    }
}
