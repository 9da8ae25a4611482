//! The read-only lower tree: the union of a stack of store layers, held in
//! memory as an inode table for the life of a mount.
//!
//! Built once by streaming [`Merged`] (whiteouts and opaque directories are
//! already applied there), so it costs memory in proportion to the number of
//! entries (roughly 150 bytes plus the name and xattrs per entry, and 48
//! bytes per file extent), never to the size of the file data. Node `i`
//! is inode number `i + 1`; node 0 is the root, FUSE's inode 1. Names of a
//! directory are kept sorted, so a lookup is a binary search.

use std::sync::Arc;

use xenod_store::{Chunking, Entry, Extent, Kind, LayerId, Merged, Store, Timestamp, Xattr, file_name};

use crate::error::{Error, Result};

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

/// A lower file's contents: extents with their start offsets, for binary
/// search by offset.
#[derive(Debug)]
pub(crate) struct FileData {
    pub size: u64,
    pub chunking: Chunking,
    pub extents: Box<[Extent]>,
    /// `starts[i]` is the file offset of `extents[i]`.
    pub starts: Box<[u64]>,
}

impl FileData {
    fn new(size: u64, chunking: Chunking, extents: Vec<Extent>) -> Self {
        let mut starts = Vec::with_capacity(extents.len());
        let mut off = 0;
        for e in &extents {
            starts.push(off);
            off += e.len();
        }
        Self { size, chunking, extents: extents.into(), starts: starts.into() }
    }

    /// Index of the extent holding byte `off` (`off < size`).
    pub fn extent_at(&self, off: u64) -> usize {
        match self.starts.binary_search(&off) {
            Ok(i) => i,
            Err(i) => i - 1,
        }
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
    pub(crate) links: std::collections::HashMap<u32, Vec<u32>>,
    stack: Vec<LayerId>,
}

impl LowerTree {
    /// Streams the union of `stack` (bottom first) into memory. An empty
    /// stack gives an empty root.
    pub fn load(store: &Store, stack: &[LayerId]) -> Result<Self> {
        let mut t = LowerTree { nodes: Vec::new(), links: Default::default(), stack: stack.to_vec() };
        if stack.is_empty() {
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
            return Ok(t);
        }
        // The chain of open directories: (path, node).
        let mut open: Vec<(Vec<u8>, u32)> = Vec::new();
        for e in Merged::new(store, stack)? {
            let e = e?;
            t.push(e, &mut open)?;
        }
        if t.nodes.is_empty() {
            return Err(Error::BadLayer("the stack has no root directory".into()));
        }
        Ok(t)
    }

    fn push(&mut self, e: Entry, open: &mut Vec<(Vec<u8>, u32)>) -> Result<()> {
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
            Kind::File { size, chunking, extents } => LKind::File(Arc::new(FileData::new(size, chunking, extents))),
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
            Kind::Whiteout => return Ok(()),
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
        Ok(())
    }

    /// The stack this tree is the union of, bottom first.
    pub fn stack(&self) -> &[LayerId] {
        &self.stack
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
        let mut parts = Vec::new();
        while i != 0 {
            parts.push(&self.nodes[i as usize].name);
            i = self.nodes[i as usize].parent;
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        out
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
