//! Block-granular copy-up: a large lower file whose upper copy holds only
//! the 64 KiB blocks that were written.
//!
//! ```text
//!  UPPER/path/to/disk.img        sparse file, full size, owner/mode/xattrs/times of the
//!                                union file; xattr trusted.xenod.partial = lower path
//!  UPPER/.xenod/maps/<ino>.map   dirty map, <ino> = the upper file's inode number
//!
//!  map := "XNDMAP01" u64le(lower_limit) u64le(nblocks) bitmap[ceil(nblocks / 8)]
//! ```
//!
//! A block whose bit is set lives in the upper file; a clean block reads
//! from the lower file up to `lower_limit` (lowered by truncation) and from
//! the upper file (zeros) past it. The map is replaced atomically (write a
//! temporary, rename) after the block's data is in the upper file and before
//! the write is acknowledged, so a killed filesystem leaves no block marked
//! dirty whose data is missing: every acknowledged write survives, an
//! unacknowledged one is either whole or absent, and no file is torn.
//! `fsync` also syncs the data before the map, for power loss.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use xenod_store::BLOCK;

use crate::error::{Errno, FsResult, io_errno};
use crate::lower::FileData;

pub(crate) const MAP_MAGIC: &[u8; 8] = b"XNDMAP01";
const B: u64 = BLOCK as u64;

/// The persisted state of a partial file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    /// Bytes at or past this offset never come from the lower file.
    pub lower_limit: u64,
    pub bits: Vec<u8>,
    pub nblocks: u64,
}

impl DirtyMap {
    pub fn new(lower_size: u64) -> Self {
        let nblocks = lower_size.div_ceil(B);
        Self { lower_limit: lower_size, bits: vec![0; nblocks.div_ceil(8) as usize], nblocks }
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.nblocks && self.bits[(block / 8) as usize] & (1 << (block % 8)) != 0
    }

    fn set(&mut self, block: u64) {
        if block < self.nblocks {
            self.bits[(block / 8) as usize] |= 1 << (block % 8);
        }
    }

    pub fn dirty_count(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAP_MAGIC.to_vec();
        out.extend_from_slice(&self.lower_limit.to_le_bytes());
        out.extend_from_slice(&self.nblocks.to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let rest = b.strip_prefix(MAP_MAGIC.as_slice())?;
        let lower_limit = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let nblocks = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
        let bits = rest.get(16..)?.to_vec();
        (bits.len() as u64 == nblocks.div_ceil(8)).then_some(Self { lower_limit, bits, nblocks })
    }

    /// Reads the map at `path`; a missing map is an all-clean one.
    pub fn load(path: &Path, lower_size: u64) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(b) => {
                Self::decode(&b).ok_or_else(|| std::io::Error::other(format!("{} is not a dirty map", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::new(lower_size)),
            Err(e) => Err(e),
        }
    }

    /// Replaces the map at `path` atomically.
    pub fn store(&self, path: &Path, sync: bool) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        {
            let f = File::create(&tmp)?;
            f.write_all_at(&self.encode(), 0)?;
            if sync {
                f.sync_all()?;
            }
        }
        std::fs::rename(&tmp, path)
    }
}

/// An open partial file, shared by every handle on its inode.
pub(crate) struct Partial {
    pub file: File,
    pub lower: Arc<FileData>,
    /// Lower node the data comes from (for logs).
    pub lower_path: Vec<u8>,
    pub map_path: PathBuf,
    pub map: Mutex<DirtyMap>,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial").field("lower", &String::from_utf8_lossy(&self.lower_path)).finish_non_exhaustive()
    }
}

/// Reads lower bytes `[off, off + buf.len())`; errors are already logged.
pub(crate) type LowerRead<'a> = &'a dyn Fn(u64, &mut [u8]) -> FsResult<()>;

impl Partial {
    fn size(&self) -> FsResult<u64> {
        Ok(self.file.metadata().map_err(|e| io_errno(&e))?.len())
    }

    /// Union contents of `[off, off + buf.len())`, clipped to the file size.
    pub fn read(&self, off: u64, buf: &mut [u8], lower: LowerRead<'_>) -> FsResult<usize> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        self.read_locked(&map, off, buf, lower)
    }

