//! `xenod migrate`, `xenod checkpoint`, `xenod restore`: an instance's
//! changes and machine state as layers, sent as the chunks the target
//! lacks.
//!
//! The target already holds, or fetches from any peer, the immutable
//! layers the instance runs on. What moves is the instance's upper layer,
//! committed as an overlay on its stack ([`xenod_cowfs::commit_live`]),
//! and for a disk-root guest its saved state, chunked like any file
//! (content-defined, so pages unchanged since an earlier checkpoint or
//! migration the target holds are not sent; zero pages are holes). On the
//! target the instance runs on that overlay with a fresh upper layer.
//!
//! Phases, each with its own error ([`PhaseError`]):
//!
//! ```text
//! prepare        target: check trust, name and space; fetch the stack
//! pre-copy       source: drain cowfs's dirty set, commit only what was
//!                written, target fetches the new chunks; repeat while a
//!                round sends less than the one before (at most 6 rounds);
//!                then the target stages the guest: mounts the last
//!                round's layer and starts its QEMU there, paused, waiting
//!                for its state (`stage`)
//! stop-and-copy  source: save the guest (or stop it, --cold), commit the
//!                last writes, chunk the state; target fetches them
//! resume         target: write the last writes into the staged mount and
//!                load the state into the waiting QEMU; unstaged: mount,
//!                rewrite the saved state's identity and paths, restore
//!                (or boot, --cold)                       <- commit point
//! clean up       source: undefine, unmount, remove the instance
//! ```
//!
//! Before the commit point any failure aborts: the target forgets what it
//! prepared and the source guest runs again. Once the target has begun
//! restoring, a lost connection leaves the outcome unknown; the source
//! then keeps its guest saved (never running twice) and says so.
//!
//! Wire: ALPN [`ALPN`] on the daemon's endpoint; one bi-stream per request,
//! one JSON request, then JSON lines: `{"alive":true}` every 2 s while the
//! target works (a silent target is declared dead after 20 s),
//! `{"restoring":true}` when it passes the commit point, and one
//! `{"ok":true,"result":..}` or `{"ok":false,"error":".."}`. Only nodes
//! listed in the target's `migrate_from` (see `xenod allow`) are served.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use xenod_cowfs::CommitCache;
use xenod_deployer::{DeploySpec, Hypervisor, PortForward, RootMode, StagedGuest};
use xenod_peer::parse_peer;
use xenod_store::{
    Chunking, Dense, Entry, Exit, FileReader, ImportOptions, Kind, LayerId, LayerWriter, Store, Timestamp, chunk_stream,
};

use self::local::LocalChanges;
use self::policy::{Migration, Plan, Target, blocking, save_guest};
use self::statepages::{EncodeStats, PageHashes, PageIndex, Warm};
use self::wire::RemoteTarget;
use crate::daemon::Daemon;
pub use crate::error::Phase;
use crate::error::{Context, Error, Result};
use crate::instance::{self as deploy, Instance};
use crate::{bail, err};

mod local;
pub mod policy;
pub mod stage;
pub mod statepages;
mod target;
pub mod wire;

pub use policy::{MigrationReport, PhaseReport};
pub use target::Handler;
pub(crate) use target::{instance_of, mount_instance, new_instance_dir, test_fail};
pub use wire::ALPN;

/// The state file's name inside a state layer: the save image itself, or
/// (written now) its page delta against the instance's files
/// ([`statepages`]).
const STATE_FILE: &[u8] = b"state.save";
const STATE_PAGES: &[u8] = b"state.pages";

/// Refuses a pre-copy codec a dense request could not carry.
fn check_level(codec: Dense) -> Result<(), String> {
    let max = xenod_peer::MAX_DENSE_LEVEL;
    match codec {
        Dense::Zstd(level) if !(1..=max).contains(&level) => Err(format!("level {level} is outside 1..={max}")),
        _ => Ok(()),
    }
}
/// zstd level in stop-and-copy, where the guest is down: compression must
/// not take longer than the bytes it saves would.
const FINAL_CODEC: Dense = Dense::Zstd(3);
/// Layer metadata of a checkpoint: its state layer and instance record.
const META_STATE: &str = "checkpoint-state";
const META_RECORD: &str = "instance-record";
/// Layer metadata of a state layer whose page delta refers to the files of
/// another commit of the instance than the one it is restored on (the last
/// pre-copy round's, when the delta was encoded while the guest ran).
const META_PAGES_ON: &str = "pages-on";

