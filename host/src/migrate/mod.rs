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
//! Phases ([`policy`]: one method each, one failure policy; a failure is
//! [`crate::Error::Migration`], naming its phase and where the guest runs):
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
//! The wire ([`wire`]): ALPN [`ALPN`] on the daemon's endpoint, one typed
//! request per bi-stream, typed answer lines. The order of the submodules
//! is in the crate's map (`host/src/lib.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use xenod_cowfs::CommitCache;
use xenod_deployer::{Hypervisor, RootMode};
use xenod_peer::events::EventKind;
use xenod_peer::parse_peer;
use xenod_store::{Dense, Exit, LayerId, LayerWriter};

use self::local::LocalChanges;
use self::policy::{Guest, Migration, Plan, Target, blocking, check_level, save_guest};
use self::record::{now, record_of};
use self::state::{Transient, data_chunks, page_sources, state_layer};
use self::statepages::PageHashes;
use self::wire::RemoteTarget;
use crate::daemon::Daemon;
pub use crate::error::Phase;
use crate::error::{Context, Error, Result};
use crate::instance::{self as deploy, Instance};
use crate::usage::upper_bytes;
use crate::{bail, err};

mod local;
pub mod policy;
pub mod record;
pub mod report;
pub mod stage;
mod state;
pub mod statepages;
mod target;
pub mod wire;

pub use record::{Record, SaveMode};
pub use report::{MigrationReport, PhaseReport};
pub use target::Handler;
pub use wire::ALPN;

/// Layer metadata of a checkpoint: its state layer and instance record.
const META_STATE: &str = "checkpoint-state";
const META_RECORD: &str = "instance-record";

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

/// `xenod migrate NAME --to PEER [--cold | --live | --save] [--level N]`:
/// checks what is asked, then runs the migration's phases ([`policy`]).
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
    let to_node = target.id.to_string();
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
        LocalChanges::new(store, d.instances(), inst.clone(), cold),
        RemoteTarget::new(d.clone(), target.clone()),
        Guest {
            domain: inst.domain().to_owned(),
            record: record_of(&data, &inst),
            mounted: inst.mounted(),
            need_bytes: need,
        },
        plan,
    );
    let report = crate::daemon::usage::while_migrating(d, name, migration.run()).await;
    d.migrated(report.as_ref().ok().map(|r| (r.wire_bytes, r.downtime_seconds)));
    let report = report?;
    carry_usage(d, &target, name).await;
    d.instances().event(EventKind::InstanceMigrated { instance: name.to_owned(), to: to_node });
    Ok(serde_json::to_value(report)?)
}

/// Sends what migrated instance `name` used here to its new host, then
/// forgets it here. A target that cannot take it leaves it here (logged):
/// nothing is lost, it is only billed from this host's ledger.
async fn carry_usage(d: &Arc<Daemon>, target: &xenod_peer::EndpointAddr, name: &str) {
    let Some(acc) = d.usage.get().cloned() else { return };
    let (a, n) = (acc.clone(), name.to_owned());
    // Its last samples were taken while it migrated (`while_migrating`).
    let h = match tokio::task::spawn_blocking(move || a.ledger.export(&n)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::warn!("{name}'s usage stays here: {}", e.chain()),
        Err(e) => return tracing::warn!("{name}'s usage stays here: {e}"),
    };
    match wire::send_usage(d, target, name, h).await {
        Ok(()) => {
            let n = name.to_owned();
            let _ = tokio::task::spawn_blocking(move || acc.ledger.forget(&n)).await;
        }
        Err(e) => tracing::warn!("{name}'s usage stays here (the target did not take it): {}", e.chain()),
    }
}

/// `xenod checkpoint NAME`: the guest's upper layer and saved state as a
/// layer (pinned); the guest runs on.
pub async fn checkpoint(d: &Arc<Daemon>, name: &str, label: Option<String>) -> Result<Value> {
    let data = d.data_dir().to_path_buf();
    let store = d.store_arc();
    let inst = Instance::load(&data, name).map_err(|e| Error::coded(Exit::NotFound, e.chain()))?;
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
        crate::config::record_name_in(&data, &store, &l, Some(id))?;
    }
    Ok(serde_json::to_value(report::Checkpoint {
        checkpoint: id.to_string(),
        state: state.to_string(),
        instance: name.to_owned(),
        new_chunks: store.chunk_count()?.saturating_sub(before),
        state_chunks: data_chunks(&store, &state)?,
        live: live.is_some(),
        paused_seconds: paused,
        seconds: t.elapsed().as_secs_f64(),
    })?)
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
            let store = store.clone();
            let instances = d.instances().clone();
            if let Some(spec) = &record.spec {
                instances.admit(&record.name, &crate::admission::Ask::of(spec), None)?;
            }
            let name = record.name.clone();
            let v = blocking(move || target::adopt(&instances, &store, id, Some(state), &record, &|| {})).await?;
            d.instances().event(EventKind::InstanceStarted { instance: name });
            let restored = serde_json::from_value(v).context("the restored instance's report")?;
            Ok(serde_json::to_value(report::Restore { restored, on: "here".into(), fetch: None })?)
        }
        Some(peer) => {
            let target = parse_peer(peer).map_err(|e| Error::coded(Exit::BadInput, format!("--on: {e}")))?;
            let mut t = RemoteTarget::new(d.clone(), target);
            let need = record.spec.as_ref().map_or(512, |s| s.memory_mib as u64) << 20;
            t.prepare(&record, id, need).await.context("prepare")?;
            let rep = t.resume(id, Some(state), &record, &mut false).await.context("resume")?;
            Ok(serde_json::to_value(report::Restore {
                restored: rep.instance,
                on: peer.to_owned(),
                fetch: Some(rep.fetch),
            })?)
        }
    }
}
