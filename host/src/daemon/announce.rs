//! The daemon on the gossip topic: it joins through the configured and
//! remembered peers, announces this host's presence (address and the
//! layers it holds), every name record (removals included) and key
//! succession it holds, each
//! [`ANNOUNCE_EVERY`] and when a gossip neighbour comes up, and remembers each presence it hears as a known peer
//! holding those layers, so a fetch without `--from` knows its providers.
//! Name records arriving over gossip are stored by the node itself when
//! the host's trust admits them (see xenod-peer's `names` module).
//!
//! The presence carries this host's attributes ([`host_attrs`]): the
//! hypervisor kinds it can run (probed once at start), its vCPUs, memory,
//! disk free under the data directory, load and configured labels. That
//! makes it a host advertisement, which [`hosts`] lists, filtered, while
//! it is younger than the configured expiry. Memory and vCPUs are what the
//! config's `[capacity]` offers (all of the host's by default); memory
//! free is that less what this host's instances were given, and never
//! more than the kernel has available.
//!
//! It also carries the services of this host's running instances
//! ([`services_here`]), which [`services`] lists across the federation,
//! and each tick notes what changed for the event stream: hosts that
//! joined or expired, this host's names published or removed, chunks
//! refused from a peer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use xenod_peer::events::EventKind;
use xenod_peer::{Advert, HostAttrs, Presence, PresenceFn, ServiceAd};
use xenod_store::NameRecord;

use super::context::Daemon;
use super::reply;
use crate::admission::Capacity;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::filter;
use crate::instance::Instance;
use crate::place;
use xenod_store::Exit;

/// How long a host that stopped announcing stays listed (the default of
/// `host_expiry_secs`).
pub const HOST_EXPIRY: Duration = Duration::from_secs(10);

/// How often a daemon announces itself [default; `XENOD_ANNOUNCE_MS`
/// overrides it, for tests].
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