/// What a target needs to run an instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub top: LayerId,
    pub layer: LayerId,
    pub root: RootMode,
    pub ports: Vec<PortForward>,
    pub spec: Option<DeploySpec>,
    /// The instance directory on the sending host, as named in the saved
    /// state's paths.
    pub source_dir: PathBuf,
}

// ---- state as a layer ----------------------------------------------------

/// Stores a saved-state file as a one-file layer, cut by content so that
/// a later state shares the chunks of unchanged memory. With `index`, the
/// layer holds the page delta of the state against the instance's files
/// instead of the state itself.
fn state_layer(
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
fn store_state(store: &Store, from: &Path, path: &[u8], meta: BTreeMap<String, String>) -> Result<LayerId> {
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
    fn keep(mut self, to: &Path) -> Result<()> {
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
fn data_chunks(store: &Store, layer: &LayerId) -> Result<u64> {
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
    let bad = |why: String| err!("the save image in state layer {layer}: {why}");
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

/// Marks an instance as migrating; a second migration is refused. The mark
/// is an exclusive `flock` on the instance's `migrating` file (which names
/// the holder's process): it ends with the migration, or with the process
/// if it dies, so a crash leaves nothing stale to clear. The file itself
/// stays (unlinking a locked file would let a third taker lock a new one).
struct Busy(fs::File);

impl Busy {
    fn take(dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let p = dir.join("migrating");
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                bail!("the instance is already migrating (process {}, {})", pid.trim(), p.display());
            }
            Err(e) => return Err(e).with_context(|| format!("locking {}", p.display())),
        }
        let note = |f: &mut fs::File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            write!(f, "{}", std::process::id())
        };
        note(&mut f).with_context(|| format!("writing {}", p.display()))?;
        Ok(Self(f))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Unlocked when the file closes; emptied so it names nobody.
        let _ = self.0.set_len(0);
    }
}

/// Bytes free for this process in the filesystem of `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn upper_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    total += m.blocks() * 512;
                }
            }
        }
    }
    total
}

/// The host ports the guest gets here, as `(saved, here)` pairs for the
/// ports that move: a port its deploy spec left to chance (`0:GUEST`) that
/// is taken on this host goes to a free one (on one machine the source's
/// paused QEMU still holds it until clean-up); a port the spec fixed must
/// be free.
pub(crate) fn ports_here(record: &Record) -> Result<Vec<(u16, u16)>> {
    let mut moved = Vec::new();
    for f in &record.ports {
        let Err(taken) = xenod_deployer::check_ports_free(&[*f]) else { continue };
        let any = record.spec.as_ref().is_some_and(|s| s.ports.iter().any(|p| p.host == 0 && p.guest == f.guest));
        if !any {
            return Err(taken).context(format!("the guest's fixed host port {} is taken on this host", f.host));
        }
        let free = xenod_deployer::resolve_ports(&[PortForward { host: 0, guest: f.guest }])?;
        moved.push((f.host, free[0].host));
    }
    Ok(moved)
}

fn record_of(data: &Path, inst: &Instance) -> Record {
    Record {
        name: inst.name.clone(),
        top: inst.top,
        layer: inst.layer,
        root: inst.root,
        ports: inst.ports.clone(),
        spec: inst.spec.clone(),
        source_dir: inst.dir(data),
    }
}

/// How a running guest's memory is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveMode {
    /// Live where the hypervisor can ([`xenod_deployer::Libvirt::save_live`]),
    /// else stopped.
    Auto,
    /// Live, or fail.
    Live,
    /// Stopped for the whole save: paused, then saved by the live path's
    /// means where it can be, else by `virDomainSave`.
    Stopped,
}

