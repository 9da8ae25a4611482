//! Delays every packet of one netfilter queue by a fixed time: the added
//! latency of an emulated link, for kernels built without netem (nor any
//! other qdisc that delays, as on the machine the benchmarks run on).
//!
//! ```text
//!  netdelay --queue N --delay-ms D
//!
//!  host's socket -> iptables ... -j NFQUEUE --queue-num N -> [this process:
//!  hold D ms, then ACCEPT, in arrival order] -> qdisc (tbf: the rate) -> link
//! ```
//!
//! Run it in the network namespace whose rule feeds the queue (queues are
//! per namespace). Packets are held in arrival order and released when
//! their time is up, so the delay is the same for all and nothing is
//! reordered. Only metadata crosses to this process (copy range 0), so a
//! packet costs two small netlink messages whatever its size.
//!
//! The queue's socket offers no file descriptor to poll (the `nfq` crate
//! keeps it), so waiting is a non-blocking receive between sleeps of at
//! most [`TICK`]: a packet's delay is D plus at most one tick. A full
//! kernel queue lets packets through undelayed (fail open) rather than
//! dropping them: the benchmark measures transfers, not loss.
//!
//! Stops on SIGTERM or SIGINT (default dispositions; held packets are then
//! dropped by the kernel and retransmitted by their senders).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

/// The longest sleep between two looks at the queue.
const TICK: Duration = Duration::from_micros(250);
/// Packets the kernel holds for this process before it fails open.
const KERNEL_QUEUE: u32 = 16_384;

fn usage() -> ExitCode {
    eprintln!("usage: netdelay --queue N --delay-ms D");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut queue = None;
    let mut delay = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.as_str(), value.as_deref().map(str::parse::<u32>)) {
            ("--queue", Some(Ok(n))) if n <= u32::from(u16::MAX) => queue = Some(n as u16),
            ("--delay-ms", Some(Ok(d))) => delay = Some(Duration::from_millis(u64::from(d))),
            _ => return usage(),
        }
    }
    let (Some(queue), Some(delay)) = (queue, delay) else {
        return usage();
    };
    match run(queue, delay) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netdelay: queue {queue}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(num: u16, delay: Duration) -> std::io::Result<()> {
    let mut q = Queue::open()?;
    q.bind(num)?;
    q.set_copy_range(num, 0)?;
    q.set_queue_max_len(num, KERNEL_QUEUE)?;
    q.set_fail_open(num, true)?;
    q.set_nonblocking(true);
    let mut held: VecDeque<(Instant, Message)> = VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(mut m) => {
                    m.set_verdict(Verdict::Accept);
                    held.push_back((Instant::now() + delay, m));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The kernel's answer to an earlier verdict for a packet it
                // had dropped meanwhile (its device went down: a soak's
                // partition), read here as netlink error messages are.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, m)) = held.pop_front() {
                match q.verdict(m) {
                    Ok(()) => {}
                    // The kernel dropped the packet meanwhile (its device
                    // went away, say): nothing left to accept.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let sleep = held.front().map_or(TICK, |(due, _)| due.saturating_duration_since(now).min(TICK));
        std::thread::sleep(sleep);
    }
}
