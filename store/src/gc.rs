//! Garbage collection: mark from pinned roots, sweep the rest.
//!
//! Roots are named layers and pinned layers, with the stacks below them
//! and every layer a `.mount` file in a live layer names (with its stack,
//! followed through the mounted layers' own `.mount` files). gc counts
//! every `.mount` file of a live layer, even one a higher layer hides from
//! the union: keeping a layer too many is safe, deleting one a mount needs
//! is not. A `.mount` file that cannot be read stops gc (what it names is
//! unknown); a line that names no layer here keeps nothing.
//!
//! gc holds the store's lock exclusively, so it never runs during a publish
//! that may be counting on a chunk it would delete. Sweeping removes index
//! entries first and pack files after, so a crash leaves at worst
//! unreferenced bytes for the next gc. [`Store::gc_plan`] computes the same
//! sweep without doing it (`gc --dry-run`).
//!
//! gc works in three phases, each with a total known when it starts, for
//! progress ([`GcStep`]): marking (entries of the layers held), sweeping
//! (index entries) and packs (bytes of the sealed packs).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, LayerId};
use crate::manifest::{Extent, Kind, display_path};
use crate::mounts::is_mount_file;
use crate::store::{PackRewrite, Store, reindex};

/// A pack whose live bytes fall below this fraction is rewritten.
const REWRITE_BELOW: f64 = 0.5;

#[derive(Debug, Default, Clone, Copy)]
pub struct GcStats {
    pub live_chunks: u64,
    pub removed_chunks: u64,
    pub removed_packs: u64,
    pub rewritten_packs: u64,
    pub freed_bytes: u64,
}

/// What a gc would do, computed without doing it.
#[derive(Debug, Default, Clone)]
pub struct GcPlan {
    pub live_chunks: u64,
    /// Chunks no root reaches.
    pub dead_chunks: u64,
    /// Stored bytes of the dead chunks (a solid block's bytes once, when
    /// none of its members lives).
    pub dead_bytes: u64,
    /// Layers known to this store that would be forgotten.
    pub dead_layers: Vec<LayerId>,
    /// Packs that would be removed whole, with their sizes.
    pub remove_packs: Vec<(PathBuf, u64)>,
    /// Packs that would be rewritten, with their sizes and live bytes.
    pub rewrite_packs: Vec<(PathBuf, u64, u64)>,
    /// Leftovers of interrupted writes, with their sizes.
    pub stale_tmp: Vec<(PathBuf, u64)>,
}

impl GcPlan {
    /// Bytes the file system would get back: packs removed, the dead part
    /// of packs rewritten (about: a rewritten block compresses anew), and
    /// leftovers.
    pub fn freed_bytes(&self) -> u64 {
        self.remove_packs.iter().map(|p| p.1).sum::<u64>()
            + self.rewrite_packs.iter().map(|p| p.1.saturating_sub(p.2)).sum::<u64>()
            + self.stale_tmp.iter().map(|p| p.1).sum::<u64>()
    }
}

/// A phase of gc, for progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcPhase {
    /// Reading the manifests of the layers kept; counted in entries.
    Mark,
    /// Going through the index for chunks nothing keeps; counted in
    /// index entries.
    Sweep,
    /// Removing or rewriting packs; counted in bytes of the packs.
    Packs,
}

/// What gc tells its progress: a phase begins with its total, then parts
/// of it are done. The parts of a phase add up to its total by the time
/// the next begins (marking counts the entries of the layers it need not
/// read, the dead ones, once it knows them; only a layer a `.mount` file
/// names that the store does not list may take it past).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcStep {
    Begin(GcPhase, u64),
    Done(u64),
}

/// Where gc reports its steps.
pub type GcProgress<'a> = &'a (dyn Fn(GcStep) + Sync);

/// Reports entries read in batches, not one call per entry.
const MARK_BATCH: u64 = 4096;

/// The chunks of one layer, and the layers its `.mount` files name.
struct LayerRefs {
    chunks: Vec<ChunkId>,
    mounts: Vec<LayerId>,
}

impl Store {
    /// Every chunk reachable from the layers in `roots`: their stacks, and
    /// what `.mount` files in them name (see the module doc).
    pub fn reachable(&self, roots: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        self.reachable_with(roots, &|_| {})
    }