/// `xenod migrate NAME --to PEER [--cold | --live | --save] [--level N]`:
/// checks what is asked, then runs the [`policy::Migration`].
pub async fn migrate(
    d: &Arc<Daemon>,
    name: &str,
    to: &str,
    cold: bool,
    save: SaveMode,
    level: Option<Dense>,
) -> Result<Value> {
    let data = d.data_dir().to_path_buf();
    let store = d.store_arc();
    let inst = Instance::load(&data, name).map_err(|e| Error::coded(Exit::NotFound, e.chain()))?;
    if inst.root == RootMode::Fs && !cold {
        return Err(Error::coded(
            Exit::BadInput,
            format!(
                "{name} has a shared-filesystem root, and the hypervisor cannot save such a guest's running \
                 state; `xenod migrate {name} --to ... --cold` stops it, sends its upper layer and boots it there"
            ),
        ));
    }
    let target = parse_peer(to).map_err(|e| Error::coded(Exit::BadInput, format!("--to: {e}")))?;
    if cold && save != SaveMode::Auto {
        return Err(Error::coded(Exit::BadInput, "--cold saves no memory: no --live or --save"));
    }
    if let Some(Err(why)) = level.map(check_level) {
        return Err(Error::coded(Exit::BadInput, format!("--{why}")));
    }
    let _busy = Busy::take(&inst.dir(&data))?;
    let hv = Arc::new(deploy::hypervisor(&inst.uri)?);
    if !hv.state(inst.domain())?.is_active() {
        bail!("{name} is not running (its domain {} is {})", inst.domain(), hv.state(inst.domain())?);
    }
    let need = upper_bytes(&inst.upper(&data)) + inst.spec.as_ref().map_or(512, |s| s.memory_mib as u64) * (1 << 20);
    let plan = Plan { to: to.to_owned(), cold, save, level };
    let migration = Migration::new(
        hv,
        LocalChanges::new(store, &data, inst.clone(), cold),
        RemoteTarget::new(d.clone(), target),
        inst.domain().to_owned(),
        record_of(&data, &inst),
        inst.mounted(),
        need,
        plan,
    );
    Ok(serde_json::to_value(migration.run().await?)?)
}

/// `xenod checkpoint NAME`: the guest's upper layer and saved state as a
/// layer (pinned); the guest runs on.
pub async fn checkpoint(d: &Arc<Daemon>, name: &str, label: Option<String>) -> Result<Value> {
    let data = d.data_dir().to_path_buf();
    let store = d.store_arc();
    let inst = Instance::load(&data, name).map_err(|e| Error::coded(Exit::NotFound, e.chain().to_string()))?;
    if inst.root == RootMode::Fs {
        bail!(
            "{name} has a shared-filesystem root, and the hypervisor cannot save such a guest; `xenod commit {name}` keeps its files"
        );
    }
    let _busy = Busy::take(&inst.dir(&data))?;
    let hv = Arc::new(deploy::hypervisor(&inst.uri)?);
    let transient = Transient::new(&inst.dir(&data), inst.spec.as_ref().map_or(0, |s| s.memory_mib as u64));
    let state_file = transient.path().to_path_buf();
    let t = Instant::now();
    let before = store.chunk_count()?;
    // Saved live where the hypervisor can (the guest stops for QEMU's last
    // round and for the commit of its upper layer, then runs on while its
    // state is chunked), else saved and restored.
    let live = save_guest(&hv, inst.domain(), &state_file, SaveMode::Auto, None).await?;
    let t_stopped = Instant::now();
    // The state's pages refer to the upper layer as saved: commit it while
    // the guest is stopped.
    let plain = {
        let (store, data, inst) = (store.clone(), data.clone(), inst.clone());
        blocking(move || {
            let stack = store.stack(&inst.mounted())?;
            let mut cache = CommitCache::default();
            let upper = inst.upper(&data);
            Ok(xenod_cowfs::commit_live(store, &stack, &upper, BTreeMap::new(), &mut cache, None)?.id)
        })
        .await
    };
    let mut paused = None;
    if let Some(down) = live {
        let (hv2, dom) = (hv.clone(), inst.domain().to_owned());
        blocking(move || Ok(hv2.resume(&dom)?)).await.context("the guest did not resume after its live save")?;
        paused = Some(down.as_secs_f64() + t_stopped.elapsed().as_secs_f64());
    }
    let made: Result<(LayerId, LayerId)> = match plain {
        Err(e) => Err(e),
        Ok(plain) => {
            let (store, data, inst, f) = (store.clone(), data.clone(), inst.clone(), state_file.clone());
            blocking(move || {
                let index = PageHashes::default().index(&store, &plain, &page_sources(&inst))?;
                let meta = [("instance-state".to_string(), inst.name.clone())].into();
                let (s, _) = state_layer(&store, &f, Some(&index), meta)?;
                let record = serde_json::to_string(&record_of(&data, &inst))?;
                let meta: BTreeMap<String, String> = [
                    (META_STATE.to_string(), s.to_string()),
                    (META_RECORD.to_string(), record),
                    ("instance".to_string(), inst.name.clone()),
                ]
                .into();
                // The layer as committed above (the guest may be writing by
                // now), with the state named in its metadata.
                let mut w = LayerWriter::new(&store);
                for e in store.read_layer(&plain)? {
                    w.push(&e?)?;
                }
                let id = w.finish(store.layer_root(&plain)?.base, meta)?;
                let pin = format!("checkpoint:{}:{}", inst.name, now());
                store.pin(&pin, &id)?;
                store.pin(&format!("{pin}:state"), &s)?;
                store.flush()?;
                Ok((id, s))
            })
            .await
        }
    };
    let back = if live.is_some() {
        let _ = fs::remove_file(&state_file);
        Ok(())
    } else {
        let (hv2, f) = (hv.clone(), state_file.clone());
        blocking(move || {
            hv2.restore(&f)?;
            let _ = fs::remove_file(&f);
            Ok(())
        })
        .await
    };
    let paused = paused.unwrap_or_else(|| t.elapsed().as_secs_f64());
    let (id, state) = made?;
    back.context("the checkpoint is stored, but the guest did not resume")?;
    if let Some(l) = label {
        crate::config::record_name_in(&data, &store, &l, id)?;
    }
    Ok(json!({ "checkpoint": id.to_string(), "state": state.to_string(), "instance": name,
               "new_chunks": store.chunk_count()?.saturating_sub(before), "state_chunks": data_chunks(&store, &state)?,
               "live": live.is_some(), "paused_seconds": paused, "seconds": t.elapsed().as_secs_f64() }))
}

