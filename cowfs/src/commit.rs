//! Commit: the union of a stack and an upper directory becomes a new
//! overlay layer on the stack's top.
//!
//! The union is walked in tree order exactly as the mount shows it, and
//! [`xenod_store::diff`] against the stack keeps only what changed: a
//! whiteout becomes a `Whiteout` entry, a replaced directory becomes
//! whiteouts of what it hid, a moved directory (overlayfs redirect) becomes
//! its new subtree. Lower-only files keep their extents without reading a
//! byte; a partial file keeps the lower chunk of every clean block (when
//! the lower file is cut in fixed 64 KiB blocks) and chunks only its dirty
//! blocks; a whole upper file is chunked like an import (identical content
//! yields identical chunks, so nothing new is stored for it).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use xenod_store::{
    BLOCK, Chunking, Entry, Extent, IMAGE_MIN_SIZE, ImportOptions, Kind, LayerId, LayerWriter, Merged, Store,
    Timestamp, chunk_stream, diff, is_zero,
};

use crate::error::{Error, Result};
use crate::lower::{LKind, LowerTree};
use crate::partial::Partial;
use crate::track::DirtySet;
use crate::union::{FType, Union, join};
use crate::upper::{check_stack, claim};

/// What a commit wrote.
#[derive(Debug, Clone, Copy)]
pub struct CommitStats {
    pub id: LayerId,
    /// Entries in the new layer (changed ones and their parent directories).
    pub entries: u64,
}

/// Commits `upper` over `stack` (bottom first, non-empty) as a new layer
/// whose base is the stack's top. Refused while the upper is mounted
/// read-write (and no mount can take it meanwhile), and when it records
/// being made on another stack (see `upper`).
pub fn commit(
    store: Arc<Store>,
    stack: &[LayerId],
    upper: &Path,
    meta: BTreeMap<String, String>,
) -> Result<CommitStats> {
    let Some(&top) = stack.last() else {
        return Err(Error::BadUpper { path: upper.into(), why: "no base stack to commit onto".into() });
    };
    if !upper.is_dir() {
        return Err(Error::BadUpper { path: upper.into(), why: "not a directory".into() });
    }
    let _claim = claim(upper)?;
    check_stack(upper, stack)?;
    let _lock = store.write_lock()?;
    let lower = LowerTree::load(&store, stack)?;
    // The base as the union shows it: with the layers `.mount` files add, so
    // their content is not recorded again.
    let base = Merged::placed(&store, lower.placed(), Vec::new())?;
    let union = Union::new(store.clone(), lower, Some(upper), 64 << 20)?;
    let mut w = LayerWriter::new(&store);
    let mut entries = 0;
    for e in diff(base, union_entries(&union)) {
        w.push(&e?)?;
        entries += 1;
    }
    let id = w.finish(Some(top), meta)?;
    Ok(CommitStats { id, entries })
}

/// Chunk lists of upper files from one commit of a live upper to the
/// next ([`commit_live`]): a file nothing wrote to since is not read again,
/// and of a fixed-block file only the blocks written are.
#[derive(Debug, Default)]
pub struct CommitCache {
    files: HashMap<Vec<u8>, Cached>,
    /// Bytes read from upper files by the last commit.
    pub last_read: u64,
}

#[derive(Debug)]
struct Cached {
    size: u64,
    kind: Kind,
    /// One extent per 64 KiB block, for block-aligned fixed files.
    blocks: Option<Vec<Extent>>,
}

