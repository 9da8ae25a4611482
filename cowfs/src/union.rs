//! The union of the lower tree and the upper directory: inodes, lookup,
//! copy-up and every namespace operation, as plain functions returning an
//! errno. The FUSE layer (`fs`) is a thin wrapper over this.
//!
//! The upper directory follows overlayfs's conventions:
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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, RenameFlags, Stat, XattrFlags};
use xenod_store::{Extent, Store, Timestamp, Xattr};

use crate::cache::{ChunkCache, read_lower};
use crate::error::{Errno, Error, FsResult, Result, io_errno};
use crate::filecache::{FileCache, Key};
use crate::lower::{LKind, LowerTree};
use crate::overlay::{OPAQUE, PARTIAL, REDIRECT, getxattr_path, is_whiteout, list_xattrs, private_xattr};
use crate::partial::{DirtyMap, Partial};
use crate::readahead::ReadAhead;
use crate::track::{DirtySet, Tracker};

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
}

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
    upper: Option<PathBuf>,
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
}

/// Bound of [`Union::entries`].
const OPEN_ENTRIES: usize = 8;

fn ts(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    }
}

fn st_time(secs: i64, nanos: u64) -> SystemTime {
    ts(Timestamp { secs, nanos: nanos as u32 })
}

pub(crate) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
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
            },
        );
        let next_ino = lower.len() as u64 + 1;
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
        })
    }

    /// Chunks the store lacks are asked of `f` (a lazily deployed stack)
    /// instead of failing the read.
    pub fn fetch_missing(&self, f: crate::cache::Fetcher) {
        let _ = self.cache.fetcher.set(f);
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

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn upper_root(&self) -> FsResult<&Path> {
        self.upper.as_deref().ok_or(Errno::ROFS)
    }

    // ---- paths -------------------------------------------------------

    fn rel(&self, st: &State, ino: u64) -> Vec<u8> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let Some((p, n)) = st.inodes.get(&cur).and_then(|i| i.names.first()) else { break };
            parts.push(n);
            cur = *p;
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        out
    }

    fn upath(&self, rel: &[u8]) -> FsResult<PathBuf> {
        let root = self.upper_root()?;
        Ok(if rel.is_empty() { root.to_path_buf() } else { root.join(OsStr::from_bytes(rel)) })
    }

    fn node_upath(&self, st: &State, ino: u64) -> FsResult<PathBuf> {
        self.upath(&self.rel(st, ino))
    }

    fn stage_path(&self, st: &mut State) -> FsResult<PathBuf> {
        st.tmp += 1;
        Ok(self.upper_root()?.join(WORK_DIR).join("work").join(format!("#{:x}", st.tmp)))
    }

    fn map_path(&self, upper_ino: u64) -> FsResult<PathBuf> {
        Ok(self.upper_root()?.join(WORK_DIR).join("maps").join(format!("{upper_ino}.map")))
    }

    // ---- lookup ------------------------------------------------------

    fn inode(st: &State, ino: u64) -> FsResult<&Inode> {
        st.inodes.get(&ino).ok_or(Errno::STALE)
    }

    fn inode_mut(st: &mut State, ino: u64) -> FsResult<&mut Inode> {
        st.inodes.get_mut(&ino).ok_or(Errno::STALE)
    }

    fn upper_stat(&self, p: &Path) -> FsResult<Option<Stat>> {
        match rustix::fs::statat(rustix::fs::CWD, p, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Ok(Some(s)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The inode at `name` in directory `parent`, if the union has one.
    fn child(&self, st: &mut State, parent: u64, name: &[u8]) -> FsResult<Option<u64>> {
        if let Some(&ino) = st.dentries.get(&(parent, name.to_vec())) {
            return Ok(Some(ino));
        }
        let p = Self::inode(st, parent)?;
        if p.ftype != FType::Dir {
            return Err(Errno::NOTDIR);
        }
        if parent == 1 && name == WORK_DIR.as_bytes() && self.upper.is_some() {
            return Ok(None);
        }
        let (p_upper, p_lower_dir) = (p.upper, p.lower_dir);
        let lower_child = p_lower_dir.and_then(|d| self.lower.child(d, name));
        let mut found = None;
        if p_upper {
            let path = self.node_upath(st, parent)?.join(OsStr::from_bytes(name));
            if let Some(s) = self.upper_stat(&path)? {
                if is_whiteout(&s) {
                    return Ok(None);
                }
                found = Some(self.upper_inode(st, &path, &s, lower_child, p_lower_dir)?);
            }
        }
        let ino = match found {
            Some(i) => i,
            None => {
                let Some(c) = lower_child else { return Ok(None) };
                let d = self.lower.data_node(c);
                let ino = d as u64 + 1;
                let ftype = self.lower_ftype(d);
                st.inodes.entry(ino).or_insert(Inode {
                    names: vec![],
                    lower: Some(d),
                    lower_dir: (ftype == FType::Dir).then_some(c),
                    upper: false,
                    ftype,
                    partial: None,
                });
                ino
            }
        };
        if let Some(i) = st.inodes.get_mut(&ino) {
            i.names.push((parent, name.to_vec()));
        }
        st.dentries.insert((parent, name.to_vec()), ino);
        Ok(Some(ino))
    }

    fn lower_ftype(&self, i: u32) -> FType {
        match &self.lower.node(self.lower.data_node(i)).kind {
            LKind::Dir { .. } => FType::Dir,
            LKind::File(_) | LKind::Hardlink(_) => FType::File,
            LKind::Symlink(_) => FType::Symlink,
            LKind::CharDev(_) => FType::CharDev,
            LKind::BlockDev(_) => FType::BlockDev,
            LKind::Fifo => FType::Fifo,
            LKind::Socket => FType::Socket,
        }
    }

    /// Makes (or finds) the inode of an upper object found by lookup.
    fn upper_inode(
        &self,
        st: &mut State,
        path: &Path,
        s: &Stat,
        lower_child: Option<u32>,
        p_lower_dir: Option<u32>,
    ) -> FsResult<u64> {
        let ftype = FType::of_mode(s.st_mode);
        if ftype != FType::Dir
            && s.st_nlink > 1
            && let Some(&ino) = st.by_upper.get(&s.st_ino)
        {
            return Ok(ino);
        }
        let mut lower = None;
        let mut partial = None;
        if ftype == FType::Dir {
            if getxattr_path(path, OPAQUE)?.is_none_or(|v| v != b"y") {
                lower = match getxattr_path(path, REDIRECT)? {
                    Some(r) if r.first() == Some(&b'/') => self.lower.find(&r[1..]),
                    Some(r) => p_lower_dir.and_then(|d| self.lower.child(d, &r)),
                    None => lower_child,
                }
                .filter(|&l| self.lower.is_dir(l));
            }
        } else if ftype == FType::File
            && let Some(lp) = getxattr_path(path, PARTIAL)?
        {
            let Some(l) = self.lower.find(&lp).filter(|&l| self.lower.file(l).is_some()) else {
                tracing::error!(path = %path.display(), lower = %String::from_utf8_lossy(&lp), "partial file's lower file is not in the stack");
                return Err(Errno::IO);
            };
            partial = Some(self.open_partial(path, s.st_ino, l, lp)?);
            lower = Some(self.lower.data_node(l));
        }
        let mut ino = match lower {
            Some(l) if ftype == FType::Dir => l as u64 + 1,
            _ => 0,
        };
        if ino == 0 || st.inodes.contains_key(&ino) {
            ino = st.next_ino;
            st.next_ino += 1;
        }
        st.inodes.insert(
            ino,
            Inode {
                names: vec![],
                lower,
                lower_dir: if ftype == FType::Dir { lower } else { None },
                upper: true,
                ftype,
                partial,
            },
        );
        if ftype != FType::Dir && s.st_nlink > 1 {
            st.by_upper.insert(s.st_ino, ino);
        }
        Ok(ino)
    }

    fn open_partial(&self, path: &Path, upper_ino: u64, lower: u32, lower_path: Vec<u8>) -> FsResult<Arc<Partial>> {
        let data = self.lower.file(lower).cloned().ok_or(Errno::IO)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_nofollow())
            .open(path)
            .map_err(|e| io_errno(&e))?;
        let map_path = self.map_path(upper_ino)?;
        let map = DirtyMap::load(&map_path, data.size).map_err(|e| {
            tracing::error!(map = %map_path.display(), "dirty map unreadable: {e}");
            Errno::IO
        })?;
        Ok(Arc::new(Partial { file, lower: data, lower_path, map_path, map: Mutex::new(map) }))
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let mut st = self.lock();
        let ino = self.child(&mut st, parent, name)?.ok_or(Errno::NOENT)?;
        self.attr_locked(&st, ino)
    }

    // ---- attributes --------------------------------------------------

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let st = self.lock();
        self.attr_locked(&st, ino)
    }

    fn attr_locked(&self, st: &State, ino: u64) -> FsResult<Attr> {
        let node = Self::inode(st, ino)?;
        if node.upper {
            let path = self.node_upath(st, ino)?;
            let s = if node.names.is_empty() && ino != 1 {
                None
            } else {
                rustix::fs::statat(rustix::fs::CWD, &path, AtFlags::SYMLINK_NOFOLLOW).ok()
            };
            let s = match (s, &node.partial) {
                (Some(s), _) => s,
                (None, Some(p)) => rustix::fs::fstat(&p.file)?,
                (None, None) => return Err(Errno::NOENT),
            };
            let mut nlink = s.st_nlink as u32;
            if node.ftype == FType::Dir && node.lower_dir.is_some() {
                nlink = 1;
            }
            return Ok(Attr {
                ino,
                size: s.st_size as u64,
                blocks: s.st_blocks as u64,
                atime: st_time(s.st_atime, s.st_atime_nsec),
                mtime: st_time(s.st_mtime, s.st_mtime_nsec),
                ctime: st_time(s.st_ctime, s.st_ctime_nsec),
                kind: FType::of_mode(s.st_mode),
                perm: (s.st_mode & 0o7777) as u16,
                nlink,
                uid: s.st_uid,
                gid: s.st_gid,
                rdev: s.st_rdev as u32,
                immutable: false,
            });
        }
        let l = node.lower.ok_or(Errno::IO)?;
        Ok(self.lower_attr(ino, l))
    }

    fn lower_attr(&self, ino: u64, l: u32) -> Attr {
        let n = self.lower.node(self.lower.data_node(l));
        let t = ts(n.mtime);
        let (size, rdev) = match &n.kind {
            LKind::File(f) => (f.size, 0),
            LKind::Symlink(t) => (t.len() as u64, 0),
            LKind::CharDev(r) | LKind::BlockDev(r) => (0, *r),
            _ => (0, 0),
        };
        let stored: u64 = match &n.kind {
            LKind::File(f) if f.host.is_some() => f.size,
            LKind::File(f) => f.extents.iter().filter(|e| matches!(e, Extent::Data { .. })).map(|e| e.len()).sum(),
            _ => 0,
        };
        Attr {
            ino,
            size,
            blocks: stored.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            kind: self.lower_ftype(l),
            perm: n.mode as u16,
            nlink: if matches!(n.kind, LKind::Dir { .. }) { 1 } else { n.nlink },
            uid: n.uid,
            gid: n.gid,
            rdev: rdev as u32,
            immutable: true,
        }
    }

    // ---- copy-up -----------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn set_meta(
        &self,
        p: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: &[Xattr],
        mtime: Timestamp,
        symlink: bool,
    ) -> FsResult<()> {
        rustix::fs::chownat(
            rustix::fs::CWD,
            p,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if !symlink {
            rustix::fs::chmodat(rustix::fs::CWD, p, Mode::from_raw_mode(mode), AtFlags::empty())?;
        }
        for x in xattrs {
            if private_xattr(&x.name) {
                continue;
            }
            rustix::fs::lsetxattr(p, OsStr::from_bytes(&x.name), &x.value, XattrFlags::empty())?;
        }
        let t = rustix::fs::Timespec { tv_sec: mtime.secs, tv_nsec: mtime.nanos as _ };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p,
            &rustix::fs::Timestamps { last_access: t, last_modification: t },
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// Writes lower node `l`'s object, with its metadata, at `dst`.
    fn materialize(&self, l: u32, dst: &Path) -> FsResult<()> {
        let d = self.lower.data_node(l);
        let n = self.lower.node(d);
        let mut symlink = false;
        match &n.kind {
            LKind::Dir { .. } => rustix::fs::mkdir(dst, Mode::from_raw_mode(0o700))?,
            LKind::File(f) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(dst)
                    .map_err(|e| io_errno(&e))?;
                if let Some(h) = &f.host {
                    let mut src = std::fs::File::open(h).map_err(|e| {
                        tracing::error!(path = %h.display(), "copy-up: {e}");
                        io_errno(&e)
                    })?;
                    std::io::copy(&mut src, &mut &file).map_err(|e| io_errno(&e))?;
                }
                for (e, &start) in f.extents.iter().zip(f.starts.iter()) {
                    if let Extent::Data { id, .. } = e {
                        let data = self.store.get(id).map_err(|err| {
                            tracing::error!(chunk = %id, path = %xenod_store::display_path(&self.lower.path(d)), "copy-up: {err}");
                            Errno::IO
                        })?;
                        file.write_all_at(&data, start).map_err(|e| io_errno(&e))?;
                    }
                }
                file.set_len(f.size).map_err(|e| io_errno(&e))?;
            }
            LKind::Symlink(t) => {
                rustix::fs::symlink(OsStr::from_bytes(t), dst)?;
                symlink = true;
            }
            LKind::CharDev(r) => {
                rustix::fs::mknodat(rustix::fs::CWD, dst, FileType::CharacterDevice, Mode::from_raw_mode(0o600), *r)?
            }
            LKind::BlockDev(r) => {
                rustix::fs::mknodat(rustix::fs::CWD, dst, FileType::BlockDevice, Mode::from_raw_mode(0o600), *r)?
            }
            LKind::Fifo => rustix::fs::mknodat(rustix::fs::CWD, dst, FileType::Fifo, Mode::from_raw_mode(0o600), 0)?,
            LKind::Socket => {
                rustix::fs::mknodat(rustix::fs::CWD, dst, FileType::Socket, Mode::from_raw_mode(0o600), 0)?
            }
            LKind::Hardlink(_) => return Err(Errno::IO),
        }
        self.set_meta(dst, n.mode, n.uid, n.gid, &n.xattrs, n.mtime, symlink)
    }

    fn is_large(&self, l: u32) -> bool {
        // Host files copy up whole: block copy-up reads the lower file's extents.
        self.lower.file(l).is_some_and(|f| {
            f.host.is_none() && f.size >= self.block_copy_min
                || (f.chunking == xenod_store::Chunking::Fixed && f.size > 0)
        })
    }

    /// Makes `ino` present in the upper directory (and its parents).
    fn copy_up(&self, st: &mut State, ino: u64) -> FsResult<()> {
        let node = Self::inode(st, ino)?;
        if node.upper {
            return Ok(());
        }
        self.upper_root()?;
        let (parent, _) = node.names.first().cloned().ok_or(Errno::NOENT)?;
        let l = node.lower.ok_or(Errno::IO)?;
        self.copy_up(st, parent)?;
        let dst = self.node_upath(st, ino)?;
        let tmp = self.stage_path(st)?;
        let partial = if self.is_large(l) {
            Some(self.stage_partial(l, &tmp)?)
        } else {
            if let Err(e) = self.materialize(l, &tmp) {
                let _ = std::fs::remove_file(&tmp).or_else(|_| std::fs::remove_dir(&tmp));
                return Err(e);
            }
            None
        };
        rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, &dst, RenameFlags::NOREPLACE)?;
        let partial = match partial {
            Some(upper_ino) => {
                let lp = self.lower.path(self.lower.data_node(l));
                Some(self.open_partial(&dst, upper_ino, l, lp)?)
            }
            None => None,
        };
        let node = Self::inode_mut(st, ino)?;
        node.upper = true;
        node.partial = partial;
        // Keep the lower hardlink set together: link its other names.
        if self.lower.link_set(l).len() > 1 {
            let s = rustix::fs::statat(rustix::fs::CWD, &dst, AtFlags::SYMLINK_NOFOLLOW)?;
            st.by_upper.insert(s.st_ino, ino);
            let names = Self::inode(st, ino)?.names.clone();
            for other in self.lower.link_set(l) {
                let p = self.lower.path(other);
                if self.resolve_path(st, &p).ok().flatten() != Some(ino) {
                    continue;
                }
                let Some(pp) = xenod_store::parent(&p) else { continue };
                let Ok(Some(pino)) = self.resolve_path(st, pp) else { continue };
                if names.first().is_some_and(|(np, nn)| *np == pino && nn.as_slice() == xenod_store::file_name(&p)) {
                    continue;
                }
                if self.copy_up(st, pino).is_err() {
                    continue;
                }
                if let Ok(to) = self.upath(&p)
                    && rustix::fs::link(&dst, &to).is_err()
                {
                    tracing::warn!(path = %to.display(), "could not keep hardlink with copied-up file");
                }
            }
        }
        Ok(())
    }

    /// Creates a partial file for lower `l` at `tmp`; returns its upper inode number.
    fn stage_partial(&self, l: u32, tmp: &Path) -> FsResult<u64> {
        let d = self.lower.data_node(l);
        let n = self.lower.node(d);
        let f = self.lower.file(d).ok_or(Errno::IO)?;
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp).map_err(|e| io_errno(&e))?;
        file.set_len(f.size).map_err(|e| io_errno(&e))?;
        let s = rustix::fs::fstat(&file)?;
        DirtyMap::new(f.size).store(&self.map_path(s.st_ino)?, false).map_err(|e| io_errno(&e))?;
        rustix::fs::lsetxattr(tmp, PARTIAL, &self.lower.path(d), XattrFlags::empty())?;
        self.set_meta(tmp, n.mode, n.uid, n.gid, &n.xattrs, n.mtime, false)?;
        Ok(s.st_ino)
    }

    /// The inode at union path `p`, walking from the root.
    fn resolve_path(&self, st: &mut State, p: &[u8]) -> FsResult<Option<u64>> {
        let mut cur = 1;
        if p.is_empty() {
            return Ok(Some(1));
        }
        for c in p.split(|&b| b == b'/') {
            match self.child(st, cur, c)? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    // ---- creating and removing ---------------------------------------

    /// Checks that `name` is free in `parent` and makes the parent upper;
    /// returns the parent's upper path and whether a whiteout holds the name.
    fn prepare_create(&self, st: &mut State, parent: u64, name: &[u8]) -> FsResult<(PathBuf, bool)> {
        self.upper_root()?;
        check_name(name)?;
        if st.dentries.contains_key(&(parent, name.to_vec())) {
            return Err(Errno::EXIST);
        }
        let p = Self::inode(st, parent)?;
        if p.ftype != FType::Dir {
            return Err(Errno::NOTDIR);
        }
        // One look at the upper decides (as `child` would): a whiteout frees
        // the name whatever is below, anything else there takes it. A parent
        // not yet upper has an empty upper directory once copied up.
        let (p_upper, p_lower_dir) = (p.upper, p.lower_dir);
        let whiteout = if p_upper {
            let pp = self.node_upath(st, parent)?;
            match self.upper_stat(&pp.join(OsStr::from_bytes(name)))? {
                Some(s) if is_whiteout(&s) => true,
                Some(_) => return Err(Errno::EXIST),
                None => false,
            }
        } else {
            false
        };
        if !whiteout && p_lower_dir.and_then(|d| self.lower.child(d, name)).is_some() {
            return Err(Errno::EXIST);
        }
        self.copy_up(st, parent)?;
        Ok((self.node_upath(st, parent)?, whiteout))
    }

    /// Moves a staged object into place at `dst`, replacing a whiteout if
    /// there is one (directories exchange with it, as overlayfs does).
    fn install(&self, tmp: &Path, dst: &Path, is_dir: bool, whiteout: bool) -> FsResult<()> {
        if !whiteout {
            return rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, dst, RenameFlags::NOREPLACE);
        }
        if is_dir {
            rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, dst, RenameFlags::EXCHANGE)?;
            rustix::fs::unlink(tmp)?;
            Ok(())
        } else {
            Ok(rustix::fs::rename(tmp, dst)?)
        }
    }

    /// Creates a regular file where no whiteout is, in place with O_EXCL,
    /// when that alone gives it its final owner and mode: this process is
    /// root and so is the caller (or the directory's set-group-id bit sets
    /// the group), and the process umask takes nothing from the mode. The
    /// file then appears whole at once, as overlayfs makes it with the
    /// caller's credentials, with no staging, chown, chmod or rename (about
    /// a quarter of a create's cost). `None`: use the staging directory.
    fn create_in_place(&self, pp: &Path, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Option<File>> {
        let perm = mode & 0o7777;
        let root = rustix::process::geteuid().is_root() && rustix::process::getegid().as_raw() == 0;
        if uid != 0 || !root || process_umask().is_none_or(|m| perm & m != 0) {
            return Ok(None);
        }
        let (_, _, sgid) = self.owner_for(pp, uid, gid);
        if !sgid && gid != 0 {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(perm)
            .custom_flags(libc_o_nofollow())
            .open(pp.join(OsStr::from_bytes(name)))
            .map_err(|e| io_errno(&e))?;
        Ok(Some(file))
    }

    fn owner_for(&self, pp: &Path, uid: u32, gid: u32) -> (u32, u32, bool) {
        match rustix::fs::stat(pp) {
            Ok(s) if s.st_mode & 0o2000 != 0 => (uid, s.st_gid, true),
            _ => (uid, gid, false),
        }
    }

    fn new_inode(&self, st: &mut State, parent: u64, name: &[u8], ftype: FType, lower_dir: Option<u32>) -> u64 {
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(
            ino,
            Inode { names: vec![(parent, name.to_vec())], lower: None, lower_dir, upper: true, ftype, partial: None },
        );
        st.dentries.insert((parent, name.to_vec()), ino);
        self.track_name(st, parent, name);
        ino
    }

    /// Creates a node of any non-directory type (regular files included).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        Ok(self.make_node(parent, name, mode, rdev, uid, gid, target)?.0)
    }

    /// [`Union::mknod`], also giving a new regular file opened for reading
    /// and writing.
    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        target: Option<&[u8]>,
    ) -> FsResult<(Attr, Option<File>)> {
        let mut st = self.lock();
        let (pp, whiteout) = self.prepare_create(&mut st, parent, name)?;
        let ft = FileType::from_raw_mode(mode);
        let regular = target.is_none() && (ft == FileType::RegularFile || mode & 0o170000 == 0);
        if regular
            && !whiteout
            && let Some(file) = self.create_in_place(&pp, name, mode, uid, gid)?
        {
            let ino = self.new_inode(&mut st, parent, name, FType::File, None);
            return Ok((self.attr_locked(&st, ino)?, Some(file)));
        }
        let tmp = self.stage_path(&mut st)?;
        let ftype = if target.is_some() { FType::Symlink } else { FType::of_mode(mode) };
        let mut file = None;
        match target {
            Some(t) => rustix::fs::symlink(OsStr::from_bytes(t), &tmp)?,
            None if ft == FileType::RegularFile || mode & 0o170000 == 0 => {
                file = Some(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(|e| io_errno(&e))?,
                );
            }
            None => rustix::fs::mknodat(rustix::fs::CWD, &tmp, ft, Mode::from_raw_mode(0o600), rdev)?,
        }
        let (uid, gid, _) = self.owner_for(&pp, uid, gid);
        rustix::fs::chownat(
            rustix::fs::CWD,
            &tmp,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if target.is_none() {
            rustix::fs::chmodat(rustix::fs::CWD, &tmp, Mode::from_raw_mode(mode & 0o7777), AtFlags::empty())?;
        }
        self.install(&tmp, &pp.join(OsStr::from_bytes(name)), false, whiteout)?;
        let ino = self.new_inode(&mut st, parent, name, ftype, None);
        Ok((self.attr_locked(&st, ino)?, file))
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let mut st = self.lock();
        let (pp, whiteout) = self.prepare_create(&mut st, parent, name)?;
        let tmp = self.stage_path(&mut st)?;
        rustix::fs::mkdir(&tmp, Mode::from_raw_mode(0o700))?;
        let (uid, gid, sgid) = self.owner_for(&pp, uid, gid);
        rustix::fs::chown(&tmp, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))?;
        let mode = (mode & 0o7777) | if sgid { 0o2000 } else { 0 };
        rustix::fs::chmod(&tmp, Mode::from_raw_mode(mode))?;
        // Over a whiteout the directory must hide what is below; in a merged
        // parent overlayfs marks it opaque anyway (a lookup optimisation).
        if whiteout || Self::inode(&st, parent)?.lower_dir.is_some() {
            rustix::fs::lsetxattr(&tmp, OPAQUE, b"y", XattrFlags::empty())?;
        }
        self.install(&tmp, &pp.join(OsStr::from_bytes(name)), true, whiteout)?;
        let ino = self.new_inode(&mut st, parent, name, FType::Dir, None);
        self.attr_locked(&st, ino)
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let mut st = self.lock();
        if Self::inode(&st, ino)?.ftype == FType::Dir {
            return Err(Errno::PERM);
        }
        let (pp, whiteout) = self.prepare_create(&mut st, parent, name)?;
        self.copy_up(&mut st, ino)?;
        let src = self.node_upath(&st, ino)?;
        let dst = pp.join(OsStr::from_bytes(name));
        if whiteout {
            let tmp = self.stage_path(&mut st)?;
            rustix::fs::link(&src, &tmp)?;
            rustix::fs::rename(&tmp, &dst)?;
        } else {
            rustix::fs::link(&src, &dst)?;
        }
        let s = rustix::fs::statat(rustix::fs::CWD, &dst, AtFlags::SYMLINK_NOFOLLOW)?;
        st.by_upper.insert(s.st_ino, ino);
        Self::inode_mut(&mut st, ino)?.names.push((parent, name.to_vec()));
        st.dentries.insert((parent, name.to_vec()), ino);
        self.track_name(&st, parent, name);
        self.attr_locked(&st, ino)
    }

    /// Whether the lower layers have something at `name` in `parent`.
    fn lower_positive(&self, st: &State, parent: u64, name: &[u8]) -> FsResult<bool> {
        Ok(Self::inode(st, parent)?.lower_dir.is_some_and(|d| self.lower.child(d, name).is_some()))
    }

    fn drop_name(&self, st: &mut State, parent: u64, name: &[u8]) {
        self.track_name(st, parent, name);
        if let Some(ino) = st.dentries.remove(&(parent, name.to_vec()))
            && let Some(node) = st.inodes.get_mut(&ino)
        {
            node.names.retain(|(p, n)| !(*p == parent && n.as_slice() == name));
        }
    }

    fn whiteout(&self, path: &Path) -> FsResult<()> {
        rustix::fs::mknodat(rustix::fs::CWD, path, FileType::CharacterDevice, Mode::empty(), 0)
    }

    /// Removes whiteouts from an upper directory that the union shows empty.
    fn clear_whiteouts(&self, dir: &Path) -> FsResult<()> {
        let rd = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_errno(&e)),
        };
        for e in rd {
            let e = e.map_err(|e| io_errno(&e))?;
            let p = e.path();
            match self.upper_stat(&p)? {
                Some(s) if is_whiteout(&s) => rustix::fs::unlink(&p)?,
                _ => return Err(Errno::NOTEMPTY),
            }
        }
        Ok(())
    }

    /// Removes `name` from `parent`: whiteout where a lower entry would show.
    fn remove(&self, st: &mut State, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        self.upper_root()?;
        let ino = self.child(st, parent, name)?.ok_or(Errno::NOENT)?;
        let node = Self::inode(st, ino)?;
        match (dir, node.ftype == FType::Dir) {
            (true, false) => return Err(Errno::NOTDIR),
            (false, true) => return Err(Errno::ISDIR),
            _ => {}
        }
        let node_upper = node.upper;
        if dir && !self.list(st, ino)?.is_empty() {
            return Err(Errno::NOTEMPTY);
        }
        let positive = self.lower_positive(st, parent, name)?;
        self.copy_up(st, parent)?;
        let path = self.node_upath(st, parent)?.join(OsStr::from_bytes(name));
        if node_upper {
            if dir {
                self.clear_whiteouts(&path)?;
                if positive {
                    // Replace the directory by a whiteout in one step.
                    let tmp = self.stage_path(st)?;
                    self.whiteout(&tmp)?;
                    rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, &path, RenameFlags::EXCHANGE)?;
                    rustix::fs::rmdir(&tmp)?;
                } else {
                    rustix::fs::rmdir(&path)?;
                }
            } else if positive {
                let tmp = self.stage_path(st)?;
                self.whiteout(&tmp)?;
                rustix::fs::rename(&tmp, &path)?;
            } else {
                rustix::fs::unlink(&path)?;
            }
            if let Some(p) = &Self::inode(st, ino)?.partial
                && Self::inode(st, ino)?.names.len() <= 1
            {
                let _ = std::fs::remove_file(&p.map_path);
            }
        } else {
            self.whiteout(&path)?;
        }
        self.drop_name(st, parent, name);
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let mut st = self.lock();
        self.remove(&mut st, parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let mut st = self.lock();
        self.remove(&mut st, parent, name, true)
    }

    // ---- rename ------------------------------------------------------

    /// The redirect overlayfs would record for a directory moved from
    /// `ino`'s current place: its name (same parent) or its absolute path.
    fn redirect_for(&self, st: &State, ino: u64, samedir: bool) -> FsResult<Vec<u8>> {
        let path = self.node_upath(st, ino)?;
        let existing = getxattr_path(&path, REDIRECT)?;
        if let Some(r) = &existing
            && (samedir || r.first() == Some(&b'/'))
        {
            return Ok(r.clone());
        }
        let (_, name) = Self::inode(st, ino)?.names.first().cloned().ok_or(Errno::NOENT)?;
        if samedir {
            return Ok(name);
        }
        // Absolute: walk up, taking each ancestor's redirect where it has one.
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut cur = ino;
        while cur != 1 {
            let node = Self::inode(st, cur)?;
            let (p, n) = node.names.first().cloned().ok_or(Errno::NOENT)?;
            let r = if node.upper { getxattr_path(&self.node_upath(st, cur)?, REDIRECT)? } else { None };
            match r {
                Some(r) if r.first() == Some(&b'/') => {
                    parts.push(r[1..].to_vec());
                    break;
                }
                Some(r) => parts.push(r),
                None => parts.push(n),
            }
            cur = p;
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    fn is_merge(&self, st: &State, ino: u64) -> FsResult<bool> {
        let n = Self::inode(st, ino)?;
        Ok(n.upper && n.lower_dir.is_some())
    }

    fn is_opaque(&self, st: &State, ino: u64) -> FsResult<bool> {
        let n = Self::inode(st, ino)?;
        if !n.upper || n.ftype != FType::Dir {
            return Ok(false);
        }
        Ok(getxattr_path(&self.node_upath(st, ino)?, OPAQUE)?.is_some_and(|v| v == b"y"))
    }

    pub fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], flags: u32) -> FsResult<()> {
        let mut st = self.lock();
        let st = &mut *st;
        self.upper_root()?;
        let exchange = flags & libc_rename_exchange() != 0;
        let noreplace = flags & libc_rename_noreplace() != 0;
        if flags & !(libc_rename_exchange() | libc_rename_noreplace()) != 0 || (exchange && noreplace) {
            return Err(Errno::INVAL);
        }
        check_name(newname)?;
        let src = self.child(st, parent, name)?.ok_or(Errno::NOENT)?;
        if Self::inode(st, newparent)?.ftype != FType::Dir {
            return Err(Errno::NOTDIR);
        }
        let dst = self.child(st, newparent, newname)?;
        if exchange && dst.is_none() {
            return Err(Errno::NOENT);
        }
        if noreplace && dst.is_some() {
            return Err(Errno::EXIST);
        }
        if dst == Some(src) {
            return Ok(());
        }
        let src_dir = Self::inode(st, src)?.ftype == FType::Dir;
        // A directory cannot move below itself.
        if src_dir {
            let mut cur = newparent;
            while cur != 1 {
                if cur == src {
                    return Err(Errno::INVAL);
                }
                cur = Self::inode(st, cur)?.names.first().map(|n| n.0).ok_or(Errno::NOENT)?;
            }
        }
        if let Some(d) = dst {
            let dst_dir = Self::inode(st, d)?.ftype == FType::Dir;
            if dst_dir && exchange {
                let mut cur = parent;
                while cur != 1 {
                    if cur == d {
                        return Err(Errno::INVAL);
                    }
                    cur = Self::inode(st, cur)?.names.first().map(|n| n.0).ok_or(Errno::NOENT)?;
                }
            }
            if !exchange {
                match (src_dir, dst_dir) {
                    (true, false) => return Err(Errno::NOTDIR),
                    (false, true) => return Err(Errno::ISDIR),
                    // A pure upper target is left to the upper rename to refuse,
                    // after the redirect is set (as overlayfs does).
                    (true, true) if Self::inode(st, d)?.lower_dir.is_some() && !self.list(st, d)?.is_empty() => {
                        return Err(Errno::NOTEMPTY);
                    }
                    _ => {}
                }
            }
        }
        let samedir = parent == newparent;
        self.copy_up(st, parent)?;
        self.copy_up(st, newparent)?;
        self.copy_up(st, src)?;
        if let Some(d) = dst {
            self.copy_up(st, d)?;
        }
        let old_opaque = self.is_opaque(st, src)?;
        let src_merge_or_lower = src_dir && Self::inode(st, src)?.lower_dir.is_some();
        if src_dir {
            if src_merge_or_lower {
                let r = self.redirect_for(st, src, samedir)?;
                rustix::fs::lsetxattr(&self.node_upath(st, src)?, REDIRECT, &r, XattrFlags::empty())?;
            } else if !old_opaque && self.is_merge(st, newparent)? {
                rustix::fs::lsetxattr(&self.node_upath(st, src)?, OPAQUE, b"y", XattrFlags::empty())?;
            }
        }
        if exchange && let Some(d) = dst {
            let d_dir = Self::inode(st, d)?.ftype == FType::Dir;
            if d_dir {
                if Self::inode(st, d)?.lower_dir.is_some() {
                    let r = self.redirect_for(st, d, samedir)?;
                    rustix::fs::lsetxattr(&self.node_upath(st, d)?, REDIRECT, &r, XattrFlags::empty())?;
                } else if !self.is_opaque(st, d)? && self.is_merge(st, parent)? {
                    rustix::fs::lsetxattr(&self.node_upath(st, d)?, OPAQUE, b"y", XattrFlags::empty())?;
                }
            }
        }
        let from = self.node_upath(st, parent)?.join(OsStr::from_bytes(name));
        let to = self.node_upath(st, newparent)?.join(OsStr::from_bytes(newname));
        if exchange {
            rustix::fs::renameat_with(rustix::fs::CWD, &from, rustix::fs::CWD, &to, RenameFlags::EXCHANGE)?;
            let a = st.dentries.remove(&(parent, name.to_vec()));
            let b = st.dentries.remove(&(newparent, newname.to_vec()));
            for (ino, old, new) in
                [(a, (parent, name), (newparent, newname)), (b, (newparent, newname), (parent, name))]
            {
                let Some(ino) = ino else { continue };
                if let Some(n) = st.inodes.get_mut(&ino) {
                    for e in n.names.iter_mut() {
                        if e.0 == old.0 && e.1.as_slice() == old.1 {
                            *e = (new.0, new.1.to_vec());
                        }
                    }
                }
                st.dentries.insert((new.0, new.1.to_vec()), ino);
            }
            return Ok(());
        }
        let positive = self.lower_positive(st, parent, name)?;
        if let Some(d) = dst
            && Self::inode(st, d)?.ftype == FType::Dir
        {
            self.clear_whiteouts(&to)?;
        }
        let to_whiteout = self.upper_stat(&to)?.is_some_and(|s| is_whiteout(&s));
        if to_whiteout && (positive || src_dir) {
            // Swap with the whiteout: it stays at the old name if one is due there.
            rustix::fs::renameat_with(rustix::fs::CWD, &from, rustix::fs::CWD, &to, RenameFlags::EXCHANGE)?;
            if !positive {
                rustix::fs::unlink(&from)?;
            }
        } else {
            rustix::fs::rename(&from, &to)?;
            if positive {
                self.whiteout(&from)?;
            }
        }
        if let Some(d) = dst {
            self.drop_name(st, newparent, newname);
            if let Some(n) = st.inodes.get(&d)
                && n.names.is_empty()
                && let Some(p) = &n.partial
            {
                let _ = std::fs::remove_file(&p.map_path);
            }
        }
        st.dentries.remove(&(parent, name.to_vec()));
        if let Some(n) = st.inodes.get_mut(&src) {
            for e in n.names.iter_mut() {
                if e.0 == parent && e.1.as_slice() == name {
                    *e = (newparent, newname.to_vec());
                }
            }
        }
        st.dentries.insert((newparent, newname.to_vec()), src);
        self.track_name(st, parent, name);
        self.track_name(st, newparent, newname);
        Ok(())
    }

    // ---- directories -------------------------------------------------

    /// The union's entries of directory `ino` (without `.` and `..`).
    fn list(&self, st: &mut State, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let node = Self::inode(st, ino)?;
        if node.ftype != FType::Dir {
            return Err(Errno::NOTDIR);
        }
        let (upper, lower_dir) = (node.upper, node.lower_dir);
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if upper {
            let p = self.node_upath(st, ino)?;
            let rd = std::fs::read_dir(&p).map_err(|e| io_errno(&e))?;
            for e in rd {
                let e = e.map_err(|e| io_errno(&e))?;
                let n = e.file_name().as_bytes().to_vec();
                seen.insert(n.clone());
                if ino == 1 && n == WORK_DIR.as_bytes() {
                    continue;
                }
                names.push(n);
            }
        }
        if let Some(d) = lower_dir {
            for &c in self.lower.children(d) {
                let n = &self.lower.node(c).name;
                if !seen.contains(n.as_ref()) {
                    names.push(n.to_vec());
                }
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(c) = self.child(st, ino, &n)? {
                let ft = Self::inode(st, c)?.ftype;
                out.push((n, c, ft));
            }
        }
        Ok(out)
    }

    pub(crate) fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.dir_entries(ino)?;
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    /// A directory's listing as readdir gives it: `.`, `..`, then the union's entries.
    pub(crate) fn dir_entries(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let mut st = self.lock();
        let mut entries = vec![(b".".to_vec(), ino, FType::Dir)];
        let parent = Self::inode(&st, ino)?.names.first().map_or(1, |n| n.0);
        entries.push((b"..".to_vec(), parent, FType::Dir));
        entries.extend(self.list(&mut st, ino)?);
        Ok(entries)
    }

    /// Names in a directory with their inode and type.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let mut st = self.lock();
        self.list(&mut st, ino)
    }

    // ---- handles and data --------------------------------------------

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, Arc::new(h));
        fh
    }

    pub(crate) fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).get(&fh).cloned().ok_or(Errno::BADF)
    }

    /// The file handle `fh`, or for `fh` 0 a read-only handle of `ino` made
    /// for this one request: a read-only mount lets the kernel open files
    /// itself, and its requests then name no handle (`CowFs::no_open`).
    /// `new_reader`: the request is a read from offset 0, taken for a new
    /// reader of the file, which asks for read-ahead and materialisation as
    /// a handle's first read does.
    fn file_handle(&self, fh: u64, ino: u64, new_reader: bool) -> FsResult<Arc<Handle>> {
        if fh != 0 {
            return self.handle(fh);
        }
        if self.writable() {
            // Writable unions see every open (copy-up happens there).
            return Err(Errno::BADF);
        }
        Ok(Arc::new(Handle::File {
            ino,
            file: Mutex::new(None),
            write: false,
            append: false,
            offered: AtomicBool::new(!new_reader),
        }))
    }

    pub(crate) fn release(&self, fh: u64) {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh);
    }

    /// File and directory handles the kernel holds open (its RELEASEs
    /// served).
    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Opens `ino`; `flags` are open(2) flags. Opening for writing copies up.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let acc = flags & 0o3;
        let write = acc != 0;
        let mut st = self.lock();
        let node = Self::inode(&st, ino)?;
        if node.ftype == FType::Dir && write {
            return Err(Errno::ISDIR);
        }
        if write {
            self.copy_up(&mut st, ino)?;
        }
        if flags & 0o1000 != 0 {
            // O_TRUNC (the kernel sends it with atomic_o_trunc).
            self.truncate_locked(&mut st, ino, 0)?;
        }
        drop(st);
        Ok(self.add_handle(Handle::File {
            ino,
            file: Mutex::new(None),
            write,
            append: flags & 0o2000 != 0,
            offered: AtomicBool::new(false),
        }))
    }

    /// Creates and opens a regular file. Also gives the new upper file,
    /// opened for reading and writing, when the kernel may do its I/O
    /// directly (as `Union::backing_file` would).
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Attr, u64, Option<File>)> {
        let (attr, file) = self.make_node(parent, name, (mode & 0o7777) | 0o100000, 0, uid, gid, None)?;
        let fh = self.open(attr.ino, flags & !0o1000)?;
        Ok((attr, fh, file.filter(|_| self.tracker.is_none())))
    }

    /// For FUSE passthrough: the upper file behind `ino`, opened for reading
    /// and writing (every open of the inode shares it), when the kernel may
    /// do its I/O directly: a whole upper regular file. None for lower,
    /// partial and non-regular files, whose data this process serves.
    pub(crate) fn backing_file(&self, ino: u64) -> FsResult<Option<File>> {
        if self.tracker.is_some() {
            // Passed-through writes would not be seen, so not tracked.
            return Ok(None);
        }
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        if !node.upper || node.partial.is_some() || node.ftype != FType::File || node.names.is_empty() {
            return Ok(None);
        }
        let path = self.node_upath(&st, ino)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(|e| io_errno(&e))?;
        Ok(Some(file))
    }

    /// For FUSE passthrough of a lower-only file: its materialised copy,
    /// opened read-only, if the file cache has it.
    pub(crate) fn materialised(&self, ino: u64) -> Option<(Key, File)> {
        if self.tracker.is_some() {
            // A guest's mount: its big files are its disk images, which
            // QEMU opens read-only and then read-write while the first
            // handle is still open (restoring a saved guest). A read-only
            // open passed through to the cached copy would make that
            // second open fail (ETXTBSY, see `fs.rs`), so reads are served
            // here.
            return None;
        }
        let files = self.files.as_ref()?;
        let f = {
            let st = self.lock();
            let node = st.inodes.get(&ino)?;
            if node.upper || node.ftype != FType::File {
                return None;
            }
            self.lower.file(node.lower?)?.clone()
        };
        files.open_entry(&f)
    }

    /// At unmount: background work (materialising) ends; the file being
    /// written is finished.
    pub(crate) fn finish_background(&self) {
        if let Some(r) = &self.readahead {
            r.stop();
        }
        if let Some(f) = &self.files {
            f.finish();
        }
    }

    /// Whether `ino` shows lower data only (the kernel may keep its cache).
    pub(crate) fn is_lower_only(&self, ino: u64) -> bool {
        let st = self.lock();
        st.inodes.get(&ino).is_some_and(|n| !n.upper)
    }

    /// The upper file of a handle, opened on first use.
    fn upper_file(&self, h: &Handle) -> FsResult<Option<Arc<File>>> {
        let Handle::File { ino, file, write, append, .. } = h else { return Err(Errno::ISDIR) };
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &*f {
            return Ok(Some(f.clone()));
        }
        let st = self.lock();
        let node = Self::inode(&st, *ino)?;
        if !node.upper || node.partial.is_some() {
            return Ok(None);
        }
        let path = self.node_upath(&st, *ino)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(*write)
            .append(*append)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(|e| io_errno(&e))?;
        let file = Arc::new(file);
        *f = Some(file.clone());
        Ok(Some(file))
    }

    /// Reads lower file `l` at `off`; a failure is logged with the chunk
    /// and path and gives EIO.
    fn read_lower_at(&self, l: u32, off: u64, buf: &mut [u8]) -> FsResult<usize> {
        let f = self.lower.file(l).ok_or(Errno::IO)?;
        read_lower(&self.store, &self.cache, f, off, buf).map_err(|(id, err)| {
            let path = xenod_store::display_path(&self.lower.path(l));
            match id {
                Some(id) => tracing::error!(chunk = %id, path = %path, "read failed: {err}"),
                None => tracing::error!(path = %path, "read failed: {err}"),
            }
            Errno::IO
        })
    }

    fn lower_reader(&self, l: u32) -> impl Fn(u64, &mut [u8]) -> FsResult<()> + '_ {
        move |off, buf| {
            let n = self.read_lower_at(l, off, buf)?;
            buf[n..].fill(0);
            Ok(())
        }
    }

    /// Reads `size` bytes at `off` of handle `fh` of `ino` (`fh` 0: see
    /// [`Self::file_handle`]).
    pub fn read(&self, fh: u64, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.file_handle(fh, ino, off == 0)?;
        let Handle::File { ino, offered, .. } = &*h else { return Err(Errno::ISDIR) };
        let (partial, lower) = {
            let st = self.lock();
            let n = Self::inode(&st, *ino)?;
            (n.partial.clone(), if n.upper { None } else { n.lower })
        };
        let mut buf = vec![0u8; size as usize];
        let n = if let Some(p) = partial {
            let l = self.lower.find(&p.lower_path).ok_or(Errno::IO)?;
            p.read(off, &mut buf, &self.lower_reader(l))?
        } else if let Some(n) = lower.filter(|_| fh == 0).and_then(|l| self.read_entry(*ino, l, off, &mut buf)) {
            n
        } else if let Some(l) = lower {
            let n = self.read_lower_at(l, off, &mut buf)?;
            if !offered.swap(true, Ordering::Relaxed) {
                // A walk reads the next files next: decode them meanwhile.
                if let Some(r) = &self.readahead {
                    r.after(l);
                }
                // Data is wanted: have the file materialised, so that later
                // opens pass through (see `filecache` for why not at open).
                if let Some(files) = &self.files
                    && let Some(f) = self.lower.file(l)
                {
                    files.request(f, || xenod_store::display_path(&self.lower.path(l)));
                }
            }
            n
        } else {
            let f = self.upper_file(&h)?.ok_or(Errno::IO)?;
            read_full_at(&f, &mut buf, off)?
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Without passthrough (no handle: the kernel opened the file itself),
    /// a lower file the file cache holds is read from there rather than
    /// decoded again. None: no entry, or it could not be read (logged), and
    /// the caller decodes.
    fn read_entry(&self, ino: u64, l: u32, off: u64, buf: &mut [u8]) -> Option<usize> {
        let f = self.entry(ino)?;
        match read_full_at(&f, buf, off) {
            Ok(n) => Some(n),
            Err(e) => {
                let path = xenod_store::display_path(&self.lower.path(l));
                tracing::warn!(path = %path, "reading the file cache's copy at offset {off} failed ({e}); decoding the chunks instead");
                self.entries.lock().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != ino);
                None
            }
        }
    }

    /// The file-cache entry of lower file `ino`, if the cache holds it
    /// (see [`Self::entries`]).
    fn entry(&self, ino: u64) -> Option<Arc<File>> {
        {
            let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = e.iter().position(|(i, _)| *i == ino) {
                let hit = e.remove(i);
                let f = hit.1.clone();
                e.push(hit);
                return Some(f);
            }
        }
        let (_, f) = self.materialised(ino)?;
        let f = Arc::new(f);
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() >= OPEN_ENTRIES {
            e.remove(0);
        }
        e.push((ino, f.clone()));
        Some(f)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        let h = self.handle(fh)?;
        let Handle::File { ino, append, .. } = &*h else { return Err(Errno::ISDIR) };
        let partial = Self::inode(&self.lock(), *ino)?.partial.clone();
        if let Some(p) = partial {
            let off = if *append { p.file.metadata().map_err(|e| io_errno(&e))?.len() } else { off };
            let l = self.lower.find(&p.lower_path).ok_or(Errno::IO)?;
            let n = p.write(off, data, &self.lower_reader(l))?;
            if let Some(t) = &self.tracker {
                t.wrote(*ino, off, n);
            }
            return Ok(n);
        }
        let f = self.upper_file(&h)?.ok_or(Errno::IO)?;
        // With O_APPEND, Linux's pwrite appends whatever the offset.
        f.write_all_at(data, off).map_err(|e| io_errno(&e))?;
        if let Some(t) = &self.tracker {
            if *append { t.whole_ino(*ino) } else { t.wrote(*ino, off, data.len()) }
        }
        Ok(data.len())
    }

    pub fn fsync(&self, fh: u64, ino: u64, datasync: bool) -> FsResult<()> {
        let h = self.file_handle(fh, ino, false)?;
        let Handle::File { ino, .. } = &*h else { return Ok(()) };
        let partial = Self::inode(&self.lock(), *ino)?.partial.clone();
        if let Some(p) = partial {
            return p.sync();
        }
        if let Some(f) = self.upper_file(&h)? {
            if datasync { f.sync_data() } else { f.sync_all() }.map_err(|e| io_errno(&e))?;
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, ino: u64, off: u64, whence: i32) -> FsResult<u64> {
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        let h = self.file_handle(fh, ino, false)?;
        let Handle::File { ino, .. } = &*h else { return Err(Errno::INVAL) };
        let (partial, lower) = {
            let st = self.lock();
            let n = Self::inode(&st, *ino)?;
            (n.partial.clone(), if n.upper { None } else { n.lower })
        };
        let hole = match whence {
            SEEK_DATA => false,
            SEEK_HOLE => true,
            _ => return Err(Errno::INVAL),
        };
        if let Some(p) = partial {
            return p.seek_data(off, hole);
        }
        if let Some(l) = lower {
            let f = self.lower.file(l).ok_or(Errno::INVAL)?;
            if off >= f.size {
                return Err(Errno::NXIO);
            }
            if f.host.is_some() {
                // Host files are shown as all data.
                return Ok(if hole { f.size } else { off });
            }
            let mut i = f.extent_at(off);
            while i < f.extents.len() {
                if matches!(f.extents[i], Extent::Hole { .. }) == hole {
                    return Ok(f.starts[i].max(off));
                }
                i += 1;
            }
            return if hole { Ok(f.size) } else { Err(Errno::NXIO) };
        }
        let f = self.upper_file(&h)?.ok_or(Errno::INVAL)?;
        let pos = if hole { rustix::fs::SeekFrom::Hole(off) } else { rustix::fs::SeekFrom::Data(off) };
        rustix::fs::seek(&*f, pos)
    }

    // ---- setattr and xattrs ------------------------------------------

    fn truncate_locked(&self, st: &mut State, ino: u64, size: u64) -> FsResult<()> {
        self.copy_up(st, ino)?;
        if let Some(t) = &self.tracker {
            t.whole_ino(ino);
        }
        let node = Self::inode(st, ino)?;
        if let Some(p) = &node.partial {
            return p.truncate(size);
        }
        let path = self.node_upath(st, ino)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(|e| io_errno(&e))?;
        f.set_len(size).map_err(|e| io_errno(&e))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Option<SystemTime>>,
        mtime: Option<Option<SystemTime>>,
    ) -> FsResult<Attr> {
        let mut st = self.lock();
        let st = &mut *st;
        self.upper_root()?;
        if let Some(s) = size {
            if Self::inode(st, ino)?.ftype == FType::Dir {
                return Err(Errno::ISDIR);
            }
            self.truncate_locked(st, ino, s)?;
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            self.copy_up(st, ino)?;
            let path = self.node_upath(st, ino)?;
            if uid.is_some() || gid.is_some() {
                rustix::fs::chownat(
                    rustix::fs::CWD,
                    &path,
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            if let Some(m) = mode {
                rustix::fs::chmodat(rustix::fs::CWD, &path, Mode::from_raw_mode(m & 0o7777), AtFlags::empty())?;
            }
            if atime.is_some() || mtime.is_some() {
                let conv = |t: Option<Option<SystemTime>>| -> rustix::fs::Timespec {
                    match t {
                        None => rustix::fs::Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
                        Some(None) => rustix::fs::Timespec { tv_sec: 0, tv_nsec: UTIME_NOW },
                        Some(Some(t)) => {
                            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                            rustix::fs::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as _ }
                        }
                    }
                };
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &path,
                    &rustix::fs::Timestamps { last_access: conv(atime), last_modification: conv(mtime) },
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
        }
        self.attr_locked(st, ino)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        if node.ftype != FType::Symlink {
            return Err(Errno::INVAL);
        }
        if node.upper {
            return Ok(rustix::fs::readlink(self.node_upath(&st, ino)?, Vec::new())?.into_bytes());
        }
        match &self.lower.node(node.lower.ok_or(Errno::IO)?).kind {
            LKind::Symlink(t) => Ok(t.to_vec()),
            _ => Err(Errno::INVAL),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        if node.upper {
            if private_xattr(name) {
                return Err(Errno::NODATA);
            }
            let n = std::str::from_utf8(name).map_err(|_| Errno::NODATA)?;
            return getxattr_path(&self.node_upath(&st, ino)?, n)?.ok_or(Errno::NODATA);
        }
        let l = self.lower.node(self.lower.data_node(node.lower.ok_or(Errno::IO)?));
        l.xattrs.iter().find(|x| x.name == name).map(|x| x.value.clone()).ok_or(Errno::NODATA)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        let xs = if node.upper {
            list_xattrs(&self.node_upath(&st, ino)?)?.into_iter().filter(|x| !private_xattr(&x.name)).collect()
        } else {
            self.lower.node(self.lower.data_node(node.lower.ok_or(Errno::IO)?)).xattrs.to_vec()
        };
        let mut out = Vec::new();
        for x in xs {
            out.extend_from_slice(&x.name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if private_xattr(name) {
            return Err(Errno::PERM);
        }
        let mut st = self.lock();
        self.upper_root()?;
        self.copy_up(&mut st, ino)?;
        let p = self.node_upath(&st, ino)?;
        rustix::fs::lsetxattr(p, OsStr::from_bytes(name), value, XattrFlags::from_bits_retain(flags as u32))
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if private_xattr(name) {
            return Err(Errno::NODATA);
        }
        let mut st = self.lock();
        self.upper_root()?;
        // Nothing to copy up for a name the file does not have.
        let node = Self::inode(&st, ino)?;
        if !node.upper {
            let l = self.lower.node(self.lower.data_node(node.lower.ok_or(Errno::IO)?));
            if !l.xattrs.iter().any(|x| x.name == name) {
                return Err(Errno::NODATA);
            }
        }
        self.copy_up(&mut st, ino)?;
        let p = self.node_upath(&st, ino)?;
        rustix::fs::lremovexattr(p, OsStr::from_bytes(name))
    }

    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        match &self.upper {
            Some(u) => Ok(rustix::fs::statvfs(u)?),
            None => Ok(rustix::fs::statvfs(self.store.root())?),
        }
    }

    // ---- for commit --------------------------------------------------

    /// The upper path of `ino`, if it has an upper object.
    pub(crate) fn upper_path_of(&self, ino: u64) -> FsResult<Option<PathBuf>> {
        let st = self.lock();
        let n = Self::inode(&st, ino)?;
        if !n.upper {
            return Ok(None);
        }
        Ok(Some(self.node_upath(&st, ino)?))
    }

    /// The lower node shown (or partially backing) `ino`.
    pub(crate) fn lower_of(&self, ino: u64) -> FsResult<(Option<u32>, Option<Arc<Partial>>)> {
        let st = self.lock();
        let n = Self::inode(&st, ino)?;
        Ok((n.lower, n.partial.clone()))
    }

    pub(crate) fn read_partial(&self, p: &Partial, off: u64, buf: &mut [u8]) -> FsResult<usize> {
        let l = self.lower.find(&p.lower_path).ok_or(Errno::IO)?;
        p.read(off, buf, &self.lower_reader(l))
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(())
}

const UTIME_NOW: i64 = (1 << 30) - 1;
const UTIME_OMIT: i64 = (1 << 30) - 2;

/// This process's umask, from `/proc/self/status` (reading it with
/// `umask(2)` would change it for every thread meanwhile); `None` if it
/// cannot be read.
fn process_umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

const fn libc_o_nofollow() -> i32 {
    0o400000
}
const fn libc_rename_noreplace() -> u32 {
    1
}
const fn libc_rename_exchange() -> u32 {
    2
}

/// Reads `buf.len()` bytes at `off` of `f`, fewer at its end.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_errno(&e)),
        }
    }
    Ok(done)
}
