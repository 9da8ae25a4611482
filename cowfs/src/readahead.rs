//! Read-ahead across lower files, for walks that read one file after
//! another (tar, cp -r, a backup).
//!
//! Such a walk reads files in the order of a depth-first walk of the tree
//! in name order, which is also the order import packed their chunks in:
//! small files share 1 MiB solid blocks. Read cold, each block costs its
//! reader a pack read and a decompression on the READ that first touches
//! it, while the walker waits. When the lower files first read through
//! this process follow that order, one background thread decodes the
//! chunks of the files after the last one read, up to [`AHEAD`] bytes, into
//! the chunk cache: the walk's next READs find their chunks decoded, and
//! the blocks are decompressed off its path. Reads in another order
//! decode nothing ahead.
//!
//! Only chunks already in the store are decoded (a guess never costs a
//! download on a lazily deployed stack); files of host directories are
//! skipped; a request that finds the queue full is dropped, and the thread
//! serves only the newest request waiting, since a walk has moved past the
//! others.
//!
//! Within a big file ([`SEQ_MIN`] and up), reads that go on from where the
//! last ones ended (from offset 0, or where a read left off) have the next
//! [`SEQ_WINDOW`] bytes decoded ahead by [`SEQ_THREADS`] threads: their
//! pack bytes are first asked of the kernel in a few ranges
//! ([`Store::will_need`]), so the disk reads ahead too, then each chunk is
//! decoded and verified into the chunk cache. The server threads, pinned to
//! the reader's CPU over FUSE's io_uring transport, then mostly copy
//! decoded chunks into replies while another CPU decodes; a read that
//! needs a chunk being decoded waits for it rather than decoding it again.
//! Reads at random offsets decode nothing ahead.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use xenod_store::{ChunkId, Extent, Store};

use crate::cache::ChunkCache;
use crate::lower::{FileData, LowerTree};

/// How far ahead of a file first read the next files' data is decoded.
/// A few solid blocks: enough to stay ahead of a walk, little against the
/// chunk cache's bound.
pub(crate) const AHEAD: u64 = 4 << 20;
/// Requests waiting at most.
const QUEUE: usize = 64;
/// Data nodes remembered as decoded; forgotten all at once past this.
const REMEMBER: usize = 1 << 16;
/// A file read within this many nodes after the one read before continues
/// a walk (the nodes between: directories, symlinks, empty files).
const NEAR: usize = 16;

/// Files at least this large are decoded ahead of sequential reads.
pub(crate) const SEQ_MIN: u64 = 1 << 20;
/// How far ahead of a sequential reader its file is decoded: a few
/// milliseconds of reading at disk speed, little against the chunk cache's
/// bound (256 MiB by default).
pub(crate) const SEQ_WINDOW: u64 = 16 << 20;
/// The window is topped up once the reader has used this much of it.
const SEQ_STEP: u64 = 2 << 20;
/// How far before the end of the reads so far a read still continues them
/// (the kernel's read-ahead sends several reads at once, and two server
/// threads may answer them out of order).
const SEQ_SLACK: u64 = 8 << 20;
/// Sequential readers followed at once; the least recent is forgotten.
const SEQ_STREAMS: usize = 8;
/// Chunks waiting to be decoded ahead at most; more are not queued.
const SEQ_QUEUE: usize = 4096;
/// Threads decoding ahead of sequential readers.
const SEQ_THREADS: usize = 2;

/// The read-ahead threads of one mount; they end when [`Self::stop`] is
/// called or this is dropped.
pub(crate) struct ReadAhead {
    queue: Mutex<Option<SyncSender<u32>>>,
    seq: Arc<Seq>,
}

impl ReadAhead {
    pub(crate) fn start(store: Arc<Store>, lower: Arc<LowerTree>, cache: Arc<ChunkCache>) -> Option<Self> {
        let (tx, rx) = sync_channel::<u32>(QUEUE);
        let seq = Arc::new(Seq::default());
        for i in 0..SEQ_THREADS {
            let (seq, store, cache) = (seq.clone(), store.clone(), cache.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("cowfs-seqahead-{i}"))
                .spawn(move || seq.serve(&store, &cache));
            if let Err(e) = spawned {
                tracing::warn!("fewer threads decoding ahead of sequential reads: {e}");
            }
        }
        let spawned =
            std::thread::Builder::new().name("cowfs-readahead".into()).spawn(move || run(&rx, &store, &lower, &cache));
        match spawned {
            Ok(_) => Some(Self { queue: Mutex::new(Some(tx)), seq }),
            Err(e) => {
                tracing::warn!("no read-ahead across files: {e}");
                seq.stop();
                None
            }
        }
    }

