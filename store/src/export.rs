//! Export: materialise a layer or a stack as a directory tree or tar stream.
//!
//! Directory export creates every object relative to directory handles it
//! opened itself with `O_NOFOLLOW`, and resolves hardlink targets with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no entry (hostile or not) can
//! make it write outside the destination. Directory metadata is applied when
//! the walk leaves the directory, so children do not disturb its mtime.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps};

use crate::chunker::Chunking;
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::manifest::{Entry, Extent, Kind, OrderCheck, file_name, is_below};
use crate::store::Store;

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportStats {
    pub entries: u64,
    pub file_bytes: u64,
}

/// Reads a stored file's contents in order; holes read as zeros.
pub struct FileReader<'s> {
    store: &'s Store,
    extents: std::vec::IntoIter<Extent>,
    cur: Vec<u8>,
    pos: usize,
    hole: u64,
    progress: Option<&'s (dyn Fn(u64) + Sync)>,
}

impl<'s> FileReader<'s> {
    pub fn new(store: &'s Store, extents: Vec<Extent>) -> Self {
        Self { store, extents: extents.into_iter(), cur: Vec::new(), pos: 0, hole: 0, progress: None }
    }

    /// Tells `progress` the length of each extent as the reader takes it
    /// up (read or skipped): the lengths of all of them once at the end.
    pub fn with_progress(mut self, progress: &'s (dyn Fn(u64) + Sync)) -> Self {
        self.progress = Some(progress);
        self
    }

    fn next_extent(&mut self) -> Option<Extent> {
        let e = self.extents.next();
        if let (Some(p), Some(e)) = (self.progress, &e) {
            p(e.len());
        }
        e
    }
}

impl FileReader<'_> {
    /// Moves `n` bytes on without reading them: chunks skipped whole are
    /// not fetched.
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.hole > 0 {
                let k = self.hole.min(n);
                self.hole -= k;
                n -= k;
            } else if self.pos < self.cur.len() {
                let k = ((self.cur.len() - self.pos) as u64).min(n);
                self.pos += k as usize;
                n -= k;
            } else {
                match self.next_extent() {
                    None => return Ok(()),
                    Some(Extent::Hole { len }) => self.hole = len,
                    Some(Extent::Data { len, .. }) if u64::from(len) <= n => n -= u64::from(len),
                    Some(Extent::Data { id, .. }) => {
                        self.cur = self.store.get(&id).map_err(io::Error::other)?;
                        self.pos = 0;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.hole > 0 {
                let n = (self.hole.min(buf.len() as u64)) as usize;
                buf[..n].fill(0);
                self.hole -= n as u64;
                return Ok(n);
            }
            if self.pos < self.cur.len() {
                let n = (self.cur.len() - self.pos).min(buf.len());
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match self.next_extent() {
                None => return Ok(0),
                Some(Extent::Hole { len }) => self.hole = len,
                Some(Extent::Data { id, .. }) => {
                    self.cur = self.store.get(&id).map_err(io::Error::other)?;
                    self.pos = 0;
                }
            }
        }
    }
}

struct OpenDir {
    path: Vec<u8>,
    fd: OwnedFd,
    entry: Entry,
}

/// Writes `entries` (one tree, in tree order) to `dest`, which must not
/// exist or be an empty directory. The tree is built in a temporary
/// directory beside `dest` (`.NAME.export-PID`) and renamed into place
/// once complete, so a failed export leaves `dest` as it was; error
/// messages name the paths under `dest`. `progress` is told the bytes of
/// regular files as they are written, holes included: their sum is
/// [`ExportStats::file_bytes`].
pub fn export_dir(
    store: &Store,
    entries: impl Iterator<Item = Result<Entry>>,
    dest: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let refuse = |why: String| Error::Export { dest: dest.to_path_buf(), why };
    let replace = match fs::read_dir(dest) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(refuse("destination is not empty".into()));
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io("reading", dest)(e)),
    };
    // `.` names the current directory: its name is in the absolute path.
    let abs = std::path::absolute(dest).ctx("resolving", dest)?;
    let name = abs.file_name().ok_or_else(|| refuse("names no directory".into()))?;
    let tmp = abs.with_file_name(format!(".{}.export-{}", name.to_string_lossy(), std::process::id()));
    fs::create_dir(&tmp).ctx("creating", &tmp)?;
    let r = write_tree(store, entries, dest, &tmp, progress).and_then(|(stats, root)| {
        let at = if replace { dest } else { tmp.as_path() };
        if replace {
            // Into the directory that is there (it may be someone's working
            // directory): its new entries, then its metadata.
            move_children(&tmp, dest)?;
            let _ = fs::remove_dir(&tmp);
        }
        if let Some(root) = root {
            let fd = rustix::fs::open(
                at,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ctx("opening", at)?;
            set_meta_fd(&fd, &root, dest)?;
        }
        if !replace {
            rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, dest, RenameFlags::NOREPLACE)
                .ctx("renaming into place", dest)?;
        }
        Ok(stats)
    });
    if r.is_err() {
        remove_tree(&tmp);
    }
    r
}

