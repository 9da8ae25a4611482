//! Whole lower files materialised as plain files, so the kernel can read
//! them directly (FUSE passthrough) instead of asking this process for
//! every page.
//!
//! ```text
//!  DATA_DIR/cache/files/
//!    <64 hex>            a lower file's bytes: complete, verified, mode 0444
//!    .tmp-<pid>-<n>      being written by process <pid>; removed once <pid> is gone
//!
//!  key = BLAKE3("xenod-file-v1" size:u64le (tag:u8 len:u64le [chunk id])*)
//! ```
//!
//! Invariants:
//! - An entry is named by its content (the file's size and extent list), not
//!   by a layer or path: lower layers are immutable and chunk ids are hashes
//!   of plaintext, so one entry serves every mount and stack that shows those
//!   bytes, and it never goes stale.
//! - An entry holds only verified bytes: it is filled through [`Store::get`],
//!   which checks every chunk against its id; a chunk that fails abandons the
//!   entry. It is written under a temporary name, fsynced and renamed, so a
//!   crash never leaves a torn entry visible.
//! - Entries are never written once in place: they are only opened read-only
//!   (the kernel opens its passthrough file with the read-only flags of the
//!   FUSE open), and a file opened for writing is copied up first.
//! - Bounded: the entries' allocated bytes stay under the cap; the least
//!   recently used (oldest mtime, touched on every open) go first, skipping
//!   those this process holds open. Another process may still hold an
//!   evicted entry open; its blocks are freed when it closes.
//!
//! When: an entry is asked for on the first read of a lower file (not its
//! open: opens that read nothing, such as probes that only fstat or mmap
//! without faulting, should not cost a copy of the file), and written by one
//! background thread, so a file being read is served as before meanwhile and
//! its later opens pass through. At unmount the file being written is
//! finished (the serving process exits next; the work would be lost), the
//! rest of the queue dropped, and so is a file still waiting for reads to
//! pause (not started). The thread waits for lower reads through the
//! mount to pause ([`QUIET`]) before it starts a file, and again whenever
//! they resume while it writes, up to [`MAX_DEFER`] in all: decoding the
//! file a second time beside its first reader would halve that reader's
//! CPUs and disk (the first cold read of a 1 GiB file took 1.5-3.5x
//! ext4's time with both running; `benches/lower-read.sh`), and what it
//! buys is only later opens passing through. Only chunks already in the store are used:
//! on a lazily deployed stack a file whose chunks are still missing is not
//! materialised (that would turn one small read into a fetch of the whole
//! file); a later read asks again once the prefetch has brought them.
//!
//! Or before any read: [`warm`] writes every big file of a stack at once,
//! as a host receives the stack (containerd unpacks layers on pull), so
//! that even the first read through a mount passes through. Both write
//! through one [`Entries`]: temporary name, verified chunks, fsync, rename,
//! after evicting down to the cap. An entry that cannot fit under the cap
//! (what is left is held open or, for a warm, is the same stack's) is not
//! written.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use xenod_store::{ChunkId, Extent, LayerId, Store};

use crate::error::{Error, Result};
use crate::lower::{FileData, LKind, LowerTree};

/// Lower files smaller than this are not materialised: a few FUSE reads
/// cost less than writing and fsyncing a copy.
pub const MATERIALISE_MIN: u64 = 1 << 20;
/// Materialisations waiting at most; further requests are dropped (and
/// asked again by a later read).
const QUEUE: usize = 64;
/// Materialising waits until no lower file was read through the mount for
/// this long (see the module doc).
pub(crate) const QUIET: Duration = Duration::from_millis(500);
/// Waiting for reads to pause ends after this long per file: a mount read
/// without pause (a busy guest) still has its big files materialised.
pub(crate) const MAX_DEFER: Duration = Duration::from_secs(60);
/// Chunks written between two looks at whether reads resumed.
const YIELD_EVERY: usize = 16;

/// A cache entry's name: the identity of a lower file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key(ChunkId);

impl Key {
    pub(crate) fn of(f: &FileData) -> Self {
        let mut b = Vec::with_capacity(24 + f.extents.len() * 41);
        b.extend_from_slice(b"xenod-file-v1");
        b.extend_from_slice(&f.size.to_le_bytes());
        for e in f.extents.iter() {
            match e {
                Extent::Data { id, len } => {
                    b.push(1);
                    b.extend_from_slice(&(*len as u64).to_le_bytes());
                    b.extend_from_slice(id.as_bytes());
                }
                Extent::Hole { len } => {
                    b.push(0);
                    b.extend_from_slice(&len.to_le_bytes());
                }
            }
        }
        Key(ChunkId::of(&b))
    }