    /// [`Self::reachable`], telling `progress` the entries it reads.
    fn reachable_with(&self, roots: &[ChunkId], progress: &dyn Fn(u64)) -> Result<HashSet<ChunkId>> {
        let mut live = HashSet::new();
        let mut done = HashSet::new();
        let mut todo: Vec<LayerId> = roots.to_vec();
        while let Some(root) = todo.pop() {
            for layer in self.stack(&root)? {
                if !done.insert(layer) {
                    continue;
                }
                live.insert(layer);
                let refs = self.layer_refs(&layer, progress)?;
                live.extend(refs.chunks);
                todo.extend(refs.mounts);
            }
        }
        Ok(live)
    }

    /// The manifest and data chunks of `layer`, and the layers its
    /// `.mount` files name that this store resolves.
    fn layer_refs(&self, layer: &LayerId, progress: &dyn Fn(u64)) -> Result<LayerRefs> {
        let mut chunks: Vec<ChunkId> = self.layer_root(layer)?.manifest.iter().map(|c| c.id).collect();
        let mut mounts = Vec::new();
        let mut read = 0u64;
        for e in self.read_layer(layer)? {
            let e = e?;
            read += 1;
            if read == MARK_BATCH {
                progress(read);
                read = 0;
            }
            if is_mount_file(&e) {
                let refs = self.read_mount_file(&e).map_err(|source| Error::BadInput {
                    at: format!("layer {layer} {}", display_path(&e.path)),
                    why: format!("cannot read this .mount file, so gc cannot tell what it keeps: {source}"),
                })?;
                // A reference that names no layer here keeps nothing
                // (verify reports it).
                for r in refs {
                    if let Ok(id) = self.resolve(&r)
                        && self.contains(&id)?
                    {
                        mounts.push(id);
                    }
                }
            }
            if let Kind::File { extents, .. } = e.kind {
                chunks.extend(extents.iter().filter_map(|x| match x {
                    Extent::Data { id, .. } => Some(*id),
                    Extent::Hole { .. } => None,
                }));
            }
        }
        progress(read);
        Ok(LayerRefs { chunks, mounts })
    }

    /// The layers gc keeps: every pinned layer, and every named layer held
    /// here. A name heard from peers for a layer this host never fetched
    /// is no root (there is nothing of it here to keep or check), nor is
    /// a removed name.
    pub fn roots(&self) -> Result<Vec<ChunkId>> {
        let held: HashSet<ChunkId> = self.layers()?.into_iter().map(|(id, _)| id).collect();
        let mut roots: Vec<ChunkId> =
            self.names()?.into_iter().filter(|r| !r.removed && held.contains(&r.id)).map(|r| r.id).collect();
        roots.extend(self.pins()?.into_iter().map(|(_, id)| id));
        roots.sort();
        roots.dedup();
        Ok(roots)
    }

    /// What [`Store::gc`] would remove now, without removing anything.
    pub fn gc_plan(&self) -> Result<GcPlan> {
        self.gc_plan_with(&|_| {})
    }

    /// [`Self::gc_plan`], telling `progress` where it is.
    pub fn gc_plan_with(&self, progress: GcProgress<'_>) -> Result<GcPlan> {
        let live = self.mark(progress)?;
        let mut plan = GcPlan { live_chunks: live.len() as u64, ..Default::default() };
        for tmp in self.stale_tmp_packs()? {
            let size = fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
            plan.stale_tmp.push((tmp, size));
        }
        let sweep = self.sweep(&live, progress)?;
        plan.dead_chunks = sweep.dead.len() as u64;
        plan.dead_bytes = sweep.dead_bytes;
        for (pack, path, size) in self.pack_sizes(progress)? {
            let live_bytes = sweep.live_bytes.get(&pack).copied().unwrap_or(0);
            if live_bytes == 0 {
                plan.remove_packs.push((path, size));
            } else if (live_bytes as f64) < REWRITE_BELOW * size as f64 {
                plan.rewrite_packs.push((path, size, live_bytes));
            }
            progress(GcStep::Done(size));
        }
        plan.dead_layers = self.layers()?.into_iter().map(|(id, _)| id).filter(|id| !live.contains(id)).collect();
        plan.dead_layers.sort();
        Ok(plan)
    }

    /// The live set: phase [`GcPhase::Mark`].
    fn mark(&self, progress: GcProgress<'_>) -> Result<HashSet<ChunkId>> {
        let total: u64 = self.layers()?.iter().map(|(_, i)| i.entries).sum();
        progress(GcStep::Begin(GcPhase::Mark, total));
        let read = std::sync::atomic::AtomicU64::new(0);
        let live = self.reachable_with(&self.roots()?, &|n| {
            read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            progress(GcStep::Done(n));
        })?;
        // The layers not read are dead: decided, so done.
        progress(GcStep::Done(total.saturating_sub(read.into_inner())));
        Ok(live)
    }