/// Moves every entry of `from` into the empty directory `to`; on failure
/// moves those already moved back, so `to` is left empty.
fn move_children(from: &Path, to: &Path) -> Result<()> {
    let names: Vec<_> = fs::read_dir(from)
        .ctx("listing", from)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ctx("listing", from)?;
    for (i, n) in names.iter().enumerate() {
        let r = rustix::fs::renameat_with(
            rustix::fs::CWD,
            from.join(n),
            rustix::fs::CWD,
            to.join(n),
            RenameFlags::NOREPLACE,
        );
        if let Err(e) = r {
            for m in &names[..i] {
                let _ = fs::rename(to.join(m), from.join(m));
            }
            return Err(Error::io("moving into place", to.join(n))(e.into()));
        }
    }
    Ok(())
}

/// Removes a partly written tree, making its directories writable first
/// where their own metadata forbids it (best effort: a failed export's
/// error matters more than its leftovers).
fn remove_tree(p: &Path) {
    if fs::remove_dir_all(p).is_ok() {
        return;
    }
    let mut todo = vec![p.to_path_buf()];
    while let Some(d) = todo.pop() {
        let _ = rustix::fs::chmod(&d, Mode::from_raw_mode(0o700));
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    let _ = fs::remove_dir_all(p);
}

/// [`export_dir`]'s work: the tree written into `root` (a new empty
/// directory), messages naming the paths under `dest`. The root entry's
/// metadata is returned, not applied: it goes to the directory that ends
/// up in place.
fn write_tree(
    store: &Store,
    entries: impl Iterator<Item = Result<Entry>>,
    dest: &Path,
    root: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(ExportStats, Option<Entry>)> {
    let refuse = |why: String| Error::Export { dest: dest.to_path_buf(), why };
    let root_fd =
        rustix::fs::open(root, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .ctx("opening", root)?;
    let mut stack: Vec<OpenDir> = Vec::new();
    let mut check = OrderCheck::default();
    let mut stats = ExportStats::default();
    for e in entries {
        let e = e?;
        check.check(&e).map_err(|fault| Error::ExportEntry {
            dest: dest.to_path_buf(),
            at: e.display_path(),
            fault: Box::new(fault),
        })?;
        while stack.last().is_some_and(|d| !is_below(&e.path, &d.path)) {
            if let Some(d) = stack.pop() {
                finish_dir(&d, dest)?;
            }
        }
        stats.entries += 1;
        let at = dest.join(OsStr::from_bytes(&e.path));
        if e.path.is_empty() {
            let fd = rustix::io::dup(&root_fd).ctx("duplicating handle of", dest)?;
            stack.push(OpenDir { path: vec![], fd, entry: e });
            continue;
        }
        let Some(parent) = stack.last() else { return Err(refuse("entry outside the root".into())) };
        let pfd = parent.fd.as_fd();
        let name = OsStr::from_bytes(file_name(&e.path));
        let mode = Mode::from_raw_mode(e.mode);
        match &e.kind {
            Kind::Dir { opaque } => {
                rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(0o700)).ctx("creating directory", &at)?;
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ctx("opening", &at)?;
                let mut entry = e.clone();
                if *opaque {
                    entry.xattrs.push(crate::manifest::Xattr {
                        name: b"trusted.overlay.opaque".to_vec(),
                        value: b"y".to_vec(),
                    });
                }
                stack.push(OpenDir { path: e.path.clone(), fd, entry });
                continue;
            }
            Kind::File { size, extents, .. } => {
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .ctx("creating", &at)?;
                let file = fs::File::from(fd);
                write_extents(store, &file, extents, &at, progress)
                    .map_err(|err| data_error(err, dest, &e.display_path()))?;
                file.set_len(*size).ctx("sizing", &at)?;
                // Holes (and a tail past the extents) cost nothing: done.
                let data: u64 = extents.iter().filter(|x| matches!(x, Extent::Data { .. })).map(Extent::len).sum();
                progress(size.saturating_sub(data));
                stats.file_bytes += size;
                set_meta_fd(&file, &e, &at)?;
                continue;
            }
            Kind::Symlink { target } => {
                rustix::fs::symlinkat(OsStr::from_bytes(target), pfd, name).ctx("creating symlink", &at)?;
            }
            Kind::Hardlink { target } => {
                let how = rustix::fs::ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
                let tfd = rustix::fs::openat2(
                    &root_fd,
                    OsStr::from_bytes(target),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    how,
                )
                .map_err(|err| {
                    refuse(format!(
                        "{}: hardlink target /{} cannot be reached inside the tree: {err}",
                        e.display_path(),
                        String::from_utf8_lossy(target)
                    ))
                })?;
                let st = rustix::fs::fstat(&tfd).ctx("reading", &at)?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(refuse(format!("{}: hardlink target is not a regular file", e.display_path())));
                }
                rustix::fs::linkat(&tfd, "", pfd, name, AtFlags::EMPTY_PATH).ctx("creating hardlink", &at)?;
                continue;
            }
            Kind::CharDev { rdev } => mknod(pfd, name, FileType::CharacterDevice, *rdev, &at)?,
            Kind::BlockDev { rdev } => mknod(pfd, name, FileType::BlockDevice, *rdev, &at)?,
            Kind::Fifo => mknod(pfd, name, FileType::Fifo, 0, &at)?,
            Kind::Socket => mknod(pfd, name, FileType::Socket, 0, &at)?,
            // overlayfs's whiteout: a 0/0 character device.
            Kind::Whiteout => mknod(pfd, name, FileType::CharacterDevice, 0, &at)?,
        }
        set_meta_at(pfd, name, &e, mode, &at)?;
    }
    let mut top = None;
    while let Some(d) = stack.pop() {
        if d.path.is_empty() {
            top = Some(d.entry);
        } else {
            finish_dir(&d, dest)?;
        }
    }
    Ok((stats, top))
}

/// A chunk that could not be read for the file at `at` (a path in the
/// tree) is damage met while exporting to `dest`; other errors name their
/// own file already.
fn data_error(err: Error, dest: &Path, at: &str) -> Error {
    match err {
        Error::ChunkCorrupt { .. } | Error::ChunkMissing { .. } | Error::Manifest { .. } => {
            Error::ExportData { dest: dest.to_path_buf(), at: at.to_string(), damage: Box::new(err) }
        }
        e => e,
    }
}

fn mknod(dir: rustix::fd::BorrowedFd<'_>, name: &OsStr, ft: FileType, rdev: u64, at: &Path) -> Result<()> {
    rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), rdev).ctx("creating node", at)
}

