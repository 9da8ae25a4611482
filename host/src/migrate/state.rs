//! A guest's saved state as a layer: stored cut by content, or as its page
//! delta against the instance's files ([`super::statepages`]), and read
//! back into a file or straight into a QEMU waiting for it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use xenod_deployer::StagedGuest;
use xenod_store::{
    Chunking, Entry, FileReader, ImportOptions, Kind, LayerId, LayerWriter, Store, Timestamp, chunk_stream,
};

use super::record::free_bytes;
use super::statepages::{self, EncodeStats, PageIndex, Warm};
use crate::error::{Context, Error, Result};
use crate::instance::Instance;
use crate::{bail, err};

/// The state file's name inside a state layer: the save image itself, or
/// (written now) its page delta against the instance's files
/// ([`statepages`]).
pub(crate) const STATE_FILE: &[u8] = b"state.save";

pub(crate) const STATE_PAGES: &[u8] = b"state.pages";

/// Layer metadata of a state layer whose page delta refers to the files of
/// another commit of the instance than the one it is restored on (the last
/// pre-copy round's, when the delta was encoded while the guest ran).
pub(crate) const META_PAGES_ON: &str = "pages-on";

/// Stores a saved-state file as a one-file layer, cut by content so that
/// a later state shares the chunks of unchanged memory. With `index`, the
/// layer holds the page delta of the state against the instance's files
/// instead of the state itself.
pub(crate) fn state_layer(
    store: &Store,
    file: &Path,
    index: Option<&PageIndex>,
    meta: BTreeMap<String, String>,
) -> Result<(LayerId, Option<EncodeStats>)> {
    let Some(ix) = index else { return Ok((store_state(store, file, STATE_FILE, meta)?, None)) };
    let delta = file.with_extension("pages");
    let r = (|| {
        let f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let stats = statepages::encode(store, f, ix, &delta)?;
        Ok((store_state(store, &delta, STATE_PAGES, meta)?, Some(stats)))
    })();
    let _ = fs::remove_file(&delta);
    r
}

/// Stores the file `from` as a one-file layer holding it at `path`.
pub(crate) fn store_state(store: &Store, from: &Path, path: &[u8], meta: BTreeMap<String, String>) -> Result<LayerId> {
    let f = fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let size = f.metadata()?.len();
    let at = || from.display().to_string();
    let opts = ImportOptions { single_chunks: true, ..ImportOptions::default() };
    let (extents, total) = chunk_stream(store, f, Chunking::Cdc, size, &opts, &at)?;
    let mut w = LayerWriter::new(store);
    w.push(&Entry::dir(Vec::new()))?;
    w.push(&Entry {
        path: path.to_vec(),
        kind: Kind::File { size: total, chunking: Chunking::Cdc, extents },
        mode: 0o600,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        xattrs: vec![],
    })?;
    Ok(w.finish(None, meta)?)
}

/// A save image that lives for one restore: in `/dev/shm` when that has
/// room for it twice over, so that writing and reading it run at memory
/// speed with no writeback to wait for (on the migration benchmark the
/// 242 MB image took seconds to go through the disk), else in the
/// instance directory. Removed when dropped, unless [`Transient::keep`]
/// moved it.
pub(crate) struct Transient {
    path: PathBuf,
    kept: bool,
}

impl Transient {
    pub(crate) fn new(inst_dir: &Path, memory_mib: u64) -> Self {
        let shm = Path::new("/dev/shm");
        let need = memory_mib.max(256) << 21;
        let path = if free_bytes(shm).is_ok_and(|f| f >= need) {
            let tag = xenod_store::ChunkId::of(inst_dir.as_os_str().as_encoded_bytes()).fmt_short();
            shm.join(format!("xenod-state-{tag}.save"))
        } else {
            inst_dir.join("state.save")
        };
        Self { path, kept: false }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the image to `to` (on disk), which then outlives this.
    pub(crate) fn keep(mut self, to: &Path) -> Result<()> {
        if self.path != to {
            fs::copy(&self.path, to).with_context(|| format!("copying {} to {}", self.path.display(), to.display()))?;
            fs::File::open(to)?.sync_all()?;
        }
        self.kept = self.path == to;
        Ok(())
    }
}

impl Drop for Transient {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
        let _ = fs::remove_file(self.path.with_extension("pages"));
    }
}

