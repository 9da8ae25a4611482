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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use xenod_cowfs::{CommitCache, DirtySet};
use xenod_deployer::{DeploySpec, DomainModel, Hypervisor, PortForward, RootMode, default_uri};
use xenod_peer::iroh::endpoint::{Connection, RecvStream, SendStream};
use xenod_peer::iroh::protocol::{AcceptError, ProtocolHandler};
use xenod_peer::{EndpointAddr, FetchOptions, format_peer, parse_peer};
use xenod_store::{
    Chunking, Dense, Entry, FileReader, ImportOptions, Kind, LayerId, LayerWriter, Store, Timestamp, chunk_stream,
};

use statepages::{EncodeStats, PageHashes, PageIndex, Warm};
use xenod_store::Exit;

use crate::config::Config;
use crate::daemon::Daemon;
pub use crate::error::Phase;
use crate::error::{Context, Error, Result};
use crate::instance::{self as deploy, Instance};
use crate::note;
use crate::{bail, err};

pub mod stage;
pub mod statepages;

/// The migration protocol on the daemon's endpoint.
pub const ALPN: &[u8] = b"xenod/migrate/1";
const MAX_ROUNDS: usize = 6;
/// Pre-copy stops once a round sends less than this.
const CONVERGED: u64 = 2 << 20;
const ALIVE_EVERY: Duration = Duration::from_secs(2);
const SILENT_LIMIT: Duration = Duration::from_secs(20);
/// The state file's name inside a state layer: the save image itself, or
/// (written now) its page delta against the instance's files
/// ([`statepages`]).
const STATE_FILE: &[u8] = b"state.save";
const STATE_PAGES: &[u8] = b"state.pages";
/// How pre-copy compresses by default (dense frames: every chunk
/// compressed in 1 MiB runs); `migrate --level` sets a zstd level instead.
/// The guest runs meanwhile, so bytes count more than the source's CPU, up
/// to a point: on the migration benchmark, zstd 9 sent 45.5 MB in 3.8 s
/// of pre-copy, 16 (zstd's optimal parser with a short search) 39.6 MB in
/// 16 s, and zstd's own 16 40.2 MB in 35 s. PPMd, where it is smaller
/// (text, code), sends 22% less than 16 on the benchmark's log in a
/// quarter of the CPU; the target pays for that by decoding at 8-30 MB/s
/// (see `xenod_store`'s codec).
const PRECOPY_CODEC: Dense = Dense::Ppmd;

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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Wire {
    Prepare {
        instance: String,
        mounted: LayerId,
        source: String,
        need_bytes: u64,
    },
    /// `last`: sent in stop-and-copy, with the guest stopped. `level`: of
    /// pre-copy, [`PRECOPY_CODEC`] when absent.
    Sync {
        layer: LayerId,
        source: String,
        last: bool,
        #[serde(default)]
        level: Option<Dense>,
    },
    /// After pre-copy: mount `layer` and start the guest's QEMU on it,
    /// waiting for its state ([`stage`]). `xml`: the domain as the
    /// source runs it.
    Stage {
        layer: LayerId,
        record: Box<Record>,
        xml: String,
    },
    Resume {
        layer: LayerId,
        state: Option<LayerId>,
        record: Box<Record>,
        source: String,
    },
    Abort {
        instance: String,
    },
}

// ---- target side ---------------------------------------------------------

/// Serves [`ALPN`] for the daemon once it is up.
#[derive(Clone, Debug, Default)]
pub struct Handler {
    pub daemon: Arc<OnceLock<Weak<Daemon>>>,
}

impl ProtocolHandler for Handler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let peer = conn.remote_id().to_string();
        let Some(d) = self.daemon.get().and_then(Weak::upgrade) else {
            conn.close(1u32.into(), b"daemon starting");
            return Ok(());
        };
        let allowed = Config::load(d.data_dir()).map(|c| c.migrate_from.contains(&peer)).unwrap_or(false);
        // A stage lives as long as its source's connection.
        let slot = stage::SharedSlot::default();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (d, peer, slot) = (d.clone(), peer.clone(), slot.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_request(&d, &peer, allowed, &slot, send, recv).await {
                    tracing::warn!("migration request from {peer}: {e:#}");
                }
            });
        }
        let (data, store) = (d.data_dir().to_path_buf(), d.store_arc());
        let _ = tokio::task::spawn_blocking(move || stage::close(&slot, &data, &store)).await;
        Ok(())
    }
}

