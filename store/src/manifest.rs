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
use crate::layer::MAX_STACK;

/// Bump when the manifest format or the chunking parameters change.
pub const FORMAT_VERSION: u32 = 1;
pub(crate) const ROOT_MAGIC: &[u8; 8] = b"XNDROOT1";
pub(crate) const STREAM_MAGIC: &[u8; 8] = b"XNDLYR01";
/// An entry larger than this is refused (a hostile length prefix).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

/// Why a path (an entry's, or a hardlink's target) is not a manifest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathFault {
    /// A NUL byte somewhere in the path.
    #[error("path holds NUL")]
    Nul,
    /// A leading `/`: manifest paths are relative.
    #[error("absolute path")]
    Absolute,
    /// `//`, or a trailing `/`.
    #[error("empty path component")]
    EmptyComponent,
    /// A `.` component.
    #[error("path component \".\"")]
    Dot,
    /// A `..` component.
    #[error("path component \"..\"")]
    DotDot,
}

/// Why an entry, alone or after those before it, cannot be in a manifest:
/// what [`Entry::validate`], [`OrderCheck::check`] and the entry decoder
/// refuse.
#[derive(Debug, thiserror::Error)]
pub enum EntryFault {
    /// The entry's own path is not a manifest path.
    #[error(transparent)]
    Path(#[from] PathFault),
    /// Mode bits beyond the permission bits (`07777`).
    #[error("mode {mode:o} has bits beyond 07777")]
    Mode { mode: u32 },
    /// Xattr names not strictly increasing.
    #[error("xattrs not sorted or repeated")]
    XattrOrder,
    /// An empty xattr name, or one holding NUL.
    #[error("empty xattr name or NUL in it")]
    XattrName,
    /// A data extent of no bytes or of more than a chunk can hold.
    #[error("chunk of {len} bytes is outside 1..={max}", max = CDC_MAX)]
    ChunkLen { len: u32 },
    /// A hole of no bytes.
    #[error("empty hole")]
    EmptyHole,
    /// Extent lengths whose sum overflows a `u64`.
    #[error("extent sizes overflow")]
    ExtentOverflow,
    /// A file's size is not the sum of its extents.
    #[error("size {size} disagrees with its chunks, which add up to {sum}")]
    Size { size: u64, sum: u64 },
    /// A symlink target that is empty or holds NUL.
    #[error("symlink target empty or holds NUL")]
    SymlinkTarget,
    /// A hardlink target that is not a manifest path.
    #[error("hardlink target: {0}")]
    HardlinkTarget(#[source] PathFault),
    /// A hardlink whose target does not come before it.
    #[error("hardlink target must be an earlier entry")]
    HardlinkOrder,
    /// The empty path (the root) as something other than a directory.
    #[error("the root must be a directory")]
    RootNotDir,
    /// A first entry other than the root directory.
    #[error("first entry is not the root directory")]
    NoRoot,
    /// The same path as the entry before.
    #[error("duplicate entry")]
    Duplicate,
    /// A path that sorts before the entry before it.
    #[error("entries out of order")]
    OutOfOrder,
    /// An entry whose parent is not a directory seen before it.
    #[error("parent is not a directory of this layer")]
    Orphan,
    /// An entry's length prefix of more than ten bytes.
    #[error("entry length prefix too long")]
    LengthPrefix,
    /// An entry longer than [`MAX_ENTRY_BYTES`] (a hostile length prefix).
    #[error("entry of {len} bytes exceeds the limit of {max}", max = MAX_ENTRY_BYTES)]
    TooLarge { len: u64 },
    /// Entry bytes that postcard does not decode.
    #[error("entry does not decode: {0}")]
    Decode(#[source] postcard::Error),
}

/// Why a layer's root or manifest stream is bad: what
/// [`crate::Error::Manifest`] carries.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFault {
    /// The layer's root chunk is not in the store.
    #[error("layer root is not in the store")]
    RootMissing,
    /// A root chunk without the root magic (`ROOT_MAGIC`).
    #[error("not a layer root (bad magic)")]
    RootMagic,
    /// A root chunk that postcard does not decode.
    #[error("root does not decode: {0}")]
    RootDecode(#[source] postcard::Error),
    /// A root of another [`FORMAT_VERSION`].
    #[error("format version {found} (this build reads {FORMAT_VERSION})")]
    Format { found: u32 },
    /// A chain of bases longer than [`MAX_STACK`].
    #[error("stack deeper than {MAX_STACK} layers")]
    StackTooDeep,
    /// A chunk of the manifest stream of another length than its root says.
    #[error("manifest chunk {chunk} has the wrong length")]
    ChunkLength { chunk: ChunkId },
    /// A stream that ends before its magic.
    #[error("manifest stream is truncated before its header")]
    TruncatedHeader,
    /// A stream without the stream magic (`STREAM_MAGIC`).
    #[error("manifest stream has a bad header")]
    BadHeader,
    /// The `index`th entry (from 1) does not decode.
    #[error("entry {index}: {fault}")]
    Decode {
        index: u64,
        #[source]
        fault: EntryFault,
    },
    /// The `index`th entry (from 1), at `path`, breaks an invariant.
    #[error("entry {index}: {fault} at {path}")]
    Entry {
        index: u64,
        path: String,
        #[source]
        fault: EntryFault,
    },
    /// The stream ends inside its `index`th entry (from 1).
    #[error("entry {index}: manifest stream is truncated inside an entry")]
    TruncatedEntry { index: u64 },
    /// The stream holds another number of entries than its root says.
    #[error("entry {}: manifest holds {seen} entries, its root says {expected}", seen + 1)]
    Count { seen: u64, expected: u64 },
    /// A reader of a merged stack ended with no entry and no error.
    #[error("layer reader failed without an error")]
    ReaderVanished,
}

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

    /// A small regular file held in one chunk `id` of `len` bytes: mode
    /// 0644, owned by root, mtime zero.
    pub fn small_file(path: Vec<u8>, id: ChunkId, len: u32) -> Self {
        Self {
            path,
            kind: Kind::File { size: u64::from(len), chunking: Chunking::Cdc, extents: vec![Extent::Data { id, len }] },
            mode: 0o644,
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
    pub fn validate(&self) -> std::result::Result<(), EntryFault> {
        check_path(&self.path)?;
        if self.mode & !0o7777 != 0 {
            return Err(EntryFault::Mode { mode: self.mode });
        }
        if self.xattrs.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(EntryFault::XattrOrder);
        }
        if self.xattrs.iter().any(|x| x.name.is_empty() || x.name.contains(&0)) {
            return Err(EntryFault::XattrName);
        }
        match &self.kind {
            Kind::File { size, extents, .. } => {
                let mut sum = 0u64;
                for e in extents {
                    match *e {
                        Extent::Data { len, .. } if len == 0 || len as usize > CDC_MAX => {
                            return Err(EntryFault::ChunkLen { len });
                        }
                        Extent::Hole { len: 0 } => return Err(EntryFault::EmptyHole),
                        _ => {}
                    }
                    sum = sum.checked_add(e.len()).ok_or(EntryFault::ExtentOverflow)?;
                }
                if sum != *size {
                    return Err(EntryFault::Size { size: *size, sum });
                }
            }
            Kind::Symlink { target } if target.is_empty() || target.contains(&0) => {
                return Err(EntryFault::SymlinkTarget);
            }
            Kind::Hardlink { target } => {
                check_path(target).map_err(EntryFault::HardlinkTarget)?;
                if target.is_empty() || cmp_paths(target, &self.path) != Ordering::Less {
                    return Err(EntryFault::HardlinkOrder);
                }
            }
            _ => {}
        }
        if self.path.is_empty() && !self.is_dir() {
            return Err(EntryFault::RootNotDir);
        }
        Ok(())
    }
}

pub fn display_path(p: &[u8]) -> String {
    if p.is_empty() { "/".into() } else { format!("/{}", String::from_utf8_lossy(p)) }
}

fn check_path(p: &[u8]) -> std::result::Result<(), PathFault> {
    if p.is_empty() {
        return Ok(());
    }
    if p.contains(&0) {
        return Err(PathFault::Nul);
    }
    if p[0] == b'/' {
        return Err(PathFault::Absolute);
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Err(PathFault::EmptyComponent),
            b"." => return Err(PathFault::Dot),
            b".." => return Err(PathFault::DotDot),
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
        let body =
            bytes.strip_prefix(ROOT_MAGIC.as_slice()).ok_or_else(|| Error::manifest(id, ManifestFault::RootMagic))?;
        let root: Self = postcard::from_bytes(body).map_err(|e| Error::manifest(id, ManifestFault::RootDecode(e)))?;
        if root.format != FORMAT_VERSION {
            return Err(Error::manifest(id, ManifestFault::Format { found: root.format }));
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
pub(crate) fn decode_entry(buf: &[u8]) -> std::result::Result<Option<(Entry, usize)>, EntryFault> {
    let mut n: u64 = 0;
    let mut i = 0;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        if i >= 10 {
            return Err(EntryFault::LengthPrefix);
        }
        n |= ((b & 0x7f) as u64) << (7 * i);
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if n as usize > MAX_ENTRY_BYTES {
        return Err(EntryFault::TooLarge { len: n });
    }
    let end = i + n as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let e: Entry = postcard::from_bytes(&buf[i..end]).map_err(EntryFault::Decode)?;
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
    pub fn check(&mut self, e: &Entry) -> std::result::Result<(), EntryFault> {
        e.validate()?;
        match &self.last {
            None if !e.path.is_empty() => return Err(EntryFault::NoRoot),
            Some(last) => match cmp_paths(last, &e.path) {
                Ordering::Less => {}
                Ordering::Equal => return Err(EntryFault::Duplicate),
                Ordering::Greater => return Err(EntryFault::OutOfOrder),
            },
            None => {}
        }
        if let Some(p) = parent(&e.path) {
            while self.dirs.last().is_some_and(|d| d.as_slice() != p && !is_below(p, d)) {
                self.dirs.pop();
            }
            if self.dirs.last().map(Vec::as_slice) != Some(p) {
                return Err(EntryFault::Orphan);
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
    fn faults_say_what_the_strings_said() {
        let mut e = dir("a/../b");
        assert_eq!(e.validate().unwrap_err().to_string(), r#"path component "..""#);
        e.path = b"a/./b".to_vec();
        assert_eq!(e.validate().unwrap_err().to_string(), r#"path component ".""#);
        e.path = b"l".to_vec();
        e.kind = Kind::Hardlink { target: b"/x".to_vec() };
        assert_eq!(e.validate().unwrap_err().to_string(), "hardlink target: absolute path");
        let f = ManifestFault::Entry { index: 3, path: "/a".into(), fault: EntryFault::Duplicate };
        assert_eq!(f.to_string(), "entry 3: duplicate entry at /a");
        let f = ManifestFault::Count { seen: 2, expected: 5 };
        assert_eq!(f.to_string(), "entry 3: manifest holds 2 entries, its root says 5");
    }

    #[test]
    fn order_check_catches_bad_trees() {
        let mut c = OrderCheck::default();
        assert!(c.check(&dir("a")).is_err(), "no root");
        let mut c = OrderCheck::default();
        c.check(&dir("")).unwrap();
        c.check(&dir("a")).unwrap();
        assert!(c.check(&dir("a")).unwrap_err().to_string().contains("duplicate"));
        assert!(c.check(&dir("b/c")).unwrap_err().to_string().contains("parent"));
        let mut c = OrderCheck::default();
        c.check(&dir("")).unwrap();
        c.check(&dir("b")).unwrap();
        assert!(c.check(&dir("a")).unwrap_err().to_string().contains("order"));
    }

    #[test]
    fn size_must_match_extents() {
        let mut e = dir("f");
        e.kind = Kind::File {
            size: 10,
            chunking: Chunking::Cdc,
            extents: vec![Extent::Hole { len: 4 }, Extent::Data { id: ChunkId::of(b"x"), len: 5 }],
        };
        assert!(e.validate().unwrap_err().to_string().contains("disagrees"));
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
        assert!(decode_entry(&huge).unwrap_err().to_string().contains("exceeds"));
    }
}
