//! Instances: the instance model and its lifecycle (deploy, ps, stop,
//! start, destroy, logs, suspend, resume, commit).
//!
//! An instance lives in `DATA_DIR/instances/NAME/`:
//!
//! ```text
//! instance.json   what was deployed: layers, domain, ports, mount
//! root/           the cowfs mount: stack + instance layer + upper
//! upper/          the instance's private writable layer
//! console.log     the guest's serial console
//! mount.log       the filesystem process's own log
//! state.save      a suspended guest's saved machine state
//! mount.ctl       the filesystem's control socket (dirty tracking, for migration)
//! ```
//!
//! The libvirt domain is named after the instance, prefixed by the
//! config's `domain_prefix` where several daemons share one libvirt.
//!
//! Per-instance settings (the instance name) travel as a tiny layer of
//! their own on top of the deployed stack, so replicas share every other
//! layer. The instance layer is pinned while the instance exists.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use xenod_deployer::{
    DeploySpec, DomainModel, GUEST_READY_LINE, Hypervisor, Libvirt, PortForward, RootMode, SpecOverrides, default_uri,
    wait_console, wait_http,
};
use xenod_store::{Entry, LayerId, LayerWriter, Merged, Store, cmp_paths};

use crate::admission::{Ask, Capacity};
use crate::api::Request;
use crate::config::Config;
use crate::error::{Context, Error, Result};
use crate::{bail, err};
use xenod_peer::events::EventKind;
use xenod_store::Exit;

pub mod limit;
pub mod mount;

/// Metadata key of a layer's deploy spec (JSON).
pub const SPEC_KEY: &str = "deploy";
const INSTANCE_FILE: &[u8] = b"etc/xenod/instance";

/// How to deploy a stack (the deploy spec's overrides and the wait); it
/// travels to the host placement chooses (`migrate::Wire::Deploy`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployOptions {
    /// Instance name [default: the spec's, else derived from the layer].
    pub name: Option<String>,
    /// Start N instances sharing the cached layers (NAME-1 .. NAME-N).
    pub replicas: u32,
    /// libvirt connection [default: `default_uri()`].
    pub uri: Option<String>,
    pub root: Option<RootMode>,
    /// MiB.
    pub memory: Option<u32>,
    pub ports: Vec<PortForward>,
    pub cmdline: Option<String>,
    /// How long to wait for the guest's service to answer.
    pub timeout: Duration,
    /// Return once the guest is started, without waiting for its service.
    pub no_wait: bool,
    /// The stack is not all here yet: the mount fetches missing chunks
    /// through the daemon.
    pub lazy: bool,
    /// Print each step's time on stderr as it happens.
    #[serde(skip)]
    pub verbose: bool,
    /// Limits over the spec's (see `xenod_deployer::Limits`).
    #[serde(default)]
    pub limits: xenod_deployer::Limits,
    /// Drop the limits this host cannot apply (and say which) rather than
    /// refuse the deploy.
    #[serde(default)]
    pub best_effort: bool,
    /// An environment to put the guest on besides its user-mode NIC.
    #[serde(default)]
    pub net: Option<String>,
    /// Who deploys it [default: this host's publisher key, else its node].
    #[serde(default)]
    pub owner: Option<String>,
}

/// What `instance.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    /// The deployed stack's top layer.
    pub top: LayerId,
    /// The per-instance layer on top of it.
    pub layer: LayerId,
    pub uri: String,
    pub root: RootMode,
    pub ports: Vec<PortForward>,
    pub mount_pid: Option<u32>,
    pub created: u64,
    /// The top of the mounted stack when it is not `layer`: an instance
    /// that arrived by migration or from a checkpoint runs on its upper
    /// layer as committed there.
    #[serde(default)]
    pub mounted: Option<LayerId>,
    /// The libvirt domain name, when not the instance name.
    #[serde(default)]
    pub domain: Option<String>,
    /// The spec it was deployed with (overrides applied).
    #[serde(default)]
    pub spec: Option<DeploySpec>,
    /// Mounted before its stack was all here: missing chunks come through
    /// the daemon.
    #[serde(default)]
    pub lazy: bool,
    /// Its NIC on an environment, if it has one (see `net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::Attach>,
    /// Who deployed it (`key:HEX` of the publisher key, or `node:ID` of the
    /// host that asked), for accounting.
    #[serde(default)]
    pub owner: Option<String>,
}

