//! The read-only lower tree: the union of a stack of store layers (plus
//! layers that `.mount` files add, plus read-only host directories), held in
//! memory as an inode table for the life of a mount.
//!
//! Per-subtree stacking: a regular file named `.mount` in a directory of any
//! layer lists layer references (ids or names the store resolves, one per
//! line, the highest priority first; blank lines and `#` comments are
//! skipped). Each reference's whole stack is overlaid on that directory,
//! just above the layer holding the `.mount` file, so layers higher in the
//! stack still override (and may whiteout) what the mounted layers show:
//!
//! ```text
//!   upper                       (writable)
//!   host dirs  --lower-dir      (first given = highest)
//!   O  overlay                  layers above the .mount's layer win
//!   A  mounted at /srv/app      <- lines of T's /srv/app/.mount,
//!   B  mounted at /srv/app         first line on top
//!   T  template with /srv/app/.mount
//! ```
//!
//! Only `.mount` files the union shows count (a whited-out one does not);
//! mounted layers may hold `.mount` files of their own, followed up to
//! [`MOUNT_ROUNDS`] deep. `.mount` files in host directories are shown but
//! not followed. An unresolvable reference fails the mount, naming the file
//! and the reference.
//!
//! Host directories are walked once at mount time; their files are read in
//! place. Like overlayfs's lower directories, they must not change while
//! mounted (the kernel may cache their entries for long).
//!
//! Built once by streaming [`Merged`] (whiteouts and opaque directories are
//! already applied there), so it costs memory in proportion to the number of
//! entries (roughly 150 bytes plus the name and xattrs per entry, and 48
//! bytes per file extent), never to the size of the file data. Node `i`
//! is inode number `i + 1`; node 0 is the root, FUSE's inode 1. Names of a
//! directory are kept sorted, so a lookup is a binary search.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xenod_store::{
    ChunkId, Chunking, Entry, Extent, Kind, LayerId, MOUNT_FILE_MAX, Merged, Source, Store, Timestamp, Xattr, file_name,
};

use crate::error::{Error, Result};
use crate::overlay::{OPAQUE, getxattr_path, list_xattrs, private_xattr};

/// The file whose lines name layers to overlay on its directory; its
/// format is the store's (`xenod_store::mount_refs`), so gc keeps what it names.
pub use xenod_store::MOUNT_FILE;
/// How deep mounted layers holding `.mount` files of their own are followed.
pub const MOUNT_ROUNDS: usize = 8;

/// What a lower node is.
#[derive(Clone, Debug)]
pub(crate) enum LKind {
    Dir {
        children: Vec<u32>,
    },
    File(Arc<FileData>),
    Symlink(Box<[u8]>),
    /// Another name of the file at node `.0`.
    Hardlink(u32),
    CharDev(u64),
    BlockDev(u64),
    Fifo,
    Socket,
}

/// A failed lower read: the chunk that could not be had (none for a file
/// of a host directory) and why.
pub(crate) type ReadError = (Option<ChunkId>, xenod_store::Error);

/// A lower file's contents: extents with their start offsets, for binary
/// search by offset.
#[derive(Debug)]
pub(crate) struct FileData {
    pub size: u64,
    pub chunking: Chunking,
    pub extents: Box<[Extent]>,
    /// `starts[i]` is the file offset of `extents[i]`.
    pub starts: Box<[u64]>,
    /// A file of a host directory: its data is read there, `extents` is empty.
    pub host: Option<Box<Path>>,
}

impl FileData {
    fn new(size: u64, chunking: Chunking, extents: Vec<Extent>, host: Option<Box<Path>>) -> Self {
        let mut starts = Vec::with_capacity(extents.len());
        let mut off = 0;
        for e in &extents {
            starts.push(off);
            off += e.len();
        }
        Self { size, chunking, extents: extents.into(), starts: starts.into(), host }
    }

