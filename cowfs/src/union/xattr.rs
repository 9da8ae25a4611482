//! Extended attributes as the union shows them: the upper object's, or the
//! lower node's while not copied up. xenod's and overlayfs's own marks
//! (`overlay::private_xattr`) are neither shown nor settable.

use rustix::fs::XattrFlags;

use crate::error::{Errno, FsResult};
use crate::overlay::private_xattr;

use super::Union;

impl Union {
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        if node.upper {
            if private_xattr(name) {
                return Err(Errno::NODATA);
            }
            let n = std::str::from_utf8(name).map_err(|_| Errno::NODATA)?;
            return self.node_at(&st, ino)?.getxattr(n)?.ok_or(Errno::NODATA);
        }
        let l = self.lower.node(self.lower.data_node(node.lower.ok_or(Errno::IO)?));
        l.xattrs.iter().find(|x| x.name == name).map(|x| x.value.clone()).ok_or(Errno::NODATA)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = Self::inode(&st, ino)?;
        let xs = if node.upper {
            self.node_at(&st, ino)?.xattrs()?.into_iter().filter(|x| !private_xattr(&x.name)).collect()
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
        self.node_at(&st, ino)?.setxattr(name, value, XattrFlags::from_bits_retain(flags as u32))
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
        self.node_at(&st, ino)?.removexattr(name)
    }
}