/// Writes a file's data extents; large files fetch and write in parallel.
fn write_extents(
    store: &Store,
    file: &fs::File,
    extents: &[Extent],
    at: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let mut offsets = Vec::with_capacity(extents.len());
    let mut off = 0u64;
    for e in extents {
        if let Extent::Data { id, .. } = e {
            offsets.push((off, *id));
        }
        off += e.len();
    }
    let write = |&(off, id): &(u64, ChunkId)| -> Result<()> {
        let data = store.get(&id)?;
        file.write_all_at(&data, off).ctx("writing", at)?;
        progress(data.len() as u64);
        Ok(())
    };
    if offsets.len() > 4 { offsets.par_iter().try_for_each(write) } else { offsets.iter().try_for_each(write) }
}

fn timestamps(e: &Entry) -> Timestamps {
    let t = Timespec { tv_sec: e.mtime.secs, tv_nsec: e.mtime.nanos as _ };
    Timestamps { last_access: t, last_modification: t }
}

fn set_meta_fd(fd: impl AsFd, e: &Entry, at: &Path) -> Result<()> {
    let fd = fd.as_fd();
    // chown first: it clears set-id bits that chmod then restores.
    rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(e.uid)), Some(rustix::fs::Gid::from_raw(e.gid)))
        .ctx("changing owner of", at)?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode)).ctx("changing mode of", at)?;
    for x in &e.xattrs {
        rustix::fs::fsetxattr(fd, OsStr::from_bytes(&x.name), &x.value, rustix::fs::XattrFlags::empty())
            .ctx("setting xattrs of", at)?;
    }
    rustix::fs::futimens(fd, &timestamps(e)).ctx("setting times of", at)
}

