//! The union of the lower tree and the upper directory: inodes, lookup,
//! copy-up and every namespace operation, as plain functions returning an
//! errno. The FUSE layer (`fs`) is a thin wrapper over this.
//!
//! The upper directory follows overlayfs's conventions (their names are in
//! `overlay`):
//!
//! ```text
//!  whiteout          character device 0/0 at the deleted name
//!  opaque directory  xattr trusted.overlay.opaque = "y"   (hides the lower dir)
//!  moved directory   xattr trusted.overlay.redirect = "name" (same parent) or
//!                    "/abs/path" (elsewhere): where its lower directory is
//!  partial file      xattr trusted.xenod.partial = lower path (see `partial`)
//!  UPPER/.xenod/     xenod's work area: staging for copy-up, dirty maps;
//!                    hidden in the union (like overlayfs's workdir)
//! ```
//!
//! One lock guards the inode table and every namespace change, so
//! operations are atomic with respect to each other; file data moves
//! outside it. Inode numbers: lower node `i` is inode `i + 1` (names of a
//! lower hardlink set share the first name's), upper-only objects get fresh
//! numbers; all are kept until unmount, so they are stable for the life of
//! the mount.
//!
//! The `impl Union` is spread over files by concern, each calling into
//! only those above it in this list (and this file):
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`Union`], its construction, the shared types ([`Attr`], [`FType`], `Inode`, `State`, `Handle`), the upper objects of inodes (`node_at`, `dir_fd`), change tracking |
//! | `inode` | the inode table: lookup merging upper and lower, inodes of upper objects, names added and dropped, attributes |
//! | `copyup` | copy-up: a lower object made upper, whole or as a partial file |
//! | `io` | handles and file data: open, read, write, fsync, lseek, truncate, release; passthrough and the file cache |
//! | `dir` | opendir and readdir: the merged listing |
//! | `attr` | getattr, setattr, readlink |
//! | `xattr` | getxattr, listxattr, setxattr, removexattr |
//! | `namespace` | mknod, create, mkdir, link, unlink, rmdir: names made and removed, whiteouts |
//! | `rename` | rename and exchange: redirects and opaque marks of moved directories |
//!
//! Beside them, `upper` reaches the upper directory through directory
//! handles (`*at` calls), so that no operation depends on the length of a
//! host path.

mod attr;
mod copyup;
mod dir;
mod inode;
mod io;
mod namespace;
mod rename;
mod upper;
mod xattr;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rustix::fs::FileType;
use xenod_store::{ChunkId, Store};

use crate::cache::ChunkCache;
use crate::error::{Errno, Error, FsResult, Result};
use crate::filecache::FileCache;
use crate::lower::LowerTree;
use crate::overlay::{OPAQUE, getxattr_path};
use crate::partial::Partial;
use crate::readahead::ReadAhead;
use crate::track::{DirtySet, Tracker};

use self::upper::{At, Upper};

/// xenod's work area in the upper root, hidden in the union.
pub const WORK_DIR: &str = ".xenod";

/// Lower files at least this large copy up block by block.
pub const BLOCK_COPY_MIN: u64 = 64 << 20;

/// File types as the union shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FType {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl FType {
    fn of_mode(mode: u32) -> FType {
        match FileType::from_raw_mode(mode) {
            FileType::Directory => FType::Dir,
            FileType::Symlink => FType::Symlink,
            FileType::CharacterDevice => FType::CharDev,
            FileType::BlockDevice => FType::BlockDev,
            FileType::Fifo => FType::Fifo,
            FileType::Socket => FType::Socket,
            _ => FType::File,
        }
    }
}

/// Attributes of one inode.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FType,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    /// Only in lower layers: the kernel may cache it for long.
    pub immutable: bool,
}

/// One inode of the table (invariants in `inode`).
#[derive(Debug)]
struct Inode {
    /// (parent inode, name) of every name; the first is the path used.
    names: Vec<(u64, Vec<u8>)>,
    /// The lower node whose data and metadata this shows while not upper.
    lower: Option<u32>,
    /// For directories: the lower directory merged below this one.
    lower_dir: Option<u32>,
    upper: bool,
    ftype: FType,
    partial: Option<Arc<Partial>>,
    /// An upper object that lost its last name while open: an `O_PATH`
    /// handle of it, for fstat and for handles opened before, kept until
    /// the last of them is released.
    orphan: Option<Arc<OwnedFd>>,
}

/// The inode table; each namespace change holds its lock throughout.
struct State {
    inodes: HashMap<u64, Inode>,
    dentries: HashMap<(u64, Vec<u8>), u64>,
    /// Upper inode number -> ours, for upper files with several names.
    by_upper: HashMap<u64, u64>,
    next_ino: u64,
    tmp: u64,
}