/// The instances of one host's data directory: where their files are,
/// what their domains are called, and their lifecycle. Everything that
/// acts on instances goes through this handle; it reads `config.toml` once.
#[derive(Clone, Debug)]
pub struct Instances {
    data: PathBuf,
    /// Prefixed to every domain name, where several daemons share one
    /// libvirt (the config's `domain_prefix`).
    domain_prefix: String,
    events: EventSink,
    /// What this host offers guests (the config's `[capacity]`).
    offer: crate::config::Capacity,
    /// Bound of the store's file cache for instance mounts (the config's
    /// `file_cache_bytes`); none: cowfs's default.
    file_cache_bytes: Option<u64>,
}

/// Where the lifecycle events of a host's instances go (deployed,
/// started, stopped, destroyed, migrated): to the host's daemon, which
/// publishes them to the federation. A command run without a daemon has
/// nobody to tell, and its events are not published.
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn(EventKind) + Send + Sync>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

impl EventSink {
    pub fn new(f: impl Fn(EventKind) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Events sent to the daemon of `data` over its socket, if one runs.
    fn to_daemon(data: &Path) -> Self {
        let data = data.to_path_buf();
        Self::new(move |kind| crate::api::tell_daemon(&data, &Request::Event { event: kind }))
    }
}

impl Instances {
    /// The instances of `data`. A `config.toml` that cannot be read is an
    /// error, not an empty domain prefix: daemons that share one libvirt
    /// would otherwise address each other's domains.
    pub fn open(data: &Path) -> Result<Self> {
        Ok(Self::with_config(data, &Config::load(data).context("the domain prefix")?))
    }

    /// The instances of `data`, whose `config.toml` is `config`.
    pub fn with_config(data: &Path, config: &Config) -> Self {
        Self {
            data: data.to_path_buf(),
            domain_prefix: config.domain_prefix.clone(),
            events: EventSink::to_daemon(data),
            offer: config.capacity.clone().unwrap_or_default(),
            file_cache_bytes: config.file_cache_bytes,
        }
    }

    /// What this host offers, and what its instances hold but `except`'s:
    /// those that run, are paused, or whose state the hypervisor cannot
    /// tell (see `admission`).
    pub fn capacity(&self, except: Option<&str>) -> Capacity {
        self.capacity_of(&self.list().unwrap_or_default(), except)
    }

    /// The same, from instances listed with their states.
    pub fn capacity_of(&self, listed: &[(Instance, String)], except: Option<&str>) -> Capacity {
        let mut held = Ask::default();
        let mut holders = 0;
        for (inst, state) in listed {
            if Some(inst.name.as_str()) == except || matches!(state.as_str(), "shut off" | "suspended" | "crashed") {
                continue;
            }
            if let Some(spec) = &inst.spec {
                held = held.plus(Ask::of(spec));
                holders += 1;
            }
        }
        Capacity::of(&self.offer, held, holders)
    }

    /// Refuses (exit 9) what does not fit what is free.
    pub fn admit(&self, what: &str, ask: &Ask, except: Option<&str>) -> Result<()> {
        self.capacity(except).admit(what, ask)
    }

    /// The same instances, their events going to `sink` (the daemon's own
    /// handle publishes them directly).
    pub fn with_events(mut self, sink: EventSink) -> Self {
        self.events = sink;
        self
    }

    /// Reports a lifecycle event of an instance of this host.
    pub fn event(&self, kind: EventKind) {
        (self.events.0)(kind);
    }