    /// Bytes `off..off + len` of lower file `f` (data node `node`) were just
    /// read: decode ahead if the reads go on in order.
    pub(crate) fn read(&self, node: u32, f: &FileData, off: u64, len: u64) {
        self.seq.read(node, f, off, len);
    }

    /// Lower node `l` (a file) was just read for the first time by a handle.
    pub(crate) fn after(&self, l: u32) {
        if let Some(q) = &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = q.try_send(l);
        }
    }

    /// Stops the threads (at unmount).
    pub(crate) fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.seq.stop();
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.seq.stop();
    }
}

/// Decoding ahead of sequential readers of big files (see the module doc).
#[derive(Default)]
struct Seq {
    st: Mutex<SeqState>,
    cv: Condvar,
}

#[derive(Default)]
struct SeqState {
    /// The readers followed, the most recent last.
    streams: VecDeque<Stream>,
    jobs: VecDeque<SeqJob>,
    stop: bool,
}

/// A reader of one file: where its reads so far end, and how far the file
/// is queued for decoding.
struct Stream {
    node: u32,
    next: u64,
    ahead: u64,
}

enum SeqJob {
    /// Have the kernel read these chunks' pack bytes.
    Advise(Vec<ChunkId>),
    Decode(ChunkId),
}

impl Seq {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self) {
        let mut st = self.lock();
        st.stop = true;
        st.jobs.clear();
        self.cv.notify_all();
    }

    fn read(&self, node: u32, f: &FileData, off: u64, len: u64) {
        if f.host.is_some() || f.size < SEQ_MIN {
            return;
        }
        let end = off.saturating_add(len).min(f.size);
        let mut st = self.lock();
        if st.stop {
            return;
        }
        let known = st.streams.iter().position(|s| s.node == node).and_then(|i| st.streams.remove(i));
        let (mut s, go) = match known {
            // Goes on from the reads before (allowing for reads answered
            // out of order).
            Some(s) if off <= s.ahead.max(s.next) && off + SEQ_SLACK >= s.next => (s, true),
            // The first read of a file from its start: a sequential reader
            // (cat, cp, dd) starts there.
            _ if off == 0 => (Stream { node, next: 0, ahead: 0 }, true),
            // Elsewhere: followed, but nothing decoded until a read goes on.
            _ => (Stream { node, next: end, ahead: end }, false),
        };
        s.next = s.next.max(end);
        let from = s.ahead.max(s.next);
        let to = (s.next + SEQ_WINDOW).min(f.size);
        if go && to > from && (to - from >= SEQ_STEP || to == f.size) && st.jobs.len() < SEQ_QUEUE {
            let mut ids = Vec::new();
            let mut i = f.extent_at(from);
            while i < f.extents.len() && f.starts[i] < to {
                if let Extent::Data { id, .. } = f.extents[i] {
                    ids.push(id);
                }
                i += 1;
            }
            s.ahead = to;
            if !ids.is_empty() {
                st.jobs.extend(ids.iter().map(|id| SeqJob::Decode(*id)));
                st.jobs.push_front(SeqJob::Advise(ids));
                self.cv.notify_all();
            }
        }
        st.streams.push_back(s);
        if st.streams.len() > SEQ_STREAMS {
            st.streams.pop_front();
        }
    }

    /// Runs the jobs queued so far in this thread (tests).
    #[cfg(test)]
    fn drain(&self, store: &Store, cache: &ChunkCache) {
        loop {
            let Some(job) = self.lock().jobs.pop_front() else { return };
            match job {
                SeqJob::Advise(ids) => store.will_need(&ids),
                SeqJob::Decode(id) => cache.prefetch(store, &id),
            }
        }
    }

    /// A decoding thread: serves jobs until stopped.
    fn serve(&self, store: &Store, cache: &ChunkCache) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            match job {
                SeqJob::Advise(ids) => store.will_need(&ids),
                SeqJob::Decode(id) => cache.prefetch(store, &id),
            }
        }
    }
}

