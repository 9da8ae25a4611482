//! Handles and file data: open, read, write, fsync, lseek, truncate,
//! release, and the files the kernel may read or write directly (FUSE
//! passthrough, the file cache).
//!
//! Reads and writes move data outside the union's lock, taking it only to
//! read an inode's state; opening for writing (or truncating) copies up
//! under it. A file's data comes from exactly one of its partial file
//! (clean blocks from the lower file), its lower file (the chunks, or the
//! file cache's copy) or its upper file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::OFlags;
use xenod_store::Extent;

use crate::cache::read_lower;
use crate::error::{Errno, FsResult, io_errno};
use crate::filecache::Key;
use crate::partial::Partial;
use crate::quota::allocated;

use super::{FType, Handle, State, Union, upper};

/// Bound of [`Union::entries`].
const OPEN_ENTRIES: usize = 8;

impl Union {
    pub(super) fn add_handle(&self, h: Handle) -> u64 {
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
    pub(super) fn file_handle(&self, fh: u64, ino: u64, new_reader: bool) -> FsResult<Arc<Handle>> {
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
        let ino = {
            let mut hs = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match hs.remove(&fh).as_deref() {
                Some(Handle::File { ino, .. }) if !Self::has_handle(&hs, *ino) => *ino,
                _ => return,
            }
        };
        // The last handle of an object with no name left: let it go.
        let mut st = self.lock();
        if let Some(n) = st.inodes.get_mut(&ino)
            && n.names.is_empty()
        {
            n.orphan = None;
        }
    }

    /// Whether a file handle of `ino` is open.
    fn has_handle(hs: &std::collections::HashMap<u64, Arc<Handle>>, ino: u64) -> bool {
        hs.values().any(|h| matches!(**h, Handle::File { ino: i, .. } if i == ino))
    }

    /// Whether the kernel holds `ino` open.
    pub(super) fn is_open(&self, ino: u64) -> bool {
        Self::has_handle(&self.handles.lock().unwrap_or_else(|e| e.into_inner()), ino)
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
        // Under the lock: an unlink sees the handle and keeps the object.
        Ok(self.add_handle(Handle::File {
            ino,
            file: Mutex::new(None),
            write,
            append: flags & 0o2000 != 0,
            offered: AtomicBool::new(false),
        }))
    }

    /// Opens the upper object of `ino` with `flags` (at its name, or the
    /// object itself if it has none left).
    fn open_upper(&self, st: &State, ino: u64, flags: OFlags) -> FsResult<File> {
        let node = Self::inode(st, ino)?;
        match &node.orphan {
            Some(fd) if node.names.is_empty() => upper::reopen(&**fd, flags),
            _ => self.node_at(st, ino)?.open(flags, 0),
        }
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
        let mut flags = if *write { OFlags::RDWR } else { OFlags::RDONLY };
        if *append {
            flags |= OFlags::APPEND;
        }
        let file = Arc::new(self.open_upper(&st, *ino, flags)?);
        *f = Some(file.clone());
        Ok(Some(file))
    }

    /// Reads `size` bytes at `off` of handle `fh` of `ino` (`fh` 0: see
    /// `Self::file_handle`).
    pub fn read(&self, fh: u64, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(fh, ino, off, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads `buf.len()` bytes at `off` of handle `fh` of `ino` into `buf`;
    /// returns how many were read (`buf[..n]`; the rest is left as it was,
    /// so a caller may hand in a buffer it reuses, never zeroed).
    pub fn read_into(&self, fh: u64, ino: u64, off: u64, buf: &mut [u8]) -> FsResult<usize> {
        let h = self.file_handle(fh, ino, off == 0)?;
        let Handle::File { ino, offered, .. } = &*h else { return Err(Errno::ISDIR) };
        let (partial, lower) = {
            let st = self.lock();
            let n = Self::inode(&st, *ino)?;
            (n.partial.clone(), if n.upper { None } else { n.lower })
        };
        if lower.is_some()
            && let Some(files) = &self.files
        {
            // Materialising waits for reads like this one to pause.
            files.reading();
        }
        let n = if let Some(p) = partial {
            let l = self.lower.find(&p.lower_path).ok_or(Errno::IO)?;
            p.read(off, buf, &self.lower_reader(l))?
        } else if let Some(n) = lower.filter(|_| fh == 0).and_then(|l| self.read_entry(*ino, l, off, buf)) {
            n
        } else if let Some(l) = lower {
            // Before this read's own chunks: the next ones are decoded
            // meanwhile.
            if let Some(r) = &self.readahead
                && let Some(f) = self.lower.file(l)
            {
                r.read(self.lower.data_node(l), f, off, buf.len() as u64);
            }
            let n = self.read_lower_at(l, off, buf)?;
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
            read_full_at(&f, buf, off)?
        };
        Ok(n)
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
            let (data, before) = match &self.quota {
                Some(q) => (&data[..q.admit(&p.file, off, data.len())?], allocated(&p.file)),
                None => (data, 0),
            };
            let n = p.write(off, data, &self.lower_reader(l))?;
            if let Some(q) = &self.quota {
                q.charge(before, allocated(&p.file));
            }
            if let Some(t) = &self.tracker {
                t.wrote(*ino, off, n);
            }
            return Ok(n);
        }
        let f = self.upper_file(&h)?.ok_or(Errno::IO)?;
        let (data, before) = match &self.quota {
            Some(q) => {
                let at = if *append { f.metadata().map_err(|e| io_errno(&e))?.len() } else { off };
                (&data[..q.admit(&f, at, data.len())?], allocated(&f))
            }
            None => (data, 0),
        };
        // With O_APPEND, Linux's pwrite appends whatever the offset.
        f.write_all_at(data, off).map_err(|e| io_errno(&e))?;
        if let Some(q) = &self.quota {
            q.charge(before, allocated(&f));
        }
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

    pub(super) fn truncate_locked(&self, st: &mut State, ino: u64, size: u64) -> FsResult<()> {
        self.copy_up(st, ino)?;
        if let Some(t) = &self.tracker {
            t.whole_ino(ino);
        }
        let node = Self::inode(st, ino)?;
        if let Some(p) = &node.partial {
            let before = allocated(&p.file);
            p.truncate(size)?;
            if let Some(q) = &self.quota {
                q.charge(before, allocated(&p.file));
            }
            return Ok(());
        }
        let f = self.open_upper(st, ino, OFlags::WRONLY)?;
        let before = allocated(&f);
        f.set_len(size).map_err(|e| io_errno(&e))?;
        if let Some(q) = &self.quota {
            q.charge(before, allocated(&f));
        }
        Ok(())
    }

    pub(crate) fn read_partial(&self, p: &Partial, off: u64, buf: &mut [u8]) -> FsResult<usize> {
        let l = self.lower.find(&p.lower_path).ok_or(Errno::IO)?;
        p.read(off, buf, &self.lower_reader(l))
    }

    /// For FUSE passthrough: the upper file behind `ino`, opened for reading
    /// and writing (every open of the inode shares it), when the kernel may
    /// do its I/O directly: a whole upper regular file. None for lower,
    /// partial and non-regular files, whose data this process serves.
    pub(crate) fn backing_file(&self, ino: u64) -> FsResult<Option<File>> {
        if self.tracker.is_some() || self.quota.is_some() {
            // Passed-through writes would not be seen, so not tracked,
            // nor counted against the quota.
            return Ok(None);
        }
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        if !node.upper || node.partial.is_some() || node.ftype != FType::File || node.names.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.open_upper(&st, ino, OFlags::RDWR)?))
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