/// An open file or directory.
pub(crate) enum Handle {
    File {
        ino: u64,
        file: Mutex<Option<Arc<File>>>,
        write: bool,
        append: bool,
        /// Whether a read of this handle has asked for read-ahead and for
        /// the file to be materialised (the first one does).
        offered: AtomicBool,
    },
    Dir {
        entries: Vec<(Vec<u8>, u64, FType)>,
    },
}

/// The mounted union.
pub struct Union {
    store: Arc<Store>,
    pub(crate) lower: Arc<LowerTree>,
    cache: Arc<ChunkCache>,
    upper: Option<Upper>,
    st: Mutex<State>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Lower file size from which copy-up is block by block.
    pub block_copy_min: u64,
    /// Records what changes, when incremental commits are wanted.
    pub(crate) tracker: Option<Arc<Tracker>>,
    /// Lower files materialised for the kernel to read directly.
    pub(crate) files: Option<FileCache>,
    /// Decodes the files after one being read, for walks.
    readahead: Option<ReadAhead>,
    /// File-cache entries read from for requests without a handle (see
    /// [`Self::file_handle`]), by inode, the most recently used last: the
    /// kernel says nothing when such a reader is done, so a few are kept
    /// open rather than one opened per request.
    entries: Mutex<Vec<(u64, Arc<File>)>>,
    /// The upper directory's quota, if it has one (see `quota`).
    pub(crate) quota: Option<Arc<crate::quota::Quota>>,
}

impl Union {
    /// A union of `lower` and, if given, the upper directory `upper`
    /// (created if missing). `cache_bytes` bounds the decoded-chunk cache.
    pub fn new(store: Arc<Store>, lower: LowerTree, upper: Option<&Path>, cache_bytes: usize) -> Result<Self> {
        Self::build(store, lower, upper, cache_bytes, true)
    }

    /// A view of an upper directory that a live mount may be writing:
    /// nothing in it is created or cleaned up. For reading (commit) only.
    pub fn inspect(store: Arc<Store>, lower: LowerTree, upper: &Path, cache_bytes: usize) -> Result<Self> {
        Self::build(store, lower, Some(upper), cache_bytes, false)
    }

    fn build(store: Arc<Store>, lower: LowerTree, upper: Option<&Path>, cache_bytes: usize, own: bool) -> Result<Self> {
        let upper = match upper {
            Some(u) if !own => Some(u.canonicalize().map_err(Error::io("resolving", u))?),
            Some(u) => {
                std::fs::create_dir_all(u).map_err(Error::io("creating", u))?;
                let u = u.canonicalize().map_err(Error::io("resolving", u))?;
                let work = u.join(WORK_DIR);
                for d in ["work", "maps"] {
                    std::fs::create_dir_all(work.join(d)).map_err(Error::io("creating", work.join(d)))?;
                }
                // Staging leftovers of an interrupted copy-up.
                let w = work.join("work");
                for e in std::fs::read_dir(&w).map_err(Error::io("listing", &w))?.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
                Some(u)
            }
            None => None,
        };
        let root_upper = upper.is_some();
        let mut inodes = HashMap::new();
        let root_opaque = match &upper {
            Some(u) => getxattr_path(u, OPAQUE).ok().flatten().is_some_and(|v| v == b"y"),
            None => false,
        };
        inodes.insert(
            1,
            Inode {
                names: vec![],
                lower: Some(0),
                lower_dir: (!root_opaque).then_some(0),
                upper: root_upper,
                ftype: FType::Dir,
                partial: None,
                orphan: None,
            },
        );
        let next_ino = lower.len() as u64 + 1;
        let upper = match upper {
            Some(u) => {
                let work = format!("{WORK_DIR}/work");
                let work = (own || u.join(&work).is_dir()).then_some(work.as_str());
                Some(Upper::open(u.clone(), work).map_err(Error::io("opening", &u))?)
            }
            None => None,
        };
        let lower = Arc::new(lower);
        let cache = Arc::new(ChunkCache::new(cache_bytes));
        // Not for a commit's view: it reads each file once, in its own order.
        let readahead = if own { ReadAhead::start(store.clone(), lower.clone(), cache.clone()) } else { None };
        Ok(Self {
            store,
            lower,
            cache,
            readahead,
            upper,
            st: Mutex::new(State { inodes, dentries: HashMap::new(), by_upper: HashMap::new(), next_ino, tmp: 0 }),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            block_copy_min: BLOCK_COPY_MIN,
            tracker: None,
            files: None,
            entries: Mutex::new(Vec::new()),
            quota: None,
        })
    }

    /// Chunks the store lacks are asked of `f` (a lazily deployed stack)
    /// instead of failing the read.
    pub fn fetch_missing(&self, f: crate::cache::Fetcher) {
        let _ = self.cache.fetcher.set(f);
    }

