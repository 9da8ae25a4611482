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

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use xenod_store::{Extent, Store};

use crate::cache::ChunkCache;
use crate::lower::LowerTree;

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

/// The read-ahead thread of one mount; it ends when this is dropped.
pub(crate) struct ReadAhead {
    queue: Mutex<Option<SyncSender<u32>>>,
}

impl ReadAhead {
    pub(crate) fn start(store: Arc<Store>, lower: Arc<LowerTree>, cache: Arc<ChunkCache>) -> Option<Self> {
        let (tx, rx) = sync_channel::<u32>(QUEUE);
        let spawned =
            std::thread::Builder::new().name("cowfs-readahead".into()).spawn(move || run(&rx, &store, &lower, &cache));
        match spawned {
            Ok(_) => Some(Self { queue: Mutex::new(Some(tx)) }),
            Err(e) => {
                tracing::warn!("no read-ahead across files: {e}");
                None
            }
        }
    }

    /// Lower node `l` (a file) was just read for the first time by a handle.
    pub(crate) fn after(&self, l: u32) {
        if let Some(q) = &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = q.try_send(l);
        }
    }

    /// Stops the thread (at unmount).
    pub(crate) fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
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
