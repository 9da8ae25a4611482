//! The upper layer's quota: what a guest may write into its upper
//! directory, counted as the blocks its files take on the host's disk
//! (`st_blocks`, so holes cost nothing, as on the filesystem below).
//!
//! At mount the upper directory is walked once to learn what it holds.
//! Then every write, truncate, copy-up and removal through the union
//! updates the count, by the blocks the file took before and after. A
//! write that would take the upper past the limit is cut to what fits, and
//! one that fits nothing fails with `EDQUOT` ("Disk quota exceeded" in the
//! guest); a write into blocks the file already holds always passes. The
//! upper stays consistent: what was written is there, whole, and nothing
//! past it. Writes racing each other may go over the limit by at most
//! what they wrote at once; names the union renames over other files are
//! not subtracted (the count errs high).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Errno, FsResult};

/// An upper directory's limit and what it holds.
#[derive(Debug)]
pub struct Quota {
    limit: u64,
    used: AtomicU64,
}

/// Bytes `f` takes on disk.
pub(crate) fn allocated(f: &File) -> u64 {
    f.metadata().map_or(0, |m| m.blocks() * 512)
}

impl Quota {
    /// `limit` bytes over the upper directory `upper`, whose files are
    /// counted now.
    pub fn new(limit: u64, upper: &Path) -> std::io::Result<Self> {
        let mut used = 0u64;
        let mut dirs = vec![upper.to_path_buf()];
        while let Some(d) = dirs.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in rd {
                let e = e?;
                let m = e.path().symlink_metadata()?;
                used += m.blocks() * 512;
                if m.is_dir() {
                    dirs.push(e.path());
                }
            }
        }
        Ok(Self { limit, used: AtomicU64::new(used) })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes the upper directory takes now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// How many of `len` bytes at `off` in `f` may be written: all, while
    /// they fit or land in blocks `f` holds; else what fits; else EDQUOT.
    pub(crate) fn admit(&self, f: &File, off: u64, len: usize) -> FsResult<usize> {
        let used = self.used();
        if used.saturating_add(len as u64) <= self.limit || len == 0 {
            return Ok(len);
        }
        let end = off + len as u64;
        let size = f.metadata().map_err(|e| crate::error::io_errno(&e))?.len();
        if end <= size {
            // Whole blocks already there take nothing more.
            match rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(off)) {
                Ok(hole) if hole >= end => return Ok(len),
                _ => {}
            }
        }
        let room = self.limit.saturating_sub(used);
        // Whole pages, so a guest's page cache sees a clean cut.
        let fits = (room.min(len as u64) & !4095) as usize;
        if fits == 0 { Err(Errno::DQUOT) } else { Ok(fits) }
    }

    /// A file went from `before` to `after` bytes on disk.
    pub(crate) fn charge(&self, before: u64, after: u64) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(before - after)));
        }
    }

    /// A copy-up of `size` bytes: refused when it cannot fit.
    pub(crate) fn admit_copy(&self, size: u64) -> FsResult<()> {
        if self.used().saturating_add(size) > self.limit { Err(Errno::DQUOT) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn writes_stop_at_the_limit_and_rewrites_pass() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("old"), vec![1u8; 8192]).unwrap();
        let q = Quota::new(64 << 10, d.path()).unwrap();
        assert!(q.used() >= 8192, "existing files are counted: {}", q.used());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("new"))
            .unwrap();
        let chunk = vec![7u8; 16 << 10];
        let mut off = 0u64;
        loop {
            let before = allocated(&f);
            match q.admit(&f, off, chunk.len()) {
                Ok(n) => {
                    f.write_all_at(&chunk[..n], off).unwrap();
                    q.charge(before, allocated(&f));
                    off += n as u64;
                }
                Err(e) => {
                    assert_eq!(e, Errno::DQUOT);
                    break;
                }
            }
            assert!(off < 1 << 20, "the quota never stopped the writes");
        }
        assert!(q.used() <= q.limit() + 4096, "{} over {}", q.used(), q.limit());
        assert!(off >= 32 << 10, "wrote {off}");
        // Rewriting what is there takes nothing more.
        assert_eq!(q.admit(&f, 0, 4096).unwrap(), 4096);
        // Removing a file frees its blocks.
        let held = allocated(&f);
        q.charge(held, 0);
        assert!(q.admit_copy(held / 2).is_ok());
        assert!(q.admit_copy(1 << 30).is_err());
    }
}
