//! The source's side of a migration that is not the hypervisor's: the
//! guest's upper layer committed from its live mount, the page index of its
//! files, its saved state as a layer ([`LocalChanges`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use xenod_cowfs::CommitCache;
use xenod_store::{LayerId, Store};

use super::policy::{Changes, Commit, StateLayer, blocking};
use super::state::{META_PAGES_ON, STATE_PAGES, Transient, page_sources, state_layer, store_state};
use super::statepages::{self, EncodeStats, PageHashes, PageIndex};
use crate::error::Result;
use crate::instance::{Instance, Instances};

/// A state encoder following the save as it is written: the layer whose
/// files it refers to, and its task.
type Follower = (LayerId, tokio::task::JoinHandle<Result<EncodeStats>>);

/// The guest's files and state on this host.
pub struct LocalChanges {
    store: Arc<Store>,
    data: PathBuf,
    instances: Instances,
    inst: Instance,
    cache: CommitCache,
    /// Page hashes of the instance's files, brought up to date while the
    /// target fetches each round, so stop-and-copy hashes only the last
    /// writes.
    hashes: Arc<Mutex<PageHashes>>,
    sources: Arc<Vec<Vec<u8>>>,
    /// The last round's page index, and its layer.
    index: Option<(LayerId, PageIndex)>,
    state: Option<Transient>,
    follow: Option<Follower>,
}

impl LocalChanges {
    /// `cold`: no state will be saved, so no page of the files is hashed.
    pub fn new(store: Arc<Store>, instances: &Instances, inst: Instance, cold: bool) -> Self {
        let data = instances.data_dir();
        let sources = Arc::new(if cold { Vec::new() } else { page_sources(&inst) });
        Self {
            store,
            data: data.to_path_buf(),
            instances: instances.clone(),
            inst,
            cache: CommitCache::default(),
            hashes: Default::default(),
            sources,
            index: None,
            state: None,
            follow: None,
        }
    }

    fn state_file(&self) -> Result<PathBuf> {
        Ok(self.state.as_ref().ok_or_else(|| crate::Error::msg("no state was saved"))?.path().to_path_buf())
    }

    async fn index_now(&self, layer: LayerId) -> Result<PageIndex> {
        let (store, hashes, sources) = (self.store.clone(), self.hashes.clone(), self.sources.clone());
        blocking(move || hashes.lock().unwrap_or_else(|e| e.into_inner()).index(&store, &layer, &sources)).await
    }
}

impl Changes for LocalChanges {
    async fn commit(&mut self, full: bool) -> Result<Commit> {
        let (store, data, inst) = (self.store.clone(), self.data.clone(), self.inst.clone());
        let mut cache = std::mem::take(&mut self.cache);
        let (c, cache, dirty) = blocking(move || {
            let dirty = xenod_cowfs::drain_dirty(&inst.control(&data))?;
            let stack = store.stack(&inst.mounted())?;
            let meta = [("instance".to_string(), inst.name.clone())].into();
            let c = xenod_cowfs::commit_live(
                store.clone(),
                &stack,
                &inst.upper(&data),
                meta,
                &mut cache,
                (!full).then_some(&dirty),
            )?;
            store.flush()?;
            Ok((c, cache, dirty))
        })
        .await?;
        self.cache = cache;
        Ok(Commit { layer: c.id, blocks_written: dirty.block_count(), bytes_read: self.cache.last_read })
    }

    async fn index_pages(&mut self, layer: LayerId) -> Result<()> {
        self.index = Some((layer, self.index_now(layer).await?));
        Ok(())
    }

    fn begin_save(&mut self, follow: bool) -> (PathBuf, Arc<AtomicBool>) {
        let memory_mib = self.inst.spec.as_ref().map_or(0, |s| s.memory_mib as u64);
        let state = Transient::new(&self.inst.dir(&self.data), memory_mib);
        let file = state.path().to_path_buf();
        self.state = Some(state);
        let done = Arc::new(AtomicBool::new(false));
        if follow && let Some((on, ix)) = self.index.take() {
            let (store, from, to, d) = (self.store.clone(), file.clone(), file.with_extension("pages"), done.clone());
            let task = tokio::task::spawn_blocking(move || {
                statepages::encode(&store, statepages::Follow::new(&from, d), &ix, &to)
            });
            self.follow = Some((on, task));
        }
        (file, done)
    }

    async fn state_layer(&mut self, live: bool, commit: LayerId) -> Result<StateLayer> {
        let file = self.state_file()?;
        let mut meta: std::collections::BTreeMap<String, String> =
            [("instance-state".to_string(), self.inst.name.clone())].into();
        let followed = match self.follow.take() {
            Some((on, task)) if live => Some((on, task.await??)),
            Some((_, task)) => {
                // Not saved live after all: what it followed is not the state.
                let _ = task.await;
                None
            }
            None => None,
        };
        let store = self.store.clone();
        let out = if let Some((on, stats)) = followed {
            let mut meta = meta;
            meta.insert(META_PAGES_ON.to_string(), on.to_string());
            let s = store.clone();
            let l = blocking(move || store_state(&s, &file.with_extension("pages"), STATE_PAGES, meta)).await?;
            StateLayer { layer: Some(l), pages: Some(stats), encoded_live: true }
        } else {
            let index =
                self.index_now(commit).await.map_err(|e| e.context("hashing the pages of the instance's files"))?;
            let s = store.clone();
            let (l, st) = blocking(move || state_layer(&s, &file, Some(&index), std::mem::take(&mut meta))).await?;
            StateLayer { layer: Some(l), pages: st, encoded_live: false }
        };
        blocking(move || Ok(store.flush()?)).await?;
        Ok(out)
    }

    async fn settle(&mut self) {
        if let Some((_, task)) = self.follow.take() {
            let _ = task.await;
        }
    }

    fn keep_state(&mut self) -> PathBuf {
        // Kept where `xenod resume` looks, on disk.
        let kept = self.inst.dir(&self.data).join("state.save");
        let Some(state) = self.state.take() else { return kept };
        let file = state.path().to_path_buf();
        match state.keep(&kept) {
            Ok(()) => kept,
            Err(e) => {
                tracing::warn!("keeping the saved state in {}: {e:#}", kept.display());
                file
            }
        }
    }

    async fn remove_instance(&mut self) -> Result<()> {
        let (instances, name, store) = (self.instances.clone(), self.inst.name.clone(), self.store.clone());
        blocking(move || instances.teardown(&name, &store, false)).await
    }
}