    fn name(&self) -> String {
        self.0.to_string()
    }
}

/// The materialised-file cache of one store, as one mount uses it.
pub(crate) struct FileCache {
    inner: Arc<Inner>,
    /// None once the mount has finished.
    queue: Mutex<Option<SyncSender<Job>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Off when the kernel has no passthrough: copies would go unused.
    active: AtomicBool,
}

struct Inner {
    entries: Entries,
    store: Arc<Store>,
    /// Keys queued or being written by this process.
    pending: Mutex<HashSet<Key>>,
    /// Entries this process has open for the kernel, with their counts.
    held: Mutex<HashMap<Key, u32>>,
    /// The mount is gone: drop queued work.
    closing: AtomicBool,
    /// When a lower file was last read through the mount, in milliseconds
    /// since `epoch` (see [`QUIET`]).
    last_read: AtomicU64,
    epoch: Instant,
}

struct Job {
    key: Key,
    data: Arc<FileData>,
    /// The file's path in the union, for logs.
    path: String,
}

/// Where a store's materialised files live.
pub fn cache_dir(store_root: &Path) -> PathBuf {
    store_root.join("cache").join("files")
}

impl FileCache {
    /// The cache of `store`, bounded to `cap` bytes; none when `cap` is 0.
    /// Leftovers of writers that died are removed and the bound enforced.
    pub(crate) fn open(store: Arc<Store>, cap: u64) -> Result<Option<Self>> {
        if cap == 0 {
            return Ok(None);
        }
        let entries = Entries::open(store.root(), cap)?;
        let inner = Arc::new(Inner {
            entries,
            store,
            pending: Mutex::new(HashSet::new()),
            held: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            last_read: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (queue, rx) = sync_channel::<Job>(QUEUE);
        let w = inner.clone();
        let worker = std::thread::Builder::new()
            .name("cowfs-materialise".into())
            .spawn(move || {
                // Ends when the mount drops its sender, or closes.
                while let Ok(job) = rx.recv() {
                    if w.closing.load(Ordering::Relaxed) {
                        break;
                    }
                    w.materialise(&job);
                    w.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&job.key);
                }
            })
            .map_err(Error::io("starting the materialiser for", &inner.entries.dir))?;
        Ok(Some(Self {
            inner,
            queue: Mutex::new(Some(queue)),
            worker: Mutex::new(Some(worker)),
            active: AtomicBool::new(true),
        }))
    }

    /// At unmount: lets the file being written finish (its work is not
    /// lost to the process exiting right after), drops the rest.
    pub(crate) fn finish(&self) {
        self.active.store(false, Ordering::Relaxed);
        self.inner.closing.store(true, Ordering::Relaxed);
        // Without a sender the worker's wait on an empty queue ends.
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }

    /// A lower file is being read through the mount: materialising waits
    /// for such reads to pause.
    pub(crate) fn reading(&self) {
        self.inner.last_read.store(self.inner.millis(), Ordering::Relaxed);
    }

    /// Stops materialising (the kernel refused passthrough).
    pub(crate) fn deactivate(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    /// Whether `f` is worth materialising and can fit.
    pub(crate) fn eligible(&self, f: &FileData) -> bool {
        self.active.load(Ordering::Relaxed)
            && f.host.is_none()
            && f.size >= MATERIALISE_MIN
            && f.size <= self.inner.entries.cap / 2
    }

    /// The entry of `f`, opened read-only, if it is in place; marks it used.
    pub(crate) fn open_entry(&self, f: &FileData) -> Option<(Key, File)> {
        if !self.eligible(f) {
            return None;
        }
        let key = Key::of(f);
        let path = self.inner.entries.path(key);
        let found = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NOFOLLOW)
            .open(&path)
            .and_then(|file| file.metadata().map(|m| (file, m)));
        let Ok((file, meta)) = found else {
            crate::stats::count(&crate::stats::COUNTERS.file_misses);
            return None;
        };
        if !meta.is_file() || meta.len() != f.size {
            tracing::warn!(entry = %path.display(), "materialised file has the wrong size; removing it");
            let _ = std::fs::remove_file(&path);
            crate::stats::count(&crate::stats::COUNTERS.file_misses);
            return None;
        }
        crate::stats::count(&crate::stats::COUNTERS.file_hits);
        // Recently used: eviction goes by mtime. The owner may set it on a
        // read-only file.
        let _ = file.set_modified(SystemTime::now());
        Some((key, file))
    }

    /// Queues `f` for materialising unless it is in place or on its way.
    pub(crate) fn request(&self, f: &Arc<FileData>, path: impl FnOnce() -> String) {
        if !self.eligible(f) {
            return;
        }
        let key = Key::of(f);
        if self.inner.entries.path(key).exists() {
            return;
        }
        if !self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(key) {
            return;
        }
        let sent = match &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(q) => q.try_send(Job { key, data: f.clone(), path: path() }),
            None => Ok(()),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sent {
            self.inner.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }
    }

    /// The kernel holds entry `key` open: do not evict it.
    pub(crate) fn hold(&self, key: Key) {
        *self.inner.held.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
    }

    pub(crate) fn unhold(&self, key: Key) {
        let mut h = self.inner.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = h.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                h.remove(&key);
            }
        }
    }
}

