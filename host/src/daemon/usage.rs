//! Accounting inside the daemon: the sampler that reads what each
//! instance used into the ledger ([`crate::usage`]), and `xenod usage`.
//!
//! Where each counter comes from:
//!
//! | counter | source |
//! |---|---|
//! | CPU time, memory | libvirt (`Libvirt::usage`) |
//! | disk bytes, disk root | libvirt's block counters of the guest's disk |
//! | disk bytes, tree root | the instance mount's FUSE read and write bytes (its stats socket): an instance's mount tracks changes for migration, which keeps FUSE passthrough off for its files, so every byte reaches it |
//! | network bytes | the kernel's counters of the guest's forwarded ports (`usage::net`) |
//! | upper size | the blocks of the upper directory's files |
//!
//! Only the daemon samples (an engine embedded in a command reads the
//! ledger as the daemon left it).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xenod_deployer::{Libvirt, RootMode};

use super::context::Daemon;
use crate::error::Result;
use crate::instance::Instance;
use crate::usage::net::NetCounters;
use crate::usage::{Ledger, Reading, Report, now};

/// The names of this host's instance directories.
fn names(d: &Daemon) -> Vec<String> {
    fs::read_dir(d.instances().root())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The default sampling interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// How often a migrating instance is sampled, so little of its use on
/// this host is missed when it leaves.
pub const MIGRATING_EVERY: Duration = Duration::from_secs(1);

/// The daemon's accounting: its ledger and its network counters.
pub struct Accounting {
    pub ledger: Ledger,
    net: Option<NetCounters>,
    net_error: Option<String>,
    interval: Duration,
    /// Connections by URI, kept between samples.
    hypervisors: Mutex<HashMap<String, Arc<Libvirt>>>,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting").field("ledger", &self.ledger).field("net", &self.net).finish()
    }
}

impl Accounting {
    /// The ledger of `d`'s data directory and its counting table (made with the first forwarded port).
    pub fn open(d: &Daemon) -> Result<Self> {
        let ledger = Ledger::open(d.data_dir())?;
        let tag: String = d.node().id().to_string().chars().take(12).collect();
        let (net, net_error) = match NetCounters::start(&tag) {
            Ok(n) => (Some(n), None),
            Err(e) => {
                tracing::warn!("network bytes of guests are not counted: {}", e.chain());
                (None, Some(format!("network bytes are not counted on this host: {}", e.chain())))
            }
        };
        let interval = d.config().usage_interval_secs.map_or(INTERVAL, |s| Duration::from_secs(s.max(1)));
        Ok(Accounting { ledger, net, net_error, interval, hypervisors: Default::default() })
    }

    fn hypervisor(&self, uri: &str) -> Result<Arc<Libvirt>> {
        let mut h = self.hypervisors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hv) = h.get(uri) {
            return Ok(hv.clone());
        }
        let hv = Arc::new(crate::instance::hypervisor(uri)?);
        h.insert(uri.to_owned(), hv.clone());
        Ok(hv)
    }

    /// Samples this host's instances (`only`: that one) into the ledger.
    /// Blocking: libvirt, sockets and a walk of each upper.
    pub fn sample(&self, d: &Daemon, only: Option<&str>) -> Result<usize> {
        let _one = self.ledger.lock();
        let data = d.data_dir();
        let insts: Vec<Instance> = names(d)
            .into_iter()
            .filter(|n| only.is_none_or(|o| o == n))
            .filter_map(|n| Instance::load(data, &n).ok())
            .collect();
        let net = match &self.net {
            Some(n) => {
                let want: BTreeMap<String, Vec<u16>> =
                    insts.iter().map(|i| (i.name.clone(), i.ports.iter().map(|p| p.host).collect())).collect();
                // Sampling one instance must not drop the others' rules.
                let want = if only.is_some() { self.with_all_ports(d, want) } else { want };
                n.sync(&want).unwrap_or_else(|e| {
                    tracing::warn!("reading the network counters: {}", e.chain());
                    BTreeMap::new()
                })
            }
            None => BTreeMap::new(),
        };
        let mut samples = Vec::new();
        for inst in &insts {
            let mut r = Reading::default();
            match self.hypervisor(&inst.uri).and_then(|hv| Ok(hv.usage(inst.domain())?)) {
                Ok(u) => {
                    (r.active, r.cpu_ns, r.memory_kib) = (u.active, u.cpu_ns, u.memory_kib);
                    if inst.root == RootMode::Disk {
                        (r.disk_read, r.disk_written) = (u.disk_read, u.disk_written);
                    }
                }
                Err(e) => tracing::debug!("usage of {}: {}", inst.name, e.chain()),
            }
            if inst.root != RootMode::Disk
                && let Some(pid) = inst.mount_pid
            {
                let sock = crate::instance::mount::stats_dir(data).join(format!("{pid}.sock"));
                if let Ok(s) = xenod_cowfs::read_stats(&sock, Duration::from_secs(1)) {
                    (r.disk_read, r.disk_written) = (s.read_bytes, s.written_bytes);
                }
            }
            if let Some(b) = net.get(&inst.name) {
                (r.net_in, r.net_out) = (b.rx, b.tx);
            }
            r.upper_bytes = crate::usage::upper_bytes(&inst.upper(data));
            let owner = inst.owner.clone().unwrap_or_else(|| "unknown".into());
            samples.push((inst.name.clone(), owner, r));
        }
        self.ledger.record(&samples, now(), self.interval.as_secs())?;
        Ok(samples.len())
    }

    /// `want` with every other instance's ports added.
    fn with_all_ports(&self, d: &Daemon, mut want: BTreeMap<String, Vec<u16>>) -> BTreeMap<String, Vec<u16>> {
        for name in names(d) {
            if want.contains_key(&name) {
                continue;
            }
            if let Ok(i) = Instance::load(d.data_dir(), &name) {
                want.insert(name, i.ports.iter().map(|p| p.host).collect());
            }
        }
        want
    }

    /// Removes the counting table (the daemon stops).
    pub fn close(&self) {
        if let Some(n) = &self.net {
            n.remove();
        }
    }
}

