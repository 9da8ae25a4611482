//! Copy-up: a lower object made present in the upper directory (parents
//! first) before anything changes it.
//!
//! The copy is built in the work area and renamed into place, so the upper
//! never shows a half-copied object. Lower files of at least
//! [`Union::block_copy_min`] bytes (not of host directories), and non-empty
//! fixed-chunked ones, become partial files instead (see `partial`). The
//! other names of a lower hardlink set that the union still shows are linked
//! to the copy, so they stay one file.

use std::os::unix::fs::FileExt;

use rustix::fs::{FileType, RenameFlags, XattrFlags};
use xenod_store::{Extent, Timestamp, Xattr};

use crate::error::{Errno, FsResult, io_errno};
use crate::lower::LKind;
use crate::overlay::{PARTIAL, private_xattr};
use crate::partial::DirtyMap;

use super::upper::At;
use super::{State, Union};

impl Union {
    /// Makes `ino` present in the upper directory (and its parents).
    pub(super) fn copy_up(&self, st: &mut State, ino: u64) -> FsResult<()> {
        let node = Self::inode(st, ino)?;
        if node.upper {
            return Ok(());
        }
        self.upper_root()?;
        let (parent, _) = node.names.first().cloned().ok_or(Errno::NOENT)?;
        let l = node.lower.ok_or(Errno::IO)?;
        self.copy_up(st, parent)?;
        let dst = self.node_at(st, ino)?;
        // Copy-up creates a name in the parent's upper directory, which
        // moves the parent's times; what the union shows must not change
        // (overlayfs restores them too), or a commit would record times
        // the mount never showed.
        let parent_at = self.node_at(st, parent)?;
        let parent_times = parent_at.stat()?.map(|s| times_of(&s));
        let large = self.is_large(l);
        if let (Some(q), false) = (&self.quota, large) {
            q.admit_copy(self.lower.file(l).map_or(0, |f| f.size))?;
        }
        let tmp = self.stage(st)?;
        let staged =
            if large { self.stage_partial(l, &tmp).map(Some) } else { self.materialize(l, &tmp).map(|()| None) };
        let partial = match staged.and_then(|p| tmp.rename(&dst, RenameFlags::NOREPLACE).map(|()| p)) {
            Ok(p) => p,
            Err(e) => {
                let _ = tmp.remove();
                return Err(e);
            }
        };
        if let Some(q) = &self.quota
            && let Ok(Some(s)) = dst.stat()
        {
            q.charge(0, s.st_blocks as u64 * 512);
        }
        if let Some(t) = &parent_times
            && let Err(e) = parent_at.set_times(t)
        {
            tracing::debug!("keeping the times of a copied-up object's parent: {e}");
        }
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
            let s = dst.stat()?.ok_or(Errno::NOENT)?;
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
                if let Err(e) = self.child_at(st, pino, xenod_store::file_name(&p)).and_then(|to| dst.link(&to)) {
                    let path = xenod_store::display_path(&p);
                    tracing::warn!(path = %path, "could not keep hardlink with copied-up file: {e}");
                }
            }
        }
        Ok(())
    }

    fn is_large(&self, l: u32) -> bool {
        // Host files copy up whole: block copy-up reads the lower file's extents.
        self.lower.file(l).is_some_and(|f| {
            f.host.is_none() && f.size >= self.block_copy_min
                || (f.chunking == xenod_store::Chunking::Fixed && f.size > 0)
        })
    }

    /// Writes lower node `l`'s object, with its metadata, at `dst`.
    fn materialize(&self, l: u32, dst: &At) -> FsResult<()> {
        let d = self.lower.data_node(l);
        let n = self.lower.node(d);
        let mut symlink = false;
        match &n.kind {
            LKind::Dir { .. } => dst.mkdir(0o700)?,
            LKind::File(f) => {
                let file = dst.create(0o600)?;
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
                dst.symlink(t)?;
                symlink = true;
            }
            LKind::CharDev(r) => dst.mknod(FileType::CharacterDevice, 0o600, *r)?,
            LKind::BlockDev(r) => dst.mknod(FileType::BlockDevice, 0o600, *r)?,
            LKind::Fifo => dst.mknod(FileType::Fifo, 0o600, 0)?,
            LKind::Socket => dst.mknod(FileType::Socket, 0o600, 0)?,
            LKind::Hardlink(_) => return Err(Errno::IO),
        }
        self.set_meta(dst, n.mode, n.uid, n.gid, &n.xattrs, n.mtime, symlink)
    }

    /// Creates a partial file for lower `l` at `tmp`; returns its upper inode number.
    fn stage_partial(&self, l: u32, tmp: &At) -> FsResult<u64> {
        let d = self.lower.data_node(l);
        let n = self.lower.node(d);
        let f = self.lower.file(d).ok_or(Errno::IO)?;
        let file = tmp.create(0o600)?;
        file.set_len(f.size).map_err(|e| io_errno(&e))?;
        let s = rustix::fs::fstat(&file)?;
        DirtyMap::new(f.size).store(&self.map_path(s.st_ino)?, false).map_err(|e| io_errno(&e))?;
        tmp.setxattr(PARTIAL.as_bytes(), &self.lower.path(d), XattrFlags::empty())?;
        self.set_meta(tmp, n.mode, n.uid, n.gid, &n.xattrs, n.mtime, false)?;
        Ok(s.st_ino)
    }

    #[allow(clippy::too_many_arguments)]
    fn set_meta(
        &self,
        p: &At,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: &[Xattr],
        mtime: Timestamp,
        symlink: bool,
    ) -> FsResult<()> {
        p.chown(Some(uid), Some(gid))?;
        if !symlink {
            p.chmod(mode)?;
        }
        for x in xattrs {
            if private_xattr(&x.name) {
                continue;
            }
            p.setxattr(&x.name, &x.value, XattrFlags::empty())?;
        }
        let t = rustix::fs::Timespec { tv_sec: mtime.secs, tv_nsec: mtime.nanos as _ };
        p.set_times(&rustix::fs::Timestamps { last_access: t, last_modification: t })
    }
}

/// The access and change times of `s`, to put back with `set_times`.
fn times_of(s: &rustix::fs::Stat) -> rustix::fs::Timestamps {
    let ts = |sec: i64, nsec: i64| rustix::fs::Timespec { tv_sec: sec, tv_nsec: nsec as _ };
    rustix::fs::Timestamps {
        last_access: ts(s.st_atime, s.st_atime_nsec as i64),
        last_modification: ts(s.st_mtime, s.st_mtime_nsec as i64),
    }
}