fn every() -> Duration {
    std::env::var("XENOD_ANNOUNCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(ANNOUNCE_EVERY)
}

/// Joins the topic and announces until the daemon is gone.
pub fn spawn(d: &Arc<Daemon>) {
    let weak: Weak<Daemon> = Arc::downgrade(d);
    let bootstrap = d.default_peers();
    let known: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    tokio::spawn(async move {
        let (w, k) = (weak.clone(), known.clone());
        let on_presence: PresenceFn = Arc::new(move |p| {
            let Some(d) = w.upgrade() else { return };
            let Some(addr) = p.addr() else { return };
            let node = addr.id.to_string();
            let mut known = k.lock().unwrap_or_else(|e| e.into_inner());
            if p.leaving {
                if known.remove(&node) {
                    d.node().note_event(EventKind::HostLeft { node, expired: false });
                }
                return;
            }
            let layers: Vec<String> = p.layers.iter().map(|l| l.to_string()).collect();
            d.remember(&[addr], &layers);
            if p.attrs.is_some() && known.insert(node.clone()) {
                d.node().note_event(EventKind::HostJoined { node });
            }
        });
        {
            let Some(d) = weak.upgrade() else { return };
            if let Err(e) = d.node().join_gossip(bootstrap, Some(on_presence)).await {
                tracing::warn!("gossip: {e}");
                return;
            }
        }
        let mut tick = tokio::time::interval(every());
        let hv = probe_hypervisors();
        let mut changes = Changes::default();
        let Some(up) = weak.upgrade().map(|d| d.node().neighbour_up()) else { return };
        loop {
            // Each period, and at once when a neighbour comes up: a host
            // that joins is known everywhere without waiting a period.
            tokio::select! {
                _ = tick.tick() => {}
                _ = up.notified() => {}
            }
            let Some(d) = weak.upgrade() else { return };
            if d.stopping() {
                return;
            }
            let names = d.node().store().names().unwrap_or_default();
            let successions = d.node().store().successions().unwrap_or_default();
            let instances = d.instances().clone();
            let here =
                tokio::task::spawn_blocking(move || instances.list().unwrap_or_default()).await.unwrap_or_default();
            let attrs = host_attrs(d.data_dir(), &hv, d.config(), &d.instances().capacity_of(&here, None));
            let services = services_here(&here);
            for kind in changes.since(&d, &names, &known) {
                d.node().publish_event(kind).await;
            }
            let ad = Advert { attrs: Some(attrs), services, names, successions };
            if let Err(e) = d.node().announce(ad).await {
                tracing::debug!("gossip announcement: {e}");
            }
        }
    });
}

/// What the announce loop saw last, to tell what changed: this host's
/// names (by sequence) and the chunks refused per peer. The first tick
/// only takes the baseline.
#[derive(Default)]
struct Changes {
    started: bool,
    names: BTreeMap<String, (u64, bool)>,
    bad: BTreeMap<String, u64>,
}

impl Changes {
    /// Events for what changed since the last tick; hosts that expired are
    /// noted (not published: every host sees them for itself).
    fn since(&mut self, d: &Daemon, names: &[NameRecord], known: &Mutex<BTreeSet<String>>) -> Vec<EventKind> {
        let mut out = Vec::new();
        let expiry = d.config().host_expiry_secs.map_or(HOST_EXPIRY, Duration::from_secs);
        let live: BTreeSet<String> =
            d.node().hosts(expiry).iter().filter_map(|(p, _)| p.addr()).map(|a| a.id.to_string()).collect();
        {
            let mut k = known.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<String> = k.difference(&live).cloned().collect();
            for node in gone {
                k.remove(&node);
                d.node().note_event(EventKind::HostLeft { node, expired: true });
            }
        }
        let own = crate::config::load_key(d.data_dir()).ok().flatten().map(|k| k.verifying_key().to_bytes());
        for r in names.iter().filter(|r| Some(r.key) == own) {
            let now = (r.seq, r.removed);
            if self.names.insert(r.name.clone(), now) != Some(now) && self.started {
                out.push(if r.removed {
                    EventKind::NameRemoved { name: r.name.clone() }
                } else {
                    EventKind::NamePublished { name: r.name.clone(), layer: r.id.to_string() }
                });
            }
        }
        for (peer, c) in d.node().stats().snapshot().peers {
            let before = self.bad.insert(peer.clone(), c.bad_chunks).unwrap_or(c.bad_chunks);
            if c.bad_chunks > before && self.started {
                out.push(EventKind::BadChunk { peer, chunks: c.bad_chunks - before });
            }
        }
        self.started = true;
        out
    }
}

/// The services of this host's instances that run (or are paused), with
/// their forwarded ports as endpoints.
pub fn services_here(here: &[(Instance, String)]) -> Vec<ServiceAd> {
    here.iter()
        .filter(|(_, state)| matches!(state.as_str(), "running" | "paused"))
        .map(|(i, state)| ServiceAd {
            service: i.spec.as_ref().and_then(|s| s.service.clone()).unwrap_or_else(|| i.name.clone()),
            instance: i.name.clone(),
            state: state.clone(),
            endpoints: i.ports.iter().map(|p| format!("tcp://127.0.0.1:{}", p.host)).collect(),
        })
        .collect()
}

/// The hypervisor kinds this host can run guests with: `qemu` (and `tcg`)
/// where QEMU is installed, `kvm` where the accelerator probe says a stock
/// kernel runs under it, `xen` in a Xen dom0.
pub fn probe_hypervisors() -> Vec<String> {
    let mut hv = Vec::new();
    let on_path =
        |b: &str| std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()));
    if on_path("qemu-system-x86_64") || on_path("qemu-system-aarch64") {
        hv.push("qemu".to_owned());
        hv.push("tcg".to_owned());
        if xenod_deployer::probe_accel().accel == xenod_deployer::Accel::Kvm {
            hv.push("kvm".to_owned());
        }
    }
    if Path::new("/proc/xen/capabilities").exists() {
        hv.push("xen".to_owned());
    }
    hv
}

