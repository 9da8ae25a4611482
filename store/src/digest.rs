//! A digest of a directory tree covering contents and all metadata, to
//! compare an export with its source.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::{IoContext, Result};

/// One line per path: kind, mode, owner, mtime (ns), xattrs, and the hash
/// of the contents, link target or device number. Hardlinks show as
/// `link->FIRST` where FIRST is the first path of their set. `skip_root_times`
/// leaves the root's mtime out (a mount point's own is not the tree's).
pub fn tree_listing(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut links = HashMap::new();
    visit(root, b"", &mut out, &mut links)?;
    Ok(out)
}

/// The BLAKE3 of [`tree_listing`].
pub fn tree_digest(root: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for l in tree_listing(root)? {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_hex().to_string())
}

fn visit(path: &Path, rel: &[u8], out: &mut Vec<String>, links: &mut HashMap<(u64, u64), String>) -> Result<()> {
    let md = fs::symlink_metadata(path).ctx("reading", path)?;
    let ft = md.file_type();
    let shown = format!("/{}", String::from_utf8_lossy(rel));
    if ft.is_file() && md.nlink() > 1 {
        if let Some(first) = links.get(&(md.dev(), md.ino())) {
            out.push(format!("{shown} link->{first}"));
            return Ok(());
        }
        links.insert((md.dev(), md.ino()), shown.clone());
    }
    let what = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("symlink {}", String::from_utf8_lossy(fs::read_link(path).ctx("reading", path)?.as_os_str().as_bytes()))
    } else if ft.is_char_device() {
        format!("chr {:x}", md.rdev())
    } else if ft.is_block_device() {
        format!("blk {:x}", md.rdev())
    } else if ft.is_fifo() {
        "fifo".into()
    } else if ft.is_socket() {
        "sock".into()
    } else {
        let mut h = blake3::Hasher::new();
        let mut f = fs::File::open(path).ctx("opening", path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).ctx("reading", path)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        format!("file {} {}", md.len(), &h.finalize().to_hex()[..16])
    };
    let mut xattrs = Vec::new();
    let mut names = vec![0u8; 65536];
    if let Ok(n) = rustix::fs::llistxattr(path, &mut names) {
        for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let mut v = vec![0u8; 65536];
            if let Ok(len) = rustix::fs::lgetxattr(path, std::ffi::OsStr::from_bytes(name), &mut v) {
                xattrs.push(format!("{}={}", String::from_utf8_lossy(name), crate::names::hex(&v[..len])));
            }
        }
    }
    xattrs.sort();
    let mode = if ft.is_symlink() { 0 } else { md.mode() & 0o7777 };
    out.push(format!(
        "{shown} {what} mode={mode:o} owner={}:{} mtime={}.{:09} xattrs=[{}]",
        md.uid(),
        md.gid(),
        md.mtime(),
        md.mtime_nsec(),
        xattrs.join(",")
    ));
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .ctx("listing", path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .ctx("listing", path)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for n in names {
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(n.as_bytes());
            visit(&path.join(&n), &r, out, links)?;
        }
    }
    Ok(())
}