fn set_meta_at(dir: rustix::fd::BorrowedFd<'_>, name: &OsStr, e: &Entry, mode: Mode, at: &Path) -> Result<()> {
    let nofollow = AtFlags::SYMLINK_NOFOLLOW;
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        nofollow,
    )
    .ctx("changing owner of", at)?;
    if !matches!(e.kind, Kind::Symlink { .. }) {
        rustix::fs::chmodat(dir, name, mode, AtFlags::empty()).ctx("changing mode of", at)?;
    }
    if !e.xattrs.is_empty() {
        // The parent handle pins the directory; the last component is not followed.
        let p = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir))).join(name);
        for x in &e.xattrs {
            rustix::fs::lsetxattr(&p, OsStr::from_bytes(&x.name), &x.value, rustix::fs::XattrFlags::empty())
                .ctx("setting xattrs of", at)?;
        }
    }
    rustix::fs::utimensat(dir, name, &timestamps(e), nofollow).ctx("setting times of", at)
}

fn finish_dir(d: &OpenDir, dest: &Path) -> Result<()> {
    set_meta_fd(&d.fd, &d.entry, &dest.join(OsStr::from_bytes(&d.path)))
}

/// Writes `entries` as a POSIX tar stream (pax headers for xattrs and
/// nanosecond mtimes). A disk image with holes (a file cut in fixed
/// blocks) is a GNU sparse member (the old GNU format, which GNU tar and
/// the `tar` crate both read): its holes cost no bytes in the stream and
/// come back as holes with `tar -xS`, or through `import_tar`.
pub fn export_tar(store: &Store, entries: impl Iterator<Item = Result<Entry>>, out: impl Write) -> Result<ExportStats> {
    export_tar_with(store, entries, out, &|_| {})
}

