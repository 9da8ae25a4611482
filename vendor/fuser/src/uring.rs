//! FUSE over io_uring (Linux 6.14+; the `fuse.enable_uring` module parameter).
//!
//! Classic FUSE hands every request to whichever server thread sleeps in
//! `read(/dev/fuse)` and wakes the caller back from that thread: on a small
//! VM most round trips then cross CPUs, and the two wake-ups dominate a
//! metadata-heavy walk. Over io_uring the kernel keeps one queue per possible
//! CPU and puts a request on the queue of the CPU its caller runs on; the
//! queue's threads here are pinned to that CPU, so the request and its reply
//! are handed over on one CPU.
//!
//! Each queue thread owns an io_uring (128-byte SQEs) and registers `DEPTH`
//! entries: a 288-byte header buffer and a payload buffer each. A request
//! arrives as a completion on its entry: the `fuse_in_header` in
//! `in_out`, the first argument in `op_in`, the other arguments in the
//! payload. It is put back together into the classic byte layout and
//! dispatched like a `/dev/fuse` request. The reply (`fuse_out_header` in
//! `in_out`, the out arguments in the payload) is committed with
//! COMMIT_AND_FETCH, which also waits for the entry's next request.
//!
//! FORGET, INTERRUPT and notifications keep using `/dev/fuse`, so the
//! session's classic threads keep running beside the queues.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `sizeof(struct fuse_uring_req_header)`: `in_out[128]`, `op_in[128]`,
/// `struct fuse_uring_ent_in_out` (32).
const HEADER_SIZE: usize = 288;
const OP_IN: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_COMMIT_ID: usize = 264;
const ENT_PAYLOAD_SZ: usize = 272;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;

const IORING_OP_URING_CMD: u8 = 46;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Entries each queue thread registers: one. The kernel hands a request to
/// any free entry of the queue, and an entry whose thread waits in a
/// handler would hold the request the handler waits for (the RELEASE an
/// open for writing waits for), so a thread offers an entry only while it
/// is free to serve it.
const DEPTH: usize = 1;
/// Threads per queue, all pinned to the queue's CPU: while one waits in a
/// handler (for a RELEASE in flight, a chunk being fetched), the other
/// takes that CPU's next requests, as a second `/dev/fuse` reader would.
pub(crate) const THREADS_PER_QUEUE: usize = 2;
/// `user_data` of the wake-up read on the queue's eventfd.
const WAKE: u64 = u64::MAX;

const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

/// Requests served over io_uring since the process started (all sessions).
pub(crate) static SERVED: AtomicU64 = AtomicU64::new(0);

/// What a queue thread needs to know of the session.
pub(crate) struct QueueConfig {
    pub(crate) qid: u16,
    /// `max(8192, max_write, max_pages * page size)`, as the kernel asks.
    pub(crate) payload_size: usize,
}

/// One entry's buffers, registered with the kernel once and kept at their
/// address until the queue ends. Raw allocations: the kernel, this queue's
/// thread and (for a reply sent from elsewhere) another thread write them,
/// each only while the entry is its turn.
struct Buffers {
    header: *mut u8,
    payload: *mut u8,
    payload_size: usize,
}

// SAFETY: the pointers are owned allocations; who touches them when is
// ordered by the ring's completions and the `Done` mutex (see `Buffers`).
unsafe impl Send for Buffers {}
// SAFETY: as above.
unsafe impl Sync for Buffers {}

impl Buffers {
    fn new(payload_size: usize) -> Buffers {
        let header = Box::into_raw(vec![0u8; HEADER_SIZE].into_boxed_slice()).cast::<u8>();
        let payload = Box::into_raw(vec![0u8; payload_size].into_boxed_slice()).cast::<u8>();
        Buffers { header, payload, payload_size }
    }

