//! The FUSE boundary: fuser callbacks as thin wrappers over [`Union`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::filecache::Key;
use crate::union::{Attr, FType, Handle, Union};

/// Lower-only entries never change under the kernel's feet.
const LOWER_TTL: Duration = Duration::from_secs(24 * 3600);
const UPPER_TTL: Duration = Duration::from_secs(1);

/// The fuser filesystem over a [`Union`].
pub struct CowFs {
    pub(crate) union: Arc<Union>,
    /// Whether to ask for FUSE passthrough (the kernel may still refuse it).
    want_passthrough: bool,
    /// Whether the kernel granted it at init.
    passthrough: bool,
    /// Whether to serve over FUSE's io_uring transport when the kernel
    /// offers it (`fuse.enable_uring`).
    want_uring: bool,
    /// Open files by inode: how each is open, for passthrough's rules.
    opens: Mutex<HashMap<INodeNo, Opens>>,
    /// Signalled when an inode leaves `opens` while an open waits for that.
    closes: Condvar,
    /// Opens waiting on `closes`; changed and read with `opens` held.
    /// std's `notify_all` is a futex syscall even with nobody waiting, which
    /// every RELEASE would pay.
    waiting: AtomicUsize,
    /// How each open file handle was opened.
    handles: Mutex<HashMap<FileHandle, (INodeNo, bool)>>,
    /// The kernel opens directories without asking (FUSE_NO_OPENDIR_SUPPORT).
    no_opendir: bool,
    /// Asked for: on a read-only union, have the kernel open files without
    /// asking either ([`Self::no_open`]).
    want_no_open: bool,
    /// The kernel opens files without asking (FUSE_NO_OPEN_SUPPORT): the
    /// first OPEN is answered ENOSYS.
    no_open: bool,
    /// Listings being read without an OPENDIR handle, by directory.
    listings: Mutex<HashMap<INodeNo, Arc<Listing>>>,
}

type Listing = Vec<(Vec<u8>, u64, FType)>;

/// Listings kept for readers that have not reached the end.
const MAX_LISTINGS: usize = 1024;

/// The kernel's rule for one inode: while any handle is open in passthrough
/// mode, every open must pass through the same backing file; while any is
/// open through this process (cached), none may pass through. A mismatch
/// fails the open with EIO, so a file copied up while a cached handle is
/// still open is served here until that handle closes.
///
/// The backing file of a lower-only inode is its materialised copy in the
/// file cache, which must never be written: an open for writing (which
/// would copy up and need the upper file as backing) is refused with
/// ETXTBSY while such handles are open (after waiting [`RELEASE_WAIT`]
/// for releases in flight), as is any open of the inode once something
/// else copied it up meanwhile; both clear when the readers close.
/// overlayfs has no such case (its readers keep the lower file), but the
/// kernel allows one backing file per FUSE inode.
#[derive(Default)]
struct Opens {
    cached: u32,
    through: u32,
    backing: Option<BackingId>,
    /// The backing file is this file-cache entry (read-only lower data).
    lower: Option<Key>,
}

/// How long an open for writing waits for passed-through readers of the
/// file to be released before it fails with ETXTBSY.
const RELEASE_WAIT: Duration = Duration::from_millis(200);

/// open(2) flags that make an open write (or truncate) the file.
const O_ACCMODE: i32 = 0o3;
const O_TRUNC: i32 = 0o1000;

impl CowFs {
    pub fn new(union: Arc<Union>) -> Self {
        Self::with_passthrough(union, true)
    }

    /// `passthrough`: let the kernel do file I/O directly (FUSE
    /// passthrough, Linux 6.9+) when it offers it: whole upper files, and
    /// lower files the file cache holds.
    pub fn with_passthrough(union: Arc<Union>, passthrough: bool) -> Self {
        Self {
            union,
            want_passthrough: passthrough,
            passthrough: false,
            want_uring: true,
            opens: Mutex::new(HashMap::new()),
            closes: Condvar::new(),
            waiting: AtomicUsize::new(0),
            handles: Mutex::new(HashMap::new()),
            no_opendir: false,
            want_no_open: false,
            no_open: false,
            listings: Mutex::new(HashMap::new()),
        }
    }

    /// `on`: serve over FUSE's io_uring transport (Linux 6.14+) when the
    /// kernel offers it, the `fuse.enable_uring` module parameter being Y
    /// when the mount is made. Each CPU then has its own request queue and a
    /// server thread pinned to it, so a request and its reply stay on the
    /// caller's CPU instead of waking a thread on another one.
    pub fn uring(mut self, on: bool) -> Self {
        self.want_uring = on;
        self
    }

