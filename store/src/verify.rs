//! `verify`: rehash every stored chunk and check every layer's references:
//! bases, manifests, file data, and the layers `.mount` files name.
//!
//! Verify also sets the store's damage marks (see `store.rs`): afterwards
//! exactly the indexed chunks it found damaged are marked, so a fetch or a
//! publish that meets them writes them anew.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::codec;
use crate::error::Result;
use crate::id::{ChunkId, LayerId};
use crate::manifest::{Extent, Kind, display_path};
use crate::mounts::is_mount_file;
use crate::store::{Store, scan_pack};

/// A chunk that a layer needs and the store cannot give back intact.
#[derive(Debug, Clone)]
pub struct Damage {
    pub chunk: ChunkId,
    pub why: String,
    /// Layers that need it, each with the first path (or "manifest") that does.
    pub layers: Vec<(LayerId, String)>,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub packs: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub layers: u64,
    pub damage: Vec<Damage>,
    /// Layers whose manifest cannot be read at all.
    pub broken_layers: Vec<(LayerId, String)>,
    /// Packs or pack tails that cannot be framed.
    pub bad_packs: Vec<String>,
    /// `.mount` files of known layers whose reference does not give a
    /// whole stack here: (layer, the file's path, the reference, why).
    pub broken_mounts: Vec<(LayerId, String, String, String)>,
    /// Packs that hold a damaged record (live or dead) or cannot be framed:
    /// what [`Store::rewrite_pack`] is for, once their live chunks are intact.
    pub damaged_packs: Vec<u64>,
    /// Leftovers of interrupted writes; harmless, removed by gc.
    pub stale_tmp: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
            && self.broken_layers.is_empty()
            && self.bad_packs.is_empty()
            && self.broken_mounts.is_empty()
    }
}

