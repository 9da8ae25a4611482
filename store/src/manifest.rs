//! Layer manifests: the canonical, versioned description of a tree.
//!
//! A layer is a root chunk that lists the chunks of its manifest stream:
//!
//! ```text
//!  layer id = BLAKE3(root bytes)
//!  root     := "XNDROOT1" postcard(LayerRoot)
//!                 |
//!                 +-- manifest: [ (chunk id, len), ... ]   -> stream chunks
//!
//!  stream   := "XNDLYR01" entry*          (cut by FastCDC, stored as chunks)
//!  entry    := varint(len) postcard(Entry)
//! ```
//!
//! Entries appear in *tree order*: paths compared component by component
//! (`a` < `a/b` < `a.b`), so every directory comes before its children and
//! a subtree is contiguous. That order is what lets export, merge and diff
//! stream a tree of any size with memory bounded by its depth.
//!
//! Canonical: the same tree gives the same entries (xattrs sorted, hardlink
//! members after the first path of their set, which carries the data and the
//! metadata) and postcard encodes them deterministically, so the same tree
//! gives the same bytes and the same id.
//!
//! Invariants a reader checks for every entry: the path is relative, its
//! components are non-empty and not `.`/`..` and hold no NUL; entries are
//! strictly increasing (no duplicates); the first entry is the root
//! directory (empty path); each entry's parent is a directory already seen;
//! a file's extents add up to its size; xattr names are sorted and unique.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chunker::{CDC_MAX, Chunking};
use crate::error::{Error, Result};
use crate::id::ChunkId;

/// Bump when the manifest format or the chunking parameters change.
pub const FORMAT_VERSION: u32 = 1;
pub(crate) const ROOT_MAGIC: &[u8; 8] = b"XNDROOT1";
pub(crate) const STREAM_MAGIC: &[u8; 8] = b"XNDLYR01";
/// An entry larger than this is refused (a hostile length prefix).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// A run of a file: a stored chunk, or a hole of zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    Data { id: ChunkId, len: u32 },
    Hole { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Self::Data { len, .. } => len as u64,
            Self::Hole { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `opaque`: in an overlay, hide everything below this directory.
    Dir {
        opaque: bool,
    },
    File {
        size: u64,
        chunking: Chunking,
        extents: Vec<Extent>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another name for the regular file at `target`, an earlier entry.
    Hardlink {
        target: Vec<u8>,
    },
    CharDev {
        rdev: u64,
    },
    BlockDev {
        rdev: u64,
    },
    Fifo,
    Socket,
    /// In an overlay: the path is deleted below.
    Whiteout,
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Dir { .. } => "directory",
            Self::File { .. } => "file",
            Self::Symlink { .. } => "symlink",
            Self::Hardlink { .. } => "hardlink",
            Self::CharDev { .. } => "char device",
            Self::BlockDev { .. } => "block device",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::Whiteout => "whiteout",
        }
    }
}

/// One path of a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, `/`-separated; the root directory is the empty path.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (`0o7777`); the file type lives in `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub xattrs: Vec<Xattr>,
}

impl Entry {
    /// A plain directory: mode 0755, owned by root, mtime zero (for
    /// directories an input implies but does not describe).
    pub fn dir(path: Vec<u8>) -> Self {
        Self {
            path,
            kind: Kind::Dir { opaque: false },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: vec![],
        }
    }

    /// Another name for the regular file `target`, which carries the data
    /// and the metadata of the set (so this entry's own are zero).
    pub fn hardlink(path: Vec<u8>, target: Vec<u8>) -> Self {
        Self {
            path,
            kind: Kind::Hardlink { target },
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: vec![],
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir { .. })
    }

    pub fn display_path(&self) -> String {
        display_path(&self.path)
    }

