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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use xenod_store::{ChunkId, Extent, Store};

use crate::error::{Error, Result};
use crate::lower::FileData;

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
    dir: PathBuf,
    cap: u64,
    store: Arc<Store>,
    /// Keys queued or being written by this process.
    pending: Mutex<HashSet<Key>>,
    /// Entries this process has open for the kernel, with their counts.
    held: Mutex<HashMap<Key, u32>>,
    tmp: AtomicU64,
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
        let dir = cache_dir(store.root());
        std::fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
        let inner = Arc::new(Inner {
            dir,
            cap,
            store,
            pending: Mutex::new(HashSet::new()),
            held: Mutex::new(HashMap::new()),
            tmp: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            last_read: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        inner.remove_dead_tmp();
        inner.make_room(0, None);
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
            .map_err(Error::io("starting the materialiser for", &inner.dir))?;
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
            && f.size <= self.inner.cap / 2
    }

    /// The entry of `f`, opened read-only, if it is in place; marks it used.
    pub(crate) fn open_entry(&self, f: &FileData) -> Option<(Key, File)> {
        if !self.eligible(f) {
            return None;
        }
        let key = Key::of(f);
        let path = self.inner.dir.join(key.name());
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
        if self.inner.dir.join(key.name()).exists() {
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

    /// Evicts least recently used entries until `need` more bytes fit under
    /// the cap, sparing held ones and `keep`.
    fn make_room(&self, need: u64, keep: Option<Key>) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
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
        if total + need <= self.cap {
            return;
        }
        entries.sort();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).keys().map(Key::name).collect::<HashSet<_>>();
        let keep = keep.map(|k| k.name());
        for (_, name, bytes) in entries {
            if total + need <= self.cap {
                break;
            }
            if held.contains(&name) || keep.as_ref() == Some(&name) {
                continue;
            }
            if std::fs::remove_file(self.dir.join(&name)).is_ok() {
                total -= bytes;
            }
        }
    }

    fn materialise(&self, job: &Job) {
        let dst = self.dir.join(job.key.name());
        if dst.exists() {
            return;
        }
        let deadline = Instant::now() + MAX_DEFER;
        self.yield_to_reads(deadline);
        // Unmounting while the job waited for reads to pause: it has not
        // started, so it is dropped like the rest of the queue (a mount
        // that read a big file once and went away does not copy it now).
        if self.closing.load(Ordering::Relaxed) || dst.exists() {
            return;
        }
        self.make_room(job.data.size, None);
        let tmp = self.dir.join(format!(".tmp-{}-{}", std::process::id(), self.tmp.fetch_add(1, Ordering::Relaxed)));
        match self.write(job, &tmp, deadline).and_then(|()| std::fs::rename(&tmp, &dst).map_err(WriteFault::Rename)) {
            Ok(()) => tracing::debug!(path = %job.path, entry = %dst.display(), "materialised"),
            Err(why) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!(path = %job.path, "not materialised: {why}");
            }
        }
    }

    /// Writes `job`'s file at `tmp` from verified chunks, durably.
    /// Pauses while lower files are read, until `deadline`.
    fn write(&self, job: &Job, tmp: &Path, deadline: Instant) -> std::result::Result<(), WriteFault> {
        let f = &job.data;
        let io = |what| WriteFault::io(what, tmp);
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp).map_err(io("creating"))?;
        for (i, (e, &start)) in f.extents.iter().zip(f.starts.iter()).enumerate() {
            let Extent::Data { id, len } = e else { continue };
            if i % YIELD_EVERY == 0 {
                self.yield_to_reads(deadline);
            }
            // The same verified path as reads; a chunk not here (lazy
            // stack) or corrupt abandons the entry.
            let data = self.store.get(id).map_err(|source| WriteFault::Chunk { id: *id, source })?;
            if data.len() != *len as usize {
                return Err(WriteFault::Length { id: *id, got: data.len(), len: *len });
            }
            file.write_all_at(&data, start).map_err(io("writing"))?;
        }
        file.set_len(f.size).map_err(io("sizing"))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(io("chmod"))?;
        file.sync_all().map_err(io("syncing"))
    }
}

/// Why a file was not materialised in the cache (logged, never returned:
/// a read falls back to the chunks).
#[derive(Debug, thiserror::Error)]
enum WriteFault {
    /// A call on the temporary file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A chunk of the file could not be read from the store.
    #[error("chunk {id}: {source}")]
    Chunk {
        id: ChunkId,
        #[source]
        source: xenod_store::Error,
    },
    /// A chunk of another length than the manifest says.
    #[error("chunk {id}: {got} bytes, manifest says {len}")]
    Length { id: ChunkId, got: usize, len: u32 },
    /// Moving the written file into place failed.
    #[error("{0}")]
    Rename(#[source] std::io::Error),
}

impl WriteFault {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }
}