/// `xenod restore CHECKPOINT [--on PEER] [--name NAME]`.
pub async fn restore(d: &Arc<Daemon>, checkpoint: &str, on: Option<&str>, name: Option<String>) -> Result<Value> {
    let store = d.store_arc();
    let id = store.resolve(checkpoint)?;
    let root = store.layer_root(&id)?;
    let state = root.meta.get(META_STATE).ok_or_else(|| {
        Error::coded(Exit::BadInput, format!("{checkpoint} is not a checkpoint (no saved state in its metadata)"))
    })?;
    let state: LayerId = state.parse().map_err(|e| err!("checkpoint {id}: state id: {e}"))?;
    let mut record: Record = serde_json::from_str(
        root.meta.get(META_RECORD).ok_or_else(|| err!("checkpoint {id} has no instance record"))?,
    )?;
    if let Some(n) = name {
        record.name = n;
    }
    match on {
        None => {
            let (data, store) = (d.data_dir().to_path_buf(), store.clone());
            let v = blocking(move || target::adopt(&data, &store, id, Some(state), &record, &|| {})).await?;
            Ok(json!({ "restored": v, "on": "here" }))
        }
        Some(peer) => {
            let target = parse_peer(peer).map_err(|e| Error::coded(Exit::BadInput, format!("--on: {e}")))?;
            let mut t = RemoteTarget::new(d.clone(), target);
            let need = record.spec.as_ref().map_or(512, |s| s.memory_mib as u64) << 20;
            t.prepare(&record, id, need).await.context("prepare")?;
            let rep = t.resume(id, Some(state), &record, &mut false).await.context("resume")?;
            Ok(json!({ "restored": rep.instance, "on": peer, "fetch": rep.fetch }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(spec_port: &str, held: u16) -> Record {
        let mut spec = DeploySpec::new("stack:boot/vmlinux".parse().unwrap());
        spec.ports = vec![spec_port.parse().unwrap()];
        Record {
            name: "web".into(),
            top: LayerId::from_bytes([1; 32]),
            layer: LayerId::from_bytes([2; 32]),
            root: RootMode::Disk,
            ports: vec![PortForward { host: held, guest: 80 }],
            spec: Some(spec),
            source_dir: "/a/instances/web".into(),
        }
    }

    #[test]
    fn a_taken_port_moves_only_where_the_spec_left_it_to_chance() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let held = l.local_addr().unwrap().port();
        let moved = ports_here(&record("0:80", held)).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, held);
        assert_ne!(moved[0].1, held);
        let e = format!("{:#}", ports_here(&record(&format!("{held}:80"), held)).unwrap_err());
        assert!(e.contains(&format!("fixed host port {held} is taken")), "{e}");
        drop(l);
        assert!(ports_here(&record(&format!("{held}:80"), held)).unwrap().is_empty(), "free ports stay");
    }
}