    /// Checks what can be checked of one entry alone.
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_path(&self.path)?;
        if self.mode & !0o7777 != 0 {
            return Err(format!("mode {:o} has bits beyond 07777", self.mode));
        }
        if self.xattrs.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err("xattrs not sorted or repeated".into());
        }
        if self.xattrs.iter().any(|x| x.name.is_empty() || x.name.contains(&0)) {
            return Err("empty xattr name or NUL in it".into());
        }
        match &self.kind {
            Kind::File { size, extents, .. } => {
                let mut sum = 0u64;
                for e in extents {
                    match *e {
                        Extent::Data { len, .. } if len == 0 || len as usize > CDC_MAX => {
                            return Err(format!("chunk of {len} bytes is outside 1..={CDC_MAX}"));
                        }
                        Extent::Hole { len: 0 } => return Err("empty hole".into()),
                        _ => {}
                    }
                    sum = sum.checked_add(e.len()).ok_or("extent sizes overflow")?;
                }
                if sum != *size {
                    return Err(format!("size {size} disagrees with its chunks, which add up to {sum}"));
                }
            }
            Kind::Symlink { target } if target.is_empty() || target.contains(&0) => {
                return Err("symlink target empty or holds NUL".into());
            }
            Kind::Hardlink { target } => {
                check_path(target).map_err(|e| format!("hardlink target: {e}"))?;
                if target.is_empty() || cmp_paths(target, &self.path) != Ordering::Less {
                    return Err("hardlink target must be an earlier entry".into());
                }
            }
            _ => {}
        }
        if self.path.is_empty() && !self.is_dir() {
            return Err("the root must be a directory".into());
        }
        Ok(())
    }
}

pub fn display_path(p: &[u8]) -> String {
    if p.is_empty() { "/".into() } else { format!("/{}", String::from_utf8_lossy(p)) }
}

fn check_path(p: &[u8]) -> std::result::Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if p.contains(&0) {
        return Err("path holds NUL".into());
    }
    if p[0] == b'/' {
        return Err("absolute path".into());
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Err("empty path component".into()),
            b"." | b".." => return Err(format!("path component {:?}", String::from_utf8_lossy(c))),
            _ => {}
        }
    }
    Ok(())
}

/// Tree order: component by component, bytewise within a component.
pub fn cmp_paths(a: &[u8], b: &[u8]) -> Ordering {
    let map = |c: u8| if c == b'/' { 0 } else { c };
    a.iter().map(|&c| map(c)).cmp(b.iter().map(|&c| map(c)))
}

/// The parent of `p` (the root's parent is `None`).
pub fn parent(p: &[u8]) -> Option<&[u8]> {
    if p.is_empty() {
        return None;
    }
    Some(match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    })
}

/// The last component of `p`.
pub fn file_name(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[i + 1..],
        None => p,
    }
}

/// Whether `p` lies strictly below directory `dir`.
pub fn is_below(p: &[u8], dir: &[u8]) -> bool {
    if dir.is_empty() {
        return !p.is_empty();
    }
    p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
}

/// A reference to one chunk of a manifest stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// The root chunk of a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRoot {
    pub format: u32,
    /// For an overlay: the layer it applies to.
    pub base: Option<ChunkId>,
    pub entries: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
    pub manifest: Vec<ChunkRef>,
    /// Free-form metadata (deploy spec, base name, ...), sorted.
    pub meta: BTreeMap<String, String>,
}

impl LayerRoot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = ROOT_MAGIC.to_vec();
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    pub fn decode(id: &ChunkId, bytes: &[u8]) -> Result<Self> {
        let body = bytes
            .strip_prefix(ROOT_MAGIC.as_slice())
            .ok_or_else(|| Error::manifest(id, "not a layer root (bad magic)"))?;
        let root: Self =
            postcard::from_bytes(body).map_err(|e| Error::manifest(id, format!("root does not decode: {e}")))?;
        if root.format != FORMAT_VERSION {
            return Err(Error::manifest(
                id,
                format!("format version {} (this build reads {FORMAT_VERSION})", root.format),
            ));
        }
        Ok(root)
    }
}

/// Appends one entry to a manifest stream (length prefix + postcard), with
/// no checks: [`crate::LayerWriter`] is the checked way to write layers.
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    let body = postcard::to_stdvec(e).unwrap_or_default();
    let mut n = body.len() as u64;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(&body);
}