fn run(rx: &Receiver<u32>, store: &Store, lower: &LowerTree, cache: &ChunkCache) {
    let mut w = Walk::default();
    while let Ok(mut l) = rx.recv() {
        while let Ok(newer) = rx.try_recv() {
            l = newer;
        }
        w.read(l, store, lower, cache);
    }
}

/// What the read-ahead knows of the reads so far.
#[derive(Default)]
struct Walk {
    /// Data nodes decoded ahead (the files a walk is expected to read).
    decoded: HashSet<u32>,
    /// The file read before.
    last: Option<u32>,
}

impl Walk {
    /// File `l` was first read: if reads follow the walk, decode ahead.
    fn read(&mut self, l: u32, store: &Store, lower: &LowerTree, cache: &ChunkCache) {
        // Only a walk earns read-ahead: `l` was decoded ahead, or comes
        // soon after the file read before. Reads in any other order (a
        // service opening its files, a guest booting) cost nothing here.
        let walking = self.decoded.contains(&lower.data_node(l))
            || self.last.is_some_and(|p| {
                std::iter::successors(lower.walk_next(p), |&n| lower.walk_next(n)).take(NEAR).any(|n| n == l)
            });
        self.last = Some(l);
        if !walking {
            return;
        }
        if self.decoded.len() > REMEMBER {
            self.decoded.clear();
        }
        let mut ahead = 0u64;
        let mut next = lower.walk_next(l);
        while let Some(n) = next {
            if ahead >= AHEAD {
                break;
            }
            next = lower.walk_next(n);
            let Some(f) = lower.file(n) else { continue };
            if f.host.is_some() {
                continue;
            }
            let data = lower.data_node(n);
            let fresh = self.decoded.insert(data);
            for e in f.extents.iter() {
                if ahead >= AHEAD {
                    // Not all of it: let a later read finish the file.
                    self.decoded.remove(&data);
                    break;
                }
                let Extent::Data { id, len } = e else { continue };
                ahead += *len as u64;
                if fresh {
                    cache.prefetch(store, id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use xenod_store::{ImportOptions, LayerWriter, import_dir};

    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    /// A tree whose name order differs from creation order, with files in
    /// nested directories, an empty directory and a hardlink.
    fn tree(root: &Path) {
        for d in ["b/z", "b/a/deep", "a", "c-empty"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let files = ["b/z/2", "b/z/1", "b/a/deep/x", "b/a/f", "b/m", "a/q", "top"];
        for (i, f) in files.iter().enumerate() {
            std::fs::write(root.join(f), bytes(20_000 + i * 1000, i as u8)).unwrap();
        }
        std::fs::hard_link(root.join("a/q"), root.join("b/link-to-q")).unwrap();
    }

    fn load(dir: &Path) -> (Arc<Store>, Arc<LowerTree>) {
        let src = dir.join("src");
        tree(&src);
        let store = Arc::new(Store::open(dir.join("store")).unwrap());
        let mut w = LayerWriter::new(&store);
        import_dir(&store, &src, &ImportOptions::default(), &mut |e| w.push(&e)).unwrap();
        let id = w.finish(None, Default::default()).unwrap();
        let lower = Arc::new(LowerTree::load(&store, &[id]).unwrap());
        (store, lower)
    }

    #[test]
    fn walk_is_depth_first_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, lower) = load(dir.path());
        let mut seen = Vec::new();
        let mut next = lower.walk_next(0);
        while let Some(n) = next {
            seen.push(String::from_utf8(lower.path(n)).unwrap());
            next = lower.walk_next(n);
        }
        let want = "a a/q b b/a b/a/deep b/a/deep/x b/a/f b/link-to-q b/m b/z b/z/1 b/z/2 c-empty top";
        assert_eq!(seen.join(" "), want);
    }

    fn chunks(lower: &LowerTree, p: &str) -> Vec<xenod_store::ChunkId> {
        let f = lower.file(lower.find(p.as_bytes()).unwrap()).unwrap();
        f.extents.iter().filter_map(|e| if let Extent::Data { id, .. } = e { Some(*id) } else { None }).collect()
    }

    #[test]
    fn a_walk_has_the_next_files_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, lower) = load(dir.path());
        let cache = ChunkCache::new(64 << 20);
        let node = |p: &str| lower.find(p.as_bytes()).unwrap();
        let decoded = |p: &str| chunks(&lower, p).iter().all(|c| cache.contains(c));
        let mut w = Walk::default();
        // One read is no walk yet.
        w.read(node("a/q"), &store, &lower, &cache);
        assert!(!decoded("b/a/deep/x") && !decoded("top"));
        // The next file in the walk (4 nodes on) is.
        w.read(node("b/a/deep/x"), &store, &lower, &cache);
        // b/link-to-q is a hardlink of a/q: its data is a/q's.
        for p in ["b/a/f", "a/q", "b/m", "b/z/1", "b/z/2", "top"] {
            assert!(decoded(p), "{p} was not decoded ahead");
        }
        // The file read is left to its reader.
        assert!(!decoded("b/a/deep/x"));
    }

    #[test]
    fn reads_out_of_walk_order_decode_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, lower) = load(dir.path());
        let cache = ChunkCache::new(64 << 20);
        let node = |p: &str| lower.find(p.as_bytes()).unwrap();
        let mut w = Walk::default();
        // Each read is backwards from the one before.
        for p in ["top", "b/z/1", "b/a/f", "a/q"] {
            w.read(node(p), &store, &lower, &cache);
        }
        for p in ["b/a/deep/x", "b/m", "b/z/2"] {
            assert!(chunks(&lower, p).iter().all(|c| !cache.contains(c)), "{p} was decoded");
        }
    }

