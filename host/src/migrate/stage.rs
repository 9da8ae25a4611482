//! The target of a migration, made ready before the guest stops.
//!
//! Restoring a saved guest through libvirt starts a QEMU first: here that
//! takes 0.4-0.8 s (libvirt reads back every CPU feature, one monitor
//! command each), and loading the state into memory touched for the first
//! time runs at about 1 GB/s. Done after the stop, both are downtime. So
//! once pre-copy has converged the source sends a *stage* request: the
//! target mounts the last pre-copy layer with a fresh upper layer, as it
//! will run the guest, and starts the guest's QEMU on it, paused, its
//! memory allocated, waiting for its state on a socket
//! ([`xenod_deployer::Libvirt::stage_incoming`]). After the stop only the
//! last writes and the state remain: the writes the final layer holds
//! over the staged one are written into the mount ([`apply_changes`]), and
//! the state is decoded and streamed into the waiting QEMU, which then
//! runs ([`finish`]).
//!
//! A stage lives as long as the source's connection: a source that goes
//! away, or a migration that ends another way, takes it down. A daemon
//! that dies with a stage leaves a QEMU that exits at the end of its
//! socket, and an instance directory marked [`MARKER`] that the next
//! start of the daemon removes ([`sweep`]).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};
use xenod_deployer::{Hypervisor, Incoming, LiveMigration, StagedGuest};
use xenod_store::{Extent, Kind, LayerId, Store, cmp_paths};

use super::record::{Record, instance_of, mount_instance, new_instance_dir, ports_here};
use super::state::{page_sources, stream_state};
use super::statepages::{self, Warm};
use crate::err;
use crate::error::{Context, Result};
use crate::instance::Instances;
use crate::instance::{self as deploy, Instance};

/// In a staged instance's directory until the guest runs there.
pub const MARKER: &str = "staged";

/// A staged instance: mounted on `layer`, its QEMU waiting.
#[derive(Debug)]
pub struct Staged {
    pub name: String,
    layer: LayerId,
    inst: Instance,
    qemu: Incoming,
    /// The pages the state most likely refers to, read ahead.
    warm: Warm,
}

/// The stage of one source connection; `closed` once it has gone, so a
/// stage finished after that is taken down at once.
#[derive(Debug, Default)]
pub struct Slot {
    staged: Option<Staged>,
    closed: bool,
}

pub type SharedSlot = Arc<Mutex<Slot>>;

