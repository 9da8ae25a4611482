//! Names made and removed: mknod (regular files and symlinks included),
//! create, mkdir, link, unlink, rmdir.
//!
//! A new object is staged in the work area with its final owner and mode and
//! renamed into place (replacing a whiteout if one holds the name), so it
//! appears whole; only a regular file that root creates with nothing to fix
//! up is made in place. A name removed where a lower entry would show again
//! becomes a whiteout.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{FileType, RenameFlags, XattrFlags};

use crate::error::{Errno, FsResult};
use crate::overlay::{OPAQUE, is_whiteout};

use super::upper::{self, At};
use super::{Attr, FType, State, Union};

impl Union {
    /// Checks that `name` is free in `parent` and makes the parent upper;
    /// returns the name in the parent's upper directory and whether a
    /// whiteout holds it.
    fn prepare_create(&self, st: &mut State, parent: u64, name: &[u8]) -> FsResult<(At, bool)> {
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
            match self.child_at(st, parent, name)?.stat()? {
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
        Ok((self.child_at(st, parent, name)?, whiteout))
    }

    /// Moves a staged object into place at `dst`, replacing a whiteout if
    /// there is one (directories exchange with it, as overlayfs does).
    fn install(&self, tmp: &At, dst: &At, is_dir: bool, whiteout: bool) -> FsResult<()> {
        if !whiteout {
            return tmp.rename(dst, RenameFlags::NOREPLACE);
        }
        if is_dir {
            tmp.rename(dst, RenameFlags::EXCHANGE)?;
            tmp.unlink()
        } else {
            tmp.rename(dst, RenameFlags::empty())
        }
    }

    /// Creates a regular file where no whiteout is, in place with O_EXCL,
    /// when that alone gives it its final owner and mode: this process is
    /// root and so is the caller (or the directory's set-group-id bit sets
    /// the group), and the process umask takes nothing from the mode. The
    /// file then appears whole at once, as overlayfs makes it with the
    /// caller's credentials, with no staging, chown, chmod or rename (about
    /// a quarter of a create's cost). `None`: use the staging directory.
    fn create_in_place(&self, dst: &At, mode: u32, uid: u32, gid: u32) -> FsResult<Option<File>> {
        let perm = mode & 0o7777;
        let root = rustix::process::geteuid().is_root() && rustix::process::getegid().as_raw() == 0;
        if uid != 0 || !root || process_umask().is_none_or(|m| perm & m != 0) {
            return Ok(None);
        }
        let (_, _, sgid) = self.owner_for(&dst.dir, uid, gid);
        if !sgid && gid != 0 {
            return Ok(None);
        }
        Ok(Some(dst.create(perm)?))
    }

    /// The owner of a new object in upper directory `dir` (which gives its
    /// group if it has the set-group-id bit, said by the third value).
    fn owner_for(&self, dir: &Arc<OwnedFd>, uid: u32, gid: u32) -> (u32, u32, bool) {
        match rustix::fs::fstat(&**dir) {
            Ok(s) if s.st_mode & 0o2000 != 0 => (uid, s.st_gid, true),
            _ => (uid, gid, false),
        }
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
        let (dst, whiteout) = self.prepare_create(&mut st, parent, name)?;
        let ft = FileType::from_raw_mode(mode);
        let regular = target.is_none() && (ft == FileType::RegularFile || mode & 0o170000 == 0);
        if regular
            && !whiteout
            && let Some(file) = self.create_in_place(&dst, mode, uid, gid)?
        {
            let ino = self.new_inode(&mut st, parent, name, FType::File, None);
            return Ok((self.attr_locked(&st, ino)?, Some(file)));
        }
        let tmp = self.stage(&mut st)?;
        let ftype = if target.is_some() { FType::Symlink } else { FType::of_mode(mode) };
        let mut file = None;
        match target {
            Some(t) => tmp.symlink(t)?,
            None if regular => file = Some(tmp.create(0o600)?),
            None => tmp.mknod(ft, 0o600, rdev)?,
        }
        let (uid, gid, _) = self.owner_for(&dst.dir, uid, gid);
        let placed = tmp
            .chown(Some(uid), Some(gid))
            .and_then(|()| if target.is_none() { tmp.chmod(mode & 0o7777) } else { Ok(()) })
            .and_then(|()| self.install(&tmp, &dst, false, whiteout));
        if let Err(e) = placed {
            let _ = tmp.unlink();
            return Err(e);
        }
        let ino = self.new_inode(&mut st, parent, name, ftype, None);
        Ok((self.attr_locked(&st, ino)?, file))
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

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let mut st = self.lock();
        let (dst, whiteout) = self.prepare_create(&mut st, parent, name)?;
        let tmp = self.stage(&mut st)?;
        tmp.mkdir(0o700)?;
        let (uid, gid, sgid) = self.owner_for(&dst.dir, uid, gid);
        let mode = (mode & 0o7777) | if sgid { 0o2000 } else { 0 };
        // Over a whiteout the directory must hide what is below; in a merged
        // parent overlayfs marks it opaque anyway (a lookup optimisation).
        let opaque = whiteout || Self::inode(&st, parent)?.lower_dir.is_some();
        let placed = tmp
            .chown(Some(uid), Some(gid))
            .and_then(|()| tmp.chmod(mode))
            .and_then(|()| if opaque { tmp.setxattr(OPAQUE.as_bytes(), b"y", XattrFlags::empty()) } else { Ok(()) })
            .and_then(|()| self.install(&tmp, &dst, true, whiteout));
        if let Err(e) = placed {
            let _ = tmp.rmdir();
            return Err(e);
        }
        let ino = self.new_inode(&mut st, parent, name, FType::Dir, None);
        self.attr_locked(&st, ino)
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let mut st = self.lock();
        if Self::inode(&st, ino)?.ftype == FType::Dir {
            return Err(Errno::PERM);
        }
        let (dst, whiteout) = self.prepare_create(&mut st, parent, name)?;
        self.copy_up(&mut st, ino)?;
        let src = self.node_at(&st, ino)?;
        if whiteout {
            let tmp = self.stage(&mut st)?;
            src.link(&tmp)?;
            if let Err(e) = tmp.rename(&dst, RenameFlags::empty()) {
                let _ = tmp.unlink();
                return Err(e);
            }
        } else {
            src.link(&dst)?;
        }
        let s = dst.stat()?.ok_or(Errno::NOENT)?;
        st.by_upper.insert(s.st_ino, ino);
        Self::inode_mut(&mut st, ino)?.names.push((parent, name.to_vec()));
        st.dentries.insert((parent, name.to_vec()), ino);
        self.track_name(&st, parent, name);
        self.attr_locked(&st, ino)
    }

    /// Whether the lower layers have something at `name` in `parent`.
    pub(super) fn lower_positive(&self, st: &State, parent: u64, name: &[u8]) -> FsResult<bool> {
        Ok(Self::inode(st, parent)?.lower_dir.is_some_and(|d| self.lower.child(d, name).is_some()))
    }

    /// Removes whiteouts from an upper directory that the union shows empty.
    pub(super) fn clear_whiteouts(&self, dir: &At) -> FsResult<()> {
        let fd = match dir.open_dir() {
            Ok(fd) => Arc::new(fd),
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        for n in upper::names(rustix::io::dup(&*fd)?)? {
            let e = At::new(fd.clone(), &n);
            match e.stat()? {
                Some(s) if is_whiteout(&s) => e.unlink()?,
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
        let at = self.child_at(st, parent, name)?;
        if node_upper {
            // Its last name goes while it is open: keep it for fstat and I/O.
            let keep = if !dir && Self::inode(st, ino)?.names.len() == 1 && self.is_open(ino) {
                Some(Arc::new(at.pin()?))
            } else {
                None
            };
            if dir {
                self.clear_whiteouts(&at)?;
                if positive {
                    // Replace the directory by a whiteout in one step.
                    let tmp = self.stage(st)?;
                    tmp.whiteout()?;
                    tmp.rename(&at, RenameFlags::EXCHANGE)?;
                    tmp.rmdir()?;
                } else {
                    at.rmdir()?;
                }
                self.upper_root()?.forget_dir(ino);
            } else if positive {
                let tmp = self.stage(st)?;
                tmp.whiteout()?;
                tmp.rename(&at, RenameFlags::empty())?;
            } else {
                // Its blocks go with its last name (unless still open).
                let freed = match (&self.quota, &keep) {
                    (Some(_), None) => at.stat()?.filter(|s| s.st_nlink == 1).map_or(0, |s| s.st_blocks as u64 * 512),
                    _ => 0,
                };
                at.unlink()?;
                if let Some(q) = &self.quota {
                    q.charge(freed, 0);
                }
            }
            if keep.is_some() {
                Self::inode_mut(st, ino)?.orphan = keep;
            }
            if let Some(p) = &Self::inode(st, ino)?.partial
                && Self::inode(st, ino)?.names.len() <= 1
            {
                let _ = std::fs::remove_file(&p.map_path);
            }
        } else {
            at.whiteout()?;
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
}

pub(super) fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(())
}

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