/// Commits an upper directory that a mount may still be writing (its
/// staging area is left alone). With `dirty` (what the mount's tracker
/// recorded since the commit that filled `cache`), upper files are read
/// only where they were written; without it, every upper file is read
/// and `cache` filled. A consistent result needs the writers paused for
/// the last call; earlier calls are a best effort whose misses the next
/// drain reports.
pub fn commit_live(
    store: Arc<Store>,
    stack: &[LayerId],
    upper: &Path,
    meta: BTreeMap<String, String>,
    cache: &mut CommitCache,
    dirty: Option<&DirtySet>,
) -> Result<CommitStats> {
    let Some(&top) = stack.last() else {
        return Err(Error::BadUpper { path: upper.into(), why: "no base stack to commit onto".into() });
    };
    let _lock = store.write_lock()?;
    let lower = LowerTree::load(&store, stack)?;
    let union = Union::inspect(store.clone(), lower, upper, 64 << 20)?;
    let base = Merged::new(&store, stack)?;
    let mut w = LayerWriter::new(&store);
    let mut entries = 0;
    cache.last_read = 0;
    let walk = Walk {
        union: &union,
        stack: Vec::new(),
        started: false,
        links: HashMap::new(),
        failed: false,
        inc: Some((cache, dirty)),
    };
    for e in diff(base, walk) {
        w.push(&e?)?;
        entries += 1;
    }
    let id = w.finish(Some(top), meta)?;
    Ok(CommitStats { id, entries })
}

/// The whole union as entries in tree order (file contents chunked into
/// the union's store where they are not lower extents already).
pub fn union_entries(union: &Union) -> impl Iterator<Item = xenod_store::Result<Entry>> + '_ {
    Walk { union, stack: Vec::new(), started: false, links: HashMap::new(), failed: false, inc: None }
}

type Child = (Vec<u8>, u64, FType);

struct Walk<'u> {
    union: &'u Union,
    /// (directory path, its children still to visit, reversed)
    stack: Vec<(Vec<u8>, Vec<Child>)>,
    started: bool,
    links: HashMap<u64, Vec<u8>>,
    failed: bool,
    inc: Option<(&'u mut CommitCache, Option<&'u DirtySet>)>,
}

fn fail(path: &[u8], e: impl std::fmt::Display) -> xenod_store::Error {
    xenod_store::Error::BadInput { at: xenod_store::display_path(path), why: e.to_string() }
}

impl Walk<'_> {
    fn visit(&mut self, path: Vec<u8>, ino: u64) -> xenod_store::Result<Entry> {
        let u = self.union;
        let a = u.getattr(ino).map_err(|e| fail(&path, e))?;
        let mtime = {
            let d = a.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
            Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
        };
        let mut xattrs = Vec::new();
        let names = u.listxattr(ino).map_err(|e| fail(&path, e))?;
        for n in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let value = u.getxattr(ino, n).map_err(|e| fail(&path, e))?;
            xattrs.push(xenod_store::Xattr { name: n.to_vec(), value });
        }
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        let upper = u.upper_path_of(ino).map_err(|e| fail(&path, e))?;
        let (lower, partial) = u.lower_of(ino).map_err(|e| fail(&path, e))?;
        let lower_node = |l: u32| u.lower.node(u.lower.data_node(l));
        let kind = match a.kind {
            FType::Dir => {
                let mut children = u.readdir(ino).map_err(|e| fail(&path, e))?;
                children.sort_by(|x, y| y.0.cmp(&x.0));
                self.stack.push((path.clone(), children));
                Kind::Dir { opaque: false }
            }
            FType::File => {
                if a.nlink > 1 {
                    if let Some(first) = self.links.get(&ino) {
                        let target = first.clone();
                        // The first name carries the data and metadata (as import writes it).
                        return Ok(Entry::hardlink(path, target));
                    }
                    self.links.insert(ino, path.clone());
                }
                match (&upper, &partial, lower) {
                    (Some(up), p, _) if self.inc.is_some() => self.upper_file(&path, up, p.as_deref(), a.size)?,
                    (_, Some(p), _) => partial_file(u, p, &path)?,
                    (Some(up), None, _) => whole_file(u.store(), up, &path, a.size)?,
                    (None, _, Some(l)) => match &lower_node(l).kind {
                        LKind::File(f) => {
                            Kind::File { size: f.size, chunking: f.chunking, extents: f.extents.to_vec() }
                        }
                        _ => return Err(fail(&path, "lower file without data")),
                    },
                    (None, _, None) => return Err(fail(&path, "neither upper nor lower")),
                }
            }
            FType::Symlink => Kind::Symlink { target: u.readlink(ino).map_err(|e| fail(&path, e))? },
            FType::CharDev | FType::BlockDev => {
                let rdev = match (&upper, lower) {
                    (Some(p), _) => rustix::fs::lstat(p).map_err(|e| fail(&path, e))?.st_rdev,
                    (None, Some(l)) => match lower_node(l).kind {
                        LKind::CharDev(r) | LKind::BlockDev(r) => r,
                        _ => 0,
                    },
                    _ => 0,
                };
                if a.kind == FType::CharDev { Kind::CharDev { rdev } } else { Kind::BlockDev { rdev } }
            }
            FType::Fifo => Kind::Fifo,
            FType::Socket => Kind::Socket,
        };
        let mode = if a.kind == FType::Symlink { lower.map_or(0o777, |l| lower_node(l).mode) } else { a.perm as u32 };
        let mode = if a.kind == FType::Symlink && upper.is_some() { 0o777 } else { mode };
        Ok(Entry { path, kind, mode, uid: a.uid, gid: a.gid, mtime, xattrs })
    }
}