/// [`export_tar`], telling `progress` the bytes of regular files as they
/// go out (holes included: their sum is [`ExportStats::file_bytes`]).
pub fn export_tar_with(
    store: &Store,
    entries: impl Iterator<Item = Result<Entry>>,
    out: impl Write,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut stats = ExportStats::default();
    let err = |e: io::Error| Error::io("writing tar stream", "-")(e);
    for e in entries {
        let e = e?;
        stats.entries += 1;
        let mut name = if e.path.is_empty() { b"./".to_vec() } else { e.path.clone() };
        if e.is_dir() && !e.path.is_empty() {
            name.push(b'/');
        }
        let mut pax: Vec<(String, Vec<u8>)> = e
            .xattrs
            .iter()
            .map(|x| (format!("SCHILY.xattr.{}", String::from_utf8_lossy(&x.name)), x.value.clone()))
            .collect();
        if e.mtime.nanos != 0 {
            pax.push(("mtime".into(), format!("{}.{:09}", e.mtime.secs, e.mtime.nanos).into_bytes()));
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).map_err(err)?;
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        h.set_mtime(e.mtime.secs.max(0) as u64);
        h.set_size(0);
        use tar::EntryType as T;
        let name = OsStr::from_bytes(&name);
        match &e.kind {
            Kind::File { size, extents, chunking } => {
                stats.file_bytes += size;
                let taken = std::sync::atomic::AtomicU64::new(0);
                let counted = |n: u64| {
                    taken.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    progress(n);
                };
                let data = FileReader::new(store, extents.clone()).with_progress(&counted);
                // Only files cut in fixed blocks (images, sparse files) are
                // sparse members: import takes a sparse member for one, so
                // the tree comes back as the same layer. A file cut by
                // content keeps its (rare) zero runs as data.
                let map = if *chunking == Chunking::Fixed { sparse_map(extents, *size) } else { None };
                let r = match map {
                    None => {
                        h.set_entry_type(T::Regular);
                        h.set_size(*size);
                        b.append_data(&mut h, name, data)
                    }
                    Some(map) => {
                        let (mut h, body) = sparse_member(&h, *size, map, data);
                        b.append_data(&mut h, name, body)
                    }
                };
                r.map_err(|x| member_error(x, &e.display_path()))?;
                // What the reader did not take up (a tail past the extents,
                // trailing holes of a sparse member) counts once it is out.
                progress(size.saturating_sub(taken.load(std::sync::atomic::Ordering::Relaxed)));
                continue;
            }
            Kind::Dir { .. } => h.set_entry_type(T::Directory),
            Kind::Symlink { target } => {
                h.set_entry_type(T::Symlink);
                b.append_link(&mut h, name, OsStr::from_bytes(target)).map_err(err)?;
                continue;
            }
            Kind::Hardlink { target } => {
                h.set_entry_type(T::Link);
                b.append_link(&mut h, name, OsStr::from_bytes(target)).map_err(err)?;
                continue;
            }
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
                h.set_entry_type(if matches!(e.kind, Kind::CharDev { .. }) { T::Char } else { T::Block });
                h.set_device_major(rustix::fs::major(*rdev)).map_err(err)?;
                h.set_device_minor(rustix::fs::minor(*rdev)).map_err(err)?;
            }
            Kind::Fifo => h.set_entry_type(T::Fifo),
            Kind::Socket => continue, // tar has no sockets (GNU tar skips them too)
            Kind::Whiteout => {
                h.set_entry_type(T::Char);
                h.set_device_major(0).map_err(err)?;
                h.set_device_minor(0).map_err(err)?;
            }
        }
        b.append_data(&mut h, name, io::empty()).map_err(err)?;
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(err)?;
    Ok(stats)
}

/// A tar member's write error: damage met reading its data keeps its exit
/// code and names the member; others are the stream's I/O errors.
fn member_error(e: io::Error, at: &str) -> Error {
    if !e.get_ref().is_some_and(|i| i.is::<Error>()) {
        return Error::io("writing tar stream", "-")(e);
    }
    match e.into_inner().map(|i| i.downcast::<Error>()) {
        Some(Ok(inner)) => data_error(*inner, Path::new("-"), at),
        Some(Err(other)) => Error::io("writing tar stream", "-")(io::Error::other(other)),
        None => Error::io("writing tar stream", "-")(io::Error::other("unknown error")),
    }
}

/// Records of the tar format.
const RECORD: u64 = 512;

