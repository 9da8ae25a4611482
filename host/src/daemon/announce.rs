//! The daemon on the gossip topic: it joins through the configured and
//! remembered peers, announces this host's presence (address and the
//! layers it holds), every name record (removals included) and key
//! succession it holds, each
//! [`ANNOUNCE_EVERY`], and remembers each presence it hears as a known peer
//! holding those layers, so a fetch without `--from` knows its providers.
//! Name records arriving over gossip are stored by the node itself when
//! the host's trust admits them (see xenod-peer's `names` module).
//!
//! The presence carries this host's attributes ([`host_attrs`]): the
//! hypervisor kinds it can run (probed once at start), its vCPUs, memory,
//! disk free under the data directory, load and configured labels. That
//! makes it a host advertisement, which [`hosts`] lists, filtered, while
//! it is younger than the configured expiry.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use xenod_peer::{HostAttrs, Presence, PresenceFn};

use super::context::Daemon;
use super::reply;
use crate::error::{Error, Result};
use crate::filter::{self, Attr};
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
    tokio::spawn(async move {
        let w = weak.clone();
        let on_presence: PresenceFn = Arc::new(move |p| {
            if let (Some(d), Some(addr)) = (w.upgrade(), p.addr()) {
                let layers: Vec<String> = p.layers.iter().map(|l| l.to_string()).collect();
                d.remember(&[addr], &layers);
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
        loop {
            tick.tick().await;
            let Some(d) = weak.upgrade() else { return };
            if d.stopping() {
                return;
            }
            let names = d.node().store().names().unwrap_or_default();
            let successions = d.node().store().successions().unwrap_or_default();
            let attrs = host_attrs(d.data_dir(), &hv, &d.config().labels);
            if let Err(e) = d.node().announce(Some(attrs), names, successions).await {
                tracing::debug!("gossip announcement: {e}");
            }
        }
    });
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

/// This host's attributes now.
pub fn host_attrs(data_dir: &Path, hv: &[String], labels: &BTreeMap<String, String>) -> HostAttrs {
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
    let mem_total = kib("MemTotal:");
    HostAttrs {
        hv: hv.to_vec(),
        vcpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        mem_total,
        mem_free: kib("MemAvailable:").min(mem_total),
        disk_free,
        load,
        labels: labels.clone(),
    }
}

/// The attributes a filter sees: the advertised ones, `node`, `layers`
/// (how many it holds) and `label.KEY` for each label.
pub fn filter_attrs(node: &str, layers: usize, a: &HostAttrs) -> BTreeMap<String, Attr> {
    let mut m = BTreeMap::new();
    m.insert("node".into(), Attr::Text(node.to_owned()));
    m.insert("layers".into(), Attr::Num(layers as f64));
    m.insert("hv".into(), Attr::List(a.hv.clone()));
    m.insert("vcpus".into(), Attr::Num(f64::from(a.vcpus)));
    m.insert("mem_total".into(), Attr::Num(a.mem_total as f64));
    m.insert("mem_free".into(), Attr::Num(a.mem_free as f64));
    m.insert("disk_free".into(), Attr::Num(a.disk_free as f64));
    m.insert("load".into(), Attr::Num(f64::from(a.load)));
    for (k, v) in &a.labels {
        m.insert(format!("label.{k}"), Attr::Text(v.clone()));
    }
    m
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
        attrs: host_attrs(d.data_dir(), &probe_hypervisors(), &d.config().labels),
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
                .matches(&filter_attrs(&h.node, h.layers, &h.attrs))
                .map_err(|why| Error::coded(Exit::Usage, format!("--where {:?}: {why}", filter.unwrap_or(""))))?,
        };
        if keep {
            out.push(h);
        }
    }
    Ok(reply::Hosts { hosts: out, live })
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