    /// Starts recording the chunks readers ask for, first asked first, at
    /// most `cap` of them ([`Union::first_touches`]).
    pub fn record_first_touches(&self, cap: usize) {
        let _ = self.cache.touches.set(crate::cache::FirstTouches::new(cap));
    }

    /// The chunks recorded so far (see [`Union::record_first_touches`]),
    /// and how many reads waited for a chunk the store lacked.
    pub fn first_touches(&self) -> (Vec<ChunkId>, u64) {
        let list = self.cache.touches.get().map(|t| t.list()).unwrap_or_default();
        (list, self.cache.waits.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Starts recording writes and namespace changes for [`Union::drain_dirty`].
    pub fn track_changes(&mut self) {
        self.tracker.get_or_insert_with(Default::default);
    }

    /// What changed since the last drain (or since tracking started).
    pub fn drain_dirty(&self) -> DirtySet {
        let Some(t) = &self.tracker else { return DirtySet::default() };
        t.drain(|ino| {
            let st = self.lock();
            let Some(n) = st.inodes.get(&ino) else { return Vec::new() };
            let mut out = Vec::new();
            for (p, name) in &n.names {
                out.push(join(&self.rel(&st, *p), name));
            }
            out
        })
    }

    fn track_name(&self, st: &State, parent: u64, name: &[u8]) {
        if let Some(t) = &self.tracker {
            t.path(join(&self.rel(st, parent), name));
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn writable(&self) -> bool {
        self.upper.is_some()
    }

    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        match &self.upper {
            Some(u) => Ok(rustix::fs::fstatvfs(&*u.root)?),
            None => Ok(rustix::fs::statvfs(self.store.root())?),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upper_root(&self) -> FsResult<&Upper> {
        self.upper.as_ref().ok_or(Errno::ROFS)
    }

    /// The union path of `ino`: its first names up to the root.
    fn rel(&self, st: &State, ino: u64) -> Vec<u8> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let Some((p, n)) = st.inodes.get(&cur).and_then(|i| i.names.first()) else { break };
            parts.push(n);
            cur = *p;
        }
        crate::lower::join_leaf_first(&parts)
    }

    /// The host path of `ino`'s upper object, for readers outside the
    /// union (bounded by PATH_MAX, unlike the union's own calls).
    fn node_path(&self, st: &State, ino: u64) -> FsResult<PathBuf> {
        let root = &self.upper_root()?.path;
        let rel = self.rel(st, ino);
        Ok(if rel.is_empty() { root.clone() } else { root.join(OsStr::from_bytes(&rel)) })
    }

    /// The handle of upper directory `ino`: cached, or opened from its
    /// nearest cached ancestor (or the root) one name at a time.
    fn dir_fd(&self, st: &State, ino: u64) -> FsResult<Arc<OwnedFd>> {
        let upper = self.upper_root()?;
        let mut down: Vec<(u64, &[u8])> = Vec::new();
        let mut cur = ino;
        let mut fd = loop {
            if cur == 1 {
                break upper.root.clone();
            }
            if let Some(fd) = upper.cached(cur) {
                break fd;
            }
            let node = Self::inode(st, cur)?;
            if !node.upper || node.ftype != FType::Dir {
                return Err(if node.ftype == FType::Dir { Errno::NOENT } else { Errno::NOTDIR });
            }
            let (p, n) = node.names.first().ok_or(Errno::NOENT)?;
            down.push((cur, n));
            cur = *p;
        };
        for (i, n) in down.into_iter().rev() {
            fd = upper.open_dir(&fd, n, i)?;
        }
        Ok(fd)
    }

    /// Name `name` in upper directory `parent`.
    fn child_at(&self, st: &State, parent: u64, name: &[u8]) -> FsResult<At> {
        Ok(At::new(self.dir_fd(st, parent)?, name))
    }

    /// The upper object of `ino` (at its first name; `.` of the root).
    fn node_at(&self, st: &State, ino: u64) -> FsResult<At> {
        if ino == 1 {
            return Ok(At::new(self.upper_root()?.root.clone(), b"."));
        }
        let (p, n) = Self::inode(st, ino)?.names.first().ok_or(Errno::NOENT)?;
        self.child_at(st, *p, n)
    }

    /// A fresh name in the staging directory.
    fn stage(&self, st: &mut State) -> FsResult<At> {
        st.tmp += 1;
        self.upper_root()?.staged(format!("#{:x}", st.tmp))
    }

    fn map_path(&self, upper_ino: u64) -> FsResult<PathBuf> {
        Ok(self.upper_root()?.path.join(WORK_DIR).join("maps").join(format!("{upper_ino}.map")))
    }
}

pub(crate) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}