impl Store {
    /// Rehashes every chunk and checks every reference of every layer this
    /// store knows (written here, named or pinned).
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with(None)
    }

    /// [`Self::verify`], telling `progress` the bytes of each pack once
    /// it is scanned (their sum is [`Self::pack_usage`]'s).
    pub fn verify_with(&self, progress: Option<&crate::import::Progress>) -> Result<VerifyReport> {
        let mut report = VerifyReport { stale_tmp: self.stale_tmp_packs()?.len() as u64, ..Default::default() };
        let packs = self.packs()?;
        report.packs = packs.len() as u64;
        let good: Mutex<HashSet<(ChunkId, u64, u64)>> = Mutex::new(HashSet::new());
        let bad: Mutex<HashMap<ChunkId, String>> = Mutex::new(HashMap::new());
        let counts = Mutex::new((0u64, 0u64));
        let bad_packs = Mutex::new(Vec::new());
        let damaged_packs = Mutex::new(std::collections::BTreeSet::new());
        packs.par_iter().for_each(|(pack, path)| {
            let r = scan_pack(*pack, path, |rec| {
                let checked = match &rec.damaged {
                    Some(why) => Err(why.clone()),
                    None => codec::decode(&rec.id, rec.loc.encoding, &rec.stored, rec.loc.plain_len as usize)
                        .map(drop)
                        .map_err(|e| e.to_string()),
                };
                match checked {
                    Ok(()) => {
                        good.lock().unwrap_or_else(|e| e.into_inner()).insert((rec.id, rec.loc.pack, rec.loc.offset));
                    }
                    Err(e) => {
                        bad.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(rec.id, format!("{e} (in {} at offset {})", path.display(), rec.loc.offset));
                        damaged_packs.lock().unwrap_or_else(|e| e.into_inner()).insert(*pack);
                    }
                }
                let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                c.0 += 1;
                c.1 += rec.loc.stored_len as u64;
                Ok(())
            });
            if let Some(p) = progress {
                p(std::fs::metadata(path).map_or(0, |m| m.len()));
            }
            if let Err(e) = r {
                bad_packs.lock().unwrap_or_else(|e| e.into_inner()).push(e.to_string());
                damaged_packs.lock().unwrap_or_else(|e| e.into_inner()).insert(*pack);
            }
        });
        let good = good.into_inner().unwrap_or_else(|e| e.into_inner());
        let scanned_bad = bad.into_inner().unwrap_or_else(|e| e.into_inner());
        // Damaged: indexed chunks whose indexed copy is not intact. A bad
        // record that the index does not point at is a dead copy.
        let mut bad: HashMap<ChunkId, String> = HashMap::new();
        (report.chunks, report.bytes) = counts.into_inner().unwrap_or_else(|e| e.into_inner());
        report.bad_packs = bad_packs.into_inner().unwrap_or_else(|e| e.into_inner());
        report.damaged_packs = damaged_packs.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().collect();
        // An index entry must point at an intact record.
        let mut indexed = HashSet::new();
        for (id, loc) in self.index_entries()? {
            indexed.insert(id);
            if !good.contains(&(id, loc.pack, loc.offset)) {
                bad.entry(id).or_insert_with(|| match scanned_bad.get(&id) {
                    Some(why) => why.clone(),
                    None => format!(
                        "index points at {} offset {}, where no intact copy is",
                        self.pack_path(loc.pack).display(),
                        loc.offset
                    ),
                });
            }
        }
        let mut layers: Vec<LayerId> = self.layers()?.into_iter().map(|(id, _)| id).collect();
        layers.extend(self.roots()?);
        layers.sort();
        layers.dedup();
        // Layers `.mount` files name join the walk as they are found.
        let mut walked: HashSet<LayerId> = layers.iter().copied().collect();
        let mut damage: HashMap<ChunkId, Damage> = HashMap::new();
        let mut need = |chunk: ChunkId, layer: LayerId, at: &dyn Fn() -> String| {
            let why = if let Some(why) = bad.get(&chunk) {
                why.clone()
            } else if !indexed.contains(&chunk) {
                "missing from the store".to_string()
            } else {
                return;
            };
            let d = damage.entry(chunk).or_insert_with(|| Damage { chunk, why, layers: vec![] });
            if !d.layers.iter().any(|(l, _)| *l == layer) {
                d.layers.push((layer, at()));
            }
        };
        let mut broken_mounts = Vec::new();
        while let Some(layer) = layers.pop() {
            report.layers += 1;
            need(layer, layer, &|| "layer root".into());
            let root = match self.layer_root(&layer) {
                Ok(r) => r,
                Err(e) => {
                    report.broken_layers.push((layer, e.to_string()));
                    continue;
                }
            };
            for c in &root.manifest {
                need(c.id, layer, &|| "manifest".into());
            }
            let reader = match self.read_layer(&layer) {
                Ok(r) => r,
                Err(e) => {
                    report.broken_layers.push((layer, e.to_string()));
                    continue;
                }
            };
            for e in reader {
                match e {
                    Ok(e) => {
                        if is_mount_file(&e) {
                            let file = display_path(&e.path);
                            let refs = match self.read_mount_file(&e) {
                                Ok(r) => r,
                                Err(why) => {
                                    broken_mounts.push((layer, file.clone(), String::new(), why.to_string()));
                                    Vec::new()
                                }
                            };
                            for r in refs {
                                match self.resolve(&r).and_then(|id| self.stack(&id)) {
                                    Ok(stack) => {
                                        for l in stack {
                                            if walked.insert(l) {
                                                layers.push(l);
                                            }
                                        }
                                    }
                                    Err(why) => broken_mounts.push((layer, file.clone(), r, why.to_string())),
                                }
                            }
                        }
                        if let Kind::File { extents, .. } = &e.kind {
                            for x in extents {
                                if let Extent::Data { id, .. } = x {
                                    need(*id, layer, &|| display_path(&e.path));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        report.broken_layers.push((layer, e.to_string()));
                        break;
                    }
                }
            }
        }
        for (id, why) in &bad {
            damage.entry(*id).or_insert_with(|| Damage { chunk: *id, why: why.clone(), layers: vec![] });
        }
        report.damage = damage.into_values().collect();
        report.damage.sort_by_key(|d| d.chunk);
        report.broken_mounts = broken_mounts;
        let marks: Vec<(ChunkId, String)> = bad.into_iter().filter(|(id, _)| indexed.contains(id)).collect();
        self.mark_damaged(&marks, true)?;
        Ok(report)
    }
}