    /// # Safety
    /// The caller holds the entry's turn (no other writer).
    unsafe fn header(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.header, HEADER_SIZE) }
    }

    /// # Safety
    /// The caller holds the entry's turn (no other writer).
    unsafe fn payload(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.payload, self.payload_size) }
    }

    /// Writes a reply given as FUSE's classic byte stream (out header, then
    /// the out arguments) into the entry.
    ///
    /// # Safety
    /// The caller holds the entry's turn (no other writer).
    unsafe fn write_reply(&self, unique: u64, data: &[IoSlice<'_>]) -> io::Result<()> {
        // SAFETY: the caller's contract.
        let (header, payload) = unsafe { (self.header(), self.payload()) };
        let total: usize = data.iter().map(|s| s.len()).sum();
        if total < OUT_HEADER_SIZE || total - OUT_HEADER_SIZE > payload.len() {
            write_error(header, unique, libc::EIO);
            return Err(io::Error::other(format!(
                "io_uring reply of {total} bytes does not fit a {}-byte entry",
                payload.len()
            )));
        }
        let mut at = 0;
        for s in data {
            let mut s: &[u8] = s;
            if at < OUT_HEADER_SIZE {
                let n = s.len().min(OUT_HEADER_SIZE - at);
                header[at..at + n].copy_from_slice(&s[..n]);
                at += n;
                s = &s[n..];
            }
            if !s.is_empty() {
                let dst = at - OUT_HEADER_SIZE;
                payload[dst..dst + s.len()].copy_from_slice(s);
                at += s.len();
            }
        }
        let payload_sz = (total - OUT_HEADER_SIZE) as u32;
        header[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&payload_sz.to_le_bytes());
        Ok(())
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these lengths; the queue ended, so
        // neither the kernel nor a reply writes them any more.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.header, HEADER_SIZE)));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.payload, self.payload_size)));
        }
    }
}

/// An error reply: out header `{len 16, -errno, unique}`, no payload.
fn write_error(header: &mut [u8], unique: u64, errno: i32) {
    header[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_le_bytes());
    header[4..8].copy_from_slice(&(-errno).to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    header[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&0u32.to_le_bytes());
}

/// Adds one to eventfd `fd`, waking the queue thread that reads it.
fn wake(fd: RawFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer; a closed or wrong `fd` only
    // gives an error.
    let r = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    if r == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Entries whose reply is written and waits to be committed, and the
/// eventfd that wakes the queue's thread when a reply comes from another
/// thread.
struct Done {
    entries: Mutex<Vec<usize>>,
    wake: OwnedFd,
    owner: ThreadId,
}

impl Done {
    fn push(&self, entry: usize) {
        self.entries.lock().push(entry);
        if std::thread::current().id() != self.owner
            && let Err(e) = wake(self.wake.as_raw_fd())
        {
            error!("io_uring queue: waking the queue thread for a reply failed: {e}");
        }
    }
}

/// Where a reply to a request that came over io_uring goes.
#[derive(Clone)]
pub(crate) struct RingReply {
    buffers: Arc<Buffers>,
    entry: usize,
    unique: u64,
    done: Arc<Done>,
}

impl std::fmt::Debug for RingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingReply").field("entry", &self.entry).finish()
    }
}

impl RingReply {
    /// Whether a reply of `size` data bytes fits the entry.
    pub(crate) fn fits(&self, size: usize) -> bool {
        size <= self.buffers.payload_size
    }