    /// Who deploys here when nobody else is named: `key:HEX` of the
    /// publisher key if this host has one, else `node:ID`.
    pub fn default_owner(&self) -> String {
        if let Ok(Some(k)) = crate::config::load_key(&self.data) {
            return format!("key:{}", xenod_store::hex(&k.verifying_key().to_bytes()));
        }
        match crate::config::node_secret(&self.data) {
            Ok(s) => format!("node:{}", xenod_peer::iroh::SecretKey::from_bytes(&s).public()),
            Err(_) => "unknown".into(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `DATA_DIR/instances`.
    pub fn root(&self) -> PathBuf {
        self.data.join("instances")
    }

    /// The directory of instance `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// The libvirt domain name of instance `name` on this host.
    pub fn domain_name(&self, name: &str) -> String {
        format!("{}{name}", self.domain_prefix)
    }

    /// The record of instance `name`.
    pub fn load(&self, name: &str) -> Result<Instance> {
        Instance::load(&self.data, name)
    }

    /// The hypervisor at `uri` (an instance's, as recorded).
    pub fn hypervisor(&self, uri: &str) -> Result<Libvirt> {
        hypervisor(uri)
    }
}

fn instance_dir(data: &Path, name: &str) -> PathBuf {
    data.join("instances").join(name)
}

pub fn pin_label(name: &str) -> String {
    format!("instance:{name}")
}

impl Instance {
    pub fn load(data: &Path, name: &str) -> Result<Self> {
        let p = instance_dir(data, name).join("instance.json");
        let s = fs::read(&p).with_context(|| format!("no instance {name:?} here (reading {})", p.display()))?;
        serde_json::from_slice(&s).with_context(|| format!("{} does not parse", p.display()))
    }

    pub fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or(&self.name)
    }

    /// The top of the stack under the upper directory.
    pub fn mounted(&self) -> LayerId {
        self.mounted.unwrap_or(self.layer)
    }

    pub fn dir(&self, data: &Path) -> PathBuf {
        instance_dir(data, &self.name)
    }

    pub fn control(&self, data: &Path) -> PathBuf {
        self.dir(data).join("mount.ctl")
    }

    pub fn save(&self, data: &Path) -> Result<()> {
        let dir = instance_dir(data, &self.name);
        let tmp = dir.join("instance.json.tmp");
        let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join("instance.json")).with_context(|| format!("writing {}", dir.display()))
    }

    pub fn mountpoint(&self, data: &Path) -> PathBuf {
        instance_dir(data, &self.name).join("root")
    }

    pub fn upper(&self, data: &Path) -> PathBuf {
        instance_dir(data, &self.name).join("upper")
    }
}

/// The deploy spec carried by the topmost layer of the stack that has one.
pub fn stack_spec(store: &Store, top: &LayerId) -> Result<Option<DeploySpec>> {
    for id in store.stack(top)?.iter().rev() {
        if let Some(s) = store.layer_root(id)?.meta.get(SPEC_KEY) {
            return Ok(Some(DeploySpec::from_json(s).with_context(|| format!("deploy spec of layer {id}"))?));
        }
    }
    Ok(None)
}

/// A step of the deployment timeline.
struct Timeline {
    t0: Instant,
    last: Instant,
    steps: Vec<(String, Duration)>,
    quiet: bool,
}

impl Timeline {
    fn new(quiet: bool) -> Self {
        let now = Instant::now();
        Self { t0: now, last: now, steps: Vec::new(), quiet }
    }

    fn step(&mut self, what: &str) {
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        if !self.quiet {
            eprintln!("  {:>7.3}s  +{:>6.3}s  {what}", (now - self.t0).as_secs_f64(), d.as_secs_f64());
        }
        self.steps.push((what.to_string(), d));
    }