/// The platform's value (it differs between architectures: on aarch64
/// `0o400000` is `O_LARGEFILE`).
const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;

fn is_entry_name(n: &str) -> bool {
    n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Inner {
    fn millis(&self) -> u64 {
        // Never 0, which stands for "nothing read yet".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Waits until lower reads have paused for [`QUIET`], the mount is
    /// closing, or `deadline` passes.
    fn yield_to_reads(&self, deadline: Instant) {
        loop {
            if self.closing.load(Ordering::Relaxed) {
                return;
            }
            let last = self.last_read.load(Ordering::Relaxed);
            let idle = Duration::from_millis(self.millis().saturating_sub(last));
            if last == 0 || idle >= QUIET {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            std::thread::sleep((QUIET - idle).min(deadline - now));
        }
    }

    fn materialise(&self, job: &Job) {
        if self.entries.path(job.key).exists() {
            return;
        }
        let deadline = Instant::now() + MAX_DEFER;
        self.yield_to_reads(deadline);
        // Unmounting while the job waited for reads to pause: it has not
        // started, so it is dropped like the rest of the queue (a mount
        // that read a big file once and went away does not copy it now).
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        let held: HashSet<String> = self.held.lock().unwrap_or_else(|e| e.into_inner()).keys().map(Key::name).collect();
        let mut chunks = 0usize;
        let pace = &mut |_| {
            chunks += 1;
            if chunks.is_multiple_of(YIELD_EVERY) {
                self.yield_to_reads(deadline);
            }
        };
        match self.entries.write_entry(&self.store, job.key, &job.data, &|n| held.contains(n), pace) {
            Ok(Wrote::Written) => tracing::debug!(path = %job.path, key = %job.key.name(), "materialised"),
            Ok(Wrote::Present) => {}
            Err(why) => tracing::debug!(path = %job.path, "not materialised: {}", chain(&why)),
        }
    }
}

/// Names temporary files. Process-wide, not per [`Entries`]: a mount's
/// materialiser and a [`warm`] in one process write into one directory.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A store's cache directory and its bound: the one writer of entries, for
/// a mount's materialiser and for [`warm`].
struct Entries {
    dir: PathBuf,
    cap: u64,
}

/// What [`Entries::write_entry`] found or did.
#[derive(Debug, PartialEq, Eq)]
enum Wrote {
    Written,
    /// The entry was in place already: nothing written.
    Present,
}

impl Entries {
    /// The cache of the store at `store_root` (created if missing), bounded
    /// to `cap` bytes; leftovers of writers that died are removed and the
    /// bound enforced.
    fn open(store_root: &Path, cap: u64) -> Result<Self> {
        let dir = cache_dir(store_root);
        std::fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
        let e = Self { dir, cap };
        e.remove_dead_tmp();
        e.make_room(0, &|_| false);
        Ok(e)
    }

    fn path(&self, key: Key) -> PathBuf {
        self.dir.join(key.name())
    }

    /// Removes temporary files whose writer is gone.
    fn remove_dead_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else { continue };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new("/proc").join(p.to_string()).exists());
            if !alive {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// What the directory holds: allocated bytes in all (temporary files
    /// too), and the entries as (mtime, name, bytes).
    fn usage(&self) -> (u64, Vec<(SystemTime, String, u64)>) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return (0, Vec::new()) };
        let mut entries = Vec::new();
        let mut total = 0u64;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            let Ok(meta) = e.metadata() else { continue };
            let bytes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            total += bytes;
            if is_entry_name(n) {
                entries.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), n.to_owned(), bytes));
            }
        }
        (total, entries)
    }

    /// Evicts least recently used entries until `need` more bytes fit under
    /// the cap, sparing those `spare` names; whether they fit now.
    fn make_room(&self, need: u64, spare: &dyn Fn(&str) -> bool) -> bool {
        let (mut total, mut entries) = self.usage();
        if total + need <= self.cap {
            return true;
        }
        entries.sort();
        for (_, name, bytes) in entries {
            if total + need <= self.cap {
                break;
            }
            if spare(&name) {
                continue;
            }
            if std::fs::remove_file(self.dir.join(&name)).is_ok() {
                total -= bytes;
            }
        }
        total + need <= self.cap
    }

    /// Writes the entry `key` of `f` unless it is in place: room made under
    /// the cap (sparing what `spare` names; [`WriteFault::NoRoom`] if it
    /// cannot be), then the file written from verified chunks under a
    /// temporary name, fsynced and renamed into place. `each` is told the
    /// bytes of every extent written (holes too). On any failure nothing is
    /// left behind.
    fn write_entry(
        &self,
        store: &Store,
        key: Key,
        f: &FileData,
        spare: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(u64),
    ) -> std::result::Result<Wrote, WriteFault> {
        let dst = self.path(key);
        if dst.exists() {
            return Ok(Wrote::Present);
        }
        if !self.make_room(f.size, spare) {
            return Err(WriteFault::NoRoom { size: f.size, cap: self.cap });
        }
        let tmp = self.dir.join(format!(".tmp-{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        let done =
            Self::fill(store, f, &tmp, each).and_then(|()| std::fs::rename(&tmp, &dst).map_err(WriteFault::Rename));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Wrote::Written)
    }

    /// Writes `f` at `tmp` from verified chunks, durably.
    fn fill(store: &Store, f: &FileData, tmp: &Path, each: &mut dyn FnMut(u64)) -> std::result::Result<(), WriteFault> {
        let io = |what| WriteFault::io(what, tmp);
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp).map_err(io("creating"))?;
        for (e, &start) in f.extents.iter().zip(f.starts.iter()) {
            let Extent::Data { id, len } = e else {
                each(e.len());
                continue;
            };
            // The same verified path as reads; a chunk not here (lazy
            // stack) or corrupt abandons the entry. One chunk at a time:
            // memory stays bounded whatever the file's size.
            let data = store.get(id).map_err(|source| WriteFault::Chunk { id: *id, source })?;
            if data.len() != *len as usize {
                return Err(WriteFault::Length { id: *id, got: data.len(), len: *len });
            }
            file.write_all_at(&data, start).map_err(io("writing"))?;
            each(u64::from(*len));
        }
        file.set_len(f.size).map_err(io("sizing"))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(io("chmod"))?;
        file.sync_all().map_err(io("syncing"))
    }
}

