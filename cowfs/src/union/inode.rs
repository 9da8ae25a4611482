//! The inode table: a name looked up becomes an inode merging what the
//! upper and the lower tree hold there, and stays one until unmount.
//!
//! Invariants (under the union's lock): `dentries` holds exactly the
//! (parent, name) pairs in the inodes' `names`, and an inode's first name
//! is the path of its upper object; an upper file with several names is
//! one inode, found again through `by_upper`. A lookup looks at the upper
//! first: a whiteout hides the lower name; anything else there is the
//! object, a directory merged with the lower one below it (or the one its
//! redirect names) unless it is opaque.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{OFlags, Stat};
use xenod_store::{Extent, Timestamp};

use crate::error::{Errno, FsResult};
use crate::lower::LKind;
use crate::overlay::{OPAQUE, PARTIAL, REDIRECT, is_whiteout};
use crate::partial::{DirtyMap, Partial};

use super::namespace::check_name;
use super::upper::At;
use super::{Attr, FType, Inode, State, Union, WORK_DIR};

impl Union {
    pub(super) fn inode(st: &State, ino: u64) -> FsResult<&Inode> {
        st.inodes.get(&ino).ok_or(Errno::STALE)
    }

    pub(super) fn inode_mut(st: &mut State, ino: u64) -> FsResult<&mut Inode> {
        st.inodes.get_mut(&ino).ok_or(Errno::STALE)
    }

    /// The inode at `name` in directory `parent`, if the union has one.
    pub(super) fn child(&self, st: &mut State, parent: u64, name: &[u8]) -> FsResult<Option<u64>> {
        if let Some(&ino) = st.dentries.get(&(parent, name.to_vec())) {
            return Ok(Some(ino));
        }
        // As overlayfs: a name no layer could hold is refused, not missing.
        check_name(name)?;
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
            let at = self.child_at(st, parent, name)?;
            if let Some(s) = at.stat()? {
                if is_whiteout(&s) {
                    return Ok(None);
                }
                found = Some(self.upper_inode(st, parent, &at, &s, lower_child, p_lower_dir)?);
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
                    orphan: None,
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
        parent: u64,
        at: &At,
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
            if at.getxattr(OPAQUE)?.is_none_or(|v| v != b"y") {
                lower = match at.getxattr(REDIRECT)? {
                    Some(r) if r.first() == Some(&b'/') => self.lower.find(&r[1..]),
                    Some(r) => p_lower_dir.and_then(|d| self.lower.child(d, &r)),
                    None => lower_child,
                }
                .filter(|&l| self.lower.is_dir(l));
            }
        } else if ftype == FType::File
            && let Some(lp) = at.getxattr(PARTIAL)?
        {
            let Some(l) = self.lower.find(&lp).filter(|&l| self.lower.file(l).is_some()) else {
                let path = super::join(&self.rel(st, parent), &at.name);
                tracing::error!(path = %xenod_store::display_path(&path), upper = %self.upper_root()?.path.display(), lower = %String::from_utf8_lossy(&lp), "partial file's lower file is not in the stack");
                return Err(Errno::IO);
            };
            partial = Some(self.open_partial(at, s.st_ino, l, lp)?);
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
                orphan: None,
            },
        );
        if ftype != FType::Dir && s.st_nlink > 1 {
            st.by_upper.insert(s.st_ino, ino);
        }
        Ok(ino)
    }

    pub(super) fn open_partial(
        &self,
        at: &At,
        upper_ino: u64,
        lower: u32,
        lower_path: Vec<u8>,
    ) -> FsResult<Arc<Partial>> {
        let data = self.lower.file(lower).cloned().ok_or(Errno::IO)?;
        let file = at.open(OFlags::RDWR, 0)?;
        let map_path = self.map_path(upper_ino)?;
        let map = DirtyMap::load(&map_path, data.size).map_err(|e| {
            tracing::error!(map = %map_path.display(), "dirty map unreadable: {e}");
            Errno::IO
        })?;
        Ok(Arc::new(Partial { file, lower: data, lower_path, map_path, map: Mutex::new(map) }))
    }

    /// The inode at union path `p`, walking from the root.
    pub(super) fn resolve_path(&self, st: &mut State, p: &[u8]) -> FsResult<Option<u64>> {
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

    pub(super) fn new_inode(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
        ftype: FType,
        lower_dir: Option<u32>,
    ) -> u64 {
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(
            ino,
            Inode {
                names: vec![(parent, name.to_vec())],
                lower: None,
                lower_dir,
                upper: true,
                ftype,
                partial: None,
                orphan: None,
            },
        );
        st.dentries.insert((parent, name.to_vec()), ino);
        self.track_name(st, parent, name);
        ino
    }

    pub(super) fn drop_name(&self, st: &mut State, parent: u64, name: &[u8]) {
        self.track_name(st, parent, name);
        if let Some(ino) = st.dentries.remove(&(parent, name.to_vec()))
            && let Some(node) = st.inodes.get_mut(&ino)
        {
            node.names.retain(|(p, n)| !(*p == parent && n.as_slice() == name));
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let mut st = self.lock();
        let ino = self.child(&mut st, parent, name)?.ok_or(Errno::NOENT)?;
        self.attr_locked(&st, ino)
    }

    pub(super) fn attr_locked(&self, st: &State, ino: u64) -> FsResult<Attr> {
        let node = Self::inode(st, ino)?;
        let nameless = node.names.is_empty() && ino != 1;
        if node.upper {
            let s = if nameless { None } else { self.node_at(st, ino)?.stat()? };
            // An object open after its last name went is still there.
            let s = match (s, &node.orphan, &node.partial) {
                (Some(s), _, _) => s,
                (None, Some(fd), _) => rustix::fs::fstat(&**fd)?,
                (None, None, Some(p)) => rustix::fs::fstat(&p.file)?,
                (None, None, None) => return Err(Errno::NOENT),
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
        let mut a = self.lower_attr(ino, l);
        if nameless && a.kind != FType::Dir {
            // Whited out while open: no name left in the union.
            a.nlink = 0;
        }
        Ok(a)
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

    /// Whether `ino` shows lower data only (the kernel may keep its cache).
    pub(crate) fn is_lower_only(&self, ino: u64) -> bool {
        let st = self.lock();
        st.inodes.get(&ino).is_some_and(|n| !n.upper)
    }

    /// The upper path of `ino`, if it has an upper object.
    pub(crate) fn upper_path_of(&self, ino: u64) -> FsResult<Option<PathBuf>> {
        let st = self.lock();
        let n = Self::inode(&st, ino)?;
        if !n.upper {
            return Ok(None);
        }
        Ok(Some(self.node_path(&st, ino)?))
    }

    /// The lower node shown (or partially backing) `ino`.
    pub(crate) fn lower_of(&self, ino: u64) -> FsResult<(Option<u32>, Option<Arc<Partial>>)> {
        let st = self.lock();
        let n = Self::inode(&st, ino)?;
        Ok((n.lower, n.partial.clone()))
    }
}

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