    /// Replies with the data `fill` writes into the entry's payload buffer
    /// (at most `size` bytes, which must [`fit`](Self::fits)), or with the
    /// error it returns.
    pub(crate) fn fill(
        &self,
        unique: u64,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, crate::Errno>,
    ) -> io::Result<()> {
        debug_assert_eq!(unique, self.unique);
        // SAFETY: as in `send`: the entry is this request's until its reply
        // is in `done`, which happens below, after the last use of these.
        let (header, payload) = unsafe { (self.buffers.header(), self.buffers.payload()) };
        let size = size.min(payload.len());
        let r = match fill(&mut payload[..size]) {
            Ok(n) => {
                let n = n.min(size);
                let len = (OUT_HEADER_SIZE + n) as u32;
                header[0..4].copy_from_slice(&len.to_le_bytes());
                header[4..8].copy_from_slice(&0i32.to_le_bytes());
                header[8..16].copy_from_slice(&self.unique.to_le_bytes());
                header[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&(n as u32).to_le_bytes());
                Ok(())
            }
            Err(e) => {
                write_error(header, self.unique, e.code());
                Ok(())
            }
        };
        self.done.push(self.entry);
        r
    }

    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        // SAFETY: a request has exactly one reply and the queue's thread does
        // not touch the entry until the reply is in `done`.
        let r = unsafe { self.buffers.write_reply(self.unique, data) };
        self.done.push(self.entry);
        r
    }
}

/// One 128-byte SQE for IORING_OP_URING_CMD, laid out by hand: the crate's
/// builder cannot set `len`, which REGISTER needs.
fn uring_cmd(fd: RawFd, cmd_op: u32, qid: u16, commit_id: u64, iov: Option<u64>, user_data: u64) -> squeue::Entry128 {
    let mut b = [0u8; 128];
    b[0] = IORING_OP_URING_CMD;
    b[4..8].copy_from_slice(&fd.to_ne_bytes());
    b[8..12].copy_from_slice(&cmd_op.to_ne_bytes());
    if let Some(addr) = iov {
        b[16..24].copy_from_slice(&addr.to_ne_bytes());
        b[24..28].copy_from_slice(&2u32.to_ne_bytes());
    }
    b[32..40].copy_from_slice(&user_data.to_ne_bytes());
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6] } at sqe->cmd.
    b[56..64].copy_from_slice(&commit_id.to_ne_bytes());
    b[64..66].copy_from_slice(&qid.to_ne_bytes());
    // SAFETY: `Entry128` is `#[repr(C)]`, 128 bytes of a kernel SQE (plain
    // integers and unions of them) and its 64-byte command extension, so
    // every byte pattern is a valid value.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(b) }
}

/// Whether this process can set up the queues: the number of queues the
/// kernel keeps (one per possible CPU), when io_uring with 128-byte SQEs can be created here
/// (`kernel.io_uring_disabled` may forbid it). Once the INIT reply asks for
/// the transport the kernel holds every request until all queues are
/// registered, so this is checked before asking.
pub(crate) fn queues() -> io::Result<usize> {
    let n = possible_cpus()?;
    if n == 0 || n > usize::from(u16::MAX) {
        return Err(io::Error::other(format!("{n} possible CPUs")));
    }
    IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2)?;
    Ok(n)
}

/// The CPUs the kernel keeps queues for (`/sys/devices/system/cpu/possible`).
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(io::Error::other)?, b.parse().map_err(io::Error::other)?);
        n = n.max(b + 1).max(a + 1);
    }
    Ok(n)
}

/// A handle to stop a queue thread once the session ends.
#[derive(Clone)]
pub(crate) struct QueueStop {
    stop: Arc<AtomicBool>,
    wake: Arc<Mutex<Option<RawFd>>>,
}

impl QueueStop {
    pub(crate) fn new() -> QueueStop {
        QueueStop { stop: Arc::new(AtomicBool::new(false)), wake: Arc::new(Mutex::new(None)) }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // The queue's eventfd stays open while `wake` holds it (the queue
        // clears it before closing).
        if let Some(fd) = *self.wake.lock()
            && let Err(e) = wake(fd)
        {
            error!("io_uring queue: waking the queue thread to stop failed: {e}");
        }
    }
}

enum Slot {
    /// REGISTER or COMMIT_AND_FETCH submitted: waiting for a request.
    Waiting { registering: bool },
    /// A request is being served; its commit id.
    Serving(u64),
    /// The kernel gave the entry up (unmount, abort).
    Closed,
}