    /// Index of the extent holding byte `off` (`off < size`).
    pub fn extent_at(&self, off: u64) -> usize {
        match self.starts.binary_search(&off) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        }
    }

    /// Reads `buf.len()` bytes at `off` (clipped to the file's size), the
    /// chunks from `chunk`; returns how many were read. A chunk that cannot
    /// be had fails the read with its id.
    pub fn read(
        &self,
        off: u64,
        buf: &mut [u8],
        mut chunk: impl FnMut(&ChunkId) -> xenod_store::Result<Arc<Vec<u8>>>,
    ) -> Result<usize, ReadError> {
        if off >= self.size {
            return Ok(0);
        }
        let end = (off + buf.len() as u64).min(self.size);
        if let Some(h) = &self.host {
            let io = |source| (None, xenod_store::Error::Io { what: "reading", path: h.to_path_buf(), source });
            let file = std::fs::File::open(h).map_err(io)?;
            let want = &mut buf[..(end - off) as usize];
            // A host file that shrank since the mount reads as zeros past its end.
            let mut done = 0;
            while done < want.len() {
                match file.read_at(&mut want[done..], off + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            want[done..].fill(0);
            return Ok(want.len());
        }
        let mut pos = off;
        let mut i = self.extent_at(off);
        while pos < end {
            let start = self.starts[i];
            let e = self.extents[i];
            let in_ext = (pos - start) as usize;
            let n = ((start + e.len()).min(end) - pos) as usize;
            let out = &mut buf[(pos - off) as usize..(pos - off) as usize + n];
            match e {
                Extent::Hole { .. } => out.fill(0),
                Extent::Data { id, len } => {
                    let data = chunk(&id).map_err(|err| (Some(id), err))?;
                    if data.len() != len as usize {
                        return Err((
                            Some(id),
                            xenod_store::Error::ChunkCorrupt {
                                id,
                                why: format!("{} bytes, manifest says {len}", data.len()),
                            },
                        ));
                    }
                    out.copy_from_slice(&data[in_ext..in_ext + n]);
                }
            }
            pos += n as u64;
            i += 1;
        }
        Ok((end - off) as usize)
    }

    /// Whether every data extent is one aligned block, so a block of the
    /// file maps to exactly one chunk (or a hole).
    pub fn block_aligned(&self) -> bool {
        let b = xenod_store::BLOCK as u64;
        self.extents.iter().zip(self.starts.iter()).all(|(e, &s)| match e {
            Extent::Data { len, .. } => s % b == 0 && (*len as u64 == b || s + *len as u64 == self.size),
            Extent::Hole { len } => s % b == 0 && (len % b == 0 || s + len == self.size),
        })
    }
}

#[derive(Debug)]
pub(crate) struct LNode {
    pub name: Box<[u8]>,
    pub parent: u32,
    pub kind: LKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub xattrs: Box<[Xattr]>,
    /// For files: how many names the file has in the lower tree.
    pub nlink: u32,
}

/// The lower tree of one mount.
#[derive(Debug)]
pub struct LowerTree {
    pub(crate) nodes: Vec<LNode>,
    /// For files with several names: node -> its other (hardlink) nodes.
    pub(crate) links: HashMap<u32, Vec<u32>>,
    stack: Vec<LayerId>,
    /// Every store layer with the directory it is placed at, bottom first:
    /// the stack plus what `.mount` files add.
    placed: Vec<(LayerId, Vec<u8>)>,
}

impl LowerTree {
    /// Streams the union of `stack` (bottom first) into memory, with the
    /// layers its `.mount` files name. An empty stack gives an empty root.
    pub fn load(store: &Store, stack: &[LayerId]) -> Result<Self> {
        Self::load_with(store, stack, &[])
    }

    /// As [`load`](Self::load), with read-only host directories over the
    /// stack, `host_dirs[0]` the highest.
    pub fn load_with(store: &Store, stack: &[LayerId], host_dirs: &[PathBuf]) -> Result<Self> {
        for d in host_dirs {
            let md = std::fs::metadata(d).map_err(Error::io("reading lower directory", d))?;
            if !md.is_dir() {
                return Err(Error::BadLower { path: d.clone(), why: "not a directory".into() });
            }
        }
        // Bottom first, as sources are stacked.
        let hosts: Vec<PathBuf> = host_dirs.iter().rev().cloned().collect();
        let mut placed: Vec<(LayerId, Vec<u8>)> = stack.iter().map(|id| (*id, Vec::new())).collect();
        let mut followed: HashSet<Vec<u8>> = HashSet::new();
        for round in 0..=MOUNT_ROUNDS {
            let (mut t, mounts) = Self::build(store, &placed, &hosts)?;
            let mut new: Vec<(Vec<u8>, u32, usize)> = mounts
                .into_iter()
                .map(|(node, src)| (t.path(node), node, src))
                .filter(|(p, _, _)| !followed.contains(p))
                .collect();
            if new.is_empty() {
                t.stack = stack.to_vec();
                t.placed = placed;
                return Ok(t);
            }
            if round == MOUNT_ROUNDS {
                return Err(Error::BadMount {
                    file: format!("/{}", xenod_store::display_path(&new[0].0)),
                    why: format!("mounted layers hold .mount files more than {MOUNT_ROUNDS} deep (a cycle?)"),
                });
            }
            // From the highest source down, so lower insertion points stay valid.
            new.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| b.0.cmp(&a.0)));
            for (path, node, src) in new {
                followed.insert(path.clone());
                let file = format!("/{}", xenod_store::display_path(&path));
                if src >= placed.len() {
                    tracing::warn!(file, "a .mount file in a host directory is not followed");
                    continue;
                }
                let dir = xenod_store::parent(&path).unwrap_or_default().to_vec();
                let mut add = Vec::new();
                // The last line is the lowest priority, so it goes in first.
                for reference in t.mount_refs(store, node, &file)?.into_iter().rev() {
                    let unknown = |source| Error::MountRef { file: file.clone(), reference: reference.clone(), source };
                    let top = store.resolve(&reference).map_err(unknown)?;
                    let s = store.stack(&top).map_err(|source| Error::MountRef {
                        file: file.clone(),
                        reference: reference.clone(),
                        source,
                    })?;
                    add.extend(s.into_iter().map(|l| (l, dir.clone())));
                }
                placed.splice(src + 1..src + 1, add);
            }
        }
        unreachable!("the last round returns")
    }

    /// The layer references a `.mount` file lists.
    fn mount_refs(&self, store: &Store, node: u32, file: &str) -> Result<Vec<String>> {
        let bad = |why: String| Error::BadMount { file: file.to_string(), why };
        let f = self.file(node).ok_or_else(|| bad("not a regular file".into()))?;
        if f.size > MOUNT_FILE_MAX {
            return Err(bad(format!("{} bytes, more than the {MOUNT_FILE_MAX} a .mount file may have", f.size)));
        }
        let mut text = vec![0u8; f.size as usize];
        match &f.host {
            Some(h) => {
                let file = std::fs::File::open(h).map_err(Error::io("reading", &**h))?;
                file.read_exact_at(&mut text, 0).map_err(Error::io("reading", &**h))?;
            }
            None => {
                f.read(0, &mut text, |id| store.get(id).map(Arc::new)).map_err(|(_, e)| e)?;
            }
        }
        let text = String::from_utf8(text).map_err(|_| bad("not UTF-8 text".into()))?;
        Ok(xenod_store::mount_refs(&text))
    }

    /// The tree of `placed` layers under `hosts` (bottom first), and every
    /// `.mount` file it shows with the index of the source it comes from.
    fn build(store: &Store, placed: &[(LayerId, Vec<u8>)], hosts: &[PathBuf]) -> Result<(Self, Vec<(u32, usize)>)> {
        let mut t = LowerTree { nodes: Vec::new(), links: Default::default(), stack: Vec::new(), placed: Vec::new() };
        let mut mounts = Vec::new();
        if placed.is_empty() && hosts.is_empty() {
            t.nodes.push(LNode {
                name: Box::default(),
                parent: 0,
                kind: LKind::Dir { children: vec![] },
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: Timestamp::default(),
                xattrs: Box::default(),
                nlink: 1,
            });
            return Ok((t, mounts));
        }
        // The chain of open directories: (path, node).
        let mut open: Vec<(Vec<u8>, u32)> = Vec::new();
        let above: Vec<Source<'_>> = hosts.iter().map(|h| Box::new(HostDir::new(h)) as Source<'_>).collect();
        let mut merged = Merged::placed(store, placed, above)?;
        while let Some(e) = merged.next() {
            let e = e?;
            let src = merged.last_source();
            let host = src.checked_sub(placed.len()).map(|h| hosts[h].as_path());
            let mount = file_name(&e.path) == MOUNT_FILE.as_bytes() && matches!(e.kind, Kind::File { .. });
            if t.push(e, &mut open, host)? && mount {
                mounts.push((t.nodes.len() as u32 - 1, src));
            }
        }
        if t.nodes.is_empty() {
            return Err(Error::BadLayer("the stack has no root directory".into()));
        }
        Ok((t, mounts))
    }

    /// Adds an entry; whether it became a node. `host`: the host directory
    /// it comes from.
    fn push(&mut self, e: Entry, open: &mut Vec<(Vec<u8>, u32)>, host: Option<&Path>) -> Result<bool> {
        let idx = self.nodes.len() as u32;
        let parent = if e.path.is_empty() {
            0
        } else {
            while open.last().is_some_and(|(p, _)| !xenod_store::is_below(&e.path, p)) {
                open.pop();
            }
            match open.last() {
                Some((_, n)) => *n,
                None => return Err(Error::BadLayer(format!("{} has no parent", e.display_path()))),
            }
        };
        let shown = e.display_path();
        let kind = match e.kind {
            Kind::Dir { .. } => LKind::Dir { children: Vec::new() },
            Kind::File { size, chunking, extents } => {
                let host = host.map(|h| h.join(std::ffi::OsStr::from_bytes(&e.path)).into_boxed_path());
                LKind::File(Arc::new(FileData::new(size, chunking, extents, host)))
            }
            Kind::Symlink { target } => LKind::Symlink(target.into()),
            Kind::Hardlink { target } => {
                let t = self
                    .find(&target)
                    .filter(|&t| matches!(self.nodes[t as usize].kind, LKind::File(_)))
                    .ok_or_else(|| Error::BadLayer(format!("{shown}: hardlink target missing")))?;
                self.nodes[t as usize].nlink += 1;
                self.links.entry(t).or_default().push(idx);
                LKind::Hardlink(t)
            }
            Kind::CharDev { rdev } => LKind::CharDev(rdev),
            Kind::BlockDev { rdev } => LKind::BlockDev(rdev),
            Kind::Fifo => LKind::Fifo,
            Kind::Socket => LKind::Socket,
            Kind::Whiteout => return Ok(false),
        };
        let is_dir = matches!(kind, LKind::Dir { .. });
        self.nodes.push(LNode {
            name: file_name(&e.path).into(),
            parent,
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e.xattrs.into(),
            nlink: 1,
        });
        if idx != 0
            && let LKind::Dir { children } = &mut self.nodes[parent as usize].kind
        {
            children.push(idx);
        }
        if is_dir {
            open.push((e.path, idx));
        }
        Ok(true)
    }

    /// The stack this tree is the union of, bottom first.
    pub fn stack(&self) -> &[LayerId] {
        &self.stack
    }

    /// Every store layer shown, with the directory it is placed at, bottom
    /// first: the stack with the layers `.mount` files add.
    pub fn placed(&self) -> &[(LayerId, Vec<u8>)] {
        &self.placed
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub(crate) fn node(&self, i: u32) -> &LNode {
        &self.nodes[i as usize]
    }

    /// The node carrying the data and metadata of `i` (itself, or the first
    /// name of its hardlink set).
    pub(crate) fn data_node(&self, i: u32) -> u32 {
        match self.nodes[i as usize].kind {
            LKind::Hardlink(t) => t,
            _ => i,
        }
    }

    /// Child `name` of directory node `dir`.
    pub(crate) fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let LKind::Dir { children } = &self.nodes[dir as usize].kind else { return None };
        children.binary_search_by(|&c| self.nodes[c as usize].name.as_ref().cmp(name)).ok().map(|i| children[i])
    }

    pub(crate) fn children(&self, dir: u32) -> &[u32] {
        match &self.nodes[dir as usize].kind {
            LKind::Dir { children } => children,
            _ => &[],
        }
    }

    /// The node at `path` (relative, `/`-separated), if any.
    pub(crate) fn find(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        if path.is_empty() {
            return Some(0);
        }
        for c in path.split(|&b| b == b'/') {
            cur = self.child(cur, c)?;
        }
        Some(cur)
    }

    /// The path of node `i`.
    pub(crate) fn path(&self, mut i: u32) -> Vec<u8> {
        let mut parts: Vec<&[u8]> = Vec::new();
        while i != 0 {
            parts.push(&self.nodes[i as usize].name);
            i = self.nodes[i as usize].parent;
        }
        join_leaf_first(&parts)
    }

    /// The node after `i` in a depth-first walk of the tree in name order
    /// (the order import packs files in, and tar or cp -r read them in);
    /// None after the last.
    pub(crate) fn walk_next(&self, i: u32) -> Option<u32> {
        if let Some(&c) = self.children(i).first() {
            return Some(c);
        }
        let mut i = i;
        while i != 0 {
            let n = &self.nodes[i as usize];
            let siblings = self.children(n.parent);
            let at = siblings.binary_search_by(|&c| self.nodes[c as usize].name.cmp(&n.name)).ok()?;
            if let Some(&next) = siblings.get(at + 1) {
                return Some(next);
            }
            i = n.parent;
        }
        None
    }

    pub(crate) fn is_dir(&self, i: u32) -> bool {
        matches!(self.nodes[i as usize].kind, LKind::Dir { .. })
    }

    pub(crate) fn file(&self, i: u32) -> Option<&Arc<FileData>> {
        match &self.nodes[self.data_node(i) as usize].kind {
            LKind::File(f) => Some(f),
            _ => None,
        }
    }

    /// All lower names of the file at `i` (data node first).
    pub(crate) fn link_set(&self, i: u32) -> Vec<u32> {
        let d = self.data_node(i);
        let mut v = vec![d];
        if let Some(others) = self.links.get(&d) {
            v.extend_from_slice(others);
        }
        v
    }
}