impl Walk<'_> {
    /// An upper (or partial) file's content, from the cache where the
    /// tracker says nothing changed, re-reading only written blocks.
    fn upper_file(
        &mut self,
        path: &[u8],
        up: &Path,
        partial: Option<&Partial>,
        size: u64,
    ) -> xenod_store::Result<Kind> {
        let u = self.union;
        let Some((cache, dirty)) = self.inc.as_mut() else { unreachable!("upper_file without a cache") };
        if let (Some(d), Some(c)) = (dirty, cache.files.get_mut(path))
            && c.size == size
            && !d.whole_changed(path)
        {
            match (d.blocks.get(path), &mut c.blocks) {
                (None, _) => return Ok(c.kind.clone()),
                (Some(written), Some(blocks)) => {
                    let b = BLOCK as u64;
                    let mut buf = vec![0u8; BLOCK];
                    let f = match partial {
                        Some(_) => None,
                        None => Some(std::fs::File::open(up).map_err(|e| fail(path, e))?),
                    };
                    for &i in written.iter().filter(|&&i| i * b < size) {
                        let (pos, end) = (i * b, ((i + 1) * b).min(size));
                        let chunk = &mut buf[..(end - pos) as usize];
                        match (partial, &f) {
                            (Some(p), _) => {
                                let n = u.read_partial(p, pos, chunk).map_err(|e| fail(path, e))?;
                                if n != chunk.len() {
                                    return Err(fail(path, "file shrank while committing"));
                                }
                            }
                            (None, Some(f)) => f.read_exact_at(chunk, pos).map_err(|e| fail(path, e))?,
                            (None, None) => unreachable!(),
                        }
                        cache.last_read += chunk.len() as u64;
                        blocks[i as usize] = if is_zero(chunk) {
                            Extent::Hole { len: chunk.len() as u64 }
                        } else {
                            Extent::Data { id: u.store().put(chunk)?.0, len: chunk.len() as u32 }
                        };
                    }
                    let mut extents = Vec::new();
                    for e in blocks.iter() {
                        push_extent(&mut extents, *e);
                    }
                    c.kind = Kind::File { size, chunking: Chunking::Fixed, extents };
                    return Ok(c.kind.clone());
                }
                (Some(_), None) => {}
            }
        }
        let kind = match partial {
            Some(p) => {
                let dirty_blocks = p.map.lock().unwrap_or_else(|e| e.into_inner()).dirty_count();
                cache.last_read += dirty_blocks * BLOCK as u64;
                partial_file(u, p, path)?
            }
            None => {
                cache.last_read += size;
                whole_file(u.store(), up, path, size)?
            }
        };
        let blocks = match &kind {
            Kind::File { chunking: Chunking::Fixed, extents, .. } => per_block(extents, size),
            _ => None,
        };
        cache.files.insert(path.to_vec(), Cached { size, kind: kind.clone(), blocks });
        Ok(kind)
    }
}