/// Opens the accounting of `d` and samples every interval until the
/// daemon is gone.
pub fn spawn(d: &Arc<Daemon>) {
    let acc = match Accounting::open(d) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::warn!("accounting is off: {}", e.chain());
            return;
        }
    };
    let _ = d.usage.set(acc.clone());
    let weak = Arc::downgrade(d);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(acc.interval);
        let mut pruned = std::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(d) = weak.upgrade() else { return };
            if d.stopping() {
                return;
            }
            let (a, prune) = (acc.clone(), pruned.elapsed() > Duration::from_secs(600));
            if prune {
                pruned = std::time::Instant::now();
            }
            let r = tokio::task::spawn_blocking(move || {
                a.sample(&d, None)?;
                if prune {
                    a.ledger.prune(now())?;
                }
                Ok::<_, crate::error::Error>(())
            })
            .await;
            match r {
                Ok(Err(e)) => tracing::warn!("sampling usage: {}", e.chain()),
                Err(e) => tracing::warn!("sampling usage: {e}"),
                Ok(Ok(())) => {}
            }
        }
    });
}

/// A last sample and the counting table removed, as the daemon stops.
pub async fn stop(d: &Arc<Daemon>) {
    let Some(acc) = d.usage.get().cloned() else { return };
    let d2 = d.clone();
    let last = tokio::task::spawn_blocking(move || {
        if let Err(e) = acc.sample(&d2, None) {
            tracing::warn!("the last usage sample: {}", e.chain());
        }
        acc.close();
    });
    // A sample stuck on libvirt or the disk must not keep the daemon from
    // stopping: the ledger's last row is on disk, the next start counts on.
    if tokio::time::timeout(STOP_WAIT, last).await.is_err() {
        tracing::warn!("the last usage sample did not end within {STOP_WAIT:?}; stopping without it");
    }
}

/// How long a stopping daemon waits for its last usage sample.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Samples instance `name` every [`MIGRATING_EVERY`] until `done` resolves.
pub async fn while_migrating<T>(d: &Arc<Daemon>, name: &str, done: impl std::future::Future<Output = T>) -> T {
    let Some(acc) = d.usage.get().cloned() else { return done.await };
    let mut done = std::pin::pin!(done);
    let mut tick = tokio::time::interval(MIGRATING_EVERY);
    loop {
        tokio::select! {
            r = &mut done => return r,
            _ = tick.tick() => {
                let (a, d2, n) = (acc.clone(), d.clone(), name.to_owned());
                let _ = tokio::task::spawn_blocking(move || a.sample(&d2, Some(&n))).await;
            }
        }
    }
}

/// `xenod usage [NAME] [--since T]`: a fresh sample, then the ledger's sums.
pub async fn report(d: &Arc<Daemon>, name: Option<String>, since: Option<u64>) -> Result<Report> {
    let here = names(d);
    match d.usage.get().cloned() {
        Some(acc) => {
            let d2 = d.clone();
            let n = name.clone();
            tokio::task::spawn_blocking(move || {
                acc.sample(&d2, n.as_deref())?;
                let mut rep = acc.ledger.report(n.as_deref(), since, now(), &here)?;
                rep.notes.extend(acc.net_error.clone());
                Ok(rep)
            })
            .await?
        }
        None => {
            let data = d.data_dir().to_path_buf();
            tokio::task::spawn_blocking(move || {
                let mut rep = Ledger::open(&data)?.report(name.as_deref(), since, now(), &here)?;
                rep.notes.push("no daemon runs here: figures as of its last sample".into());
                Ok(rep)
            })
            .await?
        }
    }
}
