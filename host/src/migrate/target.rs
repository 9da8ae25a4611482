//! The target's side of a migration: the protocol handler on the daemon's
//! endpoint, each request's work, and a guest adopted from its committed
//! upper layer and saved state.

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xenod_deployer::{DomainModel, Hypervisor, LiveMigration};
use xenod_peer::iroh::endpoint::{Connection, RecvStream, SendStream};
use xenod_peer::iroh::protocol::{AcceptError, ProtocolHandler};
use xenod_peer::{FetchOptions, parse_peer};
use xenod_store::{Dense, LayerId, Store};

use super::policy::{FINAL_CODEC, check_level};
use super::policy::{FetchReply, PRECOPY_CODEC, ResumeReply};
use super::record::{Record, free_bytes, instance_of, mount_instance, new_instance_dir, ports_here};
use super::stage;
use super::state::{Transient, export_state, state_xml, stream_state};
use super::statepages::Warm;
use super::wire::{ALIVE_EVERY, Reply, Wire};
use crate::config::Config;
use crate::daemon::Daemon;
use crate::error::{Context, Error, Result};
use crate::instance as deploy;
use crate::instance::Instances;
use crate::{bail, err};

/// Serves [`super::ALPN`] for the daemon once it is up.
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
        let (instances, store) = (d.instances().clone(), d.store_arc());
        let _ = tokio::task::spawn_blocking(move || stage::close(&slot, &instances, &store)).await;
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
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
            Some(r) = rx.recv() => send.write_all(r.line().as_bytes()).await?,
            _ = alive.tick() => send.write_all(Reply::Alive { alive: true }.line().as_bytes()).await?,
        }
    };
    while let Ok(r) = rx.try_recv() {
        send.write_all(r.line().as_bytes()).await?;
    }
    let r = match result {
        Ok(v) => Reply::Done { ok: true, result: v, error: None },
        Err(e) => Reply::Done { ok: false, result: Value::Null, error: Some(format!("{e:#}")) },
    };
    send.write_all(r.line().as_bytes()).await?;
    send.finish().ok();
    // Let the peer read the answer before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    Ok(())
}