    fn json(&self) -> serde_json::Value {
        json!(self.steps.iter().map(|(s, d)| json!({"step": s, "seconds": d.as_secs_f64()})).collect::<Vec<_>>())
    }
}

pub fn hypervisor(uri: &str) -> Result<Libvirt> {
    Ok(Libvirt::connect(uri)?)
}

/// Undoes a half-done deploy: no domain, mount or upper is left behind.
pub struct Cleanup {
    instances: Instances,
    name: String,
    domain: String,
    store: Arc<Store>,
    uri: Option<String>,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(uri) = &self.uri
            && let Ok(hv) = hypervisor(uri)
        {
            let _ = hv.destroy(&self.domain);
        }
        let _ = self.instances.teardown(&self.name, &self.store, false);
    }
}

/// Builds the per-instance layer: `/etc/xenod/instance` with the name,
/// under directories that keep the stack's own metadata.
fn instance_layer(store: &Store, top: &LayerId, name: &str, extra: &str) -> Result<LayerId> {
    let dirs: [&[u8]; 3] = [b"", b"etc", b"etc/xenod"];
    let mut found: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    for e in Merged::of(store, top)? {
        let e = e?;
        if cmp_paths(&e.path, INSTANCE_FILE) == std::cmp::Ordering::Greater {
            break;
        }
        if dirs.contains(&e.path.as_slice()) {
            found.insert(e.path.clone(), e);
        }
    }
    let content = format!("name={name}\n{extra}");
    let (id, _) = store.put(content.as_bytes())?;
    let mut w = LayerWriter::new(store);
    for d in dirs {
        let e = match found.remove(d) {
            Some(e) if e.is_dir() => e,
            _ => Entry::dir(d.to_vec()),
        };
        w.push(&e)?;
    }
    w.push(&Entry::small_file(INSTANCE_FILE.to_vec(), id, content.len() as u32))?;
    Ok(w.finish(Some(*top), [("instance".to_string(), name.to_string())].into())?)
}

/// After a lazy deploy's service answered: what its mount (control socket
/// `control`) read first, kept as the prefetch order of the stack of `top`
/// when the store holds none or one was asked for (`xenod prefetch
/// record`). Only data chunks of that stack are kept (not the instance
/// layer's). Returns `{"waits": reads that waited on the daemon for a
/// chunk (from its store or a provider), "recorded": entries kept or null,
/// "order": entries held}`; the daemon counts the reads that waited for
/// a provider (`xenod status`, `lazy.stalls`).
fn record_order(store: &Store, top: &LayerId, control: &Path) -> Result<serde_json::Value> {
    let (touched, waits) = xenod_cowfs::first_touches(control)?;
    let held = store.order(top).ok().flatten();
    let mut recorded = None;
    if held.is_none() || store.order_requested(top)? {
        let chunks = store.stack_data_chunks(top)?;
        let order = xenod_store::Order::new(*top, touched.into_iter().filter(|id| chunks.contains(id)));
        if !order.ids.is_empty() {
            store.put_order(&order)?;
            recorded = Some(order.ids.len());
        }
    }
    let entries = match recorded {
        Some(n) => Some(n),
        None => held.map(|o| o.ids.len()),
    };
    Ok(json!({ "waits": waits, "recorded": recorded, "order": entries }))
}

impl Instances {
    /// Deploys the stack of `reference` (local: every layer here, or with
    /// `lazy` its manifests) as one instance or `replicas`; returns
    /// `{"instances": [..], "timeline": [..], "errors": [..]}`, an error for
    /// each replica that failed (nothing of it is left behind).
    pub fn deploy(&self, reference: &str, a: &DeployOptions) -> Result<serde_json::Value> {
        let data = self.data.as_path();
        let mut tl = Timeline::new(!a.verbose);
        let url = reference;
        let store = Arc::new(Store::open(data).with_context(|| format!("opening the store in {}", data.display()))?);
        let top = store.resolve(url)?;
        tl.step("resolve");
        // Every layer of the stack must be local (fetching from peers is `xenod fetch`).
        store.stack(&top).with_context(|| format!("layers of {url} are not all here; fetch them first"))?;
        tl.step("fetch (layers local)");
        let mut spec = stack_spec(&store, &top)?.ok_or_else(|| {
            err!(
                "{url} carries no deploy spec: create the overlay with --spec FILE (see `xenod overlay create --help`)"
            )
        })?;
        spec.apply(&SpecOverrides {
            root: a.root,
            memory_mib: a.memory,
            ports: (!a.ports.is_empty()).then(|| a.ports.clone()),
            cmdline: a.cmdline.clone(),
            ..Default::default()
        });
        spec.limits.apply(&a.limits);
        spec.limits.validate(spec.vcpus).map_err(|e| Error::coded(Exit::BadInput, e.to_string()))?;
        let (kept, dropped) = spec.limits.applicable(spec.root, true);
        if !dropped.is_empty() {
            let why: Vec<String> = dropped.iter().map(|(l, why)| format!("{l} ({why})")).collect();
            if !a.best_effort {
                return Err(Error::coded(
                    Exit::BadInput,
                    format!("this guest cannot take {}; --best-effort deploys it without them", why.join(", ")),
                ));
            }
            tracing::warn!("deploying without {}", why.join(", "));
            spec.limits = kept;
        }
        let base_name = a
            .name
            .clone()
            .or_else(|| spec.instance.clone())
            .unwrap_or_else(|| format!("xenod-{}", &top.to_string()[..8]));
        let names: Vec<String> = if a.replicas <= 1 {
            vec![base_name]
        } else {
            (1..=a.replicas).map(|i| format!("{base_name}-{i}")).collect()
        };
        if a.replicas > 1 {
            // Replicas cannot share fixed host ports.
            for p in &mut spec.ports {
                p.host = 0;
            }
        }
        for n in &names {
            xenod_deployer::validate_name(n)?;
            if instance_dir(data, n).exists() {
                bail!("instance {n:?} exists; `xenod destroy {n}` it first or pick another --name");
            }
        }
        // Nothing is created before the host has admitted every replica.
        let what =
            if names.len() == 1 { names[0].clone() } else { format!("{} replicas ({}, ...)", names.len(), names[0]) };
        self.admit(&what, &Ask::of(&spec).times(names.len() as u32), None)?;
        let uri = a.uri.clone().unwrap_or_else(default_uri);
        let single = names.len() == 1 && a.verbose;
        let results: Vec<Result<serde_json::Value>> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|n| {
                    let (store, spec, uri) = (store.clone(), spec.clone(), uri.clone());
                    s.spawn(move || self.deploy_one(store, top, spec, n, &uri, a, single))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(err!("deploy thread panicked")))).collect()
        });
        tl.step(if names.len() == 1 { "deployed" } else { "all replicas deployed" });
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for (n, r) in names.iter().zip(results) {
            match r {
                Ok(v) => ok.push(v),
                Err(e) => errors.push(format!("{n}: {}", e.chain())),
            }
        }
        Ok(json!({ "instances": ok, "timeline": tl.json(), "errors": errors }))
    }

    #[allow(clippy::too_many_arguments)]
    fn deploy_one(
        &self,
        store: Arc<Store>,
        top: LayerId,
        mut spec: DeploySpec,
        name: &str,
        uri: &str,
        a: &DeployOptions,
        verbose: bool,
    ) -> Result<serde_json::Value> {
        let data = self.data.as_path();
        let mut tl = Timeline::new(!verbose);
        let dir = self.dir(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let domain = self.domain_name(name);
        let mut guard = Cleanup {
            instances: self.clone(),
            name: name.to_string(),
            domain: domain.clone(),
            store: store.clone(),
            uri: None,
            armed: true,
        };
        spec.instance = Some(name.to_string());
        let net = a.net.as_deref().map(|env| crate::net::attach(data, env, name, None)).transpose()?;
        let layer = instance_layer(&store, &top, name, &net.as_ref().map(|n| n.settings()).unwrap_or_default())?;
        store.pin(&pin_label(name), &layer)?;
        tl.step("instance layer");
        let mut inst = Instance {
            name: name.to_string(),
            top,
            layer,
            uri: uri.to_string(),
            root: spec.root,
            ports: vec![],
            mount_pid: None,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            mounted: None,
            domain: (domain != name).then(|| domain.clone()),
            spec: Some(spec.clone()),
            lazy: a.lazy,
            net,
            owner: Some(a.owner.clone().unwrap_or_else(|| self.default_owner())),
        };
        inst.save(data)?;
        let pid = self.spawn_mount(&inst)?;
        inst.mount_pid = Some(pid);
        inst.save(data)?;
        tl.step("mount");
        let hv = hypervisor(uri)?;
        let mut model = DomainModel::from_spec(&spec, &inst.mountpoint(data), dir.join("console.log"))?;
        model.name = domain.clone();
        if let Some(n) = &inst.net {
            n.add_to(&mut model);
        }
        inst.ports = model.network.forwards().to_vec();
        inst.save(data)?;
        guard.uri = Some(uri.to_string());
        hv.deploy(&model)?;
        tl.step("define + start");
        let port = inst.ports.first().map(|p| p.host);
        let mut lazy = serde_json::Value::Null;
        if !a.no_wait {
            let timeout = a.timeout;
            wait_console(&hv, &domain, GUEST_READY_LINE, timeout)?;
            tl.step("guest booted");
            if let Some(p) = port {
                wait_http(&hv, &domain, p, "/xenod-ready-probe", timeout)?;
                tl.step("service answers");
            }
            if a.lazy {
                lazy = match record_order(&store, &top, &inst.control(data)) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("recording the prefetch order of {top}: {}", e.chain());
                        json!({ "error": e.chain() })
                    }
                };
                tl.step("prefetch order");
            }
        }
        guard.armed = false;
        let service = spec.service.clone().unwrap_or_else(|| name.to_string());
        self.event(EventKind::InstanceDeployed { instance: name.to_string(), service: Some(service) });
        Ok(
            json!({ "name": name, "id": layer.to_string(), "top": top.to_string(), "root": format!("{:?}", spec.root).to_lowercase(),
                   "port": port, "ports": inst.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "timeline": tl.json(),
                   "lazy": lazy }),
        )
    }

    /// Starts the instance's filesystem in its own process (it outlives this
    /// command) and waits until it is mounted.
    pub fn spawn_mount(&self, inst: &Instance) -> Result<u32> {
        let data = self.data.as_path();
        let (mnt, upper) = (inst.mountpoint(data), inst.upper(data));
        fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        fs::create_dir_all(&upper).with_context(|| format!("creating {}", upper.display()))?;
        let how = mount::MountHow {
            upper: Some(upper),
            control: Some(inst.control(data)),
            lazy: inst.lazy,
            passthrough: true,
            upper_quota: inst.spec.as_ref().and_then(|s| s.limits.upper_bytes),
            file_cache_bytes: self.file_cache_bytes,
            ..Default::default()
        };
        let log = instance_dir(data, &inst.name).join("mount.log");
        mount::spawn(data, &inst.mounted().to_string(), &mnt, &how, &log)
    }

    /// Unmounts and removes an instance's files (keeping the upper if `keep`).
    pub fn teardown(&self, name: &str, store: &Store, keep: bool) -> Result<()> {
        let data = self.data.as_path();
        let dir = instance_dir(data, name);
        let mnt = dir.join("root");
        if xenod_cowfs::is_mounted(&mnt) {
            xenod_cowfs::unmount(&mnt, true).with_context(|| format!("unmounting {}", mnt.display()))?;
            // Guests started since hold copies of this mount in their own mount
            // namespaces (libvirt gives QEMU one); removing the mountpoint
            // detaches those copies too, so the filesystem process can end.
            let _ = fs::remove_dir(&mnt);
        }
        if let Ok(inst) = Instance::load(data, name)
            && let Some(pid) = inst.mount_pid
        {
            // The filesystem process exits once unmounted; wait for it briefly.
            let t0 = Instant::now();
            while xenod_cowfs::process_runs(pid) && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        store.unpin(&pin_label(name))?;
        if keep {
            for f in ["root", "console.log", "mount.log", "state.save", "instance.json", "mount.ctl"] {
                let p = dir.join(f);
                let _ = if p.is_dir() { fs::remove_dir(&p) } else { fs::remove_file(&p) };
            }
        } else if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<(Instance, String)>> {
        let data = self.data.as_path();
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(self.root()) else { return Ok(out) };
        for e in rd {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Ok(inst) = Instance::load(data, &name) {
                let state = hypervisor(&inst.uri)
                    .and_then(|hv| hv.state(inst.domain()).map_err(Error::from))
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| format!("unknown ({})", e.chain()));
                let state =
                    if instance_dir(data, &name).join("state.save").exists() { "suspended".to_string() } else { state };
                out.push((inst, state));
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    pub fn stop(&self, name: &str) -> Result<String> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        let outcome = hypervisor(&inst.uri)?.stop(inst.domain(), Duration::from_secs(30))?;
        self.event(EventKind::InstanceStopped { instance: name.to_string() });
        Ok(format!("{outcome:?}"))
    }

    pub fn start(&self, name: &str) -> Result<()> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        self.admit_again(&inst)?;
        if !xenod_cowfs::is_mounted(&inst.mountpoint(data)) {
            let mut inst = inst.clone();
            inst.mount_pid = Some(self.spawn_mount(&inst)?);
            inst.save(data)?;
        }
        hypervisor(&inst.uri)?.start(inst.domain())?;
        self.event(EventKind::InstanceStarted { instance: name.to_string() });
        Ok(())
    }

    pub fn destroy(&self, name: &str, keep: bool) -> Result<()> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        let store = Store::open(data)?;
        match hypervisor(&inst.uri)?.destroy(inst.domain()) {
            Ok(()) | Err(xenod_deployer::Error::NoSuchDomain { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.teardown(name, &store, keep)?;
        self.event(EventKind::InstanceDestroyed { instance: name.to_string() });
        Ok(())
    }

    /// A stopped or suspended instance asks again what it held.
    fn admit_again(&self, inst: &Instance) -> Result<()> {
        match &inst.spec {
            Some(spec) => self.admit(&inst.name, &Ask::of(spec), Some(&inst.name)),
            None => Ok(()),
        }
    }

    pub fn logs(&self, name: &str) -> Result<String> {
        let data = self.data.as_path();
        let p = instance_dir(data, name).join("console.log");
        let b = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    pub fn suspend(&self, name: &str) -> Result<PathBuf> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        if inst.root == RootMode::Fs {
            bail!(
                "{name} has a shared-filesystem root, and the hypervisor cannot save such a guest; \
                 use `xenod stop {name}` and `xenod start {name}` instead (its upper layer is kept)"
            );
        }
        let state = instance_dir(data, name).join("state.save");
        hypervisor(&inst.uri)?.save(inst.domain(), &state)?;
        self.event(EventKind::InstanceStopped { instance: name.to_string() });
        Ok(state)
    }

    pub fn resume(&self, name: &str) -> Result<()> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        let state = instance_dir(data, name).join("state.save");
        if !state.exists() {
            bail!("{name} is not suspended (no {})", state.display());
        }
        self.admit_again(&inst)?;
        if !xenod_cowfs::is_mounted(&inst.mountpoint(data)) {
            let mut inst = inst.clone();
            inst.mount_pid = Some(self.spawn_mount(&inst)?);
            inst.save(data)?;
        }
        hypervisor(&inst.uri)?.restore(&state)?;
        fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
        self.event(EventKind::InstanceStarted { instance: name.to_string() });
        Ok(())
    }

    /// The instance's upper layer as an overlay on its stack, its solid blocks
    /// at zstd `level` (0: the store's).
    pub fn commit(&self, name: &str, meta: BTreeMap<String, String>, level: i32) -> Result<xenod_cowfs::CommitStats> {
        let data = self.data.as_path();
        let inst = Instance::load(data, name)?;
        let store = Store::open(data)?;
        store.set_block_level(level);
        let store = Arc::new(store);
        let stack = store.stack(&inst.mounted())?;
        // A paused guest writes nothing while its upper is read.
        let hv = hypervisor(&inst.uri)?;
        let paused = hv.state(inst.domain()).is_ok_and(|s| s.is_active()) && hv.suspend(inst.domain()).is_ok();
        // The mount is live: commit_live leaves its staging area alone.
        let mut cache = xenod_cowfs::CommitCache::default();
        let r = xenod_cowfs::commit_live(store, &stack, &inst.upper(data), meta, &mut cache, None);
        if paused {
            hv.resume(inst.domain())?;
        }
        Ok(r?)
    }
}