async fn serve_request(
    d: &Arc<Daemon>,
    peer: &str,
    allowed: bool,
    slot: &stage::SharedSlot,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<()> {
    let req = recv.read_to_end(1 << 20).await.context("reading the request")?;
    let req: Wire = serde_json::from_slice(&req).context("a malformed request")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let work = {
        let (d, peer, slot) = (d.clone(), peer.to_owned(), slot.clone());
        tokio::spawn(async move {
            if !allowed {
                bail!(
                    "this host does not take guests from {peer}; on it run `xenod allow {peer}` \
                     (the node id is in `xenod status` of the sending host)"
                );
            }
            target_op(&d, req, &slot, tx).await
        })
    };
    let mut work = std::pin::pin!(work);
    let mut alive = tokio::time::interval(ALIVE_EVERY);
    let result = loop {
        tokio::select! {
            r = &mut work => break r.map_err(Error::from).and_then(|r| r),
            Some(v) = rx.recv() => send.write_all(format!("{v}\n").as_bytes()).await?,
            _ = alive.tick() => send.write_all(b"{\"alive\":true}\n").await?,
        }
    };
    while let Ok(v) = rx.try_recv() {
        send.write_all(format!("{v}\n").as_bytes()).await?;
    }
    let v = match result {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    };
    send.write_all(format!("{v}\n").as_bytes()).await?;
    send.finish().ok();
    // Let the peer read the answer before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

async fn target_op(
    d: &Arc<Daemon>,
    req: Wire,
    slot: &stage::SharedSlot,
    tx: tokio::sync::mpsc::UnboundedSender<Value>,
) -> Result<Value> {
    match req {
        Wire::Prepare { instance, mounted, source, need_bytes } => {
            xenod_deployer::validate_name(&instance)?;
            if deploy::instance_dir(d.data_dir(), &instance).exists() {
                bail!("an instance named {instance:?} already exists on this host");
            }
            let free = free_bytes(d.data_dir())?;
            if free < need_bytes {
                bail!(
                    "this host lacks space: {} MiB free in {}, about {} MiB needed",
                    free >> 20,
                    d.data_dir().display(),
                    need_bytes >> 20
                );
            }
            fetch(d, mounted, &source, None).await
        }
        Wire::Sync { layer, source, last, level } => {
            test_hook(if last { "stop-and-copy" } else { "pre-copy" });
            let codec = if last { FINAL_CODEC } else { level.unwrap_or(PRECOPY_CODEC) };
            check_level(codec).map_err(|why| err!("pre-copy {why}"))?;
            fetch(d, layer, &source, Some(codec)).await
        }
        Wire::Resume { layer, state, record, source } => {
            let mut rep = fetch(d, layer, &source, Some(FINAL_CODEC)).await?;
            if let Some(s) = state {
                let r = fetch(d, s, &source, Some(FINAL_CODEC)).await?;
                for k in ["chunks_fetched", "bytes", "wire_bytes"] {
                    rep[k] = json!(rep[k].as_u64().unwrap_or(0) + r[k].as_u64().unwrap_or(0));
                }
            }
            let (data, store) = (d.data_dir().to_path_buf(), d.store_arc());
            let t = Instant::now();
            let staged = stage::take(slot, &record.name);
            let adopted = tokio::task::spawn_blocking(move || {
                let restoring = || {
                    let _ = tx.send(json!({ "restoring": true }));
                };
                if let (Some(st), Some(s)) = (staged, state) {
                    match stage::finish(&data, &store, st, layer, s, &restoring)? {
                        Ok(v) => return Ok(v),
                        // More changed than file contents: the usual way.
                        Err(st) => stage::undo(&data, &store, st),
                    }
                }
                adopt(&data, &store, layer, state, &record, &restoring)
            })
            .await??;
            Ok(json!({ "fetch": rep, "instance": adopted, "resume_seconds": t.elapsed().as_secs_f64() }))
        }
        Wire::Stage { layer, record, xml } => {
            let (data, store, slot) = (d.data_dir().to_path_buf(), d.store_arc(), slot.clone());
            tokio::task::spawn_blocking(move || {
                let (staged, info) = stage::stage(&data, &store, layer, &record, &xml)?;
                stage::keep(&slot, &data, &store, staged);
                Ok(info)
            })
            .await?
        }
        Wire::Abort { instance } => {
            // Only what a failed resume could have left: adopt cleans up
            // after itself, so normally there is nothing.
            if let Some(st) = stage::take(slot, &instance) {
                let (data, store) = (d.data_dir().to_path_buf(), d.store_arc());
                tokio::task::spawn_blocking(move || stage::undo(&data, &store, st)).await?;
            }
            let dir = deploy::instance_dir(d.data_dir(), &instance);
            Ok(json!({ "aborted": instance, "left": dir.exists() }))
        }
    }
}

/// Fetches `layer`'s stack from the migration's source (and the default
/// peers); `dense`: ask for every chunk in solid frames made by that codec.
async fn fetch(d: &Daemon, layer: LayerId, source: &str, dense: Option<Dense>) -> Result<Value> {
    let mut providers = vec![parse_peer(source).map_err(|e| err!("source address {source}: {e}"))?];
    for p in d.default_peers() {
        if !providers.iter().any(|q| q.id == p.id) {
            providers.push(p);
        }
    }
    let opts = FetchOptions { dense, ..FetchOptions::default() };
    let rep = d.node().fetch(layer, &providers, opts).await?;
    Ok(json!({ "layer": layer.to_string(), "chunks_fetched": rep.chunks_fetched, "bytes": rep.bytes,
               "wire_bytes": rep.wire_bytes, "elapsed_ms": rep.elapsed_ms }))
}

/// Test hook: `XENOD_TEST_MIGRATE_DIE=PHASE` makes a target daemon kill
/// itself (SIGKILL) when a request of that phase arrives ([`crate::hooks`]).
fn test_hook(phase: &str) {
    if crate::hooks::var("XENOD_TEST_MIGRATE_DIE").is_some_and(|p| p == phase) {
        tracing::error!("XENOD_TEST_MIGRATE_DIE={phase}: killing this daemon");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Test hook: `XENOD_TEST_MIGRATE_FAIL=restore` makes a target fail its
/// restore of a guest after telling the source it is restoring
/// ([`crate::hooks`]).
pub(crate) fn test_fail(step: &str) -> Result<()> {
    if crate::hooks::var("XENOD_TEST_MIGRATE_FAIL").is_some_and(|p| p == step) {
        bail!("XENOD_TEST_MIGRATE_FAIL={step}");
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// `record`'s instance as it runs here on `layer`, not yet mounted.
pub(crate) fn instance_of(data: &Path, record: &Record, layer: LayerId) -> Result<Instance> {
    let domain = deploy::domain_name(data, &record.name)?;
    Ok(Instance {
        name: record.name.clone(),
        top: record.top,
        layer: record.layer,
        uri: default_uri(),
        root: record.root,
        ports: record.ports.clone(),
        mount_pid: None,
        created: now(),
        mounted: Some(layer),
        domain: (domain != record.name).then_some(domain),
        spec: record.spec.clone(),
        lazy: false,
    })
}

/// Creates the directory of an instance `name` arriving here, which
/// must be a new name.
pub(crate) fn new_instance_dir(data: &Path, name: &str) -> Result<PathBuf> {
    xenod_deployer::validate_name(name)?;
    let dir = deploy::instance_dir(data, name);
    if dir.exists() {
        bail!("an instance named {name:?} already exists on this host");
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Records `inst`, pins `layer` for it and mounts it with a fresh upper
/// layer.
pub(crate) fn mount_instance(data: &Path, store: &Store, inst: &mut Instance, layer: LayerId) -> Result<()> {
    inst.save(data)?;
    store.pin(&deploy::pin_label(&inst.name), &layer)?;
    inst.mount_pid = Some(deploy::spawn_mount(data, inst)?);
    inst.save(data)
}

/// Runs `record`'s instance here on the committed upper `layer` (all of
/// whose chunks are local): mounts it with a fresh upper layer, then
/// restores the saved state of `state`, or boots it when there is none.
/// Leaves nothing behind on failure.
fn adopt(
    data: &Path,
    store: &Arc<Store>,
    layer: LayerId,
    state: Option<LayerId>,
    record: &Record,
    restoring: &dyn Fn(),
) -> Result<Value> {
    let name = record.name.as_str();
    let dir = new_instance_dir(data, name)?;
    let domain = deploy::domain_name(data, name)?;
    let mut inst = instance_of(data, record, layer)?;
    let uri = inst.uri.clone();
    let undo = |started: bool| {
        if started && let Ok(hv) = deploy::hypervisor(&uri) {
            let _ = hv.destroy(&domain);
        }
        let _ = deploy::teardown(data, name, store, false);
    };
    let mut steps = serde_json::Map::new();
    let mut step = |k: &str, t: Instant| {
        steps.insert(k.into(), json!(t.elapsed().as_secs_f64()));
    };
    let r = (|| -> Result<Value> {
        let t = Instant::now();
        mount_instance(data, store, &mut inst, layer)?;
        step("mount_seconds", t);
        let hv = deploy::hypervisor(&inst.uri)?;
        let mut staged = false;
        match state {
            Some(s) => {
                let t = Instant::now();
                let paths = [(format!("{}/", record.source_dir.display()), format!("{}/", dir.display()))];
                let moved = ports_here(record)?;
                let uuid = xenod_deployer::random_uuid();
                // A QEMU guest's state goes straight into a QEMU started
                // for it, with no image file (as large as the guest's
                // memory) on the way; other guests restore from a file.
                let loaded = if hv.can_stage() {
                    let xml =
                        xenod_deployer::retarget_xml(&state_xml(store, &s, &layer)?, &domain, &uuid, &paths, &moved)
                            .map_err(|why| err!("the save image in state layer {s}: {why}"))?;
                    let mut qemu = hv.stage_incoming(&xml)?;
                    stream_state(store, &s, &layer, &mut qemu, &Warm::new())?;
                    Loaded::Staged(qemu)
                } else {
                    let file = Transient::new(&dir, record.spec.as_ref().map_or(0, |s| s.memory_mib as u64));
                    export_state(store, &s, &layer, file.path(), &Warm::new())?;
                    xenod_deployer::retarget(file.path(), &domain, &uuid, &paths, &moved)?;
                    Loaded::File(file)
                };
                step("state_seconds", t);
                xenod_deployer::move_host_ports(&mut inst.ports, &moved);
                inst.save(data)?;
                restoring();
                test_fail("restore")?;
                let t = Instant::now();
                match loaded {
                    Loaded::Staged(qemu) => {
                        hv.finish_incoming(qemu)?;
                        staged = true;
                    }
                    Loaded::File(file) => {
                        hv.restore(file.path())?;
                    }
                }
                step("restore_seconds", t);
            }
            None => {
                let mut spec = record.spec.clone().ok_or_else(|| err!("no deploy spec to boot {name} from"))?;
                spec.instance = Some(name.to_owned());
                let mut model = DomainModel::from_spec(&spec, &inst.mountpoint(data), dir.join("console.log"))?;
                model.name = domain.clone();
                inst.ports = model.network.forwards().to_vec();
                inst.save(data)?;
                restoring();
                hv.deploy(&model)?;
                // Downtime lasts until the service answers again.
                let timeout = Duration::from_secs(120);
                xenod_deployer::wait_console(&hv, &domain, xenod_deployer::GUEST_READY_LINE, timeout)?;
                if let Some(p) = inst.ports.first() {
                    xenod_deployer::wait_http(&hv, &domain, p.host, "/xenod-ready-probe", timeout)?;
                }
            }
        }
        Ok(json!({ "name": name, "domain": domain, "layer": layer.to_string(),
                   "port": inst.ports.first().map(|p| p.host), "staged": staged }))
    })();
    let r = r.map(|mut v| {
        v["steps"] = Value::Object(steps);
        v
    });
    if r.is_err() {
        undo(true);
    }
    r
}

/// A saved state on its way into a guest: in a QEMU waiting for the rest,
/// or in a file for libvirt's restore.
enum Loaded {
    Staged(xenod_deployer::Incoming),
    File(Transient),
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
    let mut out = qemu.state();
    let r = if paged {
        statepages::decode_stream(store, &on, reader, &mut out, warm).map(|_| ())
    } else {
        std::io::copy(&mut reader, &mut out).map(|_| ()).context("writing the saved state")
    };
    r.with_context(|| {
        format!("streaming the saved state into {} (QEMU's log is in /var/log/libvirt/qemu)", qemu.name())
    })
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

// ---- source side ---------------------------------------------------------

/// A request to the target over an open connection; `on_line` sees the
/// target's intermediate lines.
async fn call(conn: &Connection, req: &Wire, mut on_line: impl FnMut(&Value)) -> Result<Value> {
    let (mut send, recv) = conn.open_bi().await.context("opening a stream to the target")?;
    send.write_all(serde_json::to_string(req)?.as_bytes()).await.context("sending to the target")?;
    send.finish().ok();
    let mut lines = BufReader::new(recv).lines();
    loop {
        let line = match tokio::time::timeout(SILENT_LIMIT, lines.next_line()).await {
            Err(_) => bail!("the target went silent for {} s", SILENT_LIMIT.as_secs()),
            Ok(Err(e)) => bail!("the connection to the target broke: {e}"),
            Ok(Ok(None)) => bail!("the target closed the stream without an answer"),
            Ok(Ok(Some(l))) => l,
        };
        let v: Value = serde_json::from_str(&line).with_context(|| format!("target sent {line:?}"))?;
        if v.get("ok").is_some() {
            if v["ok"] == true {
                return Ok(v["result"].clone());
            }
            return Err(Error::TargetRefused(v["error"].as_str().unwrap_or("no reason given").to_owned()));
        }
        if v.get("alive").is_none() {
            on_line(&v);
        }
    }
}

async fn connect(d: &Daemon, to: &EndpointAddr) -> Result<Connection> {
    match tokio::time::timeout(Duration::from_secs(10), d.node().endpoint().connect(to.clone(), ALPN)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => bail!("connecting to {}: {e}", to.id),
        Err(_) => bail!("connecting to {}: timed out", to.id),
    }
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

/// One commit of the live upper: drain (or not) and commit what changed.
async fn sync_upper(
    store: &Arc<Store>,
    inst: &Instance,
    data: &Path,
    cache: CommitCache,
    full: bool,
) -> Result<(LayerId, CommitCache, DirtySet)> {
    let (store, data, inst) = (store.clone(), data.to_path_buf(), inst.clone());
    tokio::task::spawn_blocking(move || {
        let mut cache = cache;
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
        Ok((c.id, cache, dirty))
    })
    .await?
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

/// Saves guest `dom` to `file` as `mode` says. `Some(stopped for)` when
/// saved through QEMU's own migration (its QEMU then stays paused: unpause
/// or power it off), `None` when saved by libvirt (the domain is shut
/// off).
async fn save_guest(
    hv: &Arc<xenod_deployer::Libvirt>,
    dom: &str,
    file: &Path,
    mode: SaveMode,
    live_done: Option<Arc<AtomicBool>>,
) -> Result<Option<Duration>> {
    let (hv, dom, f) = (hv.clone(), dom.to_owned(), file.to_path_buf());
    blocking(move || {
        let r = hv.save_live(&dom, &f, mode == SaveMode::Stopped);
        if let Some(d) = live_done {
            d.store(true, Ordering::Release);
        }
        match r {
            Ok(down) => return Ok(Some(down)),
            Err(e) if mode != SaveMode::Live => {
                tracing::info!("{dom}: not saved through QEMU ({e}); saving it by libvirt")
            }
            Err(e) => return Err(e.into()),
        }
        hv.save(&dom, &f)?;
        Ok(None)
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// `xenod migrate NAME --to PEER [--cold | --live | --save] [--level N]`.
pub async fn migrate(
    d: &Arc<Daemon>,
    name: &str,
    to: &str,
    cold: bool,
    save: SaveMode,
    level: Option<Dense>,
) -> Result<Value> {
    let t0 = Instant::now();
    let data = d.data_dir().to_path_buf();
    let store = d.store_arc();
    let inst = Instance::load(&data, name).map_err(|e| Error::coded(Exit::NotFound, e.chain().to_string()))?;
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
    let source = format_peer(&d.node().addr());
    let phase_err = |phase: Phase, source: Error, guest: &str| Error::Migration {
        phase,
        guest: guest.into(),
        source: Box::new(source),
    };
    let here = "the guest keeps running here";
    let mut phases = Vec::new();

    // prepare
    note(format!("{name}: prepare: {} fetches the stack", target.id.fmt_short()));
    let t = Instant::now();
    let conn = connect(d, &target).await.map_err(|e| phase_err(Phase::Prepare, e, here))?;
    let need = upper_bytes(&inst.upper(&data)) + inst.spec.as_ref().map_or(512, |s| s.memory_mib as u64) * (1 << 20);
    let prep =
        Wire::Prepare { instance: name.into(), mounted: inst.mounted(), source: source.clone(), need_bytes: need };
    let rep = call(&conn, &prep, |_| {}).await.map_err(|e| phase_err(Phase::Prepare, e, here))?;
    phases.push(json!({ "phase": "prepare", "seconds": t.elapsed().as_secs_f64(), "fetch": rep }));

    let abort = |conn: Connection, name: String| async move {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), call(&conn, &Wire::Abort { instance: name }, |_| {})).await;
    };

    // pre-copy
    let t = Instant::now();
    let mut rounds = Vec::new();
    let mut cache = CommitCache::default();
    let mut last: Option<(LayerId, u64)> = None;
    // Page hashes of the instance's files, brought up to date while the
    // target fetches each round, so stop-and-copy hashes only the last
    // writes.
    let hashes = Arc::new(std::sync::Mutex::new(PageHashes::default()));
    // The last round's page index, and its layer.
    let mut pages_index: Option<(LayerId, PageIndex)> = None;
    let sources = Arc::new(if cold { Vec::new() } else { page_sources(&inst) });
    let index_pages = |id: LayerId| {
        let (store, hashes, sources) = (store.clone(), hashes.clone(), sources.clone());
        blocking(move || hashes.lock().unwrap_or_else(|e| e.into_inner()).index(&store, &id, &sources))
    };
    for round in 0..MAX_ROUNDS {
        let r: Result<(LayerId, u64, Value)> = async {
            let (id, c, dirty) = sync_upper(&store, &inst, &data, std::mem::take(&mut cache), round == 0).await?;
            cache = c;
            let read = cache.last_read;
            let rep = if last.is_some_and(|(l, _)| l == id) {
                json!({ "wire_bytes": 0, "chunks_fetched": 0 })
            } else {
                let req = Wire::Sync { layer: id, source: source.clone(), last: false, level };
                let (rep, indexed) = tokio::join!(call(&conn, &req, |_| {}), index_pages(id));
                pages_index = Some((id, indexed.context("hashing the pages of the instance's files")?));
                rep?
            };
            let wire = rep["wire_bytes"].as_u64().unwrap_or(0);
            Ok((
                id,
                wire,
                json!({ "round": round, "layer": id.to_string(), "blocks_written": dirty.block_count(),
                                  "bytes_read": read, "fetch": rep }),
            ))
        }
        .await;
        let (id, wire, v) = match r {
            Ok(x) => x,
            Err(e) => {
                abort(conn, name.into()).await;
                return Err(phase_err(Phase::PreCopy, e, here));
            }
        };
        note(format!("{name}: pre-copy round {round}: {:.1} MiB sent", wire as f64 / (1 << 20) as f64));
        rounds.push(v);
        let shrinking = last.is_none_or(|(_, prev)| wire < prev);
        last = Some((id, wire));
        if round > 0 && (wire < CONVERGED || !shrinking) {
            break;
        }
    }
    let pre_wire: u64 = rounds.iter().map(|r| r["fetch"]["wire_bytes"].as_u64().unwrap_or(0)).sum();
    // The target mounts the last round's layer and starts the guest's QEMU
    // on it, waiting for its state, so that after the stop it only loads
    // it (`stage`). A target that cannot restores the usual way.
    let staged = match (cold, last) {
        (false, Some((id, _))) => {
            let t = Instant::now();
            let (hv2, dom) = (hv.clone(), inst.domain().to_owned());
            let unstaged = |e: Error| {
                note(format!("{name}: the target restores the guest after the stop: it could not stage it ({e:#})"));
                json!({ "seconds": t.elapsed().as_secs_f64(), "error": format!("{e:#}") })
            };
            match blocking(move || Ok(hv2.migratable_xml(&dom)?)).await {
                Err(e) => unstaged(e.context("reading the domain's XML")),
                Ok(xml) => {
                    let req = Wire::Stage { layer: id, record: Box::new(record_of(&data, &inst)), xml };
                    match call(&conn, &req, |_| {}).await {
                        Ok(v) => json!({ "seconds": t.elapsed().as_secs_f64(), "target": v }),
                        Err(e) if matches!(e, Error::TargetRefused(_)) => unstaged(e),
                        Err(e) => {
                            abort(conn, name.into()).await;
                            return Err(phase_err(Phase::PreCopy, e, here));
                        }
                    }
                }
            }
        }
        _ => Value::Null,
    };
    phases.push(json!({ "phase": "pre-copy", "seconds": t.elapsed().as_secs_f64(), "wire_bytes": pre_wire,
                        "rounds": rounds, "stage": staged }));

    // stop-and-copy
    note(format!("{name}: stop-and-copy: {} the guest", if cold { "stopping" } else { "saving" }));
    let t_down = Instant::now();
    let memory_mib = inst.spec.as_ref().map_or(0, |s| s.memory_mib as u64);
    let transient = Transient::new(&inst.dir(&data), memory_mib);
    let state_file = transient.path().to_path_buf();
    // Saved through QEMU's migration (live, or paused for --save), the
    // state's page delta is encoded as QEMU writes it, against the last
    // pre-copy round's files (which the target holds); saved live, the
    // guest still runs meanwhile and after the stop only QEMU's last round
    // is left to encode.
    let mut follow = match pages_index.take() {
        Some((on, ix)) if !cold => {
            let done = Arc::new(AtomicBool::new(false));
            let (s, from, to, d) =
                (store.clone(), state_file.clone(), state_file.with_extension("pages"), done.clone());
            let task = tokio::task::spawn_blocking(move || {
                statepages::encode(&s, statepages::Follow::new(&from, d), &ix, &to)
            });
            Some((on, done, task))
        }
        _ => None,
    };
    // A live save returns how long the guest has been stopped.
    let stopped = if cold {
        let (hv, dom) = (hv.clone(), inst.domain().to_owned());
        blocking(move || Ok(hv.stop(&dom, Duration::from_secs(30))?)).await.map(|_| None)
    } else {
        save_guest(&hv, inst.domain(), &state_file, save, follow.as_ref().map(|f| f.1.clone())).await
    };
    if let Some((_, done, _)) = &follow {
        done.store(true, Ordering::Release);
    }
    // Saved through QEMU's migration (live, or paused first for --save):
    // its QEMU is paused now, holding the guest.
    let live = matches!(stopped, Ok(Some(_)));
    // Brings the source guest back after a failure before the commit point.
    let revive = |hv: Arc<xenod_deployer::Libvirt>, dom: String, f: PathBuf| {
        blocking(move || {
            if cold {
                hv.start(&dom)?;
            } else if live && hv.resume(&dom).is_ok() {
                // Saved live, its QEMU was only paused.
                let _ = fs::remove_file(&f);
            } else {
                if live {
                    hv.kill(&dom)?;
                }
                hv.restore(&f)?;
                let _ = fs::remove_file(&f);
            }
            Ok(())
        })
    };
    let save_down = match stopped {
        Ok(d) => d,
        Err(e) => {
            if let Some((_, _, task)) = follow.take() {
                let _ = task.await;
            }
            abort(conn, name.into()).await;
            return Err(phase_err(Phase::StopAndCopy, e, "the guest was not stopped"));
        }
    };
    let save_seconds = t_down.elapsed().as_secs_f64();
    let t_stopped = Instant::now();
    // Saved live, the guest is all in the file and its QEMU paused, still
    // holding its memory and host ports: it is powered off in clean-up,
    // after the target runs the guest (a failure before that unpauses it).

    let t = Instant::now();
    let fin: Result<(LayerId, Option<LayerId>, Value)> = async {
        let (id, c, dirty) = sync_upper(&store, &inst, &data, std::mem::take(&mut cache), false).await?;
        cache = c;
        let read = cache.last_read;
        let t_state = Instant::now();
        let mut encoded_live = false;
        let (state, pages) = if cold {
            (None, None)
        } else {
            let mut meta: BTreeMap<String, String> = [("instance-state".to_string(), name.to_string())].into();
            let followed = match follow.take() {
                Some((on, _, task)) if live => Some((on, task.await??)),
                Some((_, _, task)) => {
                    // Not saved live after all: what it followed is not the state.
                    let _ = task.await;
                    None
                }
                None => None,
            };
            encoded_live = followed.is_some();
            if let Some((on, stats)) = followed {
                meta.insert(META_PAGES_ON.into(), on.to_string());
                let (s, f) = (store.clone(), state_file.with_extension("pages"));
                let l = blocking(move || store_state(&s, &f, STATE_PAGES, meta)).await?;
                (Some(l), Some(stats))
            } else {
                let index = index_pages(id).await.context("hashing the pages of the instance's files")?;
                let (s, f) = (store.clone(), state_file.clone());
                let (l, st) = blocking(move || state_layer(&s, &f, Some(&index), meta)).await?;
                (Some(l), st)
            }
        };
        let s2 = store.clone();
        blocking(move || Ok(s2.flush()?)).await?;
        let state_seconds = t_state.elapsed().as_secs_f64();
        let t_send = Instant::now();
        // Both fetched at once.
        let conn = &conn;
        let sync = |layer| {
            let req = Wire::Sync { layer, source: source.clone(), last: true, level: None };
            async move { call(conn, &req, |_| {}).await }
        };
        let (upper, state_rep) = tokio::join!(sync(id), async {
            match state {
                Some(s) => sync(s).await.map(Some),
                None => Ok(None),
            }
        });
        let wire =
            [Some(upper?), state_rep?].iter().flatten().map(|r| r["wire_bytes"].as_u64().unwrap_or(0)).sum::<u64>();
        Ok((
            id,
            state,
            json!({ "blocks_written": dirty.block_count(), "bytes_read": read, "wire_bytes": wire,
                    "state_pages": pages, "state_seconds": state_seconds, "state_encoded_live": encoded_live,
                    "send_seconds": t_send.elapsed().as_secs_f64() }),
        ))
    }
    .await;
    // (The encoder writes into the state's directory: done before it goes.)
    if let Some((_, _, task)) = follow.take() {
        let _ = task.await;
    }
    let (layer, state, fin_info) = match fin {
        Ok(x) => x,
        Err(e) => {
            abort(conn, name.into()).await;
            let back = revive(hv.clone(), inst.domain().into(), state_file.clone()).await;
            return Err(phase_err(Phase::StopAndCopy, e, &revived(back)));
        }
    };
    let copy_seconds = t.elapsed().as_secs_f64();

    // resume (the commit point is the target's restore)
    note(format!("{name}: resume on {}", target.id.fmt_short()));
    let t = Instant::now();
    let mut restoring = false;
    let resume = Wire::Resume { layer, state, record: Box::new(record_of(&data, &inst)), source };
    let rep = call(&conn, &resume, |v| restoring |= v.get("restoring").is_some()).await;
    let rep = match rep {
        Ok(r) => r,
        // Silent or gone while restoring, the target may run the guest; a
        // target that answers that the restore failed has undone it.
        Err(e) if restoring && !matches!(e, Error::TargetRefused(_)) => {
            // Kept where `xenod resume` looks, on disk.
            let kept = inst.dir(&data).join("state.save");
            let state_file = match transient.keep(&kept) {
                Ok(()) => kept,
                Err(e) => {
                    tracing::warn!("keeping the saved state in {}: {e:#}", kept.display());
                    state_file.clone()
                }
            };
            return Err(phase_err(
                Phase::Resume,
                e,
                &format!(
                    "the target was restoring the guest when it stopped answering, so it may run there: \
                     check `xenod ps` on the target; the state is kept here ({}), and `xenod resume {name}` \
                     brings it back here if it does not run there",
                    state_file.display()
                ),
            ));
        }
        Err(e) => {
            abort(conn, name.into()).await;
            let back = revive(hv.clone(), inst.domain().into(), state_file.clone()).await;
            return Err(phase_err(Phase::Resume, e, &revived(back)));
        }
    };
    // The guest was down from the save's start, or (saved live) from
    // QEMU's last round on.
    let downtime = match save_down {
        Some(q) => q.as_secs_f64() + t_stopped.elapsed().as_secs_f64(),
        None => t_down.elapsed().as_secs_f64(),
    };
    let stop_wire = fin_info["wire_bytes"].as_u64().unwrap_or(0);
    phases.push(json!({ "phase": "stop-and-copy", "seconds": copy_seconds, "save_seconds": save_seconds,
                        "save_downtime_seconds": save_down.map(|q| q.as_secs_f64()),
                        "wire_bytes": stop_wire,
                        "upper": fin_info, "layer": layer.to_string(),
                        "state": state.map(|s| s.to_string()) }));
    phases.push(json!({ "phase": "resume", "seconds": t.elapsed().as_secs_f64(),
                        "target_seconds": rep["resume_seconds"], "target_steps": rep["instance"]["steps"] }));

    // clean up
    let t = Instant::now();
    let cleanup = {
        let (hv, dom, data, name, store) =
            (hv.clone(), inst.domain().to_owned(), data.clone(), name.to_owned(), store.clone());
        blocking(move || {
            match hv.destroy(&dom) {
                Ok(()) | Err(xenod_deployer::Error::NoSuchDomain { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            deploy::teardown(&data, &name, &store, false)
        })
        .await
    };
    if let Err(e) = cleanup {
        return Err(phase_err(
            Phase::CleanUp,
            e,
            "the guest runs on the target; remove what is left here with \
                                                 `xenod destroy`",
        ));
    }
    phases.push(json!({ "phase": "clean-up", "seconds": t.elapsed().as_secs_f64() }));
    let total_wire: u64 = phases
        .iter()
        .map(|p| p["wire_bytes"].as_u64().or_else(|| p["fetch"]["wire_bytes"].as_u64()).unwrap_or(0))
        .sum();
    Ok(json!({ "instance": name, "to": to, "cold": cold, "live": live && save != SaveMode::Stopped,
               "layer": layer.to_string(),
               "precopy_level": (!cold).then(|| match level.unwrap_or(PRECOPY_CODEC) {
                   Dense::Zstd(level) => json!(level),
                   Dense::Ppmd => json!("ppmd"),
               }),
               "port": rep["instance"]["port"], "wire_bytes": total_wire, "downtime_seconds": downtime,
               "total_seconds": t0.elapsed().as_secs_f64(), "phases": phases }))
}

fn revived(r: Result<()>) -> String {
    match r {
        Ok(()) => "the guest runs here again".into(),
        Err(e) => format!("bringing the guest back here failed too ({e:#}); `xenod resume` or `xenod start` it"),
    }
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
            let v = blocking(move || adopt(&data, &store, id, Some(state), &record, &|| {})).await?;
            Ok(json!({ "restored": v, "on": "here" }))
        }
        Some(peer) => {
            let target = parse_peer(peer).map_err(|e| Error::coded(Exit::BadInput, format!("--on: {e}")))?;
            let source = format_peer(&d.node().addr());
            let conn = connect(d, &target).await?;
            let prep = Wire::Prepare {
                instance: record.name.clone(),
                mounted: id,
                source: source.clone(),
                need_bytes: record.spec.as_ref().map_or(512, |s| s.memory_mib as u64) << 20,
            };
            call(&conn, &prep, |_| {}).await.context("prepare")?;
            let rep =
                call(&conn, &Wire::Resume { layer: id, state: Some(state), record: Box::new(record), source }, |_| {})
                    .await
                    .context("resume")?;
            Ok(json!({ "restored": rep["instance"], "on": peer, "fetch": rep["fetch"] }))
        }
    }
}

/// A migration report for people.
pub fn describe(v: &Value) -> String {
    let mib = |b: &Value| format!("{:.1} MiB", b.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64);
    let mut out = format!(
        "{} moved to {}{}: {} sent, guest down {:.2} s, {:.2} s in all",
        v["instance"].as_str().unwrap_or(""),
        v["to"].as_str().unwrap_or(""),
        if v["cold"] == true { " (cold)" } else { "" },
        mib(&v["wire_bytes"]),
        v["downtime_seconds"].as_f64().unwrap_or(0.0),
        v["total_seconds"].as_f64().unwrap_or(0.0)
    );
    for p in v["phases"].as_array().into_iter().flatten() {
        let wire = p["wire_bytes"].as_u64().or_else(|| p["fetch"]["wire_bytes"].as_u64());
        out.push_str(&format!(
            "\n  {:<14} {:>7.2} s{}",
            p["phase"].as_str().unwrap_or(""),
            p["seconds"].as_f64().unwrap_or(0.0),
            wire.map(|w| format!("  {}", mib(&json!(w)))).unwrap_or_default()
        ));
        if let Some(r) = p["rounds"].as_array() {
            out.push_str(&format!(" in {} rounds", r.len()));
        }
    }
    if let Some(port) = v["port"].as_u64() {
        out.push_str(&format!("\n  serving on the target's port {port}"));
    }
    out
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
