//! Stacks of layers: the union a guest sees, and the difference an overlay
//! records. Both stream in tree order with memory bounded by tree depth.
//!
//! Semantics follow overlayfs: the topmost layer holding a path wins; a
//! whiteout deletes the path and its subtree below it; an opaque directory
//! hides everything below it in lower layers; a non-directory hides a
//! lower directory's children.

use std::cmp::Ordering;
use std::iter::Peekable;

use crate::error::Result;
use crate::id::LayerId;
use crate::layer::LayerReader;
use crate::manifest::{Entry, Kind, cmp_paths, is_below, parent};
use crate::store::Store;

/// The union of a stack, as one stream without whiteouts.
pub struct Merged<'s> {
    /// Bottom first.
    layers: Vec<Peekable<Source<'s>>>,
    /// The index in `layers` of the last entry returned.
    last: usize,
    /// (directory, lowest layer index visible below it), nested.
    floors: Vec<(Vec<u8>, usize)>,
    failed: bool,
}

impl<'s> Merged<'s> {
    /// The union of `stack` (bottom first).
    pub fn new(store: &'s Store, stack: &[LayerId]) -> Result<Self> {
        let layers = stack
            .iter()
            .map(|id| Ok(Box::new(Placed { reader: store.read_layer(id)?, at: Vec::new() }) as Source<'s>))
            .collect::<Result<_>>()?;
        Ok(Self::of_sources(layers))
    }

    /// The union of layers each placed at a directory of the tree (bottom
    /// first): layer `(id, at)` shows its root at path `at` (`b""`: the
    /// root) and its entries below it, hardlink targets included. A placed
    /// layer overlays what the layers under it have at and below `at`,
    /// exactly as a whole layer overlays the root.
    /// `above`: further layer-like sources over the placed layers (bottom
    /// first), e.g. host directories.
    pub fn placed(store: &'s Store, stack: &[(LayerId, Vec<u8>)], above: Vec<Source<'s>>) -> Result<Self> {
        let mut layers = stack
            .iter()
            .map(|(id, at)| Ok(Box::new(Placed { reader: store.read_layer(id)?, at: at.clone() }) as Source<'s>))
            .collect::<Result<Vec<_>>>()?;
        layers.extend(above);
        Ok(Self::of_sources(layers))
    }

    /// The union of any layer-like streams (bottom first), each a complete
    /// tree in tree order with overlayfs whiteouts and opaque directories,
    /// such as a host directory walked on the fly.
    pub fn of_sources(layers: Vec<Source<'s>>) -> Self {
        Self {
            layers: layers.into_iter().map(Iterator::peekable).collect(),
            last: 0,
            floors: Vec::new(),
            failed: false,
        }
    }

    /// The index (bottom first) of the layer the last returned entry came from.
    pub fn last_source(&self) -> usize {
        self.last
    }

    /// The union of the stack that `top` stands on.
    pub fn of(store: &'s Store, top: &LayerId) -> Result<Self> {
        Self::new(store, &store.stack(top)?)
    }

    fn step(&mut self) -> Result<Option<Entry>> {
        loop {
            // The smallest path at the head of any layer.
            let mut min: Option<Vec<u8>> = None;
            for l in &mut self.layers {
                match l.peek() {
                    Some(Ok(e)) if min.as_ref().is_none_or(|m| cmp_paths(&e.path, m) == Ordering::Less) => {
                        min = Some(e.path.clone());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) => return Err(l.next().and_then(|r| r.err()).unwrap_or_else(unreachable_err)),
                    None => {}
                }
            }
            let Some(path) = min else { return Ok(None) };
            let mut top: Option<(usize, Entry)> = None;
            for (i, l) in self.layers.iter_mut().enumerate() {
                if l.peek().is_some_and(|r| r.as_ref().is_ok_and(|e| e.path == path))
                    && let Some(Ok(e)) = l.next()
                {
                    top = Some((i, e));
                }
            }
            let Some((i, mut e)) = top else { continue };
            while self.floors.last().is_some_and(|(d, _)| !is_below(&path, d)) {
                self.floors.pop();
            }
            let floor = self.floors.last().map_or(0, |f| f.1);
            if i < floor {
                continue;
            }
            match e.kind {
                Kind::Whiteout => {
                    self.floors.push((path, i + 1));
                    continue;
                }
                Kind::Dir { opaque: true } => {
                    self.floors.push((path, i));
                    e.kind = Kind::Dir { opaque: false };
                }
                Kind::Dir { opaque: false } => {}
                _ => self.floors.push((path, i + 1)),
            }
            self.last = i;
            return Ok(Some(e));
        }
    }
}

/// A layer-like stream of entries in tree order.
pub type Source<'s> = Box<dyn Iterator<Item = Result<Entry>> + 's>;

/// One layer's entries with their paths moved below `at`. Tree order is
/// kept: every path gains the same prefix.
struct Placed<'s> {
    reader: LayerReader<'s>,
    at: Vec<u8>,
}

impl Placed<'_> {
    fn place(&self, p: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.at.len() + 1 + p.len());
        out.extend_from_slice(&self.at);
        if !self.at.is_empty() && !p.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(p);
        out
    }
}

impl Iterator for Placed<'_> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut r = self.reader.next()?;
        if !self.at.is_empty()
            && let Ok(e) = &mut r
        {
            e.path = self.place(&e.path);
            if let Kind::Hardlink { target } = &mut e.kind {
                *target = self.place(target);
            }
        }
        Some(r)
    }
}