/// The data segments of a file of `size` bytes with these extents, as the
/// old GNU sparse format lists them: (offset, length) in order, each
/// starting on a 512-byte boundary and all but the last a multiple of 512
/// long, so every segment starts on a record boundary of the stream (as
/// readers check); a hole shorter than that rounding is written as zeros.
/// The list ends with `(size, 0)`, as GNU tar writes it. `None`: nothing
/// to leave out, a plain member.
fn sparse_map(extents: &[Extent], size: u64) -> Option<Vec<(u64, u64)>> {
    let mut segs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    for e in extents {
        let len = e.len();
        if let Extent::Data { .. } = e {
            let start = (pos / RECORD * RECORD).min(size);
            let end = (pos + len).div_ceil(RECORD).saturating_mul(RECORD).min(size);
            match segs.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => segs.push((start, end)),
            }
        }
        pos += len;
    }
    let data: u64 = segs.iter().map(|(s, e)| e - s).sum();
    if data == size {
        return None;
    }
    let mut map: Vec<(u64, u64)> = segs.into_iter().map(|(s, e)| (s, e - s)).collect();
    map.push((size, 0));
    Some(map)
}

/// The header and body of a GNU sparse member (type `S`) of a file of
/// `size` bytes, from the plain header `plain` (mode, owner, times). The
/// header holds the first 4 segments of `map`; the body is the extension
/// records holding the rest (21 each), then the segments' data.
///
/// ```text
///  header 'S'  size = data bytes, realsize = size, sparse[4], isextended
///  ext record  sparse[21], isextended      (as many as needed)
///  data        the segments, one after another, padded to 512 at the end
/// ```
fn sparse_member<'s>(
    plain: &tar::Header,
    size: u64,
    map: Vec<(u64, u64)>,
    file: FileReader<'s>,
) -> (tar::Header, SparseBody<'s>) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(plain.mode().unwrap_or(0o644));
    h.set_uid(plain.uid().unwrap_or(0));
    h.set_gid(plain.gid().unwrap_or(0));
    h.set_mtime(plain.mtime().unwrap_or(0));
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(map.iter().map(|&(_, l)| l).sum());
    let mut ext = Vec::new();
    if let Some(gnu) = h.as_gnu_mut() {
        gnu.set_real_size(size);
        for (slot, &(off, len)) in gnu.sparse.iter_mut().zip(&map) {
            slot.set_offset(off);
            slot.set_length(len);
        }
        let n = gnu.sparse.len();
        gnu.set_is_extended(map.len() > n);
        let rest: Vec<_> = map.iter().skip(n).collect();
        let per = tar::GnuExtSparseHeader::new().sparse.len();
        for (i, group) in rest.chunks(per).enumerate() {
            let mut x = tar::GnuExtSparseHeader::new();
            for (slot, &&(off, len)) in x.sparse.iter_mut().zip(group) {
                slot.set_offset(off);
                slot.set_length(len);
            }
            x.set_is_extended((i + 1) * per < rest.len());
            ext.extend_from_slice(x.as_bytes());
        }
    }
    let body = SparseBody { ext: io::Cursor::new(ext), file, segs: map.into_iter(), pos: 0, left: 0 };
    (h, body)
}

/// Reads a sparse member's body: its extension records, then its data
/// segments, skipping the holes between them.
struct SparseBody<'s> {
    ext: io::Cursor<Vec<u8>>,
    file: FileReader<'s>,
    segs: std::vec::IntoIter<(u64, u64)>,
    /// Where `file` is.
    pos: u64,
    /// Bytes of the current segment still to read.
    left: u64,
}