/// The files of an instance whose pages its memory is likely to repeat:
/// its disk image, and the kernel and initrd when they come from the stack.
pub(crate) fn page_sources(inst: &Instance) -> Vec<Vec<u8>> {
    let Some(spec) = &inst.spec else { return Vec::new() };
    let rel = |p: &str| p.trim_start_matches('/').as_bytes().to_vec();
    let mut out: Vec<Vec<u8>> = spec.disk_image.iter().map(|p| rel(p)).collect();
    for b in std::iter::once(&spec.kernel).chain(spec.initrd.as_ref()) {
        if let xenod_deployer::BootFile::Stack(p) = b {
            out.push(rel(&p.to_string_lossy()));
        }
    }
    out
}

/// Data chunks (not holes) of a layer's files.
pub(crate) fn data_chunks(store: &Store, layer: &LayerId) -> Result<u64> {
    let mut n = 0;
    for e in store.read_layer(layer)? {
        if let Kind::File { extents, .. } = e?.kind {
            n += extents.iter().filter(|x| matches!(x, xenod_store::Extent::Data { .. })).count() as u64;
        }
    }
    Ok(n)
}

/// Writes the save image of state layer `layer` to `to`; `top` is the
/// layer the instance is restored on, whose files a page delta refers to
/// unless the state layer names another commit of the instance
/// ([`META_PAGES_ON`]); `warm`: chunks read ahead ([`statepages::warm`]).
pub(crate) fn export_state(store: &Store, layer: &LayerId, top: &LayerId, to: &Path, warm: &Warm) -> Result<()> {
    let (on, extents, paged) = saved_state(store, layer, top)?;
    let reader = FileReader::new(store, extents);
    let done = if paged {
        statepages::decode(store, &on, reader, to, warm).map(|_| ())
    } else {
        fs::File::create(to)
            .and_then(|mut out| std::io::copy(&mut { reader }, &mut out))
            .map(|_| ())
            .map_err(Error::from)
    };
    done.with_context(|| format!("writing {} from state layer {layer}", to.display()))
}

/// [`export_state`] written in one pass into the QEMU `qemu` that waits
/// for it, without a file.
pub(crate) fn stream_state(
    store: &Store,
    layer: &LayerId,
    top: &LayerId,
    qemu: &mut xenod_deployer::Incoming,
    warm: &Warm,
) -> Result<()> {
    let (on, extents, paged) = saved_state(store, layer, top)?;
    let mut reader = FileReader::new(store, extents);
    let name = qemu.name().to_owned();
    let mut out = qemu.state();
    let r = if paged {
        statepages::decode_stream(store, &on, reader, &mut out, warm).map(|_| ())
    } else {
        std::io::copy(&mut reader, &mut out).map(|_| ()).context("writing the saved state")
    };
    r.with_context(|| format!("streaming the saved state into {name} (QEMU's log is in /var/log/libvirt/qemu)"))
}

/// The domain XML in the save image of state layer `layer` (restored on
/// `top`), from the image's head alone.
pub(crate) fn state_xml(store: &Store, layer: &LayerId, top: &LayerId) -> Result<String> {
    use std::io::Read;
    let (on, extents, paged) = saved_state(store, layer, top)?;
    let head = |n: usize| -> Result<Vec<u8>> {
        let mut r = FileReader::new(store, extents.clone());
        if paged {
            return statepages::decode_head(store, &on, r, n as u64);
        }
        let mut b = Vec::with_capacity(n);
        (&mut r).take(n as u64).read_to_end(&mut b)?;
        Ok(b)
    };
    let bad = |why: xenod_deployer::SaveImageFault| err!("the save image in state layer {layer}: {why}");
    let n = xenod_deployer::head_len(&head(xenod_deployer::SAVE_HEADER)?).map_err(bad)?;
    xenod_deployer::head_xml(&head(n)?).map_err(bad)
}

/// The saved state of state layer `layer` for a restore on `top`: the
/// layer its page delta refers to, the extents of its file and whether
/// that is a page delta (or a save image as it is).
fn saved_state(store: &Store, layer: &LayerId, top: &LayerId) -> Result<(LayerId, Vec<xenod_store::Extent>, bool)> {
    let on = match store.layer_root(layer)?.meta.get(META_PAGES_ON) {
        None => *top,
        Some(on) => {
            let on: LayerId = on.parse().map_err(|e| err!("state layer {layer}: {META_PAGES_ON} {on:?}: {e}"))?;
            // Another commit of the same instance: over the same stack.
            if store.layer_root(&on)?.base != store.layer_root(top)?.base {
                bail!("state layer {layer} refers to pages of {on}, which is not a commit of the instance of {top}");
            }
            on
        }
    };
    for e in store.read_layer(layer)? {
        let e = e?;
        if let Kind::File { extents, .. } = e.kind
            && (e.path == STATE_FILE || e.path == STATE_PAGES)
        {
            return Ok((on, extents, e.path == STATE_PAGES));
        }
    }
    bail!("layer {layer} holds no saved state")
}
