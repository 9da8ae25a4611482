//! Warming the file cache as stacks arrive: after a complete fetch (the
//! `fetch` request, a deploy's fetch, a remote deploy's), the stack's big
//! lower files are copied into the store's file cache
//! ([`xenod_cowfs::warm`]), so the first read through any mount of it
//! passes through to a plain file at the disk's speed. containerd unpacks
//! layers on pull for the same reason.
//!
//! One thread warms, one stack at a time, at the lowest CPU priority
//! (nice 19) and in the idle I/O class: it never delays the fetch's
//! reply or a deploy, and yields to every other reader of the disk. A
//! lazy fetch never warms (it would fetch everything). Config:
//! `warm_file_cache` (default on), `file_cache_bytes` (0: no file cache,
//! so no warming). Only a daemon warms: an embedded engine exits with its
//! command, which would cut the copy short (`xenod cache warm` does it by
//! hand). A daemon stopping mid-copy leaves a temporary file that the next
//! user of the cache removes.

use std::collections::HashSet;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};

use xenod_store::{LayerId, Store};

/// Stacks to warm, each queued once until its warm ends.
pub(crate) struct Warmer {
    queue: Mutex<Sender<LayerId>>,
    queued: Arc<Mutex<HashSet<LayerId>>>,
}

impl Warmer {
    /// Starts the warming thread over `store`, keeping the cache under `cap` bytes.
    pub(crate) fn start(store: Arc<Store>, cap: u64) -> std::io::Result<Self> {
        let (tx, rx) = channel::<LayerId>();
        let queued: Arc<Mutex<HashSet<LayerId>>> = Arc::default();
        let q = queued.clone();
        std::thread::Builder::new().name("xenod-warm".into()).spawn(move || {
            lower_priority();
            // Ends when the daemon (the sender) is dropped.
            while let Ok(top) = rx.recv() {
                warm_one(&store, top, cap);
                q.lock().unwrap_or_else(|e| e.into_inner()).remove(&top);
            }
        })?;
        Ok(Self { queue: Mutex::new(tx), queued })
    }

    /// Queues the stack of `top` (fetched whole) for warming; returns at once.
    pub(crate) fn request(&self, top: LayerId) {
        if !self.queued.lock().unwrap_or_else(|e| e.into_inner()).insert(top) {
            return;
        }
        if self.queue.lock().unwrap_or_else(|e| e.into_inner()).send(top).is_err() {
            tracing::warn!(layer = %top, "the file cache's warming thread is gone; not warming");
        }
    }
}

fn warm_one(store: &Store, top: LayerId, cap: u64) {
    let t0 = std::time::Instant::now();
    let stack = match store.stack(&top) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(layer = %top, "not warming the file cache: {e}");
            return;
        }
    };
    match xenod_cowfs::warm(store, &stack, cap, &mut |_, _| {}) {
        Ok(r) => tracing::info!(
            layer = %top, written = r.written, written_bytes = r.written_bytes, present = r.present,
            missing = r.missing, too_big = r.too_big, no_room = r.no_room, secs = t0.elapsed().as_secs_f64(),
            "file cache warmed"
        ),
        Err(e) => tracing::warn!(layer = %top, "warming the file cache: {}", crate::Error::from(e).chain()),
    }
}

/// Puts the calling thread at nice 19 and in the idle I/O class (it gets
/// the disk only when nobody else asks for it). Both are per thread on
/// Linux when given the thread's id; a refusal is logged, not fatal.
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes plain integers; PRIO_PROCESS with a thread
    // id changes that thread only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) } != 0 {
        tracing::debug!("nice 19 for the warming thread: {}", std::io::Error::last_os_error());
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0)):
    // libc has the syscall number but no wrapper or constants.
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: u32 = 13;
    // SAFETY: ioprio_set takes plain integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    if r != 0 {
        tracing::debug!("idle I/O class for the warming thread: {}", std::io::Error::last_os_error());
    }
}