impl Read for SparseBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.ext.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        while self.left == 0 {
            let Some((off, len)) = self.segs.next() else { return Ok(0) };
            self.file.skip(off - self.pos)?;
            self.pos = off;
            self.left = len;
        }
        let want = (self.left.min(buf.len() as u64)) as usize;
        let mut n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            // Past the last extent (a segment rounded up into a trailing
            // hole): zeros.
            buf[..want].fill(0);
            n = want;
        }
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Merged;

    fn file(path: &str, size: u64, extents: Vec<Extent>) -> Entry {
        Entry { kind: Kind::File { size, chunking: Chunking::Fixed, extents }, ..Entry::dir(path.as_bytes().to_vec()) }
    }

    /// A layer of a root and `files`, written as they are (no import).
    fn layer(store: &Store, files: Vec<Entry>) -> crate::LayerId {
        let mut w = crate::LayerWriter::new(store);
        w.push(&Entry::dir(Vec::new())).unwrap();
        for f in files {
            w.push(&f).unwrap();
        }
        w.finish(None, Default::default()).unwrap()
    }

    #[test]
    fn sparse_map_rounds_segments_to_records_and_ends_at_the_size() {
        let d = |len: u32| Extent::Data { id: ChunkId::of(&len.to_le_bytes()), len };
        let hole = |len: u64| Extent::Hole { len };
        // No hole: a plain member.
        assert_eq!(sparse_map(&[d(1000)], 1000), None);
        assert_eq!(sparse_map(&[], 0), None);
        // A hole shorter than a record is written as zeros.
        assert_eq!(sparse_map(&[d(100), hole(300), d(100)], 500), None);
        // Data, a long hole, data: segments start on records.
        assert_eq!(
            sparse_map(&[d(1000), hole(10_000), d(700)], 11_700),
            Some(vec![(0, 1024), (10_752, 948), (11_700, 0)])
        );
        // All hole, and a trailing hole past the extents.
        assert_eq!(sparse_map(&[hole(5 << 20)], 5 << 20), Some(vec![(5 << 20, 0)]));
        assert_eq!(sparse_map(&[d(65_536)], 1 << 20), Some(vec![(0, 65_536), (1 << 20, 0)]));
    }

    /// GNU tar lists and extracts a sparse member with its holes, and this
    /// crate's import reads it back to the same layer.
    #[test]
    fn tar_export_keeps_holes() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let a = crate::testing::noise(65_536, 1);
        let (ida, _) = store.put(&a).unwrap();
        let (idb, _) = store.put(&a[..1000]).unwrap();
        // 5 MiB with two data regions; and a file past every sparse slot of the header (4).
        let mut many = Vec::new();
        for _ in 0..30 {
            many.push(Extent::Data { id: idb, len: 1000 });
            many.push(Extent::Hole { len: 100_000 });
        }
        // Nanoseconds put a pax header before the GNU sparse one.
        let mtime = crate::Timestamp { secs: 1_700_000_000, nanos: 123 };
        let files = vec![
            Entry {
                mtime,
                mode: 0o640,
                ..file(
                    "holey",
                    5 << 20,
                    vec![
                        Extent::Data { id: ida, len: 65_536 },
                        Extent::Hole { len: (4 << 20) - 65_536 },
                        Extent::Data { id: idb, len: 1000 },
                        Extent::Hole { len: (1 << 20) - 1000 },
                    ],
                )
            },
            file("many", 30 * 101_000, many),
            file("zero", 1 << 20, vec![Extent::Hole { len: 1 << 20 }]),
        ];
        let id = layer(&store, files);
        let mut tar = Vec::new();
        export_tar(&store, Merged::of(&store, &id).unwrap(), &mut tar).unwrap();
        assert!(tar.len() < 512 << 10, "holes written as data: {} bytes", tar.len());

        let out = t.path().join("x");
        fs::create_dir(&out).unwrap();
        let tarball = t.path().join("s.tar");
        fs::write(&tarball, &tar).unwrap();
        let st = std::process::Command::new("tar").arg("-xSf").arg(&tarball).arg("-C").arg(&out).status().unwrap();
        assert!(st.success());
        let holey = fs::read(out.join("holey")).unwrap();
        assert_eq!(holey.len(), 5 << 20);
        assert_eq!(&holey[..65_536], &a[..]);
        assert_eq!(&holey[4 << 20..(4 << 20) + 1000], &a[..1000]);
        assert!(holey[65_536..4 << 20].iter().all(|&b| b == 0) && holey[(4 << 20) + 1000..].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(out.join("holey")).unwrap();
        assert!(md.blocks() * 512 < 1 << 20, "extracted without holes: {} blocks", md.blocks());
        assert_eq!((md.mtime(), md.mode() & 0o7777), (1_700_000_000, 0o640));
        let many = fs::read(out.join("many")).unwrap();
        assert_eq!(many.len(), 30 * 101_000);
        for i in 0..30 {
            assert_eq!(&many[i * 101_000..i * 101_000 + 1000], &a[..1000], "segment {i}");
        }
        assert_eq!(fs::read(out.join("zero")).unwrap(), vec![0; 1 << 20]);
        let list = std::process::Command::new("tar").arg("-tvf").arg(&tarball).output().unwrap();
        assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
        assert!(String::from_utf8_lossy(&list.stdout).contains("5242880"), "{}", String::from_utf8_lossy(&list.stdout));

        // Read back by this crate: the same layer.
        let mut w = crate::LayerWriter::new(&store);
        crate::import_tar(&store, tar.as_slice(), &crate::ImportOptions::default(), &mut |e| w.push(&e)).unwrap();
        let back = w.finish(None, Default::default()).unwrap();
        let entries: Vec<Entry> = store.read_layer(&back).unwrap().map(|e| e.unwrap()).collect();
        let holey = entries.iter().find(|e| e.path == b"holey").unwrap();
        let Kind::File { size, extents, .. } = &holey.kind else { panic!("{holey:?}") };
        assert_eq!(*size, 5 << 20);
        let data: u64 = extents.iter().filter(|e| matches!(e, Extent::Data { .. })).map(|e| e.len()).sum();
        assert!(data <= 2 * 65_536, "holes came back as data: {extents:?}");
    }

    /// A damaged chunk met while exporting is damage (exit 4) naming the
    /// chunk and the file, in both forms; a failed directory export
    /// leaves nothing behind.
    #[test]
    fn damage_met_while_exporting_is_damage_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let (good, _) = store.put(b"good data").unwrap();
        let ghost = ChunkId::of(b"never stored");
        let files = vec![
            file("a", 9, vec![Extent::Data { id: good, len: 9 }]),
            file("b", 5, vec![Extent::Data { id: ghost, len: 5 }]),
        ];
        let id = layer(&store, files);
        let dest = t.path().join("out");
        let err = export_dir(&store, Merged::of(&store, &id).unwrap(), &dest, &|_| {}).unwrap_err();
        assert_eq!(err.exit_code(), crate::Exit::Damaged, "{err}");
        assert_eq!(err.chunk(), Some(ghost));
        assert_eq!(err.path(), Some(dest.join("b")));
        assert!(err.to_string().contains(&ghost.to_string()) && err.to_string().contains("/b"), "{err}");
        assert!(!dest.exists(), "a failed export left its destination");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "a failed export left its temporary directory");
        // An empty destination stays as it was.
        fs::create_dir(&dest).unwrap();
        export_dir(&store, Merged::of(&store, &id).unwrap(), &dest, &|_| {}).unwrap_err();
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);

        let err = export_tar(&store, Merged::of(&store, &id).unwrap(), io::sink()).unwrap_err();
        assert_eq!(err.exit_code(), crate::Exit::Damaged, "{err}");
        assert_eq!((err.chunk(), err.path()), (Some(ghost), Some(PathBuf::from("/b"))));

        // Complete: moved into the empty directory, which stays the same
        // directory (it may be someone's working directory) and takes the
        // root's metadata; or renamed into place where nothing was.
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&dest).unwrap().ino();
        let ok = layer(&store, vec![file("a", 9, vec![Extent::Data { id: good, len: 9 }])]);
        export_dir(&store, Merged::of(&store, &ok).unwrap(), &dest, &|_| {}).unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"good data");
        let md = fs::metadata(&dest).unwrap();
        assert_eq!((md.ino(), md.mode() & 0o7777), (ino, Entry::dir(Vec::new()).mode));
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 2, "store and out only");
        let fresh = t.path().join("fresh");
        export_dir(&store, Merged::of(&store, &ok).unwrap(), &fresh, &|_| {}).unwrap();
        assert_eq!(fs::read(fresh.join("a")).unwrap(), b"good data");
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o7777, Entry::dir(Vec::new()).mode);
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 3, "no temporary directory left");
    }
}