    fn read_locked(&self, map: &DirtyMap, off: u64, buf: &mut [u8], lower: LowerRead<'_>) -> FsResult<usize> {
        let size = self.size()?;
        if off >= size {
            return Ok(0);
        }
        let end = (off + buf.len() as u64).min(size);
        let mut pos = off;
        while pos < end {
            let block = pos / B;
            let bend = ((block + 1) * B).min(end);
            let out = &mut buf[(pos - off) as usize..(bend - off) as usize];
            if map.is_dirty(block) || pos >= map.lower_limit {
                self.pread(out, pos)?;
            } else {
                let split = bend.min(map.lower_limit);
                let (lo, hi) = out.split_at_mut((split - pos) as usize);
                lower(pos, lo)?;
                if !hi.is_empty() {
                    self.pread(hi, split)?;
                }
            }
            pos = bend;
        }
        Ok((end - off) as usize)
    }

    fn pread(&self, out: &mut [u8], at: u64) -> FsResult<()> {
        let mut done = 0;
        while done < out.len() {
            match self.file.read_at(&mut out[done..], at + done as u64) {
                Ok(0) => {
                    out[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_errno(&e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `off`: clean blocks it touches are first filled with
    /// their union contents, then marked dirty in the persisted map.
    pub fn write(&self, off: u64, data: &[u8], lower: LowerRead<'_>) -> FsResult<usize> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let end = off + data.len() as u64;
        let size = self.size()?;
        let mut fresh = Vec::new();
        let first = off / B;
        let last = if data.is_empty() { first } else { (end - 1) / B };
        for block in first..=last {
            let bs = block * B;
            if block >= map.nblocks || map.is_dirty(block) || bs >= map.lower_limit {
                continue;
            }
            // Blocks wholly overwritten need no fill.
            let be = ((block + 1) * B).min(size.max(end));
            if !(off <= bs && end >= be) {
                let mut buf = vec![0u8; (((block + 1) * B).min(size) - bs) as usize];
                self.read_locked(&map, bs, &mut buf, lower)?;
                self.file.write_all_at(&buf, bs).map_err(|e| io_errno(&e))?;
            }
            fresh.push(block);
        }
        self.file.write_all_at(data, off).map_err(|e| io_errno(&e))?;
        if !fresh.is_empty() {
            let mut next = map.clone();
            for b in fresh {
                next.set(b);
            }
            next.store(&self.map_path, false).map_err(|e| io_errno(&e))?;
            *map = next;
        }
        Ok(data.len())
    }

    /// Sets the size; shrinking below the lower data cuts it off for good.
    pub fn truncate(&self, size: u64) -> FsResult<()> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if size < map.lower_limit {
            let mut next = map.clone();
            next.lower_limit = size;
            next.store(&self.map_path, false).map_err(|e| io_errno(&e))?;
            *map = next;
        }
        self.file.set_len(size).map_err(|e| io_errno(&e))
    }

    pub fn sync(&self) -> FsResult<()> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        self.file.sync_data().map_err(|e| io_errno(&e))?;
        map.store(&self.map_path, true).map_err(|e| io_errno(&e))
    }

    /// Next data offset at or after `off` (every lower-backed block counts as data).
    pub fn seek_data(&self, off: u64, hole: bool) -> FsResult<u64> {
        let size = self.size()?;
        if off >= size {
            return Err(Errno::NXIO);
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let lower_data = |pos: u64| -> bool {
            if pos >= map.lower_limit || map.is_dirty(pos / B) {
                return false;
            }
            let i = self.lower.extent_at(pos);
            matches!(self.lower.extents[i], xenod_store::Extent::Data { .. })
        };
        let upper_data = |pos: u64| -> bool {
            match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d < ((pos / B) + 1) * B,
                Err(_) => false,
            }
        };
        let mut pos = off;
        while pos < size {
            let is_data = lower_data(pos) || ((map.is_dirty(pos / B) || pos >= map.lower_limit) && upper_data(pos));
            if is_data != hole {
                return Ok(pos);
            }
            pos = ((pos / B) + 1) * B;
        }
        if hole { Ok(size) } else { Err(Errno::NXIO) }
    }
}
