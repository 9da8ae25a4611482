//! Attributes: getattr, setattr (copying up first), readlink.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Errno, FsResult};
use crate::lower::LKind;

use super::{Attr, FType, Union};

impl Union {
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let st = self.lock();
        self.attr_locked(&st, ino)
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
            let at = self.node_at(st, ino)?;
            if uid.is_some() || gid.is_some() {
                at.chown(uid, gid)?;
            }
            if let Some(m) = mode {
                at.chmod(m & 0o7777)?;
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
                at.set_times(&rustix::fs::Timestamps { last_access: conv(atime), last_modification: conv(mtime) })?;
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
            return self.node_at(&st, ino)?.readlink();
        }
        match &self.lower.node(node.lower.ok_or(Errno::IO)?).kind {
            LKind::Symlink(t) => Ok(t.to_vec()),
            _ => Err(Errno::INVAL),
        }
    }
}

const UTIME_NOW: i64 = (1 << 30) - 1;

const UTIME_OMIT: i64 = (1 << 30) - 2;