/// Serves one queue until the connection ends. Returns `Ok` also when the
/// kernel refuses the ring: requests then keep going through `/dev/fuse`.
pub(crate) fn serve_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    cfg: &QueueConfig,
    stop: &QueueStop,
) -> io::Result<()> {
    let qid = cfg.qid;
    let mut cpus = nix::sched::CpuSet::new();
    if cpus.set(usize::from(qid)).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus) {
            debug!("io_uring queue {qid}: not pinned to its CPU: {e}");
        }
    }
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> =
        IoUring::builder().build((DEPTH as u32 + 1).next_power_of_two())?;
    // SAFETY: eventfd(2) returns a new descriptor or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let wake = unsafe { OwnedFd::from_raw_fd(efd) };
    let done = Arc::new(Done { entries: Mutex::new(Vec::new()), wake, owner: std::thread::current().id() });
    *stop.wake.lock() = Some(efd);
    let r = run(se, cfg, stop, &mut ring, &done);
    *stop.wake.lock() = None;
    // Dropping the ring cancels what is still parked in it; replies still
    // held elsewhere keep their buffers alive through `Arc`.
    drop(ring);
    r
}

fn run<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    cfg: &QueueConfig,
    stop: &QueueStop,
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    done: &Arc<Done>,
) -> io::Result<()> {
    let qid = cfg.qid;
    let dev = se.ch.as_fd().as_raw_fd();
    let buffers: Vec<Arc<Buffers>> = (0..DEPTH).map(|_| Arc::new(Buffers::new(cfg.payload_size))).collect();
    let iovs: Vec<[libc::iovec; 2]> = buffers
        .iter()
        .map(|b| {
            [
                libc::iovec { iov_base: b.header.cast(), iov_len: HEADER_SIZE },
                libc::iovec { iov_base: b.payload.cast(), iov_len: b.payload_size },
            ]
        })
        .collect();
    let mut slots: Vec<Slot> = (0..DEPTH).map(|_| Slot::Waiting { registering: true }).collect();
    let mut wake_buf = [0u8; 8];
    let mut pending: Vec<squeue::Entry128> = Vec::with_capacity(DEPTH + 1);
    let register = |i: usize| uring_cmd(dev, CMD_REGISTER, qid, 0, Some(iovs[i].as_ptr() as u64), i as u64);
    pending.extend((0..DEPTH).map(register));
    let wake_read = |buf: &mut [u8; 8]| {
        squeue::Entry128::from(
            opcode::Read::new(types::Fd(done.wake.as_raw_fd()), buf.as_mut_ptr(), 8).build().user_data(WAKE),
        )
    };
    pending.push(wake_read(&mut wake_buf));
    // Request bytes put back in the classic layout; u64s keep them aligned
    // for the header's parser.
    let mut classic: Vec<u64> = vec![0; (IN_HEADER_SIZE + OP_IN_SIZE + cfg.payload_size) / 8 + 1];
    let mut served_here = 0u64;
    // Reused on every wake-up: no allocation per request.
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(DEPTH + 1);
    let mut replied: Vec<usize> = Vec::with_capacity(DEPTH);
    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: every buffer an SQE names (iovecs, entry buffers,
                // `wake_buf`) outlives the ring, which is dropped first.
                if unsafe { sq.push(&e) }.is_err() {
                    return Err(io::Error::other(format!("io_uring queue {qid}: submission queue full")));
                }
            }
        }
        if stop.stop.load(Ordering::SeqCst) {
            debug!("io_uring queue {qid}: session ended after {served_here} requests");
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (user_data, res) in completions.drain(..) {
            if user_data == WAKE {
                pending.push(wake_read(&mut wake_buf));
                continue;
            }
            let i = user_data as usize;
            let Some(slot) = slots.get_mut(i) else {
                continue;
            };
            match res {
                0 => {
                    served_here += 1;
                    SERVED.fetch_add(1, Ordering::Relaxed);
                    serve(se, &buffers[i], i, done, slot, &mut classic);
                }
                r if r == -libc::EAGAIN || r == -libc::EINTR => {
                    // REGISTER before the INIT reply was taken: again.
                    let registering = matches!(slot, Slot::Waiting { registering: true });
                    if registering {
                        pending.push(register(i));
                    } else {
                        *slot = Slot::Closed;
                    }
                }
                r => {
                    let registering = matches!(slot, Slot::Waiting { registering: true });
                    let e = io::Error::from_raw_os_error(-r);
                    if registering && served_here == 0 {
                        warn!("io_uring queue {qid}: the kernel refused the ring ({e}); requests go through /dev/fuse");
                    } else {
                        debug!("io_uring queue {qid}: entry {i} ended: {e}");
                    }
                    *slot = Slot::Closed;
                }
            }
        }
        std::mem::swap(&mut replied, &mut *done.entries.lock());
        for i in replied.drain(..) {
            if let Slot::Serving(commit_id) = slots[i] {
                pending.push(uring_cmd(dev, CMD_COMMIT_AND_FETCH, qid, commit_id, None, i as u64));
                slots[i] = Slot::Waiting { registering: false };
            }
        }
        if slots.iter().all(|s| matches!(s, Slot::Closed)) {
            debug!("io_uring queue {qid}: closed after {served_here} requests");
            return Ok(());
        }
    }
}