    #[test]
    fn sequential_reads_of_a_big_file_are_decoded_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let size = (SEQ_WINDOW + (4 << 20)) as usize;
        // Noise: no two chunks alike.
        std::fs::write(src.join("big"), xenod_store::testing::noise(size, 1)).unwrap();
        let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
        let mut w = LayerWriter::new(&store);
        import_dir(&store, &src, &ImportOptions::default(), &mut |e| w.push(&e)).unwrap();
        let id = w.finish(None, Default::default()).unwrap();
        let lower = LowerTree::load(&store, &[id]).unwrap();
        let node = lower.find(b"big").unwrap();
        let f = lower.file(node).unwrap();
        let ids_in = |a: u64, b: u64| -> Vec<ChunkId> {
            (0..f.extents.len())
                .filter(|&i| f.starts[i] < b && f.starts[i] + f.extents[i].len() > a)
                .filter_map(|i| if let Extent::Data { id, .. } = f.extents[i] { Some(id) } else { None })
                .collect()
        };
        // A read in the middle starts nothing.
        let (seq, cache) = (Seq::default(), ChunkCache::new(256 << 20));
        seq.read(node, f, 4 << 20, 1 << 20);
        seq.drain(&store, &cache);
        assert!(ids_in(5 << 20, 8 << 20).iter().all(|c| !cache.contains(c)), "a random read decoded ahead");
        // A read from the start has the next window decoded, and the
        // reads that go on move it along.
        let (seq, cache) = (Seq::default(), ChunkCache::new(256 << 20));
        seq.read(node, f, 0, 1 << 20);
        seq.drain(&store, &cache);
        assert!(ids_in(1 << 20, SEQ_WINDOW).iter().all(|c| cache.contains(c)), "the window was not decoded");
        assert!(ids_in(SEQ_WINDOW + (2 << 20), size as u64).iter().all(|c| !cache.contains(c)), "decoded too far");
        seq.read(node, f, 1 << 20, 4 << 20);
        seq.drain(&store, &cache);
        assert!(ids_in(5 << 20, size as u64).iter().all(|c| cache.contains(c)), "the window did not move");
        // Stopped: nothing more is queued.
        seq.stop();
        seq.read(node, f, 0, 1 << 20);
        assert!(seq.lock().jobs.is_empty());
    }

    #[test]
    fn the_thread_decodes_ahead_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (store, lower) = load(dir.path());
        let cache = Arc::new(ChunkCache::new(64 << 20));
        let ra = ReadAhead::start(store.clone(), lower.clone(), cache.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !chunks(&lower, "top").iter().all(|c| cache.contains(c)) {
            assert!(Instant::now() < deadline, "top was not decoded ahead");
            // Two reads in walk order (the thread may skip a request it
            // finds superseded: ask again until it has seen both).
            ra.after(lower.find(b"b/a/f").unwrap());
            std::thread::sleep(Duration::from_millis(5));
            ra.after(lower.find(b"b/m").unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        ra.stop();
        ra.after(lower.find(b"b/z/1").unwrap());
    }
}
