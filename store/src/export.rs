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
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

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
}

impl<'s> FileReader<'s> {
    pub fn new(store: &'s Store, extents: Vec<Extent>) -> Self {
        Self { store, extents: extents.into_iter(), cur: Vec::new(), pos: 0, hole: 0 }
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
            match self.extents.next() {
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

/// Writes `entries` (one tree, in tree order) under `dest`, which must not
/// exist or be an empty directory.
pub fn export_dir(
    store: &Store,
    entries: impl Iterator<Item = Result<Entry>>,
    dest: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let refuse = |why: String| Error::Export { dest: dest.to_path_buf(), why };
    match fs::read_dir(dest) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(refuse("destination is not empty".into()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dest).ctx("creating", dest)?,
        Err(e) => return Err(Error::io("reading", dest)(e)),
    }
    let root_fd =
        rustix::fs::open(dest, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .ctx("opening", dest)?;
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
                write_extents(store, &file, extents, &at, progress)?;
                file.set_len(*size).ctx("sizing", &at)?;
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
    while let Some(d) = stack.pop() {
        finish_dir(&d, dest)?;
    }
    Ok(stats)
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
        let data = store.get(&id).map_err(|err| Error::Export { dest: at.to_path_buf(), why: err.to_string() })?;
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
/// nanosecond mtimes).
pub fn export_tar(store: &Store, entries: impl Iterator<Item = Result<Entry>>, out: impl Write) -> Result<ExportStats> {
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
            Kind::File { size, extents, .. } => {
                h.set_entry_type(T::Regular);
                h.set_size(*size);
                stats.file_bytes += size;
                b.append_data(&mut h, name, FileReader::new(store, extents.clone())).map_err(err)?;
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