async fn target_op(
    d: &Arc<Daemon>,
    req: Wire,
    slot: &stage::SharedSlot,
    tx: tokio::sync::mpsc::UnboundedSender<Reply>,
) -> Result<Value> {
    match req {
        Wire::Prepare { instance, mounted, source, need_bytes, ask } => {
            xenod_deployer::validate_name(&instance)?;
            if d.instances().dir(&instance).exists() {
                bail!("an instance named {instance:?} already exists on this host");
            }
            // Refused here, the guest runs on at the source.
            if let Some(ask) = ask {
                let instances = d.instances().clone();
                let what = instance.clone();
                tokio::task::spawn_blocking(move || instances.admit(&what, &ask, None)).await??;
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
            Ok(serde_json::to_value(fetch(d, mounted, &source, None).await?)?)
        }
        Wire::Sync { layer, source, last, level } => {
            test_hook(if last { "stop-and-copy" } else { "pre-copy" });
            let codec = if last { FINAL_CODEC } else { level.unwrap_or(PRECOPY_CODEC) };
            check_level(codec).map_err(|why| err!("pre-copy {why}"))?;
            Ok(serde_json::to_value(fetch(d, layer, &source, Some(codec)).await?)?)
        }
        Wire::Resume { layer, state, record, source } => {
            let arrived = record.name.clone();
            let mut rep = fetch(d, layer, &source, Some(FINAL_CODEC)).await?;
            if let Some(s) = state {
                rep.add(&fetch(d, s, &source, Some(FINAL_CODEC)).await?);
            }
            let (instances, store) = (d.instances().clone(), d.store_arc());
            let t = Instant::now();
            let staged = stage::take(slot, &record.name);
            let adopted = tokio::task::spawn_blocking(move || {
                let restoring = || {
                    let _ = tx.send(Reply::Restoring { restoring: true });
                };
                if let (Some(st), Some(s)) = (staged, state) {
                    match stage::finish(&instances, &store, st, layer, s, &restoring)? {
                        Ok(v) => return Ok(v),
                        // More changed than file contents: the usual way.
                        Err(st) => stage::undo(&instances, &store, st),
                    }
                }
                adopt(&instances, &store, layer, state, &record, &restoring)
            })
            .await??;
            d.instances().event(xenod_peer::events::EventKind::InstanceStarted { instance: arrived });
            let instance = serde_json::from_value(adopted).context("the adopted instance's report")?;
            Ok(serde_json::to_value(ResumeReply { fetch: rep, instance, resume_seconds: t.elapsed().as_secs_f64() })?)
        }
        Wire::Stage { layer, record, xml } => {
            let (instances, store, slot) = (d.instances().clone(), d.store_arc(), slot.clone());
            tokio::task::spawn_blocking(move || {
                let (staged, info) = stage::stage(&instances, &store, layer, &record, &xml)?;
                stage::keep(&slot, &instances, &store, staged);
                Ok(info)
            })
            .await?
        }
        Wire::Deploy { layer, source, options } => {
            let fetched = fetch_stack(d, layer, &source).await?;
            let (instances, mut o) = (d.instances().clone(), *options);
            (o.verbose, o.lazy) = (false, false);
            if o.owner.is_none() {
                let asker = source.split_once('@').map_or(source.as_str(), |(n, _)| n);
                o.owner = Some(format!("node:{asker}"));
            }
            let v = tokio::task::spawn_blocking(move || instances.deploy(&layer.to_string(), &o)).await??;
            if let Some(e) = v["errors"].as_array().and_then(|e| e.first()) {
                bail!("deploying here: {}", e.as_str().unwrap_or("failed"));
            }
            Ok(json!({ "fetch": fetched, "deploy": v }))
        }
        Wire::Usage { instance, history } => {
            let Some(acc) = d.usage.get().cloned() else {
                bail!("this host keeps no usage (an embedded engine); the source keeps {instance}'s");
            };
            tokio::task::spawn_blocking(move || acc.ledger.import(&instance, &history)).await??;
            Ok(json!({ "kept": true }))
        }
        Wire::Abort { instance } => {
            // Only what a failed resume could have left: adopt cleans up
            // after itself, so normally there is nothing.
            if let Some(st) = stage::take(slot, &instance) {
                let (instances, store) = (d.instances().clone(), d.store_arc());
                tokio::task::spawn_blocking(move || stage::undo(&instances, &store, st)).await?;
            }
            let dir = d.instances().dir(&instance);
            Ok(json!({ "aborted": instance, "left": dir.exists() }))
        }
    }
}

/// Fetches `layer`'s stack from the migration's source (and the default
/// peers); `dense`: ask for every chunk in solid frames made by that codec.
async fn fetch(d: &Daemon, layer: LayerId, source: &str, dense: Option<Dense>) -> Result<FetchReply> {
    let mut providers = vec![parse_peer(source).map_err(|e| err!("source address {source}: {e}"))?];
    for p in d.default_peers() {
        if !providers.iter().any(|q| q.id == p.id) {
            providers.push(p);
        }
    }
    let opts = FetchOptions { dense, ..FetchOptions::default() };
    Ok(reply_of(layer, d.node().fetch(layer, &providers, opts).await?))
}

fn reply_of(layer: LayerId, rep: xenod_peer::FetchReport) -> FetchReply {
    FetchReply {
        layer: Some(layer),
        chunks_fetched: rep.chunks_fetched,
        bytes: rep.bytes,
        wire_bytes: rep.wire_bytes,
        elapsed_ms: rep.elapsed_ms,
    }
}

/// Fetches `layer`'s stack from `source`, the nodes that announced it and
/// the default peers; only what this host lacks travels.
async fn fetch_stack(d: &Daemon, layer: LayerId, source: &str) -> Result<FetchReply> {
    let mut providers = d.node().providers_of(&layer);
    providers.push(parse_peer(source).map_err(|e| err!("source address {source}: {e}"))?);
    for p in d.default_peers() {
        if !providers.iter().any(|q| q.id == p.id) {
            providers.push(p);
        }
    }
    let rep = d.node().fetch(layer, &providers, FetchOptions::default()).await?;
    d.node().publish_event(xenod_peer::events::EventKind::LayerComplete { layer: layer.to_string() }).await;
    d.warm_file_cache(layer);
    Ok(reply_of(layer, rep))
}

/// Test hook: `XENOD_TEST_MIGRATE_DIE=PHASE` makes a target daemon kill
/// itself (SIGKILL) when a request of that phase arrives ([`crate::hooks`]).
fn test_hook(phase: &str) {
    if crate::hooks::var("XENOD_TEST_MIGRATE_DIE").is_some_and(|p| p == phase) {
        tracing::error!("XENOD_TEST_MIGRATE_DIE={phase}: killing this daemon");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Runs `record`'s instance here on the committed upper `layer` (all of
/// whose chunks are local): mounts it with a fresh upper layer, then
/// restores the saved state of `state`, or boots it when there is none.
/// Leaves nothing behind on failure.
pub(super) fn adopt(
    instances: &Instances,
    store: &Arc<Store>,
    layer: LayerId,
    state: Option<LayerId>,
    record: &Record,
    restoring: &dyn Fn(),
) -> Result<Value> {
    let data = instances.data_dir();
    let name = record.name.as_str();
    let dir = new_instance_dir(instances, name)?;
    let domain = instances.domain_name(name);
    let mut inst = instance_of(instances, record, layer)?;
    let uri = inst.uri.clone();
    let undo = |started: bool| {
        if started && let Ok(hv) = deploy::hypervisor(&uri) {
            let _ = hv.destroy(&domain);
        }
        let _ = instances.teardown(name, store, false);
    };
    let mut steps = serde_json::Map::new();
    let mut step = |k: &str, t: Instant| {
        steps.insert(k.into(), json!(t.elapsed().as_secs_f64()));
    };
    let r = (|| -> Result<Value> {
        let t = Instant::now();
        mount_instance(instances, store, &mut inst, layer)?;
        step("mount_seconds", t);
        let hv = deploy::hypervisor(&inst.uri)?;
        let mut staged = false;
        match state {
            Some(s) => {
                let t = Instant::now();
                let mut paths = vec![(format!("{}/", record.source_dir.display()), format!("{}/", dir.display()))];
                paths.extend(crate::net::arrive(data, name, record.net.as_ref(), &mut inst.net)?);
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
                crate::hooks::fail("restore")?;
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
                crate::net::arrive(data, name, record.net.as_ref(), &mut inst.net)?;
                if let Some(n) = &inst.net {
                    n.add_to(&mut model);
                }
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
