//! Garbage collection: mark from pinned roots, sweep the rest.
//!
//! Roots are named layers and pinned layers (with the stacks below them).
//! gc holds the store's lock exclusively, so it never runs during a publish
//! that may be counting on a chunk it would delete. Sweeping removes index
//! entries first and pack files after, so a crash leaves at worst
//! unreferenced bytes for the next gc.

use std::collections::{HashMap, HashSet};
use std::fs;

use crate::error::{IoContext, Result};
use crate::id::ChunkId;
use crate::manifest::{Extent, Kind};
use crate::store::{Record, Store, reindex, scan_pack, write_pack};

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

impl Store {
    /// Every chunk reachable from the layers in `roots`.
    pub fn reachable(&self, roots: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        let mut live = HashSet::new();
        let mut done = HashSet::new();
        for root in roots {
            for layer in self.stack(root)? {
                if !done.insert(layer) {
                    continue;
                }
                live.insert(layer);
                live.extend(self.layer_root(&layer)?.manifest.iter().map(|c| c.id));
                for e in self.read_layer(&layer)? {
                    if let Kind::File { extents, .. } = e?.kind {
                        live.extend(extents.iter().filter_map(|x| match x {
                            Extent::Data { id, .. } => Some(*id),
                            Extent::Hole { .. } => None,
                        }));
                    }
                }
            }
        }
        Ok(live)
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

    /// Removes every chunk no root reaches.
    pub fn gc(&self) -> Result<GcStats> {
        let _lock = self.exclusive_lock()?;
        let mut stats = GcStats::default();
        for tmp in self.stale_tmp_packs()? {
            stats.freed_bytes += fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&tmp).ctx("removing", &tmp)?;
        }
        let live = self.reachable(&self.roots()?)?;
        stats.live_chunks = live.len() as u64;
        let index = self.index_entries()?;
        let mut per_pack: HashMap<u64, (u64, Vec<ChunkId>)> = HashMap::new();
        let mut dead = Vec::new();
        // A solid block's bytes count once, as live if any member is.
        let mut counted = HashSet::new();
        for (id, loc) in &index {
            let slot = per_pack.entry(loc.pack).or_default();
            if live.contains(id) {
                if loc.encoding != crate::Encoding::Block || counted.insert((loc.pack, loc.offset)) {
                    slot.0 += loc.stored_len as u64;
                }
            } else {
                slot.1.push(*id);
                dead.push(*id);
            }
        }
        stats.removed_chunks = dead.len() as u64;
        reindex(self, &[], &dead)?;
        for (pack, path) in self.packs()? {
            let size = fs::metadata(&path).ctx("reading", &path)?.len();
            let live_bytes = per_pack.get(&pack).map_or(0, |p| p.0);
            if live_bytes == 0 {
                self.forget_pack_file(pack);
                fs::remove_file(&path).ctx("removing", &path)?;
                stats.removed_packs += 1;
                stats.freed_bytes += size;
            } else if (live_bytes as f64) < REWRITE_BELOW * size as f64 {
                let mut keep: Vec<Record> = Vec::new();
                let index_loc: HashMap<ChunkId, u64> =
                    index.iter().filter(|(_, l)| l.pack == pack).map(|(id, l)| (*id, l.offset)).collect();
                scan_pack(pack, &path, |r| {
                    // A member of a block that does not open cannot be
                    // copied; verify names it.
                    if live.contains(&r.id) && index_loc.get(&r.id) == Some(&r.loc.offset) && r.damaged.is_none() {
                        keep.push(r);
                    }
                    Ok(())
                })?;
                let moved = write_pack(self, keep.into_iter())?;
                reindex(self, &moved, &[])?;
                self.forget_pack_file(pack);
                fs::remove_file(&path).ctx("removing", &path)?;
                let new_size =
                    moved.first().and_then(|(_, l)| fs::metadata(self.pack_path(l.pack)).ok()).map_or(0, |m| m.len());
                stats.rewritten_packs += 1;
                stats.freed_bytes += size.saturating_sub(new_size);
            }
        }
        let dead_layers: Vec<ChunkId> =
            self.layers()?.into_iter().map(|(id, _)| id).filter(|id| !live.contains(id)).collect();
        self.forget_layers(&dead_layers)?;
        Ok(stats)
    }
}
