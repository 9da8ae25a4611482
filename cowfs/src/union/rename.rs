//! Rename and exchange, as overlayfs does them: a directory with a lower
//! part that moves records where its lower directory is (a redirect xattr,
//! relative within its parent, absolute elsewhere); one without goes
//! opaque when moved into a merged directory; a whiteout is left at the old
//! name if a lower entry would show there again.

use rustix::fs::{RenameFlags, XattrFlags};

use crate::error::{Errno, FsResult};
use crate::overlay::{OPAQUE, REDIRECT, is_whiteout};

use super::namespace::check_name;
use super::{FType, State, Union};

impl Union {
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
        if src_dir && Self::within(st, newparent, src)? {
            return Err(Errno::INVAL);
        }
        if let Some(d) = dst {
            let dst_dir = Self::inode(st, d)?.ftype == FType::Dir;
            if dst_dir && exchange && Self::within(st, parent, d)? {
                return Err(Errno::INVAL);
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
                self.node_at(st, src)?.setxattr(REDIRECT.as_bytes(), &r, XattrFlags::empty())?;
            } else if !old_opaque && self.is_merge(st, newparent)? {
                self.node_at(st, src)?.setxattr(OPAQUE.as_bytes(), b"y", XattrFlags::empty())?;
            }
        }
        if exchange && let Some(d) = dst {
            let d_dir = Self::inode(st, d)?.ftype == FType::Dir;
            if d_dir {
                if Self::inode(st, d)?.lower_dir.is_some() {
                    let r = self.redirect_for(st, d, samedir)?;
                    self.node_at(st, d)?.setxattr(REDIRECT.as_bytes(), &r, XattrFlags::empty())?;
                } else if !self.is_opaque(st, d)? && self.is_merge(st, parent)? {
                    self.node_at(st, d)?.setxattr(OPAQUE.as_bytes(), b"y", XattrFlags::empty())?;
                }
            }
        }
        let from = self.child_at(st, parent, name)?;
        let to = self.child_at(st, newparent, newname)?;
        if exchange {
            from.rename(&to, RenameFlags::EXCHANGE)?;
            Self::swap_names(st, (parent, name), (newparent, newname));
            return Ok(());
        }
        let positive = self.lower_positive(st, parent, name)?;
        if let Some(d) = dst
            && Self::inode(st, d)?.ftype == FType::Dir
        {
            self.clear_whiteouts(&to)?;
        }
        // A file replaced while open keeps its object for fstat and I/O.
        let keep = match dst {
            Some(d)
                if Self::inode(st, d)?.ftype != FType::Dir
                    && Self::inode(st, d)?.names.len() == 1
                    && self.is_open(d) =>
            {
                Some((d, std::sync::Arc::new(to.pin()?)))
            }
            _ => None,
        };
        let to_whiteout = to.stat()?.is_some_and(|s| is_whiteout(&s));
        if to_whiteout && (positive || src_dir) {
            // Swap with the whiteout: it stays at the old name if one is due there.
            from.rename(&to, RenameFlags::EXCHANGE)?;
            if !positive {
                from.unlink()?;
            }
        } else {
            from.rename(&to, RenameFlags::empty())?;
            if positive {
                from.whiteout()?;
            }
        }
        if let Some((d, fd)) = keep {
            Self::inode_mut(st, d)?.orphan = Some(fd);
        }
        self.moved(st, src, dst, (parent, name), (newparent, newname));
        Ok(())
    }

    /// Whether `ino` is directory `dir` or below it.
    fn within(st: &State, ino: u64, dir: u64) -> FsResult<bool> {
        let mut cur = ino;
        while cur != 1 {
            if cur == dir {
                return Ok(true);
            }
            cur = Self::inode(st, cur)?.names.first().map(|n| n.0).ok_or(Errno::NOENT)?;
        }
        Ok(false)
    }

    /// The table after an exchange: the inodes at names `a` and `b` swap.
    fn swap_names(st: &mut State, a: (u64, &[u8]), b: (u64, &[u8])) {
        let at_a = st.dentries.remove(&(a.0, a.1.to_vec()));
        let at_b = st.dentries.remove(&(b.0, b.1.to_vec()));
        for (ino, old, new) in [(at_a, a, b), (at_b, b, a)] {
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
    }

    /// The table after `src` moved from name `from` to `to`, replacing
    /// `dst` there if it was given (whose dirty map goes with its last name).
    fn moved(&self, st: &mut State, src: u64, dst: Option<u64>, from: (u64, &[u8]), to: (u64, &[u8])) {
        if let Some(d) = dst {
            self.drop_name(st, to.0, to.1);
            if let Ok(u) = self.upper_root() {
                u.forget_dir(d);
            }
            if let Some(n) = st.inodes.get(&d)
                && n.names.is_empty()
                && let Some(p) = &n.partial
            {
                let _ = std::fs::remove_file(&p.map_path);
            }
        }
        st.dentries.remove(&(from.0, from.1.to_vec()));
        if let Some(n) = st.inodes.get_mut(&src) {
            for e in n.names.iter_mut() {
                if e.0 == from.0 && e.1.as_slice() == from.1 {
                    *e = (to.0, to.1.to_vec());
                }
            }
        }
        st.dentries.insert((to.0, to.1.to_vec()), src);
        self.track_name(st, from.0, from.1);
        self.track_name(st, to.0, to.1);
    }

    /// The redirect overlayfs would record for a directory moved from
    /// `ino`'s current place: its name (same parent) or its absolute path.
    fn redirect_for(&self, st: &State, ino: u64, samedir: bool) -> FsResult<Vec<u8>> {
        let existing = self.node_at(st, ino)?.getxattr(REDIRECT)?;
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
            let r = if node.upper { self.node_at(st, cur)?.getxattr(REDIRECT)? } else { None };
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
        Ok(self.node_at(st, ino)?.getxattr(OPAQUE)?.is_some_and(|v| v == b"y"))
    }
}

const fn libc_rename_noreplace() -> u32 {
    rustix::fs::RenameFlags::NOREPLACE.bits()
}

const fn libc_rename_exchange() -> u32 {
    rustix::fs::RenameFlags::EXCHANGE.bits()
}