/// Why a file was not materialised in the cache. A mount's materialiser
/// only logs it (a read falls back to the chunks); [`warm`] reports it.
#[derive(Debug, thiserror::Error)]
pub enum WriteFault {
    /// A call on the temporary file failed.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A chunk of the file could not be read from the store. The chunk is
    /// named here unless the store's error names it.
    #[error("reading {}", if source.chunk() == Some(*id) { "its data".to_string() } else { format!("chunk {id}") })]
    Chunk {
        id: ChunkId,
        #[source]
        source: xenod_store::Error,
    },
    /// A chunk of another length than the manifest says.
    #[error("chunk {id}: {got} bytes, manifest says {len}")]
    Length { id: ChunkId, got: usize, len: u32 },
    /// Moving the written file into place failed.
    #[error("renaming the written file into place")]
    Rename(#[source] std::io::Error),
    /// The entry does not fit under the cap beside the entries to keep.
    #[error("{size} bytes do not fit under the file cache's cap of {cap} bytes beside the entries kept")]
    NoRoom { size: u64, cap: u64 },
}

/// `e` and its causes, `e: cause: cause`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

impl WriteFault {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }

    /// The exit code it means: a corrupt chunk is damage.
    pub(crate) fn exit_code(&self) -> xenod_store::Exit {
        match self {
            WriteFault::Chunk { source, .. } => source.exit_code(),
            WriteFault::Length { .. } => xenod_store::Exit::Damaged,
            _ => xenod_store::Exit::Failure,
        }
    }
}

/// What [`warm`] found and did. Files are counted once per content: two
/// paths showing the same bytes share one entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// The stack's lower files of at least [`MATERIALISE_MIN`] bytes, and
    /// their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Entries written now.
    pub written: u64,
    pub written_bytes: u64,
    /// Entries that were in place already (marked used).
    pub present: u64,
    pub present_bytes: u64,
    /// Files whose chunks are not all in the store (a lazily fetched
    /// stack): not written, as a mount would not.
    pub missing: u64,
    /// Files over half the cap, which mounts never pass through: not written.
    pub too_big: u64,
    /// Files that did not fit under the cap beside this stack's other
    /// entries (and entries held open): not written.
    pub no_room: u64,
    pub no_room_bytes: u64,
    /// The cap the cache was kept under.
    pub cap: u64,
}