/// This host's attributes now: what `cap` says it offers guests and has
/// free (see `admission`).
pub fn host_attrs(data_dir: &Path, hv: &[String], config: &Config, cap: &Capacity) -> HostAttrs {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let disk_free = rustix::fs::statvfs(data_dir).map(|s| s.f_bavail * s.f_frsize).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let vcpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    HostAttrs {
        hv: hv.to_vec(),
        vcpus: config.capacity.as_ref().and_then(|c| c.vcpus).unwrap_or(vcpus),
        mem_total: cap.mem,
        mem_free: cap.mem_free().min(kib("MemAvailable:")).min(cap.mem),
        disk_free,
        load,
        labels: config.labels.clone(),
    }
}

/// `hosts`: this host and every live advertised one, matching `filter`.
pub fn hosts(d: &Daemon, filter: Option<&str>) -> Result<reply::Hosts> {
    let f = match filter {
        Some(s) => Some(filter::parse(s).map_err(|e| Error::coded(Exit::Usage, format!("--where {s:?}: {e}")))?),
        None => None,
    };
    let expiry = d.config().host_expiry_secs.map_or(HOST_EXPIRY, Duration::from_secs);
    let me = d.node().addr();
    let own_layers = d.store().layers().map(|l| l.iter().filter(|(_, i)| !i.partial).count()).unwrap_or(0);
    let mut all = vec![reply::Host {
        node: d.node().id().to_string(),
        addrs: me.ip_addrs().map(|a| a.to_string()).collect(),
        attrs: own_attrs(d),
        layers: own_layers,
        age_ms: 0,
        this_host: true,
    }];
    for (p, age) in d.node().hosts(expiry) {
        all.push(host_of(&p, age));
    }
    let live = all.len();
    let mut out = Vec::new();
    for h in all {
        let keep = match &f {
            None => true,
            Some(f) => f
                .matches_with(&|n| place::host_attr(&h.node, h.layers, &h.attrs, n))
                .map_err(|why| Error::coded(Exit::Usage, format!("--where {:?}: {why}", filter.unwrap_or(""))))?,
        };
        if keep {
            out.push(h);
        }
    }
    Ok(reply::Hosts { hosts: out, live })
}

/// This host's attributes, its instances listed from their records (no
/// hypervisor asked).
pub fn own_attrs(d: &Daemon) -> HostAttrs {
    host_attrs(d.data_dir(), &probe_hypervisors(), d.config(), &d.instances().capacity(None))
}

/// `services`: the services of this host's instances and those every
/// live host advertises; `name`: only that service's.
pub async fn services(d: &Arc<Daemon>, name: Option<&str>) -> Result<reply::Services> {
    let instances = d.instances().clone();
    let here = tokio::task::spawn_blocking(move || instances.list().unwrap_or_default()).await?;
    let expiry = d.config().host_expiry_secs.map_or(HOST_EXPIRY, Duration::from_secs);
    let mut all: Vec<(String, bool, ServiceAd)> =
        services_here(&here).into_iter().map(|s| (d.node().id().to_string(), true, s)).collect();
    for (p, _) in d.node().hosts(expiry) {
        let node = p.addr().map(|a| a.id.to_string()).unwrap_or_default();
        all.extend(p.services.into_iter().map(|s| (node.clone(), false, s)));
    }
    let instances = all
        .into_iter()
        .filter(|(_, _, s)| name.is_none_or(|n| s.service == n))
        .map(|(host, this_host, s)| reply::Service {
            service: s.service,
            instance: s.instance,
            host,
            this_host,
            state: s.state,
            endpoints: s.endpoints,
        })
        .collect();
    Ok(reply::Services { instances })
}

fn host_of(p: &Presence, age: Duration) -> reply::Host {
    reply::Host {
        node: p.addr().map(|a| a.id.to_string()).unwrap_or_default(),
        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        attrs: p.attrs.clone().unwrap_or_default(),
        layers: p.layers.len(),
        age_ms: age.as_millis() as u64,
        this_host: false,
    }
}