/// Serves the request the kernel put into entry `i`.
fn serve<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    buffers: &Arc<Buffers>,
    i: usize,
    done: &Arc<Done>,
    slot: &mut Slot,
    classic: &mut [u64],
) {
    // SAFETY (each block below): the completion hands the entry to this
    // thread, and these borrows end before a reply for it can exist.
    let (commit_id, payload_sz, len, opcode, unique) = {
        let header = unsafe { buffers.header() };
        // A little-endian field of `n` bytes at `at`.
        let le = |at: usize, n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&header[at..at + n]);
            u64::from_le_bytes(b)
        };
        (le(ENT_COMMIT_ID, 8), le(ENT_PAYLOAD_SZ, 4) as usize, le(0, 4) as usize, le(4, 4) as u32, le(8, 8))
    };
    *slot = Slot::Serving(commit_id);
    let give_back = |errno: i32| {
        write_error(unsafe { buffers.header() }, unique, errno);
        done.push(i);
    };
    let op_in = len.checked_sub(IN_HEADER_SIZE + payload_sz);
    let Some(op_in) = op_in.filter(|&n| n <= OP_IN_SIZE && payload_sz <= buffers.payload_size) else {
        error!("io_uring: malformed request (opcode {opcode}, length {len}, payload {payload_sz})");
        return give_back(libc::EIO);
    };
    // SAFETY: a u64 slice viewed as bytes, within its length.
    let bytes = unsafe { std::slice::from_raw_parts_mut(classic.as_mut_ptr().cast::<u8>(), classic.len() * 8) };
    {
        let (header, payload) = unsafe { (buffers.header(), buffers.payload()) };
        bytes[..IN_HEADER_SIZE].copy_from_slice(&header[..IN_HEADER_SIZE]);
        bytes[IN_HEADER_SIZE..IN_HEADER_SIZE + op_in].copy_from_slice(&header[OP_IN..OP_IN + op_in]);
        bytes[IN_HEADER_SIZE + op_in..len].copy_from_slice(&payload[..payload_sz]);
    }
    let reply = RingReply { buffers: buffers.clone(), entry: i, unique, done: done.clone() };
    match RequestWithSender::new_ring(se.ch.sender(), &bytes[..len], reply) {
        Some(req) => req.dispatch(se),
        None => return give_back(libc::EIO),
    }
    if opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET {
        // No reply is sent for these; the entry still has to be given back.
        give_back(0);
    }
}