    /// `on`: on a read-only union, have the kernel open files itself, as it
    /// does directories: the first OPEN is answered ENOSYS, after which the
    /// kernel sends neither OPEN nor RELEASE and keeps the pages it read
    /// (every file of a read-only union is immutable). A walk that opens
    /// every file then costs no round trip per file, which on a host where
    /// a switch between processes is dear (a paravirtualised VM) is most
    /// of its time. The price: no passthrough. Reads are served by this
    /// process (from the file cache's copy where there is one), and a big
    /// file read warm comes from the FUSE inode's pages, which measured
    /// about half the speed of the kernel reading its backing file.
    /// Ignored on a writable union, which must see opens for writing to
    /// copy up there.
    pub fn no_open(mut self, on: bool) -> Self {
        self.want_no_open = on;
        self
    }

    fn lock_opens(&self) -> std::sync::MutexGuard<'_, HashMap<INodeNo, Opens>> {
        self.opens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides how handle `fh` of `ino` is opened and replies. `opens` is
    /// held from before the union opened the file, so no other open of the
    /// inode can decide differently meanwhile.
    fn reply_open(&self, opens: &mut HashMap<INodeNo, Opens>, ino: INodeNo, fh: u64, write: bool, reply: ReplyOpen) {
        let fh = FileHandle(fh);
        let lower_only = self.union.is_lower_only(ino.0);
        // Lower files never change: keep their pages across opens. Upper
        // files may have been written through a backing file meanwhile.
        let flags = if lower_only { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
        let o = opens.entry(ino).or_default();
        if o.lower.is_some() && !lower_only {
            // Copied up (by a setattr, rename, link...) while readers pass
            // through to the lower copy: the upper file cannot be served
            // until they close.
            self.union.release(fh.0);
            return reply.error(Errno::ETXTBSY);
        }
        if self.passthrough && o.cached == 0 {
            if o.backing.is_none() {
                let file = if lower_only {
                    if write { None } else { self.union.materialised(ino.0).map(|(k, f)| (Some(k), f)) }
                } else {
                    match self.union.backing_file(ino.0) {
                        Ok(f) => f.map(|f| (None, f)),
                        Err(e) => {
                            self.union.release(fh.0);
                            return reply.error(errno(e));
                        }
                    }
                };
                if let Some((key, file)) = file {
                    match reply.open_backing(&file) {
                        Ok(b) => {
                            o.backing = Some(b);
                            if let (Some(k), Some(files)) = (key, &self.union.files) {
                                files.hold(k);
                                o.lower = Some(k);
                            }
                        }
                        Err(e) => tracing::debug!(ino = ino.0, "no passthrough: {e}"),
                    }
                }
            }
            if let Some(b) = &o.backing {
                o.through += 1;
                // The kernel refuses (EIO) passthrough opens with any flag
                // outside FOPEN_PASSTHROUGH_MASK, FOPEN_KEEP_CACHE included.
                reply.opened_passthrough(fh, FopenFlags::empty(), b);
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, (ino, true));
                return;
            }
        }
        if o.through > 0 {
            // Cannot happen for a file that stays upper; refuse rather than
            // have the kernel fail the open.
            self.union.release(fh.0);
            return reply.error(Errno::EBUSY);
        }
        o.cached += 1;
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, (ino, false));
        reply.opened(fh, flags);
    }

    /// The listing a READDIR at `offset` continues: the open handle's, or
    /// (no OPENDIR, `fh` 0) the one taken at offset 0 of this directory.
    fn listing(&self, ino: INodeNo, fh: FileHandle, offset: u64) -> Result<Arc<Listing>, Errno> {
        if fh.0 != 0 {
            let h = self.union.handle(fh.0).map_err(errno)?;
            let Handle::Dir { entries } = &*h else { return Err(Errno::ENOTDIR) };
            return Ok(Arc::new(entries.clone()));
        }
        let mut l = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        if offset != 0
            && let Some(e) = l.get(&ino)
        {
            return Ok(e.clone());
        }
        let e = Arc::new(self.union.dir_entries(ino.0).map_err(errno)?);
        if l.len() >= MAX_LISTINGS {
            // Readers that stopped midway: forget their listings.
            l.clear();
        }
        l.insert(ino, e.clone());
        Ok(e)
    }

    /// A listing was read to its end.
    fn listed(&self, ino: INodeNo, fh: FileHandle) {
        if fh.0 == 0 {
            self.listings.lock().unwrap_or_else(|e| e.into_inner()).remove(&ino);
        }
    }

    fn closed(&self, fh: FileHandle) {
        let Some((ino, through)) = self.handles.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh) else { return };
        let mut opens = self.lock_opens();
        if let Some(o) = opens.get_mut(&ino) {
            if through {
                o.through = o.through.saturating_sub(1);
            } else {
                o.cached = o.cached.saturating_sub(1);
            }
            if o.through == 0 && o.cached == 0 {
                // Dropping the backing id closes it in the kernel.
                if let (Some(k), Some(files)) = (o.lower, &self.union.files) {
                    files.unhold(k);
                }
                opens.remove(&ino);
                if self.waiting.load(Ordering::Relaxed) > 0 {
                    self.closes.notify_all();
                }
            }
        }
    }
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn ftype(t: FType) -> FileType {
    match t {
        FType::Dir => FileType::Directory,
        FType::File => FileType::RegularFile,
        FType::Symlink => FileType::Symlink,
        FType::CharDev => FileType::CharDevice,
        FType::BlockDev => FileType::BlockDevice,
        FType::Fifo => FileType::NamedPipe,
        FType::Socket => FileType::Socket,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: ftype(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.immutable { LOWER_TTL } else { UPPER_TTL }
}

fn entry(reply: ReplyEntry, r: Result<Attr, rustix::io::Errno>) {
    match r {
        Ok(a) => reply.entry(&ttl(&a), &fattr(&a), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), rustix::io::Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn time(t: TimeOrNow) -> Option<SystemTime> {
    match t {
        TimeOrNow::SpecificTime(t) => Some(t),
        TimeOrNow::Now => None,
    }
}

impl Filesystem for CowFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Readdirplus on every READDIR, not only the first of a listing
        // (FUSE_READDIRPLUS_AUTO): with AUTO a directory larger than one
        // 32 KiB reply (/etc/ssl/certs, /usr/bin) had its later entries
        // listed without attributes, and a walk then sent a LOOKUP per
        // entry (1,011 of them for find or tar over Debian minbase). Our
        // attributes are in memory, so the plus form costs nothing more.
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_EXPORT_SUPPORT;
        let _ = config.add_capabilities(want & config.capabilities());
        // Kernels that offer it (5.1+) take ENOSYS from OPENDIR as "open
        // directories yourself", caching every listing; changes made
        // through the mount still invalidate a directory's cached listing.
        self.no_opendir = config.capabilities().contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        self.no_open = self.want_no_open
            && !self.union.writable()
            && config.capabilities().contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        let _ = config.set_max_readahead(1 << 20);
        // The kernel sends at most max_pages (256, 1 MiB) per write anyway;
        // over io_uring each queue entry's buffer is this large.
        let _ = config.set_max_write(1 << 20);
        if self.want_uring && config.capabilities().contains(InitFlags::FUSE_OVER_IO_URING) {
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
        }
        // Passthrough needs a stacking depth of at least 1; 1 (not 2) keeps
        // the mount usable as a lower layer of the kernel's overlayfs.
        if self.want_passthrough
            && !self.no_open
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough = true;
        } else if let Some(files) = self.union.files.as_ref().filter(|_| !self.no_open) {
            // Without opens the cache still serves reads (`Union::read`).
            files.deactivate();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.union.lookup(parent.0, name.as_bytes()))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.union.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &fattr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.union.setattr(ino.0, mode, uid, gid, size, atime.map(time), mtime.map(time)) {
            Ok(a) => reply.attr(&ttl(&a), &fattr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.union.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let mode = (mode & !0o7777) | (mode & 0o7777 & !umask);
        // The kernel's encoding is glibc's makedev() for 32-bit numbers.
        let rdev = rdev as u64;
        entry(reply, self.union.mknod(parent.0, name.as_bytes(), mode, rdev, req.uid(), req.gid(), None))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        entry(reply, self.union.mkdir(parent.0, name.as_bytes(), mode & !umask, req.uid(), req.gid()))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.union.unlink(parent.0, name.as_bytes()))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.union.rmdir(parent.0, name.as_bytes()))
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let t = target.as_os_str().as_bytes();
        entry(reply, self.union.mknod(parent.0, link_name.as_bytes(), 0o120777, 0, req.uid(), req.gid(), Some(t)))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.union.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), flags.bits()))
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        entry(reply, self.union.link(ino.0, newparent.0, newname.as_bytes()))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            // From now on the kernel opens files itself (`Self::no_open`).
            return reply.error(Errno::ENOSYS);
        }
        let write = flags.0 & O_ACCMODE != 0 || flags.0 & O_TRUNC != 0;
        let mut opens = self.lock_opens();
        // Refused before copy-up while readers pass through to the lower
        // copy (see `Opens`). The kernel sends RELEASE without waiting for
        // it, so a reader closed just before this open may not have been
        // handled yet (another worker holds it): wait a little for it.
        let deadline = Instant::now() + RELEASE_WAIT;
        while write && opens.get(&ino).is_some_and(|o| o.lower.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return reply.error(Errno::ETXTBSY);
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            opens = self.closes.wait_timeout(opens, left).unwrap_or_else(|e| e.into_inner()).0;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match self.union.open(ino.0, flags.0) {
            Ok(fh) => self.reply_open(&mut opens, ino, fh, write, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Read straight into the reply's buffer (over io_uring, the ring
        // entry's; else the server thread's, kept between requests): no
        // allocation, no zeroing and no extra copy per READ. Only the
        // bytes read are sent.
        reply.data_with(size as usize, |buf| {
            let n = self.union.read_into(fh.0, ino.0, offset, buf).map_err(errno)?;
            crate::stats::bytes(&crate::stats::COUNTERS.read_bytes, n);
            Ok(n)
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.union.write(fh.0, offset, data) {
            Ok(n) => {
                crate::stats::bytes(&crate::stats::COUNTERS.written_bytes, n);
                reply.written(n as u32)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Nothing to do at close (writes are not buffered here); ENOSYS
        // makes the kernel stop sending FLUSH, saving a round trip per close.
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.closed(fh);
        self.union.release(fh.0);
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.union.fsync(fh.0, ino.0, datasync))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir {
            // From now on the kernel opens directories itself, with
            // FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, and sends no OPENDIR or
            // RELEASEDIR: two round trips less per directory walked.
            return reply.error(Errno::ENOSYS);
        }
        // A directory only lower layers show never changes: the kernel may
        // keep its listing across opens. Others are listed afresh per open
        // (changes made through the mount invalidate the kernel's copy anyway).
        let flags = if self.union.is_lower_only(ino.0) {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        match self.union.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.listing(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let mut full = false;
        for (i, (name, ino, t)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, ftype(*t), OsStr::from_bytes(name)) {
                full = true;
                break;
            }
        }
        if !full {
            self.listed(ino, fh);
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = match self.listing(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let mut full = false;
        for (i, (name, ino, _)) in entries.iter().enumerate().skip(offset as usize) {
            let Ok(a) = self.union.getattr(*ino) else { continue };
            let ttl = if name == b"." || name == b".." { Duration::ZERO } else { ttl(&a) };
            if reply.add(INodeNo(*ino), i as u64 + 1, OsStr::from_bytes(name), &ttl, &fattr(&a), Generation(0)) {
                full = true;
                break;
            }
        }
        if !full {
            self.listed(ino, fh);
        }
        reply.ok()
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.union.release(fh.0);
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.union.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.union.setxattr(ino.0, name.as_bytes(), value, flags))
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.union.getxattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.union.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.union.removexattr(ino.0, name.as_bytes()))
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.union.create(parent.0, name.as_bytes(), mode & !umask, flags, req.uid(), req.gid()) {
            Ok((a, fh, file)) => {
                let (ino, fh) = (INodeNo(a.ino), FileHandle(fh));
                let mut opens = self.lock_opens();
                let o = opens.entry(ino).or_default();
                // A new upper file: pass its I/O through, which also spares
                // the first write's security.capability lookup.
                if self.passthrough
                    && o.cached == 0
                    && let Some(file) = file
                {
                    if o.backing.is_none() {
                        match reply.open_backing(&file) {
                            Ok(b) => o.backing = Some(b),
                            Err(e) => tracing::debug!(ino = ino.0, "no passthrough: {e}"),
                        }
                    }
                    if let Some(b) = &o.backing {
                        o.through += 1;
                        self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, (ino, true));
                        return reply.created_passthrough(
                            &ttl(&a),
                            &fattr(&a),
                            Generation(0),
                            fh,
                            FopenFlags::empty(),
                            b,
                        );
                    }
                }
                if o.through > 0 {
                    self.union.release(fh.0);
                    return reply.error(Errno::EBUSY);
                }
                o.cached += 1;
                self.handles.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, (ino, false));
                reply.created(&ttl(&a), &fattr(&a), Generation(0), fh, FopenFlags::empty())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        match self.union.lseek(fh.0, ino.0, offset.max(0) as u64, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(e)),
        }
    }
}