impl WarmReport {
    /// Whether every big file of the stack now has its entry.
    pub fn complete(&self) -> bool {
        self.missing == 0 && self.too_big == 0 && self.no_room == 0
    }
}

/// Materialises every lower file of `stack` (as a mount shows it, `.mount`
/// files followed) of at least [`MATERIALISE_MIN`] bytes into the store's
/// file cache, bounded to `cap` bytes, so that mounts of the stack pass
/// their reads through from the first. Entries in place are kept (and
/// marked used); files whose chunks are not all here are skipped; other
/// stacks' entries are evicted, least recently used first, to make room,
/// this stack's never: what does not fit beside them is skipped and
/// counted. `progress(done, total)` is told the bytes written of those to
/// write. A chunk that fails to read or verify stops the warm with an
/// error naming the file and the chunk; the file's entry is not left
/// behind, those written before it stay.
pub fn warm(store: &Store, stack: &[LayerId], cap: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<WarmReport> {
    let lower = LowerTree::load(store, stack)?;
    let mut rep = WarmReport { cap, ..WarmReport::default() };
    // Distinct contents, in walk order (the order import packs them in).
    let mut seen = HashSet::new();
    let mut big: Vec<(Key, &Arc<FileData>, u32)> = Vec::new();
    for (i, n) in lower.nodes.iter().enumerate() {
        if let LKind::File(f) = &n.kind
            && f.host.is_none()
            && f.size >= MATERIALISE_MIN
        {
            let key = Key::of(f);
            if seen.insert(key) {
                big.push((key, f, i as u32));
            }
        }
    }
    rep.files = big.len() as u64;
    rep.bytes = big.iter().map(|(_, f, _)| f.size).sum();
    if cap == 0 {
        rep.too_big = rep.files;
        return Ok(rep);
    }
    let entries = Entries::open(store.root(), cap)?;
    let mine: HashSet<String> = big.iter().map(|(k, ..)| k.name()).collect();
    let mut todo = Vec::new();
    for (key, f, i) in big {
        if f.size > cap / 2 {
            rep.too_big += 1;
        } else if let Ok(file) = std::fs::File::open(entries.path(key)) {
            // Recently used: this stack just arrived.
            let _ = file.set_modified(SystemTime::now());
            rep.present += 1;
            rep.present_bytes += f.size;
        } else if !all_here(store, f)? {
            rep.missing += 1;
        } else {
            todo.push((key, f, i));
        }
    }
    let total: u64 = todo.iter().map(|(_, f, _)| f.size).sum();
    let mut done = 0u64;
    progress(0, total);
    for (key, f, i) in todo {
        let at = done;
        let mut each = |n: u64| {
            done += n;
            progress(done, total);
        };
        match entries.write_entry(store, key, f, &|n| mine.contains(n), &mut each) {
            Ok(Wrote::Written) => {
                rep.written += 1;
                rep.written_bytes += f.size;
            }
            Ok(Wrote::Present) => {
                rep.present += 1;
                rep.present_bytes += f.size;
            }
            Err(WriteFault::NoRoom { .. }) => {
                rep.no_room += 1;
                rep.no_room_bytes += f.size;
            }
            Err(fault) => {
                let file = xenod_store::display_path(&lower.path(i));
                return Err(Error::Materialise { file, source: fault });
            }
        }
        done = at + f.size;
        progress(done, total);
    }
    Ok(rep)
}

/// Whether every chunk of `f` is in the store.
fn all_here(store: &Store, f: &FileData) -> Result<bool> {
    for e in f.extents.iter() {
        if let Extent::Data { id, .. } = e
            && !store.contains(id)?
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What a store's file cache holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Entries, oldest use first: (name, allocated bytes, last use).
    pub entries: Vec<(String, u64, SystemTime)>,
    /// Bytes allocated in all, temporary files of writers included.
    pub bytes: u64,
}

/// What the file cache of the store at `store_root` holds (nothing if it
/// was never made).
pub fn cache_usage(store_root: &Path) -> CacheUsage {
    let e = Entries { dir: cache_dir(store_root), cap: 0 };
    let (bytes, mut list) = e.usage();
    list.sort();
    CacheUsage { entries: list.into_iter().map(|(t, n, b)| (n, b, t)).collect(), bytes }
}
