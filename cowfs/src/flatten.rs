//! Handing an upper directory to the kernel: partial files become whole.
//!
//! A partial file (see `partial`) holds only the blocks that were written;
//! the rest comes from the lower file, which only xenod can read. Before
//! the kernel's overlayfs mounts such an upper, [`flatten`] writes every
//! clean block's lower data into the upper file, then drops the partial
//! mark and the dirty map, and finally xenod's own work area. Each step
//! is idempotent and the mark goes only after the data is synced, so a
//! flatten killed midway is simply run again.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use xenod_store::{BLOCK, LayerId, Store, is_zero};

use crate::error::{Error, Result};
use crate::lower::LowerTree;
use crate::overlay::{PARTIAL, getxattr_path};
use crate::union::{Union, WORK_DIR};
use crate::upper::{LOCK_FILE, STACK_FILE, check_stack, claim};

/// What [`flatten`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlattenStats {
    /// Partial files made whole.
    pub files: u64,
    /// Clean blocks whose lower data was written into the upper.
    pub blocks: u64,
}

/// Makes every partial file of `upper` (over `stack`, bottom first) whole
/// and removes xenod's work area (with the upper's lock and stack record),
/// so that the kernel's overlayfs can mount it. Refused while the upper is
/// mounted read-write, and when it records being made on another stack.
pub fn flatten(store: Arc<Store>, stack: &[LayerId], upper: &Path) -> Result<FlattenStats> {
    if !upper.is_dir() {
        return Err(Error::BadUpper { path: upper.into(), why: "not a directory".into() });
    }
    let _claim = claim(upper)?;
    check_stack(upper, stack)?;
    let lower = LowerTree::load(&store, stack)?;
    let union = Union::new(store, lower, Some(upper), 64 << 20)?;
    let mut stats = FlattenStats::default();
    let mut todo = vec![Vec::<u8>::new()];
    while let Some(rel) = todo.pop() {
        let dir = upper.join(OsStr::from_bytes(&rel));
        for e in std::fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
            let e = e.map_err(Error::io("listing", &dir))?;
            let name = e.file_name();
            if rel.is_empty() && name == WORK_DIR {
                continue;
            }
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            let ft = e.file_type().map_err(Error::io("inspecting", e.path()))?;
            if ft.is_dir() {
                todo.push(path);
            } else if ft.is_file()
                && getxattr_path(&e.path(), PARTIAL)
                    .map_err(|x| Error::io("reading xattrs of", e.path())(x.into()))?
                    .is_some()
            {
                stats.blocks += whole(&union, &path, &e.path())?;
                stats.files += 1;
            }
        }
    }
    let work = upper.join(WORK_DIR);
    // Removing the work area must not show as a change of the root.
    let root_times = times(upper)?;
    // The claim holds the open lock file; its name can go before it is released.
    for f in [STACK_FILE, LOCK_FILE] {
        let p = work.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &p)(e)),
        }
    }
    for d in ["work", "maps"] {
        let p = work.join(d);
        match std::fs::remove_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::BadUpper { path: p, why: format!("not empty after flattening: {e}") }),
        }
    }
    let _ = std::fs::remove_dir(&work);
    set_times(upper, root_times)?;
    Ok(stats)
}

fn times(p: &Path) -> Result<rustix::fs::Timestamps> {
    let st = rustix::fs::lstat(p).map_err(|e| Error::io("inspecting", p)(e.into()))?;
    Ok(rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: st.st_atime as _, tv_nsec: st.st_atime_nsec as _ },
        last_modification: rustix::fs::Timespec { tv_sec: st.st_mtime as _, tv_nsec: st.st_mtime_nsec as _ },
    })
}

fn set_times(p: &Path, t: rustix::fs::Timestamps) -> Result<()> {
    rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| Error::io("restoring the times of", p)(e.into()))
}

/// Fills the clean blocks of the partial file at union path `path`.
fn whole(union: &Union, path: &[u8], file: &Path) -> Result<u64> {
    let bad = |why: String| Error::BadUpper { path: file.into(), why };
    let mut ino = 1;
    for name in path.split(|&b| b == b'/') {
        ino = union.lookup(ino, name).map_err(|e| bad(format!("lookup in the union: {e}")))?.ino;
    }
    let (_, partial) = union.lower_of(ino).map_err(|e| bad(e.to_string()))?;
    let p = partial.ok_or_else(|| bad("marked partial, but its lower file is not in the stack".into()))?;
    let size = p.file.metadata().map_err(Error::io("inspecting", file))?.len();
    let map = p.map.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let file_times = times(file)?;
    let out = std::fs::OpenOptions::new().write(true).open(file).map_err(Error::io("opening", file))?;
    let b = BLOCK as u64;
    let mut buf = vec![0u8; BLOCK];
    let mut filled = 0;
    for block in 0..size.div_ceil(b) {
        if map.is_dirty(block) {
            continue;
        }
        let pos = block * b;
        let chunk = &mut buf[..(size - pos).min(b) as usize];
        let n = union.read_partial(&p, pos, chunk).map_err(|e| bad(format!("reading block {block}: {e}")))?;
        if n != chunk.len() {
            return Err(bad(format!("block {block} reads short")));
        }
        // The sparse upper file reads zeros already.
        if !is_zero(chunk) {
            out.write_all_at(chunk, pos).map_err(Error::io("writing", file))?;
            filled += 1;
        }
    }
    set_times(file, file_times)?;
    out.sync_all().map_err(Error::io("syncing", file))?;
    rustix::fs::lremovexattr(file, PARTIAL).map_err(|e| Error::io("removing the partial mark of", file)(e.into()))?;
    match std::fs::remove_file(&p.map_path) {
        Ok(()) => Ok(filled),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(filled),
        Err(e) => Err(Error::io("removing", &p.map_path)(e)),
    }
}