/// Parses one entry from the front of `buf`: `Ok(None)` if `buf` holds only
/// part of it, else the entry and the bytes it took.
pub(crate) fn decode_entry(buf: &[u8]) -> std::result::Result<Option<(Entry, usize)>, String> {
    let mut n: u64 = 0;
    let mut i = 0;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        if i >= 10 {
            return Err("entry length prefix too long".into());
        }
        n |= ((b & 0x7f) as u64) << (7 * i);
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if n as usize > MAX_ENTRY_BYTES {
        return Err(format!("entry of {n} bytes exceeds the limit of {MAX_ENTRY_BYTES}"));
    }
    let end = i + n as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let e: Entry = postcard::from_bytes(&buf[i..end]).map_err(|e| format!("entry does not decode: {e}"))?;
    Ok(Some((e, end)))
}

/// Checks that entries form a valid tree, one at a time, in a bounded
/// amount of memory (the chain of open directories).
#[derive(Debug, Default)]
pub struct OrderCheck {
    last: Option<Vec<u8>>,
    dirs: Vec<Vec<u8>>,
}

impl OrderCheck {
    pub fn check(&mut self, e: &Entry) -> std::result::Result<(), String> {
        e.validate()?;
        match &self.last {
            None if !e.path.is_empty() => return Err("first entry is not the root directory".into()),
            Some(last) => match cmp_paths(last, &e.path) {
                Ordering::Less => {}
                Ordering::Equal => return Err("duplicate entry".into()),
                Ordering::Greater => return Err("entries out of order".into()),
            },
            None => {}
        }
        if let Some(p) = parent(&e.path) {
            while self.dirs.last().is_some_and(|d| d.as_slice() != p && !is_below(p, d)) {
                self.dirs.pop();
            }
            if self.dirs.last().map(Vec::as_slice) != Some(p) {
                return Err("parent is not a directory of this layer".into());
            }
        }
        if e.is_dir() {
            self.dirs.push(e.path.clone());
        }
        self.last = Some(e.path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn dir(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::Dir { opaque: false },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: vec![],
        }
    }

    #[test]
    fn tree_order() {
        let mut v = vec!["a.b", "a/b", "a", "", "a/b/c", "b", "a-"];
        v.sort_by(|a, b| cmp_paths(a.as_bytes(), b.as_bytes()));
        assert_eq!(v, ["", "a", "a/b", "a/b/c", "a-", "a.b", "b"]);
        assert!(is_below(b"a/b", b"a"));
        assert!(!is_below(b"ab", b"a"));
        assert!(is_below(b"a", b""));
        assert_eq!(parent(b"a/b/c"), Some(&b"a/b"[..]));
        assert_eq!(parent(b"a"), Some(&b""[..]));
        assert_eq!(file_name(b"a/b/c"), b"c");
    }

    #[test]
    fn hostile_paths_are_refused() {
        for p in ["/etc", "a/../b", "..", "a//b", "a/", "./a", "a\0b"] {
            let mut e = dir("x");
            e.path = p.as_bytes().to_vec();
            assert!(e.validate().is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn order_check_catches_bad_trees() {
        let mut c = OrderCheck::default();
        assert!(c.check(&dir("a")).is_err(), "no root");
        let mut c = OrderCheck::default();
        c.check(&dir("")).unwrap();
        c.check(&dir("a")).unwrap();
        assert!(c.check(&dir("a")).unwrap_err().contains("duplicate"));
        assert!(c.check(&dir("b/c")).unwrap_err().contains("parent"));
        let mut c = OrderCheck::default();
        c.check(&dir("")).unwrap();
        c.check(&dir("b")).unwrap();
        assert!(c.check(&dir("a")).unwrap_err().contains("order"));
    }

    #[test]
    fn size_must_match_extents() {
        let mut e = dir("f");
        e.kind = Kind::File {
            size: 10,
            chunking: Chunking::Cdc,
            extents: vec![Extent::Hole { len: 4 }, Extent::Data { id: ChunkId::of(b"x"), len: 5 }],
        };
        assert!(e.validate().unwrap_err().contains("disagrees"));
    }

    #[test]
    fn truncated_and_huge_entries() {
        let mut buf = Vec::new();
        encode_entry(&dir("abc"), &mut buf);
        for cut in 0..buf.len() {
            assert!(decode_entry(&buf[..cut]).unwrap().is_none());
        }
        let (e, n) = decode_entry(&buf).unwrap().unwrap();
        assert_eq!((e, n), (dir("abc"), buf.len()));
        let huge = [0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode_entry(&huge).unwrap_err().contains("exceeds"));
    }
}
