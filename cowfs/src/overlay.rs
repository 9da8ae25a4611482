//! overlayfs's on-disk conventions as xenod reads and writes them: the
//! xattr names that mark opaque, moved and partial directories and files,
//! whiteouts, and reading a path's xattrs. Both the upper directory
//! (`union`) and read-only host directories below it (`lower`) follow them,
//! so they live below both. What each mark means in the upper is in
//! `union`'s module doc.

use std::path::Path;

use rustix::fs::{FileType, Stat};
use xenod_store::Xattr;

use crate::error::{Errno, FsResult};

pub(crate) const OPAQUE: &str = "trusted.overlay.opaque";
pub(crate) const REDIRECT: &str = "trusted.overlay.redirect";
pub(crate) const PARTIAL: &str = "trusted.xenod.partial";

/// Whether `st` is overlayfs's whiteout: a character device 0/0.
pub(crate) fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Upper xattrs the union neither shows nor lets be set.
pub(crate) fn private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"trusted.xenod.")
}

pub(crate) fn getxattr_path(p: &Path, name: &str) -> FsResult<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::lgetxattr(p, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::RANGE) => buf.resize(buf.len() * 16, 0),
            Err(Errno::NODATA) | Err(Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn list_xattrs(p: &Path) -> FsResult<Vec<Xattr>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(p, &mut names) {
            Ok(n) => break n,
            Err(Errno::RANGE) => names.resize(names.len() * 16, 0),
            Err(Errno::NOTSUP) => return Ok(vec![]),
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(s) = std::str::from_utf8(name) else { continue };
        if let Some(value) = getxattr_path(p, s)? {
            out.push(Xattr { name: name.to_vec(), value });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