/// Fixed-block extents as one extent per 64 KiB block; `None` if they are
/// not block-aligned.
fn per_block(extents: &[Extent], size: u64) -> Option<Vec<Extent>> {
    let b = BLOCK as u64;
    let mut out = Vec::with_capacity(size.div_ceil(b) as usize);
    let mut pos = 0u64;
    for e in extents {
        match *e {
            Extent::Data { id, len } => {
                if !pos.is_multiple_of(b) || (len as u64 != b && pos + len as u64 != size) {
                    return None;
                }
                out.push(Extent::Data { id, len });
                pos += len as u64;
            }
            Extent::Hole { len } => {
                let end = pos + len;
                while pos < end {
                    let next = ((pos / b + 1) * b).min(end);
                    if !pos.is_multiple_of(b) || (next - pos != b && next != size) {
                        return None;
                    }
                    out.push(Extent::Hole { len: next - pos });
                    pos = next;
                }
            }
        }
    }
    (pos == size).then_some(out)
}

impl Iterator for Walk<'_> {
    type Item = xenod_store::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = if !self.started {
            self.started = true;
            self.visit(Vec::new(), 1)
        } else {
            loop {
                let (dir, children) = self.stack.last_mut()?;
                match children.pop() {
                    Some((name, ino, _)) => {
                        let p = join(dir, &name);
                        break self.visit(p, ino);
                    }
                    None => {
                        self.stack.pop();
                    }
                }
            }
        };
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let (Some(Extent::Hole { len: prev }), Extent::Hole { len }) = (out.last_mut(), e) {
        *prev += len;
    } else {
        out.push(e);
    }
}

fn whole_file(store: &Store, p: &Path, path: &[u8], size: u64) -> xenod_store::Result<Kind> {
    let name = xenod_store::file_name(path);
    let image = [&b".img"[..], b".raw", b".qcow2"].iter().any(|s| name.ends_with(s));
    let chunking = if image || size >= IMAGE_MIN_SIZE { Chunking::Fixed } else { Chunking::Cdc };
    let f = std::fs::File::open(p).map_err(|e| fail(path, e))?;
    let at = || p.display().to_string();
    let (extents, total) = chunk_stream(store, f, chunking, size, &ImportOptions::default(), &at)?;
    Ok(Kind::File { size: total, chunking, extents })
}

/// Reads a partial file's union contents in order.
struct PartialReader<'a> {
    union: &'a Union,
    p: &'a Partial,
    pos: u64,
}

impl Read for PartialReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.union.read_partial(self.p, self.pos, buf).map_err(std::io::Error::from)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn partial_file(u: &Union, p: &Partial, path: &[u8]) -> xenod_store::Result<Kind> {
    let size = p.file.metadata().map_err(|e| fail(path, e))?.len();
    let lower = &p.lower;
    if lower.chunking != Chunking::Fixed || !lower.block_aligned() {
        let at = || xenod_store::display_path(path);
        let r = PartialReader { union: u, p, pos: 0 };
        let (extents, total) = chunk_stream(u.store(), r, lower.chunking, size, &ImportOptions::default(), &at)?;
        return Ok(Kind::File { size: total, chunking: lower.chunking, extents });
    }
    let map = p.map.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let b = BLOCK as u64;
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    while pos < size {
        let end = (pos + b).min(size);
        let clean = !map.is_dirty(pos / b) && end <= map.lower_limit && end <= lower.size;
        let reuse = clean
            .then(|| {
                let i = lower.extent_at(pos);
                match lower.extents[i] {
                    Extent::Data { id, len } if lower.starts[i] == pos && len as u64 == end - pos => {
                        Some(Extent::Data { id, len })
                    }
                    Extent::Hole { .. } => Some(Extent::Hole { len: end - pos }),
                    _ => None,
                }
            })
            .flatten();
        let e = match reuse {
            Some(e) => e,
            None => {
                let chunk = &mut buf[..(end - pos) as usize];
                let n = u.read_partial(p, pos, chunk).map_err(|e| fail(path, e))?;
                if n != chunk.len() {
                    return Err(fail(path, "partial file shrank while committing"));
                }
                if is_zero(chunk) {
                    Extent::Hole { len: n as u64 }
                } else {
                    let (id, _) = u.store().put(chunk)?;
                    Extent::Data { id, len: n as u32 }
                }
            }
        };
        push_extent(&mut out, e);
        pos = end;
    }
    Ok(Kind::File { size, chunking: Chunking::Fixed, extents: out })
}