fn lock(slot: &SharedSlot) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `staged` in `slot`, unless its connection has gone (then it is
/// taken down). One stage per connection: an earlier one is taken down.
pub fn keep(slot: &SharedSlot, instances: &Instances, store: &Store, staged: Staged) {
    let mut s = lock(slot);
    if s.closed {
        drop(s);
        undo(instances, store, staged);
        return;
    }
    if let Some(old) = s.staged.replace(staged) {
        drop(s);
        undo(instances, store, old);
    }
}

/// The stage of `name`, taken out of `slot`.
pub fn take(slot: &SharedSlot, name: &str) -> Option<Staged> {
    let mut s = lock(slot);
    if s.staged.as_ref().is_some_and(|st| st.name == name) { s.staged.take() } else { None }
}

/// The connection has gone: takes its stage down.
pub fn close(slot: &SharedSlot, instances: &Instances, store: &Store) {
    let staged = {
        let mut s = lock(slot);
        s.closed = true;
        s.staged.take()
    };
    if let Some(st) = staged {
        tracing::info!("the source of {} went away: taking its stage down", st.name);
        undo(instances, store, st);
    }
}

/// Takes a stage down: its QEMU, its mount and its directory.
pub fn undo(instances: &Instances, store: &Store, staged: Staged) {
    let Staged { name, qemu, .. } = staged;
    drop(qemu);
    if let Err(e) = instances.teardown(&name, store, false) {
        tracing::warn!("taking the stage of {name} down: {e:#}");
    }
}

/// Removes what a daemon that died left staged (run at start).
pub fn sweep(instances: &Instances, store: &Store) {
    let data = instances.data_dir();
    let Ok(dir) = fs::read_dir(instances.root()) else { return };
    for e in dir.flatten() {
        if !e.path().join(MARKER).exists() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        tracing::warn!("removing the stage of {name} left by an earlier run");
        let uri = Instance::load(data, &name).map_or_else(|_| xenod_deployer::default_uri(), |i| i.uri);
        remove(instances, store, &name, &uri);
    }
}

/// Powers off and undefines instance `name`'s domain and removes the
/// instance (its mount and directory).
fn remove(instances: &Instances, store: &Store, name: &str, uri: &str) {
    match (deploy::hypervisor(uri), Ok::<_, crate::Error>(instances.domain_name(name))) {
        (Ok(hv), Ok(domain)) => {
            let _ = hv.destroy(&domain);
        }
        (Err(e), _) | (_, Err(e)) => tracing::warn!("removing instance {name}'s domain: {e:#}"),
    }
    if let Err(e) = instances.teardown(name, store, false) {
        tracing::warn!("removing instance {name}: {e:#}");
    }
}

/// Mounts `layer` for `record`'s instance with a fresh upper layer and
/// starts its QEMU on it waiting for its state; `xml` is the domain as
/// the source runs it. Leaves nothing behind on failure.
pub fn stage(
    instances: &Instances,
    store: &Arc<Store>,
    layer: LayerId,
    record: &Record,
    xml: &str,
) -> Result<(Staged, Value)> {
    let data = instances.data_dir();
    let name = record.name.as_str();
    let dir = new_instance_dir(instances, name)?;
    let t = Instant::now();
    let r = (|| -> Result<(Instance, Incoming)> {
        fs::write(dir.join(MARKER), b"")?;
        let mut inst = instance_of(instances, record, layer)?;
        mount_instance(instances, store, &mut inst, layer)?;
        let moved = ports_here(record)?;
        xenod_deployer::move_host_ports(&mut inst.ports, &moved);
        let nets = crate::net::arrive(data, name, record.net.as_ref(), &mut inst.net)?;
        inst.save(data)?;
        let mut paths = vec![(format!("{}/", record.source_dir.display()), format!("{}/", dir.display()))];
        paths.extend(nets);
        let xml = xenod_deployer::retarget_xml(xml, inst.domain(), &xenod_deployer::random_uuid(), &paths, &moved)
            .map_err(|why| err!("the source's domain XML: {why}"))?;
        let hv = deploy::hypervisor(&inst.uri)?;
        let qemu = hv.stage_incoming(&xml)?;
        Ok((inst, qemu))
    })();
    match r {
        Ok((inst, qemu)) => {
            let started = t.elapsed().as_secs_f64();
            // What the guest wrote since it was deployed, up to its memory's
            // size: its page cache likely holds it.
            let below = store.layer_root(&layer).ok().and_then(|r| r.base);
            let cap = inst.spec.as_ref().map_or(0, |s| s.memory_mib as u64) << 20;
            let warm = statepages::warm(store, &layer, below.as_ref(), &page_sources(&inst), cap).unwrap_or_else(|e| {
                tracing::warn!("reading ahead the pages of {name}: {e:#}");
                Warm::new()
            });
            let info = json!({ "domain": qemu.name(), "seconds": t.elapsed().as_secs_f64(),
                               "start_seconds": started, "read_ahead_bytes": warm.values().map(|v| v.len()).sum::<usize>() });
            Ok((Staged { name: name.to_owned(), layer, inst, qemu, warm }, info))
        }
        Err(e) => {
            let _ = instances.teardown(name, store, false);
            Err(e)
        }
    }
}

/// Runs the staged guest on `layer` (the source's final commit, whose
/// chunks are all here) from its saved `state`: writes what `layer`
/// changed over the staged layer into the mount, decodes the state and
/// loads it into the waiting QEMU. `Ok(Err(staged))`: `layer` changes more
/// than file contents; the stage is handed back untouched. Takes the stage
/// down on failure.
pub fn finish(
    instances: &Instances,
    store: &Arc<Store>,
    staged: Staged,
    layer: LayerId,
    state: LayerId,
    restoring: &dyn Fn(),
) -> Result<std::result::Result<Value, Staged>> {
    let data = instances.data_dir();
    let mut steps = serde_json::Map::new();
    let t = Instant::now();
    let root = staged.inst.mountpoint(data);
    let written = match apply_changes(store, &staged.layer, &layer, &root) {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(Err(staged)),
        Err(e) => {
            undo(instances, store, staged);
            return Err(e.context("writing the last changes into the staged mount"));
        }
    };
    steps.insert("write_seconds".into(), json!(t.elapsed().as_secs_f64()));
    let Staged { name, layer: staged_layer, inst, qemu, warm } = staged;
    let r = (|| -> Result<Value> {
        let t = Instant::now();
        let mut qemu = qemu;
        stream_state(store, &state, &layer, &mut qemu, &warm)?;
        drop(warm);
        steps.insert("state_seconds".into(), json!(t.elapsed().as_secs_f64()));
        restoring();
        crate::hooks::fail("restore")?;
        let hv = deploy::hypervisor(&inst.uri)?;
        let load = hv.finish_incoming(qemu)?;
        steps.insert("restore_seconds".into(), json!(load.as_secs_f64()));
        inst.save(data)?;
        fs::remove_file(inst.dir(data).join(MARKER))?;
        Ok(json!({ "name": name, "domain": inst.domain(), "layer": staged_layer.to_string(),
                   "port": inst.ports.first().map(|p| p.host), "staged": true, "bytes_written": written,
                   "steps": Value::Object(steps.clone()) }))
    })();
    if r.is_err() {
        remove(instances, store, &name, &inst.uri);
    }
    r.map(Ok)
}

/// Writes into the mounted tree `root` (whose lower layer is `from`) what
/// layer `to` holds differently, where both are commits of one instance's
/// upper layer over the same stack: the runs of files whose chunks
/// differ, and their sizes and times. Returns the bytes written, or
/// `None`, having written nothing, when `to` differs in more than file
/// contents (a path added, removed, or of another kind, owner, mode or
/// attributes): the caller then restores the usual way. The layers are
/// walked in step, once to check and once to write.
pub fn apply_changes(store: &Store, from: &LayerId, to: &LayerId, root: &Path) -> Result<Option<u64>> {
    if store.layer_root(from)?.base != store.layer_root(to)?.base {
        return Ok(None);
    }
    let mut written = 0u64;
    for write in [false, true] {
        let mut old = store.read_layer(from)?;
        for n in store.read_layer(to)? {
            let n = n?;
            let Some(o) = old.next().transpose()? else { return Ok(None) };
            if o == n {
                continue;
            }
            let same = cmp_paths(&o.path, &n.path).is_eq()
                && (o.mode, o.uid, o.gid, &o.xattrs) == (n.mode, n.uid, n.gid, &n.xattrs);
            let (Kind::File { extents: ox, .. }, Kind::File { size, extents: nx, .. }, true) = (&o.kind, &n.kind, same)
            else {
                return Ok(None);
            };
            if !write {
                continue;
            }
            let path = root.join(std::ffi::OsStr::from_bytes(&n.path));
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            written += write_runs(store, ox, nx, &f).with_context(|| format!("writing {}", path.display()))?;
            f.set_len(*size).with_context(|| format!("resizing {}", path.display()))?;
            let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(n.mtime.secs.max(0) as u64, n.mtime.nanos);
            f.set_modified(mtime).with_context(|| format!("setting the time of {}", path.display()))?;
        }
        if old.next().is_some() {
            return Ok(None);
        }
    }
    Ok(Some(written))
}

/// Writes into `f` (holding `old`) the runs where `new` differs; zeros
/// only where `old` had data.
fn write_runs(store: &Store, old: &[Extent], new: &[Extent], f: &fs::File) -> Result<u64> {
    // (start, extent) of the old file, in order.
    let mut at = 0u64;
    let old: Vec<(u64, Extent)> = old
        .iter()
        .map(|x| {
            let s = at;
            at += x.len();
            (s, *x)
        })
        .collect();
    let overlapping = |s: u64, e: u64| {
        let first = old.partition_point(|(o, x)| o + x.len() <= s);
        old[first..].iter().take_while(move |(o, _)| *o < e)
    };
    let zeros = vec![0u8; 1 << 20];
    let (mut at, mut written) = (0u64, 0u64);
    for x in new {
        let (s, e) = (at, at + x.len());
        at = e;
        if old.binary_search_by_key(&s, |(o, _)| *o).is_ok_and(|i| old[i].1 == *x) {
            continue;
        }
        match x {
            Extent::Data { id, .. } => {
                let bytes = store.get(id)?;
                f.write_all_at(&bytes, s)?;
                written += bytes.len() as u64;
            }
            Extent::Hole { .. } => {
                for (o, y) in overlapping(s, e) {
                    if let Extent::Data { .. } = y {
                        let (mut p, end) = ((*o).max(s), (o + y.len()).min(e));
                        while p < end {
                            let n = (end - p).min(zeros.len() as u64) as usize;
                            f.write_all_at(&zeros[..n], p)?;
                            (p, written) = (p + n as u64, written + n as u64);
                        }
                    }
                }
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use xenod_store::testing::noise;
    use xenod_store::{Chunking, Entry, LayerWriter, Timestamp};

    use super::*;

    const B: usize = 65536;

    /// One commit of an upper layer holding `disk/root.img` of `blocks`
    /// (`None`: a hole) over `base`, and `etc/extra` when `extra`.
    fn commit(store: &Store, base: LayerId, blocks: &[Option<u64>], extra: bool) -> (LayerId, Vec<u8>) {
        let (mut image, mut extents) = (Vec::new(), Vec::new());
        for b in blocks {
            match b {
                Some(seed) => {
                    let block = noise(B, *seed);
                    extents.push(Extent::Data { id: store.put(&block).unwrap().0, len: B as u32 });
                    image.extend_from_slice(&block);
                }
                None => {
                    extents.push(Extent::Hole { len: B as u64 });
                    image.resize(image.len() + B, 0);
                }
            }
        }
        let mut w = LayerWriter::new(store);
        w.push(&Entry::dir(Vec::new())).unwrap();
        w.push(&Entry::dir(b"disk".to_vec())).unwrap();
        w.push(&Entry {
            path: b"disk/root.img".to_vec(),
            kind: Kind::File { size: image.len() as u64, chunking: Chunking::Fixed, extents },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp { secs: 1_700_000_000 + blocks.len() as i64, nanos: 0 },
            xattrs: vec![],
        })
        .unwrap();
        if extra {
            w.push(&Entry::dir(b"etc".to_vec())).unwrap();
        }
        (w.finish(Some(base), BTreeMap::new()).unwrap(), image)
    }

    #[test]
    fn writes_only_the_blocks_that_differ_and_refuses_more_than_contents() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let mut w = LayerWriter::new(&store);
        w.push(&Entry::dir(Vec::new())).unwrap();
        let base = w.finish(None, BTreeMap::new()).unwrap();
        let (old, old_bytes) = commit(&store, base, &[Some(1), Some(2), None, Some(4), Some(5)], false);
        // Block 1 rewritten, the hole filled, block 4 now a hole, one more
        // block at the end.
        let (new, new_bytes) = commit(&store, base, &[Some(1), Some(12), Some(13), Some(4), None, Some(16)], false);
        let root = t.path().join("root");
        fs::create_dir_all(root.join("disk")).unwrap();
        let img = root.join("disk/root.img");
        fs::write(&img, &old_bytes).unwrap();
        let n = apply_changes(&store, &old, &new, &root).unwrap();
        // Two data blocks, one block of zeros over old data, one new block.
        assert_eq!(n, Some(4 * B as u64));
        assert!(fs::read(&img).unwrap() == new_bytes, "the tree now holds the new layer's file");
        let mtime = fs::metadata(&img).unwrap().modified().unwrap();
        assert_eq!(mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_700_000_006);
        // Nothing to do between equal commits.
        assert_eq!(apply_changes(&store, &new, &new, &root).unwrap(), Some(0));
        // A path added, or another base: not contents alone.
        let (more, _) = commit(&store, base, &[Some(1)], true);
        assert_eq!(apply_changes(&store, &new, &more, &root).unwrap(), None);
        let (other, _) = commit(&store, old, &[Some(1)], false);
        assert_eq!(apply_changes(&store, &new, &other, &root).unwrap(), None);
        assert!(fs::read(&img).unwrap() == new_bytes, "refused changes write nothing");
    }
}
