//! A bounded LRU cache of decoded chunks, and reads of lower file ranges
//! through it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use xenod_store::{ChunkId, Store};

use crate::lower::{FileData, ReadError};

/// Decoded chunks, least recently used evicted first, bounded in bytes.
pub(crate) struct ChunkCache {
    inner: Mutex<Lru>,
    cap: usize,
    /// Asked for chunks the store lacks (a lazily deployed stack).
    pub(crate) fetcher: OnceLock<Fetcher>,
    /// Chunks in the order readers first asked for them, when recorded.
    pub(crate) touches: OnceLock<FirstTouches>,
    /// Reads that waited for the fetcher (chunks the store lacked).
    pub(crate) waits: AtomicU64,
    /// Chunks being decoded ahead ([`Self::prefetch`]): a read that needs
    /// one waits for it rather than decoding it a second time.
    loading: Mutex<HashMap<ChunkId, Arc<Loading>>>,
}

/// One chunk being decoded ahead; done once it is in the cache (or failed).
#[derive(Default)]
struct Loading {
    done: Mutex<bool>,
    cv: Condvar,
}

/// Ends a decode registered in [`ChunkCache::loading`] when dropped (also
/// if the decode panicked), waking whoever waits for it.
struct Loaded<'a>(&'a ChunkCache, ChunkId, Arc<Loading>);

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        self.0.loading.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
        self.2.finish();
    }
}

impl Loading {
    fn wait(&self) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*d {
            d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// The chunks readers asked for, each once, first asked first; at most
/// `cap` of them (later ones are not recorded), so memory stays bounded.
pub(crate) struct FirstTouches {
    inner: Mutex<(HashSet<ChunkId>, Vec<ChunkId>)>,
    cap: usize,
}

impl FirstTouches {
    pub(crate) fn new(cap: usize) -> Self {
        Self { inner: Mutex::new((HashSet::new(), Vec::new())), cap }
    }

    fn touch(&self, id: &ChunkId) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.len() < self.cap && g.0.insert(*id) {
            g.1.push(*id);
        }
    }

    /// What was recorded so far, in order.
    pub(crate) fn list(&self) -> Vec<ChunkId> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }
}

/// Fetches a chunk the store lacks: its plaintext, verified against its id,
/// or why not.
pub type Fetcher = Arc<dyn Fn(&ChunkId) -> Result<Vec<u8>, String> + Send + Sync>;

#[derive(Default)]
struct Lru {
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: usize,
}

impl ChunkCache {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(Lru::default()),
            cap,
            fetcher: OnceLock::new(),
            touches: OnceLock::new(),
            waits: AtomicU64::new(0),
            loading: Mutex::new(HashMap::new()),
        }
    }

    /// The cached chunk `id`, marked used.
    fn lookup(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        let (data, t) = l.map.get_mut(id)?;
        let (data, old) = (data.clone(), *t);
        *t = tick;
        l.order.remove(&old);
        l.order.insert(tick, *id);
        Some(data)
    }

    /// The decoded chunk `id`, from the cache or the store.
    pub fn get(&self, store: &Store, id: &ChunkId) -> xenod_store::Result<Arc<Vec<u8>>> {
        if let Some(t) = self.touches.get() {
            t.touch(id);
        }
        if let Some(data) = self.lookup(id) {
            crate::stats::count(&crate::stats::COUNTERS.chunk_hits);
            return Ok(data);
        }
        // Being decoded (ahead, or by another read): wait for it instead
        // of decoding it again; else say it is being decoded here.
        let mine = {
            let mut l = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            match l.get(id).cloned() {
                Some(w) => Err(w),
                None => {
                    let w = Arc::new(Loading::default());
                    l.insert(*id, w.clone());
                    Ok(w)
                }
            }
        };
        let mine = match mine {
            Ok(w) => Some(w),
            Err(w) => {
                w.wait();
                if let Some(data) = self.lookup(id) {
                    crate::stats::count(&crate::stats::COUNTERS.chunk_hits);
                    return Ok(data);
                }
                None
            }
        };
        crate::stats::count(&crate::stats::COUNTERS.chunk_misses);
        let _done = mine.map(|w| Loaded(self, *id, w));
        self.load(store, id)
    }

    /// Decodes `id` from the store (or has the fetcher bring it) into the
    /// cache.
    fn load(&self, store: &Store, id: &ChunkId) -> xenod_store::Result<Arc<Vec<u8>>> {
        // Fetch outside the lock: decoding is the slow part.
        // Kept as the Vec the store returned: no copy into a new allocation.
        let data = match store.get(id) {
            Ok(d) => Arc::new(d),
            Err(xenod_store::Error::ChunkMissing { .. }) if self.fetcher.get().is_some() => {
                let f = self.fetcher.get().cloned().unwrap_or_else(|| unreachable!());
                self.waits.fetch_add(1, Ordering::Relaxed);
                let t0 = std::time::Instant::now();
                let got = f(id);
                crate::stats::lazy_fetch(t0.elapsed(), got.as_ref().ok().map(Vec::len));
                match got {
                    Ok(d) => Arc::new(d),
                    Err(why) => {
                        tracing::error!(chunk = %id, "fetching a missing chunk: {why}");
                        return Err(xenod_store::Error::ChunkMissing { id: *id });
                    }
                }
            }
            Err(e) => return Err(e),
        };
        self.insert(*id, data.clone());
        Ok(data)
    }

    /// Decodes chunk `id` into the cache ahead of a read, if the store has
    /// it: never asks the fetcher (a guess must not cost a download), and
    /// a failure is left for the read itself to report.
    pub fn prefetch(&self, store: &Store, id: &ChunkId) {
        if self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.contains_key(id) {
            return;
        }
        let w = Arc::new(Loading::default());
        {
            let mut l = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            if l.contains_key(id) {
                return;
            }
            l.insert(*id, w.clone());
        }
        let _done = Loaded(self, *id, w);
        if let Ok(data) = store.get(id) {
            self.insert(*id, Arc::new(data));
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.contains_key(id)
    }

    fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let mut l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.tick += 1;
        let tick = l.tick;
        let len = data.len();
        if let Some((_, old)) = l.map.insert(id, (data, tick)) {
            l.order.remove(&old);
        } else {
            l.bytes += len;
        }
        l.order.insert(tick, id);
        while l.bytes > self.cap {
            let Some((_, victim)) = l.order.pop_first() else { break };
            if let Some((d, _)) = l.map.remove(&victim) {
                l.bytes -= d.len();
            }
        }
    }
}

/// Reads `buf.len()` bytes of `f` at `off` (clipped to the file's size)
/// through `cache`; returns how many were read. A chunk that cannot be had
/// fails the read with its id.
pub(crate) fn read_lower(
    store: &Store,
    cache: &ChunkCache,
    f: &FileData,
    off: u64,
    buf: &mut [u8],
) -> Result<usize, ReadError> {
    f.read(off, buf, |id| cache.get(store, id))
}