fn unreachable_err() -> crate::Error {
    crate::Error::manifest("?", crate::manifest::ManifestFault::ReaderVanished)
}

impl Iterator for Merged<'_> {
    type Item = Result<Entry>;

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

/// What an overlay must record so that `base` plus it gives `new`.
///
/// Both inputs are complete trees in tree order. Unchanged entries cost
/// nothing; a changed entry is recorded with the directories above it (so
/// each layer is a tree of its own); a deleted path becomes one whiteout.
pub fn diff<B, N>(base: B, new: N) -> Diff<B, N>
where
    B: Iterator<Item = Result<Entry>>,
    N: Iterator<Item = Result<Entry>>,
{
    Diff { base: base.peekable(), new: new.peekable(), pending: Vec::new(), out: Vec::new(), skip_below: None }
}

pub struct Diff<B: Iterator, N: Iterator> {
    base: Peekable<B>,
    new: Peekable<N>,
    /// Unchanged directories on the path to the current entry, not yet sent.
    pending: Vec<(Entry, bool)>,
    out: Vec<Entry>,
    /// Base entries below this path are dropped (replaced by a non-directory).
    skip_below: Option<Vec<u8>>,
}

impl<B, N> Diff<B, N>
where
    B: Iterator<Item = Result<Entry>>,
    N: Iterator<Item = Result<Entry>>,
{
    /// Emits the pending directories above `path`.
    fn flush_parents(&mut self, path: &[u8]) {
        let Some(p) = parent(path) else { return };
        for (d, sent) in &mut self.pending {
            if !*sent && (d.path == p || is_below(p, &d.path)) {
                *sent = true;
                self.out.push(d.clone());
            }
        }
    }

    fn enter(&mut self, path: &[u8]) {
        while self.pending.last().is_some_and(|(d, _)| !is_below(path, &d.path)) {
            self.pending.pop();
        }
    }

    fn emit(&mut self, e: Entry) {
        self.flush_parents(&e.path);
        if e.is_dir() {
            self.pending.push((e.clone(), true));
        }
        self.out.push(e);
    }

    fn step(&mut self) -> Result<bool> {
        let order = match (self.base.peek(), self.new.peek()) {
            (None, None) => return Ok(false),
            (Some(Err(_)), _) => return Err(self.base.next().and_then(|r| r.err()).unwrap_or_else(unreachable_err)),
            (_, Some(Err(_))) => return Err(self.new.next().and_then(|r| r.err()).unwrap_or_else(unreachable_err)),
            (Some(Ok(b)), Some(Ok(n))) => cmp_paths(&b.path, &n.path),
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(Ok(_))) => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                let Some(Ok(b)) = self.base.next() else { return Ok(true) };
                if let Some(s) = &self.skip_below
                    && is_below(&b.path, s)
                {
                    return Ok(true);
                }
                self.enter(&b.path);
                let mut w = b.clone();
                w.kind = Kind::Whiteout;
                (w.mode, w.uid, w.gid, w.mtime, w.xattrs) = (0, 0, 0, Default::default(), vec![]);
                self.emit(w);
                self.skip_below = Some(b.path);
            }
            Ordering::Greater => {
                let Some(Ok(n)) = self.new.next() else { return Ok(true) };
                self.enter(&n.path);
                self.emit(n);
            }
            Ordering::Equal => {
                let (Some(Ok(b)), Some(Ok(n))) = (self.base.next(), self.new.next()) else { return Ok(true) };
                self.enter(&n.path);
                if b == n && !n.path.is_empty() {
                    if n.is_dir() {
                        self.pending.push((n, false));
                    }
                } else {
                    if !n.is_dir() {
                        self.skip_below = Some(n.path.clone());
                    }
                    self.emit(n);
                }
            }
        }
        Ok(true)
    }
}

impl<B, N> Iterator for Diff<B, N>
where
    B: Iterator<Item = Result<Entry>>,
    N: Iterator<Item = Result<Entry>>,
{
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if !self.out.is_empty() {
                return Some(Ok(self.out.remove(0)));
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
