//! Directories: the union's listing of a directory, its upper names then
//! the lower names they do not hide (nor whiteouts, nor xenod's work area in
//! the root). A handle holds the listing taken at opendir, so a readdir
//! continued across changes neither repeats nor skips a name.

use crate::error::{Errno, FsResult};

use super::{FType, Handle, State, Union, WORK_DIR, upper};

impl Union {
    /// The union's entries of directory `ino` (without `.` and `..`).
    pub(super) fn list(&self, st: &mut State, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let node = Self::inode(st, ino)?;
        if node.ftype != FType::Dir {
            return Err(Errno::NOTDIR);
        }
        let (upper, lower_dir) = (node.upper, node.lower_dir);
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if upper {
            for n in upper::names(self.node_at(st, ino)?.open_dir()?)? {
                seen.insert(n.clone());
                if ino == 1 && n == WORK_DIR.as_bytes() {
                    continue;
                }
                names.push(n);
            }
        }
        if let Some(d) = lower_dir {
            for &c in self.lower.children(d) {
                let n = &self.lower.node(c).name;
                if !seen.contains(n.as_ref()) {
                    names.push(n.to_vec());
                }
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(c) = self.child(st, ino, &n)? {
                let ft = Self::inode(st, c)?.ftype;
                out.push((n, c, ft));
            }
        }
        Ok(out)
    }

    pub(crate) fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.dir_entries(ino)?;
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    /// A directory's listing as readdir gives it: `.`, `..`, then the union's entries.
    pub(crate) fn dir_entries(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let mut st = self.lock();
        let mut entries = vec![(b".".to_vec(), ino, FType::Dir)];
        let parent = Self::inode(&st, ino)?.names.first().map_or(1, |n| n.0);
        entries.push((b"..".to_vec(), parent, FType::Dir));
        entries.extend(self.list(&mut st, ino)?);
        Ok(entries)
    }

    /// Names in a directory with their inode and type.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, u64, FType)>> {
        let mut st = self.lock();
        self.list(&mut st, ino)
    }
}