    /// Sealed packs with their sizes, beginning phase [`GcPhase::Packs`]
    /// with their sum.
    fn pack_sizes(&self, progress: GcProgress<'_>) -> Result<Vec<(u64, PathBuf, u64)>> {
        let mut out = Vec::new();
        for (pack, path) in self.packs()? {
            let size = fs::metadata(&path).ctx("reading", &path)?.len();
            out.push((pack, path, size));
        }
        progress(GcStep::Begin(GcPhase::Packs, out.iter().map(|p| p.2).sum()));
        Ok(out)
    }

    /// Dead index entries and live bytes per pack, for `live`: phase
    /// [`GcPhase::Sweep`].
    fn sweep(&self, live: &HashSet<ChunkId>, progress: GcProgress<'_>) -> Result<Sweep> {
        let mut s = Sweep::default();
        // A solid block's bytes count once, as live if any member is.
        let mut counted = HashSet::new();
        let mut dead_blocks: HashMap<(u64, u64), u64> = HashMap::new();
        let mut batch = 0u64;
        // Streamed, the index's own count as the total: no copy of it.
        self.scan_index(
            |len| progress(GcStep::Begin(GcPhase::Sweep, len)),
            |id, loc| {
                batch += 1;
                if batch == MARK_BATCH {
                    progress(GcStep::Done(batch));
                    batch = 0;
                }
                let block = loc.encoding == crate::Encoding::Block;
                if live.contains(&id) {
                    if !block || counted.insert((loc.pack, loc.offset)) {
                        *s.live_bytes.entry(loc.pack).or_default() += loc.stored_len as u64;
                    }
                } else {
                    s.dead.push(id);
                    if block {
                        dead_blocks.insert((loc.pack, loc.offset), loc.stored_len as u64);
                    } else {
                        s.dead_bytes += loc.stored_len as u64;
                    }
                }
            },
        )?;
        s.dead_bytes += dead_blocks.iter().filter(|(k, _)| !counted.contains(*k)).map(|(_, b)| *b).sum::<u64>();
        progress(GcStep::Done(batch));
        Ok(s)
    }

    /// Removes every chunk no root reaches.
    pub fn gc(&self) -> Result<GcStats> {
        self.gc_with(&|_| {})
    }

    /// [`Self::gc`], telling `progress` where it is.
    pub fn gc_with(&self, progress: GcProgress<'_>) -> Result<GcStats> {
        let _lock = self.exclusive_lock()?;
        let mut stats = GcStats::default();
        for tmp in self.stale_tmp_packs()? {
            stats.freed_bytes += fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&tmp).ctx("removing", &tmp)?;
        }
        let live = self.mark(progress)?;
        stats.live_chunks = live.len() as u64;
        let Sweep { dead, live_bytes, .. } = self.sweep(&live, progress)?;
        stats.removed_chunks = dead.len() as u64;
        reindex(self, &[], &dead)?;
        for (pack, path, size) in self.pack_sizes(progress)? {
            let live_bytes = live_bytes.get(&pack).copied().unwrap_or(0);
            if live_bytes == 0 {
                self.forget_pack_file(pack);
                fs::remove_file(&path).ctx("removing", &path)?;
                stats.removed_packs += 1;
                stats.freed_bytes += size;
            } else if (live_bytes as f64) < REWRITE_BELOW * size as f64 {
                // The index holds live chunks only now: the rewrite copies
                // them, verified, one block at a time. A live chunk whose
                // only copy is damaged keeps its pack (verify names it).
                match self.rewrite_pack_locked(pack)? {
                    PackRewrite::Rewritten { into, .. } => {
                        let new_size = into.and_then(|n| fs::metadata(self.pack_path(n)).ok()).map_or(0, |m| m.len());
                        stats.rewritten_packs += 1;
                        stats.freed_bytes += size.saturating_sub(new_size);
                    }
                    PackRewrite::Kept { chunk, why } => {
                        tracing::warn!("gc keeps {}: live chunk {chunk} in it is damaged: {why}", path.display());
                    }
                }
            }
            progress(GcStep::Done(size));
        }
        let dead_layers: Vec<ChunkId> =
            self.layers()?.into_iter().map(|(id, _)| id).filter(|id| !live.contains(id)).collect();
        self.forget_layers(&dead_layers)?;
        Ok(stats)
    }
}

#[derive(Default)]
struct Sweep {
    dead: Vec<ChunkId>,
    dead_bytes: u64,
    live_bytes: HashMap<u64, u64>,
}