/// A host directory walked in tree order as a layer: overlayfs whiteouts
/// (0/0 character devices) and opaque directories are honoured, files are
/// described (not read), names of one file become hardlinks.
struct HostDir {
    root: PathBuf,
    started: bool,
    /// Open directories: (relative path, names not yet visited, sorted).
    open: Vec<(Vec<u8>, std::vec::IntoIter<OsString>)>,
    links: HashMap<(u64, u64), Vec<u8>>,
    failed: bool,
}

impl HostDir {
    fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), started: false, open: Vec::new(), links: HashMap::new(), failed: false }
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> xenod_store::Error {
        let path = path.to_path_buf();
        move |source| xenod_store::Error::Io { what, path, source }
    }

    fn names(path: &Path) -> xenod_store::Result<std::vec::IntoIter<OsString>> {
        let mut names = std::fs::read_dir(path)
            .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<Vec<_>>>())
            .map_err(Self::io("listing", path))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names.into_iter())
    }

    fn entry(&mut self, rel: Vec<u8>) -> xenod_store::Result<Entry> {
        let path = if rel.is_empty() { self.root.clone() } else { self.root.join(std::ffi::OsStr::from_bytes(&rel)) };
        let md = std::fs::symlink_metadata(&path).map_err(Self::io("reading", &path))?;
        let ft = md.file_type();
        let xattrs: Vec<Xattr> = list_xattrs(&path)
            .map_err(|e| Self::io("reading xattrs of", &path)(e.into()))?
            .into_iter()
            .filter(|x| !private_xattr(&x.name))
            .collect();
        let mut kind = if ft.is_dir() {
            let opaque = getxattr_path(&path, OPAQUE).ok().flatten().is_some_and(|v| v == b"y");
            self.open.push((rel.clone(), Self::names(&path)?));
            Kind::Dir { opaque }
        } else {
            match xenod_store::special_kind(&path, &md)? {
                // overlayfs's whiteout: a character device 0/0.
                Some(Kind::CharDev { rdev: 0 }) => Kind::Whiteout,
                Some(kind) => kind,
                None => Kind::File { size: md.len(), chunking: Chunking::Cdc, extents: Vec::new() },
            }
        };
        if ft.is_file() && md.nlink() > 1 {
            match self.links.get(&(md.dev(), md.ino())) {
                Some(target) => kind = Kind::Hardlink { target: target.clone() },
                None => {
                    self.links.insert((md.dev(), md.ino()), rel.clone());
                }
            }
        }
        let mtime = Timestamp { secs: md.mtime(), nanos: md.mtime_nsec() as u32 };
        Ok(Entry { path: rel, kind, mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid(), mtime, xattrs })
    }

    fn step(&mut self) -> xenod_store::Result<Option<Entry>> {
        if !self.started {
            self.started = true;
            return self.entry(Vec::new()).map(Some);
        }
        loop {
            let Some((dir, names)) = self.open.last_mut() else { return Ok(None) };
            let Some(name) = names.next() else {
                self.open.pop();
                continue;
            };
            let mut rel = dir.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            return self.entry(rel).map(Some);
        }
    }
}

impl Iterator for HostDir {
    type Item = xenod_store::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.step().transpose();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

/// A path from its names listed leaf first: `[c, b, a]` is `a/b/c`.
pub(crate) fn join_leaf_first(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts.iter().rev() {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(p);
    }
    out
}
